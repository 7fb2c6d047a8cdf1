//! What an inventory source is: something that reads a node's GPUs when asked.

use std::time::Duration;

use crate::api::GpuDevice;

use super::InventoryError;

/// One reading of a node's GPUs, before class matching.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeReading {
    /// Each GPU, in index order.
    pub gpus: Vec<GpuDevice>,
    /// NVIDIA driver version.
    pub driver_version: Option<String>,
    /// Highest CUDA version the driver supports, `major.minor`.
    pub cuda_version: Option<String>,
}

/// Where the figures come from; written to the `Ready` and `Simulated` conditions so that
/// nobody mistakes a simulated node for a real one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceKind {
    /// The NVIDIA driver, through NVML.
    Nvml,
    /// A simulation profile; the string names the file.
    Simulated(String),
    /// No NVML and the agent was told the node is a CPU node (`--cpu-class`).
    NoGpus,
}

/// A node's GPUs, read on demand.
///
/// Reads are synchronous: NVML calls return in microseconds to milliseconds, and the agent
/// reads once per interval, so a blocking call on the agent's own task costs nothing.
pub trait InventorySource {
    /// Reads the GPUs. `elapsed` is the time since the agent started; real sources ignore it,
    /// simulated ones are a pure function of it, so a test can replay a day in milliseconds.
    fn read(&mut self, elapsed: Duration) -> Result<NodeReading, InventoryError>;

    /// Where the figures come from.
    fn kind(&self) -> SourceKind;
}

/// The source of a node without GPUs that was declared a CPU node: always empty.
#[derive(Debug, Default)]
pub struct NoGpus;

impl InventorySource for NoGpus {
    fn read(&mut self, _elapsed: Duration) -> Result<NodeReading, InventoryError> {
        Ok(NodeReading::default())
    }

    fn kind(&self) -> SourceKind {
        SourceKind::NoGpus
    }
}
