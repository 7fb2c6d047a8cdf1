//! Running one step over a tensor × pipeline parallel group.
//!
//! Rank 0 leads: it runs the scheduler and the sampler, and for every step sends the plan (each
//! sequence's tokens, start position, block table) to every other rank. The block tables are the
//! leader's; every rank keeps its own KV storage for its layers and KV heads, laid out in the same
//! blocks, so no rank needs its own allocator. The ranks of a stage run their layers together
//! (all-reducing inside the stage), pass the hidden states to the same tensor rank of the next
//! stage, and tensor rank 0 of the last stage sends the logits back to rank 0.
//!
//! With pipeline stages the leader splits a step into micro-batches (one per stage, when there are
//! enough sequences): while stage 1 runs the first micro-batch, stage 0 already runs the second,
//! so the stages overlap instead of waiting for each other.

use std::sync::Arc;

use crate::dist::{CommError, Communicator, Tag};
use crate::kv::KvStorage;
use crate::model::{shard::Layout, LlamaModel, ModelError, StageOutput, StepInput};

/// A message from the leader to the other ranks.
#[derive(Debug, Clone, PartialEq)]
pub enum Control {
    /// Size of the KV cache in blocks of `block_size` tokens; sent once, before any step.
    Init {
        num_blocks: usize,
        block_size: usize,
    },
    /// Run a step (or one micro-batch of it).
    Step(Plan),
    /// Stop cleanly.
    Shutdown,
}

/// One sequence's share of a step, owned, as it travels between ranks.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanInput {
    pub tokens: Vec<u32>,
    pub start: usize,
    pub block_table: Vec<u32>,
    pub want_logits: bool,
}

/// A step (or micro-batch) as every rank runs it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Plan {
    pub every_row: bool,
    pub inputs: Vec<PlanInput>,
}

impl Plan {
    fn from_inputs(inputs: &[StepInput<'_>], every_row: bool) -> Self {
        Self {
            every_row,
            inputs: inputs
                .iter()
                .map(|i| PlanInput {
                    tokens: i.tokens.to_vec(),
                    start: i.start,
                    block_table: i.block_table.to_vec(),
                    want_logits: i.want_logits,
                })
                .collect(),
        }
    }

    fn step_inputs(&self) -> Vec<StepInput<'_>> {
        self.inputs
            .iter()
            .map(|i| StepInput {
                tokens: &i.tokens,
                start: i.start,
                block_table: &i.block_table,
                want_logits: i.want_logits,
            })
            .collect()
    }

    /// Rows with logits this plan produces.
    fn logit_rows(&self) -> usize {
        if self.every_row {
            self.inputs.iter().map(|i| i.tokens.len()).sum()
        } else {
            self.inputs
                .iter()
                .filter(|i| i.want_logits && !i.tokens.is_empty())
                .count()
        }
    }
}

impl Control {
    /// Wire form: a kind byte, then little-endian u32 fields.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        let put = |b: &mut Vec<u8>, v: usize| b.extend_from_slice(&(v as u32).to_le_bytes());
        match self {
            Self::Init {
                num_blocks,
                block_size,
            } => {
                b.push(0);
                put(&mut b, *num_blocks);
                put(&mut b, *block_size);
            }
            Self::Step(plan) => {
                b.push(1);
                b.push(u8::from(plan.every_row));
                put(&mut b, plan.inputs.len());
                for i in &plan.inputs {
                    put(&mut b, i.start);
                    b.push(u8::from(i.want_logits));
                    put(&mut b, i.tokens.len());
                    for t in &i.tokens {
                        put(&mut b, *t as usize);
                    }
                    put(&mut b, i.block_table.len());
                    for t in &i.block_table {
                        put(&mut b, *t as usize);
                    }
                }
            }
            Self::Shutdown => b.push(2),
        }
        b
    }

    /// Reads [`Control::encode`]'s form; anything malformed is a protocol error.
    pub fn decode(bytes: &[u8]) -> Result<Self, CommError> {
        let mut r = Reader { b: bytes, at: 0 };
        let msg = match r.u8()? {
            0 => Self::Init {
                num_blocks: r.u32()? as usize,
                block_size: r.u32()? as usize,
            },
            1 => {
                let every_row = r.u8()? != 0;
                let n = r.len()?;
                let mut inputs = Vec::with_capacity(n);
                for _ in 0..n {
                    let start = r.u32()? as usize;
                    let want_logits = r.u8()? != 0;
                    let tokens = r.u32s()?;
                    let block_table = r.u32s()?;
                    inputs.push(PlanInput {
                        tokens,
                        start,
                        block_table,
                        want_logits,
                    });
                }
                Self::Step(Plan { every_row, inputs })
            }
            2 => Self::Shutdown,
            k => {
                return Err(CommError::Protocol(format!(
                    "unknown control message kind {k}"
                )))
            }
        };
        if r.at != bytes.len() {
            return Err(CommError::Protocol(format!(
                "control message has {} trailing bytes",
                bytes.len() - r.at
            )));
        }
        Ok(msg)
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], CommError> {
        let s = self
            .b
            .get(self.at..self.at + n)
            .ok_or_else(|| CommError::Protocol("control message is truncated".into()))?;
        self.at += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, CommError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, CommError> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    /// A count that must fit in what is left (4 bytes per element at least).
    fn len(&mut self) -> Result<usize, CommError> {
        let n = self.u32()? as usize;
        if n > (self.b.len() - self.at) / 4 + 1 {
            return Err(CommError::Protocol(format!(
                "control message announces {n} entries but is shorter"
            )));
        }
        Ok(n)
    }
    fn u32s(&mut self) -> Result<Vec<u32>, CommError> {
        let n = self.len()?;
        (0..n).map(|_| self.u32()).collect()
    }
}

