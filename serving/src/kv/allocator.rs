//! Block allocator with reference counts and a prefix cache.
//!
//! A block that holds a full run of computed tokens can be registered under a hash of its tokens
//! and of every token before it (a hash chain, so equal hashes mean equal prefixes). Later
//! sequences with the same prefix take a reference to the block instead of recomputing it.
//! Released blocks that carry a hash stay findable until the space is needed: allocation takes
//! never-hashed free blocks first, then evicts cached ones in least-recently-released order.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{Hash, Hasher};

pub type BlockId = u32;
pub type PrefixHash = u64;

#[derive(Debug)]
pub struct BlockAllocator {
    block_size: usize,
    refs: Vec<u32>,
    /// Hash and tokens of blocks registered in the prefix cache.
    hashed: Vec<Option<(PrefixHash, Vec<u32>)>>,
    /// Free blocks that carry no hash.
    free: VecDeque<BlockId>,
    /// Free blocks that are still in the prefix cache, oldest release first.
    evictable: BTreeMap<u64, BlockId>,
    evict_stamp: Vec<u64>,
    clock: u64,
    by_hash: HashMap<PrefixHash, BlockId>,
}

impl BlockAllocator {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        Self {
            block_size,
            refs: vec![0; num_blocks],
            hashed: vec![None; num_blocks],
            free: (0..num_blocks as BlockId).collect(),
            evictable: BTreeMap::new(),
            evict_stamp: vec![0; num_blocks],
            clock: 0,
            by_hash: HashMap::new(),
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.refs.len()
    }

    /// Blocks that can be handed out now (free or evictable).
    pub fn available(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    /// Blocks referenced by at least one sequence.
    pub fn used(&self) -> usize {
        self.num_blocks() - self.available()
    }

    /// Takes one block, evicting the least recently released cached block if needed.
    pub fn allocate(&mut self) -> Option<BlockId> {
        let b = match self.free.pop_front() {
            Some(b) => b,
            None => {
                let (&stamp, &b) = self.evictable.iter().next()?;
                self.evictable.remove(&stamp);
                if let Some((h, _)) = self.hashed[b as usize].take() {
                    self.by_hash.remove(&h);
                }
                b
            }
        };
        self.refs[b as usize] = 1;
        Some(b)
    }

    /// Drops one reference to each block.
    pub fn release(&mut self, blocks: &[BlockId]) {
        for &b in blocks {
            let r = &mut self.refs[b as usize];
            debug_assert!(*r > 0, "double release of block {b}");
            *r = r.saturating_sub(1);
            if *r == 0 {
                if self.hashed[b as usize].is_some() {
                    self.clock += 1;
                    self.evict_stamp[b as usize] = self.clock;
                    self.evictable.insert(self.clock, b);
                } else {
                    self.free.push_back(b);
                }
            }
        }
    }

    /// Hash of a full block of `tokens` following a prefix whose last block hashed to `parent`.
    pub fn chain_hash(parent: Option<PrefixHash>, tokens: &[u32]) -> PrefixHash {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        parent.hash(&mut h);
        tokens.hash(&mut h);
        h.finish()
    }

    /// Looks up a cached block; on a hit the caller owns one more reference to it.
    pub fn lookup(&mut self, hash: PrefixHash, tokens: &[u32]) -> Option<BlockId> {
        let b = *self.by_hash.get(&hash)?;
        match &self.hashed[b as usize] {
            Some((_, t)) if t == tokens => {}
            _ => return None,
        }
        if self.refs[b as usize] == 0 {
            self.evictable.remove(&self.evict_stamp[b as usize]);
        }
        self.refs[b as usize] += 1;
        Some(b)
    }

    /// Registers a block whose tokens are all computed, so that later prompts can share it.
    pub fn register(&mut self, block: BlockId, hash: PrefixHash, tokens: &[u32]) {
        if self.hashed[block as usize].is_some() || self.by_hash.contains_key(&hash) {
            return;
        }
        self.by_hash.insert(hash, block);
        self.hashed[block as usize] = Some((hash, tokens.to_vec()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocate_until_full_then_release_frees() {
        let mut a = BlockAllocator::new(3, 4);
        let bs: Vec<_> = (0..3).map(|_| a.allocate().unwrap()).collect();
        assert!(a.allocate().is_none());
        assert_eq!(a.used(), 3);
        a.release(&bs);
        assert_eq!(a.used(), 0);
        assert_eq!(a.available(), 3);
    }

    #[test]
    fn prefix_hit_shares_block_and_survives_release_until_evicted() {
        let mut a = BlockAllocator::new(2, 2);
        let toks = [5u32, 6];
        let h = BlockAllocator::chain_hash(None, &toks);
        let b = a.allocate().unwrap();
        a.register(b, h, &toks);
        assert_eq!(a.lookup(h, &toks), Some(b));
        a.release(&[b]);
        a.release(&[b]);
        assert_eq!(a.used(), 0);
        // still cached after release
        assert_eq!(a.lookup(h, &toks), Some(b));
        a.release(&[b]);
        // the never-hashed block goes first, then the cached one is evicted
        let c = a.allocate().unwrap();
        assert_ne!(c, b);
        let d = a.allocate().unwrap();
        assert_eq!(d, b);
        assert_eq!(a.lookup(h, &toks), None);
    }

    #[test]
    fn hash_chain_distinguishes_prefixes() {
        let p1 = BlockAllocator::chain_hash(None, &[1, 2]);
        let p2 = BlockAllocator::chain_hash(None, &[1, 3]);
        assert_ne!(
            BlockAllocator::chain_hash(Some(p1), &[9, 9]),
            BlockAllocator::chain_hash(Some(p2), &[9, 9])
        );
    }

    #[test]
    fn lookup_checks_tokens_not_only_hash() {
        let mut a = BlockAllocator::new(1, 2);
        let b = a.allocate().unwrap();
        a.register(b, 42, &[1, 2]);
        assert_eq!(a.lookup(42, &[3, 4]), None);
    }
}
