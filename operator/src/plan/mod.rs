//! Layout planning: from a model's architecture, a GPU class, the quantization and the SLO,
//! choose the precision, the tensor and pipeline degrees and the KV-cache budget. Pure code:
//! the operator, `llmo-operator plan` and the fleet simulator call the same function.
//!
//! The rules, in order:
//! - `quantization: auto` takes the least lossy precision (bf16, then fp8 where the class has
//!   it, int8, int4) that fits and meets the SLO; a fixed precision is used as given.
//! - Tensor parallelism must divide the attention heads and the KV heads and stay within one
//!   node; `auto` takes the smallest degree that fits, holds the KV cache for at least
//!   [`MIN_SEQUENCES`] full-length sequences, and meets the SLO.
//! - Pipeline stages go past 1 only when one node cannot hold the model.
//! - When nothing fits, the error says what would.

mod arch;
mod cost;
mod gguf;
mod search;

use std::time::Duration;

pub use arch::ModelArch;
pub use cost::{Hardware, Layout, MemoryBreakdown, GIB};
pub use search::plan_layout;

use crate::api::{quantity::format_bytes, Parallelism, PlanStatus, Quantization, Slo};

/// A replica should hold at least this many full-length sequences in its KV cache, or
/// continuous batching has nothing to batch.
pub const MIN_SEQUENCES: u64 = 4;
/// Prompt length the TTFT estimate uses (the median of the Azure 2023 conversation trace),
/// capped at half the context.
pub const REFERENCE_PROMPT_TOKENS: u32 = 1024;
/// Share of free memory given to the KV cache when the spec does not say.
pub const DEFAULT_KV_CACHE_FRACTION: f64 = 0.9;

/// Why no layout could be planned.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    /// The model's figures are missing or inconsistent.
    #[error("model architecture: {message}")]
    Architecture {
        /// What is wrong.
        message: String,
    },
    /// The GPUClass cannot be used.
    #[error("GPUClass {class}: {message}")]
    GpuClass {
        /// Class name.
        class: String,
        /// What is wrong.
        message: String,
    },
    /// The requested tensor degree cannot split the model.
    #[error("{message}")]
    Tensor {
        /// What is wrong and which degrees work.
        message: String,
    },
    /// The precision is not available on the class.
    #[error("{message}")]
    Unsupported {
        /// What is wrong.
        message: String,
    },
    /// Nothing fits.
    #[error("{message}")]
    DoesNotFit {
        /// What was needed, what is there, and what would fit.
        message: String,
    },
}

/// Everything the planner weighs.
#[derive(Debug, Clone)]
pub struct PlanRequest<'a> {
    /// The model.
    pub arch: &'a ModelArch,
    /// The GPU class.
    pub hardware: &'a Hardware,
    /// Requested precision (`auto` to choose).
    pub quantization: Quantization,
    /// Requested degrees (`auto` to choose).
    pub parallelism: Parallelism,
    /// Requested context length.
    pub context_length: Option<u32>,
    /// Requested tokens per engine step.
    pub max_batch_tokens: Option<u32>,
    /// Requested KV share of free memory.
    pub kv_cache_fraction: Option<f64>,
    /// Service level.
    pub slo: Slo,
}

/// The chosen layout of one replica.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Precision of the weights.
    pub quantization: Quantization,
    /// Tensor x pipeline split.
    pub layout: Layout,
    /// Memory of the fullest device.
    pub memory: MemoryBreakdown,
    /// Tokens the replica's KV cache holds.
    pub kv_cache_tokens: u64,
    /// Longest sequence a request may use.
    pub context_length: u32,
    /// Tokens per engine step.
    pub max_batch_tokens: u32,
    /// Estimated TTFT of a reference prompt on an idle replica.
    pub ttft_estimate: Duration,
    /// Estimated time per output token at batch 1.
    pub itl_estimate: Duration,
    /// GPUs x price of the class.
    pub cost_per_hour: Option<f64>,
    /// Why this layout, in words.
    pub reason: String,
    /// What the user should know (SLO not met by the estimate, tight KV cache, ...).
    pub warnings: Vec<String>,
}

impl Plan {
    /// The plan as written to `status.plan`.
    pub fn to_status(&self, gpu_class: &str) -> PlanStatus {
        PlanStatus {
            quantization: self.quantization,
            tensor: self.layout.tensor,
            pipeline: self.layout.pipeline,
            layout: self.layout.to_string(),
            gpus_per_replica: self.layout.gpus(),
            gpu_class: gpu_class.to_owned(),
            memory_per_gpu: k8s_openapi::apimachinery::pkg::api::resource::Quantity(format_bytes(
                self.memory.total(),
            )),
            kv_cache_tokens: self.kv_cache_tokens,
            cost_per_hour: self.cost_per_hour,
            reason: self.reason.clone(),
        }
    }
}

/// Milliseconds, for messages.
pub(crate) fn ms(d: Duration) -> String {
    let v = d.as_secs_f64() * 1e3;
    if v >= 100.0 {
        format!("{v:.0}ms")
    } else {
        format!("{v:.1}ms")
    }
}

/// Bytes as `12.5GiB`.
pub(crate) fn gib(bytes: f64) -> String {
    format!("{:.1}GiB", bytes / GIB)
}

#[cfg(test)]
mod tests;
