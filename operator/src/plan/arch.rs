//! The figures of a model's architecture that decide its memory footprint and how it splits,
//! read from a Hugging Face `config.json` or from the size hints of a ModelDeployment.

use serde::Deserialize;

use super::PlanError;
use crate::api::{parse_parameter_count, ArchitectureHints};

/// What the planner needs to know about a model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelArch {
    /// Total parameters, embeddings included.
    pub parameters: f64,
    /// Parameters of the token embedding and, when untied, the output head. They stay in 16-bit
    /// when the rest is quantized, as vLLM and llama.cpp keep them.
    pub embedding_parameters: f64,
    /// Transformer layers.
    pub layers: u32,
    /// Residual width.
    pub hidden_size: u32,
    /// MLP width.
    pub intermediate_size: u32,
    /// Query heads.
    pub attention_heads: u32,
    /// Key/value heads.
    pub kv_heads: u32,
    /// Dimension of one head.
    pub head_dim: u32,
    /// Vocabulary size.
    pub vocab_size: u32,
    /// Longest context the model supports.
    pub max_context: u32,
}

/// The subset of a Hugging Face `config.json` the planner reads (Llama, Qwen2, Mistral style).
#[derive(Debug, Deserialize)]
struct HfConfig {
    num_hidden_layers: u32,
    hidden_size: u32,
    intermediate_size: u32,
    num_attention_heads: u32,
    num_key_value_heads: Option<u32>,
    head_dim: Option<u32>,
    vocab_size: u32,
    max_position_embeddings: Option<u32>,
    #[serde(default)]
    tie_word_embeddings: bool,
}

impl ModelArch {
    /// Reads a Hugging Face `config.json`; the parameter count is computed from the shapes.
    pub fn from_hf_config(json: &str) -> Result<Self, PlanError> {
        let c: HfConfig = serde_json::from_str(json).map_err(|e| PlanError::Architecture {
            message: format!("config.json is not a Llama-family config: {e}"),
        })?;
        let kv_heads = c.num_key_value_heads.unwrap_or(c.num_attention_heads);
        let head_dim = c
            .head_dim
            .unwrap_or(c.hidden_size / c.num_attention_heads.max(1));
        let (h, i, v) = (
            f64::from(c.hidden_size),
            f64::from(c.intermediate_size),
            f64::from(c.vocab_size),
        );
        let q = f64::from(c.num_attention_heads * head_dim);
        let kv = f64::from(kv_heads * head_dim);
        let per_layer = h * q + 2.0 * h * kv + q * h + 3.0 * h * i + 2.0 * h;
        let embedding = v * h * if c.tie_word_embeddings { 1.0 } else { 2.0 };
        let arch = Self {
            parameters: per_layer * f64::from(c.num_hidden_layers) + embedding + h,
            embedding_parameters: embedding,
            layers: c.num_hidden_layers,
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            attention_heads: c.num_attention_heads,
            kv_heads,
            head_dim,
            vocab_size: c.vocab_size,
            max_context: c.max_position_embeddings.unwrap_or(4096),
        };
        arch.check()?;
        Ok(arch)
    }

    /// Builds the architecture from the hints of a ModelDeployment.
    pub fn from_hints(h: &ArchitectureHints) -> Result<Self, PlanError> {
        let missing: Vec<&str> = [
            ("parameters", h.parameters.is_none()),
            ("layers", h.layers.is_none()),
            ("hiddenSize", h.hidden_size.is_none()),
            ("attentionHeads", h.attention_heads.is_none()),
        ]
        .into_iter()
        .filter_map(|(name, absent)| absent.then_some(name))
        .collect();
        if !missing.is_empty() {
            return Err(PlanError::Architecture {
                message: format!(
                    "spec.model.architecture lacks {}; give them, or let the operator read the model's config.json or GGUF header",
                    missing.join(", ")
                ),
            });
        }
        let text = h.parameters.as_deref().unwrap_or_default();
        let parameters = parse_parameter_count(text).ok_or_else(|| PlanError::Architecture {
            message: format!(
                "spec.model.architecture.parameters {text:?} is not a count such as 8B"
            ),
        })?;
        let hidden = h.hidden_size.unwrap_or_default();
        let heads = h.attention_heads.unwrap_or_default();
        let vocab = h.vocab_size.unwrap_or(32000);
        // Without the MLP width, assume Llama's ratio; it only affects activation memory.
        let intermediate = (f64::from(hidden) * 3.5) as u32;
        let arch = Self {
            parameters,
            embedding_parameters: f64::from(vocab) * f64::from(hidden),
            layers: h.layers.unwrap_or_default(),
            hidden_size: hidden,
            intermediate_size: intermediate,
            attention_heads: heads,
            kv_heads: h.kv_heads.unwrap_or(heads),
            head_dim: h.head_dim.unwrap_or(hidden / heads.max(1)),
            vocab_size: vocab,
            max_context: h.max_context.unwrap_or(4096),
        };
        arch.check()?;
        Ok(arch)
    }

