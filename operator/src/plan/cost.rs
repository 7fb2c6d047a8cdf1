//! The memory and speed model the planner sizes layouts with.
//!
//! Memory of one GPU (or one CPU node) in a `tensor` x `pipeline` layout:
//!
//! ```text
//! weights     = (body params x bytes/param(precision) + embedding params x 2) / (tensor x pipeline)
//! kv/token    = 2 (K and V) x layers/pipeline x ceil(kv_heads/tensor) x head_dim x 2 bytes
//! activations = max_batch_tokens x hidden x 2 bytes x (4 + 2 x 3.5 / tensor)
//!               + 256 sequences x vocab x 4 bytes of f32 logits (last stage)
//! overhead    = 1 GiB per GPU (CUDA context, cuBLAS workspace, NCCL buffers); 256 MiB on CPU
//! kv budget   = (memory - weights - activations - overhead) x kvCacheFraction
//! ```
//!
//! Speed, for checking the SLO before anything runs (a roofline: decode is bound by memory
//! bandwidth, prefill by compute):
//!
//! ```text
//! decode step = weights/GPU / (bandwidth x 0.7) + fixed step cost + tensor all-reduces + stage hops
//! prefill     = 2 x params x prompt tokens / (tensor x TFLOP/s(precision) x 0.5) + all-reduces + hops
//! ```
//!
//! The efficiencies are deliberately round: they are checked against measured figures by the
//! fleet simulator's fit, and the planner keeps headroom (the TTFT estimate must be at most half
//! the target, the inter-token estimate at most 80% of it) because queueing and batching add to both.

use std::time::Duration;

use crate::api::{
    quantity::parse_quantity, DeviceKind, GPUClassSpec, InterconnectKind, Quantization,
};

use super::{ModelArch, PlanError};

/// Bytes in a GiB.
pub const GIB: f64 = 1024.0 * 1024.0 * 1024.0;
/// Memory reserved per GPU for the CUDA context, cuBLAS workspace and NCCL buffers.
pub const GPU_RUNTIME_OVERHEAD: f64 = GIB;
/// Memory reserved on a CPU node for the runtime, tokenizer and HTTP server.
pub const CPU_RUNTIME_OVERHEAD: f64 = 0.25 * GIB;
/// Share of peak memory bandwidth a decode step reaches.
pub const DECODE_BANDWIDTH_EFFICIENCY: f64 = 0.7;
/// Share of peak TFLOP/s a prefill reaches.
pub const PREFILL_COMPUTE_EFFICIENCY: f64 = 0.5;
/// Sequences whose logits are materialised at once.
const LOGIT_SEQUENCES: f64 = 256.0;
/// Fraction of the TTFT target the unloaded estimate may use.
pub const TTFT_HEADROOM: f64 = 0.5;
/// Fraction of the inter-token target the unloaded estimate may use.
pub const ITL_HEADROOM: f64 = 0.8;

/// A tensor x pipeline split of one replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// GPUs per pod sharing each layer.
    pub tensor: u32,
    /// Pods per replica, each holding a contiguous range of layers.
    pub pipeline: u32,
}

impl Layout {
    /// GPUs one replica uses.
    pub fn gpus(self) -> u32 {
        self.tensor * self.pipeline
    }
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}", self.tensor, self.pipeline)
    }
}

/// A GPUClass in the units the cost model uses.
#[derive(Debug, Clone, PartialEq)]
pub struct Hardware {
    /// GPUClass name.
    pub class: String,
    /// `gpu` or `cpu`.
    pub device: DeviceKind,
    /// Memory of one device, bytes.
    pub memory: f64,
    /// Peak memory bandwidth, bytes per second.
    pub bandwidth: f64,
    /// The class spec, for TFLOP/s by precision.
    spec: GPUClassSpec,
    /// Devices on one node.
    pub devices_per_node: u32,
    /// Price of one device per hour.
    pub price_per_hour: Option<f64>,
}

