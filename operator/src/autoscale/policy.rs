//! The SLO scaling policy: how many replicas a deployment needs, and why.
//!
//! Two paths add up. Feed-forward divides the observed load (tokens per second in and out, plus
//! what sits in the queue) by the measured capacity of one replica, so a rising load is met before
//! latency suffers. Feedback reads the SLO error (TTFT and inter-token p95 over target) and adds
//! replicas when the measured capacity was too optimistic, once per deficit: it waits for the
//! replicas it asked for. A panic path acts at once on a burst. The capacity estimate starts from
//! the planner's figure and follows the SLO in small steps: down after a violation at the
//! operating point, up while the SLO is met with margin under load.
//! Scaling down waits for a stabilization window and steps down gradually, because a replica
//! removed by mistake takes a full cold start to come back. Replicas already starting count as
//! capacity coming unless they have overrun the measured start-up time.
//!
//! Everything here is a pure function of the configuration, the previous [`PolicyState`] and an
//! [`Observation`], so the operator and the fleet simulator run the very same code.

use std::collections::VecDeque;

use super::signals::Signals;
use crate::api::ModelDeploymentSpec;

/// Tuning of the policy. [`PolicyConfig::from_spec`] fills it from a ModelDeployment.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyConfig {
    /// Fewest replicas.
    pub min: u32,
    /// Most replicas.
    pub max: u32,
    /// Decision interval, seconds.
    pub interval: f64,
    /// TTFT p95 target, seconds.
    pub ttft_target: f64,
    /// Inter-token latency p95 target, seconds.
    pub itl_target: Option<f64>,
    /// Share of the measured capacity the feed-forward path plans to use; the rest is headroom
    /// for bursts shorter than a cold start.
    pub utilization_target: f64,
    /// TTFT p95 over this multiple of the target is a burst: scale up without waiting.
    pub panic_ttft_ratio: f64,
    /// Waiting requests per ready replica above which the policy panics.
    pub panic_queue_per_replica: f64,
    /// The last interval's load over this multiple of the SLO capacity of the replicas serving
    /// and starting is a burst.
    pub panic_load_ratio: f64,
    /// Below this share of the measured capacity per replica, an SLO violation without a queue
    /// is a latency floor, not a lack of replicas.
    pub floor_load_ratio: f64,
    /// Seconds after a panic during which nothing is removed.
    pub panic_hold: f64,
    /// Feed-forward scale-ups smaller than this fraction are ignored, so noise does not add
    /// replicas. SLO violations are never ignored.
    pub up_tolerance: f64,
    /// Scale-down uses the highest recommendation of this many past seconds.
    pub scale_down_window: f64,
    /// Seconds between two scale-down steps.
    pub scale_down_every: f64,
    /// Largest share of replicas removed in one step (at least one replica).
    pub scale_down_fraction: f64,
    /// Start-up time assumed until one is measured, seconds.
    pub default_startup: f64,
    /// Share of the relative SLO error turned into extra replicas by the feedback path.
    pub feedback_gain: f64,
    /// SLO error (p95 over target) under which the SLO counts as met with margin: the capacity
    /// estimate may grow and replicas may be removed. Long prompts put a floor under TTFT p95,
    /// so this cannot be much lower than the ratio at idle.
    pub comfortable_ratio: f64,
    /// Relative growth of the capacity estimate per interval while the SLO is met with margin
    /// under load, so an estimate that was too low is corrected.
    pub capacity_probe: f64,
    /// Capacity of one replica in tokens per second, known before any measurement (from the
    /// planner's latency model); `None` learns it from the first observations.
    pub prior_capacity: Option<f64>,
}

