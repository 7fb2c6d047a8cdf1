//! The one validation function the operator calls on every spec.
//!
//! The CRD schema (bounds, patterns, CEL rules) makes the API server refuse most bad manifests,
//! but servers older than 1.25 ignore CEL and a spec may be built in code. Every rule of the
//! schema is therefore checked here too, with messages that say what to write instead.

use std::fmt;

use kube::ResourceExt;

use super::{
    quantity::parse_quantity, DeviceKind, GPUClass, ModelDeployment, ParallelDegree,
    MAX_PARALLEL_DEGREE,
};

/// Longest ModelDeployment name: pod and service names derived from it must stay within 63.
pub const MAX_NAME_LEN: usize = 40;
/// Schemes a model URI may use.
pub const MODEL_URI_SCHEMES: [&str; 4] = ["hf", "s3", "pvc", "file"];

/// One problem with one field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Path of the field, e.g. `spec.replicas.min`.
    pub field: String,
    /// What is wrong and what to write instead.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Every problem found in one object; never empty.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ValidationErrors(pub Vec<FieldError>);

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

#[derive(Default)]
struct Collector(Vec<FieldError>);

impl Collector {
    fn check(&mut self, ok: bool, field: &str, message: impl FnOnce() -> String) {
        if !ok {
            self.0.push(FieldError {
                field: field.to_owned(),
                message: message(),
            });
        }
    }

    fn finish(self) -> Result<(), ValidationErrors> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ValidationErrors(self.0))
        }
    }
}

