//! Weight formats on load: keep what the file stores, widen to f32, or quantize.
//!
//! On x86 CPUs candle has AVX2 dot products for Q4_0, Q8_0 and the k-quants, and tiled kernels
//! for Q4K/Q6K only when the inner dimension is a multiple of 256. Every quantized matmul also
//! rounds its input activations to 8 bits. Measured on the 135M SmolLM2 (hidden size 576, so no
//! tiled kernels): f32 weights decode as fast as Q8_0 at batch 1, 1.7× faster at batch 16, and
//! reproduce the unquantized reference outputs, while 8-bit activations change greedy answers.
//! So `auto` widens weights to f32 when that costs at most [`AUTO_F32_LIMIT`] bytes; above it,
//! it keeps fast stored formats and re-quantizes slow ones (Q4_1, Q5_x: scalar paths) to Q8_0.

use std::str::FromStr;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Tensor};

use super::ModelError;

/// Largest f32 weight footprint that `auto` accepts.
pub const AUTO_F32_LIMIT: usize = 2 << 30;

/// `--quantization`: the format the matmul weights are held in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantization {
    /// f32 for small models, else fast formats as stored and slow ones re-quantized to Q8_0.
    Auto,
    /// Exactly as the file stores them, whatever the speed.
    Stored,
    /// Widen to f32 (f16/bf16 are also widened on CPU, where candle has no f16 matmul kernel).
    F32,
    F16,
    Bf16,
    /// Q8_0: 8-bit blocks of 32 with one f16 scale.
    Int8,
    /// Q4_0: 4-bit blocks of 32 with one f16 scale.
    Int4,
    /// Q4K / Q6K where the row length is a multiple of 256, Q8_0 elsewhere.
    Q4K,
    Q6K,
}

impl FromStr for Quantization {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "auto" => Self::Auto,
            "stored" => Self::Stored,
            "f32" => Self::F32,
            "f16" | "fp16" => Self::F16,
            "bf16" => Self::Bf16,
            "int8" | "q8_0" | "fp8" => Self::Int8,
            "int4" | "q4_0" => Self::Int4,
            "q4k" | "q4_k" => Self::Q4K,
            "q6k" | "q6_k" => Self::Q6K,
            other => {
                return Err(format!(
                    "unknown quantization `{other}` (expected auto, stored, f32, f16, bf16, int8, int4, q4k, q6k)"
                ))
            }
        })
    }
}

impl std::fmt::Display for Quantization {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            Self::Auto => "auto",
            Self::Stored => "stored",
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
            Self::Int8 => "int8",
            Self::Int4 => "int4",
            Self::Q4K => "q4k",
            Self::Q6K => "q6k",
        };
        f.write_str(s)
    }
}

impl Quantization {
    /// What `auto` means for a model whose matmul weights take `f32_bytes` when widened.
    pub fn resolve(self, f32_bytes: usize) -> Self {
        match self {
            Self::Auto if f32_bytes <= AUTO_F32_LIMIT => Self::F32,
            other => other,
        }
    }
}

/// The ggml type a weight of row length `k` stored as `stored` ends up in, or `None` for f32.
pub fn target_dtype(q: Quantization, stored: GgmlDType, k: usize) -> Option<GgmlDType> {
    let kquant_ok = k.is_multiple_of(256);
    match q {
        Quantization::F32 | Quantization::F16 | Quantization::Bf16 => None,
        Quantization::Stored => match stored {
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => None,
            other => Some(other),
        },
        Quantization::Int8 => Some(GgmlDType::Q8_0),
        Quantization::Int4 => Some(GgmlDType::Q4_0),
        Quantization::Q4K if kquant_ok => Some(GgmlDType::Q4K),
        Quantization::Q6K if kquant_ok => Some(GgmlDType::Q6K),
        Quantization::Q4K | Quantization::Q6K => Some(GgmlDType::Q8_0),
        Quantization::Auto => match stored {
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => None,
            GgmlDType::Q4_0 | GgmlDType::Q8_0 | GgmlDType::Q4K | GgmlDType::Q6K => Some(stored),
            GgmlDType::Q2K | GgmlDType::Q3K | GgmlDType::Q5K if kquant_ok => Some(stored),
            _ => Some(GgmlDType::Q8_0),
        },
    }
}

/// A projection `x · Wᵀ`, quantized or dense.
#[derive(Debug)]
pub enum Linear {
    Quantized(QMatMul),
    /// f32 weights stored transposed, `(in, out)` and contiguous: the dense matmul then reads
    /// them row-major, which measured markedly faster than multiplying by a transposed view.
    Dense {
        wt: Tensor,
    },
}

impl Linear {
    pub fn new(m: QMatMul) -> Result<Self, ModelError> {
        Ok(match m {
            QMatMul::Tensor(w) | QMatMul::TensorF16(w) => Self::Dense {
                wt: w.to_dtype(candle_core::DType::F32)?.t()?.contiguous()?,
            },
            q => Self::Quantized(q),
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor, ModelError> {
        Ok(match self {
            Self::Quantized(q) => candle_core::Module::forward(q, x)?,
            Self::Dense { wt } => x.matmul(wt)?,
        })
    }

    /// Bytes the weight occupies.
    pub fn bytes(&self) -> usize {
        match self {
            Self::Quantized(m) => matmul_bytes(m),
            Self::Dense { wt } => wt.elem_count() * wt.dtype().size_in_bytes(),
        }
    }
}

/// Converts a loaded weight into the matmul form for `q`.
pub fn to_matmul(w: QTensor, q: Quantization) -> Result<QMatMul, ModelError> {
    let k = *w.shape().dims().last().unwrap_or(&0);
    let qm = match target_dtype(q, w.dtype(), k) {
        None => QMatMul::Tensor(w.dequantize(&Device::Cpu)?),
        Some(dt) if dt == w.dtype() => QMatMul::from_qtensor(w)?,
        Some(dt) => {
            let f = w.dequantize(&Device::Cpu)?;
            QMatMul::from_qtensor(QTensor::quantize(&f, dt)?)?
        }
    };
    Ok(qm)
}

/// Bytes a matmul weight occupies.
pub fn matmul_bytes(m: &QMatMul) -> usize {
    match m {
        QMatMul::QTensor(t) => t.storage_size_in_bytes(),
        QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.elem_count() * t.dtype().size_in_bytes(),
    }
}

/// Dequantizes `w` to f32 (used for norms and the embedding table).
pub fn to_f32(w: &QTensor) -> Result<Tensor, ModelError> {
    Ok(w.dequantize(&Device::Cpu)?)
}
