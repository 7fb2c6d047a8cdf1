//! Simulation profiles: the YAML that describes a node's simulated GPUs, their NVLink topology,
//! how their load moves over time and scripted events such as a GPU turning unhealthy.
//!
//! The local cluster and the tests run node agents on such profiles, so a bad profile is refused
//! up front with the field that is wrong, rather than producing a plausible but odd node.
//!
//! ```yaml
//! seed: 7
//! gpus: [{count: 8, product: NVIDIA H100 80GB HBM3, memoryTotalMiB: 81559}]
//! nvlink: all                 # all | none | [[0, 1], [2, 3]]
//! load:
//!   utilization: {mean: 50, amplitude: 35, period: 40m, noise: 8}
//!   memory: {idleMiB: 1024, busyMiB: 30000, noiseMiB: 1024}
//! events:
//!   - {at: 2h, gpu: 3, health: Unhealthy, reason: "Xid 79: GPU has fallen off the bus"}
//!   - {at: 5h, gpu: 3, health: Healthy}
//!   - {at: 8h, gpu: 5, present: false}
//!   - {at: 9h, gpu: 0, allocateMiB: 60000}
//! ```

use std::{path::Path, time::Duration};

use serde::{de, Deserialize, Deserializer};

use crate::api::{GpuHealth, HumanDuration};

use super::InventoryError;

/// Most GPUs one simulated node may have; matches the GPUClass bound on `devicesPerNode`.
pub const MAX_SIMULATED_GPUS: u32 = 64;

/// A parsed and checked simulation profile.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SimulationProfile {
    /// What the profile models, for people.
    #[serde(default)]
    pub description: Option<String>,
    /// Seed of the deterministic noise; nodes also mix in their name so that a fleet on one
    /// profile does not move in lockstep.
    #[serde(default)]
    pub seed: u64,
    /// Driver version to report.
    #[serde(default = "default_driver")]
    pub driver_version: String,
    /// CUDA version to report.
    #[serde(default = "default_cuda")]
    pub cuda_version: String,
    /// The GPUs, in index order. Empty for a CPU node.
    #[serde(default)]
    pub gpus: Vec<GpuGroup>,
    /// Which GPUs reach each other over NVLink.
    #[serde(default)]
    pub nvlink: NvlinkTopology,
    /// How load moves over time.
    #[serde(default)]
    pub load: LoadProfile,
    /// Scripted changes, applied from their time on; later events override earlier ones.
    #[serde(default)]
    pub events: Vec<ScriptedEvent>,
}

fn default_driver() -> String {
    "550.54.15".into()
}

fn default_cuda() -> String {
    "12.4".into()
}

/// `count` GPUs of one model.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GpuGroup {
    /// How many.
    pub count: u32,
    /// NVML product name, e.g. `NVIDIA L4`.
    pub product: String,
    /// Total memory of one GPU in MiB, as NVML reports it.
    #[serde(rename = "memoryTotalMiB")]
    pub memory_total_mib: u64,
    /// Board power limit in watts; power draw scales from a fifth of it to all of it with load.
    #[serde(default = "default_power")]
    pub power_limit_watts: u32,
    /// Whether MIG mode is on.
    #[serde(default)]
    pub mig: bool,
}

fn default_power() -> u32 {
    300
}

/// NVLink connectivity: every GPU with every other (NVSwitch), none (PCIe only), or groups.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum NvlinkTopology {
    /// No NVLink.
    #[default]
    None,
    /// All GPUs reach each other (an NVSwitch fabric).
    All,
    /// Each group is fully connected; GPUs in different groups are not linked.
    Groups(Vec<Vec<u32>>),
}

impl<'de> Deserialize<'de> for NvlinkTopology {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        const EXPECTED: &str =
            "write `all`, `none` or a list of groups of GPU indices such as [[0, 1], [2, 3]]";
        match serde_yaml::Value::deserialize(d)? {
            serde_yaml::Value::String(s) if s == "all" => Ok(Self::All),
            serde_yaml::Value::String(s) if s == "none" => Ok(Self::None),
            serde_yaml::Value::Null => Ok(Self::None),
            v @ serde_yaml::Value::Sequence(_) => serde_yaml::from_value(v)
                .map(Self::Groups)
                .map_err(|e| de::Error::custom(format!("{e}; {EXPECTED}"))),
            other => Err(de::Error::custom(format!(
                "unexpected {}; {EXPECTED}",
                serde_yaml::to_string(&other).unwrap_or_default().trim_end()
            ))),
        }
    }
}

