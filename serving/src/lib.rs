//! `llmo-serve`: the serving engine that the llmo operator launches on every node.
//!
//! Layers, bottom up: [`model`] (GGUF, the Llama-family forward pass on candle, weight formats),
//! [`kv`] (paged KV cache), [`tokenizer`] (byte-level BPE and chat templates from GGUF metadata),
//! [`engine`] (continuous-batching scheduler, sampling, stop conditions), [`http`] (OpenAI API),
//! and [`server`] (start-up, drain, shutdown).

pub mod config;
pub mod dist;
pub mod engine;
pub mod http;
pub mod kv;
pub mod metrics;
pub mod model;
pub mod server;
pub mod tokenizer;

/// Points candle's matmul thread pools at `threads`. Must run before any tensor work and
/// before other threads start (it sets process environment variables).
pub fn set_compute_threads(threads: usize) {
    std::env::set_var("CANDLE_NUM_THREADS", threads.to_string());
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
}
