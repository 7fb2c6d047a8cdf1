//! `llmo-operator plan`: what the operator would do with a manifest, without touching a cluster.
//! This is the text a reviewer reads in a GitOps pull request.

use std::fmt::Write as _;

use kube::ResourceExt;

use crate::{
    api::{quantity::parse_quantity, DeviceKind, GPUClass, GPUNode, ModelDeployment},
    placement::{place_group, GroupRequest, NodeInventory, Spread, TakenGpus},
    plan::{plan_layout, Hardware, ModelArch, Plan, PlanError, PlanRequest},
};

/// Why a preview could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PreviewError {
    /// The GPUClass named by the spec is not among those given.
    #[error("ModelDeployment {deployment}: GPUClass {class:?} is not defined; known classes: {known}. Pass the classes with --classes (e.g. examples/gpuclasses.yaml)")]
    UnknownClass {
        /// namespace/name.
        deployment: String,
        /// Class asked for.
        class: String,
        /// Classes given.
        known: String,
    },
    /// Neither a config.json nor hints describe the model.
    #[error("ModelDeployment {deployment}: {source}")]
    Plan {
        /// namespace/name.
        deployment: String,
        /// The planner's error.
        source: PlanError,
    },
}

/// Builds the planner's request from a spec.
pub fn plan_request<'a>(
    md: &ModelDeployment,
    arch: &'a ModelArch,
    hw: &'a Hardware,
) -> PlanRequest<'a> {
    let s = &md.spec;
    PlanRequest {
        arch,
        hardware: hw,
        quantization: s.quantization,
        parallelism: s.parallelism,
        context_length: s.serving.context_length,
        max_batch_tokens: s.serving.max_batch_tokens,
        kv_cache_fraction: s.serving.kv_cache_fraction,
        slo: s.slo,
    }
}

/// The hardware a ModelDeployment plans against: its GPUClass, except that on `cpu` classes a
/// memory limit in `spec.serving.resources` bounds what the engine may use.
pub fn hardware_for(md: &ModelDeployment, class: &GPUClass) -> Result<Hardware, PlanError> {
    let mut hw = Hardware::from_class(&class.name_any(), &class.spec)?;
    let limit = md
        .spec
        .serving
        .resources
        .as_ref()
        .and_then(|r| r.memory.as_ref());
    if let (DeviceKind::Cpu, Some(limit)) = (hw.device, limit) {
        let bytes = parse_quantity(&limit.0).map_err(|e| PlanError::Architecture {
            message: format!("spec.serving.resources.memory: {e}"),
        })?;
        hw.memory = hw.memory.min(bytes);
    }
    Ok(hw)
}

