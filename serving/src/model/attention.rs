//! Rotary position embedding and attention over the paged KV cache, in plain Rust.
//!
//! A step mixes sequences of different lengths (prefill chunks and single decode tokens), so
//! attention walks each row's own block table instead of padding the batch into one tensor.
//! Each output row depends only on its own query and its own sequence's cache, which keeps the
//! result of a sequence independent of whatever else is in the batch.

use crate::kv::KvStorage;

/// Precomputed cos/sin for every position up to the context length.
#[derive(Debug)]
pub struct RopeTable {
    half: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
    interleaved: bool,
}

impl RopeTable {
    pub fn new(head_dim: usize, theta: f32, max_pos: usize, interleaved: bool) -> Self {
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(max_pos * half);
        let mut sin = Vec::with_capacity(max_pos * half);
        for p in 0..max_pos {
            for i in 0..half {
                let freq = 1.0 / (theta as f64).powf(2.0 * i as f64 / head_dim as f64);
                let a = p as f64 * freq;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        Self {
            half,
            cos,
            sin,
            interleaved,
        }
    }

    pub fn max_positions(&self) -> usize {
        self.cos.len() / self.half.max(1)
    }

    /// Rotates one head vector in place for position `pos`.
    pub fn apply(&self, x: &mut [f32], pos: usize) {
        let c = &self.cos[pos * self.half..(pos + 1) * self.half];
        let s = &self.sin[pos * self.half..(pos + 1) * self.half];
        if self.interleaved {
            for i in 0..self.half {
                let (a, b) = (x[2 * i], x[2 * i + 1]);
                x[2 * i] = a * c[i] - b * s[i];
                x[2 * i + 1] = a * s[i] + b * c[i];
            }
        } else {
            for i in 0..self.half {
                let (a, b) = (x[i], x[i + self.half]);
                x[i] = a * c[i] - b * s[i];
                x[i + self.half] = a * s[i] + b * c[i];
            }
        }
    }
}

/// Where one batch row sits: its position and the block table of its sequence.
#[derive(Debug, Clone, Copy)]
pub struct RowContext<'a> {
    pub pos: usize,
    pub block_table: &'a [u32],
}

/// Shape of the attention heads.
#[derive(Debug, Clone, Copy)]
pub struct HeadShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

/// Rows of one sequence at consecutive positions (a prefill chunk) that are attended together,
/// so that each cached K and V row is read once for all of them.
const TILE_ROWS: usize = 16;

/// Causal attention of each row's query heads over its sequence's cached K/V, positions
/// `0..=pos`. `q` is `rows × (n_heads·head_dim)`; the result has the same shape.
///
/// Work is cut into tiles of consecutive rows of one sequence × KV heads: all query heads that
/// share a KV head, for up to [`TILE_ROWS`] positions, are scored against each cached row in
/// one pass. Tiles run on the compute thread pool when `threads > 1`. A row's output is computed
/// by the same arithmetic whatever tile, batch or thread it lands in.
pub fn paged_attention(
    q: &[f32],
    rows: &[RowContext<'_>],
    kv: &KvStorage,
    layer: usize,
    shape: HeadShape,
    threads: usize,
) -> Vec<f32> {
    let width = shape.n_heads * shape.head_dim;
    let mut out = vec![0.0f32; rows.len() * width];
    if width == 0 || shape.n_kv_heads == 0 {
        return out;
    }
    let (k, v) = kv.layer(layer);
    let ctx = Ctx {
        q,
        rows,
        k,
        v,
        kv,
        shape,
    };
    let mut units = Vec::new();
    let mut r = 0;
    while r < rows.len() {
        let mut len = 1;
        while r + len < rows.len() && len < TILE_ROWS && same_run(rows[r + len - 1], rows[r + len])
        {
            len += 1;
        }
        units.extend((0..shape.n_kv_heads).map(|g| (r, len, g)));
        r += len;
    }
    let work = |scores: &mut Vec<f32>, &(start, len, g): &(usize, usize, usize)| {
        ctx.tile(start, len, g, scores)
    };
    let positions: usize = rows.iter().map(|r| r.pos + 1).sum();
    let tiles: Vec<Vec<f32>> = if threads <= 1 || positions * width < 1 << 14 {
        let mut scores = Vec::new();
        units.iter().map(|u| work(&mut scores, u)).collect()
    } else {
        use rayon::prelude::*;
        units.par_iter().map_init(Vec::new, work).collect()
    };
    let unit = width / shape.n_kv_heads;
    for (&(start, _, g), tile) in units.iter().zip(&tiles) {
        for (i, part) in tile.chunks_exact(unit).enumerate() {
            let at = (start + i) * width + g * unit;
            out[at..at + unit].copy_from_slice(part);
        }
    }
    out
}

/// Whether row `b` continues row `a`'s sequence at the next position.
fn same_run(a: RowContext<'_>, b: RowContext<'_>) -> bool {
    std::ptr::eq(a.block_table, b.block_table) && b.pos == a.pos + 1
}

/// What every tile of one layer's attention reads.
struct Ctx<'a> {
    q: &'a [f32],
    rows: &'a [RowContext<'a>],
    k: &'a [f32],
    v: &'a [f32],
    kv: &'a KvStorage,
    shape: HeadShape,
}

