//! The strategies compared: static peak provisioning, HPA on GPU utilization, KEDA on queue depth,
//! a forecasting planner, llmo's SLO policy and an oracle.

use super::cluster::Cluster;
use crate::autoscale::{
    compute_signals, decide, PolicyConfig, PolicyState, ScrapeHistory, SignalConfig,
};

/// What every strategy may know before the run.
#[derive(Debug, Clone)]
pub struct Knowledge {
    /// Tokens per second one replica serves within the SLO (calibrated offline).
    pub capacity: f64,
    /// Requests outstanding per replica at that load (Little's law), the KEDA target.
    pub concurrency: f64,
    /// Demand in tokens per second per 60 s bin (only the oracle and static peak look ahead).
    pub demand_60: Vec<f64>,
    /// Demand in tokens per second per 10 s bin (the oracle's view).
    pub demand_10: Vec<f64>,
    /// Utilization target of the SLO.
    pub utilization: f64,
    /// Replica bounds.
    pub min: u32,
    /// Replica bounds.
    pub max: u32,
}

/// A scaling strategy.
#[derive(Debug)]
pub enum Scaler {
    /// A fixed count sized for the peak minute.
    Static,
    /// HPA on mean GPU utilization: 15 s sync, tolerance 0.1, 300 s scale-down stabilization,
    /// reading a 30 s average that is 15 s old (exporter and Prometheus scrape lag).
    Hpa { history: Vec<(f64, u32)> },
    /// KEDA on queue depth (waiting plus running): 30 s polling, 15 s query lag, 300 s cooldown.
    Keda { history: Vec<(f64, u32)> },
    /// Re-sizes every 180 s for a linear forecast of the next interval's demand.
    Planner,
    /// llmo's policy, on its own scrapes of the pods every interval.
    Slo {
        cfg: Box<PolicyConfig>,
        state: PolicyState,
        history: ScrapeHistory,
        signal: SignalConfig,
        startup: f64,
        decisions: Vec<crate::autoscale::Decision>,
    },
    /// Knows the next 30 s of demand and starts replicas instantly: a lower bound on GPU time.
    Oracle,
}

impl Scaler {
    /// Name in the table.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Static => "static-peak",
            Self::Hpa { .. } => "hpa-gpu-util",
            Self::Keda { .. } => "keda-queue",
            Self::Planner => "planner-180s",
            Self::Slo { .. } => "llmo-slo",
            Self::Oracle => "oracle",
        }
    }

    /// Seconds between decisions.
    pub fn period(&self) -> u64 {
        match self {
            Self::Static => u64::MAX,
            Self::Hpa { .. } => 15,
            Self::Keda { .. } => 30,
            Self::Planner => 180,
            Self::Slo { cfg, .. } => cfg.interval.max(1.0) as u64,
            Self::Oracle => 1,
        }
    }

    /// Replicas at time 0.
    pub fn initial(&self, k: &Knowledge) -> u32 {
        match self {
            Self::Static => per_capacity(
                k.demand_60.iter().copied().fold(0.0, f64::max),
                k.capacity,
                k,
            ),
            // Every other strategy starts sized for the first five minutes, so the comparison is
            // about following the load, not about a cold fleet at time zero.
            _ => per_capacity(
                k.demand_60.iter().take(5).copied().fold(0.0, f64::max),
                k.capacity * k.utilization,
                k,
            ),
        }
    }

    /// The replica count wanted at `now`.
    pub fn decide(&mut self, now: f64, cluster: &Cluster, k: &Knowledge) -> u32 {
        let current = cluster.target;
        match self {
            Self::Static => current,
            Self::Oracle => {
                // The busiest 10 s of the next 30 s, at full capacity, with instant replicas.
                let bin = (now / 10.0) as usize;
                let peak = k
                    .demand_10
                    .iter()
                    .skip(bin)
                    .take(3)
                    .copied()
                    .fold(0.0, f64::max);
                per_capacity(peak, k.capacity, k)
            }
            Self::Planner => {
                let bin = (now / 60.0) as usize;
                let mean = |from: usize, to: usize| {
                    let s = &k.demand_60[from.min(k.demand_60.len())..to.min(k.demand_60.len())];
                    s.iter().sum::<f64>() / s.len().max(1) as f64
                };
                let last = mean(bin.saturating_sub(3), bin);
                let prev = mean(bin.saturating_sub(6), bin.saturating_sub(3));
                let forecast = last.max(2.0 * last - prev);
                per_capacity(forecast, k.capacity * k.utilization, k)
            }
            Self::Hpa { history } => {
                let window: Vec<f64> = cluster
                    .samples
                    .iter()
                    .filter(|s| s.0 > now - 45.0 && s.0 <= now - 15.0)
                    .map(|s| s.1)
                    .collect();
                if window.is_empty() {
                    return current;
                }
                let util = window.iter().sum::<f64>() / window.len() as f64;
                let ratio = util / k.utilization;
                let raw = if (ratio - 1.0).abs() <= 0.1 {
                    current
                } else {
                    (f64::from(current) * ratio).ceil() as u32
                };
                let raw = raw.min(current.saturating_mul(2).max(current + 4));
                hpa_stabilize(history, now, raw.clamp(k.min, k.max), current)
            }
            Self::Keda { history } => {
                let Some(sample) = cluster.samples.iter().rev().find(|s| s.0 <= now - 15.0) else {
                    return current;
                };
                let ratio = sample.2 / (k.concurrency * f64::from(current.max(1)));
                let raw = if (ratio - 1.0).abs() <= 0.1 {
                    current
                } else {
                    (sample.2 / k.concurrency).ceil() as u32
                };
                hpa_stabilize(history, now, raw.clamp(k.min, k.max), current)
            }
            Self::Slo {
                cfg,
                state,
                history,
                signal,
                startup,
                decisions,
            } => {
                let scrapes = cluster.scrape(now);
                for (pod, m) in &scrapes {
                    history.record(pod, now, m.clone());
                }
                let names: Vec<&str> = scrapes.iter().map(|(p, _)| p.as_str()).collect();
                history.prune(&names, now, signal.window + cfg.interval);
                let Ok(signals) = compute_signals(history, &names, now, signal) else {
                    return current;
                };
                let ages = cluster.starting_ages(now);
                let obs = crate::autoscale::Observation {
                    now,
                    signals: &signals,
                    ready: cluster.ready(now),
                    starting_ages: &ages,
                    current,
                    startup_time: Some(*startup),
                };
                let (decision, next) = decide(cfg, state, &obs);
                *state = next;
                let to = decision.to;
                if to != decision.from {
                    decisions.push(decision);
                }
                to
            }
        }
    }
}

fn per_capacity(demand: f64, capacity: f64, k: &Knowledge) -> u32 {
    ((demand / capacity.max(1e-9)).ceil() as u32).clamp(k.min, k.max)
}

/// HPA's scale-down stabilization: the highest recommendation of the last 300 s; scale-ups apply
/// at once.
fn hpa_stabilize(history: &mut Vec<(f64, u32)>, now: f64, raw: u32, current: u32) -> u32 {
    history.push((now, raw));
    history.retain(|(t, _)| *t > now - 300.0);
    if raw >= current {
        raw
    } else {
        history
            .iter()
            .map(|(_, r)| *r)
            .max()
            .unwrap_or(raw)
            .min(current)
    }
}
