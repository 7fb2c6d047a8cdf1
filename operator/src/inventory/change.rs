//! When the agent writes: on material change, and otherwise on a slow heartbeat.
//!
//! A fleet of thousands of nodes sampling every 10 s would send hundreds of writes per second
//! to the API server if every sample were written; most of them would say nothing new. The
//! detector compares each candidate status with the one LAST WRITTEN (not the last sample, so
//! that a slow drift still adds up to a write) and sorts differences in two kinds:
//!
//! * **Hard** changes are written at once, at the sample that sees them: a GPU appears or goes,
//!   its identity, NVLink peers or MIG mode change, its health changes, the class or the list of
//!   unknown products changes, or the `Ready` condition changes. Placement must never act on a
//!   GPU that is gone or broken.
//! * **Soft** changes are figures that placement uses as hints: free memory that moved by at
//!   least the threshold since the last write, or utilization that crossed a band edge
//!   (idle / busy / hot) by more than a hysteresis margin. They wait for a token of a bucket
//!   that every write spends from (a burst of a few, then one per `soft_write_interval`), so a
//!   node under a wildly fluctuating load still writes a bounded number of times per hour,
//!   while one step change after a quiet spell is written at once.
//!
//! Nothing changed for a `heartbeat`: a write anyway, so readers can tell a live agent from a
//! dead one by `observedAt` (the kubelet reports node status every 5 minutes for the same reason).

use std::time::Duration;

use crate::api::{GPUNodeStatus, GpuDevice};

/// How eagerly the agent writes.
#[derive(Clone, Debug, PartialEq)]
pub struct WritePolicy {
    /// A GPU's free memory must move by at least this much since the last write.
    pub memory_threshold_mib: u64,
    /// Longest time without a write.
    pub heartbeat: Duration,
    /// One soft write token is earned per this interval.
    pub soft_write_interval: Duration,
    /// Most soft write tokens saved up.
    pub soft_burst: u32,
    /// Utilization band edges in percent, ascending: `[30, 80]` makes idle, busy and hot.
    pub utilization_bands: Vec<u32>,
    /// Points beyond a band edge that utilization must reach before the band counts as changed.
    pub utilization_hysteresis: u32,
}

impl Default for WritePolicy {
    fn default() -> Self {
        Self {
            memory_threshold_mib: 2048,
            heartbeat: Duration::from_secs(300),
            soft_write_interval: Duration::from_secs(240),
            soft_burst: 3,
            utilization_bands: vec![30, 80],
            utilization_hysteresis: 10,
        }
    }
}

/// Why a status is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum WriteReason {
    /// Nothing written yet (or the last write failed).
    First,
    /// A GPU appeared or went, or its identity, topology, MIG mode or the driver changed.
    Inventory,
    /// A GPU's health changed.
    Health,
    /// The class or the unknown products changed.
    Class,
    /// A condition changed (e.g. reading failed).
    Condition,
    /// Free memory moved past the threshold.
    FreeMemory,
    /// Utilization changed band.
    Utilization,
    /// Nothing material, but the heartbeat is due.
    Heartbeat,
}

impl WriteReason {
    /// Hard reasons are written at once; soft ones wait for a token.
    pub fn is_hard(self) -> bool {
        matches!(
            self,
            Self::First | Self::Inventory | Self::Health | Self::Class | Self::Condition
        )
    }

    /// The name used in logs and tables.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::First => "first",
            Self::Inventory => "inventory",
            Self::Health => "health",
            Self::Class => "class",
            Self::Condition => "condition",
            Self::FreeMemory => "free-memory",
            Self::Utilization => "utilization",
            Self::Heartbeat => "heartbeat",
        }
    }
}

/// Decides, sample by sample, whether the candidate status is worth a write.
#[derive(Clone, Debug)]
pub struct ChangeDetector {
    policy: WritePolicy,
    last: Option<GPUNodeStatus>,
    last_at: Duration,
    tokens: f64,
    tokens_at: Duration,
    failures: u32,
    retry_at: Duration,
}

