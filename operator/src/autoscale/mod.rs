//! SLO autoscaling: signals read from the serving pods' `/metrics`, the pure scaling policy, its
//! status, and the fleet simulator that replays request traces against the same policy.
//!
//! The split follows the rest of the operator: everything that decides is a pure function over
//! plain data ([`signals::compute_signals`], [`policy::decide`]); the code that scrapes pods and
//! writes status only moves data in and out. The simulator therefore exercises exactly the code
//! the controller runs.

pub mod exposition;
pub mod histogram;
pub mod policy;
pub mod runner;
pub mod signals;
pub mod sim;
pub mod status;

pub use exposition::{parse_metrics, PodMetrics};
pub use histogram::Histogram;
pub use policy::{decide, Decision, DecisionKind, Observation, PolicyConfig, PolicyState};
pub use signals::{compute_signals, MetricsUnavailable, ScrapeHistory, SignalConfig, Signals};

/// Errors of the autoscaler.
#[derive(Debug, thiserror::Error)]
pub enum AutoscaleError {
    /// A `/metrics` body could not be read.
    #[error("metrics exposition, line {line}: {message}; the serving pod's /metrics output is not valid Prometheus text")]
    Exposition {
        /// 1-based line number.
        line: usize,
        /// What was wrong.
        message: String,
    },
}
