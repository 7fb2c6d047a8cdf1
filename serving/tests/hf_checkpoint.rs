//! Hugging Face checkpoint directories (`config.json`, `*.safetensors`, `tokenizer.json`).
//!
//! No Hugging Face copy of the test model can be downloaded here, so the test writes one: the
//! GGUF's weights widened to f32 (or rounded to bf16), renamed to the Hub's tensor names, with
//! the Q/K rows put back in Hugging Face's order (llama.cpp's converter permutes them for its
//! RoPE layout; this undoes that permutation), and the tokenizer as `tokenizer.json`. The
//! safetensors files are written by this file's own code from the format's specification.
//! Loaded as a checkpoint, the model must give the GGUF model's logits, tokens and answers.

mod common;

use std::borrow::Cow;
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::Device;
use serde_json::json;

use common::{perplexity_of, Server};
use llmo_serve::engine::sampling::argmax;
use llmo_serve::model::gguf::{Format, GgufFile, TensorInfo};
use llmo_serve::model::shard::Layout;
use llmo_serve::model::{LlamaConfig, Quantization, StepInput};
use llmo_serve::tokenizer::{ChatMessage, Tokenizer};

#[derive(Clone, Copy, PartialEq)]
enum Dtype {
    F32,
    Bf16,
}

/// One tensor to write: Hub name, safetensors dtype, shape, bytes.
type Entry = (String, &'static str, Vec<usize>, Vec<u8>);

/// Writes a safetensors file: an 8-byte little-endian header length, the JSON header (padded
/// with spaces to 8 bytes), then the tensors' bytes back to back in the header's order.
fn write_safetensors(path: &Path, entries: &[Entry]) {
    let mut header = serde_json::Map::new();
    let mut at = 0usize;
    for (name, dtype, shape, bytes) in entries {
        header.insert(
            name.clone(),
            json!({"dtype": dtype, "shape": shape, "data_offsets": [at, at + bytes.len()]}),
        );
        at += bytes.len();
    }
    let mut h = serde_json::Value::Object(header).to_string().into_bytes();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + h.len() + at);
    out.extend_from_slice(&(h.len() as u64).to_le_bytes());
    out.extend_from_slice(&h);
    for (_, _, _, bytes) in entries {
        out.extend_from_slice(bytes);
    }
    std::fs::write(path, out).unwrap();
}

