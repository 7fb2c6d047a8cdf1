//! Hugging Face checkpoint directories: `config.json`, `*.safetensors` and `tokenizer.json`
//! (with `tokenizer_config.json` for the special tokens and the chat template).
//!
//! The directory is translated into the same description a GGUF file gives, GGUF's metadata
//! keys and tensor names, so one loader (and one sharding code path) serves both. The weights
//! stay memory-mapped. Differences from a GGUF file that the loader must know about are carried
//! by [`Format::HuggingFace`]: the Q/K rows are in Hugging Face's order, so RoPE rotates the two
//! halves of each head instead of llama.cpp's adjacent pairs.
//!
//! What is accepted is what the forward pass runs: Llama, Mistral and Qwen2 configs with SiLU
//! MLPs and unscaled RoPE, f32/f16/bf16 weights, and GPT-2 style byte-level BPE tokenizers. Anything
//! else is refused at start-up with the file and the field that does not fit.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::{Mmap, MmapMut};
use safetensors::tensor::Dtype;
use safetensors::SafeTensors;
use serde_json::Value as Json;

use super::gguf::{Format, GgufFile, TensorInfo, Value};
use super::ModelError;

/// ggml token types, as `tokenizer.ggml.token_type` holds them.
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;

fn err(path: &Path, reason: impl Into<String>) -> ModelError {
    ModelError::Checkpoint {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn read_json(path: &Path) -> Result<Json, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|e| err(path, format!("cannot read: {e}")))?;
    serde_json::from_str(&text).map_err(|e| err(path, format!("is not valid JSON: {e}")))
}

fn read_json_opt(path: &Path) -> Result<Option<Json>, ModelError> {
    if path.is_file() {
        read_json(path).map(Some)
    } else {
        Ok(None)
    }
}

/// Whether `dir` looks like a checkpoint directory.
pub fn is_checkpoint(dir: &Path) -> bool {
    dir.join("config.json").is_file()
}

/// Reads the checkpoint in `dir`.
pub fn open_dir(dir: &Path) -> Result<GgufFile, ModelError> {
    let config_path = dir.join("config.json");
    let config = read_json(&config_path)?;
    let (arch, mut metadata) = translate_config(&config, &config_path)?;
    let tied = config["tie_word_embeddings"].as_bool().unwrap_or(false);
    let layers = metadata[&format!("{arch}.block_count")]
        .as_u64()
        .expect("translate_config sets the layer count") as usize;
    let (tensors, maps) = map_weights(dir, tied, layers)?;
    metadata.extend(translate_tokenizer(dir, &config)?);
    tracing::debug!(path = %dir.display(), architecture = %arch, tensors = tensors.len(), files = maps.len(), "Hugging Face checkpoint read");
    Ok(GgufFile::assemble(
        dir.to_path_buf(),
        Format::HuggingFace,
        metadata,
        tensors,
        maps,
    ))
}

