//! `GPUNode`: the live GPU inventory of one node, written by the node agent.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::conditions::conditions_schema;

/// Operator-facing settings of a node's GPUs. The node agent owns the status; people own this.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "llmo.dev",
    version = "v1alpha1",
    kind = "GPUNode",
    status = "GPUNodeStatus",
    shortname = "gpun",
    category = "llmo",
    doc = "The GPUs of one node as its node agent last read them through NVML: memory, utilization, health and NVLink topology. Named after the node.",
    printcolumn(name = "Class", type_ = "string", json_path = ".status.gpuClass"),
    printcolumn(name = "GPUs", type_ = "integer", json_path = ".status.gpuCount"),
    printcolumn(name = "Healthy", type_ = "integer", json_path = ".status.healthyGpus"),
    printcolumn(
        name = "Free-MiB",
        type_ = "integer",
        json_path = ".status.memoryFreeMiB"
    ),
    printcolumn(
        name = "Driver",
        type_ = "string",
        json_path = ".status.driverVersion",
        priority = 1
    ),
    printcolumn(name = "Observed", type_ = "date", json_path = ".status.observedAt"),
    printcolumn(
        name = "Unschedulable",
        type_ = "boolean",
        json_path = ".spec.unschedulable",
        priority = 1
    )
)]
#[serde(rename_all = "camelCase")]
pub struct GPUNodeSpec {
    /// When true, llmo places no new replica groups on this node; running groups stay.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unschedulable: bool,
}

/// The node agent's last reading.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GPUNodeStatus {
    /// GPUClass the GPUs matched; empty when they matched none (see `unknownProducts`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_class: Option<String>,
    /// Product names that matched no GPUClass. They are reported, never guessed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unknown_products: Vec<String>,
    /// Number of GPUs NVML reports.
    #[serde(default)]
    pub gpu_count: u32,
    /// GPUs without health problems.
    #[serde(default)]
    pub healthy_gpus: u32,
    /// Free memory summed over healthy GPUs, in MiB.
    #[serde(default)]
    #[serde(rename = "memoryFreeMiB")]
    pub memory_free_mib: u64,
    /// NVIDIA driver version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver_version: Option<String>,
    /// Highest CUDA version the driver supports, e.g. `12.4`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cuda_version: Option<String>,
    /// Each GPU, by NVML index.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpus: Vec<GpuDevice>,
    /// When the agent read these figures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_at: Option<Time>,
    /// `Ready` (the agent reads NVML) and `Simulated` (figures come from a profile).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
}

/// One GPU as NVML reports it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GpuDevice {
    /// NVML index on the node.
    pub index: u32,
    /// Stable identifier, `GPU-...`.
    pub uuid: String,
    /// Product name, e.g. `NVIDIA H100 80GB HBM3`.
    pub product: String,
    /// Total memory in MiB.
    #[serde(rename = "memoryTotalMiB")]
    pub memory_total_mib: u64,
    /// Free memory in MiB.
    #[serde(rename = "memoryFreeMiB")]
    pub memory_free_mib: u64,
    /// GPU utilization over the last sample period, percent.
    #[serde(default)]
    #[schemars(range(max = 100))]
    pub utilization_percent: u32,
    /// Temperature in degrees Celsius.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature_c: Option<u32>,
    /// Power draw in watts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_watts: Option<u32>,
    /// `Healthy`, `Degraded` (correctable errors, throttling) or `Unhealthy` (uncorrectable ECC,
    /// Xid errors, fallen off the bus).
    #[serde(default)]
    pub health: GpuHealth,
    /// Why the GPU is not healthy, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_reason: Option<String>,
    /// Indices of GPUs on this node reachable over NVLink.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nvlink_peers: Vec<u32>,
    /// Whether MIG (multi-instance GPU) mode is enabled.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub mig_enabled: bool,
}

/// Health of one GPU.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum GpuHealth {
    /// No errors.
    #[default]
    Healthy,
    /// Usable but suspect.
    Degraded,
    /// Not usable; nothing is placed on it.
    Unhealthy,
}
