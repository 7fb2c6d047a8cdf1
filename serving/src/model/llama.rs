//! Llama-family decoder (Llama, SmolLM, Mistral, Qwen2) with a batched, paged forward pass.
//!
//! Architecture: token embedding → N × [RMSNorm → attention (GQA, RoPE) → residual → RMSNorm →
//! SwiGLU MLP → residual] → RMSNorm → LM head (tied to the embedding when the file has no
//! `output.weight`). Q/K/V and gate/up projections are fused into one matmul each.
//!
//! One call runs a single step over many sequences at once: each contributes a run of tokens
//! (a prefill chunk or one decode token) at its own position, and reads/writes K/V through its
//! own block table. Matmuls see all rows of the step together; attention is per row.
//!
//! References: llama.cpp `llama-model.cpp` (GGUF names, Q/K row permutation), Hugging Face
//! `modeling_llama.py` / `modeling_qwen2.py`.

use std::borrow::Cow;

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{Device, Tensor};

use super::attention::{paged_attention, HeadShape, RopeTable, RowContext};
use super::config::LlamaConfig;
use super::gguf::{GgufFile, TensorInfo};
use super::quant::{target_dtype, to_f32, to_matmul, Linear, Quantization};
use super::ModelError;
use crate::kv::KvStorage;

/// One sequence's share of a step.
#[derive(Debug, Clone, Copy)]
pub struct StepInput<'a> {
    /// Tokens to run, at positions `start..start + tokens.len()`.
    pub tokens: &'a [u32],
    pub start: usize,
    /// Physical blocks of the sequence, covering at least `start + tokens.len()` positions.
    pub block_table: &'a [u32],
    /// Whether to compute next-token logits after the last token.
    pub want_logits: bool,
}

#[derive(Debug)]
struct Layer {
    attn_norm: Tensor,
    qkv: Linear,
    qkv_bias: Option<Vec<f32>>,
    o: Linear,
    ffn_norm: Tensor,
    gate_up: Linear,
    down: Linear,
}

/// A loaded model, ready to run steps.
#[derive(Debug)]
pub struct LlamaModel {
    pub config: LlamaConfig,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Linear,
    rope: RopeTable,
    threads: usize,
    weight_bytes: usize,
    /// The weight format in use (`auto` resolved).
    pub quantization: Quantization,
}

fn ggml_dtype(t: u32) -> Option<GgmlDType> {
    Some(match t {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        30 => GgmlDType::BF16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        _ => return None,
    })
}

fn qtensor(g: &GgufFile, info: &TensorInfo) -> Result<QTensor, ModelError> {
    let dt = ggml_dtype(info.ggml_type).ok_or_else(|| {
        ModelError::Unsupported(format!(
            "{}: tensor `{}` has ggml type {} which this build cannot run",
            g.path.display(),
            info.name,
            info.ggml_type
        ))
    })?;
    let storage = QStorage::from_data(Cow::Borrowed(g.tensor_bytes(info)), &Device::Cpu, dt)?;
    Ok(QTensor::new(storage, info.shape.as_slice())?)
}

fn load(g: &GgufFile, name: &str) -> Result<QTensor, ModelError> {
    qtensor(g, g.tensor(name)?)
}

/// Stacks weights along the output dimension into one matmul.
fn fuse(parts: Vec<QTensor>, q: Quantization) -> Result<QMatMul, ModelError> {
    let first = parts[0].dtype();
    let k = parts[0].shape().dims()[1];
    if parts.len() == 1 {
        return to_matmul(parts.into_iter().next().expect("one part"), q);
    }
    let rows: usize = parts.iter().map(|p| p.shape().dims()[0]).sum();
    let same = parts.iter().all(|p| p.dtype() == first);
    let target = target_dtype(q, first, k);
    if same && target == Some(first) {
        // Rows are whole blocks, so stacking along the output dimension is byte concatenation.
        let mut bytes = Vec::new();
        for p in &parts {
            bytes.extend_from_slice(&p.data()?);
        }
        let storage = QStorage::from_data(Cow::Owned(bytes), &Device::Cpu, first)?;
        return Ok(QMatMul::from_qtensor(QTensor::new(storage, (rows, k))?)?);
    }
    let f = Tensor::cat(
        &parts
            .iter()
            .map(|p| p.dequantize(&Device::Cpu))
            .collect::<Result<Vec<_>, _>>()?,
        0,
    )?;
    Ok(match target {
        None => QMatMul::Tensor(f),
        Some(dt) => QMatMul::from_qtensor(QTensor::quantize(&f, dt)?)?,
    })
}

