//! Node objects: one per simulated node, with capacity, GPU feature-discovery labels, a Ready
//! condition and heartbeats.
//!
//! Labels: `kubernetes.io/hostname`, `kubernetes.io/os=linux`, `kubernetes.io/arch`,
//! `topology.kubernetes.io/zone` (when given) and, with GPUs, `nvidia.com/gpu.present=true`,
//! `nvidia.com/gpu.product`, `nvidia.com/gpu.count` and `nvidia.com/gpu.memory` (MiB), as NVIDIA
//! GPU feature discovery writes them; annotation `llmo.dev/nvlink: "true"|"false"`. Labels are
//! written with server-side apply (field manager `llmo-kubelet`), so labels of other managers
//! (the node agent's `llmo.dev/gpu-class`) stay.

use std::{collections::BTreeMap, net::Ipv4Addr, sync::Arc, time::Duration};

use k8s_openapi::{api::core::v1::Node, jiff::Timestamp};
use kube::{
    api::{DeleteParams, Patch, PatchParams},
    Api, Client,
};
use serde_json::{json, Value};

use super::{config::NodeSpec, KubeletError, FIELD_MANAGER};

/// GPU feature-discovery label: GPUs present.
pub const GPU_PRESENT_LABEL: &str = "nvidia.com/gpu.present";
/// GPU feature-discovery label: product name.
pub const GPU_PRODUCT_LABEL: &str = "nvidia.com/gpu.product";
/// GPU feature-discovery label: number of GPUs.
pub const GPU_COUNT_LABEL: &str = "nvidia.com/gpu.count";
/// GPU feature-discovery label: memory of one GPU in MiB.
pub const GPU_MEMORY_LABEL: &str = "nvidia.com/gpu.memory";
/// Zone label.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// Annotation: whether the node's GPUs are linked by NVLink.
pub const NVLINK_ANNOTATION: &str = "llmo.dev/nvlink";
/// The GPU resource name.
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";
/// Taints the node lifecycle controller would remove from a Ready node.
const LIFTED_TAINTS: [&str; 2] = [
    "node.kubernetes.io/not-ready",
    "node.kubernetes.io/unreachable",
];
/// The kubelet version the Nodes report.
pub const KUBELET_VERSION: &str = "v1.20.2-llmo";

/// A simulated node and its loopback address.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeHandle {
    /// As configured.
    pub spec: NodeSpec,
    /// Its address (`InternalIP`, pods' `hostIP`, hostNetwork pods' IP).
    pub ip: Ipv4Addr,
}

fn arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// The node's labels.
pub fn labels(spec: &NodeSpec) -> BTreeMap<String, String> {
    let mut labels = spec.labels.clone();
    let mut set = |k: &str, v: String| {
        labels.insert(k.to_owned(), v);
    };
    set("kubernetes.io/hostname", spec.name.clone());
    set("kubernetes.io/os", "linux".to_owned());
    set("kubernetes.io/arch", arch().to_owned());
    if let Some(zone) = &spec.zone {
        set(ZONE_LABEL, zone.clone());
    }
    if spec.gpus > 0 {
        set(GPU_PRESENT_LABEL, "true".to_owned());
        set(GPU_COUNT_LABEL, spec.gpus.to_string());
        if let Some(product) = &spec.product {
            set(GPU_PRODUCT_LABEL, product.clone());
        }
        if let Some(mib) = spec.memory_mib {
            set(GPU_MEMORY_LABEL, mib.to_string());
        }
        // What `llmo-operator agent --simulate-from-node` reads for the NVLink topology.
        set(
            "llmo.dev/simulated-nvlink",
            if spec.nvlink { "all" } else { "none" }.to_owned(),
        );
    }
    labels
}

/// Capacity (and allocatable, the same).
pub fn capacity(spec: &NodeSpec) -> BTreeMap<String, String> {
    let mut capacity = BTreeMap::from([
        ("cpu".to_owned(), spec.cpu.clone()),
        ("memory".to_owned(), spec.memory.clone()),
        ("pods".to_owned(), spec.pods.to_string()),
    ]);
    if spec.gpus > 0 {
        capacity.insert(GPU_RESOURCE.to_owned(), spec.gpus.to_string());
    }
    capacity
}