/// Checks a ModelDeployment; returns every problem at once.
pub fn validate_model_deployment(md: &ModelDeployment) -> Result<(), ValidationErrors> {
    let mut c = Collector::default();
    let name = md.name_any();
    c.check(name.len() <= MAX_NAME_LEN, "metadata.name", || {
        format!(
            "{name:?} is {} characters; use at most {MAX_NAME_LEN}: llmo derives pod and service names from it",
            name.len()
        )
    });

    let spec = &md.spec;
    check_model_uri(&mut c, &spec.model.uri);
    if let Some(served) = &spec.model.served_name {
        c.check(
            !served.is_empty()
                && served.len() <= 128
                && served.starts_with(|ch: char| ch.is_ascii_alphanumeric())
                && served
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || "._:/-".contains(ch)),
            "spec.model.servedName",
            || format!("{served:?} is not a usable model name: use letters, digits and . _ : / -, starting with a letter or digit, at most 128 characters"),
        );
    }
    if let Some(arch) = &spec.model.architecture {
        if let Some(p) = &arch.parameters {
            c.check(parse_parameter_count(p).is_some(), "spec.model.architecture.parameters", || {
                format!("{p:?} is not a parameter count: write a number and K, M, B or T, e.g. 135M, 8B, 70B")
            });
        }
        if let (Some(heads), Some(kv)) = (arch.attention_heads, arch.kv_heads) {
            c.check(kv >= 1 && kv <= heads && heads % kv == 0, "spec.model.architecture.kvHeads", || {
                format!("{kv} KV heads do not divide {heads} attention heads evenly; grouped-query attention needs attentionHeads to be a multiple of kvHeads")
            });
        }
    }

    check_dns_label(
        &mut c,
        "spec.gpu.class",
        &spec.gpu.class,
        "a GPUClass name such as h100, l4 or cpu",
    );

    for (field, degree) in [
        ("spec.parallelism.tensor", spec.parallelism.tensor),
        ("spec.parallelism.pipeline", spec.parallelism.pipeline),
    ] {
        c.check(degree.in_range(), field, || {
            format!("{degree} is out of range: write \"auto\" or a number from 1 to {MAX_PARALLEL_DEGREE}")
        });
    }
    if let (ParallelDegree::Fixed(t), Some(heads)) = (
        spec.parallelism.tensor,
        spec.model
            .architecture
            .as_ref()
            .and_then(|a| a.attention_heads),
    ) {
        c.check(heads % t == 0, "spec.parallelism.tensor", || {
            format!("tensor parallelism {t} does not divide the model's {heads} attention heads; choose a divisor of {heads} or auto")
        });
    }

    let r = &spec.replicas;
    c.check((1..=1000).contains(&r.min), "spec.replicas.min", || {
        format!(
            "{} is out of range: keep at least 1 replica and at most 1000",
            r.min
        )
    });
    c.check((1..=1000).contains(&r.max), "spec.replicas.max", || {
        format!("{} is out of range: allow from 1 to 1000 replicas", r.max)
    });
    c.check(r.min <= r.max, "spec.replicas", || {
        format!("min ({}) must not exceed max ({})", r.min, r.max)
    });
    if let Some(count) = r.count {
        c.check((0..=1000).contains(&count), "spec.replicas.count", || {
            format!("{count} is out of range: from 0 to 1000")
        });
    }

    let slo = &spec.slo;
    c.check(
        !slo.ttft.get().is_zero() && slo.ttft.get().as_secs() <= 600,
        "spec.slo.ttft",
        || format!("{} is not a usable target: give a time to first token above 0 and at most 10m, e.g. 500ms", slo.ttft),
    );
    if let Some(itl) = slo.inter_token_latency {
        c.check(
            !itl.get().is_zero() && itl.get().as_secs() <= 60,
            "spec.slo.interTokenLatency",
            || format!("{itl} is not a usable target: give an inter-token latency above 0 and at most 1m, e.g. 50ms"),
        );
    }
    c.check(
        (0.1..=1.0).contains(&slo.utilization),
        "spec.slo.utilization",
        || {
            format!(
                "{} is out of range: a target busy fraction is from 0.1 to 1, e.g. 0.8",
                slo.utilization
            )
        },
    );

    let interval = spec.autoscaling.interval.get();
    c.check(
        interval.as_secs() >= 1 && interval.as_secs() <= 600,
        "spec.autoscaling.interval",
        || {
            format!(
                "{} is out of range: from 1s to 10m",
                spec.autoscaling.interval
            )
        },
    );

    let s = &spec.serving;
    if let Some(n) = s.context_length {
        c.check(
            (128..=1_048_576).contains(&n),
            "spec.serving.contextLength",
            || format!("{n} is out of range: from 128 to 1048576 tokens"),
        );
    }
    if let Some(n) = s.max_batch_tokens {
        c.check(
            (16..=1_048_576).contains(&n),
            "spec.serving.maxBatchTokens",
            || format!("{n} is out of range: from 16 to 1048576 tokens"),
        );
    }
    if let Some(f) = s.kv_cache_fraction {
        c.check(
            (0.05..=0.99).contains(&f),
            "spec.serving.kvCacheFraction",
            || format!("{f} is out of range: from 0.05 to 0.99"),
        );
    }
    if let Some(image) = &s.image {
        c.check(
            !image.trim().is_empty() && !image.contains(char::is_whitespace),
            "spec.serving.image",
            || {
                format!(
                    "{image:?} is not an image reference, e.g. ghcr.io/llmo-dev/llmo-serve:0.1.0"
                )
            },
        );
    }
    c.check(s.args.len() <= 32, "spec.serving.args", || {
        format!("{} extra arguments; at most 32", s.args.len())
    });
    c.check(s.env.len() <= 64, "spec.serving.env", || {
        format!("{} variables; at most 64", s.env.len())
    });
    for (i, var) in s.env.iter().enumerate() {
        let field = format!("spec.serving.env[{i}].name");
        let n = &var.name;
        c.check(
            !n.is_empty()
                && !n.starts_with(|ch: char| ch.is_ascii_digit())
                && n.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '_'),
            &field,
            || format!("{n:?} is not a variable name: letters, digits and _, not starting with a digit"),
        );
        c.check(!n.starts_with("LLMO_"), &field, || {
            format!("{n:?} is reserved: llmo sets LLMO_* variables from the spec; set the matching spec.serving field instead")
        });
    }
    if let Some(res) = &s.resources {
        for (field, q) in [
            ("spec.serving.resources.cpu", &res.cpu),
            ("spec.serving.resources.memory", &res.memory),
        ] {
            if let Some(q) = q {
                match parse_quantity(&q.0) {
                    Ok(v) => c.check(v > 0.0, field, || format!("{:?} must be above zero", q.0)),
                    Err(e) => c.check(false, field, || e.to_string()),
                }
            }
        }
    }
    if let Some(meta) = &s.pod_metadata {
        for key in meta.labels.keys() {
            c.check(
                !key.starts_with("llmo.dev/"),
                "spec.serving.podMetadata.labels",
                || format!("{key:?} is reserved: llmo.dev/ labels identify llmo's own pods"),
            );
        }
    }
    c.finish()
}

