//! A simulated node: GPUs from a profile whose load moves deterministically with time.
//!
//! A reading is a pure function of (profile, node name, time): the same inputs give the same
//! figures whatever was read before, so a day of samples can be replayed in a test, and two runs
//! of the local cluster see the same fleet. Noise comes from a hash of (seed, node, GPU, time
//! step) instead of a random generator for the same reason.

use std::{f64::consts::TAU, time::Duration};

use crate::api::{GpuDevice, GpuHealth};

use super::{
    profile::{NvlinkTopology, SimulationProfile},
    source::{InventorySource, NodeReading, SourceKind},
    InventoryError,
};

/// Reads a [`SimulationProfile`] as if it were a node's GPUs.
#[derive(Clone, Debug)]
pub struct SimulatedSource {
    profile: SimulationProfile,
    origin: String,
    node_seed: u64,
    uuid_seed: u64,
}

/// The scripted state of one GPU at some time.
#[derive(Clone, Debug, PartialEq)]
struct ScriptedState {
    present: bool,
    health: GpuHealth,
    reason: Option<String>,
    allocated_mib: u64,
}

impl SimulatedSource {
    /// A source for node `node_name`; `origin` names the profile in the `Simulated` condition.
    pub fn new(profile: SimulationProfile, origin: impl Into<String>, node_name: &str) -> Self {
        let name_hash = fnv1a(node_name.as_bytes());
        Self {
            node_seed: mix(profile.seed ^ name_hash.rotate_left(17)),
            uuid_seed: name_hash,
            profile,
            origin: origin.into(),
        }
    }

    /// The profile being simulated.
    pub fn profile(&self) -> &SimulationProfile {
        &self.profile
    }

    /// The node's GPUs at time `t` since start.
    pub fn reading_at(&self, t: Duration) -> NodeReading {
        let total = self.profile.gpu_count();
        let states: Vec<ScriptedState> = (0..total).map(|i| self.scripted(i, t)).collect();
        let gpus = (0..total)
            .filter(|&i| states[i as usize].present)
            .map(|i| self.gpu_at(i, t, &states))
            .collect();
        NodeReading {
            gpus,
            driver_version: Some(self.profile.driver_version.clone()),
            cuda_version: Some(self.profile.cuda_version.clone()),
        }
    }

    fn scripted(&self, index: u32, t: Duration) -> ScriptedState {
        let mut state = ScriptedState {
            present: true,
            health: GpuHealth::Healthy,
            reason: None,
            allocated_mib: 0,
        };
        // Events are sorted by time when the profile is parsed.
        for e in self
            .profile
            .events
            .iter()
            .filter(|e| e.gpu == index && e.at.get() <= t)
        {
            if let Some(health) = e.health {
                state.health = health;
                state.reason = e.reason.clone();
            }
            if let Some(present) = e.present {
                state.present = present;
            }
            if let Some(mib) = e.allocate_mib {
                state.allocated_mib = mib;
            }
        }
        state
    }

