//! The strategies compared: static peak provisioning, HPA on GPU utilization, KEDA on queue depth,
//! a forecasting planner, llmo's SLO policy and an oracle; on request, llmo's policy in `external`
//! mode too, its recommendation followed by KEDA.

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
    /// A fixed count sized for the peak minute at `utilization` of the calibrated capacity.
    Static { utilization: f64 },
    /// HPA on mean GPU utilization toward `target`: 15 s sync, tolerance 0.1, 300 s scale-down
    /// stabilization, reading a 30 s average that is 15 s old (exporter and Prometheus scrape
    /// lag).
    Hpa {
        target: f64,
        history: Vec<(f64, u32)>,
    },
    /// KEDA on queue depth (waiting plus running) toward `per_replica` requests per replica:
    /// 30 s polling, 15 s query lag, 300 s cooldown.
    Keda {
        per_replica: f64,
        history: Vec<(f64, u32)>,
    },
    /// Re-sizes every 180 s for a linear forecast of the next interval's demand, at
    /// `utilization` of the calibrated capacity.
    Planner { utilization: f64 },
    /// llmo's policy, on its own scrapes of the pods every interval. With `follower`, it runs as
    /// in `external` mode: it only recommends, and KEDA sets the count.
    Slo {
        cfg: Box<PolicyConfig>,
        state: PolicyState,
        history: ScrapeHistory,
        signal: SignalConfig,
        startup: f64,
        decisions: Vec<crate::autoscale::Decision>,
        follower: Option<Follower>,
    },
    /// Knows the next 30 s of demand and starts replicas instantly, sized at `utilization` of the
    /// calibrated capacity: at 1, a lower bound on GPU time.
    Oracle { utilization: f64 },
}

impl Scaler {
    /// Every strategy at its default setting: the baselines as they are usually configured
    /// (static for the peak, HPA, KEDA and the planner toward the SLO's utilization or one
    /// replica's concurrency at capacity) and llmo's policy as `cfg` says.
    pub fn defaults(k: &Knowledge, cfg: &PolicyConfig, startup: f64) -> Vec<Self> {
        vec![
            Self::Static { utilization: 1.0 },
            Self::hpa(k.utilization),
            Self::keda(k.concurrency),
            Self::Planner {
                utilization: k.utilization,
            },
            Self::slo(cfg.clone(), startup),
            Self::Oracle { utilization: 1.0 },
        ]
    }

    /// HPA toward a mean busy ratio of `target`.
    pub fn hpa(target: f64) -> Self {
        Self::Hpa {
            target,
            history: Vec::new(),
        }
    }

    /// KEDA toward `per_replica` outstanding requests per replica.
    pub fn keda(per_replica: f64) -> Self {
        Self::Keda {
            per_replica,
            history: Vec::new(),
        }
    }

    /// llmo's policy with `cfg`, replicas taking `startup` seconds to start.
    pub fn slo(cfg: PolicyConfig, startup: f64) -> Self {
        Self::Slo {
            signal: SignalConfig::for_interval(cfg.interval),
            cfg: Box::new(cfg),
            state: PolicyState::default(),
            history: ScrapeHistory::default(),
            startup,
            decisions: Vec::new(),
            follower: None,
        }
    }

    /// llmo's policy with `cfg` in `external` mode, its recommendation followed by KEDA as
    /// `examples/autoscaling/keda-scaledobject.yaml` sets it up.
    pub fn slo_via_keda(cfg: PolicyConfig, startup: f64) -> Self {
        let mut scaler = Self::slo(cfg, startup);
        if let Self::Slo { follower, .. } = &mut scaler {
            *follower = Some(Follower::default());
        }
        scaler
    }

    /// The strategy's main setting, in words: what a sweep varies.
    pub fn setting(&self) -> String {
        match self {
            Self::Static { utilization }
            | Self::Planner { utilization }
            | Self::Oracle { utilization } => {
                format!("utilization {utilization:.2}")
            }
            Self::Hpa { target, .. } => format!("busy target {target:.2}"),
            Self::Keda { per_replica, .. } => format!("{per_replica:.1} requests/replica"),
            Self::Slo { cfg, .. } => format!("utilization {:.2}", cfg.utilization_target),
        }
    }

