//! The placement's view of a node: its GPUs as the node agent last reported them, plus what the
//! Node object says (zone, allocatable GPUs).

use crate::api::{GPUNode, GpuDevice};

/// Well-known zone label.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// One node as placement sees it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NodeInventory {
    /// Node name.
    pub name: String,
    /// Zone, when labelled.
    pub zone: Option<String>,
    /// GPUClass its GPUs matched.
    pub gpu_class: Option<String>,
    /// Marked unschedulable for llmo (GPUNode spec) or cordoned (Node spec).
    pub unschedulable: bool,
    /// GPUs by index.
    pub gpus: Vec<GpuDevice>,
    /// `nvidia.com/gpu` the kubelet advertises as allocatable.
    pub allocatable_gpus: u32,
}

impl NodeInventory {
    /// Builds the view from a GPUNode; the zone comes from its labels (the agent copies the
    /// Node's `topology.kubernetes.io/zone` when it creates or refreshes the GPUNode at start),
    /// and allocatable defaults to the GPU count.
    pub fn from_gpu_node(node: &GPUNode) -> Self {
        let status = node.status.clone().unwrap_or_default();
        Self {
            name: node.metadata.name.clone().unwrap_or_default(),
            zone: node
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(ZONE_LABEL).cloned()),
            gpu_class: status.gpu_class.clone(),
            unschedulable: node.spec.unschedulable,
            allocatable_gpus: u32::try_from(status.gpus.len()).unwrap_or(u32::MAX),
            gpus: status.gpus,
        }
    }
}
