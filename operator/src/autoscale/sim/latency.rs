//! The step-time model of a simulated replica: a roofline, fitted to measurements.
//!
//! One engine step processes some prompt tokens (prefill, compute-bound: its FLOPs over the
//! GPUs' peak times an efficiency) and one token of every decoding sequence (bandwidth-bound:
//! weights and KV cache read once per step). The step takes the longer of the two plus a fixed
//! per-step cost and a small cost per decoding sequence (sampling, attention kernels launched per
//! sequence), which the pure roofline misses and the measurements show. The efficiencies and costs
//! are fitted per GPU class to SplitwiseSim's measured prompt and token times
//! (`splitwise-perf-model.csv`), and the fit error is reported, not assumed.

use std::path::Path;

use super::SimError;
use crate::plan::{Hardware, ModelArch};

/// Bytes per weight and per KV element: the measurements and the simulated fleets are 16-bit.
const BYTES: f64 = 2.0;

/// Fitted constants of one GPU class.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepCosts {
    /// Fixed cost of a step, seconds.
    pub fixed: f64,
    /// Share of peak dense TFLOP/s prefill reaches.
    pub compute_efficiency: f64,
    /// Share of peak memory bandwidth decode reaches.
    pub bandwidth_efficiency: f64,
    /// Extra seconds per decoding sequence in a step.
    pub per_sequence: f64,
    /// Extra fixed seconds of a step that carries prompt tokens (prefill kernels and their
    /// launch, measured separately from decode steps).
    pub prefill_fixed: f64,
}

/// A model on one replica layout of one GPU class.
#[derive(Debug, Clone)]
pub struct LatencyModel {
    costs: StepCosts,
    /// Total peak FLOP/s of the replica's GPUs.
    flops: f64,
    /// Total memory bandwidth of the replica's GPUs, bytes/s.
    bandwidth: f64,
    parameters: f64,
    /// FLOPs of attention per (query token × context token): 2 (QK and PV) × 2 × layers × width,
    /// without a causal discount (prefill kernels compute most of the masked half anyway).
    attention_unit: f64,
    /// KV-cache bytes per token of context.
    kv_bytes: f64,
}

impl LatencyModel {
    /// The model of `arch` over `tensor` GPUs of `hw` with fitted `costs`.
    pub fn new(
        arch: &ModelArch,
        hw: &Hardware,
        tensor: u32,
        costs: StepCosts,
    ) -> Result<Self, SimError> {
        let peak = hw
            .tflops(crate::api::Quantization::Bf16)
            .map_err(|message| SimError::Fleet { message })?;
        let width = f64::from(arch.attention_heads * arch.head_dim);
        Ok(Self {
            costs,
            flops: f64::from(tensor) * peak * 1e12,
            bandwidth: f64::from(tensor) * hw.bandwidth,
            parameters: arch.parameters,
            attention_unit: 4.0 * f64::from(arch.layers) * width,
            kv_bytes: 2.0
                * f64::from(arch.layers)
                * f64::from(arch.kv_heads * arch.head_dim)
                * BYTES,
        })
    }

    /// Attention FLOPs of a prefill chunk of `chunk` tokens after `done` tokens of the prompt.
    pub fn chunk_attention(&self, done: u32, chunk: u32) -> f64 {
        self.attention_unit * f64::from(chunk) * (f64::from(done) + f64::from(chunk))
    }

    /// Seconds one step takes with `prefill_tokens` prompt tokens (whose attention costs
    /// `attention_flops`), `decoding` sequences and `context_tokens` of KV cache to read.
    pub fn step(
        &self,
        prefill_tokens: f64,
        attention_flops: f64,
        decoding: f64,
        context_tokens: f64,
    ) -> f64 {
        let (compute, memory) =
            self.terms(prefill_tokens, attention_flops, decoding, context_tokens);
        let prefill_fixed = if prefill_tokens > 0.0 {
            self.costs.prefill_fixed
        } else {
            0.0
        };
        self.costs.fixed
            + prefill_fixed
            + (compute / self.costs.compute_efficiency)
                .max(memory / self.costs.bandwidth_efficiency)
            + self.costs.per_sequence * decoding
    }

    /// Seconds at 100% efficiency: (compute-bound time, bandwidth-bound time).
    fn terms(
        &self,
        prefill_tokens: f64,
        attention_flops: f64,
        decoding: f64,
        context_tokens: f64,
    ) -> (f64, f64) {
        let flops = 2.0 * self.parameters * (prefill_tokens + decoding) + attention_flops;
        let bytes = self.parameters * BYTES + self.kv_bytes * context_tokens;
        (flops / self.flops, bytes / self.bandwidth)
    }
}

