//! 4-bit weights × 8-bit activations (W4A8) matmul for CPUs, behind `--quantization int4`.
//!
//! Each block of 32 weights of a row is `d · q + m` with `q` in 0..=15 and `d`, `m` in f16:
//! llama.cpp's Q4_1, which also holds Q4_0 exactly (`m = -8d`). GGUF files stored as Q4_0 or
//! Q4_1 are taken block for block, without rounding again; anything else is quantized with
//! the block's minimum and range. Activations are quantized as in [`super::int8`] (one scale
//! per row and block, signed), with each block's sum kept for the `m` term:
//!
//! `Σ w·x = d · sₐ · Σ q·a + m · sₐ · Σ a`
//!
//! `vpdpbusd` multiplies the unsigned weight nibbles by the signed activations directly, so no
//! offset correction is needed. On CPUs without VNNI, AVX2's `vpmaddubsw` does the same
//! unsigned × signed products in 16-bit pair sums (at most 2 · 15 · 128, so they never
//! saturate), which add up exactly within a block. A weight panel step holds 16 outputs × 8
//! inputs in 64 bytes: the low nibbles are the first 4 inputs, the high nibbles the next 4. As
//! with int8, block sums are exact and added in a fixed order, so a row's output does not depend
//! on its batch, and the scalar loop gives the same bits as the AVX-512 and AVX2 ones.

// SIMD intrinsics and the tiles' raw pointers into a shared output buffer need `unsafe`; each
// block says why it holds.
#![allow(unsafe_code)]

use half::f16;

#[cfg(target_arch = "x86_64")]
use super::int8::MR;
use super::int8::{quantize_acts, run_tiles, Acts, Kernel, BLOCK};

/// Output rows per weight panel.
const LANES: usize = 16;
/// Bytes of one panel step: 16 outputs × 8 inputs, two nibbles a byte.
const STEP: usize = 64;
/// Panels per tile.
const NJ: usize = 2;

/// A weight matrix `(n outputs, k inputs)` in 4 bits, packed for [`Int4Matrix::matmul`].
pub struct Int4Matrix {
    n: usize,
    k: usize,
    kp: usize,
    panels: usize,
    /// `[panel][kp / 8][16 outputs][4 bytes]`: low nibbles inputs 0..4, high nibbles 4..8.
    w: Vec<u8>,
    /// `[panel][block][16 outputs]`: block scale and minimum, f16 bits (padding is 0).
    d: Vec<u16>,
    m: Vec<u16>,
}

impl std::fmt::Debug for Int4Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Int4Matrix")
            .field("n", &self.n)
            .field("k", &self.k)
            .finish_non_exhaustive()
    }
}

/// A GGUF 4-bit block layout taken as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Q4Blocks {
    /// 18 bytes: f16 `d`, 16 bytes of nibbles; `w = d · (q − 8)`.
    Q4_0,
    /// 20 bytes: f16 `d`, f16 `m`, 16 bytes of nibbles; `w = d · q + m`.
    Q4_1,
}

impl Int4Matrix {
    fn empty(n: usize, k: usize) -> Self {
        let kp = k.div_ceil(BLOCK) * BLOCK;
        let panels = n.div_ceil(LANES);
        let nb = kp / BLOCK;
        Self {
            n,
            k,
            kp,
            panels,
            w: vec![0; panels * LANES * kp / 2],
            d: vec![0; panels * nb * LANES],
            m: vec![0; panels * nb * LANES],
        }
    }

    fn set(&mut self, o: usize, b: usize, d: f16, m: f16, q: &[u8; BLOCK]) {
        let nb = self.kp / BLOCK;
        let (p, lane) = (o / LANES, o % LANES);
        let at = (p * nb + b) * LANES + lane;
        self.d[at] = d.to_bits();
        self.m[at] = m.to_bits();
        for (j, &v) in q.iter().enumerate() {
            let i = b * BLOCK + j;
            let byte = (p * self.kp / 8 + i / 8) * STEP + lane * 4 + i % 4;
            self.w[byte] |= (v & 15) << (4 * ((i / 4) % 2));
        }
    }

