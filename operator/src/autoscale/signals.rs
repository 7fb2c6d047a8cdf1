//! The figures the policy decides on, computed from the recent scrapes of the ready serving pods.
//!
//! Percentiles come from histogram deltas over a sliding window, rates from counter deltas, and
//! the queue and utilization from the newest gauges. When a pod's metrics are missing or stale the
//! result is a [`MetricsUnavailable`] with a reason for the `MetricsAvailable=False` condition:
//! scaling on a guess is worse than holding still and saying why.

use std::collections::{BTreeMap, VecDeque};

use super::{exposition::PodMetrics, histogram::Histogram};

/// How the window is read.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SignalConfig {
    /// Length of the sliding window the percentiles and rates cover, seconds.
    pub window: f64,
    /// A pod whose newest scrape is older than this, seconds, makes the metrics stale.
    pub stale_after: f64,
}

impl SignalConfig {
    /// Defaults for a scrape interval: a 30 s window (six scrapes at the default 5 s), long
    /// enough for a p95 over a few hundred requests, and stale after three missed scrapes.
    pub fn for_interval(interval: f64) -> Self {
        Self {
            window: (interval * 6.0).max(30.0),
            stale_after: interval * 3.0,
        }
    }
}

/// What the autoscaler observed over the window, summed or averaged over the ready pods.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Signals {
    /// Time of the computation, seconds on the caller's clock.
    pub at: f64,
    /// Ready pods the figures cover.
    pub pods: usize,
    /// Seconds the deltas actually span (at most the window; less for young pods).
    pub span: f64,
    /// 95th percentile of time to first token in the window; `None` without requests.
    pub ttft_p95: Option<f64>,
    /// 95th percentile of inter-token latency in the window; `None` without tokens.
    pub itl_p95: Option<f64>,
    /// Requests that got their first token in the window.
    pub requests: f64,
    /// Mean engine busy fraction over the pods.
    pub utilization: f64,
    /// Requests waiting across pods.
    pub queue_depth: f64,
    /// Requests running across pods.
    pub running: f64,
    /// Prompt tokens per second across pods.
    pub prompt_tokens_per_second: f64,
    /// Generated tokens per second across pods.
    pub generation_tokens_per_second: f64,
    /// Tokens in and out per second over the last scrape interval only: a burst shows here a
    /// whole window before it dominates the windowed rates.
    pub recent_tokens_per_second: f64,
}

impl Signals {
    /// Tokens per second in and out, the load the feed-forward path divides by capacity.
    pub fn tokens_per_second(&self) -> f64 {
        self.prompt_tokens_per_second + self.generation_tokens_per_second
    }
}

/// Why there are no signals this round. `reason` is the condition's CamelCase reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsUnavailable {
    /// `NoReadyPods`, `NotScraped`, `StaleMetrics` or `MissingMetric`.
    pub reason: &'static str,
    /// What is wrong and where to look.
    pub message: String,
}

/// Recent scrapes of each pod, oldest first. The operator keeps one per ModelDeployment; the
/// fleet simulator keeps one per simulated deployment.
#[derive(Debug, Clone, Default)]
pub struct ScrapeHistory {
    pods: BTreeMap<String, VecDeque<(f64, PodMetrics)>>,
}

impl ScrapeHistory {
    /// Adds one scrape of `pod` taken at `at` seconds.
    pub fn record(&mut self, pod: &str, at: f64, metrics: PodMetrics) {
        self.pods
            .entry(pod.to_owned())
            .or_default()
            .push_back((at, metrics));
    }

    /// Forgets pods that are gone and scrapes older than `keep` seconds before `now`, keeping
    /// one scrape at or before the window start so a full-window delta stays possible.
    pub fn prune(&mut self, live_pods: &[&str], now: f64, keep: f64) {
        self.pods.retain(|pod, _| live_pods.contains(&pod.as_str()));
        for scrapes in self.pods.values_mut() {
            while scrapes.len() > 1 && scrapes[1].0 <= now - keep {
                scrapes.pop_front();
            }
        }
    }

    /// Scrapes of `pod`, oldest first.
    pub fn scrapes(&self, pod: &str) -> Option<&VecDeque<(f64, PodMetrics)>> {
        self.pods.get(pod)
    }
}

