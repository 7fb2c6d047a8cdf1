//! Int8 weights × int8 activations (W8A8) matmul for CPUs.
//!
//! Weights and activations both get one symmetric scale (`max |x| / 127`) per row and block of
//! [`BLOCK`] inputs, as in llama.cpp's Q8_0: a block scale keeps an outlier in one channel from
//! flattening the rest of the row, a weight quantized from a 4- or 5-bit file keeps its values,
//! and a matrix split by columns on block boundaries (tensor parallelism) is quantized exactly
//! as the whole. Activations are quantized as the matmul runs. Products are summed exactly in
//! i32 within a block, and the block sums are scaled and added in f32 in a fixed order, so every
//! output depends only on its own row of input: results do not change with the batch they run
//! in or with the number of threads.
//!
//! On CPUs with AVX-512 VNNI the inner product is `vpdpbusd` (u8 × i8 → i32, 64 products per
//! instruction). It takes an unsigned operand, so activations are stored offset by 128 and each
//! block's sum starts from `-128 · Σ w` of that block, which cancels the offset exactly. Weights
//! are packed in panels of 16 output rows, 4 inputs deep, the layout `vpdpbusd` consumes: one
//! 64-byte load gives 4 inputs of 16 outputs. CPUs with AVX2 but no VNNI run the same layout
//! through `vpmaddubsw` (the `avx2` module), others a scalar loop; all compute the same numbers, bit
//! for bit.

// SIMD intrinsics and the tiles' raw pointers into a shared output buffer need `unsafe`; each
// block says why it holds.
#![allow(unsafe_code)]

use rayon::prelude::*;

/// Inputs per scale.
pub const BLOCK: usize = 32;
/// Output rows per weight panel (one 512-bit register of i32).
const LANES: usize = 16;
/// Bytes of one panel step: 16 outputs × 4 inputs.
const STEP: usize = LANES * 4;
/// Register tile of the VNNI kernel: rows of input × panels of output.
pub(super) const MR: usize = 4;
const NJ: usize = 3;

/// Which inner loop runs the matmul.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    Scalar,
    /// AVX2 (with FMA and F16C) without VNNI.
    Avx2,
    Avx512Vnni,
}

impl Kernel {
    /// The fastest kernel this CPU runs.
    pub fn best() -> Self {
        Self::available().pop().unwrap_or(Self::Scalar)
    }

    /// Every kernel this CPU runs, slowest first; the scalar one runs everywhere.
    pub fn available() -> Vec<Self> {
        let mut out = vec![Self::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c")
            {
                out.push(Self::Avx2);
            }
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vnni")
            {
                out.push(Self::Avx512Vnni);
            }
        }
        out
    }
}

/// A weight matrix `(n outputs, k inputs)` in int8, packed for [`Int8Matrix::matmul`].
pub struct Int8Matrix {
    n: usize,
    k: usize,
    /// `k` rounded up to a whole block.
    kp: usize,
    panels: usize,
    /// `[panel][kp / 4][16 outputs][4 inputs]`.
    w: Vec<i8>,
    /// `[panel][block][16 outputs]`: `-128 · Σ w` over the block.
    corr: Vec<i32>,
    /// `[panel][block][16 outputs]`: the weight scales (padding is 0).
    scale: Vec<f32>,
}

impl std::fmt::Debug for Int8Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Int8Matrix")
            .field("n", &self.n)
            .field("k", &self.k)
            .finish_non_exhaustive()
    }
}

/// Activations quantized for one matmul: `[row][kp]` (plus an offset), `[row][block]` scales.
pub(super) struct Acts {
    pub(super) q: Vec<u8>,
    pub(super) s: Vec<f32>,
}

/// Quantizes `m` rows of `k` inputs into rows of `kp` bytes (`offset` added: 128 gives the u8
/// operand of `vpdpbusd`, 0 the i8 one as two's complement), one scale per block.
pub(super) fn quantize_acts(
    kernel: Kernel,
    x: &[f32],
    m: usize,
    k: usize,
    kp: usize,
    offset: u8,
) -> Acts {
    let nb = kp / BLOCK;
    let mut q = vec![offset; m * kp];
    let mut s = vec![0f32; m * nb];
    let quantize = |(r, (qr, sr)): (usize, (&mut [u8], &mut [f32]))| {
        quantize_row(kernel, &x[r * k..(r + 1) * k], qr, sr, offset);
    };
    if m >= 32 && rayon::current_num_threads() > 1 {
        q.par_chunks_mut(kp)
            .zip(s.par_chunks_mut(nb))
            .enumerate()
            .for_each(quantize);
    } else {
        q.chunks_mut(kp)
            .zip(s.chunks_mut(nb))
            .enumerate()
            .for_each(quantize);
    }
    Acts { q, s }
}