fn widen(g: &GgufFile, t: &TensorInfo) -> Vec<f32> {
    let dt = match t.ggml_type {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        3 => GgmlDType::Q4_1,
        8 => GgmlDType::Q8_0,
        other => panic!("test converter: ggml type {other}"),
    };
    let storage = QStorage::from_data(Cow::Borrowed(g.tensor_bytes(t)), &Device::Cpu, dt).unwrap();
    QTensor::new(storage, t.shape.as_slice())
        .unwrap()
        .dequantize(&Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// The Hub's name for a GGUF tensor of a Llama model.
fn hub_name(gguf: &str) -> String {
    match gguf {
        "token_embd.weight" => return "model.embed_tokens.weight".into(),
        "output_norm.weight" => return "model.norm.weight".into(),
        "output.weight" => return "lm_head.weight".into(),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.").expect("layer tensor");
    let (layer, part) = rest.split_once('.').unwrap();
    let (module, kind) = part.rsplit_once('.').unwrap();
    let hub = match module {
        "attn_norm" => "input_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_norm" => "post_attention_layernorm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        other => panic!("test converter: {other}"),
    };
    format!("model.layers.{layer}.{hub}.{kind}")
}

/// llama.cpp stores row `h·d + 2i + j` of a head where Hugging Face has row `h·d + j·d/2 + i`
/// (i < d/2, j ∈ {0, 1}); this puts the rows back.
fn unpermute(w: &[f32], heads: usize, cols: usize) -> Vec<f32> {
    let d = w.len() / cols / heads;
    let mut out = vec![0.0; w.len()];
    for h in 0..heads {
        for i in 0..d / 2 {
            for j in 0..2 {
                let src = (h * d + 2 * i + j) * cols;
                let dst = (h * d + j * d / 2 + i) * cols;
                out[dst..dst + cols].copy_from_slice(&w[src..src + cols]);
            }
        }
    }
    out
}

/// Writes the GGUF model at `src` as a checkpoint in `dir`, in `shards` weight files.
fn convert(src: &GgufFile, dir: &Path, dtype: Dtype, shards: usize) {
    let cfg = LlamaConfig::from_gguf(src).unwrap();
    let mut entries: Vec<Entry> = Vec::new();
    for t in &src.tensors {
        let mut w = widen(src, t);
        let cols = *t.shape.last().unwrap();
        if t.name.ends_with("attn_q.weight") {
            w = unpermute(&w, cfg.n_heads, cols);
        } else if t.name.ends_with("attn_k.weight") {
            w = unpermute(&w, cfg.n_kv_heads, cols);
        }
        let (name, bytes) = match dtype {
            Dtype::F32 => ("F32", w.iter().flat_map(|x| x.to_le_bytes()).collect()),
            Dtype::Bf16 => (
                "BF16",
                w.iter()
                    .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
                    .collect(),
            ),
        };
        entries.push((hub_name(&t.name), name, t.shape.clone(), bytes));
    }
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    let per = entries.len().div_ceil(shards);
    let mut weight_map = serde_json::Map::new();
    for (i, chunk) in entries.chunks(per).enumerate() {
        let file = if shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{shards:05}.safetensors", i + 1)
        };
        let mut chunk = chunk.to_vec();
        if i == 0 {
            // A tensor the model does not use, of odd size: everything after it is misaligned
            // for f32, as some writers leave it, so the reader must copy rather than borrow.
            chunk.insert(
                0,
                (
                    "model.layers.0.self_attn.rotary_emb.inv_freq".into(),
                    "BF16",
                    vec![1],
                    vec![0, 0],
                ),
            );
        }
        for e in &chunk {
            weight_map.insert(e.0.clone(), json!(file));
        }
        write_safetensors(&dir.join(&file), &chunk);
    }
    if shards > 1 {
        std::fs::write(
            dir.join("model.safetensors.index.json"),
            json!({"metadata": {}, "weight_map": weight_map}).to_string(),
        )
        .unwrap();
    }
    std::fs::write(
        dir.join("config.json"),
        json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": cfg.hidden, "intermediate_size": cfg.ffn,
            "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.n_kv_heads, "rms_norm_eps": cfg.rms_eps,
            "rope_theta": cfg.rope_theta, "max_position_embeddings": cfg.context_length,
            "vocab_size": cfg.vocab, "hidden_act": "silu", "rope_scaling": null,
            "tie_word_embeddings": !src.has_tensor("output.weight"),
            "torch_dtype": if dtype == Dtype::F32 { "float32" } else { "bfloat16" }
        })
        .to_string(),
    )
    .unwrap();
    write_tokenizer(src, dir);
}

fn write_tokenizer(src: &GgufFile, dir: &Path) {
    let strs = |k: &str| -> Vec<String> {
        src.get_array(k)
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    };
    let tokens = strs("tokenizer.ggml.tokens");
    let types: Vec<u64> = src
        .get_array("tokenizer.ggml.token_type")
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    let vocab: serde_json::Map<String, serde_json::Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    let added: Vec<serde_json::Value> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| types[*i] == 3)
        .map(|(i, t)| json!({"id": i, "content": t, "special": true, "normalized": false}))
        .collect();
    // The newer `[a, b]` form of merges.
    let merges: Vec<serde_json::Value> = strs("tokenizer.ggml.merges")
        .iter()
        .map(|m| {
            let (a, b) = m.split_once(' ').unwrap();
            json!([a, b])
        })
        .collect();
    assert_eq!(src.get_str("tokenizer.ggml.pre").unwrap(), "smollm");
    let tokenizer = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": added, "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "vocab": vocab, "merges": merges}
    });
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    let id = |k: &str| src.get_u64(k).unwrap() as usize;
    std::fs::write(
        dir.join("tokenizer_config.json"),
        json!({
            "add_prefix_space": false,
            "bos_token": tokens[id("tokenizer.ggml.bos_token_id")],
            "eos_token": tokens[id("tokenizer.ggml.eos_token_id")],
            "chat_template": src.get_str("tokenizer.chat_template").unwrap(),
            "model_max_length": 8192
        })
        .to_string(),
    )
    .unwrap();
}

fn gguf() -> Arc<GgufFile> {
    Arc::new(GgufFile::open(&common::model_path()).expect("open model"))
}

/// Largest logit difference relative to the largest reference logit, and the positions whose
/// argmax agrees.
fn compare(reference: &[Vec<f32>], got: &[Vec<f32>]) -> (f32, usize) {
    let scale = reference
        .iter()
        .flatten()
        .fold(0.0f32, |m, x| m.max(x.abs()));
    let worst = got
        .iter()
        .flatten()
        .zip(reference.iter().flatten())
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    let agree = got
        .iter()
        .zip(reference)
        .filter(|(a, b)| argmax(a) == argmax(b))
        .count();
    (worst / scale, agree)
}