/// How well the fitted model reproduces the measurements of one class.
#[derive(Debug, Clone, PartialEq)]
pub struct FitReport {
    /// GPU class.
    pub class: String,
    /// The fitted constants.
    pub costs: StepCosts,
    /// Rows fitted.
    pub rows: usize,
    /// Rows left out as outliers (more than 50% off the first fit).
    pub excluded: usize,
    /// Mean absolute percentage error of prompt (prefill) times.
    pub prefill_mape: f64,
    /// Mean absolute percentage error of per-token (decode) times.
    pub decode_mape: f64,
    /// Largest absolute percentage error of any row.
    pub max_error: f64,
}

/// One measured row, reduced to what the model uses.
struct Row {
    prefill: bool,
    model: LatencyModel,
    tokens: f64,
    attention: f64,
    batch: f64,
    context: f64,
    measured: f64,
}

/// The measured models: Llama-2-70B and BLOOM-176B, as published.
fn measured_arch(name: &str) -> Option<ModelArch> {
    let (parameters, layers, hidden, heads, kv_heads) = match name {
        "llama2-70b" => (69.0e9, 80, 8192, 64, 8),
        "bloom-176b" => (176.0e9, 70, 14336, 112, 112),
        _ => return None,
    };
    Some(ModelArch {
        parameters,
        embedding_parameters: 0.0,
        layers,
        hidden_size: hidden,
        intermediate_size: hidden * 4,
        attention_heads: heads,
        kv_heads,
        head_dim: hidden / heads,
        vocab_size: 32000,
        max_context: 8192,
    })
}

/// Fits [`StepCosts`] for `class` (a GPUClass, e.g. `h100`) to the rows of `csv` measured on
/// `csv_hardware` (e.g. `h100-80gb`), by least squares on relative error: prompt rows as
/// compute-bound prefills, token rows as bandwidth-bound decode steps.
pub fn fit(csv: &Path, csv_hardware: &str, hw: &Hardware) -> Result<FitReport, SimError> {
    let text = std::fs::read_to_string(csv).map_err(|e| SimError::Io {
        path: csv.to_owned(),
        message: e.to_string(),
    })?;
    let unit = StepCosts {
        fixed: 0.0,
        compute_efficiency: 1.0,
        bandwidth_efficiency: 1.0,
        per_sequence: 0.0,
        prefill_fixed: 0.0,
    };
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        if f.len() < 11 || f[1] != csv_hardware {
            continue;
        }
        let bad = || {
            SimError::Csv { path: csv.to_owned(), line: i + 1, message: "expected numbers in prompt_size, batch_size, token_size, prompt_time, token_time, tensor_parallel".into() }
        };
        let num = |k: usize| f[k].trim().parse::<f64>().map_err(|_| bad());
        let Some(arch) = measured_arch(f[0]) else {
            continue;
        };
        let (prompt, batch, tokens, prompt_ms, token_ms, tp) =
            (num(2)?, num(3)?, num(4)?, num(7)?, num(8)?, num(10)?);
        let model = LatencyModel::new(&arch, hw, tp as u32, unit)?;
        let attention = batch * model.chunk_attention(0, prompt as u32);
        rows.push(Row {
            prefill: true,
            model: model.clone(),
            tokens: prompt * batch,
            attention,
            batch: 0.0,
            context: 0.0,
            measured: prompt_ms / 1e3,
        });
        rows.push(Row {
            prefill: false,
            model,
            tokens: 0.0,
            attention: 0.0,
            batch,
            context: batch * (prompt + tokens / 2.0),
            measured: token_ms / 1e3,
        });
    }
    if rows.is_empty() {
        return Err(SimError::Csv {
            path: csv.to_owned(),
            line: 0,
            message: format!("no rows for hardware {csv_hardware}"),
        });
    }
    // Fit, then refit without the rows the first fit misses by more than half: a few rows are
    // inconsistent with their neighbours (e.g. a 64-prompt batch measured faster than an
    // 8-prompt one) and would otherwise dominate a relative-error fit.
    let all = vec![true; rows.len()];
    let first = solve_costs(&rows, &all).ok_or_else(|| singular(csv))?;
    let used: Vec<bool> = rows
        .iter()
        .map(|r| relative_error(r, first) <= 0.5)
        .collect();
    let costs = solve_costs(&rows, &used).ok_or_else(|| singular(csv))?;
    let (mut pre, mut dec, mut max_error) = ((0.0, 0usize), (0.0, 0usize), 0.0f64);
    for (r, _) in rows.iter().zip(&used).filter(|(_, u)| **u) {
        let err = relative_error(r, costs);
        max_error = max_error.max(err);
        let acc = if r.prefill { &mut pre } else { &mut dec };
        acc.0 += err;
        acc.1 += 1;
    }
    Ok(FitReport {
        class: hw.class.clone(),
        costs,
        rows: pre.1 + dec.1,
        excluded: rows.len() - pre.1 - dec.1,
        prefill_mape: pre.0 / pre.1.max(1) as f64,
        decode_mape: dec.0 / dec.1.max(1) as f64,
        max_error,
    })
}