/// Computes the signals of `ready_pods` at `now` from `history`.
pub fn compute_signals(
    history: &ScrapeHistory,
    ready_pods: &[&str],
    now: f64,
    cfg: &SignalConfig,
) -> Result<Signals, MetricsUnavailable> {
    if ready_pods.is_empty() {
        return Err(MetricsUnavailable {
            reason: "NoReadyPods",
            message: "no serving pod is ready, so there is nothing to measure".into(),
        });
    }
    let mut ttft = Histogram::default();
    let mut itl = Histogram::default();
    let mut out = Signals {
        at: now,
        pods: ready_pods.len(),
        ..Signals::default()
    };
    let mut busy_sum = 0.0;
    for pod in ready_pods {
        let scrapes = history
            .scrapes(pod)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| MetricsUnavailable {
                reason: "NotScraped",
                message: format!("pod {pod} is ready but has not been scraped yet"),
            })?;
        let (newest_at, newest) = scrapes.back().map(|(t, m)| (*t, m)).unwrap();
        if now - newest_at > cfg.stale_after {
            return Err(MetricsUnavailable {
                reason: "StaleMetrics",
                message: format!(
                    "the newest scrape of pod {pod} is {:.0}s old (limit {:.0}s); check that its /metrics endpoint answers",
                    now - newest_at,
                    cfg.stale_after
                ),
            });
        }
        let missing = |family: &str| {
            MetricsUnavailable {
            reason: "MissingMetric",
            message: format!(
                "pod {pod} does not expose {family}; is it running llmo-serve of a matching version?"
            ),
        }
        };
        let newest_ttft = newest
            .ttft
            .as_ref()
            .ok_or_else(|| missing(super::exposition::names::TTFT))?;
        let busy = newest
            .busy
            .ok_or_else(|| missing(super::exposition::names::BUSY))?;
        let waiting = newest
            .waiting
            .ok_or_else(|| missing(super::exposition::names::WAITING))?;
        busy_sum += busy.clamp(0.0, 1.0);
        out.queue_depth += waiting;
        out.running += newest.running.unwrap_or(0.0);

        // The baseline: the newest scrape at or before the window start, else the oldest.
        let start = now - cfg.window;
        let (base_at, base) = scrapes
            .iter()
            .rev()
            .find(|(t, _)| *t <= start)
            .or_else(|| scrapes.front())
            .map(|(t, m)| (*t, m))
            .unwrap();
        let span = newest_at - base_at;
        if span <= 0.0 {
            continue;
        }
        out.span = out.span.max(span);
        if let Some(d) = base.ttft.as_ref().and_then(|b| newest_ttft.delta_since(b)) {
            ttft.merge(&d);
        }
        if let (Some(n), Some(b)) = (&newest.itl, &base.itl) {
            if let Some(d) = n.delta_since(b) {
                itl.merge(&d);
            }
        }
        // The last interval: the newest scrape against the one before it.
        if let Some((prev_at, prev)) = scrapes.iter().rev().nth(1) {
            let recent_span = newest_at - prev_at;
            if recent_span > 0.0 {
                out.recent_tokens_per_second +=
                    counter_rate(newest.prompt_tokens, prev.prompt_tokens, recent_span)
                        + counter_rate(
                            newest.generation_tokens,
                            prev.generation_tokens,
                            recent_span,
                        );
            }
        }
        out.prompt_tokens_per_second +=
            counter_rate(newest.prompt_tokens, base.prompt_tokens, span);
        out.generation_tokens_per_second +=
            counter_rate(newest.generation_tokens, base.generation_tokens, span);
    }
    out.utilization = busy_sum / ready_pods.len() as f64;
    out.requests = ttft.count;
    out.ttft_p95 = ttft.quantile(0.95);
    out.itl_p95 = itl.quantile(0.95);
    Ok(out)
}

/// Per-second increase of a counter, treating a decrease as a restart (the new value is the
/// increase since then).
fn counter_rate(newest: Option<f64>, base: Option<f64>, span: f64) -> f64 {
    match (newest, base) {
        (Some(n), Some(b)) if n >= b => (n - b) / span,
        (Some(n), Some(_)) => n / span,
        _ => 0.0,
    }
}