    /// Takes a row-major `(n, k)` matrix of GGUF Q4_0 or Q4_1 blocks as it is.
    pub fn from_blocks(kind: Q4Blocks, bytes: &[u8], n: usize, k: usize) -> Option<Self> {
        let size = match kind {
            Q4Blocks::Q4_0 => 18,
            Q4Blocks::Q4_1 => 20,
        };
        if !k.is_multiple_of(BLOCK) || bytes.len() != n * k / BLOCK * size {
            return None;
        }
        let mut out = Self::empty(n, k);
        for (idx, blk) in bytes.chunks_exact(size).enumerate() {
            let (o, b) = (idx / (k / BLOCK), idx % (k / BLOCK));
            let d = f16::from_bits(u16::from_le_bytes([blk[0], blk[1]]));
            let (m, qs) = match kind {
                Q4Blocks::Q4_0 => (f16::from_f32(-8.0 * d.to_f32()), &blk[2..]),
                Q4Blocks::Q4_1 => (
                    f16::from_bits(u16::from_le_bytes([blk[2], blk[3]])),
                    &blk[4..],
                ),
            };
            let mut q = [0u8; BLOCK];
            for (j, &byte) in qs.iter().enumerate() {
                q[j] = byte & 15;
                q[j + 16] = byte >> 4;
            }
            out.set(o, b, d, m, &q);
        }
        Some(out)
    }

    /// Quantizes a row-major `(n, k)` f32 matrix: each block spans its minimum to maximum.
    pub fn quantize(w: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(
            w.len(),
            n * k,
            "weight has {} values, not {n} × {k}",
            w.len()
        );
        let mut out = Self::empty(n, k);
        for (o, row) in w.chunks_exact(k.max(1)).enumerate().take(n) {
            for (b, blk) in row.chunks(BLOCK).enumerate() {
                let lo = blk.iter().fold(f32::INFINITY, |a, &v| a.min(v));
                let hi = blk.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
                let d = f16::from_f32((hi - lo) / 15.0);
                let m = f16::from_f32(lo);
                let (df, mf) = (d.to_f32(), m.to_f32());
                let mut q = [0u8; BLOCK];
                if df > 0.0 {
                    for (q, &v) in q.iter_mut().zip(blk) {
                        *q = ((v - mf) / df).round().clamp(0.0, 15.0) as u8;
                    }
                }
                out.set(o, b, d, m, &q);
            }
        }
        out
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.n
    }

    /// Bytes held: nibbles and the f16 block scales and minimums.
    pub fn bytes(&self) -> usize {
        self.w.len() + (self.d.len() + self.m.len()) * 2
    }

    /// `x · Wᵀ` for `m` rows of `k` inputs (row-major); returns `m × n`, row-major.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        self.matmul_with(Kernel::best(), x, m)
    }

    /// [`Self::matmul`] with a chosen kernel (the scalar one runs everywhere).
    pub fn matmul_with(&self, kernel: Kernel, x: &[f32], m: usize) -> Vec<f32> {
        assert_eq!(
            x.len(),
            m * self.k,
            "input has {} values, not {m} × {}",
            x.len(),
            self.k
        );
        if m == 0 || self.n == 0 {
            return vec![0.0; m * self.n];
        }
        let acts = quantize_acts(kernel, x, m, self.k, self.kp, 0);
        // sₐ · Σ a for every row and block, for the minimum term.
        let sums: Vec<f32> = acts
            .q
            .chunks_exact(BLOCK)
            .zip(&acts.s)
            .map(|(q, &s)| s * q.iter().map(|&v| v as i8 as i32).sum::<i32>() as f32)
            .collect();
        run_tiles(
            m,
            self.n,
            self.k,
            self.panels,
            NJ,
            |r0, mr, p0, nj, out, np| {
                // Safety: `run_tiles` hands each call its own rows × panels of `out`.
                unsafe { self.tile(kernel, &acts, &sums, r0, mr, p0, nj, out, np) }
            },
        )
    }

    #[allow(clippy::too_many_arguments)]
    unsafe fn tile(
        &self,
        kernel: Kernel,
        acts: &Acts,
        sums: &[f32],
        r0: usize,
        mr: usize,
        p0: usize,
        nj: usize,
        out: *mut f32,
        np: usize,
    ) {
        let nb = self.kp / BLOCK;
        let t = Tile {
            a: acts.q.as_ptr().add(r0 * self.kp),
            sa: acts.s.as_ptr().add(r0 * nb),
            sum: sums.as_ptr().add(r0 * nb),
            w: self.w.as_ptr().add(p0 * LANES * self.kp / 2),
            d: self.d.as_ptr().add(p0 * nb * LANES),
            m: self.m.as_ptr().add(p0 * nb * LANES),
            out,
            kp: self.kp,
            np,
        };
        match kernel {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => vnni::dispatch(&t, mr, nj),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => avx2::dispatch(&t, mr, nj),
            _ => scalar_tile(&t, mr, nj),
        }
    }
}

