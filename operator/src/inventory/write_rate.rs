//! How many writes per node per hour the agent sends, measured by replaying a simulated node
//! through the same status builder and change detector the agent uses. No clock, no cluster:
//! a day of 10-second samples takes well under a second.

use std::{collections::BTreeMap, fmt::Write as _, time::Duration};

use k8s_openapi::jiff::{SignedDuration, Timestamp};

use crate::api::{GPUClass, GPUNodeStatus, GpuHealth};

use super::{
    change::{ChangeDetector, WritePolicy, WriteReason},
    matching::match_gpu_class,
    simulated::SimulatedSource,
    source::InventorySource,
    status::build_status,
};

/// The outcome of replaying one profile.
#[derive(Clone, Debug, PartialEq)]
pub struct WriteRate {
    /// The profile's name.
    pub profile: String,
    /// Simulated time.
    pub duration: Duration,
    /// Samples taken.
    pub samples: u64,
    /// Writes per hour if every sample were written.
    pub every_sample_per_hour: f64,
    /// Writes per hour with thresholds and heartbeat but no token bucket.
    pub thresholds_only_per_hour: f64,
    /// Writes per hour under the policy.
    pub per_hour: f64,
    /// Writes in the busiest whole hour under the policy.
    pub busiest_hour: u64,
    /// Writes under the policy by reason.
    pub by_reason: BTreeMap<WriteReason, u64>,
    /// Samples at which a GPU's health or presence differed from the sample before.
    pub health_changes: u64,
    /// Most samples between such a change and the write that carried it (0: the same sample).
    pub worst_health_delay_samples: u64,
    /// Largest gap between a GPU's free memory and the value last written, in MiB.
    pub worst_free_memory_error_mib: u64,
}

/// Replays `source` for `duration`, sampling every `interval`.
pub fn measure_write_rate(
    source: &SimulatedSource,
    classes: &[GPUClass],
    policy: &WritePolicy,
    duration: Duration,
    interval: Duration,
) -> WriteRate {
    let unlimited = WritePolicy {
        soft_burst: u32::MAX,
        soft_write_interval: Duration::from_nanos(1),
        ..policy.clone()
    };
    let limited = replay(source, classes, policy, duration, interval);
    let thresholds_only = replay(source, classes, &unlimited, duration, interval);
    let hours = duration.as_secs_f64() / 3600.0;
    WriteRate {
        profile: source.profile().description.clone().unwrap_or_default(),
        duration,
        samples: limited.samples,
        every_sample_per_hour: limited.samples as f64 / hours,
        thresholds_only_per_hour: thresholds_only.writes.len() as f64 / hours,
        per_hour: limited.writes.len() as f64 / hours,
        busiest_hour: limited.busiest_hour(),
        by_reason: limited.by_reason(),
        health_changes: limited.health_changes,
        worst_health_delay_samples: limited.worst_health_delay,
        worst_free_memory_error_mib: limited.worst_memory_error,
    }
}

struct Replay {
    samples: u64,
    /// (time, reason) of each write.
    writes: Vec<(Duration, WriteReason)>,
    health_changes: u64,
    worst_health_delay: u64,
    worst_memory_error: u64,
}

impl Replay {
    fn busiest_hour(&self) -> u64 {
        let mut per_hour = BTreeMap::<u64, u64>::new();
        for (t, _) in &self.writes {
            *per_hour.entry(t.as_secs() / 3600).or_default() += 1;
        }
        per_hour.into_values().max().unwrap_or(0)
    }

    fn by_reason(&self) -> BTreeMap<WriteReason, u64> {
        let mut by = BTreeMap::new();
        for (_, r) in &self.writes {
            *by.entry(*r).or_default() += 1;
        }
        by
    }
}