/// `config.json` as GGUF hyper-parameter keys.
fn translate_config(c: &Json, path: &Path) -> Result<(String, HashMap<String, Value>), ModelError> {
    let arch = c["model_type"]
        .as_str()
        .ok_or_else(|| err(path, "has no `model_type`"))?
        .to_string();
    if !["llama", "mistral", "qwen2"].contains(&arch.as_str()) {
        return Err(err(
            path,
            format!("model_type `{arch}` is not supported (supported: llama, mistral, qwen2)"),
        ));
    }
    let int = |k: &str| -> Result<u64, ModelError> {
        c[k].as_u64()
            .filter(|v| *v > 0)
            .ok_or_else(|| err(path, format!("`{k}` is missing or not a positive integer")))
    };
    let hidden = int("hidden_size")?;
    let heads = int("num_attention_heads")?;
    let kv_heads = match c.get("num_key_value_heads") {
        Some(Json::Null) | None => heads,
        Some(_) => int("num_key_value_heads")?,
    };
    if let Some(act) = c["hidden_act"].as_str() {
        if act != "silu" {
            return Err(err(
                path,
                format!("hidden_act `{act}` is not supported (only silu)"),
            ));
        }
    }
    if let Some(hd) = c["head_dim"].as_u64() {
        if hd * heads != hidden {
            return Err(err(path, format!(
                "head_dim {hd} × {heads} heads differs from hidden_size {hidden}; such models are not supported"
            )));
        }
    }
    // Newer configs keep RoPE settings under `rope_parameters`.
    let rope = c
        .get("rope_parameters")
        .filter(|v| v.is_object())
        .unwrap_or(c);
    let scaling = c.get("rope_scaling").filter(|v| !v.is_null()).or_else(|| {
        rope.get("rope_type")
            .filter(|t| t.as_str() != Some("default"))
            .map(|_| rope)
    });
    if let Some(s) = scaling {
        let kind = s["rope_type"]
            .as_str()
            .or(s["type"].as_str())
            .unwrap_or("?");
        if kind != "default" {
            return Err(err(
                path,
                format!("RoPE scaling `{kind}` is not supported; only unscaled RoPE runs"),
            ));
        }
    }
    let theta = rope["rope_theta"]
        .as_f64()
        .or(c["rope_theta"].as_f64())
        .unwrap_or(10_000.0);
    let mut context = c["max_position_embeddings"].as_u64().unwrap_or(2048);
    // Sliding-window attention is not implemented: stay inside one window, where it is exact.
    let window = c["sliding_window"].as_u64();
    if let Some(w) = window.filter(|_| c["use_sliding_window"].as_bool() != Some(false)) {
        if w < context {
            tracing::warn!(path = %path.display(), sliding_window = w, max_position_embeddings = context, "context limited to the sliding window");
            context = w;
        }
    }
    let k = |s: &str| format!("{arch}.{s}");
    let mut m = HashMap::new();
    m.insert("general.architecture".into(), Value::String(arch.clone()));
    m.insert(k("embedding_length"), Value::U64(hidden));
    m.insert(
        k("feed_forward_length"),
        Value::U64(int("intermediate_size")?),
    );
    m.insert(k("block_count"), Value::U64(int("num_hidden_layers")?));
    m.insert(k("attention.head_count"), Value::U64(heads));
    m.insert(k("attention.head_count_kv"), Value::U64(kv_heads));
    m.insert(k("rope.freq_base"), Value::F64(theta));
    m.insert(
        k("attention.layer_norm_rms_epsilon"),
        Value::F64(c["rms_norm_eps"].as_f64().unwrap_or(1e-6)),
    );
    m.insert(k("context_length"), Value::U64(context));
    Ok((arch, m))
}

/// The GGUF name of a Hugging Face tensor, or `None` for tensors the model does not use
/// (e.g. `rotary_emb.inv_freq`).
pub fn gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = part.rsplit_once('.')?;
    let short = match module {
        "input_layernorm" => "attn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "post_attention_layernorm" => "ffn_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    matches!(kind, "weight" | "bias").then(|| format!("blk.{layer}.{short}.{kind}"))
}

/// The safetensors files that hold the weights: those the index names, else
/// `model.safetensors`, else every `*.safetensors` in the directory.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let index = dir.join("model.safetensors.index.json");
    if let Some(ix) = read_json_opt(&index)? {
        let map = ix["weight_map"]
            .as_object()
            .ok_or_else(|| err(&index, "has no `weight_map` object"))?;
        let mut files: Vec<&str> = map.values().filter_map(Json::as_str).collect();
        files.sort_unstable();
        files.dedup();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| err(dir, format!("cannot list: {e}")))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(err(
            dir,
            "has no *.safetensors weights (PyTorch .bin checkpoints are not supported: convert them to safetensors, or use a GGUF file)",
        ));
    }
    Ok(files)
}

