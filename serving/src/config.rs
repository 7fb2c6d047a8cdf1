//! Command-line flags; every one also reads an `LLMO_*` environment variable.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

use crate::model::Quantization;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeviceArg {
    Auto,
    Cpu,
    Cuda,
}

#[derive(Debug, Clone, Parser)]
#[command(
    name = "llmo-serve",
    version,
    about = "OpenAI-compatible LLM server with continuous batching and a paged KV cache"
)]
pub struct Args {
    /// Model to serve: a .gguf file or a Hugging Face checkpoint directory (config.json,
    /// *.safetensors, tokenizer.json), as a path or file:///path, or hf://org/repo[@revision][/file]
    /// (the repository's GGUF file when it has one, else its safetensors checkpoint).
    #[arg(long, env = "LLMO_MODEL")]
    pub model: String,
    /// Name clients use in the `model` field (default: the file name without extension).
    #[arg(long, env = "LLMO_SERVED_NAME")]
    pub served_name: Option<String>,
    /// Weight format: auto, f32, f16, bf16, int8, int4, q4k, q6k.
    #[arg(long, env = "LLMO_QUANTIZATION", default_value = "auto")]
    pub quantization: Quantization,
    /// Tensor-parallel ranks per pipeline stage (attention heads, KV heads and the MLP split).
    #[arg(long, env = "LLMO_TENSOR_PARALLEL", default_value_t = 1)]
    pub tensor_parallel: usize,
    /// Pipeline stages (contiguous layer ranges).
    #[arg(long, env = "LLMO_PIPELINE_PARALLEL", default_value_t = 1)]
    pub pipeline_parallel: usize,
    /// This process's index in --peers. A group of T × P ranks over N processes puts T·P/N
    /// consecutive ranks in each process (as threads); process 0 holds rank 0 and serves HTTP.
    #[arg(long, env = "LLMO_RANK", default_value_t = 0)]
    pub rank: usize,
    /// HOST:PORT of every process of the group, in process order, this one included (it
    /// listens on its entry's port). Empty: the whole group runs in this process.
    #[arg(long, env = "LLMO_PEERS", value_delimiter = ',')]
    pub peers: Vec<String>,
    /// Seconds to wait for every process of the group to join before giving up.
    #[arg(long, env = "LLMO_JOIN_TIMEOUT", default_value_t = 600)]
    pub join_timeout: u64,
    #[arg(long, env = "LLMO_HOST", default_value = "0.0.0.0")]
    pub host: String,
    #[arg(long, env = "LLMO_PORT", default_value_t = 8000)]
    pub port: u16,
    /// Longest prompt + completion in tokens (default: the model's, bounded by the KV cache).
    #[arg(long, env = "LLMO_CONTEXT_LENGTH")]
    pub context_length: Option<usize>,
    /// Token budget of one engine step (decodes plus prefill chunks).
    #[arg(long, env = "LLMO_MAX_BATCH_TOKENS", default_value_t = 256)]
    pub max_batch_tokens: usize,
    /// Share of available memory given to the KV cache.
    #[arg(long, env = "LLMO_KV_CACHE_FRACTION", default_value_t = 0.25)]
    pub kv_cache_fraction: f64,
    /// KV cache size in tokens; overrides --kv-cache-fraction.
    #[arg(long, env = "LLMO_KV_CACHE_TOKENS")]
    pub kv_cache_tokens: Option<usize>,
    /// Compute threads (default: all available cores).
    #[arg(long, env = "LLMO_THREADS")]
    pub threads: Option<usize>,
    #[arg(long, env = "LLMO_DEVICE", value_enum, default_value = "auto")]
    pub device: DeviceArg,
    /// Most sequences in one batch.
    #[arg(long, env = "LLMO_MAX_RUNNING", default_value_t = 64)]
    pub max_running: usize,
    /// Most requests waiting for admission; more get HTTP 429.
    #[arg(long, env = "LLMO_MAX_WAITING", default_value_t = 256)]
    pub max_waiting: usize,
    /// Tokens per KV cache block.
    #[arg(long, env = "LLMO_BLOCK_SIZE", default_value_t = 16)]
    pub block_size: usize,
    /// Seconds to finish in-flight requests after SIGTERM.
    #[arg(long, env = "LLMO_SHUTDOWN_TIMEOUT", default_value_t = 30)]
    pub shutdown_timeout: u64,
    /// Where downloaded models are kept (default: $HOME/.cache/llmo).
    #[arg(long, env = "LLMO_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
}

impl Args {
    pub fn threads(&self) -> usize {
        self.threads.filter(|&t| t > 0).unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
    }

    pub fn cache_dir(&self) -> PathBuf {
        self.cache_dir.clone().unwrap_or_else(|| {
            std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("."))
                .join(".cache/llmo")
        })
    }
}

/// `MemAvailable` from /proc/meminfo, in bytes.
pub fn available_memory() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    s.lines()
        .find(|l| l.starts_with("MemAvailable:"))?
        .split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()
        .map(|kb| kb * 1024)
}