/// How utilization and memory move over time.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadProfile {
    /// GPU utilization in percent.
    #[serde(default)]
    pub utilization: UtilizationWave,
    /// Memory in use, following the traffic (KV cache grows with load).
    #[serde(default)]
    pub memory: MemoryLoad,
}

/// `mean + amplitude·sin(2πt/period + phase) + noise`, in percent, clamped to 0–100. Each GPU
/// has its own phase.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UtilizationWave {
    /// Middle of the wave.
    #[serde(default)]
    pub mean: f64,
    /// Half the swing.
    #[serde(default)]
    pub amplitude: f64,
    /// One full cycle.
    #[serde(default = "default_period")]
    pub period: HumanDuration,
    /// Uniform noise of at most this many points, redrawn every `noiseStep`.
    #[serde(default)]
    pub noise: f64,
    /// How long one noise draw holds; the agent's default interval.
    #[serde(default = "default_noise_step")]
    pub noise_step: HumanDuration,
}

impl Default for UtilizationWave {
    fn default() -> Self {
        Self {
            mean: 0.0,
            amplitude: 0.0,
            period: default_period(),
            noise: 0.0,
            noise_step: default_noise_step(),
        }
    }
}

fn default_period() -> HumanDuration {
    Duration::from_secs(3600).into()
}

fn default_noise_step() -> HumanDuration {
    Duration::from_secs(10).into()
}

/// Memory in use: `idleMiB` at no traffic to `busyMiB` at full traffic (the utilization wave
/// without its noise), plus noise of its own.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MemoryLoad {
    /// In use when idle (driver and context).
    #[serde(default, rename = "idleMiB")]
    pub idle_mib: u64,
    /// In use at full utilization.
    #[serde(default, rename = "busyMiB")]
    pub busy_mib: u64,
    /// Uniform noise of at most this many MiB.
    #[serde(default, rename = "noiseMiB")]
    pub noise_mib: u64,
}

/// A change to one GPU from time `at` on.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ScriptedEvent {
    /// Time since the agent started.
    pub at: HumanDuration,
    /// GPU index.
    pub gpu: u32,
    /// New health.
    #[serde(default)]
    pub health: Option<GpuHealth>,
    /// Why, for `Degraded` and `Unhealthy`.
    #[serde(default)]
    pub reason: Option<String>,
    /// `false`: NVML stops reporting the GPU; `true`: it comes back.
    #[serde(default)]
    pub present: Option<bool>,
    /// Memory held by a workload from now on, on top of the load; replaces an earlier value.
    #[serde(default, rename = "allocateMiB")]
    pub allocate_mib: Option<u64>,
}