/// Checks a GPUClass; returns every problem at once.
pub fn validate_gpu_class(class: &GPUClass) -> Result<(), ValidationErrors> {
    let mut c = Collector::default();
    let name = class.name_any();
    check_dns_label(
        &mut c,
        "metadata.name",
        &name,
        "a short lowercase name such as h100",
    );
    let spec = &class.spec;
    match parse_quantity(&spec.memory.0) {
        Ok(v) => c.check(v >= 1024.0 * 1024.0 * 1024.0, "spec.memory", || {
            format!(
                "{:?} is less than 1Gi; give the memory of one device, e.g. 80Gi",
                spec.memory.0
            )
        }),
        Err(e) => c.check(false, "spec.memory", || e.to_string()),
    }
    c.check(
        spec.memory_bandwidth_gbps > 0.0,
        "spec.memoryBandwidthGBps",
        || {
            format!(
                "{} must be above zero: give the device's peak bandwidth in GB/s",
                spec.memory_bandwidth_gbps
            )
        },
    );
    let t = &spec.tflops;
    for (field, v) in [
        ("spec.tflops.fp32", t.fp32),
        ("spec.tflops.bf16", t.bf16),
        ("spec.tflops.fp16", t.fp16),
        ("spec.tflops.fp8", t.fp8),
        ("spec.tflops.int8", t.int8),
        ("spec.tflops.int4", t.int4),
    ] {
        if let Some(v) = v {
            c.check(v >= 0.0, field, || format!("{v} is negative"));
        }
    }
    c.check(
        [t.fp32, t.bf16, t.fp16].iter().any(Option::is_some),
        "spec.tflops",
        || {
            "give at least one of fp32, bf16 or fp16: the planner estimates prefill speed from it"
                .to_owned()
        },
    );
    if spec.device == DeviceKind::Gpu {
        let has_rule = spec
            .matching
            .as_ref()
            .is_some_and(|m| !m.products.is_empty() || !m.product_labels.is_empty());
        c.check(has_rule, "spec.matching", || {
            "a gpu class needs at least one NVML product pattern or product label pattern, or node agents cannot recognise it".to_owned()
        });
    }
    if let Some(m) = &spec.matching {
        for p in m.products.iter().chain(&m.product_labels) {
            c.check(!p.trim().is_empty(), "spec.matching", || {
                "patterns cannot be empty".to_owned()
            });
        }
    }
    c.check(
        (1..=64).contains(&spec.devices_per_node),
        "spec.devicesPerNode",
        || format!("{} is out of range: from 1 to 64", spec.devices_per_node),
    );
    if let Some(p) = spec.price_per_hour {
        c.check(p >= 0.0 && p.is_finite(), "spec.pricePerHour", || {
            format!("{p} must not be negative")
        });
    }
    c.finish()
}