impl ChangeDetector {
    /// A detector that has written nothing yet, with a full bucket.
    pub fn new(policy: WritePolicy) -> Self {
        let tokens = f64::from(policy.soft_burst);
        Self {
            policy,
            last: None,
            last_at: Duration::ZERO,
            tokens,
            tokens_at: Duration::ZERO,
            failures: 0,
            retry_at: Duration::ZERO,
        }
    }

    /// The policy in force.
    pub fn policy(&self) -> &WritePolicy {
        &self.policy
    }

    /// The status last written.
    pub fn last_written(&self) -> Option<&GPUNodeStatus> {
        self.last.as_ref()
    }

    /// Looks at the candidate at time `now` (monotonic, since start). `Some(reason)` means
    /// "write it now", and the detector then takes the candidate as written; call
    /// [`Self::write_failed`] if the write did not go through.
    pub fn observe(&mut self, candidate: &GPUNodeStatus, now: Duration) -> Option<WriteReason> {
        self.refill(now);
        if self.last.is_none() && now < self.retry_at {
            return None;
        }
        let reason = match &self.last {
            None => Some(WriteReason::First),
            Some(last) => hard_change(last, candidate)
                .or_else(|| {
                    soft_change(&self.policy, last, candidate).filter(|_| self.tokens >= 1.0)
                })
                .or_else(|| {
                    (now.saturating_sub(self.last_at) >= self.policy.heartbeat)
                        .then_some(WriteReason::Heartbeat)
                }),
        };
        if reason.is_some() {
            // Every write spends from the one budget; only soft changes wait for it. A heartbeat
            // always finds a token (one is earned in less than a heartbeat), so the writes of
            // any hour are at most `burst + 1h / soft_write_interval` plus hard changes.
            self.tokens = (self.tokens - 1.0).max(0.0);
            self.last = Some(candidate.clone());
            self.last_at = now;
        }
        reason
    }

    /// The write decided by the last [`Self::observe`] failed at `now`: write again after a
    /// backoff (2 s, 4 s, 8 s, ... up to the heartbeat), so that a fleet does not hammer an API
    /// server that is already failing.
    pub fn write_failed(&mut self, now: Duration) {
        self.last = None;
        self.failures = self.failures.saturating_add(1);
        let backoff = Duration::from_secs(1 << self.failures.min(16)).min(self.policy.heartbeat);
        self.retry_at = now + backoff;
    }

    /// The last write went through: the next failure starts the backoff afresh.
    pub fn write_succeeded(&mut self) {
        self.failures = 0;
    }

    fn refill(&mut self, now: Duration) {
        let earned = now.saturating_sub(self.tokens_at).as_secs_f64()
            / self.policy.soft_write_interval.as_secs_f64().max(1e-9);
        self.tokens = (self.tokens + earned).min(f64::from(self.policy.soft_burst));
        self.tokens_at = now;
    }
}

/// What must be written at once.
fn hard_change(last: &GPUNodeStatus, now: &GPUNodeStatus) -> Option<WriteReason> {
    let identity = |g: &GpuDevice| {
        (
            g.index,
            g.uuid.clone(),
            g.product.clone(),
            g.memory_total_mib,
            g.nvlink_peers.clone(),
            g.mig_enabled,
        )
    };
    if last
        .gpus
        .iter()
        .map(identity)
        .ne(now.gpus.iter().map(identity))
        || last.driver_version != now.driver_version
        || last.cuda_version != now.cuda_version
    {
        return Some(WriteReason::Inventory);
    }
    let health = |g: &GpuDevice| (g.health, g.health_reason.clone());
    if last.gpus.iter().map(health).ne(now.gpus.iter().map(health)) {
        return Some(WriteReason::Health);
    }
    if last.gpu_class != now.gpu_class || last.unknown_products != now.unknown_products {
        return Some(WriteReason::Class);
    }
    let condition = |c: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition| {
        (
            c.type_.clone(),
            c.status.clone(),
            c.reason.clone(),
            c.message.clone(),
        )
    };
    if last
        .conditions
        .iter()
        .map(condition)
        .ne(now.conditions.iter().map(condition))
    {
        return Some(WriteReason::Condition);
    }
    None
}