/// Reads a model's shapes from a Hugging Face `config.json` or a GGUF file, by content.
pub fn read_model_file(path: &std::path::Path) -> Result<ModelArch, PlanError> {
    let io = |e: std::io::Error| PlanError::Architecture {
        message: format!("{}: {e}", path.display()),
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut magic = [0u8; 4];
    let is_gguf = std::io::Read::read(&mut file, &mut magic).map_err(io)? == 4 && &magic == b"GGUF";
    if is_gguf {
        ModelArch::from_gguf(std::fs::File::open(path).map_err(io)?)
    } else {
        ModelArch::from_hf_config(&std::fs::read_to_string(path).map_err(io)?)
    }
}

/// Plans (and, with an inventory, places `replicas.min` groups of) one ModelDeployment and
/// renders the result as a table.
pub fn preview(
    md: &ModelDeployment,
    classes: &[GPUClass],
    inventory: Option<&[GPUNode]>,
    model: Option<&ModelArch>,
) -> Result<String, PreviewError> {
    let deployment = format!(
        "{}/{}",
        md.namespace().unwrap_or_else(|| "default".into()),
        md.name_any()
    );
    let plan_err = |source| PreviewError::Plan {
        deployment: deployment.clone(),
        source,
    };
    let class_name = &md.spec.gpu.class;
    let class = classes
        .iter()
        .find(|c| c.name_any() == *class_name)
        .ok_or_else(|| PreviewError::UnknownClass {
            deployment: deployment.clone(),
            class: class_name.clone(),
            known: classes
                .iter()
                .map(ResourceExt::name_any)
                .collect::<Vec<_>>()
                .join(", "),
        })?;
    let hw = hardware_for(md, class).map_err(plan_err)?;
    let arch = match (model, &md.spec.model.architecture) {
        (Some(arch), _) => Ok(arch.clone()),
        (None, Some(hints)) => ModelArch::from_hints(hints),
        (None, None) => Err(PlanError::Architecture {
            message: "no size hints in spec.model.architecture and no --model-config given".into(),
        }),
    }
    .map_err(plan_err)?;
    let plan = plan_layout(&plan_request(md, &arch, &hw)).map_err(plan_err)?;
    Ok(render(md, &deployment, &arch, &hw, &plan, inventory))
}

fn render(
    md: &ModelDeployment,
    deployment: &str,
    arch: &ModelArch,
    hw: &Hardware,
    plan: &Plan,
    inventory: Option<&[GPUNode]>,
) -> String {
    use crate::plan::GIB;
    let mut out = String::new();
    let mut row = |k: &str, v: String| {
        let _ = writeln!(out, "  {k:<16} {v}");
    };
    let requested = md.spec.quantization;
    let spec = &md.spec;
    let m = &plan.memory;
    row(
        "model",
        format!("{} ({} parameters)", spec.model.uri, arch.size_label()),
    );
    row(
        "quantization",
        if requested == plan.quantization {
            plan.quantization.to_string()
        } else {
            format!("{} (chosen for {requested})", plan.quantization)
        },
    );
    row(
        "layout",
        format!(
            "tensor {} x pipeline {} = {} {} per replica",
            plan.layout.tensor,
            plan.layout.pipeline,
            plan.layout.gpus(),
            hw.class
        ),
    );
    row(
        "memory per GPU",
        format!(
            "{:.1}GiB of {:.1}GiB: weights {:.1}, KV cache {:.1}, activations {:.1}, runtime {:.1}",
            m.total() / GIB,
            m.capacity / GIB,
            m.weights / GIB,
            m.kv_cache / GIB,
            m.activations / GIB,
            m.overhead / GIB
        ),
    );
    row(
        "KV cache",
        format!(
            "{} tokens per replica ({} sequences of {})",
            plan.kv_cache_tokens,
            plan.kv_cache_tokens / u64::from(plan.context_length.max(1)),
            plan.context_length
        ),
    );
    row(
        "estimates",
        format!(
            "TTFT {} (target {}), {} per output token{}",
            crate::plan::ms(plan.ttft_estimate),
            spec.slo.ttft,
            crate::plan::ms(plan.itl_estimate),
            spec.slo
                .inter_token_latency
                .map(|t| format!(" (target {t})"))
                .unwrap_or_default()
        ),
    );
    if let Some(cost) = plan.cost_per_hour {
        row(
            "cost",
            format!(
                "${cost:.2}/h per replica; ${:.2}-${:.2}/h for {}-{} replicas",
                cost * f64::from(spec.replicas.min),
                cost * f64::from(spec.replicas.max),
                spec.replicas.min,
                spec.replicas.max
            ),
        );
    }
    row("reason", plan.reason.clone());
    for w in &plan.warnings {
        row("warning", w.clone());
    }
    if let Some(gpu_nodes) = inventory {
        let nodes: Vec<NodeInventory> =
            gpu_nodes.iter().map(NodeInventory::from_gpu_node).collect();
        let request = GroupRequest::for_plan(&hw.class, hw.device, plan);
        let mut taken = TakenGpus::new();
        let mut spread = Spread::default();
        for group in 0..spec.replicas.min {
            match place_group(&request, &nodes, &mut taken, &mut spread) {
                Ok(ranks) => {
                    let where_ = ranks
                        .iter()
                        .map(|r| {
                            let gpus: Vec<String> = r.gpus.iter().map(u32::to_string).collect();
                            format!("rank {} on {} GPUs {}", r.rank, r.node, gpus.join(","))
                        })
                        .collect::<Vec<_>>()
                        .join("; ");
                    row("placement", format!("group {group}: {where_}"));
                }
                Err(e) => row("placement", format!("group {group}: cannot place: {e}")),
            }
        }
    }
    format!("ModelDeployment {deployment}\n{out}")
}