/// What runs the model for the engine: the whole model in this thread, or rank 0 of a group.
#[derive(Debug)]
pub enum Executor {
    Single { model: LlamaModel, kv: KvStorage },
    Leader(Leader),
}

impl Executor {
    /// Runs one step; see [`LlamaModel::step`].
    pub fn step(&mut self, inputs: &[StepInput<'_>]) -> Result<Vec<Vec<f32>>, ModelError> {
        match self {
            Self::Single { model, kv } => model.step(inputs, kv),
            Self::Leader(l) => l.step(inputs, false),
        }
    }

    /// The model this executor runs (rank 0's shard for a group).
    pub fn model(&self) -> &LlamaModel {
        match self {
            Self::Single { model, .. } => model,
            Self::Leader(l) => &l.model,
        }
    }
}

/// Rank 0 of a group.
#[derive(Debug)]
pub struct Leader {
    model: LlamaModel,
    kv: KvStorage,
    comm: Arc<dyn Communicator>,
    layout: Layout,
}

impl Leader {
    /// Tells every rank the KV cache size and returns the leader. `model` is rank 0's shard.
    pub fn start(
        mut model: LlamaModel,
        comm: Arc<dyn Communicator>,
        layout: Layout,
        num_blocks: usize,
        block_size: usize,
    ) -> Result<Self, ModelError> {
        if layout.tp > 1 {
            model.set_tensor_group(comm.clone(), layout.stage_ranks(0));
        }
        let init = Control::Init {
            num_blocks,
            block_size,
        }
        .encode();
        for r in 1..layout.world() {
            comm.send(r, Tag::Control, &init)?;
        }
        let kv = KvStorage::new(
            model.local_layers(),
            num_blocks,
            block_size,
            model.kv_slot_stride(),
        );
        Ok(Self {
            model,
            kv,
            comm,
            layout,
        })
    }

