//! Continuous-batching scheduler over the paged KV cache.
//!
//! Every step, each running sequence asks to compute its not-yet-computed tokens: one for a
//! decoding sequence, a chunk of the prompt for one still in prefill. Running sequences go first
//! (oldest first), so decodes are never stalled by a long prompt; the rest of the step's token
//! budget (`--max-batch-tokens`) admits waiting sequences, whose prompts are split into chunks
//! that fit. When the cache runs out of blocks, the youngest running sequence is preempted: its
//! blocks are released and it returns to the front of the queue to be recomputed later (its
//! already-generated tokens are kept and recomputed as part of its prompt).
//!
//! Prompt blocks that are fully computed are registered in the prefix cache, so a new sequence
//! starting with the same tokens (a shared system prompt, or a preempted sequence coming back)
//! reuses them instead of recomputing.

use std::collections::VecDeque;

use crate::kv::{BlockAllocator, BlockId, PrefixHash};

#[derive(Debug, Clone, Copy)]
pub struct SchedulerConfig {
    pub max_batch_tokens: usize,
    pub max_running: usize,
    /// Blocks kept free when admitting new sequences, so running ones can keep decoding.
    pub watermark_blocks: usize,
}

/// A sequence and its cache bookkeeping; `data` is the caller's per-sequence state.
#[derive(Debug)]
pub struct Sequence<T> {
    pub id: u64,
    /// Prompt followed by generated tokens.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    /// Tokens whose K/V is in the cache.
    pub computed: usize,
    pub blocks: Vec<BlockId>,
    hashes: Vec<PrefixHash>,
    /// Prompt tokens found in the prefix cache at the last admission.
    pub cached_tokens: usize,
    pub data: T,
}

impl<T> Sequence<T> {
    pub fn new(id: u64, prompt: Vec<u32>, data: T) -> Self {
        Self {
            id,
            prompt_len: prompt.len(),
            tokens: prompt,
            computed: 0,
            blocks: Vec::new(),
            hashes: Vec::new(),
            cached_tokens: 0,
            data,
        }
    }

    pub fn generated(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }
}

/// One sequence's work in a step: `len` tokens starting at `start`, for `running[index]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scheduled {
    pub index: usize,
    pub start: usize,
    pub len: usize,
    /// The chunk reaches the end of the sequence, so the step yields its next token.
    pub wants_logits: bool,
}

/// Prefix-cache counters, in tokens.
#[derive(Debug, Default, Clone, Copy)]
pub struct PrefixStats {
    pub queried: u64,
    pub hits: u64,
}

#[derive(Debug)]
pub struct Scheduler<T> {
    cfg: SchedulerConfig,
    alloc: BlockAllocator,
    pub waiting: VecDeque<Sequence<T>>,
    pub running: Vec<Sequence<T>>,
    pub prefix: PrefixStats,
    pub preemptions: u64,
}

impl<T> Scheduler<T> {
    pub fn new(cfg: SchedulerConfig, num_blocks: usize, block_size: usize) -> Self {
        Self {
            cfg,
            alloc: BlockAllocator::new(num_blocks, block_size),
            waiting: VecDeque::new(),
            running: Vec::new(),
            prefix: PrefixStats::default(),
            preemptions: 0,
        }
    }

    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    pub fn block_size(&self) -> usize {
        self.alloc.block_size()
    }

    /// Fraction of blocks referenced by sequences.
    pub fn usage(&self) -> f64 {
        self.alloc.used() as f64 / self.alloc.num_blocks().max(1) as f64
    }

    pub fn enqueue(&mut self, seq: Sequence<T>) {
        self.waiting.push_back(seq);
    }

    fn reset(alloc: &mut BlockAllocator, seq: &mut Sequence<T>) {
        alloc.release(&seq.blocks);
        seq.blocks.clear();
        seq.hashes.clear();
        seq.computed = 0;
    }

    fn preempt(&mut self, mut seq: Sequence<T>) {
        Self::reset(&mut self.alloc, &mut seq);
        self.preemptions += 1;
        tracing::debug!(seq = seq.id, "preempted: KV cache full, will recompute");
        self.waiting.push_front(seq);
    }

    /// Allocates blocks so `seq` can hold `upto` tokens. On failure nothing is kept.
    fn grow(alloc: &mut BlockAllocator, seq: &mut Sequence<T>, upto: usize) -> bool {
        let need = upto.div_ceil(alloc.block_size());
        let mut got = Vec::new();
        while seq.blocks.len() + got.len() < need {
            match alloc.allocate() {
                Some(b) => got.push(b),
                None => {
                    alloc.release(&got);
                    return false;
                }
            }
        }
        seq.blocks.extend(got);
        true
    }