impl SimulationProfile {
    /// Reads and checks a profile file.
    pub fn load(path: &Path) -> Result<Self, InventoryError> {
        let text = std::fs::read_to_string(path).map_err(|source| InventoryError::ProfileRead {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and checks profile text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, InventoryError> {
        let err = |field: String, message: String| InventoryError::Profile {
            path: origin.to_owned(),
            field,
            message,
        };
        let deserializer = serde_yaml::Deserializer::from_str(text);
        let mut profile: Self = serde_path_to_error::deserialize(deserializer).map_err(|e| {
            let field = e.path().to_string();
            let field = if field == "." {
                "(top level)".into()
            } else {
                field
            };
            err(field, e.into_inner().to_string())
        })?;
        profile
            .check()
            .map_err(|(field, message)| err(field, message))?;
        profile.events.sort_by_key(|e| e.at);
        Ok(profile)
    }

    /// A profile for a node whose GPUs are described only by its labels, as NVIDIA's GPU
    /// feature discovery writes them (`nvidia.com/gpu.product`, `.count`, `.memory` in MiB) or as
    /// a simulated cluster does: idle GPUs of that product. `llmo.dev/simulated-nvlink: all`
    /// links them all. A node without `nvidia.com/gpu.count` (or a count of 0) has no GPUs.
    pub fn from_node_labels(
        node: &str,
        labels: &std::collections::BTreeMap<String, String>,
    ) -> Result<Self, InventoryError> {
        let err = |field: &str, message: String| InventoryError::Profile {
            path: format!("labels of Node {node}"),
            field: field.to_owned(),
            message,
        };
        let count: u32 = match labels.get("nvidia.com/gpu.count") {
            None => 0,
            Some(v) => v
                .parse()
                .map_err(|_| err("nvidia.com/gpu.count", format!("{v:?} is not a count")))?,
        };
        let mut profile = Self {
            description: Some(format!("GPUs from the labels of Node {node}")),
            seed: 0,
            driver_version: default_driver(),
            cuda_version: default_cuda(),
            gpus: Vec::new(),
            nvlink: NvlinkTopology::None,
            load: LoadProfile::default(),
            events: Vec::new(),
        };
        if count == 0 {
            return Ok(profile);
        }
        let product = labels
            .get("nvidia.com/gpu.product")
            .ok_or_else(|| {
                err(
                    "nvidia.com/gpu.product",
                    "missing; it names the GPU model".into(),
                )
            })?
            // Feature discovery writes NVML's product name with dashes for spaces.
            .replace('-', " ");
        let memory: u64 = labels
            .get("nvidia.com/gpu.memory")
            .ok_or_else(|| {
                err(
                    "nvidia.com/gpu.memory",
                    "missing; it is each GPU's memory in MiB".into(),
                )
            })
            .and_then(|v| {
                v.parse()
                    .map_err(|_| err("nvidia.com/gpu.memory", format!("{v:?} is not MiB")))
            })?;
        profile.gpus.push(GpuGroup {
            count,
            product,
            memory_total_mib: memory,
            power_limit_watts: default_power(),
            mig: false,
        });
        if labels.get("llmo.dev/simulated-nvlink").map(String::as_str) == Some("all") {
            profile.nvlink = NvlinkTopology::All;
        }
        profile
            .check()
            .map_err(|(field, message)| err(&field, message))?;
        Ok(profile)
    }

    /// Total number of GPUs.
    pub fn gpu_count(&self) -> u32 {
        self.gpus.iter().map(|g| g.count).sum()
    }

    /// The group that GPU `index` belongs to.
    pub fn group_of(&self, index: u32) -> Option<&GpuGroup> {
        let mut first = 0;
        for group in &self.gpus {
            if index < first + group.count {
                return Some(group);
            }
            first += group.count;
        }
        None
    }

    fn check(&self) -> Result<(), (String, String)> {
        let fail = |field: &str, message: String| Err((field.to_owned(), message));
        let mut total = 0u32;
        for (i, g) in self.gpus.iter().enumerate() {
            if g.count == 0 {
                return fail(&format!("gpus[{i}].count"), "must be at least 1".into());
            }
            if g.product.trim().is_empty() {
                return fail(
                    &format!("gpus[{i}].product"),
                    "give the NVML product name, e.g. `NVIDIA L4`".into(),
                );
            }
            if g.memory_total_mib == 0 {
                return fail(
                    &format!("gpus[{i}].memoryTotalMiB"),
                    "must be more than 0".into(),
                );
            }
            if g.memory_total_mib < self.load.memory.busy_mib + self.load.memory.noise_mib {
                return fail(
                    &format!("gpus[{i}].memoryTotalMiB"),
                    format!(
                        "{} MiB is less than load.memory.busyMiB + noiseMiB ({} MiB)",
                        g.memory_total_mib,
                        self.load.memory.busy_mib + self.load.memory.noise_mib
                    ),
                );
            }
            total = total.saturating_add(g.count);
        }
        if total > MAX_SIMULATED_GPUS {
            return fail(
                "gpus",
                format!("{total} GPUs; a node has at most {MAX_SIMULATED_GPUS}"),
            );
        }
        let index_ok = |field: String, index: u32| {
            if index < total {
                Ok(())
            } else {
                Err((
                    field,
                    format!(
                        "GPU {index} does not exist; the profile has {total} GPUs{}",
                        if total > 0 {
                            format!(" (0..{})", total - 1)
                        } else {
                            String::new()
                        }
                    ),
                ))
            }
        };
        if let NvlinkTopology::Groups(groups) = &self.nvlink {
            let mut seen = vec![false; total as usize];
            for (g, members) in groups.iter().enumerate() {
                if members.len() < 2 {
                    return fail(
                        &format!("nvlink[{g}]"),
                        "an NVLink group needs at least 2 GPUs".into(),
                    );
                }
                for (m, &index) in members.iter().enumerate() {
                    index_ok(format!("nvlink[{g}][{m}]"), index)?;
                    if std::mem::replace(&mut seen[index as usize], true) {
                        return fail(
                            &format!("nvlink[{g}][{m}]"),
                            format!("GPU {index} is in two NVLink groups"),
                        );
                    }
                }
            }
        }
        let u = &self.load.utilization;
        if !(0.0..=100.0).contains(&u.mean) {
            return fail(
                "load.utilization.mean",
                format!("{} is not a percentage (0 to 100)", u.mean),
            );
        }
        if !(0.0..=100.0).contains(&u.amplitude) || !(0.0..=100.0).contains(&u.noise) {
            return fail(
                "load.utilization",
                "amplitude and noise are percentage points, 0 to 100".into(),
            );
        }
        if u.period.get().is_zero() || u.noise_step.get().is_zero() {
            return fail(
                "load.utilization",
                "period and noiseStep must be longer than 0s".into(),
            );
        }
        let m = &self.load.memory;
        if m.busy_mib < m.idle_mib {
            return fail(
                "load.memory.busyMiB",
                format!(
                    "{} MiB is less than idleMiB ({} MiB)",
                    m.busy_mib, m.idle_mib
                ),
            );
        }
        for (i, e) in self.events.iter().enumerate() {
            index_ok(format!("events[{i}].gpu"), e.gpu)?;
            if e.health.is_none() && e.present.is_none() && e.allocate_mib.is_none() {
                return fail(
                    &format!("events[{i}]"),
                    "an event changes something: give health, present or allocateMiB".into(),
                );
            }
            if e.reason.is_some() && e.health.is_none() {
                return fail(
                    &format!("events[{i}].reason"),
                    "a reason goes with a health change".into(),
                );
            }
            if let Some(mib) = e.allocate_mib {
                let group = self.group_of(e.gpu).expect("index checked above");
                if mib > group.memory_total_mib {
                    return fail(
                        &format!("events[{i}].allocateMiB"),
                        format!(
                            "{mib} MiB is more than GPU {}'s {} MiB",
                            e.gpu, group.memory_total_mib
                        ),
                    );
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
seed: 3
gpus: [{count: 4, product: NVIDIA L4, memoryTotalMiB: 23034}]
nvlink: none
load:
  utilization: {mean: 40, amplitude: 30, period: 20m, noise: 5}
  memory: {idleMiB: 500, busyMiB: 16000}
events:
  - {at: 2m, gpu: 3, health: Unhealthy, reason: "uncorrectable ECC errors"}
  - {at: 1m, gpu: 1, allocateMiB: 4000}
"#;

    fn error_of(text: &str) -> String {
        SimulationProfile::parse(text, "p.yaml")
            .expect_err("the profile should be refused")
            .to_string()
    }

    #[test]
    fn a_good_profile_parses_with_events_in_time_order() {
        let p = SimulationProfile::parse(GOOD, "p.yaml").unwrap();
        assert_eq!(p.gpu_count(), 4);
        assert_eq!(p.nvlink, NvlinkTopology::None);
        assert_eq!(p.events[0].gpu, 1);
        assert_eq!(p.events[1].health, Some(GpuHealth::Unhealthy));
        assert_eq!(p.driver_version, "550.54.15");
    }

    #[test]
    fn nvlink_takes_all_none_or_groups() {
        let base = "gpus: [{count: 4, product: X, memoryTotalMiB: 100}]\nnvlink: ";
        let p = |t: &str| SimulationProfile::parse(&format!("{base}{t}"), "p");
        assert_eq!(p("all").unwrap().nvlink, NvlinkTopology::All);
        assert_eq!(
            p("[[0, 1], [2, 3]]").unwrap().nvlink,
            NvlinkTopology::Groups(vec![vec![0, 1], vec![2, 3]])
        );
        let e = p("mesh").unwrap_err().to_string();
        assert!(
            e.contains("nvlink") && e.contains("write `all`, `none`"),
            "{e}"
        );
        let e = p("[[0, 1], [1, 2]]").unwrap_err().to_string();
        assert!(
            e.contains("nvlink[1][0]: GPU 1 is in two NVLink groups"),
            "{e}"
        );
        let e = p("[[0, 7]]").unwrap_err().to_string();
        assert!(
            e.contains("GPU 7 does not exist; the profile has 4 GPUs (0..3)"),
            "{e}"
        );
        let e = p("[[2]]").unwrap_err().to_string();
        assert!(e.contains("at least 2 GPUs"), "{e}");
    }

    #[test]
    fn errors_name_the_file_and_the_field() {
        let e = error_of("gpus: [{count: 2, product: X}]");
        assert!(e.starts_with("simulation profile p.yaml: gpus[0]: "), "{e}");
        assert!(e.contains("memoryTotalMiB"), "{e}");

        let e = error_of("gpus: [{count: 2, product: X, memoryTotalMiB: 10, colour: red}]");
        assert!(e.contains("unknown field `colour`"), "{e}");

        let e = error_of(
            "gpus: [{count: 1, product: X, memoryTotalMiB: 10}]\nload: {utilization: {mean: 140}}",
        );
        assert!(
            e.contains("load.utilization.mean: 140 is not a percentage"),
            "{e}"
        );

        let e = error_of("gpus: [{count: 1, product: X, memoryTotalMiB: 10}]\nload: {utilization: {period: 10 minutes}}");
        assert!(e.contains("load.utilization.period"), "{e}");
        assert!(e.contains("invalid duration"), "{e}");

        let e = error_of("gpus: [{count: 0, product: X, memoryTotalMiB: 10}]");
        assert!(e.contains("gpus[0].count: must be at least 1"), "{e}");

        let e = error_of("gpus: [{count: 2, product: X, memoryTotalMiB: 1000}]\nload: {memory: {idleMiB: 100, busyMiB: 2000}}");
        assert!(
            e.contains("gpus[0].memoryTotalMiB: 1000 MiB is less than"),
            "{e}"
        );

        let e = error_of("gpus: [{count: 2, product: X, memoryTotalMiB: 10}]\nevents: [{at: 1m, gpu: 2, health: Unhealthy}]");
        assert!(e.contains("events[0].gpu: GPU 2 does not exist"), "{e}");

        let e = error_of(
            "gpus: [{count: 2, product: X, memoryTotalMiB: 10}]\nevents: [{at: 1m, gpu: 1}]",
        );
        assert!(e.contains("events[0]: an event changes something"), "{e}");

        let e = error_of("gpus: [{count: 2, product: X, memoryTotalMiB: 10}]\nevents: [{at: 1m, gpu: 1, health: Sick}]");
        assert!(
            e.contains("events[0].health") && e.contains("Unhealthy"),
            "{e}"
        );

        let e = error_of("gpus: [{count: 40, product: X, memoryTotalMiB: 10}, {count: 40, product: Y, memoryTotalMiB: 10}]");
        assert!(e.contains("80 GPUs; a node has at most 64"), "{e}");

        let e = error_of("gpus: [");
        assert!(e.starts_with("simulation profile p.yaml:"), "{e}");
    }

    #[test]
    fn the_shipped_profiles_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/simulated");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "yaml") {
                SimulationProfile::load(&path).unwrap_or_else(|e| panic!("{e}"));
                n += 1;
            }
        }
        assert!(n >= 2, "examples/simulated holds the documented profiles");
    }

    #[test]
    fn a_profile_from_node_labels() {
        let labels = |pairs: &[(&str, &str)]| -> std::collections::BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        let p = SimulationProfile::from_node_labels(
            "n1",
            &labels(&[
                ("nvidia.com/gpu.count", "8"),
                ("nvidia.com/gpu.product", "NVIDIA-H100-80GB-HBM3"),
                ("nvidia.com/gpu.memory", "81559"),
                ("llmo.dev/simulated-nvlink", "all"),
            ]),
        )
        .unwrap();
        assert_eq!(p.gpu_count(), 8);
        assert_eq!(p.gpus[0].product, "NVIDIA H100 80GB HBM3");
        assert_eq!(p.gpus[0].memory_total_mib, 81559);
        assert_eq!(p.nvlink, NvlinkTopology::All);

        let cpu = SimulationProfile::from_node_labels("n2", &labels(&[])).unwrap();
        assert_eq!(cpu.gpu_count(), 0);

        let e = SimulationProfile::from_node_labels(
            "n3",
            &labels(&[
                ("nvidia.com/gpu.count", "2"),
                ("nvidia.com/gpu.product", "NVIDIA-L4"),
            ]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("Node n3") && e.contains("nvidia.com/gpu.memory"),
            "{e}"
        );
    }
}
