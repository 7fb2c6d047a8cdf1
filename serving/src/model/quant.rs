//! Weight formats on load: keep what the file stores, widen to f32, or quantize.
//!
//! `int8` and `int4` run llmo's own kernels ([`super::int8`], [`super::int4`]): on CPUs with
//! AVX-512 VNNI they multiply about 3× faster than f32 at prefill batch sizes and up to 10× or
//! more at decode on the 135M SmolLM2 (`cargo run --release -p llmo-serve --example
//! int8_bench`), with perplexity within 1 % of f32's (`int4` takes a file's Q4_0/Q4_1 blocks as
//! they are). On AVX2 without VNNI both run AVX2 kernels; elsewhere a scalar loop. All three
//! compute the same numbers, bit for bit.
//! candle's quantized kernels (Q4_0, Q8_0, the k-quants; AVX2 dot products, tiled only when the
//! inner dimension is a multiple of 256) are slower than f32 at batch sizes above one on such
//! shapes, and they too round activations to 8 bits.
//!
//! Rounding activations to 8 bits is not free on a small model: SmolLM2-135M's greedy answer to
//! "What is the capital of France?" is "Paris" with f32 arithmetic, and "L'Étoile, …" both with
//! `int8` and with llama.cpp's own Q4_1 × Q8_1 kernels on the same file. Perplexity on the test
//! text stays within 1–2 % of f32's. So `auto` widens weights to f32, which reproduces the
//! file's outputs, when that costs at most [`AUTO_F32_LIMIT`] bytes, and `int8` is the choice
//! for speed. Above the limit `auto` keeps fast stored formats and re-quantizes slow ones (Q4_1,
//! Q5_x: scalar paths) to Q8_0, to keep the footprint of 4-bit files.

use std::str::FromStr;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Tensor};

use super::int4::{Int4Matrix, Q4Blocks};
use super::int8::Int8Matrix;
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
    /// 8-bit weights with one scale per output row, multiplied with 8-bit activations
    /// (see [`super::int8`]).
    Int8,
    /// 4-bit weights in blocks of 32 with an f16 scale and minimum (Q4_0 and Q4_1 files are
    /// taken as stored), multiplied with 8-bit activations (see [`super::int4`]).
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
    /// The format of the LM head (the output projection, or the embedding it is tied to):
    /// `int4` keeps it at 8 bits, as llama.cpp's 4-bit files keep it at 6 or 8. Measured on
    /// SmolLM2-135M, whose file stores it as Q8_0: perplexity 28.37 with a 4-bit head against
    /// 26.04 with an 8-bit one (f32: 26.11), for 17 MiB more.
    pub fn for_lm_head(self) -> Self {
        match self {
            Self::Int4 => Self::Int8,
            other => other,
        }
    }

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
        // Widened here, then packed by [`Linear::new`] for the W8A8 kernel.
        Quantization::Int8 => None,
        // 4-bit GGUF blocks are kept for [`Linear::new`] to take as they are; anything else is
        // widened here and quantized there.
        Quantization::Int4 => match stored {
            GgmlDType::Q4_0 | GgmlDType::Q4_1 => Some(stored),
            _ => None,
        },
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
    /// 8-bit weights for the W8A8 kernel.
    Int8(Int8Matrix),
    /// 4-bit weights for the W4A8 kernel.
    Int4(Int4Matrix),
}

impl Linear {
    /// Converts a loaded weight into its run form for `q`.
    pub fn from_weight(w: QTensor, q: Quantization) -> Result<Self, ModelError> {
        Self::new(to_matmul(w, q)?, q)
    }

    /// The run form of a weight from [`to_matmul`] for `q`.
    pub fn new(m: QMatMul, q: Quantization) -> Result<Self, ModelError> {
        Ok(match m {
            QMatMul::QTensor(t)
                if q == Quantization::Int4
                    && matches!(t.dtype(), GgmlDType::Q4_0 | GgmlDType::Q4_1) =>
            {
                let (n, k) = t.shape().dims2()?;
                let kind = if t.dtype() == GgmlDType::Q4_0 {
                    Q4Blocks::Q4_0
                } else {
                    Q4Blocks::Q4_1
                };
                let m = Int4Matrix::from_blocks(kind, &t.data()?, n, k).ok_or_else(|| {
                    ModelError::Unsupported(format!(
                        "a {n} × {k} {:?} weight does not have whole blocks",
                        t.dtype()
                    ))
                })?;
                Self::Int4(m)
            }
            QMatMul::Tensor(w) if q == Quantization::Int4 => {
                let (n, k, v) = f32_matrix(&w)?;
                Self::Int4(Int4Matrix::quantize(&v, n, k))
            }
            QMatMul::Tensor(w) if q == Quantization::Int8 => {
                let (n, k, v) = f32_matrix(&w)?;
                Self::Int8(Int8Matrix::quantize(&v, n, k))
            }
            QMatMul::Tensor(w) | QMatMul::TensorF16(w) => Self::Dense {
                wt: w.to_dtype(candle_core::DType::F32)?.t()?.contiguous()?,
            },
            q => Self::Quantized(q),
        })
    }

    /// `x · Wᵀ` for `m` rows of input (row-major); returns `m` rows of output.
    pub fn forward(&self, x: &[f32], m: usize) -> Result<Vec<f32>, ModelError> {
        let input = || Tensor::from_slice(x, (m, x.len() / m.max(1)), &Device::Cpu);
        let y = match self {
            Self::Int8(w) => return Ok(w.matmul(x, m)),
            Self::Int4(w) => return Ok(w.matmul(x, m)),
            Self::Quantized(q) => candle_core::Module::forward(q, &input()?)?,
            Self::Dense { wt } => input()?.matmul(wt)?,
        };
        Ok(y.flatten_all()?.to_vec1::<f32>()?)
    }

    /// Bytes the weight occupies.
    pub fn bytes(&self) -> usize {
        match self {
            Self::Quantized(m) => matmul_bytes(m),
            Self::Dense { wt } => wt.elem_count() * wt.dtype().size_in_bytes(),
            Self::Int8(w) => w.bytes(),
            Self::Int4(w) => w.bytes(),
        }
    }
}

/// A matrix's rows, columns and values as row-major f32, for the int8/int4 packers.
fn f32_matrix(w: &Tensor) -> Result<(usize, usize, Vec<f32>), ModelError> {
    let (n, k) = w.dims2()?;
    let v = w
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok((n, k, v))
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