impl PolicyConfig {
    /// The policy for a ModelDeployment's SLO, bounds and interval, with the other settings at
    /// their defaults.
    pub fn from_spec(spec: &ModelDeploymentSpec) -> Self {
        Self {
            min: spec.replicas.min.max(0) as u32,
            max: spec.replicas.max.max(spec.replicas.min).max(0) as u32,
            interval: spec.autoscaling.interval.get().as_secs_f64(),
            ttft_target: spec.slo.ttft.get().as_secs_f64(),
            itl_target: spec.slo.inter_token_latency.map(|d| d.get().as_secs_f64()),
            utilization_target: spec.slo.utilization,
            scale_down_window: spec.autoscaling.scale_down_delay.get().as_secs_f64(),
            scale_down_every: spec
                .autoscaling
                .scale_down_delay
                .get()
                .as_secs_f64()
                .min(Self::default().scale_down_every),
            ..Self::default()
        }
    }
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            min: 1,
            max: 1,
            interval: 5.0,
            ttft_target: 0.5,
            itl_target: None,
            utilization_target: 0.8,
            panic_ttft_ratio: 2.0,
            panic_queue_per_replica: 8.0,
            panic_load_ratio: 1.5,
            floor_load_ratio: 0.5,
            panic_hold: 60.0,
            up_tolerance: 0.1,
            scale_down_window: 300.0,
            scale_down_every: 30.0,
            scale_down_fraction: 0.2,
            default_startup: 120.0,
            comfortable_ratio: 0.8,
            feedback_gain: 0.25,
            capacity_probe: 0.005,
            prior_capacity: None,
        }
    }
}

/// What the policy sees at one decision.
#[derive(Debug, Clone, Copy)]
pub struct Observation<'a> {
    /// Now, seconds on the caller's clock (the same clock as the signals).
    pub now: f64,
    /// The window's signals.
    pub signals: &'a Signals,
    /// Replicas serving.
    pub ready: u32,
    /// Seconds since each replica that is still starting was created.
    pub starting_ages: &'a [f64],
    /// Replicas asked for now (ready, starting and any not yet created).
    pub current: u32,
    /// Measured start-up time of recent replicas, seconds.
    pub startup_time: Option<f64>,
}

/// What the policy remembers between decisions.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PolicyState {
    /// Tokens per second one replica serves within the SLO, as measured so far.
    pub capacity: Option<f64>,
    /// Recent raw recommendations, for scale-down stabilization.
    recommendations: VecDeque<(f64, u32)>,
    /// No scale-down before this time (after a panic).
    panic_until: Option<f64>,
    /// When replicas were last removed.
    last_scale_down: Option<f64>,
    /// First decision seen; nothing is removed before a whole stabilization window of
    /// recommendations exists.
    first_decision: Option<f64>,
    /// When an SLO violation last lowered the capacity estimate.
    last_capacity_cut: Option<f64>,
    /// Since when some replicas asked for have not existed (neither ready nor starting).
    missing_since: Option<f64>,
}

/// Share of the capacity estimate a violation at the operating point takes off.
const CAPACITY_CUT: f64 = 0.1;
/// Share of the gap to a higher measured load a comfortable interval adds to the estimate.
const CAPACITY_RISE: f64 = 0.25;

/// Which way a decision went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecisionKind {
    /// Keep the replica count.
    Hold,
    /// Add replicas for load or an SLO error.
    ScaleUp,
    /// Add replicas at once for a burst.
    Panic,
    /// Remove replicas.
    ScaleDown,
}

/// One decision and the figures it was taken on.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// When, seconds on the caller's clock.
    pub at: f64,
    /// Replicas asked for before.
    pub from: u32,
    /// Replicas asked for now.
    pub to: u32,
    /// Which way.
    pub kind: DecisionKind,
    /// Why, in words.
    pub reason: String,
    /// TTFT p95 observed, seconds.
    pub ttft_p95: Option<f64>,
    /// Inter-token p95 observed, seconds.
    pub itl_p95: Option<f64>,
    /// Mean busy fraction observed.
    pub utilization: f64,
    /// Waiting requests observed.
    pub queue_depth: f64,
    /// Tokens per second observed.
    pub load: f64,
    /// Capacity estimate of one replica after this observation, tokens per second.
    pub capacity: Option<f64>,
}