    /// Name in the table.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Static { .. } => "static-peak",
            Self::Hpa { .. } => "hpa-gpu-util",
            Self::Keda { .. } => "keda-queue",
            Self::Planner { .. } => "planner-180s",
            Self::Slo { follower: None, .. } => "llmo-slo",
            Self::Slo { .. } => "llmo-via-keda",
            Self::Oracle { .. } => "oracle",
        }
    }

    /// Seconds between decisions.
    pub fn period(&self) -> u64 {
        match self {
            Self::Static { .. } => u64::MAX,
            Self::Hpa { .. } => 15,
            Self::Keda { .. } => 30,
            Self::Planner { .. } => 180,
            Self::Slo { cfg, .. } => cfg.interval.max(1.0) as u64,
            Self::Oracle { .. } => 1,
        }
    }

    /// Replicas at time 0.
    pub fn initial(&self, k: &Knowledge) -> u32 {
        match self {
            Self::Static { utilization } => per_capacity(
                k.demand_60.iter().copied().fold(0.0, f64::max),
                k.capacity * utilization,
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
            Self::Static { .. } => current,
            Self::Oracle { utilization } => {
                // The busiest 10 s of the next 30 s, at full capacity, with instant replicas.
                let bin = (now / 10.0) as usize;
                let peak = k
                    .demand_10
                    .iter()
                    .skip(bin)
                    .take(3)
                    .copied()
                    .fold(0.0, f64::max);
                per_capacity(peak, k.capacity * *utilization, k)
            }
            Self::Planner { utilization } => {
                let bin = (now / 60.0) as usize;
                let mean = |from: usize, to: usize| {
                    let s = &k.demand_60[from.min(k.demand_60.len())..to.min(k.demand_60.len())];
                    s.iter().sum::<f64>() / s.len().max(1) as f64
                };
                let last = mean(bin.saturating_sub(3), bin);
                let prev = mean(bin.saturating_sub(6), bin.saturating_sub(3));
                let forecast = last.max(2.0 * last - prev);
                per_capacity(forecast, k.capacity * *utilization, k)
            }
            Self::Hpa { target, history } => {
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
                let ratio = util / *target;
                let raw = if within_hpa_tolerance(ratio) {
                    current
                } else {
                    (f64::from(current) * ratio).ceil() as u32
                };
                let raw = raw.min(current.saturating_mul(2).max(current + 4));
                hpa_stabilize(history, now, raw.clamp(k.min, k.max), current)
            }
            Self::Keda {
                per_replica,
                history,
            } => {
                let Some(sample) = cluster.samples.iter().rev().find(|s| s.0 <= now - 15.0) else {
                    return current;
                };
                let ratio = sample.2 / (*per_replica * f64::from(current.max(1)));
                let raw = if within_hpa_tolerance(ratio) {
                    current
                } else {
                    (sample.2 / *per_replica).ceil() as u32
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
                follower,
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
                // In external mode the policy runs on its own last recommendation, as the
                // operator's autoscaler does.
                let chosen = follower
                    .as_ref()
                    .and_then(|f| f.published.last().map(|p| p.1))
                    .unwrap_or(current);
                let obs = crate::autoscale::Observation {
                    now,
                    signals: &signals,
                    ready: cluster.ready(now),
                    starting_ages: &ages,
                    current: chosen,
                    startup_time: Some(*startup),
                };
                let (decision, next) = decide(cfg, state, &obs);
                *state = next;
                let to = decision.to;
                match follower {
                    Some(f) => {
                        f.published.push((now, to));
                        f.follow(now, current, k)
                    }
                    None => {
                        if to != decision.from {
                            decisions.push(decision);
                        }
                        to
                    }
                }
            }
        }
    }
}

/// KEDA following llmo's exported recommendation: a Prometheus trigger on
/// `llmo_operator_deployment_replicas{kind="recommended"}` with `metricType: AverageValue` and a
/// threshold of 1, so the HPA KEDA creates wants `ceil(recommended / 1)` replicas. The HPA syncs
/// every 15 s and reads a value 15 s old (the operator's scrape interval); its tolerance of 0.1
/// applies; scale-down stabilization is 0, as in the example, since the recommendation already
/// waits out llmo's own.
#[derive(Debug, Default)]
pub struct Follower {
    /// The recommendations (time, replicas) of the last minute, oldest first.
    pub published: Vec<(f64, u32)>,
}

impl Follower {
    /// HPA sync period, seconds.
    const SYNC: f64 = 15.0;
    /// Age of the value the HPA reads: one Prometheus scrape interval.
    const LAG: f64 = 15.0;

    /// The count KEDA's HPA sets at `now` with `current` replicas.
    pub fn follow(&mut self, now: f64, current: u32, k: &Knowledge) -> u32 {
        self.published.retain(|(t, _)| *t > now - 60.0);
        if now % Self::SYNC != 0.0 {
            return current;
        }
        let Some(&(_, recommended)) = self
            .published
            .iter()
            .rev()
            .find(|(t, _)| *t <= now - Self::LAG)
        else {
            return current;
        };
        let ratio = f64::from(recommended) / f64::from(current.max(1));
        if within_hpa_tolerance(ratio) {
            current
        } else {
            recommended.clamp(k.min, k.max)
        }
    }
}

/// HPA leaves the count alone while the metric is within 10 % of its target
/// (`--horizontal-pod-autoscaler-tolerance`, default 0.1); so do the strategies built on it.
fn within_hpa_tolerance(ratio: f64) -> bool {
    (ratio - 1.0).abs() <= 0.1
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

#[cfg(test)]
mod tests {
    use super::*;

    fn knowledge(max: u32) -> Knowledge {
        Knowledge {
            capacity: 1.0,
            concurrency: 1.0,
            demand_60: Vec::new(),
            demand_10: Vec::new(),
            utilization: 0.8,
            min: 1,
            max,
        }
    }

    #[test]
    fn keda_follows_the_recommendation_a_scrape_late_at_each_sync() {
        let k = knowledge(12);
        let mut f = Follower::default();
        for (t, r) in [(0.0, 4), (5.0, 8), (10.0, 8), (15.0, 8)] {
            f.published.push((t, r));
        }
        // Between syncs nothing changes.
        assert_eq!(f.follow(20.0, 4, &k), 4);
        // At 15 s the newest value 15 s old is the one published at 0 s.
        assert_eq!(f.follow(15.0, 4, &k), 4);
        // At 30 s it is the one published at 15 s.
        assert_eq!(f.follow(30.0, 4, &k), 8);
        // Within HPA's tolerance of 0.1 the count holds.
        let k = knowledge(40);
        f.published.push((30.0, 21));
        assert_eq!(f.follow(45.0, 20, &k), 20);
        // Beyond it, the recommendation, within the bounds.
        f.published.push((45.0, 50));
        assert_eq!(f.follow(60.0, 20, &k), 40);
        // Only the last minute is kept.
        assert!(f.published.iter().all(|(t, _)| *t > 0.0));
    }
}