/// The body of the status patch.
pub fn status(node: &NodeHandle, ready: bool, since: Timestamp, now: Timestamp) -> Value {
    let time = |t: Timestamp| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
    let pressure = |type_: &str, reason: &str, message: &str| {
        json!({
            "type": type_, "status": "False", "reason": reason, "message": message,
            "lastHeartbeatTime": time(now), "lastTransitionTime": time(since),
        })
    };
    let (ready_status, reason, message) = if ready {
        (
            "True",
            "KubeletReady",
            "llmo-kubelet is posting ready status",
        )
    } else {
        (
            "False",
            "KubeletStopped",
            "llmo-kubelet stopped; its pods' processes are gone",
        )
    };
    let capacity = capacity(&node.spec);
    json!({
        "status": {
            "capacity": capacity,
            "allocatable": capacity,
            "conditions": [
                pressure("MemoryPressure", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
                pressure("DiskPressure", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
                pressure("PIDPressure", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
                {
                    "type": "Ready", "status": ready_status, "reason": reason, "message": message,
                    "lastHeartbeatTime": time(now), "lastTransitionTime": time(since),
                },
            ],
            "addresses": [
                {"type": "InternalIP", "address": node.ip.to_string()},
                {"type": "Hostname", "address": node.spec.name},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
            "nodeInfo": {
                "machineID": "", "systemUUID": "", "bootID": "",
                "kernelVersion": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
                "osImage": "llmo-kubelet (local processes)",
                "containerRuntimeVersion": "process://llmo-kubelet",
                "kubeletVersion": KUBELET_VERSION,
                "kubeProxyVersion": KUBELET_VERSION,
                "operatingSystem": "linux",
                "architecture": arch(),
            },
        }
    })
}

fn params() -> PatchParams {
    PatchParams {
        field_manager: Some(FIELD_MANAGER.to_owned()),
        ..Default::default()
    }
}

/// Creates or updates the Node: labels, annotations, then status.
pub async fn register(
    client: &Client,
    node: &NodeHandle,
    since: Timestamp,
) -> Result<(), KubeletError> {
    let api: Api<Node> = Api::all(client.clone());
    let name = &node.spec.name;
    let mut annotations = BTreeMap::new();
    if node.spec.gpus > 0 {
        annotations.insert(NVLINK_ANNOTATION.to_owned(), node.spec.nvlink.to_string());
    }
    let body = json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": labels(&node.spec), "annotations": annotations},
    });
    api.patch(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await
    .map_err(|e| KubeletError::kube(format!("registering Node {name}"), e))?;
    let status = status(node, true, since, Timestamp::now());
    let current = api
        .patch_status(name, &params(), &Patch::Merge(&status))
        .await
        .map_err(|e| KubeletError::kube(format!("writing the status of Node {name}"), e))?;
    // The TaintNodesByCondition admission plugin taints new Nodes not-ready; the node lifecycle
    // controller that would lift the taint does not run in the local cluster, so the kubelet
    // lifts it once the node is Ready.
    let taints = current
        .spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default();
    let kept: Vec<_> = taints
        .iter()
        .filter(|t| !LIFTED_TAINTS.contains(&t.key.as_str()))
        .cloned()
        .collect();
    if kept.len() != taints.len() {
        api.patch(
            name,
            &params(),
            &Patch::Merge(&json!({"spec": {"taints": kept}})),
        )
        .await
        .map_err(|e| {
            KubeletError::kube(format!("lifting the not-ready taint of Node {name}"), e)
        })?;
    }
    tracing::info!(node = %name, ip = %node.ip, gpus = node.spec.gpus, "registered node");
    Ok(())
}

/// Posts a heartbeat for every node each `interval`, and registers again a Node someone deleted.
pub async fn heartbeats(
    client: Client,
    nodes: Arc<Vec<NodeHandle>>,
    interval: Duration,
    since: Timestamp,
) {
    let api: Api<Node> = Api::all(client.clone());
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        for node in nodes.iter() {
            let body = status(node, true, since, Timestamp::now());
            match api
                .patch_status(&node.spec.name, &params(), &Patch::Merge(&body))
                .await
            {
                Ok(_) => tracing::trace!(node = %node.spec.name, "heartbeat"),
                Err(kube::Error::Api(s)) if s.is_not_found() => {
                    tracing::warn!(node = %node.spec.name, "Node was deleted; registering it again");
                    if let Err(error) = register(&client, node, since).await {
                        tracing::warn!(node = %node.spec.name, %error, "registering again failed");
                    }
                }
                Err(error) => tracing::warn!(node = %node.spec.name, %error, "heartbeat failed"),
            }
        }
    }
}

/// On exit: deletes the Nodes, or marks them not ready.
pub async fn on_exit(client: &Client, nodes: &[NodeHandle], delete: bool) {
    let api: Api<Node> = Api::all(client.clone());
    let now = Timestamp::now();
    for node in nodes {
        let name = &node.spec.name;
        let result = if delete {
            api.delete(name, &DeleteParams::default()).await.map(|_| ())
        } else {
            api.patch_status(
                name,
                &params(),
                &Patch::Merge(&status(node, false, now, now)),
            )
            .await
            .map(|_| ())
        };
        match result {
            Ok(()) => tracing::info!(node = %name, deleted = delete, "node released"),
            Err(error) => tracing::warn!(node = %name, %error, "releasing the node failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kubelet::config::NodesFile;

    #[test]
    fn gpu_nodes_carry_feature_discovery_labels_and_capacity() {
        let file = NodesFile::parse(
            "nodes:\n- {name: gpu-l4-a, gpus: 4, product: NVIDIA-L4, memoryMiB: 23034, zone: zone-a}\n- {name: cpu-a}\n",
        )
        .unwrap();
        let l = labels(&file.nodes[0]);
        assert_eq!(l[GPU_PRODUCT_LABEL], "NVIDIA-L4");
        assert_eq!(l[GPU_COUNT_LABEL], "4");
        assert_eq!(l[GPU_MEMORY_LABEL], "23034");
        assert_eq!(l[GPU_PRESENT_LABEL], "true");
        assert_eq!(l[ZONE_LABEL], "zone-a");
        assert_eq!(l["kubernetes.io/hostname"], "gpu-l4-a");
        assert_eq!(capacity(&file.nodes[0])[GPU_RESOURCE], "4");
        assert!(!labels(&file.nodes[1]).contains_key(GPU_PRESENT_LABEL));
        assert!(!capacity(&file.nodes[1]).contains_key(GPU_RESOURCE));
        let node = NodeHandle {
            spec: file.nodes[0].clone(),
            ip: Ipv4Addr::new(127, 0, 0, 10),
        };
        let s = status(&node, true, Timestamp::now(), Timestamp::now());
        assert_eq!(s["status"]["conditions"][3]["status"], "True");
        assert_eq!(s["status"]["addresses"][0]["address"], "127.0.0.10");
    }
}
