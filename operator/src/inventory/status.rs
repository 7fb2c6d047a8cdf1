//! The GPUNode status the agent would write for a reading. Pure, so that the agent, the
//! write-rate measurement and the tests build it the same way.

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};

use crate::api::{GPUNodeStatus, GpuHealth};

use super::{matching::ClassMatch, source::NodeReading, source::SourceKind};

/// Condition: the agent reads the node's GPUs.
pub const READY: &str = "Ready";
/// Condition: the figures come from a simulation profile, not from hardware.
pub const SIMULATED: &str = "Simulated";

/// Reasons of the agent's conditions.
pub mod reasons {
    /// NVML answered.
    pub const NVML_READ: &str = "NvmlRead";
    /// A simulation profile was read.
    pub const PROFILE_READ: &str = "ProfileRead";
    /// No NVML, and the node was declared a CPU node.
    pub const NO_GPUS: &str = "NoGpus";
    /// Reading failed; the GPUs listed are the last ones read.
    pub const READ_FAILED: &str = "ReadFailed";
    /// `Simulated` is `False`: figures come from NVML.
    pub const HARDWARE: &str = "Hardware";
    /// `Simulated` is `True`.
    pub const SIMULATION_PROFILE: &str = "SimulationProfile";
}

/// Builds the status for a successful reading. `previous` holds the conditions last written,
/// so that `lastTransitionTime` moves only when a condition's status does.
pub fn build_status(
    reading: &NodeReading,
    matched: &ClassMatch,
    source: &SourceKind,
    now: Timestamp,
    previous: &[Condition],
) -> GPUNodeStatus {
    let healthy: Vec<_> = reading
        .gpus
        .iter()
        .filter(|g| g.health == GpuHealth::Healthy)
        .collect();
    let (reason, mut message) = match source {
        SourceKind::Nvml => (
            reasons::NVML_READ,
            format!("read {} GPUs through NVML", reading.gpus.len()),
        ),
        SourceKind::Simulated(origin) => (
            reasons::PROFILE_READ,
            format!("simulated {} GPUs from {origin}", reading.gpus.len()),
        ),
        SourceKind::NoGpus => (
            reasons::NO_GPUS,
            "NVML is not available and the node was declared a CPU node".to_owned(),
        ),
    };
    if let Some(note) = &matched.note {
        message = format!("{message}; {note}");
    }
    let conditions = vec![
        condition(previous, READY, true, reason, &message, now),
        simulated_condition(previous, source, now),
    ];
    GPUNodeStatus {
        gpu_class: matched.class.clone(),
        unknown_products: matched.unknown_products.clone(),
        gpu_count: reading.gpus.len() as u32,
        healthy_gpus: healthy.len() as u32,
        memory_free_mib: healthy.iter().map(|g| g.memory_free_mib).sum(),
        driver_version: reading.driver_version.clone(),
        cuda_version: reading.cuda_version.clone(),
        gpus: reading.gpus.clone(),
        observed_at: Some(Time(now)),
        conditions,
    }
}

/// The status after a failed reading: the last GPUs written stay (placement should treat them
/// as stale), `Ready` turns `False` with the error.
pub fn failed_status(
    last: Option<&GPUNodeStatus>,
    source: &SourceKind,
    error: &str,
    now: Timestamp,
) -> GPUNodeStatus {
    let mut status = last.cloned().unwrap_or_default();
    let previous = std::mem::take(&mut status.conditions);
    status.conditions = vec![
        condition(&previous, READY, false, reasons::READ_FAILED, error, now),
        simulated_condition(&previous, source, now),
    ];
    status
}

fn simulated_condition(previous: &[Condition], source: &SourceKind, now: Timestamp) -> Condition {
    match source {
        SourceKind::Simulated(origin) => condition(
            previous,
            SIMULATED,
            true,
            reasons::SIMULATION_PROFILE,
            &format!("figures come from the simulation profile {origin}, not from hardware"),
            now,
        ),
        _ => condition(
            previous,
            SIMULATED,
            false,
            reasons::HARDWARE,
            "figures come from the node",
            now,
        ),
    }
}

fn condition(
    previous: &[Condition],
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
    now: Timestamp,
) -> Condition {
    let status = if status { "True" } else { "False" }.to_owned();
    let since = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or(Time(now));
    Condition {
        type_: type_.to_owned(),
        status,
        reason: reason.to_owned(),
        message: message.to_owned(),
        last_transition_time: since,
        observed_generation: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::GpuDevice;

    fn gpu(index: u32, health: GpuHealth, free: u64) -> GpuDevice {
        GpuDevice {
            index,
            uuid: format!("GPU-{index}"),
            product: "NVIDIA L4".into(),
            memory_total_mib: 23034,
            memory_free_mib: free,
            health,
            ..GpuDevice::default()
        }
    }

    #[test]
    fn counts_and_free_memory_cover_healthy_gpus_only() {
        let reading = NodeReading {
            gpus: vec![
                gpu(0, GpuHealth::Healthy, 1000),
                gpu(1, GpuHealth::Unhealthy, 5000),
                gpu(2, GpuHealth::Healthy, 2000),
            ],
            driver_version: Some("550".into()),
            cuda_version: Some("12.4".into()),
        };
        let matched = ClassMatch {
            class: Some("l4".into()),
            ..ClassMatch::default()
        };
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        let s = build_status(&reading, &matched, &SourceKind::Nvml, now, &[]);
        assert_eq!(
            (s.gpu_count, s.healthy_gpus, s.memory_free_mib),
            (3, 2, 3000)
        );
        assert_eq!(s.gpu_class.as_deref(), Some("l4"));
        assert_eq!(s.conditions[0].type_, READY);
        assert_eq!(s.conditions[0].status, "True");
        assert_eq!(s.conditions[1].status, "False");

        // A later reading keeps the transition time; a failure moves it.
        let later = Timestamp::from_second(1_800_000_600).unwrap();
        let again = build_status(&reading, &matched, &SourceKind::Nvml, later, &s.conditions);
        assert_eq!(again.conditions[0].last_transition_time, Time(now));
        let failed = failed_status(Some(&again), &SourceKind::Nvml, "NVML lost", later);
        assert_eq!(failed.conditions[0].status, "False");
        assert_eq!(failed.conditions[0].last_transition_time, Time(later));
        assert_eq!(failed.gpus, again.gpus);
    }

    #[test]
    fn simulated_nodes_say_so() {
        let matched = ClassMatch::default();
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        let s = build_status(
            &NodeReading::default(),
            &matched,
            &SourceKind::Simulated("8xh100.yaml".into()),
            now,
            &[],
        );
        assert_eq!(s.conditions[1].type_, SIMULATED);
        assert_eq!(s.conditions[1].status, "True");
        assert!(s.conditions[1].message.contains("8xh100.yaml"));
    }
}