impl Ctx<'_> {
    /// Rows `start..start + len` (one sequence, consecutive positions), the query heads of KV
    /// head `g`: returns `len × heads × head_dim` outputs. AVX-512 where the CPU has it.
    fn tile(&self, start: usize, len: usize, g: usize, scores: &mut Vec<f32>) -> Vec<f32> {
        #[cfg(target_arch = "x86_64")]
        if self.shape.head_dim.is_multiple_of(16) && std::arch::is_x86_feature_detected!("avx512f")
        {
            // Safety: the CPU has AVX-512F (checked above) and the head size is whole vectors.
            #[allow(unsafe_code)]
            return unsafe { avx512::tile(self, start, len, g, scores) };
        }
        attend_tile(self, start, len, g, scores, dot, axpy)
    }
}

/// The tile computation, with the inner products and updates passed in (plain or AVX-512).
#[inline(always)]
fn attend_tile(
    c: &Ctx<'_>,
    start: usize,
    len: usize,
    g: usize,
    scores: &mut Vec<f32>,
    dot: impl Fn(&[f32], &[f32]) -> f32,
    axpy: impl Fn(f32, &[f32], &mut [f32]),
) -> Vec<f32> {
    let hd = c.shape.head_dim;
    let heads = c.shape.n_heads / c.shape.n_kv_heads;
    let width = c.shape.n_heads * hd;
    let unit = heads * hd;
    let first = c.rows[start];
    let n_ctx = first.pos + len;
    let (bs, stride) = (c.kv.block_size, c.kv.slot_stride);
    let slot = |j: usize| (first.block_table[j / bs] as usize * bs + j % bs) * stride + g * hd;
    let scale = 1.0 / (hd as f32).sqrt();
    let query = |i: usize, h: usize| {
        let at = (start + i) * width + g * unit + h * hd;
        &c.q[at..at + hd]
    };
    scores.clear();
    scores.resize(len * heads * n_ctx, 0.0);
    // Row `i` sits at position `first.pos + i` and sees positions `0..=first.pos + i`.
    for j in 0..n_ctx {
        let kh = &c.k[slot(j)..slot(j) + hd];
        for i in j.saturating_sub(first.pos)..len {
            for h in 0..heads {
                scores[(i * heads + h) * n_ctx + j] = dot(query(i, h), kh) * scale;
            }
        }
    }
    for i in 0..len {
        for h in 0..heads {
            let at = (i * heads + h) * n_ctx;
            softmax(&mut scores[at..at + first.pos + i + 1]);
        }
    }
    let mut out = vec![0.0f32; len * unit];
    for j in 0..n_ctx {
        let vh = &c.v[slot(j)..slot(j) + hd];
        for i in j.saturating_sub(first.pos)..len {
            for h in 0..heads {
                let w = scores[(i * heads + h) * n_ctx + j];
                let at = (i * heads + h) * hd;
                axpy(w, vh, &mut out[at..at + hd]);
            }
        }
    }
    out
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{attend_tile, Ctx};

    /// [`super::Ctx::tile`] with 16-wide fused multiply-adds; the head size is a multiple of 16.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile(
        c: &Ctx<'_>,
        start: usize,
        len: usize,
        g: usize,
        scores: &mut Vec<f32>,
    ) -> Vec<f32> {
        attend_tile(
            c,
            start,
            len,
            g,
            scores,
            |a, b| {
                assert!(a.len() == b.len() && a.len().is_multiple_of(16));
                let mut acc = _mm512_setzero_ps();
                for i in (0..a.len()).step_by(16) {
                    // Safety: `i + 16 <= len` for both slices (asserted above).
                    let (x, y) = unsafe {
                        (
                            _mm512_loadu_ps(a.as_ptr().add(i)),
                            _mm512_loadu_ps(b.as_ptr().add(i)),
                        )
                    };
                    acc = _mm512_fmadd_ps(x, y, acc);
                }
                _mm512_reduce_add_ps(acc)
            },
            |w, x, out| {
                assert!(x.len() == out.len() && x.len().is_multiple_of(16));
                let w = _mm512_set1_ps(w);
                for i in (0..x.len()).step_by(16) {
                    // Safety: `i + 16 <= len` for both slices (asserted above).
                    unsafe {
                        let o = out.as_mut_ptr().add(i);
                        let y = _mm512_fmadd_ps(
                            w,
                            _mm512_loadu_ps(x.as_ptr().add(i)),
                            _mm512_loadu_ps(o),
                        );
                        _mm512_storeu_ps(o, y);
                    }
                }
            },
        )
    }
}

