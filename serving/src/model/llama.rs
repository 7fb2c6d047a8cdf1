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
use std::ops::Range;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{Device, Tensor};

use super::attention::{paged_attention, HeadShape, RopeTable, RowContext};
use super::config::LlamaConfig;
use super::gguf::{GgufFile, TensorInfo};
use super::quant::{target_dtype, to_f32, to_matmul, Linear, Quantization};
use super::shard::Shard;
use super::ModelError;
use crate::dist::Communicator;
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
    attn_norm: Vec<f32>,
    qkv: Linear,
    qkv_bias: Option<Vec<f32>>,
    o: Linear,
    ffn_norm: Vec<f32>,
    gate_up: Linear,
    down: Linear,
}

/// A loaded model (or one rank's shard of it), ready to run steps.
#[derive(Debug)]
pub struct LlamaModel {
    pub config: LlamaConfig,
    /// What this rank holds.
    pub shard: Shard,
    /// Embedding rows of this rank's vocabulary slice, f32, row-major (first stage only).
    embed: Vec<f32>,
    /// Vocabulary slice of the embedding and the LM head.
    vocab_part: Range<usize>,
    layers: Vec<Layer>,
    /// Final norm and LM head (last stage only).
    norm: Option<Vec<f32>>,
    lm_head: Option<Linear>,
    rope: RopeTable,
    threads: usize,
    /// This model's compute threads. A step runs inside the pool, so its many parallel
    /// matmuls and attention calls hand work to threads already awake in it instead of
    /// waking a pool from outside for each call (measured: a third of a decode step's time
    /// went to those wake-ups). Each rank of an in-process group has its own pool, so ranks
    /// that wait for one another never wait for the same threads.
    pool: rayon::ThreadPool,
    weight_bytes: usize,
    /// Attention heads, KV heads and MLP width on this rank.
    n_heads: usize,
    n_kv_heads: usize,
    ffn: usize,
    /// The stage's tensor-parallel group, when it has more than one rank.
    tp_group: Option<(Arc<dyn Communicator>, Vec<usize>)>,
    /// The weight format in use (`auto` resolved).
    pub quantization: Quantization,
}

/// What a step of one stage takes in and gives out.
#[derive(Debug)]
pub enum StageOutput {
    /// Hidden states of every row (`rows × hidden`), for the next stage.
    Hidden(Vec<f32>),
    /// Next-token logits of the rows that asked for them, in input order.
    Logits(Vec<Vec<f32>>),
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
    let dt = dtype_of(g, info)?;
    let storage = QStorage::from_data(Cow::Borrowed(g.tensor_bytes(info)), &Device::Cpu, dt)?;
    Ok(QTensor::new(storage, info.shape.as_slice())?)
}

fn dtype_of(g: &GgufFile, info: &TensorInfo) -> Result<GgmlDType, ModelError> {
    ggml_dtype(info.ggml_type).ok_or_else(|| {
        ModelError::Unsupported(format!(
            "{}: tensor `{}` has ggml type {} which this build cannot run",
            g.path.display(),
            info.name,
            info.ggml_type
        ))
    })
}

fn load(g: &GgufFile, name: &str) -> Result<QTensor, ModelError> {
    qtensor(g, g.tensor(name)?)
}

fn matrix_dims(g: &GgufFile, info: &TensorInfo) -> Result<(usize, usize), ModelError> {
    match info.shape.as_slice() {
        [rows, cols] => Ok((*rows, *cols)),
        other => Err(ModelError::Unsupported(format!(
            "{}: tensor `{}` has shape {other:?}, expected a matrix",
            g.path.display(),
            info.name
        ))),
    }
}

/// Rows `rows` (output features) of a weight matrix, read from the file's bytes for those rows
/// only: a quantized row is a whole number of blocks, so the slice is contiguous.
fn load_rows(g: &GgufFile, name: &str, rows: Range<usize>) -> Result<QTensor, ModelError> {
    let info = g.tensor(name)?;
    let (n, k) = matrix_dims(g, info)?;
    if rows == (0..n) {
        return qtensor(g, info);
    }
    let dt = dtype_of(g, info)?;
    let row_bytes = k / dt.block_size() * dt.type_size();
    let bytes = &g.tensor_bytes(info)[rows.start * row_bytes..rows.end * row_bytes];
    let storage = QStorage::from_data(Cow::Borrowed(bytes), &Device::Cpu, dt)?;
    Ok(QTensor::new(storage, (rows.len(), k))?)
}