/// Runs `tile(r0, mr, p0, nj, out, np)` over every tile of at most [`MR`] rows × `nj_max`
/// panels of an `m × n` product, in parallel over panel groups when the work is large enough,
/// and returns the product row-major. `out` points at the tile's first output; rows are `np`
/// floats apart. Tiles write disjoint parts of the buffer.
pub(super) fn run_tiles(
    m: usize,
    n: usize,
    k: usize,
    panels: usize,
    nj_max: usize,
    tile: impl Fn(usize, usize, usize, usize, *mut f32, usize) + Sync,
) -> Vec<f32> {
    let np = panels * LANES;
    let mut out = vec![0f32; m * np];
    let dst = SharedOut(out.as_mut_ptr());
    let run = |g: usize| {
        let dst = &dst;
        let p0 = g * nj_max;
        let nj = nj_max.min(panels - p0);
        let mut r0 = 0;
        while r0 < m {
            let mr = MR.min(m - r0);
            // Safety: the offset is inside `out` (`r0 < m`, `p0 < panels`).
            tile(
                r0,
                mr,
                p0,
                nj,
                unsafe { dst.0.add(r0 * np + p0 * LANES) },
                np,
            );
            r0 += mr;
        }
    };
    let groups = panels.div_ceil(nj_max);
    if rayon::current_num_threads() > 1 && m * n * k >= 1 << 16 {
        (0..groups).into_par_iter().for_each(run);
    } else {
        (0..groups).for_each(run);
    }
    if np != n {
        out = out
            .chunks_exact(np)
            .flat_map(|r| &r[..n])
            .copied()
            .collect();
    }
    out
}

impl Int8Matrix {
    /// Quantizes a row-major `(n, k)` f32 matrix.
    pub fn quantize(w: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(
            w.len(),
            n * k,
            "weight has {} values, not {n} × {k}",
            w.len()
        );
        let kp = k.div_ceil(BLOCK) * BLOCK;
        let nb = kp / BLOCK;
        let panels = n.div_ceil(LANES);
        let mut packed = vec![0i8; panels * LANES * kp];
        let mut corr = vec![0i32; panels * nb * LANES];
        let mut scale = vec![0f32; panels * nb * LANES];
        let (mut q, mut s) = (vec![128u8; kp], vec![0f32; nb]);
        let kernel = Kernel::best();
        for (o, row) in w.chunks_exact(k.max(1)).enumerate().take(n) {
            let (p, lane) = (o / LANES, o % LANES);
            quantize_row(kernel, row, &mut q, &mut s, 128);
            for (b, &sb) in s.iter().enumerate() {
                let at = (p * nb + b) * LANES + lane;
                scale[at] = sb;
                for i in b * BLOCK..((b + 1) * BLOCK).min(k) {
                    let v = q[i] as i32 - 128;
                    packed[p * LANES * kp + (i / 4) * STEP + lane * 4 + i % 4] = v as i8;
                    corr[at] -= 128 * v;
                }
            }
        }
        Self {
            n,
            k,
            kp,
            panels,
            w: packed,
            corr,
            scale,
        }
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.n
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.k
    }

    /// Bytes held: weights, block corrections and scales.
    pub fn bytes(&self) -> usize {
        self.w.len() + self.corr.len() * 4 + self.scale.len() * 4
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
        let acts = quantize_acts(kernel, x, m, self.k, self.kp, 128);
        run_tiles(
            m,
            self.n,
            self.k,
            self.panels,
            NJ,
            |r0, mr, p0, nj, out, np| {
                // Safety: `run_tiles` hands each call its own rows × panels of `out`.
                unsafe { self.tile(kernel, &acts, r0, mr, p0, nj, out, np) }
            },
        )
    }

