//! Models: GGUF files and Hugging Face checkpoint directories, the Llama-family forward pass,
//! weight formats, and where models come from (local paths, `file://`, `hf://`).

pub mod attention;
pub mod config;
pub mod gguf;
pub mod hf;
pub mod hub;
pub mod int4;
pub mod int8;
pub mod llama;
pub mod quant;
pub mod shard;

use std::path::PathBuf;

pub use config::LlamaConfig;
pub use llama::{LlamaModel, StageOutput, StepInput};
pub use quant::Quantization;

use crate::tokenizer::{Tokenizer, TokenizerError};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Gguf(#[from] gguf::GgufError),
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("{0}")]
    Unsupported(String),
    #[error("{path}: {reason}")]
    Checkpoint { path: PathBuf, reason: String },
    #[error("model URI `{uri}`: {reason}")]
    Uri { uri: String, reason: String },
    #[error(transparent)]
    Hub(#[from] hub::HubError),
    #[error(transparent)]
    Comm(#[from] crate::dist::CommError),
    #[error("tokenizer in {path}: {source}")]
    Tokenizer {
        path: PathBuf,
        source: TokenizerError,
    },
}

/// A model with its tokenizer, loaded from a GGUF file or a checkpoint directory.
#[derive(Debug)]
pub struct LoadedModel {
    pub path: PathBuf,
    pub model: LlamaModel,
    pub tokenizer: Tokenizer,
}

/// Resolves `uri` to a local GGUF file or checkpoint directory, downloading it first for
/// `hf://`.
pub async fn resolve(uri: &str, cache_dir: &std::path::Path) -> Result<PathBuf, ModelError> {
    if let Some(rest) = uri.strip_prefix("hf://") {
        let spec = hub::HubSpec::parse(rest).map_err(|reason| ModelError::Uri {
            uri: uri.to_string(),
            reason,
        })?;
        return Ok(hub::download(&spec, &hub::endpoint(), cache_dir).await?);
    }
    let path = uri.strip_prefix("file://").unwrap_or(uri);
    if let Some((scheme, _)) = path.split_once("://") {
        return Err(ModelError::Uri {
            uri: uri.to_string(),
            reason: format!("scheme `{scheme}://` is not supported by llmo-serve (use a path, file:// or hf://)"),
        });
    }
    let p = PathBuf::from(path);
    if p.is_dir() && !hf::is_checkpoint(&p) {
        return Err(ModelError::Uri {
            uri: uri.to_string(),
            reason: "is a directory without config.json; llmo-serve loads a .gguf file or a Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer.json)".into(),
        });
    }
    Ok(p)
}

/// Reads a model's metadata and maps its weights: a Hugging Face checkpoint when `path` is a
/// directory, else a GGUF file.
pub fn open(path: &std::path::Path) -> Result<gguf::GgufFile, ModelError> {
    if path.is_dir() {
        hf::open_dir(path)
    } else {
        Ok(gguf::GgufFile::open(path)?)
    }
}

/// Opens and loads a model (see [`open`]) with its tokenizer.
pub fn load(
    path: &std::path::Path,
    quantization: Quantization,
    max_positions: usize,
    threads: usize,
) -> Result<LoadedModel, ModelError> {
    let g = open(path)?;
    let tokenizer = Tokenizer::from_gguf(&g).map_err(|source| ModelError::Tokenizer {
        path: path.to_path_buf(),
        source,
    })?;
    let model = LlamaModel::from_gguf(&g, quantization, max_positions, threads)?;
    if tokenizer.vocab_size() > model.config.vocab {
        return Err(ModelError::Unsupported(format!(
            "{}: tokenizer has {} tokens but the embedding has {} rows",
            path.display(),
            tokenizer.vocab_size(),
            model.config.vocab
        )));
    }
    Ok(LoadedModel {
        path: path.to_path_buf(),
        model,
        tokenizer,
    })
}