fn singular(csv: &Path) -> SimError {
    SimError::Csv {
        path: csv.to_owned(),
        line: 0,
        message: "the measurements do not determine the model (singular fit)".into(),
    }
}

fn relative_error(r: &Row, costs: StepCosts) -> f64 {
    let model = LatencyModel {
        costs,
        ..r.model.clone()
    };
    (model.step(r.tokens, r.attention, r.batch, r.context) - r.measured).abs() / r.measured
}

/// Linear least squares in (fixed, 1/compute_eff, 1/bandwidth_eff, per_sequence,
/// prefill_fixed) over the `used` rows, each divided by its measurement so every row weighs its
/// relative error. An efficiency above 1 is not physical: when the free fit asks for one (decode
/// steps of these measurements are dominated by fixed costs, not by reading weights), it is held
/// at 1 and the other constants are refitted.
fn solve_costs(rows: &[Row], used: &[bool]) -> Option<StepCosts> {
    let features = |r: &Row| {
        let (c, m) = r.model.terms(r.tokens, r.attention, r.batch, r.context);
        let x = if r.prefill {
            [1.0, c, 0.0, 0.0, 1.0]
        } else {
            [1.0, 0.0, m, r.batch, 0.0]
        };
        x.map(|v| v / r.measured)
    };
    // `fixed[k]` holds parameter k at that value.
    let fit = |fixed: [Option<f64>; 5]| -> Option<[f64; 5]> {
        let free: Vec<usize> = (0..5).filter(|k| fixed[*k].is_none()).collect();
        let mut ata = [[0.0f64; 5]; 5];
        let mut atb = [0.0f64; 5];
        for (r, _) in rows.iter().zip(used).filter(|(_, u)| **u) {
            let x = features(r);
            let target = 1.0
                - (0..5)
                    .filter_map(|k| fixed[k].map(|v| v * x[k]))
                    .sum::<f64>();
            for (a, &ka) in free.iter().enumerate() {
                for (b, &kb) in free.iter().enumerate() {
                    ata[a][b] += x[ka] * x[kb];
                }
                atb[a] += x[ka] * target;
            }
        }
        // Pad the unused dimensions with an identity so one solver serves every case.
        for (k, row) in ata.iter_mut().enumerate().skip(free.len()) {
            row[k] = 1.0;
        }
        let solved = solve(ata, atb)?;
        let mut p = fixed.map(|v| v.unwrap_or(0.0));
        for (a, &k) in free.iter().enumerate() {
            p[k] = solved[a];
        }
        Some(p)
    };
    let mut fixed = [None; 5];
    let mut p = fit(fixed)?;
    for k in [1, 2] {
        if p[k] < 1.0 {
            fixed[k] = Some(1.0);
            p = fit(fixed)?;
        }
    }
    Some(StepCosts {
        fixed: p[0].max(0.0),
        compute_efficiency: 1.0 / p[1],
        bandwidth_efficiency: 1.0 / p[2],
        per_sequence: p[3].max(0.0),
        prefill_fixed: p[4].max(0.0),
    })
}

/// Solves a small linear system by Gaussian elimination with partial pivoting.
fn solve<const N: usize>(mut a: [[f64; N]; N], mut b: [f64; N]) -> Option<[f64; N]> {
    for col in 0..N {
        let pivot = (col..N).max_by(|x, y| a[*x][col].abs().total_cmp(&a[*y][col].abs()))?;
        if a[pivot][col].abs() < 1e-300 {
            return None;
        }
        a.swap(col, pivot);
        b.swap(col, pivot);
        let pivot_row = a[col];
        for row in col + 1..N {
            let f = a[row][col] / pivot_row[col];
            for (k, v) in a[row].iter_mut().enumerate().skip(col) {
                *v -= f * pivot_row[k];
            }
            b[row] -= f * b[col];
        }
    }
    let mut x = [0.0; N];
    for row in (0..N).rev() {
        let s: f64 = (row + 1..N).map(|k| a[row][k] * x[k]).sum();
        x[row] = (b[row] - s) / a[row][row];
    }
    Some(x)
}
