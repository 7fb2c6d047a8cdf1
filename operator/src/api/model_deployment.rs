//! `ModelDeployment`: one model, served at one quantization on one class of GPU, to one SLO.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::{
    api::resource::Quantity,
    apis::meta::v1::{Condition, Time},
};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{conditions::conditions_schema, HumanDuration, ParallelDegree};

/// Desired state of a ModelDeployment: which model, how it is quantized, on which GPUs, how it is
/// split across them and what service level it must hold. The operator plans the layout and the
/// autoscaler sizes the replicas; neither ever writes this spec, so GitOps tools never fight them.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "llmo.dev",
    version = "v1alpha1",
    kind = "ModelDeployment",
    namespaced,
    status = "ModelDeploymentStatus",
    shortname = "md",
    shortname = "mdep",
    category = "llmo",
    doc = "A large language model served by llmo-serve across a GPU fleet, planned, placed and autoscaled by the llmo operator.",
    scale(
        spec_replicas_path = ".spec.replicas.count",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(name = "Model", type_ = "string", json_path = ".spec.model.uri", description = "Where the weights come from"),
    printcolumn(name = "Quant", type_ = "string", json_path = ".status.plan.quantization", description = "Quantization chosen by the planner"),
    printcolumn(name = "GPU", type_ = "string", json_path = ".spec.gpu.class", description = "GPU class"),
    printcolumn(name = "TPxPP", type_ = "string", json_path = ".status.plan.layout", description = "Tensor x pipeline parallel layout of one replica"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyReplicas", description = "Replicas serving requests"),
    printcolumn(name = "Desired", type_ = "integer", json_path = ".status.desiredReplicas", description = "Replicas the autoscaler wants"),
    printcolumn(name = "TTFT-P95", type_ = "string", json_path = ".status.autoscaling.ttftP95", description = "Observed time to first token, 95th percentile"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("size(self.metadata.name) <= 40").message("metadata.name must be at most 40 characters: llmo derives pod and service names from it")
)]
#[serde(rename_all = "camelCase")]
pub struct ModelDeploymentSpec {
    /// The model to serve.
    pub model: ModelSource,

    /// Weight precision. `auto` lets the planner pick the least lossy precision that fits the GPU
    /// memory and meets the SLO; `bf16` and `fp16` serve the weights as published; `fp8`, `int8`
    /// and `int4` quantize them (fp8 needs a GPU class with fp8 support, e.g. H100, H200, L4, L40S).
    #[serde(default)]
    pub quantization: Quantization,

    /// Which class of GPU to run on.
    pub gpu: GpuRequirement,

    /// How one replica is split across GPUs. `auto` lets the planner choose.
    #[serde(default)]
    pub parallelism: Parallelism,

    /// Bounds for the number of replicas (serving groups).
    #[serde(default)]
    pub replicas: Replicas,

    /// Service level the autoscaler holds.
    #[serde(default)]
    pub slo: Slo,

    /// How replicas are scaled.
    #[serde(default)]
    pub autoscaling: Autoscaling,

    /// Settings of the serving engine and narrow overrides of its pods.
    #[serde(default)]
    pub serving: Serving,
}

/// Where the weights come from and what the model is called.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelSource {
    /// Location of the weights: `hf://org/repo[@revision][/file.gguf]` (Hugging Face Hub),
    /// `s3://bucket/path`, `pvc://claim/path` (a PersistentVolumeClaim in this namespace) or
    /// `file:///absolute/path` (already on the node). GGUF files and Hugging Face safetensors
    /// directories are supported.
    #[schemars(length(min = 1, max = 512), regex(pattern = r"^(hf|s3|pvc|file)://.+"))]
    pub uri: String,

    /// Model name clients use in the OpenAI API (`/v1/models`, the `model` field of requests).
    /// Defaults to the ModelDeployment's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 128),
        regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")
    )]
    pub served_name: Option<String>,

    /// Size hints for planning before the weights are downloaded. When the operator can read the
    /// model's `config.json` or GGUF header, those take precedence over the hints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architecture: Option<ArchitectureHints>,
}