/// Columns `cols` (input features) of a weight matrix. When the range falls on quantization
/// block boundaries each row's blocks are copied as they are; otherwise the matrix is widened
/// to f32 one row at a time and the slice kept in f32.
fn load_cols(g: &GgufFile, name: &str, cols: Range<usize>) -> Result<QTensor, ModelError> {
    let info = g.tensor(name)?;
    let (n, k) = matrix_dims(g, info)?;
    if cols == (0..k) {
        return qtensor(g, info);
    }
    let dt = dtype_of(g, info)?;
    let (bs, ts) = (dt.block_size(), dt.type_size());
    let row_bytes = k / bs * ts;
    let all = g.tensor_bytes(info);
    if cols.start.is_multiple_of(bs) && cols.end.is_multiple_of(bs) {
        let (b0, b1) = (cols.start / bs * ts, cols.end / bs * ts);
        let mut bytes = Vec::with_capacity(n * (b1 - b0));
        for r in 0..n {
            bytes.extend_from_slice(&all[r * row_bytes + b0..r * row_bytes + b1]);
        }
        let storage = QStorage::from_data(Cow::Owned(bytes), &Device::Cpu, dt)?;
        return Ok(QTensor::new(storage, (n, cols.len()))?);
    }
    let mut out = Vec::with_capacity(n * cols.len());
    for r in 0..n {
        let row = &all[r * row_bytes..(r + 1) * row_bytes];
        let storage = QStorage::from_data(Cow::Borrowed(row), &Device::Cpu, dt)?;
        let v = QTensor::new(storage, (1, k))?
            .dequantize(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        out.extend_from_slice(&v[cols.clone()]);
    }
    let t = Tensor::from_vec(out, (n, cols.len()), &Device::Cpu)?;
    Ok(QTensor::quantize(&t, GgmlDType::F32)?)
}

/// Elements `part` of a vector (norm weights, biases) as f32.
fn load_vec(g: &GgufFile, name: &str, part: Range<usize>) -> Result<Vec<f32>, ModelError> {
    let v = to_f32(&load(g, name)?)?.flatten_all()?.to_vec1::<f32>()?;
    v.get(part.clone()).map(<[f32]>::to_vec).ok_or_else(|| {
        ModelError::Unsupported(format!(
            "{}: tensor `{name}` has {} elements, fewer than {}",
            g.path.display(),
            v.len(),
            part.end
        ))
    })
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

fn bias(g: &GgufFile, parts: &[(String, Range<usize>)]) -> Result<Option<Vec<f32>>, ModelError> {
    if !parts.iter().all(|(n, _)| g.has_tensor(n)) {
        return Ok(None);
    }
    let mut out = Vec::new();
    for (n, part) in parts {
        out.extend(load_vec(g, n, part.clone())?);
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
        let n_layers = LlamaConfig::from_gguf(g)?.n_layers;
        Self::shard_from_gguf(g, q, max_positions, threads, Shard::whole(n_layers))
    }

    /// Builds one rank's shard of the model, reading only the bytes of its weights from the
    /// (memory-mapped) file. The shard's layout must have passed
    /// [`super::shard::Layout::check`].
    pub fn shard_from_gguf(
        g: &GgufFile,
        q: Quantization,
        max_positions: usize,
        threads: usize,
        shard: Shard,
    ) -> Result<Self, ModelError> {
        let cfg = LlamaConfig::from_gguf(g)?;
        // The format is chosen from the whole model's size, so every rank chooses the same.
        let f32_bytes: usize = g
            .tensors
            .iter()
            .filter(|t| t.shape.len() == 2)
            .map(|t| t.shape.iter().product::<usize>() * 4)
            .sum();
        let q = q.resolve(f32_bytes);
        let hd = cfg.head_dim;
        let heads = shard.part(cfg.n_heads);
        let kv_heads = shard.part(cfg.n_kv_heads);
        let ffn = shard.part(cfg.ffn);
        let vocab_part = shard.part(cfg.vocab);
        let q_rows = heads.start * hd..heads.end * hd;
        let kv_rows = kv_heads.start * hd..kv_heads.end * hd;

        let embed = if shard.first {
            to_f32(&load_rows(g, "token_embd.weight", vocab_part.clone())?)?
                .flatten_all()?
                .to_vec1::<f32>()?
        } else {
            Vec::new()
        };
        let (norm, lm_head) = if shard.last {
            let head_name = if g.has_tensor("output.weight") {
                "output.weight"
            } else {
                "token_embd.weight"
            };
            let head = load_rows(g, head_name, vocab_part.clone())?;
            (
                Some(load_vec(g, "output_norm.weight", 0..cfg.hidden)?),
                Some(Linear::from_weight(head, q.for_lm_head())?),
            )
        } else {
            (None, None)
        };
        let mut layers = Vec::with_capacity(shard.layers.len());
        for i in shard.layers.clone() {
            let n = |s: &str| format!("blk.{i}.{s}");
            let qkv = Linear::new(
                fuse(
                    vec![
                        load_rows(g, &n("attn_q.weight"), q_rows.clone())?,
                        load_rows(g, &n("attn_k.weight"), kv_rows.clone())?,
                        load_rows(g, &n("attn_v.weight"), kv_rows.clone())?,
                    ],
                    q,
                )?,
                q,
            )?;
            let gate_up = Linear::new(
                fuse(
                    vec![
                        load_rows(g, &n("ffn_gate.weight"), ffn.clone())?,
                        load_rows(g, &n("ffn_up.weight"), ffn.clone())?,
                    ],
                    q,
                )?,
                q,
            )?;
            layers.push(Layer {
                attn_norm: load_vec(g, &n("attn_norm.weight"), 0..cfg.hidden)?,
                qkv,
                qkv_bias: bias(
                    g,
                    &[
                        (n("attn_q.bias"), q_rows.clone()),
                        (n("attn_k.bias"), kv_rows.clone()),
                        (n("attn_v.bias"), kv_rows.clone()),
                    ],
                )?,
                o: Linear::from_weight(load_cols(g, &n("attn_output.weight"), q_rows.clone())?, q)?,
                ffn_norm: load_vec(g, &n("ffn_norm.weight"), 0..cfg.hidden)?,
                gate_up,
                down: Linear::from_weight(load_cols(g, &n("ffn_down.weight"), ffn.clone())?, q)?,
            });
        }
        let weight_bytes = layers
            .iter()
            .map(|l| l.qkv.bytes() + l.o.bytes() + l.gate_up.bytes() + l.down.bytes())
            .sum::<usize>()
            + lm_head.as_ref().map_or(0, Linear::bytes)
            + embed.len() * 4;
        let rope = RopeTable::new(
            cfg.head_dim,
            cfg.rope_theta,
            max_positions.min(cfg.context_length).max(1),
            cfg.rope_interleaved,
        );
        tracing::debug!(quantization = %q, ?shard, "weight format chosen");
        Ok(Self {
            quantization: q,
            embed,
            vocab_part,
            layers,
            norm,
            lm_head,
            rope,
            threads: threads.max(1),
            pool: rayon::ThreadPoolBuilder::new()
                .num_threads(threads.max(1))
                .thread_name(|i| format!("llmo-compute-{i}"))
                .build()
                .map_err(|e| {
                    ModelError::Unsupported(format!("cannot start compute threads: {e}"))
                })?,
            weight_bytes,
            n_heads: heads.len(),
            n_kv_heads: kv_heads.len(),
            ffn: ffn.len(),
            tp_group: None,
            shard,
            config: cfg,
        })
    }

    /// Connects a tensor-parallel shard to the other ranks of its stage (`group`: their global
    /// ranks in tensor-rank order). Required before stepping when the stage has several ranks.
    pub fn set_tensor_group(&mut self, comm: Arc<dyn Communicator>, group: Vec<usize>) {
        self.tp_group = Some((comm, group));
    }

    /// Elements of one token's K (or V) in one layer on this rank: its KV heads × head size.
    pub fn kv_slot_stride(&self) -> usize {
        self.n_kv_heads * self.config.head_dim
    }

    /// Layers this rank runs (and keeps a KV cache for).
    pub fn local_layers(&self) -> usize {
        self.layers.len()
    }

    /// Bytes held by weights (matmul weights in their run format plus the f32 embedding table).
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    /// Largest position the model was prepared for.
    pub fn max_positions(&self) -> usize {
        self.rope.max_positions()
    }

    /// Runs one step of the whole model. Returns one logits vector per input with
    /// `want_logits`, in input order.
    pub fn step(
        &self,
        inputs: &[StepInput<'_>],
        kv: &mut KvStorage,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        self.whole(self.forward(inputs, kv, false, None)?)
    }

    /// Runs one sequence's tokens and returns the next-token logits after every one of them
    /// (for perplexity).
    pub fn logits_all(
        &self,
        input: StepInput<'_>,
        kv: &mut KvStorage,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        self.whole(self.forward(&[input], kv, true, None)?)
    }

    fn whole(&self, out: StageOutput) -> Result<Vec<Vec<f32>>, ModelError> {
        match out {
            StageOutput::Logits(l) => Ok(l),
            StageOutput::Hidden(_) => Err(ModelError::Unsupported(
                "this rank holds only a pipeline stage; run it through its group".into(),
            )),
        }
    }

    /// Runs this rank's stage for one step. The first stage embeds the tokens; later stages take
    /// the previous stage's hidden states in `hidden`. The last stage returns logits (of every
    /// row when `every_row`), the others the hidden states to pass on. Every rank of a
    /// tensor-parallel stage must run the same inputs at the same time.
    pub fn forward(
        &self,
        inputs: &[StepInput<'_>],
        kv: &mut KvStorage,
        every_row: bool,
        hidden: Option<Vec<f32>>,
    ) -> Result<StageOutput, ModelError> {
        self.pool
            .install(|| self.run_stage(inputs, kv, every_row, hidden))
    }

    fn run_stage(
        &self,
        inputs: &[StepInput<'_>],
        kv: &mut KvStorage,
        every_row: bool,
        hidden: Option<Vec<f32>>,
    ) -> Result<StageOutput, ModelError> {
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
            return Ok(if self.shard.last {
                StageOutput::Logits(Vec::new())
            } else {
                StageOutput::Hidden(Vec::new())
            });
        }
        let shape = HeadShape {
            n_heads: self.n_heads,
            n_kv_heads: self.n_kv_heads,
            head_dim: cfg.head_dim,
        };
        let q_width = self.n_heads * cfg.head_dim;
        let kv_width = self.n_kv_heads * cfg.head_dim;
        let qkv_width = q_width + 2 * kv_width;
        let eps = cfg.rms_eps as f32;

        let mut x = match hidden {
            Some(h) if h.len() == n * cfg.hidden => h,
            Some(h) => {
                return Err(ModelError::Unsupported(format!(
                    "the previous stage sent {} values for {n} rows of {}",
                    h.len(),
                    cfg.hidden
                )))
            }
            None if self.shard.first => self.embed(&ids)?,
            None => {
                return Err(ModelError::Unsupported(
                    "a later pipeline stage needs the previous stage's hidden states".into(),
                ))
            }
        };
        for (li, layer) in self.layers.iter().enumerate() {
            let h = rms_norm(&x, &layer.attn_norm, eps);
            let mut qkv = layer.qkv.forward(&h, n)?;
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
            add_to(&mut x, &self.reduce(layer.o.forward(&attn, n)?)?);
            let h = rms_norm(&x, &layer.ffn_norm, eps);
            let act = swiglu(&layer.gate_up.forward(&h, n)?, self.ffn);
            add_to(&mut x, &self.reduce(layer.down.forward(&act, n)?)?);
        }
        let (Some(norm), Some(lm_head)) = (&self.norm, &self.lm_head) else {
            return Ok(StageOutput::Hidden(x));
        };
        if logit_rows.is_empty() {
            return Ok(StageOutput::Logits(Vec::new()));
        }
        let m = logit_rows.len();
        let mut last = Vec::with_capacity(m * cfg.hidden);
        for &r in &logit_rows {
            let r = r as usize;
            last.extend_from_slice(&x[r * cfg.hidden..(r + 1) * cfg.hidden]);
        }
        let logits = lm_head.forward(&rms_norm(&last, norm, eps), m)?;
        let Some((comm, group)) = self.tensor_group() else {
            let width = logits.len() / m;
            return Ok(StageOutput::Logits(
                logits.chunks_exact(width).map(<[f32]>::to_vec).collect(),
            ));
        };
        // Each rank scored its slice of the vocabulary: gather the slices and lay them side by
        // side for every row.
        let gathered = comm.all_gather(group, &logits)?;
        let mut out = vec![Vec::with_capacity(cfg.vocab); m];
        let mut offset = 0;
        for t in 0..self.shard.tp {
            let width = super::shard::split(cfg.vocab, self.shard.tp, t).len();
            for row in out.iter_mut() {
                row.extend_from_slice(&gathered[offset..offset + width]);
                offset += width;
            }
        }
        Ok(StageOutput::Logits(out))
    }

    fn tensor_group(&self) -> Option<(&dyn Communicator, &[usize])> {
        self.tp_group
            .as_ref()
            .filter(|(_, g)| g.len() > 1)
            .map(|(c, g)| (c.as_ref(), g.as_slice()))
    }

    /// Embedding rows of `ids`; with tensor parallelism each rank fills the rows of its
    /// vocabulary slice and the all-reduce completes the others.
    fn embed(&self, ids: &[u32]) -> Result<Vec<f32>, ModelError> {
        let hidden = self.config.hidden;
        let mut x = vec![0.0f32; ids.len() * hidden];
        for (row, &id) in x.chunks_mut(hidden).zip(ids) {
            let id = id as usize;
            if self.vocab_part.contains(&id) {
                let r = id - self.vocab_part.start;
                row.copy_from_slice(&self.embed[r * hidden..(r + 1) * hidden]);
            }
        }
        if let Some((comm, group)) = self.tensor_group() {
            comm.all_reduce_sum(group, &mut x)?;
        }
        Ok(x)
    }

    /// Sums a row-parallel projection's partial results over the stage's tensor ranks.
    fn reduce(&self, mut partial: Vec<f32>) -> Result<Vec<f32>, ModelError> {
        if let Some((comm, group)) = self.tensor_group() {
            comm.all_reduce_sum(group, &mut partial)?;
        }
        Ok(partial)
    }
}

/// RMSNorm of each row of `x` (rows of `w.len()` values), times `w`.
fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    for (o, r) in out.chunks_exact_mut(w.len()).zip(x.chunks_exact(w.len())) {
        let ms = r.iter().map(|v| v * v).sum::<f32>() / w.len() as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for ((o, &v), &w) in o.iter_mut().zip(r).zip(w) {
            *o = v * inv * w;
        }
    }
    out
}

/// SiLU(gate) · up for rows laid out as `[gate (ffn) | up (ffn)]`.
fn swiglu(gu: &[f32], ffn: usize) -> Vec<f32> {
    let mut out = vec![0f32; gu.len() / 2];
    let row = |(o, r): (&mut [f32], &[f32])| {
        let (gate, up) = r.split_at(ffn);
        for ((o, &g), &u) in o.iter_mut().zip(gate).zip(up) {
            *o = g / (1.0 + (-g).exp()) * u;
        }
    };
    if out.len() >= 1 << 14 {
        use rayon::prelude::*;
        out.par_chunks_mut(ffn)
            .zip(gu.par_chunks(2 * ffn))
            .for_each(row);
    } else {
        out.chunks_mut(ffn).zip(gu.chunks(2 * ffn)).for_each(row);
    }
    out
}

/// `x += y`, elementwise.
fn add_to(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}
