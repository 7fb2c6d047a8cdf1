//! The hyper-parameters of a Llama-family model, read from GGUF metadata (a Hugging Face
//! `config.json` arrives translated into the same keys).

use super::gguf::{Format, GgufFile};
use super::ModelError;

/// Architectures whose GGUF layout this crate runs.
const SUPPORTED: &[&str] = &["llama", "qwen2", "mistral"];

#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub architecture: String,
    pub n_layers: usize,
    pub hidden: usize,
    pub ffn: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    pub rope_theta: f32,
    pub rms_eps: f64,
    pub context_length: usize,
    /// llama.cpp permutes the Q/K rows of `llama` checkpoints so that RoPE rotates adjacent
    /// pairs (x[2i], x[2i+1]); its Qwen2 files, and every Hugging Face checkpoint, are not
    /// permuted and rotate the two halves of each head (x[i], x[i + d/2]).
    pub rope_interleaved: bool,
}

impl LlamaConfig {
    pub fn from_gguf(g: &GgufFile) -> Result<Self, ModelError> {
        let arch = g.get_str("general.architecture")?.to_string();
        if !SUPPORTED.contains(&arch.as_str()) {
            return Err(ModelError::Unsupported(format!(
                "{}: architecture `{arch}` is not supported (supported: {})",
                g.path.display(),
                SUPPORTED.join(", ")
            )));
        }
        let key = |k: &str| format!("{arch}.{k}");
        let hidden = g.get_u64(&key("embedding_length"))? as usize;
        let n_heads = g.get_u64(&key("attention.head_count"))? as usize;
        let n_kv_heads = g
            .get_u64(&key("attention.head_count_kv"))
            .map(|v| v as usize)
            .unwrap_or(n_heads);
        if n_heads == 0
            || n_kv_heads == 0
            || !hidden.is_multiple_of(n_heads)
            || !n_heads.is_multiple_of(n_kv_heads)
        {
            return Err(ModelError::Unsupported(format!(
                "{}: inconsistent attention shape (hidden {hidden}, heads {n_heads}, kv heads {n_kv_heads})",
                g.path.display()
            )));
        }
        let head_dim = hidden / n_heads;
        let vocab = g.tensor("token_embd.weight")?.shape[0];
        let cfg = Self {
            n_layers: g.get_u64(&key("block_count"))? as usize,
            hidden,
            ffn: g.get_u64(&key("feed_forward_length"))? as usize,
            n_heads,
            n_kv_heads,
            head_dim,
            vocab,
            rope_theta: g.get_f64(&key("rope.freq_base")).unwrap_or(10_000.0) as f32,
            rms_eps: g
                .get_f64(&key("attention.layer_norm_rms_epsilon"))
                .unwrap_or(1e-5),
            context_length: g.get_u64(&key("context_length")).unwrap_or(4096) as usize,
            rope_interleaved: g.format == Format::Gguf && arch != "qwen2",
            architecture: arch,
        };
        Ok(cfg)
    }

    /// Size of one token's K and V across all layers, in f32 elements.
    pub fn kv_elems_per_token(&self) -> usize {
        2 * self.n_layers * self.n_kv_heads * self.head_dim
    }
}
