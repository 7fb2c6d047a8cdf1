//! The fleet file: node pools by GPU class and the deployment simulated on them.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::SimError;
use crate::api::{ArchitectureHints, HumanDuration, Manifest, Replicas, Slo};
use crate::plan::{Hardware, ModelArch};

/// A fleet file as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FleetFile {
    /// Name used in reports.
    pub name: String,
    /// GPUClass manifests, relative to the fleet file.
    pub gpu_classes: PathBuf,
    /// Node pools.
    pub pools: Vec<Pool>,
    /// The deployment simulated.
    pub deployment: SimDeployment,
}

/// Nodes of one GPU class.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Pool {
    /// GPUClass name.
    pub class: String,
    /// Nodes in the pool.
    pub nodes: u32,
}

/// A model, its plan and its SLO, in the words of a ModelDeployment.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SimDeployment {
    /// Name used for replicas.
    pub name: String,
    /// The model's shape.
    pub architecture: ArchitectureHints,
    /// GPUClass it runs on.
    pub gpu_class: String,
    /// GPUs per replica (tensor parallel; one pod per replica).
    pub tensor: u32,
    /// Which rows of the measurements calibrate this class, e.g. `h100-80gb`.
    pub calibration: String,
    /// From creation to ready: scheduling, image, weight load.
    pub cold_start: HumanDuration,
    /// Token budget of one engine step.
    pub max_batch_tokens: u32,
    /// Sequences running at once.
    pub max_running: usize,
    /// Replica bounds.
    pub replicas: Replicas,
    /// Service level.
    pub slo: Slo,
}

/// A fleet file with its classes resolved.
#[derive(Debug, Clone)]
pub struct Fleet {
    /// The file as written.
    pub file: FleetFile,
    /// The deployment's architecture.
    pub arch: ModelArch,
    /// The deployment's GPU class.
    pub hardware: Hardware,
    /// Most replicas the pools can hold.
    pub pool_replicas: u32,
}

impl Fleet {
    /// Reads and checks a fleet file.
    pub fn load(path: &Path) -> Result<Self, SimError> {
        let io = |p: &Path, e: std::io::Error| SimError::Io {
            path: p.to_owned(),
            message: e.to_string(),
        };
        let text = std::fs::read_to_string(path).map_err(|e| io(path, e))?;
        let file: FleetFile = serde_yaml::from_str(&text).map_err(|e| SimError::Fleet {
            message: format!("{}: {e}", path.display()),
        })?;
        let classes_path = path
            .parent()
            .unwrap_or(Path::new("."))
            .join(&file.gpu_classes);
        let classes_text =
            std::fs::read_to_string(&classes_path).map_err(|e| io(&classes_path, e))?;
        let d = &file.deployment;
        let class = crate::api::parse_manifests(&classes_text)
            .into_iter()
            .filter_map(Result::ok)
            .find_map(|m| match m {
                Manifest::GpuClass(c)
                    if c.metadata.name.as_deref() == Some(d.gpu_class.as_str()) =>
                {
                    Some(c)
                }
                _ => None,
            })
            .ok_or_else(|| SimError::Fleet {
                message: format!(
                    "GPUClass {:?} is not defined in {}",
                    d.gpu_class,
                    classes_path.display()
                ),
            })?;
        let hardware =
            Hardware::from_class(&d.gpu_class, &class.spec).map_err(|e| SimError::Fleet {
                message: e.to_string(),
            })?;
        let arch = ModelArch::from_hints(&d.architecture).map_err(|e| SimError::Fleet {
            message: e.to_string(),
        })?;
        let gpus: u32 = file
            .pools
            .iter()
            .filter(|p| p.class == d.gpu_class)
            .map(|p| p.nodes * hardware.devices_per_node)
            .sum();
        let pool_replicas = gpus / d.tensor.max(1);
        if pool_replicas == 0 {
            return Err(SimError::Fleet {
                message: format!(
                    "no pool of class {} holds a replica of {} GPUs",
                    d.gpu_class, d.tensor
                ),
            });
        }
        Ok(Self {
            file,
            arch,
            hardware,
            pool_replicas,
        })
    }

    /// The deployment.
    pub fn deployment(&self) -> &SimDeployment {
        &self.file.deployment
    }

    /// Price of one replica per hour.
    pub fn replica_price(&self) -> f64 {
        self.hardware.price_per_hour.unwrap_or(0.0) * f64::from(self.deployment().tensor)
    }

    /// Replica bounds, capped by what the pools hold.
    pub fn bounds(&self) -> (u32, u32) {
        let r = self.deployment().replicas;
        let max = (r.max.max(1) as u32).min(self.pool_replicas);
        ((r.min.max(1) as u32).min(max), max)
    }
}
