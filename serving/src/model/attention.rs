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

/// Causal attention of each row's query heads over its sequence's cached K/V, positions
/// `0..=pos`. `q` is `rows × (n_heads·head_dim)`; the result has the same shape.
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
    let (k, v) = kv.layer(layer);
    let work = |first_row: usize, out_rows: &mut [f32]| {
        let mut scores = Vec::new();
        for (i, o) in out_rows.chunks_mut(width).enumerate() {
            let r = first_row + i;
            attend_row(
                &q[r * width..(r + 1) * width],
                rows[r],
                k,
                v,
                kv,
                shape,
                o,
                &mut scores,
            );
        }
    };
    let n_rows = rows.len();
    if threads <= 1 || n_rows < 2 {
        work(0, &mut out);
    } else {
        let per = n_rows.div_ceil(threads);
        std::thread::scope(|s| {
            for (t, chunk) in out.chunks_mut(per * width).enumerate() {
                let work = &work;
                s.spawn(move || work(t * per, chunk));
            }
        });
    }
    out
}

#[allow(clippy::too_many_arguments)]
fn attend_row(
    q: &[f32],
    row: RowContext<'_>,
    k: &[f32],
    v: &[f32],
    kv: &KvStorage,
    shape: HeadShape,
    out: &mut [f32],
    scores: &mut Vec<f32>,
) {
    let hd = shape.head_dim;
    let group = shape.n_heads / shape.n_kv_heads;
    let stride = kv.slot_stride;
    let bs = kv.block_size;
    let n_ctx = row.pos + 1;
    let scale = 1.0 / (hd as f32).sqrt();
    for h in 0..shape.n_heads {
        let g = h / group;
        let qh = &q[h * hd..(h + 1) * hd];
        scores.clear();
        let mut max = f32::NEG_INFINITY;
        for j in 0..n_ctx {
            let slot = row.block_table[j / bs] as usize * bs + j % bs;
            let kh = &k[slot * stride + g * hd..slot * stride + (g + 1) * hd];
            let s = dot(qh, kh) * scale;
            max = max.max(s);
            scores.push(s);
        }
        let mut sum = 0.0;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        let inv = 1.0 / sum;
        let oh = &mut out[h * hd..(h + 1) * hd];
        for (j, &w) in scores.iter().enumerate() {
            let slot = row.block_table[j / bs] as usize * bs + j % bs;
            let vh = &v[slot * stride + g * hd..slot * stride + (g + 1) * hd];
            let w = w * inv;
            for (o, &x) in oh.iter_mut().zip(vh) {
                *o += w * x;
            }
        }
    }
}

/// Dot product in eight independent lanes so that the compiler vectorises it.
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        for l in 0..8 {
            acc[l] += a[c * 8 + l] * b[c * 8 + l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for i in chunks * 8..a.len() {
        s += a[i] * b[i];
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
    fn threaded_matches_single_threaded() {
        let shape = HeadShape {
            n_heads: 2,
            n_kv_heads: 1,
            head_dim: 4,
        };
        let mut kv = KvStorage::new(1, 4, 2, 4);
        for s in 0..8 {
            let f = s as f32;
            kv.write(0, s, &[f, 1.0, -f, 0.5], &[1.0, f, 2.0, -f]);
        }
        let table = [3u32, 0, 2, 1];
        let rows: Vec<_> = (0..8)
            .map(|p| RowContext {
                pos: p,
                block_table: &table,
            })
            .collect();
        let q: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin()).collect();
        let a = paged_attention(&q, &rows, &kv, 0, shape, 1);
        let b = paged_attention(&q, &rows, &kv, 0, shape, 3);
        assert_eq!(a, b);
    }
}
