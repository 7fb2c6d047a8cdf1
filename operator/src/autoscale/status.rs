//! How the autoscaler's observations and decisions appear in `status.autoscaling`.
//!
//! Only `status` is written, never the user's spec, so GitOps tools never fight the autoscaler.

use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};

use super::{
    policy::{seconds, Decision, DecisionKind},
    signals::{MetricsUnavailable, Signals},
};
use crate::api::{AutoscalingStatus, ScalingDecision};

/// Condition type that says whether the autoscaler can read the serving pods' metrics.
pub const METRICS_AVAILABLE: &str = "MetricsAvailable";
/// Reason of `MetricsAvailable=True`.
pub const REASON_SCRAPED: &str = "Scraped";
/// How many decisions `status.autoscaling.lastDecisions` keeps (the CRD's bound).
pub const KEPT_DECISIONS: usize = 10;

impl Decision {
    /// The status entry for this decision, stamped with wall-clock `time`.
    pub fn to_status(&self, time: Time) -> ScalingDecision {
        ScalingDecision {
            time,
            from: i32::try_from(self.from).unwrap_or(i32::MAX),
            to: i32::try_from(self.to).unwrap_or(i32::MAX),
            reason: self.reason.clone(),
            ttft_p95: self.ttft_p95.map(seconds),
            utilization: Some(round3(self.utilization)),
            queue_depth: Some(self.queue_depth),
        }
    }
}

/// Updates `status` with this round's signals and recommendation and, when the count changed,
/// the decision. `price_per_replica_hour` comes from the GPUClass price times GPUs per replica.
pub fn record(
    status: &mut AutoscalingStatus,
    signals: &Signals,
    decision: &Decision,
    price_per_replica_hour: Option<f64>,
    now: Timestamp,
) {
    status.ttft_p95 = signals.ttft_p95.map(seconds);
    status.inter_token_latency_p95 = signals.itl_p95.map(seconds);
    status.utilization = Some(round3(signals.utilization));
    status.queue_depth = Some(signals.queue_depth);
    status.prompt_tokens_per_second = Some(signals.prompt_tokens_per_second.round());
    status.generation_tokens_per_second = Some(signals.generation_tokens_per_second.round());
    status.tokens_per_dollar = price_per_replica_hour
        .filter(|p| *p > 0.0 && signals.pods > 0)
        .map(|p| {
            (signals.generation_tokens_per_second * 3600.0 / (p * signals.pods as f64)).round()
        });
    status.recommended_replicas = Some(i32::try_from(decision.to).unwrap_or(i32::MAX));
    status.recommendation_reason = Some(decision.reason.clone());
    if decision.kind != DecisionKind::Hold {
        status.last_decisions.push(decision.to_status(Time(now)));
        let excess = status.last_decisions.len().saturating_sub(KEPT_DECISIONS);
        status.last_decisions.drain(..excess);
    }
}

/// Updates `status` for a round without signals: the recommendation holds at `current`, and
/// the reason says why nothing was decided.
pub fn record_hold(status: &mut AutoscalingStatus, current: u32, unavailable: &MetricsUnavailable) {
    status.recommended_replicas = Some(i32::try_from(current).unwrap_or(i32::MAX));
    status.recommendation_reason = Some(format!(
        "holding at {current}: no signals ({}: {})",
        unavailable.reason, unavailable.message
    ));
}

/// The `(status, reason, message)` of the MetricsAvailable condition for this round.
pub fn metrics_condition(
    result: &Result<Signals, MetricsUnavailable>,
) -> (&'static str, &'static str, String) {
    match result {
        Ok(s) => (
            "True",
            REASON_SCRAPED,
            format!("read {} ready pods over {:.0}s", s.pods, s.span),
        ),
        Err(e) => ("False", e.reason, e.message.clone()),
    }
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}