    fn gpu_at(&self, index: u32, t: Duration, states: &[ScriptedState]) -> GpuDevice {
        let group = self.profile.group_of(index).expect("index below gpu_count");
        let state = &states[index as usize];
        let load = &self.profile.load;
        let wave = &load.utilization;

        let phase = unit(self.hash(index, 0x5048_4153, 0)) * TAU;
        let cycle = t.as_secs_f64() / wave.period.get().as_secs_f64();
        let step = (t.as_secs_f64() / wave.noise_step.get().as_secs_f64()).floor() as u64;
        let noise = signed_unit(self.hash(index, 0x5554_494c, step)) * wave.noise;
        let smooth = wave.mean + wave.amplitude * (TAU * cycle + phase).sin();
        // Work is drained from an unhealthy GPU.
        let drained = state.health == GpuHealth::Unhealthy;
        let utilization = if drained {
            0
        } else {
            (smooth + noise).clamp(0.0, 100.0).round() as u32
        };
        // Memory follows the traffic (KV cache in use), not the sample-to-sample jitter of
        // kernel activity, so it tracks the smooth wave, with its own noise on top.
        let traffic = if drained {
            0.0
        } else {
            smooth.clamp(0.0, 100.0) / 100.0
        };

        let memory_noise =
            signed_unit(self.hash(index, 0x4d45_4d4f, step)) * load.memory.noise_mib as f64;
        let busy_span = (load.memory.busy_mib - load.memory.idle_mib) as f64;
        let used = load.memory.idle_mib as f64
            + busy_span * traffic
            + memory_noise
            + state.allocated_mib as f64;
        let used = (used.max(0.0) as u64).min(group.memory_total_mib);

        let limit = f64::from(group.power_limit_watts);
        let power = limit * (0.2 + 0.8 * f64::from(utilization) / 100.0);

        GpuDevice {
            index,
            uuid: self.uuid(index),
            product: group.product.clone(),
            memory_total_mib: group.memory_total_mib,
            memory_free_mib: group.memory_total_mib - used,
            utilization_percent: utilization,
            temperature_c: Some(30 + utilization / 2),
            power_watts: Some(power.round() as u32),
            health: state.health,
            health_reason: state.reason.clone(),
            nvlink_peers: self.peers(index, states),
            mig_enabled: group.mig,
        }
    }

    fn peers(&self, index: u32, states: &[ScriptedState]) -> Vec<u32> {
        let total = self.profile.gpu_count();
        let linked: Vec<u32> = match &self.profile.nvlink {
            NvlinkTopology::None => Vec::new(),
            NvlinkTopology::All => (0..total).collect(),
            NvlinkTopology::Groups(groups) => groups
                .iter()
                .find(|g| g.contains(&index))
                .cloned()
                .unwrap_or_default(),
        };
        let mut peers: Vec<u32> = linked
            .into_iter()
            .filter(|&p| p != index && states[p as usize].present)
            .collect();
        peers.sort_unstable();
        peers
    }

    /// A stable, node-specific UUID in NVML's format, so that a GPU keeps its identity across
    /// samples and restarts, and nodes on the same profile do not share UUIDs.
    fn uuid(&self, index: u32) -> String {
        let a = mix(self.uuid_seed ^ u64::from(index).wrapping_mul(0x9e37_79b9));
        let b = mix(a ^ 0x5555);
        format!(
            "GPU-{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xffff,
            b >> 48,
            b & 0xffff_ffff_ffff
        )
    }

    fn hash(&self, index: u32, stream: u64, step: u64) -> u64 {
        mix(self.node_seed
            ^ mix(u64::from(index) ^ stream.rotate_left(32))
            ^ mix(step.wrapping_add(stream)))
    }
}

impl InventorySource for SimulatedSource {
    fn read(&mut self, elapsed: Duration) -> Result<NodeReading, InventoryError> {
        Ok(self.reading_at(elapsed))
    }

    fn kind(&self) -> SourceKind {
        SourceKind::Simulated(self.origin.clone())
    }
}