    /// Reuses cached blocks for the longest cached prefix, keeping at least one token to compute.
    fn match_prefix(&mut self, seq: &mut Sequence<T>) {
        let bs = self.alloc.block_size();
        let usable = seq.tokens.len().saturating_sub(1) / bs;
        let mut parent = None;
        for i in 0..usable {
            let toks = &seq.tokens[i * bs..(i + 1) * bs];
            let h = BlockAllocator::chain_hash(parent, toks);
            match self.alloc.lookup(h, toks) {
                Some(b) => {
                    seq.blocks.push(b);
                    seq.hashes.push(h);
                    parent = Some(h);
                }
                None => break,
            }
        }
        seq.computed = seq.blocks.len() * bs;
        seq.cached_tokens = seq.computed.min(seq.prompt_len);
        self.prefix.queried += seq.prompt_len as u64;
        self.prefix.hits += seq.cached_tokens as u64;
    }

    /// Plans the next step.
    pub fn schedule(&mut self) -> Vec<Scheduled> {
        let mut budget = self.cfg.max_batch_tokens;
        let mut plan = Vec::new();
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let seq = &self.running[i];
            let take = (seq.tokens.len() - seq.computed).min(budget);
            if take == 0 {
                i += 1;
                continue;
            }
            let upto = seq.computed + take;
            if Self::grow(&mut self.alloc, &mut self.running[i], upto) {
                let seq = &self.running[i];
                plan.push(Scheduled {
                    index: i,
                    start: seq.computed,
                    len: take,
                    wants_logits: upto == seq.tokens.len(),
                });
                budget -= take;
                i += 1;
            } else if self.running.len() > i + 1 {
                let victim = self.running.pop().expect("non-empty");
                self.preempt(victim);
            } else {
                let me = self.running.remove(i);
                self.preempt(me);
            }
        }
        while budget > 0 && self.running.len() < self.cfg.max_running {
            let Some(mut seq) = self.waiting.pop_front() else {
                break;
            };
            if seq.blocks.is_empty() {
                self.match_prefix(&mut seq);
            }
            let take = (seq.tokens.len() - seq.computed).min(budget);
            let upto = seq.computed + take;
            let new_blocks = upto.div_ceil(self.alloc.block_size()) - seq.blocks.len();
            let reserve = if self.running.is_empty() {
                0
            } else {
                self.cfg.watermark_blocks
            };
            if self.alloc.available() < new_blocks + reserve
                || !Self::grow(&mut self.alloc, &mut seq, upto)
            {
                Self::reset(&mut self.alloc, &mut seq);
                self.waiting.push_front(seq);
                break;
            }
            plan.push(Scheduled {
                index: self.running.len(),
                start: seq.computed,
                len: take,
                wants_logits: upto == seq.tokens.len(),
            });
            budget -= take;
            self.running.push(seq);
        }
        plan
    }

    /// Records that a planned chunk was computed and registers newly full blocks.
    pub fn commit(&mut self, s: Scheduled) {
        let bs = self.alloc.block_size();
        let seq = &mut self.running[s.index];
        seq.computed = s.start + s.len;
        while (seq.hashes.len() + 1) * bs <= seq.computed {
            let i = seq.hashes.len();
            let toks = &seq.tokens[i * bs..(i + 1) * bs];
            let h = BlockAllocator::chain_hash(seq.hashes.last().copied(), toks);
            self.alloc.register(seq.blocks[i], h, toks);
            seq.hashes.push(h);
        }
    }

    /// Removes running sequences for which `done` is true, releasing their blocks.
    pub fn remove_running(
        &mut self,
        mut done: impl FnMut(&Sequence<T>) -> bool,
    ) -> Vec<Sequence<T>> {
        let mut out = Vec::new();
        let mut keep = Vec::with_capacity(self.running.len());
        for mut s in self.running.drain(..) {
            if done(&s) {
                Self::reset(&mut self.alloc, &mut s);
                out.push(s);
            } else {
                keep.push(s);
            }
        }
        self.running = keep;
        out
    }

    /// Removes waiting sequences for which `done` is true.
    pub fn remove_waiting(
        &mut self,
        mut done: impl FnMut(&Sequence<T>) -> bool,
    ) -> Vec<Sequence<T>> {
        let mut out = Vec::new();
        let mut keep = VecDeque::with_capacity(self.waiting.len());
        for mut s in self.waiting.drain(..) {
            if done(&s) {
                Self::reset(&mut self.alloc, &mut s);
                out.push(s);
            } else {
                keep.push_back(s);
            }
        }
        self.waiting = keep;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(blocks: usize, budget: usize) -> Scheduler<()> {
        Scheduler::new(
            SchedulerConfig {
                max_batch_tokens: budget,
                max_running: 64,
                watermark_blocks: 0,
            },
            blocks,
            4,
        )
    }

    fn run_step(s: &mut Scheduler<()>, next_token: u32) -> Vec<Scheduled> {
        let plan = s.schedule();
        for p in &plan {
            s.commit(*p);
            if p.wants_logits {
                s.running[p.index].tokens.push(next_token);
            }
        }
        plan
    }

    #[test]
    fn long_prompt_is_chunked_and_decodes_keep_running() {
        let mut s = sched(64, 8);
        s.enqueue(Sequence::new(1, vec![1, 2, 3], ()));
        run_step(&mut s, 9); // seq 1 prefilled, first token sampled
        s.enqueue(Sequence::new(2, (0..20).collect(), ()));
        let plan = run_step(&mut s, 9);
        // seq 1 decodes one token, seq 2 gets the remaining 7 of the budget
        assert_eq!(plan[0].len, 1);
        assert_eq!(plan[1].len, 7);
        assert!(!plan[1].wants_logits);
        let plan = run_step(&mut s, 9);
        assert_eq!(plan[0].len, 1);
        assert_eq!((plan[1].start, plan[1].len), (7, 7));
    }

    #[test]
    fn preempts_youngest_when_blocks_run_out_and_recomputes_later() {
        // 4 blocks of 4 tokens: two sequences of 7 tokens fit (2 blocks each) until they grow.
        let mut s = sched(4, 64);
        s.enqueue(Sequence::new(1, (0..7).collect(), ()));
        s.enqueue(Sequence::new(2, (100..107).collect(), ()));
        run_step(&mut s, 50); // both have 8 tokens now, 7 computed, 2 blocks each
        assert_eq!(s.running.len(), 2);
        run_step(&mut s, 51); // both compute token 8 -> still 2 blocks; now 9 tokens
        let plan = s.schedule(); // both need a third block: seq 2 is preempted
        assert_eq!(plan.len(), 1);
        assert_eq!(s.running[0].id, 1);
        assert_eq!(s.waiting[0].id, 2);
        assert_eq!(s.waiting[0].computed, 0);
        assert_eq!(s.waiting[0].tokens.len(), 9, "generated tokens are kept");
        assert_eq!(s.preemptions, 1);
    }

    #[test]
    fn shared_prefix_blocks_are_reused() {
        let mut s = sched(16, 64);
        let prompt: Vec<u32> = (0..10).collect();
        s.enqueue(Sequence::new(1, prompt.clone(), ()));
        run_step(&mut s, 77);
        let mut p2 = prompt.clone();
        p2.push(99);
        s.enqueue(Sequence::new(2, p2, ()));
        let plan = run_step(&mut s, 77);
        let second = plan.iter().find(|p| s.running[p.index].id == 2).unwrap();
        // two full blocks (8 tokens) come from the cache
        assert_eq!(second.start, 8);
        assert_eq!(s.running[1].blocks[..2], s.running[0].blocks[..2]);
        assert_eq!(s.prefix.hits, 8);
    }

    #[test]
    fn finished_sequences_free_their_blocks() {
        let mut s = sched(8, 64);
        s.enqueue(Sequence::new(1, (0..9).collect(), ()));
        run_step(&mut s, 1);
        assert!(s.usage() > 0.0);
        let removed = s.remove_running(|_| true);
        assert_eq!(removed.len(), 1);
        assert_eq!(s.usage(), 0.0);
    }

    #[test]
    fn waiting_sequence_that_does_not_fit_waits() {
        let mut s = sched(2, 64);
        s.enqueue(Sequence::new(1, (0..8).collect(), ()));
        s.enqueue(Sequence::new(2, (10..18).collect(), ()));
        let plan = s.schedule();
        assert_eq!(plan.len(), 1);
        assert_eq!(s.waiting.len(), 1);
        assert!(s.waiting[0].blocks.is_empty());
    }
}
