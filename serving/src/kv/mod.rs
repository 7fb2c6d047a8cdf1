//! Paged KV cache: fixed-size blocks of K/V storage, a block allocator with reference counts,
//! and a prefix cache that lets sequences with an identical prompt prefix share blocks.

mod allocator;
mod storage;

pub use allocator::{BlockAllocator, BlockId, PrefixHash};
pub use storage::KvStorage;

/// Capacity problems found while sizing the cache.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error("the KV cache holds {capacity} tokens, fewer than one full context of {context} tokens; raise --kv-cache-fraction / --kv-cache-tokens or lower --context-length")]
    TooSmall { capacity: usize, context: usize },
}