/// The figures of a model's architecture that decide its memory footprint and split.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ArchitectureHints {
    /// Parameter count with a suffix: `135M`, `8B`, `70B`, `1.5T`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]+)?[KMBT]$"))]
    pub parameters: Option<String>,
    /// Number of transformer layers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1024))]
    pub layers: Option<u32>,
    /// Width of the residual stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 262144))]
    pub hidden_size: Option<u32>,
    /// Number of attention (query) heads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1024))]
    pub attention_heads: Option<u32>,
    /// Number of key/value heads (fewer than attention heads with grouped-query attention).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1024))]
    pub kv_heads: Option<u32>,
    /// Dimension of one attention head (default: hiddenSize / attentionHeads).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1024))]
    pub head_dim: Option<u32>,
    /// Vocabulary size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 4194304))]
    pub vocab_size: Option<u32>,
    /// Longest context the model was trained for, in tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 16777216))]
    pub max_context: Option<u32>,
}

/// Weight precision of the served model.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Quantization {
    /// The least lossy precision that fits the GPU memory and meets the SLO.
    #[default]
    Auto,
    /// 16-bit brain float, as most checkpoints are published.
    Bf16,
    /// 16-bit IEEE float.
    Fp16,
    /// 8-bit float weights (E4M3); needs hardware fp8 support.
    Fp8,
    /// 8-bit integer weights.
    Int8,
    /// 4-bit integer weights (group-wise scales).
    Int4,
}

impl Quantization {
    /// Every value, in the order the planner prefers them for quality (least lossy first).
    pub const CONCRETE: [Quantization; 5] =
        [Self::Bf16, Self::Fp16, Self::Fp8, Self::Int8, Self::Int4];

    /// Bytes one parameter takes in memory (`None` for `auto`).
    pub fn bytes_per_parameter(self) -> Option<f64> {
        match self {
            Self::Auto => None,
            Self::Bf16 | Self::Fp16 => Some(2.0),
            Self::Fp8 | Self::Int8 => Some(1.0),
            // 4 bits plus one 16-bit scale per group of 32 weights.
            Self::Int4 => Some(0.5 + 2.0 / 32.0),
        }
    }

    /// The spelling used in manifests.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Bf16 => "bf16",
            Self::Fp16 => "fp16",
            Self::Fp8 => "fp8",
            Self::Int8 => "int8",
            Self::Int4 => "int4",
        }
    }
}

impl std::fmt::Display for Quantization {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which GPUs to run on.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GpuRequirement {
    /// Name of a GPUClass (`kubectl get gpuclasses`), e.g. `h100`, `l4`, or `cpu` to run without
    /// GPUs.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub class: String,
}

/// How one replica is split: `tensor` GPUs per pod, `pipeline` pods per replica.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Parallelism {
    /// Tensor-parallel degree: GPUs on one node that share each layer. `auto` or 1-64; must divide
    /// the model's attention heads and KV heads.
    #[serde(default)]
    pub tensor: ParallelDegree,
    /// Pipeline-parallel degree: pods (usually on different nodes) that each hold a contiguous
    /// range of layers. `auto` or 1-64; the planner only goes past 1 when one node cannot hold
    /// the model.
    #[serde(default)]
    pub pipeline: ParallelDegree,
}

/// Replica bounds. A replica is one serving group of `pipeline` pods.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.min <= self.max").message("spec.replicas: min must not exceed max"))]
pub struct Replicas {
    /// Fewest replicas kept running, even when idle.
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 1000))]
    pub min: i32,
    /// Most replicas the autoscaler may run.
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 1000))]
    pub max: i32,
    /// Replica count set through the scale subresource (`kubectl scale`, HPA, KEDA). Used only
    /// when `autoscaling.mode` is `external`; clamped to [min, max].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000))]
    pub count: Option<i32>,
}

fn one() -> i32 {
    1
}

impl Default for Replicas {
    fn default() -> Self {
        Self {
            min: 1,
            max: 1,
            count: None,
        }
    }
}

/// Service-level objectives the autoscaler holds.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Slo {
    /// Target for the 95th percentile of time to first token, e.g. `500ms`.
    #[serde(default = "default_ttft")]
    pub ttft: HumanDuration,
    /// Target for the 95th percentile of time between output tokens, e.g. `50ms`. Optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inter_token_latency: Option<HumanDuration>,
    /// Target busy fraction of the engine, from 0.1 to 1. Replicas are added above it and removed
    /// well below it.
    #[serde(default = "default_utilization")]
    #[schemars(range(min = 0.1, max = 1.0))]
    pub utilization: f64,
}

