//! The node agent: reads a node's GPUs (through NVML, or from a simulation profile), matches them
//! to a GPUClass, and keeps the node's `GPUNode` status and `llmo.dev/gpu-class` label current,
//! writing only on material change and on a slow heartbeat.
//!
//! Everything that decides (matching, the status, when to write, the simulation) is pure and
//! tested without a cluster; only `writer` and the loop in `agent` talk to the API server.

mod agent;
pub mod change;
mod error;
pub mod matching;
mod nvml;
pub mod profile;
pub mod simulated;
pub mod source;
pub mod status;
pub mod write_rate;
pub mod writer;

pub use agent::{main, run_agent, AgentArgs};
pub use change::{ChangeDetector, WritePolicy, WriteReason};
pub use error::InventoryError;
pub use matching::{glob_match, match_gpu_class, ClassMatch};
pub use nvml::NvmlSource;
pub use profile::SimulationProfile;
pub use simulated::SimulatedSource;
pub use source::{InventorySource, NodeReading, SourceKind};
pub use write_rate::{measure_write_rate, render_table, WriteRate};
pub use writer::NodeWriter;

/// Field manager of every write the agent makes.
pub const FIELD_MANAGER: &str = "llmo-agent";
/// Node label the agent sets to the node's GPUClass.
pub const GPU_CLASS_LABEL: &str = "llmo.dev/gpu-class";
/// Node label set by NVIDIA GPU feature discovery, matched against `matching.productLabels`.
pub const GPU_PRODUCT_LABEL: &str = "nvidia.com/gpu.product";
