//! Turning logits into the next token: penalties, temperature, top-k, top-p, seeded RNG.

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::request::SamplingParams;

#[derive(Debug)]
pub struct Sampler {
    temperature: f32,
    top_p: f32,
    top_k: usize,
    presence: f32,
    frequency: f32,
    rng: StdRng,
    counts: HashMap<u32, u32>,
}

impl Sampler {
    pub fn new(p: &SamplingParams) -> Self {
        let rng = match p.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_os_rng(),
        };
        Self {
            temperature: p.temperature,
            top_p: p.top_p,
            top_k: p.top_k,
            presence: p.presence_penalty,
            frequency: p.frequency_penalty,
            rng,
            counts: HashMap::new(),
        }
    }

    /// Records a generated token (for the penalties).
    pub fn observe(&mut self, token: u32) {
        *self.counts.entry(token).or_default() += 1;
    }

    /// Picks the next token. `logits` is modified.
    pub fn sample(&mut self, logits: &mut [f32]) -> u32 {
        for (&tok, &c) in &self.counts {
            if let Some(l) = logits.get_mut(tok as usize) {
                *l -= self.presence + self.frequency * c as f32;
            }
        }
        if self.temperature <= 0.0 {
            return argmax(logits);
        }
        let inv_t = 1.0 / self.temperature;
        let mut cand: Vec<(f32, u32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (l * inv_t, i as u32))
            .collect();
        if cand.is_empty() {
            return argmax(logits);
        }
        let desc = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        if self.top_k > 0 && self.top_k < cand.len() {
            cand.select_nth_unstable_by(self.top_k - 1, desc);
            cand.truncate(self.top_k);
        }
        // Only nucleus sampling needs the candidates in order; sorting the whole vocabulary
        // for every token is otherwise the most expensive part of sampling.
        if self.top_p < 1.0 || self.top_k > 0 {
            cand.sort_unstable_by(desc);
        }
        let max = cand.iter().map(|c| c.0).fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<f32> = cand.iter().map(|c| (c.0 - max).exp()).collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
        let mut keep = probs.len();
        if self.top_p < 1.0 {
            let mut acc = 0.0;
            for (i, p) in probs.iter().enumerate() {
                acc += p;
                if acc >= self.top_p {
                    keep = i + 1;
                    break;
                }
            }
        }
        let total: f32 = probs[..keep].iter().sum();
        let mut r = self.rng.random::<f32>() * total;
        for i in 0..keep {
            r -= probs[i];
            if r <= 0.0 {
                return cand[i].1;
            }
        }
        cand[keep - 1].1
    }
}

/// Index of the largest logit; the lowest index wins a tie.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(t: f32) -> SamplingParams {
        SamplingParams {
            temperature: t,
            seed: Some(7),
            ..Default::default()
        }
    }

    #[test]
    fn greedy_takes_the_max() {
        let mut s = Sampler::new(&params(0.0));
        assert_eq!(s.sample(&mut [0.1, 3.0, 2.0]), 1);
    }

    #[test]
    fn same_seed_same_tokens() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.7).sin()).collect();
        let run = || {
            let mut s = Sampler::new(&params(1.0));
            (0..20)
                .map(|_| s.sample(&mut logits.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(), run());
    }

    #[test]
    fn top_k_one_is_greedy() {
        let mut p = params(5.0);
        p.top_k = 1;
        let mut s = Sampler::new(&p);
        for _ in 0..20 {
            assert_eq!(s.sample(&mut [0.0, 1.0, 0.5]), 1);
        }
    }

    #[test]
    fn small_top_p_keeps_only_the_head() {
        let mut p = params(1.0);
        p.top_p = 0.1;
        let mut s = Sampler::new(&p);
        for _ in 0..20 {
            assert_eq!(s.sample(&mut [0.0, 4.0, 1.0, 2.0]), 1);
        }
    }

    #[test]
    fn frequency_penalty_moves_off_repeated_token() {
        let mut p = params(0.0);
        p.frequency_penalty = 1.0;
        let mut s = Sampler::new(&p);
        s.observe(0);
        s.observe(0);
        assert_eq!(s.sample(&mut [2.5, 1.0]), 1);
        let mut p = params(0.0);
        p.presence_penalty = 2.0;
        let mut s = Sampler::new(&p);
        s.observe(0);
        assert_eq!(s.sample(&mut [2.5, 1.0]), 1);
    }
}