fn default_ttft() -> HumanDuration {
    HumanDuration::new(std::time::Duration::from_millis(500))
}

fn default_utilization() -> f64 {
    0.8
}

impl Default for Slo {
    fn default() -> Self {
        Self {
            ttft: default_ttft(),
            inter_token_latency: None,
            utilization: default_utilization(),
        }
    }
}

/// Who decides the replica count.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Autoscaling {
    /// `slo`: llmo scales on its own readings of TTFT, utilization and queue depth.
    /// `external`: HPA, KEDA or a person sets `replicas.count` through the scale subresource.
    #[serde(default)]
    pub mode: AutoscalingMode,
    /// How often the serving pods' metrics are read and a decision is taken.
    #[serde(default = "default_interval")]
    pub interval: HumanDuration,
    /// How long the load must stay low before replicas are removed (`slo` mode). Longer avoids
    /// paying a cold start when the load returns; shorter saves GPU hours on spiky traffic.
    #[serde(default = "default_scale_down_delay")]
    pub scale_down_delay: HumanDuration,
}

fn default_interval() -> HumanDuration {
    HumanDuration::new(std::time::Duration::from_secs(5))
}

fn default_scale_down_delay() -> HumanDuration {
    HumanDuration::new(std::time::Duration::from_secs(300))
}

impl Default for Autoscaling {
    fn default() -> Self {
        Self {
            mode: AutoscalingMode::default(),
            interval: default_interval(),
            scale_down_delay: default_scale_down_delay(),
        }
    }
}

/// Who decides the replica count.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AutoscalingMode {
    /// llmo's SLO autoscaler.
    #[default]
    Slo,
    /// The scale subresource (HPA, KEDA, `kubectl scale`).
    External,
}

/// Engine settings and narrow pod overrides. There is deliberately no embedded PodSpec.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.env) || self.env.all(e, !e.name.startsWith('LLMO_'))").message("spec.serving.env: names starting with LLMO_ are reserved: llmo sets them from the spec; set the matching spec.serving field instead"))]
pub struct Serving {
    /// Longest sequence (prompt plus output) a request may use, in tokens. Default: the model's
    /// own limit, capped by what the KV-cache budget allows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 128, max = 1048576))]
    pub context_length: Option<u32>,
    /// Most tokens (prefill and decode) one engine step processes; bounds the latency of a step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 16, max = 1048576))]
    pub max_batch_tokens: Option<u32>,
    /// Fraction of GPU memory left after weights that goes to the KV cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.05, max = 0.99))]
    pub kv_cache_fraction: Option<f64>,
    /// Container image of llmo-serve. Default: the image matching the operator's version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub image: Option<String>,
    /// Extra command-line flags appended to llmo-serve's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub args: Vec<String>,
    /// Extra environment variables of the serving container. Names starting with `LLMO_` are
    /// reserved: set those through the fields above.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub env: Vec<EnvVar>,
    /// CPU and memory for each serving pod (GPUs are set by the plan).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<PodResources>,
    /// Extra labels and annotations for the serving pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_metadata: Option<PodMetadata>,
}

/// One environment variable with a literal value.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EnvVar {
    /// Variable name.
    #[schemars(
        length(min = 1, max = 128),
        regex(pattern = r"^[A-Za-z_][A-Za-z0-9_]*$")
    )]
    pub name: String,
    /// Variable value (empty when omitted).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(length(max = 4096))]
    pub value: String,
}

/// CPU and memory of a serving pod.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodResources {
    /// CPU request and limit, e.g. `8` or `7500m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "super::quantity::optional_quantity_schema")]
    pub cpu: Option<Quantity>,
    /// Memory request and limit, e.g. `64Gi`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "super::quantity::optional_quantity_schema")]
    pub memory: Option<Quantity>,
}

/// Labels and annotations added to serving pods.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodMetadata {
    /// Extra labels. Keys under `llmo.dev/` are reserved.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Extra annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// Observed state, written by the operator only.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelDeploymentStatus {
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Planned, Placed, Available, Progressing, Degraded and MetricsAvailable, each with a reason
    /// that explains it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    /// The layout the planner chose.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<PlanStatus>,
    /// Replicas (serving groups) that exist.
    #[serde(default)]
    pub replicas: i32,
    /// Replicas whose every pod is ready.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Replicas at the current revision.
    #[serde(default)]
    pub updated_replicas: i32,
    /// Replicas the autoscaler (or the scale subresource) asks for.
    #[serde(default)]
    pub desired_replicas: i32,
    /// Label selector of the serving pods, for the scale subresource.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// Hash of everything that shapes the serving pods; groups at another revision are rolled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// Where each replica group runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<GroupStatus>,
    /// In-cluster URL of the OpenAI-compatible endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// What the autoscaler sees and decided.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingStatus>,
}

