//! Prometheus metrics, named as the autoscaler expects (see DESIGN.md).

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: String,
}

/// Request outcomes used as the `outcome` label.
pub mod outcome {
    pub const SUCCESS: &str = "success";
    pub const CANCELLED: &str = "cancelled";
    pub const ERROR: &str = "error";
    pub const REJECTED: &str = "rejected";
}

#[derive(Debug)]
pub struct Metrics {
    pub registry: Registry,
    pub ttft: Histogram,
    pub itl: Histogram,
    pub request_duration: Histogram,
    pub running: Gauge,
    pub waiting: Gauge,
    pub kv_usage: Gauge<f64, AtomicU64>,
    pub busy: Gauge<f64, AtomicU64>,
    pub prompt_tokens: Counter,
    pub generation_tokens: Counter,
    pub requests: Family<OutcomeLabel, Counter>,
    pub prefix_queried: Counter,
    pub prefix_hits: Counter,
    pub prefix_hit_ratio: Gauge<f64, AtomicU64>,
    pub preemptions: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::default();
        let ttft = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        let itl = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        let dur = Histogram::new(exponential_buckets(0.05, 2.0, 14));
        let m = Self {
            ttft,
            itl,
            request_duration: dur,
            running: Gauge::default(),
            waiting: Gauge::default(),
            kv_usage: Gauge::default(),
            busy: Gauge::default(),
            prompt_tokens: Counter::default(),
            generation_tokens: Counter::default(),
            requests: Family::default(),
            prefix_queried: Counter::default(),
            prefix_hits: Counter::default(),
            prefix_hit_ratio: Gauge::default(),
            preemptions: Counter::default(),
            registry: Registry::default(),
        };
        r.register(
            "llmo_time_to_first_token_seconds",
            "Time from arrival to the first generated token",
            m.ttft.clone(),
        );
        r.register(
            "llmo_inter_token_latency_seconds",
            "Time between consecutive generated tokens of a request",
            m.itl.clone(),
        );
        r.register(
            "llmo_request_duration_seconds",
            "Time from arrival to the last token",
            m.request_duration.clone(),
        );
        r.register(
            "llmo_requests_running",
            "Sequences in the running batch",
            m.running.clone(),
        );
        r.register(
            "llmo_requests_waiting",
            "Sequences queued for admission",
            m.waiting.clone(),
        );
        r.register(
            "llmo_kv_cache_usage_ratio",
            "Fraction of KV cache blocks in use",
            m.kv_usage.clone(),
        );
        r.register(
            "llmo_engine_busy_ratio",
            "Fraction of recent wall time spent computing steps",
            m.busy.clone(),
        );
        r.register(
            "llmo_prompt_tokens",
            "Prompt tokens admitted",
            m.prompt_tokens.clone(),
        );
        r.register(
            "llmo_generation_tokens",
            "Tokens generated",
            m.generation_tokens.clone(),
        );
        r.register(
            "llmo_requests",
            "Finished requests by outcome",
            m.requests.clone(),
        );
        r.register(
            "llmo_prefix_cache_queried_tokens",
            "Prompt tokens looked up in the prefix cache",
            m.prefix_queried.clone(),
        );
        r.register(
            "llmo_prefix_cache_hit_tokens",
            "Prompt tokens served from the prefix cache",
            m.prefix_hits.clone(),
        );
        r.register(
            "llmo_prefix_cache_hit_ratio",
            "Prefix cache hits over lookups, in tokens, since start",
            m.prefix_hit_ratio.clone(),
        );
        r.register(
            "llmo_preemptions",
            "Sequences preempted for lack of KV cache blocks",
            m.preemptions.clone(),
        );
        Self { registry: r, ..m }
    }

    pub fn count_request(&self, outcome: &str) {
        self.requests
            .get_or_create(&OutcomeLabel {
                outcome: outcome.to_string(),
            })
            .inc();
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut s = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut s, &self.registry);
        s
    }
}
