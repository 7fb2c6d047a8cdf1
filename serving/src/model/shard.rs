//! How a model is split over the ranks of a tensor × pipeline parallel group.
//!
//! Rank `r` of a `tp × pp` group is tensor rank `r % tp` of pipeline stage `r / tp`. A stage
//! holds a contiguous range of layers (the first stage also the embedding, the last the final
//! norm and the LM head). Inside a stage, tensor parallelism splits the attention heads, the KV
//! heads and the MLP's inner dimension across the ranks (column-parallel Q/K/V and gate/up,
//! row-parallel output and down projections followed by an all-reduce), and the vocabulary of the
//! embedding and the LM head (each rank looks up or scores its slice of the vocabulary).

use std::ops::Range;

use super::LlamaConfig;

/// The shape of a parallel group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Tensor-parallel ranks per stage.
    pub tp: usize,
    /// Pipeline stages.
    pub pp: usize,
}

impl Layout {
    /// A single rank holding the whole model.
    pub const SINGLE: Self = Self { tp: 1, pp: 1 };

    /// Ranks in the group.
    pub fn world(&self) -> usize {
        self.tp * self.pp
    }

    /// Pipeline stage of `rank`.
    pub fn stage(&self, rank: usize) -> usize {
        rank / self.tp
    }

    /// Tensor rank of `rank` inside its stage.
    pub fn tp_rank(&self, rank: usize) -> usize {
        rank % self.tp
    }

    /// Global ranks of `stage`, in tensor-rank order: the group its all-reduces run over.
    pub fn stage_ranks(&self, stage: usize) -> Vec<usize> {
        (stage * self.tp..(stage + 1) * self.tp).collect()
    }

    /// Checks that `cfg` can be split this way; the message says which sizes would work.
    pub fn check(&self, cfg: &LlamaConfig) -> Result<(), String> {
        if self.tp == 0 || self.pp == 0 {
            return Err("tensor and pipeline parallelism must be at least 1".into());
        }
        let divides = |t: usize| {
            cfg.n_heads.is_multiple_of(t)
                && cfg.n_kv_heads.is_multiple_of(t)
                && cfg.ffn.is_multiple_of(t)
        };
        if !divides(self.tp) {
            let ok: Vec<String> = (1..=cfg.n_kv_heads)
                .filter(|t| divides(*t))
                .map(|t| t.to_string())
                .collect();
            return Err(format!(
                "tensor parallelism {} must divide the model's {} attention heads, {} KV heads and MLP width {}; this model can use {}",
                self.tp,
                cfg.n_heads,
                cfg.n_kv_heads,
                cfg.ffn,
                ok.join(", ")
            ));
        }
        if self.pp > cfg.n_layers {
            return Err(format!(
                "pipeline parallelism {} is more than the model's {} layers",
                self.pp, cfg.n_layers
            ));
        }
        Ok(())
    }

    /// What `rank` holds of a model with `cfg`'s sizes. Call [`Layout::check`] first.
    pub fn shard(&self, rank: usize, cfg: &LlamaConfig) -> Shard {
        let stage = self.stage(rank);
        Shard {
            tp_rank: self.tp_rank(rank),
            tp: self.tp,
            layers: split(cfg.n_layers, self.pp, stage),
            first: stage == 0,
            last: stage + 1 == self.pp,
        }
    }
}

/// The part of the model one rank holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    /// Tensor rank inside the stage.
    pub tp_rank: usize,
    /// Tensor ranks in the stage.
    pub tp: usize,
    /// Layers of this stage.
    pub layers: Range<usize>,
    /// The first stage: holds the embedding and takes token ids.
    pub first: bool,
    /// The last stage: holds the final norm and the LM head and produces logits.
    pub last: bool,
}

impl Shard {
    /// The whole model on one rank.
    pub fn whole(n_layers: usize) -> Self {
        Self {
            tp_rank: 0,
            tp: 1,
            layers: 0..n_layers,
            first: true,
            last: true,
        }
    }

    /// This rank's slice of `n` items split over the tensor ranks.
    pub fn part(&self, n: usize) -> Range<usize> {
        split(n, self.tp, self.tp_rank)
    }
}

/// Part `i` of `n` items split into `parts` contiguous ranges as even as possible, the earlier
/// parts taking one more when it does not divide.
pub fn split(n: usize, parts: usize, i: usize) -> Range<usize> {
    let base = n / parts;
    let extra = n % parts;
    let start = i * base + i.min(extra);
    start..start + base + usize::from(i < extra)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smollm2() -> LlamaConfig {
        LlamaConfig {
            architecture: "llama".into(),
            n_layers: 30,
            hidden: 576,
            ffn: 1536,
            n_heads: 9,
            n_kv_heads: 3,
            head_dim: 64,
            vocab: 49152,
            rope_theta: 100_000.0,
            rms_eps: 1e-5,
            context_length: 8192,
            rope_interleaved: true,
        }
    }

    #[test]
    fn split_covers_everything_once_in_order() {
        for n in [0, 1, 5, 30, 49152, 49153] {
            for parts in 1..=7 {
                let ranges: Vec<_> = (0..parts).map(|i| split(n, parts, i)).collect();
                assert_eq!(ranges[0].start, 0);
                assert_eq!(ranges[parts - 1].end, n);
                for w in ranges.windows(2) {
                    assert_eq!(w[0].end, w[1].start);
                    assert!(w[0].len() >= w[1].len() && w[0].len() - w[1].len() <= 1);
                }
            }
        }
    }

    #[test]
    fn tp_must_divide_heads_and_kv_heads() {
        let cfg = smollm2();
        let e = Layout { tp: 2, pp: 1 }.check(&cfg).unwrap_err();
        assert!(e.contains("9 attention heads, 3 KV heads"), "{e}");
        assert!(e.ends_with("this model can use 1, 3"), "{e}");
        Layout { tp: 3, pp: 2 }.check(&cfg).unwrap();
        let e = Layout { tp: 1, pp: 31 }.check(&cfg).unwrap_err();
        assert!(e.contains("31 is more than the model's 30 layers"), "{e}");
    }

    #[test]
    fn ranks_map_to_stages_and_layer_ranges() {
        let cfg = smollm2();
        let l = Layout { tp: 3, pp: 2 };
        assert_eq!(l.world(), 6);
        let s4 = l.shard(4, &cfg);
        assert_eq!(
            (s4.tp_rank, s4.layers.clone(), s4.first, s4.last),
            (1, 15..30, false, true)
        );
        let s0 = l.shard(0, &cfg);
        assert_eq!(
            (s0.tp_rank, s0.layers.clone(), s0.first, s0.last),
            (0, 0..15, true, false)
        );
        assert_eq!(l.stage_ranks(1), vec![3, 4, 5]);
        assert_eq!(s4.part(9), 3..6);
    }
}