/// Decides the replica count for one observation. Pure: returns the decision and the next state.
pub fn decide(
    cfg: &PolicyConfig,
    state: &PolicyState,
    obs: &Observation<'_>,
) -> (Decision, PolicyState) {
    let mut next = state.clone();
    if next.capacity.is_none() {
        next.capacity = cfg.prior_capacity;
    }
    let s = obs.signals;
    let ready = obs.ready.max(1);
    let load = s.tokens_per_second();
    let per_replica = load / f64::from(ready);
    let ttft_err = s.ttft_p95.map(|t| t / cfg.ttft_target).unwrap_or(0.0);
    let itl_err = match (s.itl_p95, cfg.itl_target) {
        (Some(v), Some(t)) => v / t,
        _ => 0.0,
    };
    let slo_err = ttft_err.max(itl_err);
    let violated = slo_err > 1.0;
    let comfortable = ttft_err <= cfg.comfortable_ratio
        && itl_err <= cfg.comfortable_ratio
        && s.queue_depth <= f64::from(ready);
    // A window only partly covered (right after start or a restart of every pod) under-reads the
    // load; it may add replicas but is never a reason to measure capacity or remove any.
    let full_window = s.span >= 3.0 * cfg.interval;
    let measured = obs.ready > 0 && s.requests >= 10.0 && full_window;
    let first_decision = *next.first_decision.get_or_insert(obs.now);

    // Feed-forward: load plus the queue spread over the window, over usable capacity.
    let tokens_per_request = if s.requests > 0.0 && s.span > 0.0 {
        load * s.span / s.requests
    } else {
        0.0
    };
    let queued_load = s.queue_depth * tokens_per_request / s.span.max(cfg.interval);
    let demand = load + queued_load;

    // Capacity coming: starting replicas count unless they overran twice the start-up time.
    // A burst: TTFT far over target, a long queue, or the last interval's load beyond what the
    // replicas serving and starting can hold within the SLO. The last of these fires before the
    // windowed TTFT moves, which is what keeps the decision within an interval of the onset.
    let startup = obs.startup_time.unwrap_or(cfg.default_startup);
    let coming = obs
        .starting_ages
        .iter()
        .filter(|a| **a <= 2.0 * startup)
        .count() as u32;
    let counted = obs.ready + coming;
    // Replicas asked for that do not exist yet: not yet created, or in `external` mode a
    // recommendation HPA or KEDA has not followed yet. Like starting ones, the SLO error read
    // now was measured without them; and like starting ones they are waited for only so long
    // (twice the start-up time): a recommendation HPA's tolerance ignores, or a group that
    // cannot be placed, must not stop the policy from reading its own SLO error for good.
    let not_created = obs
        .current
        .saturating_sub(obs.ready + obs.starting_ages.len() as u32);
    if not_created > 0 {
        next.missing_since.get_or_insert(obs.now);
    } else {
        next.missing_since = None;
    }
    let missing_awaited = next
        .missing_since
        .is_some_and(|t| obs.now - t <= 2.0 * startup);
    let waiting_for_replicas = coming > 0 || missing_awaited;
    let load_burst = next.capacity.is_some_and(|cap| {
        s.recent_tokens_per_second > cfg.panic_load_ratio * cap * f64::from(counted.max(1))
    });
    // Capacity: measured, never guessed. A violation at or above the planned operating point
    // lowers the estimate; a comfortable loaded interval raises it. Both move by steps, because
    // a window's figures are noisy (a run of short prompts, a burst inside the window), and a
    // violation lowers it only when it says something about the replicas: not while replicas
    // are starting or a burst is arriving (both are expected to miss the SLO for a while), and
    // at most once per window, so the effect of one cut is seen before the next.
    if measured {
        let cap = next.capacity.unwrap_or(per_replica);
        let settled = !waiting_for_replicas
            && !load_burst
            && next
                .last_capacity_cut
                .is_none_or(|t| obs.now - t >= s.span.max(cfg.interval));
        let updated = if violated
            && settled
            && per_replica < cap
            && per_replica >= cfg.utilization_target * cap
        {
            next.last_capacity_cut = Some(obs.now);
            cap * (1.0 - CAPACITY_CUT)
        } else if comfortable && per_replica > cap {
            cap + CAPACITY_RISE * (per_replica - cap)
        } else if comfortable && per_replica >= 0.9 * cfg.utilization_target * cap {
            cap * (1.0 + cfg.capacity_probe)
        } else {
            cap
        };
        next.capacity = Some(updated.max(1e-9));
    }
    // A violation on lightly loaded replicas with no queue is a latency floor (prompts too long
    // for the target, a slow model or GPU), which more replicas do not lower: it is reported,
    // and it blocks scale-down, but it adds nothing.
    let floor = violated
        && s.queue_depth <= f64::from(ready)
        && next
            .capacity
            .is_some_and(|cap| per_replica < cfg.floor_load_ratio * cap);
    let panic = s
        .ttft_p95
        .is_some_and(|t| !floor && t > cfg.panic_ttft_ratio * cfg.ttft_target)
        || s.queue_depth > cfg.panic_queue_per_replica * f64::from(ready)
        || load_burst;
    // In a burst the feed-forward path sizes for the last interval's load.
    let demand = if load_burst {
        demand.max(s.recent_tokens_per_second)
    } else {
        demand
    };
    let feed_forward = next
        .capacity
        // Once capacity is known, a full window sizes the deployment even when it saw few or no
        // requests: an idle deployment must be able to shrink.
        .filter(|_| measured || full_window || cfg.prior_capacity.is_some())
        .map(|cap| demand / (cap * cfg.utilization_target));
    // Feedback from the SLO error. TTFT grows much faster than the capacity deficit near
    // saturation (queueing), so the error is damped: twice the target asks for a quarter more replicas, at least one.
    // It waits for replicas already starting: the error it reads was measured without them, and
    // it stays high until they serve, so acting on it again would ask twice for one deficit.
    // Bursts beyond them are the panic path's (load and queue), which does not wait.
    let feedback = (violated && !floor && !waiting_for_replicas).then(|| {
        let gain = 1.0 + cfg.feedback_gain * (slo_err - 1.0).min(3.0);
        (f64::from(ready) * gain).ceil().max(f64::from(ready) + 1.0)
    });

    let overdue = obs.starting_ages.len() as u32 - coming;

    let ff_replicas = feed_forward.map(|f| f.ceil() as u32);
    let mut recommendation = ff_replicas.unwrap_or(obs.current);
    if let Some(fb) = feedback {
        recommendation = recommendation.max(fb as u32);
    }
    let recommendation = recommendation.clamp(cfg.min, cfg.max);
    next.recommendations.push_back((obs.now, recommendation));
    while next
        .recommendations
        .front()
        .is_some_and(|(t, _)| *t < obs.now - cfg.scale_down_window)
    {
        next.recommendations.pop_front();
    }
    if panic {
        next.panic_until = Some(obs.now + cfg.panic_hold);
    }

    let fmt_ttft = s
        .ttft_p95
        .map(|t| {
            format!(
                "TTFT p95 {} (target {})",
                seconds(t),
                seconds(cfg.ttft_target)
            )
        })
        .unwrap_or_else(|| "no requests in the window".into());
    let cap_text = next
        .capacity
        .map(|c| format!("{c:.0} tokens/s per replica"))
        .unwrap_or_else(|| "capacity not yet measured".into());
    let current = obs.current;
    let floor_text = format!(
        "{fmt_ttft} with replicas at {:.0}% of {cap_text} and no queue: a latency floor that more replicas would not lower (prompts too long or the model too slow for the target)",
        100.0 * per_replica / next.capacity.unwrap_or(1.0)
    );
    let (to, kind, reason) = if current < cfg.min || current > cfg.max {
        let to = current.clamp(cfg.min, cfg.max);
        (
            to,
            if to > current {
                DecisionKind::ScaleUp
            } else {
                DecisionKind::ScaleDown
            },
            format!(
                "{current} replicas is outside replicas.min..max = {}..{}",
                cfg.min, cfg.max
            ),
        )
    } else if recommendation > counted {
        // Replace overdue starters as well: they may never come.
        let to = (recommendation + overdue)
            .clamp(cfg.min, cfg.max)
            .max(current);
        let tolerated = !violated
            && !panic
            && feed_forward.is_some_and(|f| f <= f64::from(counted) * (1.0 + cfg.up_tolerance));
        if to == current || tolerated {
            (
                current,
                DecisionKind::Hold,
                format!(
                    "{fmt_ttft}; want {recommendation} but within tolerance or at replicas.max"
                ),
            )
        } else if panic {
            (
                to,
                DecisionKind::Panic,
                format!(
                    "burst: {fmt_ttft}, {:.0} waiting on {} ready; scaling up at once",
                    s.queue_depth, obs.ready
                ),
            )
        } else if violated && !floor {
            (
                to,
                DecisionKind::ScaleUp,
                format!(
                    "SLO error {slo_err:.2}x: {fmt_ttft}; {} ready, {coming} starting",
                    obs.ready
                ),
            )
        } else {
            (to, DecisionKind::ScaleUp, format!("load {demand:.0} tokens/s needs {recommendation} replicas at {cap_text} and {:.0}% utilization", cfg.utilization_target * 100.0))
        }
    } else if recommendation >= counted || recommendation >= current {
        let reason = if floor {
            floor_text.clone()
        } else if coming > 0 && recommendation > obs.ready {
            format!("{fmt_ttft}; {coming} starting replicas (about {} to ready) cover the need for {recommendation}", seconds(startup))
        } else {
            format!("{fmt_ttft}; load {demand:.0} tokens/s at {cap_text} fits {current} replicas")
        };
        (current, DecisionKind::Hold, reason)
    } else {
        let stabilized = next
            .recommendations
            .iter()
            .map(|(_, r)| *r)
            .max()
            .unwrap_or(current);
        let in_panic = next.panic_until.is_some_and(|t| obs.now < t);
        let too_soon = next
            .last_scale_down
            .is_some_and(|t| obs.now - t < cfg.scale_down_every)
            || obs.now - first_decision < cfg.scale_down_window;
        let step = ((f64::from(current) * cfg.scale_down_fraction).floor() as u32).max(1);
        let to = stabilized.max(current.saturating_sub(step)).max(cfg.min);
        if floor {
            (
                current,
                DecisionKind::Hold,
                format!("{floor_text}; not scaling down while the SLO is missed"),
            )
        } else if violated || in_panic || too_soon || to >= current {
            (current, DecisionKind::Hold, format!("{fmt_ttft}; want {recommendation} but holding: highest recommendation over {}s is {stabilized}{}",
                cfg.scale_down_window, if in_panic { ", burst hold" } else { "" }))
        } else {
            next.last_scale_down = Some(obs.now);
            (to, DecisionKind::ScaleDown, format!("load {demand:.0} tokens/s at {cap_text} needs {recommendation}; stepping down from {current} to {to}"))
        }
    };
    let decision = Decision {
        at: obs.now,
        from: current,
        to,
        kind,
        reason,
        ttft_p95: s.ttft_p95,
        itl_p95: s.itl_p95,
        utilization: s.utilization,
        queue_depth: s.queue_depth,
        load,
        capacity: next.capacity,
    };
    (decision, next)
}

/// `0.412` → `412ms`, `1.5` → `1.50s`: short, for reasons and status.
pub fn seconds(s: f64) -> String {
    if s < 1.0 {
        format!("{:.0}ms", s * 1000.0)
    } else {
        format!("{s:.2}s")
    }
}