    /// Computes rows `r0..r0 + mr` × panels `p0..p0 + nj` into `out` (`np` floats per row).
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile(
        &self,
        kernel: Kernel,
        acts: &Acts,
        r0: usize,
        mr: usize,
        p0: usize,
        nj: usize,
        out: *mut f32,
        np: usize,
    ) {
        let nb = self.kp / BLOCK;
        let a = acts.q.as_ptr().add(r0 * self.kp);
        let sa = acts.s.as_ptr().add(r0 * nb);
        let w = self.w.as_ptr().add(p0 * LANES * self.kp);
        let corr = self.corr.as_ptr().add(p0 * nb * LANES);
        let scale = self.scale.as_ptr().add(p0 * nb * LANES);
        let t = Tile {
            a,
            sa,
            w,
            corr,
            scale,
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
    w: *const i8,
    corr: *const i32,
    scale: *const f32,
    out: *mut f32,
    kp: usize,
    np: usize,
}

struct SharedOut(*mut f32);
// Safety: tiles write disjoint parts of the buffer (see `matmul_with`).
unsafe impl Sync for SharedOut {}
unsafe impl Send for SharedOut {}

/// Quantizes a row block by block into `q` (plus `offset`) and `s` (one scale per block).
pub(super) fn quantize_row(kernel: Kernel, x: &[f32], q: &mut [u8], s: &mut [f32], offset: u8) {
    let full = x.len() / BLOCK;
    match kernel {
        // Safety: the CPU has the kernel's features (`Kernel::best`).
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512Vnni => unsafe { vnni::quantize_blocks(&x[..full * BLOCK], q, s, offset) },
        _ => {
            let blocks = x.chunks_exact(BLOCK).zip(q.chunks_exact_mut(BLOCK));
            for (sb, (xb, qb)) in s.iter_mut().zip(blocks) {
                *sb = quantize_block(xb, qb, offset);
            }
        }
    }
    if full * BLOCK < x.len() {
        let tail = full * BLOCK..x.len();
        s[full] = quantize_block(&x[tail.clone()], &mut q[tail], offset);
    }
}

/// Quantizes one block to `q` (plus `offset`, wrapping) and returns its scale.
fn quantize_block(x: &[f32], q: &mut [u8], offset: u8) -> f32 {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    if amax == 0.0 {
        q.fill(offset);
        return 0.0;
    }
    let inv = 127.0 / amax;
    for (q, &v) in q.iter_mut().zip(x) {
        *q = ((v * inv).round_ties_even().clamp(-127.0, 127.0) as i32 + offset as i32) as u8;
    }
    amax / 127.0
}

/// The reference inner loop: the VNNI kernel's arithmetic, one output at a time.
unsafe fn scalar_tile(t: &Tile, mr: usize, nj: usize) {
    let nb = t.kp / BLOCK;
    for r in 0..mr {
        let a = std::slice::from_raw_parts(t.a.add(r * t.kp), t.kp);
        let sa = std::slice::from_raw_parts(t.sa.add(r * nb), nb);
        for o in 0..nj * LANES {
            let (j, lane) = (o / LANES, o % LANES);
            let w = t.w.add(j * LANES * t.kp);
            let mut acc = 0f32;
            for (b, &s) in sa.iter().enumerate() {
                let at = (j * nb + b) * LANES + lane;
                let mut sum = *t.corr.add(at);
                for (i, &av) in a.iter().enumerate().skip(b * BLOCK).take(BLOCK) {
                    let wv = *w.add((i / 4) * STEP + lane * 4 + i % 4);
                    sum += av as i32 * wv as i32;
                }
                acc = (sum as f32).mul_add(*t.scale.add(at) * s, acc);
            }
            *t.out.add(r * t.np + o) = acc;
        }
    }
}

/// Defines the module's `dispatch(t, mr, nj)`: it runs the module's `tile::<R, J>`, specialised
/// for each tile shape `run_tiles` hands out (at most [`MR`] rows × the format's panels per tile,
/// 3 or 2) so that the accumulators stay in registers.
#[cfg(target_arch = "x86_64")]
macro_rules! tile_dispatch {
    (3) => {
        $crate::model::int8::tile_dispatch!(@arms (4, 3), (4, 2), (4, 1), (3, 3), (3, 2), (3, 1),
            (2, 3), (2, 2), (2, 1), (1, 3), (1, 2), (1, 1));
    };
    (2) => {
        $crate::model::int8::tile_dispatch!(@arms (4, 2), (4, 1), (3, 2), (3, 1), (2, 2), (2, 1),
            (1, 2), (1, 1));
    };
    (@arms $(($r:literal, $j:literal)),*) => {
        /// Runs the tile kernel specialised for `mr` rows and `nj` panels.
        pub(super) unsafe fn dispatch(t: &super::Tile, mr: usize, nj: usize) {
            match (mr, nj) {
                $(($r, $j) => tile::<$r, $j>(t),)*
                _ => unreachable!(
                    "tile of {mr} rows × {nj} panels exceeds {} × {}",
                    super::MR,
                    super::NJ
                ),
            }
        }
    };
}
#[cfg(target_arch = "x86_64")]
pub(super) use tile_dispatch;

#[cfg(target_arch = "x86_64")]
mod vnni {
    use std::arch::x86_64::*;

    use super::{Tile, BLOCK, LANES, STEP};

    tile_dispatch!(3);

    /// Quantizes whole blocks of `x` as [`super::quantize_block`] does, bit for bit: the
    /// maximum is exact in any order and the conversion rounds to nearest even.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn quantize_blocks(x: &[f32], q: &mut [u8], s: &mut [f32], offset: u8) {
        let fill = offset;
        let offset = _mm512_set1_epi32(offset as i32);
        for (b, (xb, sb)) in x.chunks_exact(BLOCK).zip(s.iter_mut()).enumerate() {
            let lo = _mm512_loadu_ps(xb.as_ptr());
            let hi = _mm512_loadu_ps(xb.as_ptr().add(16));
            let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
            let dst = q.as_mut_ptr().add(b * BLOCK);
            if amax == 0.0 {
                std::ptr::write_bytes(dst, fill, BLOCK);
                *sb = 0.0;
                continue;
            }
            let inv = _mm512_set1_ps(127.0 / amax);
            for (h, v) in [lo, hi].into_iter().enumerate() {
                let i = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(v, inv)), offset);
                _mm_storeu_si128(dst.add(h * 16).cast(), _mm512_cvtepi32_epi8(i));
            }
            *sb = amax / 127.0;
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn tile<const R: usize, const J: usize>(t: &Tile) {
        let nb = t.kp / BLOCK;
        let panel = LANES * t.kp;
        let mut facc = [[_mm512_setzero_ps(); J]; R];
        for b in 0..nb {
            let mut iacc = [[_mm512_setzero_si512(); J]; R];
            for j in 0..J {
                let c = _mm512_loadu_si512(t.corr.add((j * nb + b) * LANES).cast());
                for row in iacc.iter_mut() {
                    row[j] = c;
                }
            }
            for step in 0..BLOCK / 4 {
                let i = b * BLOCK + step * 4;
                let mut wv = [_mm512_setzero_si512(); J];
                for (j, v) in wv.iter_mut().enumerate() {
                    *v = _mm512_loadu_si512(t.w.add(j * panel + (i / 4) * STEP).cast());
                }
                for (r, row) in iacc.iter_mut().enumerate() {
                    let a = _mm512_set1_epi32(t.a.add(r * t.kp + i).cast::<i32>().read_unaligned());
                    for j in 0..J {
                        row[j] = _mm512_dpbusd_epi32(row[j], a, wv[j]);
                    }
                }
            }
            let mut sw = [_mm512_setzero_ps(); J];
            for (j, v) in sw.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(t.scale.add((j * nb + b) * LANES));
            }
            for r in 0..R {
                let sa = _mm512_set1_ps(*t.sa.add(r * nb + b));
                for j in 0..J {
                    let s = _mm512_mul_ps(sw[j], sa);
                    facc[r][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[r][j]), s, facc[r][j]);
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

/// The same arithmetic on AVX2, for CPUs without VNNI. `vpmaddubsw` multiplies unsigned by
/// signed bytes and adds pairs into i16, which saturates for activations offset to 1..255. So
/// the offset is taken back off (a flip of the top bit turns `a + 128` into `a` as i8), the
/// weight's sign is moved onto the activation (`vpsignb`), and `|w| · ±a` pairs stay within
/// 2 · 127 · 127 < 2^15. `vpmaddwd` by ones then sums each output's 4 products into i32. Without
/// the offset the block correction is not added: the sum is `Σ a · w` either way, so the result
/// is the scalar loop's, bit for bit.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Tile, BLOCK, LANES, STEP};

    tile_dispatch!(3);

    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile<const R: usize, const J: usize>(t: &Tile) {
        let nb = t.kp / BLOCK;
        let panel = LANES * t.kp;
        let ones = _mm256_set1_epi16(1);
        let flip = _mm256_set1_epi8(i8::MIN);
        // Each panel is two registers: outputs 0..8 and 8..16.
        let mut facc = [[[_mm256_setzero_ps(); 2]; J]; R];
        for b in 0..nb {
            let mut iacc = [[[_mm256_setzero_si256(); 2]; J]; R];
            for step in 0..BLOCK / 4 {
                let i = b * BLOCK + step * 4;
                let mut w = [[_mm256_setzero_si256(); 2]; J];
                let mut w_abs = [[_mm256_setzero_si256(); 2]; J];
                for j in 0..J {
                    for h in 0..2 {
                        let v =
                            _mm256_loadu_si256(t.w.add(j * panel + (i / 4) * STEP + h * 32).cast());
                        w[j][h] = v;
                        w_abs[j][h] = _mm256_sign_epi8(v, v);
                    }
                }
                for (r, row) in iacc.iter_mut().enumerate() {
                    let four = t.a.add(r * t.kp + i).cast::<i32>().read_unaligned();
                    let a = _mm256_xor_si256(_mm256_set1_epi32(four), flip);
                    for j in 0..J {
                        for h in 0..2 {
                            let signed = _mm256_sign_epi8(a, w[j][h]);
                            let pairs = _mm256_maddubs_epi16(w_abs[j][h], signed);
                            let quads = _mm256_madd_epi16(pairs, ones);
                            row[j][h] = _mm256_add_epi32(row[j][h], quads);
                        }
                    }
                }
            }
            for j in 0..J {
                for h in 0..2 {
                    let sw = _mm256_loadu_ps(t.scale.add((j * nb + b) * LANES + h * 8));
                    for r in 0..R {
                        let s = _mm256_mul_ps(sw, _mm256_set1_ps(*t.sa.add(r * nb + b)));
                        let sum = _mm256_cvtepi32_ps(iacc[r][j][h]);
                        facc[r][j][h] = _mm256_fmadd_ps(sum, s, facc[r][j][h]);
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
pub(super) mod tests {
    use super::*;

    pub(in crate::model) fn data(len: usize, seed: u32) -> Vec<f32> {
        // A small LCG: reproducible values in [-1, 1) with a few larger outliers.
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..len)
            .map(|i| {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                let v = (s >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0;
                if i % 97 == 0 {
                    v * 8.0
                } else {
                    v
                }
            })
            .collect()
    }

    fn reference(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for r in 0..m {
            for o in 0..n {
                out[r * n + o] = (0..k).map(|i| x[r * k + i] * w[o * k + i]).sum();
            }
        }
        out
    }

    /// `len` values of ±3.0, the sign flipping every `flip` values: ±127 once quantized.
    pub(in crate::model) fn extreme(len: usize, flip: usize) -> Vec<f32> {
        (0..len)
            .map(|i| {
                if (i / flip).is_multiple_of(2) {
                    3.0
                } else {
                    -3.0
                }
            })
            .collect()
    }

    /// Rounds like the kernel: one scale per row and block.
    pub(in crate::model) fn fake_quant(v: &[f32], group: usize) -> Vec<f64> {
        v.chunks(group)
            .flat_map(|g| {
                let amax = g.iter().fold(0f32, |m, x| m.max(x.abs()));
                let s = amax / 127.0;
                g.iter().map(move |&x| {
                    if amax == 0.0 {
                        0.0
                    } else {
                        (x * (127.0 / amax)).round_ties_even() as f64 * s as f64
                    }
                })
            })
            .collect()
    }

    fn rel_err(got: &[f32], want: &[f64]) -> f64 {
        let norm = want.iter().map(|v| v * v).sum::<f64>().sqrt();
        let err = got
            .iter()
            .zip(want)
            .map(|(&a, b)| (a as f64 - b).powi(2))
            .sum::<f64>();
        err.sqrt() / norm
    }

    #[test]
    fn computes_the_quantized_product_on_awkward_shapes() {
        for &(m, n, k) in &[
            (1, 16, 32),
            (5, 50, 70),
            (9, 200, 576),
            (13, 33, 100),
            (4, 48, 64),
        ] {
            let w = data(n * k, 1);
            let x = data(m * k, 2);
            let q = Int8Matrix::quantize(&w, n, k);
            let got = q.matmul(&x, m);
            // Exactly the rounded operands, summed in f64: only f32 rounding separates them.
            let wq: Vec<f64> = w.chunks(k).flat_map(|r| fake_quant(r, BLOCK)).collect();
            let xq: Vec<f64> = x.chunks(k).flat_map(|r| fake_quant(r, BLOCK)).collect();
            let exact: Vec<f64> = (0..m * n)
                .map(|i| (0..k).map(|j| xq[i / n * k + j] * wq[i % n * k + j]).sum())
                .collect();
            assert!(
                rel_err(&got, &exact) < 1e-6,
                "{m}×{n}×{k}: {}",
                rel_err(&got, &exact)
            );
            // Against f32 the error is the rounding's: a few percent with this data's outliers.
            let f: Vec<f64> = reference(&x, &w, m, n, k)
                .iter()
                .map(|&v| v as f64)
                .collect();
            assert!(
                rel_err(&got, &f) < 0.05,
                "{m}×{n}×{k}: {} against f32",
                rel_err(&got, &f)
            );
        }
    }

    #[test]
    fn kernels_agree_bit_for_bit() {
        // Every value at ±127 after rounding: the largest products, where a 16-bit pair sum
        // would saturate if the AVX2 kernel kept the activation offset.
        for kernel in Kernel::available() {
            for &(m, n, k) in &[(1, 16, 32), (7, 70, 96), (17, 600, 576), (3, 5, 1536)] {
                let cases = [
                    (data(n * k, 3), data(m * k, 4)),
                    (extreme(n * k, 1), extreme(m * k, 1)),
                    (extreme(n * k, 3), extreme(m * k, 2)),
                ];
                for (w, x) in cases {
                    let q = Int8Matrix::quantize(&w, n, k);
                    assert_eq!(
                        q.matmul_with(Kernel::Scalar, &x, m),
                        q.matmul_with(kernel, &x, m),
                        "{m}×{n}×{k} with {kernel:?}"
                    );
                }
            }
        }
        // The extreme case is exact: ±127 · ±127 summed, times the scales.
        let (m, n, k) = (2, 16, 64);
        let q = Int8Matrix::quantize(&extreme(n * k, 1), n, k);
        let got = q.matmul_with(Kernel::best(), &extreme(m * k, 1), m);
        assert!(
            got.iter().all(|v| (v - 9.0 * k as f32).abs() < 1e-3),
            "{got:?}"
        );
    }

    #[test]
    fn a_split_on_block_boundaries_adds_up_to_the_whole() {
        // Tensor parallelism splits a matrix by input columns and sums the partial products.
        let (m, n, k, cut) = (3, 40, 160, 64);
        let w = data(n * k, 9);
        let x = data(m * k, 10);
        let part = |v: &[f32], rows: usize, r: std::ops::Range<usize>| -> Vec<f32> {
            v.chunks(k)
                .take(rows)
                .flat_map(|row| row[r.clone()].to_vec())
                .collect()
        };
        let whole = Int8Matrix::quantize(&w, n, k).matmul(&x, m);
        let left =
            Int8Matrix::quantize(&part(&w, n, 0..cut), n, cut).matmul(&part(&x, m, 0..cut), m);
        let right =
            Int8Matrix::quantize(&part(&w, n, cut..k), n, k - cut).matmul(&part(&x, m, cut..k), m);
        for ((a, b), c) in left.iter().zip(&right).zip(&whole) {
            assert!(
                (a + b - c).abs() <= 1e-5 * c.abs().max(1.0),
                "{a} + {b} vs {c}"
            );
        }
    }

    #[test]
    fn a_row_does_not_depend_on_its_batch() {
        let (n, k) = (100, 200);
        let q = Int8Matrix::quantize(&data(n * k, 5), n, k);
        let x = data(11 * k, 6);
        let all = q.matmul(&x, 11);
        for r in 0..11 {
            assert_eq!(q.matmul(&x[r * k..(r + 1) * k], 1), all[r * n..(r + 1) * n]);
        }
    }

    #[test]
    fn zero_rows_and_zero_weights() {
        let q = Int8Matrix::quantize(&[0.0; 64], 2, 32);
        assert_eq!(q.matmul(&data(64, 7), 2), vec![0.0; 4]);
        let q = Int8Matrix::quantize(&data(64, 8), 2, 32);
        assert_eq!(q.matmul(&[0.0; 32], 1), vec![0.0; 2]);
        assert!(q.matmul(&[], 0).is_empty());
    }
}
