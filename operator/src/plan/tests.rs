//! The planner against real model shapes and the shipped GPU class defaults.

use std::time::Duration;

use super::*;
use crate::api::{parse_manifests, HumanDuration, Manifest, ParallelDegree};

pub(crate) const LLAMA3_8B: &str = r#"{"hidden_size":4096,"intermediate_size":14336,"max_position_embeddings":131072,
  "num_attention_heads":32,"num_hidden_layers":32,"num_key_value_heads":8,"vocab_size":128256}"#;
pub(crate) const LLAMA3_70B: &str = r#"{"hidden_size":8192,"intermediate_size":28672,"max_position_embeddings":131072,
  "num_attention_heads":64,"num_hidden_layers":80,"num_key_value_heads":8,"vocab_size":128256}"#;
pub(crate) const LLAMA3_405B: &str = r#"{"hidden_size":16384,"intermediate_size":53248,"max_position_embeddings":131072,
  "num_attention_heads":128,"num_hidden_layers":126,"num_key_value_heads":8,"vocab_size":128256}"#;
pub(crate) const QWEN25_32B: &str = r#"{"hidden_size":5120,"intermediate_size":27648,"max_position_embeddings":32768,
  "num_attention_heads":40,"num_hidden_layers":64,"num_key_value_heads":8,"vocab_size":152064}"#;
pub(crate) const SMOLLM2_135M: &str = r#"{"hidden_size":576,"intermediate_size":1536,"max_position_embeddings":8192,
  "num_attention_heads":9,"num_hidden_layers":30,"num_key_value_heads":3,"vocab_size":49152,"tie_word_embeddings":true}"#;

pub(crate) fn class(name: &str) -> Hardware {
    let text = include_str!("../../../examples/gpuclasses.yaml");
    parse_manifests(text)
        .into_iter()
        .find_map(|m| match m.unwrap() {
            Manifest::GpuClass(c) if c.metadata.name.as_deref() == Some(name) => {
                Some(Hardware::from_class(name, &c.spec).unwrap())
            }
            _ => None,
        })
        .unwrap_or_else(|| panic!("no GPUClass {name} in examples/gpuclasses.yaml"))
}

pub(crate) fn request<'a>(
    arch: &'a ModelArch,
    hw: &'a Hardware,
    q: Quantization,
) -> PlanRequest<'a> {
    PlanRequest {
        arch,
        hardware: hw,
        quantization: q,
        parallelism: Parallelism::default(),
        context_length: None,
        max_batch_tokens: None,
        kv_cache_fraction: None,
        slo: Slo::default(),
    }
}

fn describe(r: &Result<Plan, PlanError>) -> String {
    match r {
        Ok(p) => format!("{} {}", p.quantization, p.layout),
        Err(PlanError::Unsupported { .. }) => "unsupported".to_owned(),
        Err(e) => format!("error: {e}"),
    }
}