fn ggml_type(d: Dtype) -> Option<(u32, u64)> {
    Some(match d {
        Dtype::F32 => (0, 4),
        Dtype::F16 => (1, 2),
        Dtype::BF16 => (30, 2),
        _ => return None,
    })
}

/// Maps every weight file and describes the tensors the model uses under their GGUF names.
fn map_weights(
    dir: &Path,
    tied: bool,
    layers: usize,
) -> Result<(Vec<TensorInfo>, Vec<Mmap>), ModelError> {
    let mut tensors = Vec::new();
    let mut maps = Vec::new();
    let mut seen = HashSet::new();
    for path in weight_files(dir)? {
        let file = File::open(&path).map_err(|e| err(&path, format!("cannot open: {e}")))?;
        // SAFETY: read-only private mapping of a file treated as immutable while served, the
        // same contract as the GGUF reader's.
        #[allow(unsafe_code)]
        let map =
            unsafe { Mmap::map(&file) }.map_err(|e| err(&path, format!("cannot map: {e}")))?;
        let (header, meta) = SafeTensors::read_metadata(&map).map_err(|e| {
            err(
                &path,
                format!(
                    "is not a valid safetensors file ({e}); it may be truncated, download it again"
                ),
            )
        })?;
        let data_start = 8 + header as u64;
        let file_index = maps.len();
        let mut copies: Vec<(TensorInfo, Vec<u8>)> = Vec::new();
        let mut named: Vec<_> = meta.tensors().into_iter().collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        for (hf, info) in named {
            let Some(name) = gguf_name(&hf) else {
                tracing::debug!(tensor = %hf, file = %path.display(), "tensor not used by the model");
                continue;
            };
            if tied && name == "output.weight" {
                continue;
            }
            let (ty, elem) = ggml_type(info.dtype).ok_or_else(|| {
                err(&path, format!(
                    "tensor `{hf}` is {:?}; only F32, F16 and BF16 weights are read (pre-quantized checkpoints such as FP8, GPTQ or AWQ are not supported: use the bf16 checkpoint, --quantization quantizes it on load)",
                    info.dtype
                ))
            })?;
            if info.shape.is_empty() || info.shape.len() > 4 {
                return Err(err(
                    &path,
                    format!("tensor `{hf}` has shape {:?}", info.shape),
                ));
            }
            if !seen.insert(name.clone()) {
                return Err(err(
                    dir,
                    format!("tensor `{hf}` appears in more than one weight file"),
                ));
            }
            let (s, e) = info.data_offsets;
            let t = TensorInfo {
                name,
                shape: info.shape.clone(),
                ggml_type: ty,
                file: file_index,
                offset: data_start + s as u64,
                size: (e - s) as u64,
            };
            if !t.offset.is_multiple_of(elem) {
                // The tensor readers need element alignment; this writer did not pad.
                copies.push((
                    t,
                    map[data_start as usize + s..data_start as usize + e].to_vec(),
                ));
            } else {
                tensors.push(t);
            }
        }
        maps.push(map);
        if !copies.is_empty() {
            let len: usize = copies
                .iter()
                .map(|(_, b)| b.len().next_multiple_of(8))
                .sum();
            let mut anon = MmapMut::map_anon(len.max(1))
                .map_err(|e| err(&path, format!("cannot allocate {len} bytes: {e}")))?;
            let mut at = 0usize;
            for (mut t, bytes) in copies {
                anon[at..at + bytes.len()].copy_from_slice(&bytes);
                t.file = maps.len();
                t.offset = at as u64;
                at += bytes.len().next_multiple_of(8);
                tensors.push(t);
            }
            maps.push(
                anon.make_read_only()
                    .map_err(|e| err(&path, format!("cannot protect a copy: {e}")))?,
            );
        }
    }
    check_complete(dir, &seen, tied, layers)?;
    Ok((tensors, maps))
}