/// What may wait for a token. Only called when the GPUs are the same ones in the same order.
fn soft_change(
    policy: &WritePolicy,
    last: &GPUNodeStatus,
    now: &GPUNodeStatus,
) -> Option<WriteReason> {
    let pairs = || last.gpus.iter().zip(&now.gpus);
    if pairs()
        .any(|(a, b)| a.memory_free_mib.abs_diff(b.memory_free_mib) >= policy.memory_threshold_mib)
    {
        return Some(WriteReason::FreeMemory);
    }
    if pairs().any(|(a, b)| {
        band_changed(
            &policy.utilization_bands,
            policy.utilization_hysteresis,
            a.utilization_percent,
            b.utilization_percent,
        )
    }) {
        return Some(WriteReason::Utilization);
    }
    None
}

/// Whether `now` left the band of `written` by more than `hysteresis` points past its edge.
fn band_changed(edges: &[u32], hysteresis: u32, written: u32, now: u32) -> bool {
    let band = |u: u32| edges.iter().filter(|&&e| u >= e).count();
    let (was, is) = (band(written), band(now));
    if is > was {
        now >= edges[was] + hysteresis
    } else if is < was {
        now + hysteresis < edges[was - 1]
    } else {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::GpuHealth;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn status(free: &[u64], util: &[u32]) -> GPUNodeStatus {
        GPUNodeStatus {
            gpu_count: free.len() as u32,
            gpus: free
                .iter()
                .zip(util)
                .enumerate()
                .map(|(i, (&f, &u))| GpuDevice {
                    index: i as u32,
                    uuid: format!("GPU-{i}"),
                    product: "NVIDIA L4".into(),
                    memory_total_mib: 23034,
                    memory_free_mib: f,
                    utilization_percent: u,
                    ..GpuDevice::default()
                })
                .collect(),
            ..GPUNodeStatus::default()
        }
    }

    #[test]
    fn the_first_reading_is_written_then_nothing_until_the_heartbeat() {
        let mut d = ChangeDetector::new(WritePolicy::default());
        let s = status(&[20000, 20000], &[10, 50]);
        assert_eq!(d.observe(&s, secs(0)), Some(WriteReason::First));
        for t in (10..300).step_by(10) {
            assert_eq!(d.observe(&s, secs(t)), None, "t = {t}");
        }
        assert_eq!(d.observe(&s, secs(300)), Some(WriteReason::Heartbeat));
        assert_eq!(d.observe(&s, secs(310)), None);
    }

    #[test]
    fn free_memory_is_compared_with_the_last_written_value() {
        let mut d = ChangeDetector::new(WritePolicy::default());
        d.observe(&status(&[20000], &[10]), secs(0));
        // Steps of 1000 MiB: each is below the 2048 MiB threshold, but they add up.
        assert_eq!(d.observe(&status(&[19000], &[10]), secs(10)), None);
        assert_eq!(d.observe(&status(&[18000], &[10]), secs(20)), None);
        assert_eq!(
            d.observe(&status(&[17000], &[10]), secs(30)),
            Some(WriteReason::FreeMemory)
        );
        assert_eq!(d.last_written().unwrap().gpus[0].memory_free_mib, 17000);
        // Back and forth around the written value writes nothing.
        for (i, f) in [16000, 18000, 16500, 17900].into_iter().enumerate() {
            assert_eq!(
                d.observe(&status(&[f], &[10]), secs(40 + i as u64 * 10)),
                None
            );
        }
    }

    #[test]
    fn health_and_inventory_changes_are_written_at_once_even_without_tokens() {
        let policy = WritePolicy {
            soft_burst: 2,
            ..WritePolicy::default()
        };
        let mut d = ChangeDetector::new(policy);
        // The first write spends one token, the free-memory write the other.
        d.observe(&status(&[20000, 20000], &[10, 10]), secs(0));
        assert_eq!(
            d.observe(&status(&[10000, 20000], &[10, 10]), secs(10)),
            Some(WriteReason::FreeMemory)
        );
        // A soft change now waits...
        assert_eq!(
            d.observe(&status(&[1000, 20000], &[10, 10]), secs(20)),
            None
        );
        // ...but a health change does not.
        let mut sick = status(&[1000, 20000], &[10, 10]);
        sick.gpus[1].health = GpuHealth::Unhealthy;
        sick.gpus[1].health_reason = Some("Xid 79".into());
        assert_eq!(d.observe(&sick, secs(30)), Some(WriteReason::Health));
        // Nor does a GPU going away.
        let mut gone = sick.clone();
        gone.gpus.pop();
        assert_eq!(d.observe(&gone, secs(40)), Some(WriteReason::Inventory));
        // Nor a class change.
        let mut classed = gone.clone();
        classed.gpu_class = Some("l4".into());
        assert_eq!(d.observe(&classed, secs(50)), Some(WriteReason::Class));
    }

    #[test]
    fn soft_writes_are_bounded_by_the_token_bucket() {
        let policy = WritePolicy::default();
        let interval = policy.soft_write_interval.as_secs();
        let burst = u64::from(policy.soft_burst);
        let mut d = ChangeDetector::new(policy);
        let mut writes = 0;
        // Free memory swings by 10 GiB every sample for two hours.
        for i in 0..720u64 {
            let free = if i.is_multiple_of(2) { 5000 } else { 15000 };
            if d.observe(&status(&[free], &[10]), secs(i * 10)).is_some() {
                writes += 1;
            }
        }
        let most = 1 + burst + 7200 / interval;
        assert!(writes <= most, "{writes} writes, at most {most}");
        assert!(writes >= most - 2, "{writes} writes: the bucket refills");
    }

    #[test]
    fn utilization_bands_have_hysteresis() {
        let edges = [30, 80];
        assert!(!band_changed(&edges, 5, 78, 82), "just over the edge");
        assert!(!band_changed(&edges, 10, 78, 89), "within a wider margin");
        assert!(band_changed(&edges, 5, 78, 85));
        assert!(!band_changed(&edges, 5, 85, 76), "just under the edge");
        assert!(band_changed(&edges, 5, 85, 74));
        assert!(band_changed(&edges, 5, 10, 95), "two bands at once");
        assert!(band_changed(&edges, 5, 95, 10));
        assert!(!band_changed(&edges, 5, 40, 75), "within a band");
        let mut d = ChangeDetector::new(WritePolicy::default());
        d.observe(&status(&[20000], &[50]), secs(0));
        assert_eq!(d.observe(&status(&[20000], &[88]), secs(10)), None);
        assert_eq!(
            d.observe(&status(&[20000], &[90]), secs(20)),
            Some(WriteReason::Utilization)
        );
    }

    #[test]
    fn a_failed_write_is_retried_with_backoff() {
        let mut d = ChangeDetector::new(WritePolicy::default());
        let s = status(&[20000], &[10]);
        assert_eq!(d.observe(&s, secs(0)), Some(WriteReason::First));
        d.write_failed(secs(0));
        assert_eq!(d.observe(&s, secs(1)), None);
        assert_eq!(d.observe(&s, secs(2)), Some(WriteReason::First));
        d.write_failed(secs(2));
        assert_eq!(d.observe(&s, secs(5)), None);
        assert_eq!(d.observe(&s, secs(6)), Some(WriteReason::First));
        d.write_succeeded();
        assert_eq!(d.observe(&s, secs(16)), None, "written, nothing changed");
        d.write_failed(secs(16));
        assert_eq!(
            d.observe(&s, secs(18)),
            Some(WriteReason::First),
            "backoff reset"
        );
        // However long the outage, retries come at least once per heartbeat.
        for _ in 0..20 {
            d.write_failed(secs(20));
        }
        assert_eq!(d.observe(&s, secs(319)), None);
        assert_eq!(d.observe(&s, secs(320)), Some(WriteReason::First));
    }
}