fn bias(g: &GgufFile, names: &[String]) -> Result<Option<Vec<f32>>, ModelError> {
    if !names.iter().all(|n| g.has_tensor(n)) {
        return Ok(None);
    }
    let mut out = Vec::new();
    for n in names {
        out.extend(to_f32(&load(g, n)?)?.flatten_all()?.to_vec1::<f32>()?);
    }
    Ok(Some(out))
}

impl LlamaModel {
    /// Builds the model from a GGUF file. `max_positions` bounds the RoPE table; `threads` is
    /// used for attention (matmul threads are candle's, set through its environment).
    pub fn from_gguf(
        g: &GgufFile,
        q: Quantization,
        max_positions: usize,
        threads: usize,
    ) -> Result<Self, ModelError> {
        let cfg = LlamaConfig::from_gguf(g)?;
        let f32_bytes: usize = g
            .tensors
            .iter()
            .filter(|t| t.shape.len() == 2)
            .map(|t| t.shape.iter().product::<usize>() * 4)
            .sum();
        let q = q.resolve(f32_bytes);
        let embed_q = load(g, "token_embd.weight")?;
        let embed = to_f32(&embed_q)?;
        let lm_head = Linear::new(if g.has_tensor("output.weight") {
            to_matmul(load(g, "output.weight")?, q)?
        } else {
            to_matmul(embed_q, q)?
        })?;
        let norm = to_f32(&load(g, "output_norm.weight")?)?;
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let n = |s: &str| format!("blk.{i}.{s}");
            let qkv_names = [n("attn_q.weight"), n("attn_k.weight"), n("attn_v.weight")];
            let qkv = Linear::new(fuse(
                qkv_names
                    .iter()
                    .map(|x| load(g, x))
                    .collect::<Result<_, _>>()?,
                q,
            )?)?;
            let gate_up = Linear::new(fuse(
                vec![
                    load(g, &n("ffn_gate.weight"))?,
                    load(g, &n("ffn_up.weight"))?,
                ],
                q,
            )?)?;
            layers.push(Layer {
                attn_norm: to_f32(&load(g, &n("attn_norm.weight"))?)?,
                qkv,
                qkv_bias: bias(g, &[n("attn_q.bias"), n("attn_k.bias"), n("attn_v.bias")])?,
                o: Linear::new(to_matmul(load(g, &n("attn_output.weight"))?, q)?)?,
                ffn_norm: to_f32(&load(g, &n("ffn_norm.weight"))?)?,
                gate_up,
                down: Linear::new(to_matmul(load(g, &n("ffn_down.weight"))?, q)?)?,
            });
        }
        let weight_bytes = layers
            .iter()
            .map(|l| l.qkv.bytes() + l.o.bytes() + l.gate_up.bytes() + l.down.bytes())
            .sum::<usize>()
            + lm_head.bytes()
            + embed.elem_count() * 4;
        let rope = RopeTable::new(
            cfg.head_dim,
            cfg.rope_theta,
            max_positions.min(cfg.context_length).max(1),
            cfg.rope_interleaved,
        );
        tracing::debug!(quantization = %q, "weight format chosen");
        Ok(Self {
            config: cfg,
            quantization: q,
            embed,
            layers,
            norm,
            lm_head,
            rope,
            threads: threads.max(1),
            weight_bytes,
        })
    }

    /// Bytes held by weights (matmul weights in their run format plus the f32 embedding table).
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    /// Largest position the model was prepared for.
    pub fn max_positions(&self) -> usize {
        self.rope.max_positions()
    }

    /// Runs one step. Returns one logits vector per input with `want_logits`, in input order.
    pub fn step(
        &self,
        inputs: &[StepInput<'_>],
        kv: &mut KvStorage,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        self.forward(inputs, kv, false)
    }

    /// Runs one sequence's tokens and returns the next-token logits after every one of them
    /// (for perplexity).
    pub fn logits_all(
        &self,
        input: StepInput<'_>,
        kv: &mut KvStorage,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        self.forward(&[input], kv, true)
    }

    fn forward(
        &self,
        inputs: &[StepInput<'_>],
        kv: &mut KvStorage,
        every_row: bool,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let cfg = &self.config;
        let mut ids = Vec::new();
        let mut rows = Vec::new();
        let mut slots = Vec::new();
        let mut logit_rows = Vec::new();
        for inp in inputs {
            for (i, &t) in inp.tokens.iter().enumerate() {
                let pos = inp.start + i;
                if pos >= self.rope.max_positions() {
                    return Err(ModelError::Unsupported(format!(
                        "position {pos} is beyond the context length {}",
                        self.rope.max_positions()
                    )));
                }
                if t as usize >= cfg.vocab {
                    return Err(ModelError::Unsupported(format!(
                        "token id {t} is outside the vocabulary of {}",
                        cfg.vocab
                    )));
                }
                ids.push(t);
                let bs = kv.block_size;
                slots.push(inp.block_table[pos / bs] as usize * bs + pos % bs);
                rows.push(RowContext {
                    pos,
                    block_table: inp.block_table,
                });
                if every_row {
                    logit_rows.push((ids.len() - 1) as u32);
                }
            }
            if !every_row && inp.want_logits && !inp.tokens.is_empty() {
                logit_rows.push((ids.len() - 1) as u32);
            }
        }
        let n = ids.len();
        if n == 0 {
            return Ok(Vec::new());
        }
        let shape = HeadShape {
            n_heads: cfg.n_heads,
            n_kv_heads: cfg.n_kv_heads,
            head_dim: cfg.head_dim,
        };
        let q_width = cfg.n_heads * cfg.head_dim;
        let kv_width = cfg.n_kv_heads * cfg.head_dim;
        let qkv_width = q_width + 2 * kv_width;
        let eps = cfg.rms_eps as f32;

        let ids_t = Tensor::from_vec(ids, n, &Device::Cpu)?;
        let mut x = self.embed.index_select(&ids_t, 0)?;
        for (li, layer) in self.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, eps)?;
            let mut qkv = layer.qkv.forward(&h)?.flatten_all()?.to_vec1::<f32>()?;
            let mut q = Vec::with_capacity(n * q_width);
            for (r, row) in qkv.chunks_mut(qkv_width).enumerate() {
                if let Some(b) = &layer.qkv_bias {
                    for (x, b) in row.iter_mut().zip(b) {
                        *x += b;
                    }
                }
                let pos = rows[r].pos;
                for head in row[..q_width + kv_width].chunks_mut(cfg.head_dim) {
                    self.rope.apply(head, pos);
                }
                q.extend_from_slice(&row[..q_width]);
                let (k, v) = row[q_width..].split_at(kv_width);
                kv.write(li, slots[r], k, v);
            }
            let attn = paged_attention(&q, &rows, kv, li, shape, self.threads);
            let attn = Tensor::from_vec(attn, (n, q_width), &Device::Cpu)?;
            x = (x + layer.o.forward(&attn)?)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, eps)?;
            let gu = layer.gate_up.forward(&h)?;
            let gate = gu.narrow(1, 0, cfg.ffn)?;
            let up = gu.narrow(1, cfg.ffn, cfg.ffn)?;
            let act = (candle_nn::ops::silu(&gate)? * up)?;
            x = (x + layer.down.forward(&act)?)?;
        }
        if logit_rows.is_empty() {
            return Ok(Vec::new());
        }
        let idx = Tensor::from_vec(logit_rows.clone(), logit_rows.len(), &Device::Cpu)?;
        let last = x.index_select(&idx, 0)?;
        let last = candle_nn::ops::rms_norm(&last, &self.norm, eps)?;
        let logits = self.lm_head.forward(&last)?;
        Ok(logits.to_vec2::<f32>()?)
    }
}
