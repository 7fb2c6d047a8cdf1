//! One simulated replica: continuous batching simulated step by step.
//!
//! Each step admits waiting requests up to the batch limit, spends the token budget on one decode
//! token per running sequence and the rest on prompt chunks in arrival order (chunked prefill, as
//! vLLM and llmo-serve schedule), and lasts as long as the latency model says. Decoding sequences
//! sit in a heap keyed by the step of their last token, so a step costs O(1) plus completions and
//! a day of traffic simulates in seconds. The replica keeps the same histograms and counters as
//! llmo-serve, so the autoscaler reads it through the same signal code.

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, VecDeque},
};

use super::{latency::LatencyModel, trace::Request};
use crate::autoscale::{histogram, Histogram, PodMetrics};

/// Engine limits of a replica.
#[derive(Debug, Clone, Copy)]
pub struct EngineLimits {
    /// Tokens one step may process (decode plus prefill chunks).
    pub max_batch_tokens: u32,
    /// Sequences running at once (the KV-cache limit, in sequences).
    pub max_running: usize,
}

/// What happened to one request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Outcome {
    /// Arrival time.
    pub arrival: f64,
    /// Time to first token, seconds.
    pub ttft: f64,
    /// Mean time per output token after the first, seconds (0 for one-token outputs).
    pub tpot: f64,
}

#[derive(Debug, Clone, Copy)]
struct Seq {
    req: Request,
    prefilled: u32,
    first_token: f64,
}

/// A simulated replica.
#[derive(Debug)]
pub struct Replica {
    /// Name, as a pod would have.
    pub name: String,
    /// When it was created.
    pub created: f64,
    /// When it serves (created + cold start).
    pub ready_at: f64,
    /// Taking no new requests; removed once empty.
    pub draining: bool,
    clock: f64,
    step_index: u64,
    waiting: VecDeque<Request>,
    prefilling: VecDeque<Seq>,
    decoding: BinaryHeap<Reverse<(u64, usize)>>,
    decoding_seqs: Vec<Option<Seq>>,
    free_slots: Vec<usize>,
    context_tokens: f64,
    busy_total: f64,
    ttft: Histogram,
    itl: Histogram,
    prompt_tokens: f64,
    generation_tokens: f64,
}

impl Replica {
    /// A replica created at `created` that serves from `ready_at`.
    pub fn new(name: String, created: f64, ready_at: f64) -> Self {
        Self {
            name,
            created,
            ready_at,
            draining: false,
            clock: ready_at,
            step_index: 0,
            waiting: VecDeque::new(),
            prefilling: VecDeque::new(),
            decoding: BinaryHeap::new(),
            decoding_seqs: Vec::new(),
            free_slots: Vec::new(),
            context_tokens: 0.0,
            busy_total: 0.0,
            ttft: Histogram::with_bounds(&histogram::ttft_bounds()),
            itl: Histogram::with_bounds(&histogram::itl_bounds()),
            prompt_tokens: 0.0,
            generation_tokens: 0.0,
        }
    }

    /// Requests not yet finished.
    pub fn outstanding(&self) -> usize {
        self.waiting.len() + self.prefilling.len() + self.decoding.len()
    }

    /// Whether it takes requests at `now`.
    pub fn routable(&self, now: f64) -> bool {
        !self.draining && now >= self.ready_at
    }

    /// Queues a request that arrived now.
    pub fn enqueue(&mut self, req: Request) {
        self.waiting.push_back(req);
    }

    /// Seconds spent computing since creation.
    pub fn busy_total(&self) -> f64 {
        self.busy_total
    }

    /// What a scrape of this replica's `/metrics` would return; `busy` is the caller's
    /// windowed busy ratio (llmo-serve computes it over its last ten seconds).
    pub fn scrape(&self, busy: f64) -> PodMetrics {
        PodMetrics {
            ttft: Some(self.ttft.clone()),
            itl: Some(self.itl.clone()),
            running: Some((self.prefilling.len() + self.decoding.len()) as f64),
            waiting: Some(self.waiting.len() as f64),
            kv_usage: None,
            busy: Some(busy),
            prompt_tokens: Some(self.prompt_tokens),
            generation_tokens: Some(self.generation_tokens),
        }
    }