/// The planner's decision for one replica.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlanStatus {
    /// Precision the weights are served at (never `auto`).
    pub quantization: Quantization,
    /// GPUs per pod sharing each layer.
    pub tensor: u32,
    /// Pods per replica, each holding a range of layers.
    pub pipeline: u32,
    /// `tensor`x`pipeline`, for display.
    pub layout: String,
    /// GPUs one replica uses.
    pub gpus_per_replica: u32,
    /// The GPUClass planned for.
    pub gpu_class: String,
    /// Planned memory per GPU: weights, KV cache and runtime overhead.
    pub memory_per_gpu: Quantity,
    /// Tokens the KV cache of one replica holds.
    pub kv_cache_tokens: u64,
    /// Indicative cost of one replica per hour, from the GPUClass price.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_per_hour: Option<f64>,
    /// Why this layout, in words.
    pub reason: String,
}

/// One replica group and where its ranks run.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GroupStatus {
    /// Group name; its pods are `<group>-<rank>`.
    pub name: String,
    /// Revision the group was created at.
    pub revision: String,
    /// Pending, Starting, Ready, Draining or Failed.
    pub state: GroupState,
    /// Node and GPU indices of each rank, in rank order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ranks: Vec<RankPlacement>,
}

/// Lifecycle of a replica group.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum GroupState {
    /// Created, pods not yet scheduled.
    Pending,
    /// Pods running, weights loading or peers joining.
    Starting,
    /// Every rank ready; receiving traffic.
    Ready,
    /// Finishing in-flight requests before deletion.
    Draining,
    /// A rank failed; the whole group is restarted.
    Failed,
}

/// Where one rank of a group runs.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RankPlacement {
    /// Pipeline rank (stage index).
    pub rank: u32,
    /// Node name.
    pub node: String,
    /// GPU indices on that node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpus: Vec<u32>,
}

/// The autoscaler's view: what it observed and what it decided.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalingStatus {
    /// Observed 95th percentile of time to first token over the window, e.g. `412ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttft_p95: Option<String>,
    /// Observed 95th percentile of inter-token latency over the window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inter_token_latency_p95: Option<String>,
    /// Observed mean engine busy fraction, 0 to 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub utilization: Option<f64>,
    /// Requests waiting across replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_depth: Option<f64>,
    /// Prompt tokens per second across replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_per_second: Option<f64>,
    /// Output tokens per second across replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation_tokens_per_second: Option<f64>,
    /// Output tokens per US dollar at the observed rate and the GPUClass price.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_dollar: Option<f64>,
    /// Replicas llmo's policy recommends now. In `slo` mode it is `desiredReplicas`; in
    /// `external` mode it is what llmo would set, exported as the metric
    /// `llmo_operator_deployment_replicas{kind="recommended"}` for HPA or KEDA to follow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recommended_replicas: Option<i32>,
    /// Why the policy recommends that count, in words, as of the last round.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recommendation_reason: Option<String>,
    /// The last ten changes of the recommendation, newest last: scaling decisions in `slo` mode,
    /// recommendations HPA or KEDA may follow in `external` mode.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10))]
    pub last_decisions: Vec<ScalingDecision>,
    /// Whether the last round could read the serving pods' metrics: `Scraped`, or why not
    /// (`NoReadyPods`, `StaleMetrics`, `MissingMetric`). The `MetricsAvailable` condition says the
    /// same.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_reason: Option<String>,
    /// The details of `metricsReason`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_message: Option<String>,
}

/// One scaling decision and the figures it was taken on.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScalingDecision {
    /// When it was taken.
    pub time: Time,
    /// Replicas before.
    pub from: i32,
    /// Replicas after.
    pub to: i32,
    /// Why, in words.
    pub reason: String,
    /// TTFT p95 at the time, e.g. `812ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttft_p95: Option<String>,
    /// Utilization at the time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub utilization: Option<f64>,
    /// Queue depth at the time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_depth: Option<f64>,
}