/// Names the first weight the model's `layers` layers need that no file holds, by its Hugging
/// Face name.
fn check_complete(
    dir: &Path,
    seen: &HashSet<String>,
    tied: bool,
    layers: usize,
) -> Result<(), ModelError> {
    let mut needed = vec![
        "model.embed_tokens.weight".to_string(),
        "model.norm.weight".into(),
    ];
    if !tied {
        needed.push("lm_head.weight".into());
    }
    for i in 0..layers {
        for m in [
            "input_layernorm",
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "post_attention_layernorm",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ] {
            needed.push(format!("model.layers.{i}.{m}.weight"));
        }
    }
    match needed
        .iter()
        .find(|n| !seen.contains(&gguf_name(n).expect("known name")))
    {
        Some(missing) => Err(err(
            dir,
            format!("weight `{missing}` is in none of the safetensors files"),
        )),
        None => Ok(()),
    }
}

/// The content of a special-token entry: a string or `{"content": ...}`.
fn token_content(v: &Json) -> Option<&str> {
    v.as_str().or_else(|| v["content"].as_str())
}

/// How the tokenizer splits text before BPE, as a `tokenizer.ggml.pre` name.
fn pre_tokenizer(t: &Json, path: &Path) -> Result<&'static str, ModelError> {
    let byte_level = |p: &Json| {
        p["type"] == "ByteLevel"
            && p["use_regex"].as_bool().unwrap_or(true)
            && !p["add_prefix_space"].as_bool().unwrap_or(false)
    };
    let pre = &t["pre_tokenizer"];
    if byte_level(pre) {
        return Ok("gpt2");
    }
    if pre["type"] == "Sequence" {
        if let Some([digits, bl]) = pre["pretokenizers"].as_array().map(Vec::as_slice) {
            if digits["type"] == "Digits"
                && digits["individual_digits"].as_bool() == Some(true)
                && byte_level(bl)
            {
                return Ok("smollm");
            }
        }
    }
    Err(err(path, format!(
        "pre-tokenizer {} is not supported (supported: GPT-2 byte-level, alone or after single-digit splitting)",
        serde_json::to_string(pre).unwrap_or_default().chars().take(200).collect::<String>()
    )))
}

