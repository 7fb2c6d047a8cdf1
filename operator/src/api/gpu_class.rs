//! `GPUClass`: what a kind of accelerator can do and how to recognise it on a node.

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A class of accelerator (H100, L4, ...) or `cpu`: how the node agent recognises it, and the
/// figures the planner sizes layouts with.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "llmo.dev",
    version = "v1alpha1",
    kind = "GPUClass",
    plural = "gpuclasses",
    shortname = "gpuc",
    category = "llmo",
    doc = "A class of accelerator: how nodes with it are recognised, its memory, bandwidth, compute by data type, interconnect and price.",
    printcolumn(name = "Device", type_ = "string", json_path = ".spec.device"),
    printcolumn(name = "Memory", type_ = "string", json_path = ".spec.memory"),
    printcolumn(
        name = "BW-GB/s",
        type_ = "number",
        json_path = ".spec.memoryBandwidthGBps"
    ),
    printcolumn(
        name = "BF16-TFLOPS",
        type_ = "number",
        json_path = ".spec.tflops.bf16"
    ),
    printcolumn(
        name = "Interconnect",
        type_ = "string",
        json_path = ".spec.interconnect.kind"
    ),
    printcolumn(name = "Price/h", type_ = "number", json_path = ".spec.pricePerHour"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(has(self.device) && self.device == 'cpu') || (has(self.matching) && ((has(self.matching.products) && size(self.matching.products) > 0) || (has(self.matching.productLabels) && size(self.matching.productLabels) > 0)))").message("spec.matching: a gpu class needs at least one NVML product pattern or product label pattern, or node agents cannot recognise it"))]
pub struct GPUClassSpec {
    /// `gpu` for NVIDIA GPUs reported by NVML, `cpu` for nodes that serve on their processors.
    #[serde(default)]
    pub device: DeviceKind,
    /// How the node agent recognises GPUs of this class. Required for `gpu` classes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matching: Option<GpuMatching>,
    /// Memory of one device as NVML reports it (`80Gi`), or the memory given to serving on a
    /// `cpu` node.
    #[schemars(schema_with = "super::quantity::quantity_schema")]
    pub memory: Quantity,
    /// Peak memory bandwidth of one device in GB/s; decode speed is bound by it.
    #[schemars(range(min = 0.1))]
    #[serde(rename = "memoryBandwidthGBps")]
    pub memory_bandwidth_gbps: f64,
    /// Dense (not sparse) peak TFLOP/s by data type. A missing entry means the device has no fast
    /// path for that type; the planner will not choose fp8 on a class without `fp8`.
    pub tflops: Tflops,
    /// How devices on one node talk to each other.
    #[serde(default)]
    pub interconnect: Interconnect,
    /// Devices of this class on a typical node; bounds tensor parallelism when no live inventory
    /// is known.
    #[serde(default = "default_devices_per_node")]
    #[schemars(range(min = 1, max = 64))]
    pub devices_per_node: u32,
    /// Indicative price of one device per hour, in US dollars, for cost reporting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub price_per_hour: Option<f64>,
}

fn default_devices_per_node() -> u32 {
    1
}

/// What kind of device a class describes.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// An NVIDIA GPU, read through NVML.
    #[default]
    Gpu,
    /// The node's processors.
    Cpu,
}

/// Rules that map a node's GPUs to this class. A GPU matches when any rule matches.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GpuMatching {
    /// Patterns for the NVML product name, `*` matching any run of characters, compared without
    /// regard to case: `NVIDIA H100*`, `*L4`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub products: Vec<String>,
    /// Patterns for the node label `nvidia.com/gpu.product` set by GPU feature discovery:
    /// `NVIDIA-H100-80GB-HBM3`, `NVIDIA-L4*`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub product_labels: Vec<String>,
}

/// Dense peak TFLOP/s of one device by data type.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Tflops {
    /// 32-bit float.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub fp32: Option<f64>,
    /// 16-bit brain float.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub bf16: Option<f64>,
    /// 16-bit IEEE float.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub fp16: Option<f64>,
    /// 8-bit float; absent when the device has no fp8 tensor cores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub fp8: Option<f64>,
    /// 8-bit integer (TOPS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub int8: Option<f64>,
    /// 4-bit integer (TOPS); absent when not accelerated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub int4: Option<f64>,
}

/// The link between devices of one node.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Interconnect {
    /// `nvlink`, `pcie` or `none`.
    #[serde(default)]
    pub kind: InterconnectKind,
    /// Bandwidth per device in GB/s, one direction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    #[serde(rename = "bandwidthGBps")]
    pub bandwidth_gbps: Option<f64>,
}

/// Kind of device-to-device link.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum InterconnectKind {
    /// NVLink / NVSwitch.
    Nvlink,
    /// PCI Express.
    #[default]
    Pcie,
    /// No direct link (CPU nodes; tensor parallelism goes over the network).
    None,
}