fn chat(tk: &Tokenizer, q: &str) -> Vec<u32> {
    tk.encode(
        &tk.chat_template
            .render(&[ChatMessage {
                role: "user".into(),
                content: q.into(),
            }])
            .unwrap(),
    )
}

#[test]
fn f32_checkpoint_gives_the_gguf_logits_alone_and_split() {
    llmo_serve::set_compute_threads(1);
    let g = gguf();
    let dir = tempfile::tempdir().unwrap();
    convert(&g, dir.path(), Dtype::F32, 2);
    let hf = Arc::new(llmo_serve::model::open(dir.path()).expect("open checkpoint"));
    assert_eq!(hf.format, Format::HuggingFace);

    let (cg, ch) = (
        LlamaConfig::from_gguf(&g).unwrap(),
        LlamaConfig::from_gguf(&hf).unwrap(),
    );
    assert!(cg.rope_interleaved && !ch.rope_interleaved);
    assert_eq!(
        LlamaConfig {
            rope_interleaved: true,
            ..ch
        },
        cg
    );

    let (tg, th) = (
        Tokenizer::from_gguf(&g).unwrap(),
        Tokenizer::from_gguf(&hf).unwrap(),
    );
    let tokens = common::prompt_tokens(&tg);
    assert_eq!(common::prompt_tokens(&th), tokens);
    let q = "What is the capital of France? Answer in 12 words, with 3 facts.";
    assert_eq!(chat(&th, q), chat(&tg, q));
    assert_eq!(
        (th.bos, th.eos, &th.stop_tokens),
        (tg.bos, tg.eos, &tg.stop_tokens)
    );
    assert_eq!(th.decode(&tokens), tg.decode(&tokens));

    // f32 weights on both sides: only the RoPE layout (and so the order of products in each
    // head's dot products) differs.
    let reference = common::logits_of(
        &common::shard(&g, Quantization::F32, Layout::SINGLE, 0),
        &tokens,
    );
    let single = common::logits_of(
        &common::shard(&hf, Quantization::F32, Layout::SINGLE, 0),
        &tokens,
    );
    let (worst, agree) = compare(&reference, &single);
    let (p_ref, p_hf) = (
        perplexity_of(&reference, &tokens),
        perplexity_of(&single, &tokens),
    );
    eprintln!("checkpoint: largest logit difference {worst:.2e} of the largest logit; same argmax at {agree}/{}; perplexity {p_hf:.4} vs {p_ref:.4}", tokens.len());
    assert!(worst < 1e-4, "logits differ by {worst} of the largest");
    assert_eq!(agree, tokens.len());
    assert!((p_hf / p_ref - 1.0).abs() < 1e-6, "{p_hf} vs {p_ref}");

    // Split TP 3 × PP 2: the sharded loader reads Hugging Face heads the same way.
    let layout = Layout { tp: 3, pp: 2 };
    let mut leader = common::group(&hf, Quantization::F32, layout, tokens.len().div_ceil(16));
    let table: Vec<u32> = (0..tokens.len().div_ceil(16) as u32).collect();
    let split = leader
        .logits_all(StepInput {
            tokens: &tokens,
            start: 0,
            block_table: &table,
            want_logits: true,
        })
        .unwrap();
    let (worst, agree) = compare(&reference, &split);
    eprintln!(
        "checkpoint, TP 3 × PP 2: largest logit difference {worst:.2e}; same argmax at {agree}/{}",
        tokens.len()
    );
    assert!(
        worst < 1e-4,
        "split logits differ by {worst} of the largest"
    );
    assert_eq!(agree, tokens.len());
}