/// Default SLO (TTFT 500ms), context 8192, parallelism auto. Each row: model, class, precision,
/// expected `precision TxP`, and why.
const TABLE: &[(&str, &str, Quantization, &str, &str)] = {
    use Quantization::*;
    &[
        ("8B", "l4", Bf16, "bf16 2x1", "15GiB of weights fit one L4 with 42k KV tokens, but est. TTFT 362ms is over half the target"),
        ("8B", "l4", Fp8, "fp8 1x1", "8.5GiB of weights; fp8 tensor cores halve the prefill"),
        ("8B", "l4", Int4, "int4 2x1", "W4A16 prefills at bf16 speed, so one L4 misses the TTFT headroom"),
        ("8B", "a100", Bf16, "bf16 1x1", "one A100 holds it with 466k KV tokens"),
        ("8B", "a100", Fp8, "unsupported", "A100 has no fp8 tensor cores"),
        ("8B", "a100", Int4, "int4 1x1", "fits one GPU"),
        ("8B", "h100", Bf16, "bf16 1x1", "fits one GPU"),
        ("8B", "h100", Fp8, "fp8 1x1", "fits one GPU"),
        ("8B", "h100", Int4, "int4 1x1", "fits one GPU"),
        ("8B", "h200", Bf16, "bf16 1x1", "fits one GPU"),
        ("8B", "h200", Fp8, "fp8 1x1", "fits one GPU"),
        ("8B", "h200", Int4, "int4 1x1", "fits one GPU"),
        ("70B", "l4", Bf16, "bf16 4x2", "131GiB of weights exceed a 4xL4 node (90GiB): two pipeline stages"),
        ("70B", "l4", Fp8, "fp8 4x1", "66GiB of weights fit one 4xL4 node"),
        ("70B", "l4", Int4, "int4 4x1", "fits one 4xL4 node"),
        ("70B", "a100", Bf16, "bf16 8x1", "TP 2 and 4 fit but miss the TTFT headroom at 312 TFLOP/s"),
        ("70B", "a100", Fp8, "unsupported", "A100 has no fp8 tensor cores"),
        ("70B", "a100", Int4, "int4 8x1", "W4A16 prefill needs the compute of 8 GPUs for the TTFT target"),
        ("70B", "h100", Bf16, "bf16 2x1", "66GiB per GPU leaves 72k KV tokens"),
        ("70B", "h100", Fp8, "fp8 2x1", "one H100 holds the weights but fewer than 4 sequences of KV"),
        ("70B", "h100", Int4, "int4 2x1", "one H100 fits but misses the TTFT headroom"),
        ("70B", "h200", Bf16, "bf16 2x1", "two H200 hold 131GiB with 426k KV tokens"),
        ("70B", "h200", Fp8, "fp8 1x1", "one H200 holds 66GiB of weights and 206k KV tokens"),
        ("70B", "h200", Int4, "int4 2x1", "one H200 fits but misses the TTFT headroom"),
        ("405B", "l4", Bf16, "bf16 4x10", "756GiB of weights need ten 4xL4 nodes"),
        ("405B", "l4", Fp8, "fp8 4x6", "fp8 halves the weights; six nodes meet the TTFT headroom"),
        ("405B", "l4", Int4, "int4 4x3", "the smallest fit; misses the SLO by estimate"),
        ("405B", "a100", Bf16, "bf16 8x2", "756GiB exceed one 8xA100 node: two stages"),
        ("405B", "a100", Fp8, "unsupported", "A100 has no fp8 tensor cores"),
        ("405B", "a100", Int4, "int4 8x1", "fits one node; misses the SLO by estimate"),
        ("405B", "h100", Bf16, "bf16 8x2", "756GiB exceed one 8xH100 node (640GiB): two stages"),
        ("405B", "h100", Fp8, "fp8 8x1", "378GiB fit one 8xH100 node"),
        ("405B", "h100", Int4, "int4 8x1", "fits one node"),
        ("405B", "h200", Bf16, "bf16 8x1", "one 8xH200 node (1120GiB) holds it"),
        ("405B", "h200", Fp8, "fp8 8x1", "fits one node"),
        ("405B", "h200", Int4, "int4 8x1", "fits one node"),
        ("Qwen32B", "l4", Bf16, "bf16 4x1", "61GiB of weights over a 4xL4 node"),
        ("Qwen32B", "l4", Fp8, "fp8 4x1", "TP 2 fits but misses the TTFT headroom"),
        ("Qwen32B", "l4", Int4, "int4 4x1", "TP 1 and 2 fit but miss the TTFT headroom"),
        ("Qwen32B", "a100", Bf16, "bf16 4x1", "TP 1 and 2 fit but miss the TTFT headroom"),
        ("Qwen32B", "a100", Fp8, "unsupported", "A100 has no fp8 tensor cores"),
        ("Qwen32B", "a100", Int4, "int4 2x1", "one A100 fits but misses the TTFT headroom"),
        ("Qwen32B", "h100", Bf16, "bf16 1x1", "61GiB of weights on one H100, 61k KV tokens"),
        ("Qwen32B", "h100", Fp8, "fp8 1x1", "fits one GPU"),
        ("Qwen32B", "h100", Int4, "int4 1x1", "fits one GPU"),
        ("Qwen32B", "h200", Bf16, "bf16 1x1", "fits one GPU"),
        ("Qwen32B", "h200", Fp8, "fp8 1x1", "fits one GPU"),
        ("Qwen32B", "h200", Int4, "int4 1x1", "fits one GPU"),
        ("SmolLM2", "l4", Bf16, "bf16 1x1", "a 135M model fits anywhere"),
        ("SmolLM2", "l4", Fp8, "fp8 1x1", "fits one GPU"),
        ("SmolLM2", "l4", Int4, "int4 1x1", "fits one GPU"),
        ("SmolLM2", "a100", Bf16, "bf16 1x1", "fits one GPU"),
        ("SmolLM2", "a100", Fp8, "unsupported", "A100 has no fp8 tensor cores"),
        ("SmolLM2", "a100", Int4, "int4 1x1", "fits one GPU"),
        ("SmolLM2", "h100", Bf16, "bf16 1x1", "fits one GPU"),
        ("SmolLM2", "h100", Fp8, "fp8 1x1", "fits one GPU"),
        ("SmolLM2", "h100", Int4, "int4 1x1", "fits one GPU"),
        ("SmolLM2", "h200", Bf16, "bf16 1x1", "fits one GPU"),
        ("SmolLM2", "h200", Fp8, "fp8 1x1", "fits one GPU"),
        ("SmolLM2", "h200", Int4, "int4 1x1", "fits one GPU"),
    ]
};