/// `tokenizer.json` and `tokenizer_config.json` as `tokenizer.*` GGUF keys.
fn translate_tokenizer(dir: &Path, config: &Json) -> Result<HashMap<String, Value>, ModelError> {
    let path = dir.join("tokenizer.json");
    if !path.is_file() {
        return Err(err(
            dir,
            "has no tokenizer.json (the tokenizer is required)",
        ));
    }
    let t = read_json(&path)?;
    let model = &t["model"];
    if model["type"] != "BPE" {
        return Err(err(
            &path,
            format!(
                "tokenizer model `{}` is not supported (only byte-level BPE)",
                model["type"].as_str().unwrap_or("?")
            ),
        ));
    }
    if model["byte_fallback"].as_bool() == Some(true) {
        return Err(err(
            &path,
            "byte-fallback (SentencePiece-style) BPE is not supported; only GPT-2 style byte-level BPE",
        ));
    }
    if !t["normalizer"].is_null() {
        return Err(err(&path, "tokenizers with a normalizer are not supported"));
    }
    let pre = pre_tokenizer(&t, &path)?;
    let vocab = model["vocab"]
        .as_object()
        .ok_or_else(|| err(&path, "model.vocab is missing"))?;
    let mut by_id: HashMap<u32, (String, i32)> = HashMap::new();
    for (tok, id) in vocab {
        let id = id
            .as_u64()
            .ok_or_else(|| err(&path, format!("token `{tok}` has no integer id")))?;
        by_id.insert(id as u32, (tok.clone(), NORMAL));
    }
    for a in t["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(content)) = (a["id"].as_u64(), a["content"].as_str()) else {
            return Err(err(&path, "an added_tokens entry lacks id or content"));
        };
        let kind = if a["special"].as_bool().unwrap_or(false) {
            CONTROL
        } else {
            USER_DEFINED
        };
        by_id.insert(id as u32, (content.to_string(), kind));
    }
    let n = by_id.keys().max().map_or(0, |m| *m as usize + 1);
    if n > 4 * by_id.len().max(1) {
        return Err(err(
            &path,
            format!("token ids reach {n} for {} tokens", by_id.len()),
        ));
    }
    let mut tokens = Vec::with_capacity(n);
    let mut types = Vec::with_capacity(n);
    for i in 0..n as u32 {
        match by_id.remove(&i) {
            Some((tok, kind)) => {
                tokens.push(Value::String(tok));
                types.push(Value::I32(kind));
            }
            None => {
                tokens.push(Value::String(format!("[PAD{i}]")));
                types.push(Value::I32(USER_DEFINED));
            }
        }
    }
    let merges: Vec<Value> = model["merges"]
        .as_array()
        .ok_or_else(|| err(&path, "model.merges is missing"))?
        .iter()
        .map(|m| match m {
            Json::String(s) => Ok(Value::String(s.clone())),
            Json::Array(p) if p.len() == 2 && p.iter().all(Json::is_string) => {
                Ok(Value::String(format!(
                    "{} {}",
                    p[0].as_str().unwrap_or(""),
                    p[1].as_str().unwrap_or("")
                )))
            }
            other => Err(err(
                &path,
                format!("merge {other} is neither \"a b\" nor [a, b]"),
            )),
        })
        .collect::<Result<_, _>>()?;

    let tc_path = dir.join("tokenizer_config.json");
    let tc = read_json_opt(&tc_path)?.unwrap_or(Json::Null);
    let id_of = |content: &str| -> Option<u32> {
        tokens
            .iter()
            .position(|v| v.as_str() == Some(content))
            .map(|i| i as u32)
    };
    let config_id = |k: &str| -> Option<u32> {
        let v = &config[k];
        v.as_u64()
            .or_else(|| v.as_array()?.first()?.as_u64())
            .map(|v| v as u32)
    };
    let special = |k: &str| -> Option<u32> {
        token_content(&tc[format!("{k}_token")])
            .and_then(id_of)
            .or_else(|| config_id(&format!("{k}_token_id")))
    };
    let eos = special("eos").ok_or_else(|| {
        err(
            &tc_path,
            "names no end-of-sequence token (eos_token), and config.json has no eos_token_id",
        )
    })?;
    let bos = special("bos");
    // Whether encoding prepends BOS: the config's flag, else the post-processor's template.
    let add_bos = tc["add_bos_token"].as_bool().unwrap_or_else(|| {
        t["post_processor"]["type"] == "TemplateProcessing"
            && t["post_processor"]["single"][0]["SpecialToken"].is_object()
    });
    let template = match &tc["chat_template"] {
        Json::String(s) => Some(s.clone()),
        Json::Array(list) => list
            .iter()
            .find(|e| e["name"] == "default")
            .and_then(|e| e["template"].as_str())
            .map(str::to_string),
        _ => {
            let jinja = dir.join("chat_template.jinja");
            if jinja.is_file() {
                Some(
                    std::fs::read_to_string(&jinja)
                        .map_err(|e| err(&jinja, format!("cannot read: {e}")))?,
                )
            } else {
                None
            }
        }
    };

    let mut m = HashMap::new();
    m.insert("tokenizer.ggml.model".into(), Value::String("gpt2".into()));
    m.insert("tokenizer.ggml.pre".into(), Value::String(pre.into()));
    m.insert("tokenizer.ggml.tokens".into(), Value::Array(tokens));
    m.insert("tokenizer.ggml.token_type".into(), Value::Array(types));
    m.insert("tokenizer.ggml.merges".into(), Value::Array(merges));
    m.insert("tokenizer.ggml.eos_token_id".into(), Value::U32(eos));
    if let Some(b) = bos {
        m.insert("tokenizer.ggml.bos_token_id".into(), Value::U32(b));
    }
    m.insert("tokenizer.ggml.add_bos_token".into(), Value::Bool(add_bos));
    if let Some(tpl) = template {
        m.insert("tokenizer.chat_template".into(), Value::String(tpl));
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_translate_to_gguf() {
        assert_eq!(
            gguf_name("model.layers.12.self_attn.k_proj.bias").unwrap(),
            "blk.12.attn_k.bias"
        );
        assert_eq!(
            gguf_name("model.layers.0.mlp.down_proj.weight").unwrap(),
            "blk.0.ffn_down.weight"
        );
        assert_eq!(
            gguf_name("model.layers.3.post_attention_layernorm.weight").unwrap(),
            "blk.3.ffn_norm.weight"
        );
        assert_eq!(gguf_name("lm_head.weight").unwrap(), "output.weight");
        assert_eq!(
            gguf_name("model.layers.0.self_attn.rotary_emb.inv_freq"),
            None
        );
        assert_eq!(gguf_name("model.layers.x.mlp.up_proj.weight"), None);
        assert_eq!(gguf_name("vision_tower.x"), None);
    }

    fn config() -> Json {
        serde_json::json!({
            "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
            "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
            "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "max_position_embeddings": 8192,
            "hidden_act": "silu", "tie_word_embeddings": true
        })
    }

    #[test]
    fn config_translates_and_refuses_what_does_not_run() {
        let p = Path::new("config.json");
        let (arch, m) = translate_config(&config(), p).unwrap();
        assert_eq!(arch, "llama");
        assert_eq!(m["llama.attention.head_count_kv"], Value::U64(3));
        assert_eq!(m["llama.rope.freq_base"], Value::F64(100000.0));
        assert_eq!(m["llama.context_length"], Value::U64(8192));

        let refused = |patch: Json| {
            let mut c = config();
            for (k, v) in patch.as_object().unwrap() {
                c[k] = v.clone();
            }
            translate_config(&c, p).unwrap_err().to_string()
        };
        let e = refused(serde_json::json!({"model_type": "gemma3"}));
        assert!(e.contains("model_type `gemma3` is not supported"), "{e}");
        let e =
            refused(serde_json::json!({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}));
        assert!(e.contains("RoPE scaling `llama3`"), "{e}");
        let e = refused(serde_json::json!({"hidden_act": "gelu"}));
        assert!(e.contains("hidden_act `gelu`"), "{e}");
        let e = refused(serde_json::json!({"head_dim": 128}));
        assert!(e.contains("head_dim 128"), "{e}");
        let e = refused(serde_json::json!({"hidden_size": null}));
        assert!(
            e.starts_with("config.json: `hidden_size` is missing"),
            "{e}"
        );

        let mut c = config();
        c["sliding_window"] = serde_json::json!(4096);
        let (_, m) = translate_config(&c, p).unwrap();
        assert_eq!(m["llama.context_length"], Value::U64(4096));
        c["use_sliding_window"] = serde_json::json!(false);
        let (_, m) = translate_config(&c, p).unwrap();
        assert_eq!(m["llama.context_length"], Value::U64(8192));
        let mut c = config();
        c["rope_parameters"] = serde_json::json!({"rope_type": "default", "rope_theta": 500000.0});
        let (_, m) = translate_config(&c, p).unwrap();
        assert_eq!(m["llama.rope.freq_base"], Value::F64(500000.0));
    }

    fn tokenizer_json(pre: Json) -> Json {
        serde_json::json!({
            "normalizer": null,
            "pre_tokenizer": pre,
            "added_tokens": [{"id": 0, "content": "<|endoftext|>", "special": true},
                             {"id": 5, "content": "<tool>", "special": false}],
            "model": {"type": "BPE", "vocab": {"<|endoftext|>": 0, "a": 1, "b": 2, "ab": 3, "Ġ": 4},
                      "merges": ["a b", ["Ġ", "a"]]}
        })
    }

    #[test]
    fn tokenizer_translates_ids_types_merges_and_specials() {
        let dir = tempfile::tempdir().unwrap();
        let bl =
            serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "use_regex": true});
        std::fs::write(
            dir.path().join("tokenizer.json"),
            tokenizer_json(bl).to_string(),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            serde_json::json!({"eos_token": {"content": "<|endoftext|>"},
                               "chat_template": [{"name": "tool_use", "template": "T"},
                                                 {"name": "default", "template": "D"}]})
            .to_string(),
        )
        .unwrap();
        let m = translate_tokenizer(dir.path(), &Json::Null).unwrap();
        let tokens = m["tokenizer.ggml.tokens"].as_array().unwrap();
        assert_eq!(tokens.len(), 6);
        assert_eq!(tokens[5], Value::String("<tool>".into()));
        let types = m["tokenizer.ggml.token_type"].as_array().unwrap();
        assert_eq!(
            (&types[0], &types[1], &types[5]),
            (
                &Value::I32(CONTROL),
                &Value::I32(NORMAL),
                &Value::I32(USER_DEFINED)
            )
        );
        assert_eq!(
            m["tokenizer.ggml.merges"],
            Value::Array(vec![
                Value::String("a b".into()),
                Value::String("Ġ a".into())
            ])
        );
        assert_eq!(m["tokenizer.ggml.eos_token_id"], Value::U32(0));
        assert_eq!(m["tokenizer.ggml.pre"], Value::String("gpt2".into()));
        assert_eq!(m["tokenizer.chat_template"], Value::String("D".into()));
        assert_eq!(m["tokenizer.ggml.add_bos_token"], Value::Bool(false));

        // Llama-3 style: a regex split this tokenizer does not implement is refused.
        let split = serde_json::json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "(?i:'s|'t)|\\p{N}{1,3}"}},
            {"type": "ByteLevel", "use_regex": false}]});
        std::fs::write(
            dir.path().join("tokenizer.json"),
            tokenizer_json(split).to_string(),
        )
        .unwrap();
        let e = translate_tokenizer(dir.path(), &Json::Null)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("pre-tokenizer") && e.contains("not supported"),
            "{e}"
        );

        // No EOS anywhere.
        let bl = serde_json::json!({"type": "ByteLevel"});
        std::fs::write(
            dir.path().join("tokenizer.json"),
            tokenizer_json(bl).to_string(),
        )
        .unwrap();
        std::fs::write(dir.path().join("tokenizer_config.json"), "{}").unwrap();
        let e = translate_tokenizer(dir.path(), &Json::Null)
            .unwrap_err()
            .to_string();
        assert!(e.contains("eos_token"), "{e}");
        let m =
            translate_tokenizer(dir.path(), &serde_json::json!({"eos_token_id": [0, 5]})).unwrap();
        assert_eq!(m["tokenizer.ggml.eos_token_id"], Value::U32(0));
    }

    #[test]
    fn weight_files_follow_the_index() {
        let dir = tempfile::tempdir().unwrap();
        let e = weight_files(dir.path()).unwrap_err().to_string();
        assert!(e.contains("no *.safetensors"), "{e}");
        std::fs::write(dir.path().join("consolidated.safetensors"), b"").unwrap();
        std::fs::write(
            dir.path().join("model.safetensors.index.json"),
            r#"{"weight_map": {"a": "model-00002-of-00002.safetensors", "b": "model-00001-of-00002.safetensors", "c": "model-00001-of-00002.safetensors"}}"#,
        )
        .unwrap();
        let files: Vec<String> = weight_files(dir.path())
            .unwrap()
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            files,
            [
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors"
            ]
        );
    }
}
