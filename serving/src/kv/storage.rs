//! The K/V tensors themselves: per layer, one f32 buffer laid out
//! `[block][slot in block][kv head][head dim]`.
//!
//! Buffers are allocated zeroed (`vec![0.0; n]`), which the allocator serves from fresh pages, so
//! memory is only committed as blocks are first written.

/// K/V storage for all layers.
#[derive(Debug)]
pub struct KvStorage {
    pub block_size: usize,
    pub num_blocks: usize,
    /// Elements per token slot in one layer (kv heads × head dim).
    pub slot_stride: usize,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl KvStorage {
    pub fn new(n_layers: usize, num_blocks: usize, block_size: usize, slot_stride: usize) -> Self {
        let n = num_blocks * block_size * slot_stride;
        Self {
            block_size,
            num_blocks,
            slot_stride,
            k: (0..n_layers).map(|_| vec![0.0; n]).collect(),
            v: (0..n_layers).map(|_| vec![0.0; n]).collect(),
        }
    }

    /// Capacity in tokens.
    pub fn capacity_tokens(&self) -> usize {
        self.num_blocks * self.block_size
    }

    /// Writes one token's K and V (each `slot_stride` long) at physical `slot`.
    pub fn write(&mut self, layer: usize, slot: usize, k: &[f32], v: &[f32]) {
        let s = slot * self.slot_stride;
        self.k[layer][s..s + self.slot_stride].copy_from_slice(k);
        self.v[layer][s..s + self.slot_stride].copy_from_slice(v);
    }

    /// K and V buffers of one layer.
    pub fn layer(&self, layer: usize) -> (&[f32], &[f32]) {
        (&self.k[layer], &self.v[layer])
    }

    /// Bytes for one token across all layers.
    pub fn bytes_per_token(n_layers: usize, slot_stride: usize) -> usize {
        2 * n_layers * slot_stride * std::mem::size_of::<f32>()
    }
}