    /// Runs one step over the group; with `every_row`, the logits after every token.
    pub fn step(
        &mut self,
        inputs: &[StepInput<'_>],
        every_row: bool,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let micro = self.layout.pp.min(inputs.len()).max(1);
        let plans: Vec<Plan> = (0..micro)
            .map(|i| {
                let part = crate::model::shard::split(inputs.len(), micro, i);
                Plan::from_inputs(&inputs[part], every_row)
            })
            .collect();
        let mut logits = Vec::new();
        for plan in &plans {
            let msg = Control::Step(plan.clone()).encode();
            for r in 1..self.layout.world() {
                self.comm.send(r, Tag::Control, &msg)?;
            }
            let out = self
                .model
                .forward(&plan.step_inputs(), &mut self.kv, every_row, None)?;
            match out {
                StageOutput::Logits(l) => logits.extend(l),
                StageOutput::Hidden(h) => {
                    self.comm.send_f32(self.layout.tp, Tag::Activation, &h)?
                }
            }
        }
        if self.layout.pp > 1 {
            let last = (self.layout.pp - 1) * self.layout.tp;
            let vocab = self.model.config.vocab;
            for plan in &plans {
                let flat = self.comm.recv_f32(last, Tag::Logits)?;
                if flat.len() != plan.logit_rows() * vocab {
                    return Err(CommError::Protocol(format!(
                        "rank {last} sent {} logits for {} rows of {vocab}",
                        flat.len(),
                        plan.logit_rows()
                    ))
                    .into());
                }
                logits.extend(flat.chunks(vocab).map(<[f32]>::to_vec));
            }
        }
        Ok(logits)
    }

    /// The next-token logits after every token of one sequence (for perplexity).
    pub fn logits_all(&mut self, input: StepInput<'_>) -> Result<Vec<Vec<f32>>, ModelError> {
        self.step(&[input], true)
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        let msg = Control::Shutdown.encode();
        for r in 1..self.layout.world() {
            let _ = self.comm.send(r, Tag::Control, &msg);
        }
    }
}

/// The loop of every rank but 0: wait for the leader's plans and run this rank's part of each,
/// until the leader says stop (`Ok`) or a peer is lost (`Err`).
pub fn follow(
    mut model: LlamaModel,
    comm: Arc<dyn Communicator>,
    layout: Layout,
) -> Result<(), ModelError> {
    let rank = comm.rank();
    let stage = layout.stage(rank);
    if layout.tp > 1 {
        model.set_tensor_group(comm.clone(), layout.stage_ranks(stage));
    }
    let mut kv: Option<KvStorage> = None;
    loop {
        match Control::decode(&comm.recv(0, Tag::Control)?)? {
            Control::Init {
                num_blocks,
                block_size,
            } => {
                kv = Some(KvStorage::new(
                    model.local_layers(),
                    num_blocks,
                    block_size,
                    model.kv_slot_stride(),
                ));
            }
            Control::Step(plan) => {
                let kv = kv.as_mut().ok_or_else(|| {
                    CommError::Protocol("a step arrived before the KV cache size".into())
                })?;
                let hidden = if stage > 0 {
                    Some(comm.recv_f32(rank - layout.tp, Tag::Activation)?)
                } else {
                    None
                };
                match model.forward(&plan.step_inputs(), kv, plan.every_row, hidden)? {
                    StageOutput::Hidden(h) => {
                        comm.send_f32(rank + layout.tp, Tag::Activation, &h)?
                    }
                    StageOutput::Logits(l) => {
                        if layout.tp_rank(rank) == 0 {
                            let flat: Vec<f32> = l.into_iter().flatten().collect();
                            comm.send_f32(0, Tag::Logits, &flat)?;
                        }
                    }
                }
            }
            Control::Shutdown => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_messages_round_trip() {
        let msgs = [
            Control::Init {
                num_blocks: 1024,
                block_size: 16,
            },
            Control::Shutdown,
            Control::Step(Plan::default()),
            Control::Step(Plan {
                every_row: true,
                inputs: vec![
                    PlanInput {
                        tokens: vec![1, 2, 49151],
                        start: 7,
                        block_table: vec![3, 0, 9],
                        want_logits: true,
                    },
                    PlanInput {
                        tokens: vec![],
                        start: 0,
                        block_table: vec![],
                        want_logits: false,
                    },
                ],
            }),
        ];
        for m in msgs {
            assert_eq!(Control::decode(&m.encode()).unwrap(), m);
        }
    }

    #[test]
    fn malformed_control_messages_are_errors_not_panics() {
        let good = Control::Step(Plan {
            every_row: false,
            inputs: vec![PlanInput {
                tokens: vec![5; 10],
                start: 0,
                block_table: vec![1],
                want_logits: true,
            }],
        })
        .encode();
        for cut in 0..good.len() {
            assert!(Control::decode(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = good.clone();
        long.push(0);
        assert!(Control::decode(&long).is_err());
        assert!(Control::decode(&[9]).is_err());
        // A huge announced count on a short message.
        assert!(Control::decode(&[1, 0, 255, 255, 255, 255]).is_err());
        // Deterministic pseudo-random bytes never panic.
        let mut x = 0x2545_f491_u32;
        for _ in 0..2000 {
            let n = (x % 64) as usize;
            let bytes: Vec<u8> = (0..n)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            let _ = Control::decode(&bytes);
        }
    }
}