    fn check(&self) -> Result<(), PlanError> {
        let bad = |message: String| Err(PlanError::Architecture { message });
        if self.layers == 0 || self.hidden_size == 0 || self.attention_heads == 0 {
            return bad("layers, hidden size and attention heads must be above zero".into());
        }
        if self.kv_heads == 0 || !self.attention_heads.is_multiple_of(self.kv_heads) {
            return bad(format!(
                "{} KV heads do not divide {} attention heads",
                self.kv_heads, self.attention_heads
            ));
        }
        if self.embedding_parameters >= self.parameters {
            return bad(format!(
                "{:.0} parameters cannot hold a {}x{} embedding",
                self.parameters, self.vocab_size, self.hidden_size
            ));
        }
        Ok(())
    }

    /// Whether `tensor` ranks can split the attention heads and the KV heads evenly.
    pub fn tensor_divides(&self, tensor: u32) -> bool {
        tensor > 0
            && self.attention_heads.is_multiple_of(tensor)
            && self.kv_heads.is_multiple_of(tensor)
    }

    /// Parameters outside the embedding and output head.
    pub fn body_parameters(&self) -> f64 {
        self.parameters - self.embedding_parameters
    }

    /// A short label such as `8.0B` or `135M`.
    pub fn size_label(&self) -> String {
        let p = self.parameters;
        if p >= 1e9 {
            format!("{:.1}B", p / 1e9)
        } else {
            format!("{:.0}M", p / 1e6)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LLAMA3_8B: &str = r#"{"architectures":["LlamaForCausalLM"],"hidden_size":4096,"intermediate_size":14336,
        "max_position_embeddings":131072,"num_attention_heads":32,"num_hidden_layers":32,"num_key_value_heads":8,
        "rope_theta":500000.0,"tie_word_embeddings":false,"vocab_size":128256}"#;

    #[test]
    fn counts_llama3_8b_parameters_from_its_config() {
        let a = ModelArch::from_hf_config(LLAMA3_8B).unwrap();
        // Meta publishes 8.03B parameters.
        assert!((a.parameters / 1e9 - 8.03).abs() < 0.01, "{}", a.parameters);
        assert_eq!(a.head_dim, 128);
        assert_eq!(a.kv_heads, 8);
        assert_eq!(a.size_label(), "8.0B");
    }

    #[test]
    fn counts_smollm2_with_tied_embeddings() {
        let json = r#"{"hidden_size":576,"intermediate_size":1536,"num_attention_heads":9,"num_hidden_layers":30,
            "num_key_value_heads":3,"vocab_size":49152,"max_position_embeddings":8192,"tie_word_embeddings":true}"#;
        let a = ModelArch::from_hf_config(json).unwrap();
        assert!((a.parameters / 1e6 - 134.5).abs() < 1.0, "{}", a.parameters);
        assert_eq!(a.head_dim, 64);
    }

    #[test]
    fn hints_need_the_core_figures() {
        let err = ModelArch::from_hints(&ArchitectureHints {
            parameters: Some("8B".into()),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("lacks layers, hiddenSize, attentionHeads"),
            "{err}"
        );
    }

    #[test]
    fn refuses_a_config_that_is_not_llama_like() {
        let err = ModelArch::from_hf_config(r#"{"n_layer": 12}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a Llama-family config"), "{err}");
    }
}