/// Softmax in place.
#[inline(always)]
fn softmax(s: &mut [f32]) {
    let max = s.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let mut sum = 0.0;
    for x in s.iter_mut() {
        *x = (*x - max).exp();
        sum += *x;
    }
    let inv = 1.0 / sum;
    for x in s.iter_mut() {
        *x *= inv;
    }
}

/// `out += w · x`.
#[inline(always)]
fn axpy(w: f32, x: &[f32], out: &mut [f32]) {
    for (o, &x) in out.iter_mut().zip(x) {
        *o += w * x;
    }
}

/// Dot product in sixteen independent lanes so that the compiler vectorises it.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..16 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s = 0.0;
    for half in [8, 4, 2, 1] {
        for l in 0..half {
            acc[l] += acc[l + half];
        }
    }
    s += acc[0];
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_at_zero_is_identity_and_preserves_norm() {
        for interleaved in [true, false] {
            let t = RopeTable::new(8, 10_000.0, 16, interleaved);
            let mut x = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0];
            let orig = x;
            t.apply(&mut x, 0);
            assert_eq!(x, orig);
            t.apply(&mut x, 7);
            let n0: f32 = orig.iter().map(|v| v * v).sum();
            let n1: f32 = x.iter().map(|v| v * v).sum();
            assert!((n0 - n1).abs() < 1e-3);
            assert_ne!(x, orig);
        }
    }

    #[test]
    fn single_position_attention_returns_its_value() {
        let shape = HeadShape {
            n_heads: 2,
            n_kv_heads: 1,
            head_dim: 2,
        };
        let mut kv = KvStorage::new(1, 2, 2, 2);
        kv.write(0, 2, &[1.0, 0.0], &[3.0, 4.0]);
        let table = [1u32];
        let rows = [RowContext {
            pos: 0,
            block_table: &table,
        }];
        let out = paged_attention(&[0.5, 0.5, 1.0, -1.0], &rows, &kv, 0, shape, 1);
        assert_eq!(out, vec![3.0, 4.0, 3.0, 4.0]);
    }

    #[test]
    fn grouped_heads_match_plain_softmax_attention() {
        // 6 query heads over 2 KV heads, 3 rows of one sequence spread over shuffled blocks.
        let shape = HeadShape {
            n_heads: 6,
            n_kv_heads: 2,
            head_dim: 20,
        };
        let (bs, stride) = (4, 2 * 20);
        let mut kv = KvStorage::new(1, 5, bs, stride);
        let table = [4u32, 1, 3, 0, 2];
        let val = |i: usize| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 1.5;
        for p in 0..18 {
            let slot = table[p / bs] as usize * bs + p % bs;
            let kk: Vec<f32> = (0..stride).map(|i| val(p * 131 + i)).collect();
            let vv: Vec<f32> = (0..stride).map(|i| val(p * 37 + i + 5)).collect();
            kv.write(0, slot, &kk, &vv);
        }
        // A lone row, a run of consecutive positions (attended as one tile) and another row.
        let positions = [0usize, 9, 10, 11, 12, 17];
        let rows: Vec<_> = positions
            .iter()
            .map(|&pos| RowContext {
                pos,
                block_table: &table,
            })
            .collect();
        let width = 6 * 20;
        let q: Vec<f32> = (0..positions.len() * width)
            .map(|i| val(i * 3 + 11))
            .collect();
        let got = paged_attention(&q, &rows, &kv, 0, shape, 1);
        let (k, v) = kv.layer(0);
        for (r, &pos) in positions.iter().enumerate() {
            for h in 0..6 {
                let g = h / 3;
                let at = |p: usize| (table[p / bs] as usize * bs + p % bs) * stride + g * 20;
                let qh = &q[r * width + h * 20..r * width + (h + 1) * 20];
                let logits: Vec<f64> = (0..=pos)
                    .map(|p| {
                        let d: f64 = (0..20).map(|i| (qh[i] * k[at(p) + i]) as f64).sum();
                        d / (20f64).sqrt()
                    })
                    .collect();
                let max = logits.iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
                let sum: f64 = e.iter().sum();
                for i in 0..20 {
                    let want: f64 = (0..=pos).map(|p| e[p] / sum * v[at(p) + i] as f64).sum();
                    let have = got[r * width + h * 20 + i] as f64;
                    assert!(
                        (want - have).abs() < 1e-5,
                        "row {r} head {h} [{i}]: {have} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_prefill_chunk_gives_each_row_its_result_alone() {
        let shape = HeadShape {
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 32,
        };
        let mut kv = KvStorage::new(1, 8, 8, 64);
        for s in 0..64 {
            let row: Vec<f32> = (0..64)
                .map(|i| ((s * 64 + i) as f32 * 0.013).sin())
                .collect();
            kv.write(
                0,
                s,
                &row,
                &row.iter().map(|x| x * 0.5 + 0.1).collect::<Vec<_>>(),
            );
        }
        let table = [5u32, 2, 7, 0, 1, 3, 6, 4];
        // Positions 3..=42 of one sequence: three tiles of 16, 16 and 8 rows.
        let rows: Vec<_> = (3..43)
            .map(|pos| RowContext {
                pos,
                block_table: &table,
            })
            .collect();
        let q: Vec<f32> = (0..rows.len() * 128)
            .map(|i| (i as f32 * 0.029).cos())
            .collect();
        let all = paged_attention(&q, &rows, &kv, 0, shape, 1);
        for (r, row) in rows.iter().enumerate() {
            let alone = paged_attention(&q[r * 128..(r + 1) * 128], &[*row], &kv, 0, shape, 1);
            assert_eq!(alone, all[r * 128..(r + 1) * 128], "row {r}");
        }
    }

    #[test]
    fn threaded_matches_single_threaded() {
        let shape = HeadShape {
            n_heads: 2,
            n_kv_heads: 1,
            head_dim: 4,
        };
        // Enough context that the threaded path runs (see `paged_attention`).
        let (blocks, bs) = (64, 16);
        let mut kv = KvStorage::new(1, blocks, bs, 4);
        for s in 0..blocks * bs {
            let f = (s as f32 * 0.01).sin();
            kv.write(0, s, &[f, 1.0, -f, 0.5], &[1.0, f, 2.0, -f]);
        }
        let table: Vec<u32> = (0..blocks as u32).rev().collect();
        let rows: Vec<_> = (0..64)
            .map(|p| RowContext {
                pos: p * 16 + 3,
                block_table: &table,
            })
            .collect();
        assert!(rows.iter().map(|r| r.pos + 1).sum::<usize>() * 8 >= 1 << 14);
        let q: Vec<f32> = (0..64 * 8).map(|i| (i as f32 * 0.37).sin()).collect();
        let a = paged_attention(&q, &rows, &kv, 0, shape, 1);
        let b = paged_attention(&q, &rows, &kv, 0, shape, 3);
        assert_eq!(a, b);
    }
}