fn replay(
    source: &SimulatedSource,
    classes: &[GPUClass],
    policy: &WritePolicy,
    duration: Duration,
    interval: Duration,
) -> Replay {
    let mut source = source.clone();
    let kind = source.kind();
    let epoch = Timestamp::UNIX_EPOCH;
    let mut detector = ChangeDetector::new(policy.clone());
    let mut out = Replay {
        samples: 0,
        writes: Vec::new(),
        health_changes: 0,
        worst_health_delay: 0,
        worst_memory_error: 0,
    };
    let mut previous_health: Option<Vec<(String, GpuHealth)>> = None;
    let mut pending_since: Option<u64> = None;
    let mut t = Duration::ZERO;
    while t < duration {
        let sample = out.samples;
        let reading = source.read(t).expect("simulated sources do not fail");
        let products: Vec<String> = reading.gpus.iter().map(|g| g.product.clone()).collect();
        let matched = match_gpu_class(classes, &products, None, None);
        let conditions = detector
            .last_written()
            .map(|s| s.conditions.clone())
            .unwrap_or_default();
        let now = epoch
            .checked_add(SignedDuration::try_from(t).expect("simulated time fits"))
            .expect("simulated time fits");
        let candidate = build_status(&reading, &matched, &kind, now, &conditions);

        let health: Vec<(String, GpuHealth)> = reading
            .gpus
            .iter()
            .map(|g| (g.uuid.clone(), g.health))
            .collect();
        if previous_health.as_ref().is_some_and(|p| *p != health) {
            out.health_changes += 1;
            pending_since.get_or_insert(sample);
        }
        previous_health = Some(health);

        if let Some(reason) = detector.observe(&candidate, t) {
            out.writes.push((t, reason));
            if let Some(since) = pending_since.take() {
                out.worst_health_delay = out.worst_health_delay.max(sample - since);
            }
        }
        if let Some(written) = detector.last_written() {
            out.worst_memory_error = out
                .worst_memory_error
                .max(memory_error(written, &candidate));
        }
        out.samples += 1;
        t += interval;
    }
    if let Some(since) = pending_since {
        // Never written: report the whole rest of the run as the delay.
        out.worst_health_delay = out.worst_health_delay.max(out.samples - since);
    }
    out
}

/// Largest difference in free memory between what readers see and the truth, by GPU uuid.
fn memory_error(written: &GPUNodeStatus, actual: &GPUNodeStatus) -> u64 {
    actual
        .gpus
        .iter()
        .filter_map(|g| {
            let w = written.gpus.iter().find(|w| w.uuid == g.uuid)?;
            Some(w.memory_free_mib.abs_diff(g.memory_free_mib))
        })
        .max()
        .unwrap_or(0)
}

/// The table printed by `llmo-operator agent --measure-writes`.
pub fn render_table(rows: &[WriteRate], policy: &WritePolicy, interval: Duration) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "writes per node per hour, sampling every {}s; policy: free-memory threshold {} MiB, \
         utilization bands {:?} ±{}, soft writes {} burst then 1 per {}s, heartbeat {}s",
        interval.as_secs(),
        policy.memory_threshold_mib,
        policy.utilization_bands,
        policy.utilization_hysteresis,
        policy.soft_burst,
        policy.soft_write_interval.as_secs(),
        policy.heartbeat.as_secs(),
    );
    let _ = writeln!(
        out,
        "{:<34} {:>6} {:>8} {:>11} {:>10} {:>7} {:>7} {:>7} {:>9}  writes by reason",
        "profile",
        "hours",
        "samples",
        "every-sample",
        "thresholds",
        "llmo",
        "busiest",
        "health",
        "stale-MiB"
    );
    for r in rows {
        let reasons: Vec<String> = r
            .by_reason
            .iter()
            .map(|(k, v)| format!("{}={v}", k.as_str()))
            .collect();
        let _ = writeln!(
            out,
            "{:<34} {:>6.1} {:>8} {:>11.1} {:>10.1} {:>7.1} {:>7} {:>7} {:>9}  {}",
            truncate(&r.profile, 34),
            r.duration.as_secs_f64() / 3600.0,
            r.samples,
            r.every_sample_per_hour,
            r.thresholds_only_per_hour,
            r.per_hour,
            r.busiest_hour,
            format!("{}/{}", r.health_changes, r.worst_health_delay_samples),
            r.worst_free_memory_error_mib,
            reasons.join(" "),
        );
    }
    let _ = writeln!(
        out,
        "every-sample: writing each reading; thresholds: change detection without the token bucket; \
         llmo: the policy above; busiest: writes in the busiest hour; health: changes seen / worst \
         delay in samples before they were written; stale-MiB: worst gap between written and \
         actual free memory of one GPU"
    );
    out
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(n - 1).collect();
        t.push('…');
        t
    }
}