/// SplitMix64's finaliser: a fast bijective mixer, good enough for simulation noise.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// In [0, 1).
fn unit(h: u64) -> f64 {
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// In [-1, 1).
fn signed_unit(h: u64) -> f64 {
    unit(h) * 2.0 - 1.0
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROFILE: &str = r#"
seed: 11
gpus: [{count: 8, product: NVIDIA H100 80GB HBM3, memoryTotalMiB: 81559, powerLimitWatts: 700}]
nvlink: [[0, 1, 2, 3], [4, 5, 6, 7]]
load:
  utilization: {mean: 50, amplitude: 35, period: 30m, noise: 8}
  memory: {idleMiB: 1000, busyMiB: 40000, noiseMiB: 500}
events:
  - {at: 2m, gpu: 3, health: Unhealthy, reason: "Xid 79"}
  - {at: 10m, gpu: 3, health: Healthy}
  - {at: 5m, gpu: 5, present: false}
  - {at: 7m, gpu: 1, allocateMiB: 30000}
"#;

    fn source(node: &str) -> SimulatedSource {
        SimulatedSource::new(SimulationProfile::parse(PROFILE, "p").unwrap(), "p", node)
    }

    #[test]
    fn readings_are_a_pure_function_of_time() {
        let a = source("node-a");
        let b = source("node-a");
        let times: Vec<Duration> = (0..500).map(|i| Duration::from_secs(i * 37)).collect();
        let forward: Vec<NodeReading> = times.iter().map(|&t| a.reading_at(t)).collect();
        // Reading in another order on another instance gives the same figures.
        for (i, &t) in times.iter().enumerate().rev() {
            assert_eq!(b.reading_at(t), forward[i], "t = {t:?}");
        }
        // The load really moves.
        let utils: std::collections::BTreeSet<u32> = forward
            .iter()
            .map(|r| r.gpus[0].utilization_percent)
            .collect();
        assert!(utils.len() > 30, "{utils:?}");
    }

    #[test]
    fn nodes_on_one_profile_differ_but_keep_their_identity() {
        let a = source("node-a").reading_at(Duration::from_secs(60));
        let b = source("node-b").reading_at(Duration::from_secs(60));
        assert_ne!(a.gpus[0].uuid, b.gpus[0].uuid);
        assert_ne!(a, b);
        let later = source("node-a").reading_at(Duration::from_secs(3600));
        assert_eq!(a.gpus[0].uuid, later.gpus[0].uuid);
        assert!(a.gpus[0].uuid.starts_with("GPU-") && a.gpus[0].uuid.len() == 40);
        let uuids: std::collections::BTreeSet<&String> = a.gpus.iter().map(|g| &g.uuid).collect();
        assert_eq!(uuids.len(), 8);
    }

    #[test]
    fn scripted_events_apply_from_their_time_on() {
        let s = source("n");
        let at = |secs| s.reading_at(Duration::from_secs(secs));
        assert_eq!(at(119).gpus[3].health, GpuHealth::Healthy);
        let sick = at(120);
        assert_eq!(sick.gpus[3].health, GpuHealth::Unhealthy);
        assert_eq!(sick.gpus[3].health_reason.as_deref(), Some("Xid 79"));
        assert_eq!(sick.gpus[3].utilization_percent, 0);
        assert_eq!(at(600).gpus[3].health, GpuHealth::Healthy);
        assert_eq!(at(600).gpus[3].health_reason, None);
        // GPU 5 disappears: 7 GPUs, and its NVLink peer lists drop it.
        let gone = at(300);
        assert_eq!(gone.gpus.len(), 7);
        assert!(gone.gpus.iter().all(|g| g.index != 5));
        assert_eq!(
            gone.gpus
                .iter()
                .find(|g| g.index == 4)
                .unwrap()
                .nvlink_peers,
            [6, 7]
        );
        // GPU 1 holds 30000 MiB more from 7m on.
        let before = at(419).gpus[1].memory_free_mib;
        let after = at(420).gpus[1].memory_free_mib;
        assert!(before > after + 20_000, "{before} -> {after}");
    }

    #[test]
    fn figures_stay_within_their_physical_bounds() {
        let s = source("n");
        for i in 0..(24 * 360) {
            for g in s.reading_at(Duration::from_secs(i * 10)).gpus {
                assert!(g.utilization_percent <= 100);
                assert!(g.memory_free_mib <= g.memory_total_mib);
                assert!(g.power_watts.unwrap() <= 700);
            }
        }
        let r = s.reading_at(Duration::ZERO);
        assert_eq!(r.gpus[0].nvlink_peers, [1, 2, 3]);
        assert_eq!(r.gpus[6].nvlink_peers, [4, 5, 7]);
        assert_eq!(r.driver_version.as_deref(), Some("550.54.15"));
    }
}