    /// Runs steps until the replica's clock reaches `until` or it runs out of work.
    pub fn advance(
        &mut self,
        until: f64,
        model: &LatencyModel,
        limits: EngineLimits,
        done: &mut Vec<Outcome>,
    ) {
        while self.clock < until {
            if self.outstanding() == 0 {
                self.clock = until;
                return;
            }
            self.step(model, limits, done);
        }
    }

    fn step(&mut self, model: &LatencyModel, limits: EngineLimits, done: &mut Vec<Outcome>) {
        while self.prefilling.len() + self.decoding.len() < limits.max_running {
            let Some(req) = self.waiting.pop_front() else {
                break;
            };
            self.prompt_tokens += f64::from(req.prompt);
            self.prefilling.push_back(Seq {
                req,
                prefilled: 0,
                first_token: 0.0,
            });
        }
        let decoding = self.decoding.len() as f64;
        let mut budget = limits
            .max_batch_tokens
            .saturating_sub(self.decoding.len() as u32);
        let mut prefill_tokens = 0u32;
        let mut attention = 0.0;
        let mut finished_prefill = 0usize;
        for seq in self.prefilling.iter_mut() {
            if budget == 0 {
                break;
            }
            let chunk = (seq.req.prompt - seq.prefilled).min(budget);
            attention += model.chunk_attention(seq.prefilled, chunk);
            seq.prefilled += chunk;
            prefill_tokens += chunk;
            budget -= chunk;
            if seq.prefilled == seq.req.prompt {
                finished_prefill += 1;
            }
        }
        let duration = model.step(
            f64::from(prefill_tokens),
            attention,
            decoding,
            self.context_tokens,
        );
        let end = self.clock + duration;
        self.busy_total += duration;
        self.clock = end;
        let step = self.step_index;
        self.step_index += 1;
        if decoding > 0.0 {
            self.itl.observe_n(duration, decoding);
            self.generation_tokens += decoding;
            self.context_tokens += decoding;
        }
        // Sequences whose last token came out in this step.
        while let Some(Reverse((last, slot))) = self.decoding.peek().copied() {
            if last > step {
                break;
            }
            self.decoding.pop();
            let seq = self.decoding_seqs[slot].take().unwrap();
            self.free_slots.push(slot);
            self.context_tokens -= f64::from(seq.req.prompt + seq.req.output - 1);
            let tpot = (end - seq.first_token) / f64::from(seq.req.output - 1);
            done.push(Outcome {
                arrival: seq.req.arrival,
                ttft: seq.first_token - seq.req.arrival,
                tpot,
            });
        }
        // Prompts completed in this step produce their first token at its end.
        for _ in 0..finished_prefill {
            let Some(mut seq) = self.prefilling.pop_front() else {
                break;
            };
            seq.first_token = end;
            let ttft = end - seq.req.arrival;
            self.ttft.observe_n(ttft, 1.0);
            self.generation_tokens += 1.0;
            if seq.req.output <= 1 {
                done.push(Outcome {
                    arrival: seq.req.arrival,
                    ttft,
                    tpot: 0.0,
                });
                continue;
            }
            self.context_tokens += f64::from(seq.req.prompt);
            let slot = match self.free_slots.pop() {
                Some(s) => {
                    self.decoding_seqs[s] = Some(seq);
                    s
                }
                None => {
                    self.decoding_seqs.push(Some(seq));
                    self.decoding_seqs.len() - 1
                }
            };
            self.decoding
                .push(Reverse((step + u64::from(seq.req.output - 1), slot)));
        }
    }

    /// Requests still here at the end of a run, as outcomes measured up to `now` (a request
    /// without a first token counts its whole wait as TTFT).
    pub fn unfinished(&self, now: f64) -> Vec<Outcome> {
        let waiting = self.waiting.iter().map(|r| Outcome {
            arrival: r.arrival,
            ttft: now - r.arrival,
            tpot: 0.0,
        });
        let prefilling = self.prefilling.iter().map(|s| Outcome {
            arrival: s.req.arrival,
            ttft: now - s.req.arrival,
            tpot: 0.0,
        });
        let decoding = self.decoding_seqs.iter().flatten().map(|s| Outcome {
            arrival: s.req.arrival,
            ttft: s.first_token - s.req.arrival,
            tpot: 0.0,
        });
        waiting.chain(prefilling).chain(decoding).collect()
    }
}