fn model(name: &str) -> ModelArch {
    let cfg = match name {
        "8B" => LLAMA3_8B,
        "70B" => LLAMA3_70B,
        "405B" => LLAMA3_405B,
        "Qwen32B" => QWEN25_32B,
        "SmolLM2" => SMOLLM2_135M,
        _ => unreachable!(),
    };
    ModelArch::from_hf_config(cfg).unwrap()
}

#[test]
fn plans_the_reference_models_on_the_reference_classes() {
    let mut failures = Vec::new();
    for (m, c, q, want, why) in TABLE {
        let arch = model(m);
        let hw = class(c);
        let got = describe(&plan_layout(&request(&arch, &hw, *q)));
        if got != *want {
            failures.push(format!("{m} on {c} in {q}: got {got}, want {want} ({why})"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_plan_fits_and_respects_the_model_and_the_node() {
    for (m, c, q, _, _) in TABLE {
        let arch = model(m);
        let hw = class(c);
        let Ok(plan) = plan_layout(&request(&arch, &hw, *q)) else {
            continue;
        };
        let at = format!("{m} on {c} in {q}");
        assert!(
            plan.memory.total() <= plan.memory.capacity * 1.0001,
            "{at}: {:?}",
            plan.memory
        );
        assert!(
            plan.kv_cache_tokens >= u64::from(plan.context_length),
            "{at}"
        );
        assert_eq!(arch.attention_heads % plan.layout.tensor, 0, "{at}");
        assert_eq!(arch.kv_heads % plan.layout.tensor, 0, "{at}");
        assert!(plan.layout.tensor <= hw.devices_per_node, "{at}");
        assert!(
            plan.reason.contains(&format!(
                "on {} x {} {c}",
                plan.layout.tensor, plan.layout.pipeline
            )),
            "{at}: {}",
            plan.reason
        );
        let price = hw.price_per_hour.unwrap();
        assert!((plan.cost_per_hour.unwrap() - price * f64::from(plan.layout.gpus())).abs() < 1e-9);
    }
}

#[test]
fn auto_takes_the_least_lossy_precision_that_meets_the_slo() {
    // 405B on A100: bf16 needs two nodes and misses the TTFT headroom; fp8 is not available;
    // int8 fits one node and meets it.
    let arch = model("405B");
    let hw = class("a100");
    let plan = plan_layout(&request(&arch, &hw, Quantization::Auto)).unwrap();
    assert_eq!(describe(&Ok(plan.clone())), "int8 8x1");
    assert!(
        plan.reason.contains("bf16 on 8x2 was ruled out: est. TTFT"),
        "{}",
        plan.reason
    );
    // On H100 fp8 exists and wins over int8.
    let hw = class("h100");
    assert_eq!(
        describe(&plan_layout(&request(&arch, &hw, Quantization::Auto))),
        "fp8 8x1"
    );
    // A loose SLO keeps bf16.
    let mut req = request(&arch, &hw, Quantization::Auto);
    req.slo.ttft = HumanDuration::new(Duration::from_secs(2));
    assert_eq!(describe(&plan_layout(&req)), "bf16 8x2");
}

#[test]
fn an_inter_token_target_raises_the_tensor_degree() {
    let arch = model("8B");
    let hw = class("l4");
    let mut req = request(&arch, &hw, Quantization::Bf16);
    assert_eq!(describe(&plan_layout(&req)), "bf16 2x1");
    // TP 2 decodes in about 42ms, over 80% of a 40ms target; TP 4 in about 26ms.
    req.slo.inter_token_latency = Some(HumanDuration::new(Duration::from_millis(40)));
    let plan = plan_layout(&req).unwrap();
    assert_eq!(describe(&Ok(plan.clone())), "bf16 4x1");
    assert!(
        plan.itl_estimate < Duration::from_millis(32),
        "{:?}",
        plan.itl_estimate
    );
    assert!(plan.warnings.is_empty(), "{:?}", plan.warnings);
}

#[test]
fn weights_and_kv_follow_the_documented_memory_model() {
    let arch = model("8B");
    let one = Layout {
        tensor: 1,
        pipeline: 1,
    };
    let w = cost::weights_per_device(&arch, Quantization::Bf16, one);
    assert!(
        (w - arch.parameters * 2.0).abs() < 1.0,
        "bf16 is 2 bytes per parameter"
    );
    let w8 = cost::weights_per_device(&arch, Quantization::Fp8, one);
    assert!(
        (w8 - (arch.body_parameters() + arch.embedding_parameters * 2.0)).abs() < 1.0,
        "embeddings stay 16-bit"
    );
    // 2 x 32 layers x 8 KV heads x 128 x 2 bytes = 128 KiB per token.
    assert_eq!(cost::kv_bytes_per_token_per_device(&arch, one), 131072.0);
    let tp2 = Layout {
        tensor: 2,
        pipeline: 1,
    };
    assert_eq!(cost::kv_bytes_per_token_per_device(&arch, tp2), 65536.0);
    let pp2 = Layout {
        tensor: 1,
        pipeline: 2,
    };
    assert_eq!(cost::kv_bytes_per_token_per_device(&arch, pp2), 65536.0);
}

#[test]
fn impossible_requests_say_what_would_fit() {
    let arch = model("405B");
    let hw = class("l4");
    let mut req = request(&arch, &hw, Quantization::Bf16);
    req.parallelism = Parallelism {
        tensor: ParallelDegree::Fixed(1),
        pipeline: ParallelDegree::Fixed(1),
    };
    let err = plan_layout(&req).unwrap_err().to_string();
    assert!(
        err.starts_with(
            "405.9B parameters in bf16 do not fit in tensor 1 x pipeline 1 on l4: needs"
        ),
        "{err}"
    );
    assert!(err.contains("but one l4 has 22.5GiB"), "{err}");
    assert!(err.contains("what would fit on l4: bf16 with tensor 4 x pipeline 10 (40 l4), or int4 with tensor 4 x pipeline 3 (12 l4)"), "{err}");
}

#[test]
fn tensor_degrees_must_divide_the_heads_and_stay_in_a_node() {
    let arch = model("SmolLM2");
    let hw = class("h100");
    let mut req = request(&arch, &hw, Quantization::Bf16);
    req.parallelism.tensor = ParallelDegree::Fixed(2);
    let err = plan_layout(&req).unwrap_err().to_string();
    assert_eq!(err, "tensor 2 does not divide the model's 9 attention heads and 3 KV heads; degrees that do: 1, 3");
    req.parallelism.tensor = ParallelDegree::Fixed(3);
    assert_eq!(describe(&plan_layout(&req)), "bf16 3x1");

    // Llama 2 7B: 32 heads, 32 KV heads, so 16 divides both but exceeds one node.
    let arch = ModelArch::from_hf_config(
        r#"{"hidden_size":4096,"intermediate_size":11008,"num_attention_heads":32,"num_hidden_layers":32,"vocab_size":32000}"#,
    )
    .unwrap();
    let mut req = request(&arch, &hw, Quantization::Bf16);
    req.parallelism.tensor = ParallelDegree::Fixed(16);
    let err = plan_layout(&req).unwrap_err().to_string();
    assert!(
        err.contains("tensor 16 exceeds the 8 devices of one h100 node"),
        "{err}"
    );
}

#[test]
fn fp8_needs_hardware_support() {
    let arch = model("8B");
    let err = plan_layout(&request(&arch, &class("a100"), Quantization::Fp8))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("a100 has no fp8 support (spec.tflops.fp8 is unset)"),
        "{err}"
    );
}

#[test]
fn a_missed_slo_is_a_warning_not_a_failure() {
    let arch = model("70B");
    let hw = class("l4");
    let plan = plan_layout(&request(&arch, &hw, Quantization::Auto)).unwrap();
    assert_eq!(describe(&Ok(plan.clone())), "fp8 4x1");
    assert!(
        plan.warnings
            .iter()
            .any(|w| w.contains("no layout meets the SLO")),
        "{:?}",
        plan.warnings
    );
}

#[test]
fn a_tight_kv_cache_is_accepted_when_the_layout_is_fixed_and_reported() {
    let arch = model("70B");
    let hw = class("h100");
    let mut req = request(&arch, &hw, Quantization::Fp8);
    req.parallelism = Parallelism {
        tensor: ParallelDegree::Fixed(1),
        pipeline: ParallelDegree::Fixed(1),
    };
    let plan = plan_layout(&req).unwrap();
    assert!(
        plan.kv_cache_tokens < 4 * 8192 && plan.kv_cache_tokens >= 8192,
        "{}",
        plan.kv_cache_tokens
    );
    assert!(
        plan.warnings
            .iter()
            .any(|w| w.contains("fewer than 4 sequences")),
        "{:?}",
        plan.warnings
    );
}

#[test]
fn status_carries_the_plan() {
    let arch = model("8B");
    let hw = class("h100");
    let plan = plan_layout(&request(&arch, &hw, Quantization::Bf16)).unwrap();
    let status = plan.to_status("h100");
    assert_eq!(status.layout, "1x1");
    assert_eq!(status.gpus_per_replica, 1);
    assert_eq!(status.quantization, Quantization::Bf16);
    assert!(
        status.memory_per_gpu.0.ends_with("Gi"),
        "{}",
        status.memory_per_gpu.0
    );
    assert_eq!(status.cost_per_hour, Some(2.99));
}