/// Pointers to one tile's inputs and output, already offset to its first row and panel.
struct Tile {
    a: *const u8,
    sa: *const f32,
    sum: *const f32,
    w: *const u8,
    d: *const u16,
    m: *const u16,
    out: *mut f32,
    kp: usize,
    np: usize,
}

/// The reference inner loop: the VNNI kernel's arithmetic, one output at a time.
unsafe fn scalar_tile(t: &Tile, mr: usize, nj: usize) {
    let nb = t.kp / BLOCK;
    for r in 0..mr {
        for o in 0..nj * LANES {
            let (j, lane) = (o / LANES, o % LANES);
            let w = t.w.add(j * LANES * t.kp / 2);
            let mut acc = 0f32;
            for b in 0..nb {
                let mut sum = 0i32;
                for i in b * BLOCK..(b + 1) * BLOCK {
                    let byte = *w.add((i / 8) * STEP + lane * 4 + i % 4);
                    let q = (byte >> (4 * ((i / 4) % 2))) & 15;
                    sum += q as i32 * *t.a.add(r * t.kp + i) as i8 as i32;
                }
                let at = (j * nb + b) * LANES + lane;
                let d = f16::from_bits(*t.d.add(at)).to_f32();
                let m = f16::from_bits(*t.m.add(at)).to_f32();
                acc = (sum as f32).mul_add(d * *t.sa.add(r * nb + b), acc);
                acc = m.mul_add(*t.sum.add(r * nb + b), acc);
            }
            *t.out.add(r * t.np + o) = acc;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use std::arch::x86_64::*;

    use super::{Tile, BLOCK, LANES, STEP};

    crate::model::int8::tile_dispatch!(2);

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn tile<const R: usize, const J: usize>(t: &Tile) {
        let nb = t.kp / BLOCK;
        let panel = LANES * t.kp / 2;
        let nibble = _mm512_set1_epi8(15);
        let mut facc = [[_mm512_setzero_ps(); J]; R];
        for b in 0..nb {
            let mut iacc = [[_mm512_setzero_si512(); J]; R];
            for pair in 0..BLOCK / 8 {
                let i = b * BLOCK + pair * 8;
                let mut lo = [_mm512_setzero_si512(); J];
                let mut hi = [_mm512_setzero_si512(); J];
                for j in 0..J {
                    let v = _mm512_loadu_si512(t.w.add(j * panel + (i / 8) * STEP).cast());
                    lo[j] = _mm512_and_si512(v, nibble);
                    hi[j] = _mm512_and_si512(_mm512_srli_epi16::<4>(v), nibble);
                }
                for (r, row) in iacc.iter_mut().enumerate() {
                    let a = t.a.add(r * t.kp + i);
                    let a0 = _mm512_set1_epi32(a.cast::<i32>().read_unaligned());
                    let a1 = _mm512_set1_epi32(a.add(4).cast::<i32>().read_unaligned());
                    for j in 0..J {
                        row[j] = _mm512_dpbusd_epi32(row[j], lo[j], a0);
                        row[j] = _mm512_dpbusd_epi32(row[j], hi[j], a1);
                    }
                }
            }
            let mut d = [_mm512_setzero_ps(); J];
            let mut m = [_mm512_setzero_ps(); J];
            for j in 0..J {
                let at = (j * nb + b) * LANES;
                d[j] = _mm512_cvtph_ps(_mm256_loadu_si256(t.d.add(at).cast()));
                m[j] = _mm512_cvtph_ps(_mm256_loadu_si256(t.m.add(at).cast()));
            }
            for r in 0..R {
                let sa = _mm512_set1_ps(*t.sa.add(r * nb + b));
                let sum = _mm512_set1_ps(*t.sum.add(r * nb + b));
                for j in 0..J {
                    let s = _mm512_mul_ps(d[j], sa);
                    facc[r][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[r][j]), s, facc[r][j]);
                    facc[r][j] = _mm512_fmadd_ps(m[j], sum, facc[r][j]);
                }
            }
        }
        for j in 0..J {
            for (r, row) in facc.iter().enumerate() {
                _mm512_storeu_ps(t.out.add(r * t.np + j * LANES), row[j]);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Tile, BLOCK, LANES, STEP};

    crate::model::int8::tile_dispatch!(2);

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile<const R: usize, const J: usize>(t: &Tile) {
        let nb = t.kp / BLOCK;
        let panel = LANES * t.kp / 2;
        let nibble = _mm256_set1_epi8(15);
        let ones = _mm256_set1_epi16(1);
        // Each panel is two registers: outputs 0..8 and 8..16.
        let mut facc = [[[_mm256_setzero_ps(); 2]; J]; R];
        for b in 0..nb {
            // A block's products, in 16-bit lanes of 16 products each: |Σ| ≤ 16 · 15 · 128,
            // below 2^15, so the sums are exact.
            let mut pacc = [[[_mm256_setzero_si256(); 2]; J]; R];
            for pair in 0..BLOCK / 8 {
                let i = b * BLOCK + pair * 8;
                let mut lo = [[_mm256_setzero_si256(); 2]; J];
                let mut hi = [[_mm256_setzero_si256(); 2]; J];
                for j in 0..J {
                    for h in 0..2 {
                        let v =
                            _mm256_loadu_si256(t.w.add(j * panel + (i / 8) * STEP + h * 32).cast());
                        lo[j][h] = _mm256_and_si256(v, nibble);
                        hi[j][h] = _mm256_and_si256(_mm256_srli_epi16::<4>(v), nibble);
                    }
                }
                for (r, row) in pacc.iter_mut().enumerate() {
                    let a = t.a.add(r * t.kp + i);
                    let a0 = _mm256_set1_epi32(a.cast::<i32>().read_unaligned());
                    let a1 = _mm256_set1_epi32(a.add(4).cast::<i32>().read_unaligned());
                    for j in 0..J {
                        for h in 0..2 {
                            let four = _mm256_add_epi16(
                                _mm256_maddubs_epi16(lo[j][h], a0),
                                _mm256_maddubs_epi16(hi[j][h], a1),
                            );
                            row[j][h] = _mm256_add_epi16(row[j][h], four);
                        }
                    }
                }
            }
            for j in 0..J {
                for h in 0..2 {
                    let at = (j * nb + b) * LANES + h * 8;
                    let d = _mm256_cvtph_ps(_mm_loadu_si128(t.d.add(at).cast()));
                    let m = _mm256_cvtph_ps(_mm_loadu_si128(t.m.add(at).cast()));
                    for r in 0..R {
                        let s = _mm256_mul_ps(d, _mm256_set1_ps(*t.sa.add(r * nb + b)));
                        let sum = _mm256_cvtepi32_ps(_mm256_madd_epi16(pacc[r][j][h], ones));
                        facc[r][j][h] = _mm256_fmadd_ps(sum, s, facc[r][j][h]);
                        facc[r][j][h] = _mm256_fmadd_ps(
                            m,
                            _mm256_set1_ps(*t.sum.add(r * nb + b)),
                            facc[r][j][h],
                        );
                    }
                }
            }
        }
        for j in 0..J {
            for (r, row) in facc.iter().enumerate() {
                for (h, half) in row[j].iter().enumerate() {
                    _mm256_storeu_ps(t.out.add(r * t.np + j * LANES + h * 8), *half);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::int8::tests::{data, extreme, fake_quant};
    use super::*;

    /// The weights a matrix stands for, widened back (`d · q + m`), row-major.
    fn widen(w: &Int4Matrix) -> Vec<f32> {
        let nb = w.kp / BLOCK;
        let mut out = vec![0f32; w.n * w.k];
        for o in 0..w.n {
            let (p, lane) = (o / LANES, o % LANES);
            for i in 0..w.k {
                let at = (p * nb + i / BLOCK) * LANES + lane;
                let byte = w.w[(p * w.kp / 8 + i / 8) * STEP + lane * 4 + i % 4];
                let q = (byte >> (4 * ((i / 4) % 2))) & 15;
                let (d, m) = (f16::from_bits(w.d[at]), f16::from_bits(w.m[at]));
                out[o * w.k + i] = d.to_f32() * q as f32 + m.to_f32();
            }
        }
        out
    }

    #[test]
    fn computes_the_quantized_product_and_stays_near_f32() {
        for &(m, n, k) in &[(1, 16, 32), (5, 50, 70), (9, 200, 576), (6, 33, 96)] {
            let w = data(n * k, 1);
            let x = data(m * k, 2);
            let q = Int4Matrix::quantize(&w, n, k);
            let got = q.matmul(&x, m);
            let wq = widen(&q);
            let xq: Vec<f64> = x.chunks(k).flat_map(|r| fake_quant(r, BLOCK)).collect();
            let mut err = (0f64, 0f64, 0f64);
            for r in 0..m {
                for o in 0..n {
                    let exact: f64 = (0..k).map(|i| xq[r * k + i] * wq[o * k + i] as f64).sum();
                    let f: f64 = (0..k).map(|i| (x[r * k + i] * w[o * k + i]) as f64).sum();
                    let g = got[r * n + o] as f64;
                    err.0 += (g - exact).powi(2);
                    err.1 += exact.powi(2);
                    err.2 += (g - f).powi(2);
                }
            }
            let (vs_exact, vs_f32) = ((err.0 / err.1).sqrt(), (err.2 / err.1).sqrt());
            assert!(
                vs_exact < 1e-5,
                "{m}×{n}×{k}: {vs_exact} from the rounded operands"
            );
            assert!(vs_f32 < 0.15, "{m}×{n}×{k}: {vs_f32} from f32");
        }
    }

    #[test]
    fn gguf_blocks_are_taken_exactly() {
        // Two rows of two blocks: Q4_1 with its own minimum, and Q4_0 (minimum −8d).
        let (n, k) = (2, 64);
        let mut q41 = Vec::new();
        let mut q40 = Vec::new();
        for blk in 0..n * k / BLOCK {
            let d = f16::from_f32(0.01 * (blk + 1) as f32);
            let m = f16::from_f32(-0.05 * blk as f32);
            let qs: Vec<u8> = (0..16)
                .map(|j| (((j * 7 + blk) % 16) | (((j * 5 + 3) % 16) << 4)) as u8)
                .collect();
            q41.extend(d.to_le_bytes());
            q41.extend(m.to_le_bytes());
            q41.extend(&qs);
            q40.extend(d.to_le_bytes());
            q40.extend(&qs);
        }
        for (kind, bytes, size) in [(Q4Blocks::Q4_1, &q41, 20), (Q4Blocks::Q4_0, &q40, 18)] {
            let w = Int4Matrix::from_blocks(kind, bytes, n, k).unwrap();
            let got = widen(&w);
            for (idx, blk) in bytes.chunks(size).enumerate() {
                let d = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
                let (m, qs) = match kind {
                    Q4Blocks::Q4_0 => (-8.0 * d, &blk[2..]),
                    Q4Blocks::Q4_1 => (f16::from_le_bytes([blk[2], blk[3]]).to_f32(), &blk[4..]),
                };
                for j in 0..BLOCK {
                    let q = if j < 16 { qs[j] & 15 } else { qs[j - 16] >> 4 };
                    assert_eq!(
                        got[idx * BLOCK + j],
                        d * q as f32 + m,
                        "{kind:?} block {idx} [{j}]"
                    );
                }
            }
        }
        assert!(Int4Matrix::from_blocks(Q4Blocks::Q4_1, &q41[1..], n, k).is_none());
    }

    #[test]
    fn kernels_agree_bit_for_bit_and_rows_ignore_their_batch() {
        // Nibbles at 15 (a block of 3.0 but for one 0.0) times activations at ±127 after
        // rounding: the largest 16-bit sums the AVX2 kernel keeps within a block, close to
        // 16 · 15 · 127 per lane. Then nibbles alternating 0 and 15 against alternating signs.
        for kernel in Kernel::available() {
            for &(m, n, k) in &[(1, 16, 32), (7, 70, 96), (17, 600, 576), (3, 5, 1536)] {
                let cases = [
                    (data(n * k, 3), data(m * k, 4)),
                    (
                        (0..n * k)
                            .map(|i| if i % BLOCK == 0 { 0.0 } else { 3.0 })
                            .collect(),
                        extreme(m * k, 64),
                    ),
                    (extreme(n * k, 1), extreme(m * k, 1)),
                ];
                for (w, x) in cases {
                    let q = Int4Matrix::quantize(&w, n, k);
                    let all = q.matmul_with(kernel, &x, m);
                    assert_eq!(
                        q.matmul_with(Kernel::Scalar, &x, m),
                        all,
                        "{m}×{n}×{k} {kernel:?}"
                    );
                    for r in 0..m {
                        assert_eq!(
                            q.matmul_with(kernel, &x[r * k..(r + 1) * k], 1),
                            all[r * n..(r + 1) * n]
                        );
                    }
                }
            }
        }
    }
}