/// Reads a parameter count such as `135M`, `8B` or `1.5T`.
pub fn parse_parameter_count(s: &str) -> Option<f64> {
    let (num, suffix) = s.split_at(s.len().checked_sub(1)?);
    let scale = match suffix {
        "K" => 1e3,
        "M" => 1e6,
        "B" => 1e9,
        "T" => 1e12,
        _ => return None,
    };
    let v: f64 = num.parse().ok()?;
    (v > 0.0 && v.is_finite()).then_some(v * scale)
}

fn check_dns_label(c: &mut Collector, field: &str, value: &str, example: &str) {
    c.check(
        !value.is_empty()
            && value.len() <= 63
            && value
                .chars()
                .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '-')
            && !value.starts_with('-')
            && !value.ends_with('-'),
        field,
        || format!("{value:?} is not a valid name: lowercase letters, digits and '-', at most 63 characters; {example}"),
    );
}

fn check_model_uri(c: &mut Collector, uri: &str) {
    const FIELD: &str = "spec.model.uri";
    if uri.trim().is_empty() {
        c.check(false, FIELD, || {
            "is required: where the weights come from, e.g. hf://HuggingFaceTB/SmolLM2-135M-Instruct".to_owned()
        });
        return;
    }
    let Some((scheme, rest)) = uri.split_once("://") else {
        c.check(false, FIELD, || {
            format!("{uri:?} has no scheme: write hf://org/repo, s3://bucket/path, pvc://claim/path or file:///path")
        });
        return;
    };
    if !MODEL_URI_SCHEMES.contains(&scheme) {
        c.check(false, FIELD, || {
            format!(
                "unknown scheme {scheme:?} in {uri:?}: use one of hf://, s3://, pvc://, file://"
            )
        });
        return;
    }
    let segment_ok = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|ch| ch.is_ascii_alphanumeric() || "._-".contains(ch))
    };
    match scheme {
        "hf" => {
            // org/repo[@revision][/path/in/repo]
            let mut parts = rest.splitn(3, '/');
            let org = parts.next().unwrap_or_default();
            let repo_rev = parts.next().unwrap_or_default();
            let (repo, rev) = match repo_rev.split_once('@') {
                Some((r, v)) => (r, Some(v)),
                None => (repo_rev, None),
            };
            c.check(segment_ok(org) && segment_ok(repo), FIELD, || {
                format!("{uri:?} is not a Hugging Face model: write hf://org/repo, hf://org/repo@revision or hf://org/repo/file.gguf")
            });
            if let Some(rev) = rev {
                c.check(segment_ok(rev), FIELD, || {
                    format!("{uri:?} has an empty or malformed revision after '@'")
                });
            }
        }
        "s3" => {
            let bucket = rest.split('/').next().unwrap_or_default();
            c.check(segment_ok(bucket), FIELD, || {
                format!("{uri:?} has no bucket: write s3://bucket/path/to/model")
            });
        }
        "pvc" => {
            let (claim, path) = rest.split_once('/').unwrap_or((rest, ""));
            c.check(segment_ok(claim) && !path.is_empty(), FIELD, || {
                format!("{uri:?} needs a claim and a path: write pvc://claim-name/path/to/model")
            });
        }
        "file" => {
            c.check(rest.starts_with('/') && rest.len() > 1, FIELD, || {
                format!("{uri:?} is not an absolute path: write file:///models/model.gguf (three slashes)")
            });
        }
        _ => unreachable!("scheme checked above"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{GPUClass, ModelDeployment};

    fn md(yaml: &str) -> ModelDeployment {
        serde_yaml::from_str(yaml).unwrap()
    }

    const BASE: &str = r#"
apiVersion: llmo.dev/v1alpha1
kind: ModelDeployment
metadata: {name: chat, namespace: default}
spec:
  model: {uri: "hf://HuggingFaceTB/SmolLM2-135M-Instruct"}
  gpu: {class: cpu}
"#;

    fn with(patch: &str) -> ModelDeployment {
        let mut base: serde_yaml::Value = serde_yaml::from_str(BASE).unwrap();
        let patch: serde_yaml::Value = serde_yaml::from_str(patch).unwrap();
        merge(&mut base, patch);
        serde_yaml::from_value(base).unwrap()
    }

    fn merge(a: &mut serde_yaml::Value, b: serde_yaml::Value) {
        match (a, b) {
            (serde_yaml::Value::Mapping(a), serde_yaml::Value::Mapping(b)) => {
                for (k, v) in b {
                    match a.get_mut(&k) {
                        Some(existing) => merge(existing, v),
                        None => {
                            a.insert(k, v);
                        }
                    }
                }
            }
            (a, b) => *a = b,
        }
    }

    fn errors(md: &ModelDeployment) -> String {
        validate_model_deployment(md).unwrap_err().to_string()
    }

    #[test]
    fn minimal_spec_is_valid_with_defaults() {
        let m = md(BASE);
        validate_model_deployment(&m).unwrap();
        assert_eq!(m.spec.replicas.min, 1);
        assert_eq!(m.spec.slo.ttft.to_string(), "500ms");
        assert_eq!(m.spec.slo.utilization, 0.8);
        assert_eq!(m.spec.parallelism.tensor, ParallelDegree::Auto);
    }

    #[test]
    fn each_rule_has_its_own_message() {
        let cases = [
            (
                "spec: {replicas: {min: 3, max: 1}}",
                "spec.replicas: min (3) must not exceed max (1)",
            ),
            (
                "spec: {replicas: {min: 0, max: 1}}",
                "spec.replicas.min: 0 is out of range",
            ),
            ("spec: {model: {uri: ''}}", "spec.model.uri: is required"),
            (
                "spec: {model: {uri: 'gcs://bucket/m'}}",
                "unknown scheme \"gcs\"",
            ),
            ("spec: {model: {uri: 'models/m.gguf'}}", "has no scheme"),
            (
                "spec: {model: {uri: 'hf://onlyorg'}}",
                "is not a Hugging Face model",
            ),
            (
                "spec: {model: {uri: 'hf://org/repo@'}}",
                "malformed revision",
            ),
            (
                "spec: {model: {uri: 'pvc://claim'}}",
                "needs a claim and a path",
            ),
            (
                "spec: {model: {uri: 'file://relative/m.gguf'}}",
                "is not an absolute path",
            ),
            ("spec: {model: {servedName: '-x'}}", "spec.model.servedName"),
            (
                "spec: {gpu: {class: 'H100'}}",
                "spec.gpu.class: \"H100\" is not a valid name",
            ),
            (
                "spec: {slo: {ttft: 0s}}",
                "spec.slo.ttft: 0s is not a usable target",
            ),
            (
                "spec: {slo: {utilization: 1.5}}",
                "spec.slo.utilization: 1.5 is out of range",
            ),
            (
                "spec: {slo: {interTokenLatency: 2m}}",
                "spec.slo.interTokenLatency",
            ),
            (
                "spec: {serving: {contextLength: 64}}",
                "spec.serving.contextLength: 64 is out of range",
            ),
            (
                "spec: {serving: {kvCacheFraction: 1.0}}",
                "spec.serving.kvCacheFraction",
            ),
            (
                "spec: {serving: {env: [{name: LLMO_PORT, value: '1'}]}}",
                "is reserved",
            ),
            (
                "spec: {serving: {env: [{name: '1X', value: '1'}]}}",
                "is not a variable name",
            ),
            (
                "spec: {serving: {resources: {memory: 12GB}}}",
                "spec.serving.resources.memory: invalid quantity",
            ),
            (
                "spec: {serving: {podMetadata: {labels: {llmo.dev/rank: '0'}}}}",
                "is reserved",
            ),
            (
                "spec: {autoscaling: {interval: 500ms}}",
                "spec.autoscaling.interval",
            ),
            (
                "spec: {model: {architecture: {attentionHeads: 9, kvHeads: 2}}}",
                "do not divide 9 attention heads",
            ),
            (
                "spec: {model: {architecture: {attentionHeads: 9}}, parallelism: {tensor: 2}}",
                "tensor parallelism 2 does not divide the model's 9 attention heads",
            ),
            (
                "metadata: {name: a-name-that-is-far-too-long-for-derived-pod-names}",
                "metadata.name",
            ),
        ];
        for (patch, expected) in cases {
            let msg = errors(&with(patch));
            assert!(
                msg.contains(expected),
                "{patch}\n  got: {msg}\n  want: {expected}"
            );
        }
    }

    #[test]
    fn reports_every_problem_at_once() {
        let e = validate_model_deployment(&with(
            "spec: {replicas: {min: 3, max: 1}, slo: {utilization: 2}, gpu: {class: X}}",
        ))
        .unwrap_err();
        assert_eq!(e.0.len(), 3, "{e}");
    }

    #[test]
    fn accepts_every_uri_form() {
        for uri in [
            "hf://HuggingFaceTB/SmolLM2-135M-Instruct",
            "hf://meta-llama/Llama-3.1-8B-Instruct@main",
            "hf://bartowski/Llama-3.2-1B-Instruct-GGUF/Llama-3.2-1B-Instruct-Q4_K_M.gguf",
            "s3://models/llama-3-70b/",
            "pvc://model-cache/llama/70b",
            "file:///models/smollm2.gguf",
        ] {
            let m = with(&format!("spec: {{model: {{uri: '{uri}'}}}}"));
            validate_model_deployment(&m).unwrap_or_else(|e| panic!("{uri}: {e}"));
        }
    }

    #[test]
    fn gpu_class_rules() {
        let class = |yaml: &str| -> GPUClass { serde_yaml::from_str(yaml).unwrap() };
        let ok = class(
            "apiVersion: llmo.dev/v1alpha1\nkind: GPUClass\nmetadata: {name: l4}\nspec: {memory: 22Gi, memoryBandwidthGBps: 300, tflops: {bf16: 121}, matching: {products: ['NVIDIA L4']}}",
        );
        validate_gpu_class(&ok).unwrap();
        let no_match = class(
            "apiVersion: llmo.dev/v1alpha1\nkind: GPUClass\nmetadata: {name: l4}\nspec: {memory: 22Gi, memoryBandwidthGBps: 300, tflops: {bf16: 121}}",
        );
        assert!(validate_gpu_class(&no_match)
            .unwrap_err()
            .to_string()
            .contains("spec.matching"));
        let cpu = class(
            "apiVersion: llmo.dev/v1alpha1\nkind: GPUClass\nmetadata: {name: cpu}\nspec: {device: cpu, memory: 16Gi, memoryBandwidthGBps: 15, tflops: {fp32: 1}}",
        );
        validate_gpu_class(&cpu).unwrap();
        let tiny = class(
            "apiVersion: llmo.dev/v1alpha1\nkind: GPUClass\nmetadata: {name: x}\nspec: {device: cpu, memory: 10Mi, memoryBandwidthGBps: 0, tflops: {}}",
        );
        let e = validate_gpu_class(&tiny).unwrap_err();
        assert_eq!(e.0.len(), 3, "{e}");
    }

    #[test]
    fn parameter_counts() {
        assert_eq!(parse_parameter_count("135M"), Some(135e6));
        assert_eq!(parse_parameter_count("8B"), Some(8e9));
        assert_eq!(parse_parameter_count("1.5T"), Some(1.5e12));
        assert_eq!(parse_parameter_count("8"), None);
        assert_eq!(parse_parameter_count("B"), None);
        assert_eq!(parse_parameter_count("-1B"), None);
    }
}