impl Hardware {
    /// Reads a GPUClass.
    pub fn from_class(name: &str, spec: &GPUClassSpec) -> Result<Self, PlanError> {
        let memory = parse_quantity(&spec.memory.0).map_err(|e| PlanError::GpuClass {
            class: name.to_owned(),
            message: e.to_string(),
        })?;
        Ok(Self {
            class: name.to_owned(),
            device: spec.device,
            memory,
            bandwidth: spec.memory_bandwidth_gbps * 1e9,
            devices_per_node: spec.devices_per_node,
            price_per_hour: spec.price_per_hour,
            spec: spec.clone(),
        })
    }

    /// Dense TFLOP/s a prefill at this precision runs at, or why the class cannot run it.
    pub fn tflops(&self, q: Quantization) -> Result<f64, String> {
        let t = &self.spec.tflops;
        let half = t.bf16.or(t.fp16).or(t.fp32);
        let value = if self.device == DeviceKind::Cpu {
            // CPU kernels widen every precision to f32 arithmetic.
            match q {
                Quantization::Fp8 => None,
                _ => t.fp32.or(half),
            }
        } else {
            match q {
                Quantization::Auto => None,
                Quantization::Bf16 => t.bf16.or(t.fp16),
                Quantization::Fp16 => t.fp16.or(t.bf16),
                Quantization::Fp8 => t.fp8,
                // W8A8 uses int8 tensor cores; W4A16 dequantizes into 16-bit matmuls.
                Quantization::Int8 => t.int8.or(half),
                Quantization::Int4 => half,
            }
        };
        value.filter(|v| *v > 0.0).ok_or_else(|| match q {
            Quantization::Fp8 => format!(
                "{} has no fp8 support (spec.tflops.fp8 is unset); use bf16, int8 or int4, or quantization: auto",
                self.class
            ),
            _ => format!("{} lists no TFLOP/s for {q}", self.class),
        })
    }

    fn runtime_overhead(&self) -> f64 {
        match self.device {
            DeviceKind::Gpu => GPU_RUNTIME_OVERHEAD,
            DeviceKind::Cpu => CPU_RUNTIME_OVERHEAD,
        }
    }

    /// Latency and bandwidth of one all-reduce hop between ranks.
    fn link(&self) -> (Duration, f64) {
        let bw = self.spec.interconnect.bandwidth_gbps.unwrap_or(10.0) * 1e9;
        match self.spec.interconnect.kind {
            InterconnectKind::Nvlink => (Duration::from_micros(5), bw),
            InterconnectKind::Pcie => (Duration::from_micros(15), bw),
            // Tensor parallel over TCP between processes or nodes.
            InterconnectKind::None => (Duration::from_micros(100), bw.min(1.25e9)),
        }
    }

    fn step_cost(&self) -> Duration {
        match self.device {
            DeviceKind::Gpu => Duration::from_micros(1500),
            DeviceKind::Cpu => Duration::from_millis(2),
        }
    }
}

/// Planned memory of one device.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemoryBreakdown {
    /// Weight shard, bytes.
    pub weights: f64,
    /// Peak activations and logits, bytes.
    pub activations: f64,
    /// Runtime reservations, bytes.
    pub overhead: f64,
    /// KV cache, bytes.
    pub kv_cache: f64,
    /// What the device has, bytes.
    pub capacity: f64,
}

impl MemoryBreakdown {
    /// Everything planned, bytes.
    pub fn total(&self) -> f64 {
        self.weights + self.activations + self.overhead + self.kv_cache
    }
}

/// Weight bytes held by one device.
pub fn weights_per_device(arch: &ModelArch, q: Quantization, layout: Layout) -> f64 {
    let bytes = q.bytes_per_parameter().unwrap_or(2.0);
    // The stage with the most layers bounds the fit when layers do not split evenly.
    let stage_share = f64::from(arch.layers.div_ceil(layout.pipeline)) / f64::from(arch.layers);
    let body = arch.body_parameters() * bytes * stage_share;
    let embedding = arch.embedding_parameters * 2.0 / f64::from(layout.pipeline);
    (body + embedding) / f64::from(layout.tensor)
}

/// KV-cache bytes one token costs on one device (16-bit K and V).
pub fn kv_bytes_per_token_per_device(arch: &ModelArch, layout: Layout) -> f64 {
    let layers = f64::from(arch.layers.div_ceil(layout.pipeline));
    let heads = f64::from(arch.kv_heads.div_ceil(layout.tensor));
    2.0 * layers * heads * f64::from(arch.head_dim) * 2.0
}