#[test]
fn bf16_checkpoint_serves_and_quantizes_on_load() {
    let g = gguf();
    let dir = tempfile::tempdir().unwrap();
    convert(&g, dir.path(), Dtype::Bf16, 1);
    drop(g);

    // Quality of each format on the fixed text, against the bf16 weights widened to f32, with the
    // bounds the GGUF formats are held to in quantization.rs.
    llmo_serve::set_compute_threads(1);
    let perplexity = |q: Quantization| {
        let m = llmo_serve::model::load(dir.path(), q, 1024, 1).unwrap();
        let tokens = common::prompt_tokens(&m.tokenizer);
        let p = perplexity_of(&common::logits_of(&m.model, &tokens), &tokens);
        (p, m.model.weight_bytes())
    };
    let (p_ref, bytes_ref) = perplexity(Quantization::F32);
    for (q, bound) in [(Quantization::Int8, 1.05), (Quantization::Int4, 1.05)] {
        let (p, bytes) = perplexity(q);
        eprintln!(
            "bf16 checkpoint as {q}: perplexity {p:.3} vs {p_ref:.3}, weights {:.2}x of f32",
            bytes as f64 / bytes_ref as f64
        );
        assert!(p < p_ref * bound, "{q}: perplexity {p} vs {p_ref}");
        assert!(bytes < bytes_ref / 2, "{q}: {bytes} bytes of weights");
    }

    let server = Server::start_model(dir.path(), &[]);
    let addr = server.base.trim_start_matches("http://");
    let v = common::chat(addr, "What is the capital of France?", 24);
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(text.contains("Paris"), "{text}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
}

/// A checkpoint of a tiny model, for the refusals.
fn tiny(dir: &Path, weights: &[Entry]) {
    std::fs::write(
        dir.join("config.json"),
        json!({"model_type": "llama", "hidden_size": 8, "intermediate_size": 16,
               "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
               "vocab_size": 4, "tie_word_embeddings": true, "eos_token_id": 0})
        .to_string(),
    )
    .unwrap();
    std::fs::write(
        dir.join("tokenizer.json"),
        json!({"normalizer": null, "pre_tokenizer": {"type": "ByteLevel"}, "added_tokens": [],
               "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "c": 2, "ab": 3}, "merges": ["a b"]}})
        .to_string(),
    )
    .unwrap();
    if !weights.is_empty() {
        write_safetensors(&dir.join("model.safetensors"), weights);
    }
}

fn f32s(name: &str, shape: &[usize]) -> Entry {
    let n: usize = shape.iter().product();
    (name.into(), "F32", shape.to_vec(), vec![0; n * 4])
}

fn tiny_weights() -> Vec<Entry> {
    let mut w = vec![
        f32s("model.embed_tokens.weight", &[4, 8]),
        f32s("model.norm.weight", &[8]),
    ];
    for (m, shape) in [
        ("input_layernorm", vec![8]),
        ("self_attn.q_proj", vec![8, 8]),
        ("self_attn.k_proj", vec![4, 8]),
        ("self_attn.v_proj", vec![4, 8]),
        ("self_attn.o_proj", vec![8, 8]),
        ("post_attention_layernorm", vec![8]),
        ("mlp.gate_proj", vec![16, 8]),
        ("mlp.up_proj", vec![16, 8]),
        ("mlp.down_proj", vec![8, 16]),
    ] {
        w.push(f32s(&format!("model.layers.0.{m}.weight"), &shape));
    }
    w
}

#[test]
fn broken_checkpoints_name_the_file_and_the_problem() {
    let load = |dir: &Path| {
        llmo_serve::model::load(dir, Quantization::Auto, 64, 1)
            .map(|_| ())
            .map_err(|e| e.to_string())
    };

    let dir = tempfile::tempdir().unwrap();
    tiny(dir.path(), &tiny_weights());
    load(dir.path()).expect("the complete tiny checkpoint loads");

    let dir = tempfile::tempdir().unwrap();
    tiny(dir.path(), &[]);
    let e = load(dir.path()).unwrap_err();
    assert!(e.contains("has no *.safetensors weights"), "{e}");

    let dir = tempfile::tempdir().unwrap();
    tiny(dir.path(), &tiny_weights());
    let file = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() - 100]).unwrap();
    let e = load(dir.path()).unwrap_err();
    assert!(
        e.contains("model.safetensors: is not a valid safetensors file") && e.contains("truncated"),
        "{e}"
    );

    let dir = tempfile::tempdir().unwrap();
    let mut w = tiny_weights();
    w.retain(|e| !e.0.contains("up_proj"));
    tiny(dir.path(), &w);
    let e = load(dir.path()).unwrap_err();
    assert!(
        e.contains(
            "weight `model.layers.0.mlp.up_proj.weight` is in none of the safetensors files"
        ),
        "{e}"
    );

    let dir = tempfile::tempdir().unwrap();
    let mut w = tiny_weights();
    w[2] = (
        "model.layers.0.input_layernorm.weight".into(),
        "F8_E4M3",
        vec![8],
        vec![0; 8],
    );
    tiny(dir.path(), &w);
    let e = load(dir.path()).unwrap_err();
    assert!(
        e.contains("`model.layers.0.input_layernorm.weight` is F8_E4M3"),
        "{e}"
    );

    let dir = tempfile::tempdir().unwrap();
    tiny(dir.path(), &tiny_weights());
    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    let e = load(dir.path()).unwrap_err();
    assert!(e.contains("has no tokenizer.json"), "{e}");

    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let e = rt
        .block_on(llmo_serve::model::resolve(
            dir.path().to_str().unwrap(),
            dir.path(),
        ))
        .unwrap_err()
        .to_string();
    assert!(e.contains("is a directory without config.json"), "{e}");
}