/// Peak activation bytes of one device for a step of `batch_tokens`.
pub fn activations_per_device(arch: &ModelArch, layout: Layout, batch_tokens: u32) -> f64 {
    let hidden = f64::from(arch.hidden_size);
    let mlp_ratio = f64::from(arch.intermediate_size) / hidden;
    let per_token = hidden * 2.0 * (4.0 + 2.0 * mlp_ratio / f64::from(layout.tensor));
    let logits = LOGIT_SEQUENCES * f64::from(arch.vocab_size) * 4.0 / f64::from(layout.tensor);
    f64::from(batch_tokens) * per_token + logits
}

/// Memory of one device and the KV tokens one replica holds.
pub fn memory(
    arch: &ModelArch,
    q: Quantization,
    layout: Layout,
    hw: &Hardware,
    batch_tokens: u32,
    kv_fraction: f64,
) -> (MemoryBreakdown, u64) {
    let weights = weights_per_device(arch, q, layout);
    let activations = activations_per_device(arch, layout, batch_tokens);
    let overhead = hw.runtime_overhead();
    let free = (hw.memory - weights - activations - overhead).max(0.0);
    let kv_cache = free * kv_fraction;
    let tokens = (kv_cache / kv_bytes_per_token_per_device(arch, layout)).floor() as u64;
    (
        MemoryBreakdown {
            weights,
            activations,
            overhead,
            kv_cache,
            capacity: hw.memory,
        },
        tokens,
    )
}

fn all_reduce(hw: &Hardware, tensor: u32, bytes: f64) -> Duration {
    if tensor <= 1 {
        return Duration::ZERO;
    }
    let (latency, bw) = hw.link();
    let t = f64::from(tensor);
    // Ring all-reduce: 2(t-1) hops of bytes/t each.
    latency * (2 * (tensor - 1)) + Duration::from_secs_f64(2.0 * (t - 1.0) / t * bytes / bw)
}

fn stage_hops(pipeline: u32, bytes: f64) -> Duration {
    if pipeline <= 1 {
        return Duration::ZERO;
    }
    // Stages usually sit on different nodes: assume a 100 Gb/s network with 50 us per hop.
    let hop = Duration::from_micros(50) + Duration::from_secs_f64(bytes / 12.5e9);
    hop * (pipeline - 1)
}

/// Time of one decode step at batch 1, the floor of inter-token latency.
pub fn decode_step(arch: &ModelArch, q: Quantization, layout: Layout, hw: &Hardware) -> Duration {
    let read = Duration::from_secs_f64(
        weights_per_device(arch, q, layout) / (hw.bandwidth * DECODE_BANDWIDTH_EFFICIENCY),
    );
    let per_layer_reduce = all_reduce(hw, layout.tensor, f64::from(arch.hidden_size) * 2.0);
    read + hw.step_cost()
        + per_layer_reduce * (2 * arch.layers)
        + stage_hops(layout.pipeline, f64::from(arch.hidden_size) * 2.0)
}

/// Time to prefill `tokens` of prompt for one request on an idle replica.
pub fn prefill(
    arch: &ModelArch,
    q: Quantization,
    layout: Layout,
    hw: &Hardware,
    tokens: u32,
) -> Result<Duration, String> {
    let tflops = hw.tflops(q)?;
    let n = f64::from(tokens);
    let attention =
        2.0 * f64::from(arch.layers) * n * n * f64::from(arch.attention_heads * arch.head_dim);
    let flops = 2.0 * arch.parameters * n + attention;
    let compute = Duration::from_secs_f64(
        flops / (f64::from(layout.tensor) * tflops * 1e12 * PREFILL_COMPUTE_EFFICIENCY),
    );
    let activation_bytes = n * f64::from(arch.hidden_size) * 2.0;
    let reduces = all_reduce(hw, layout.tensor, activation_bytes) * (2 * arch.layers);
    Ok(compute + reduces + stage_hops(layout.pipeline, activation_bytes) + hw.step_cost())
}
