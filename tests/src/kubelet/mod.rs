//! `llmo-kubelet`: a kubelet that runs pods as local processes, for a local cluster without
//! containers (no Docker on the development machines): the real control plane of
//! [`crate::cluster`] plus this kubelet runs the operator, node agents and `llmo-serve` pods
//! for real.
//!
//! # What it does
//! * **Nodes** ([`node`]): registers one Node per entry of the nodes file, with capacity
//!   (`nvidia.com/gpu` for GPU nodes), GPU feature-discovery labels, a Ready condition and a
//!   heartbeat every 10 s. Each node gets its own loopback address.
//! * **Pods** ([`pods`], [`worker`], [`container`]): every container of a pod bound to one of its
//!   nodes (by the real kube-scheduler) runs as a local process; status (phase, IPs, conditions,
//!   container states) is written through `pods/status`; probes ([`probes`]), restart policies
//!   with a back-off capped at 30 s, graceful deletion, and a restart of its pods when the
//!   kubelet itself restarts.
//! * **Services** ([`proxy`]): a TCP proxy per Service port, on the host, to the ready
//!   endpoints of the Service's EndpointSlices.
//!
//! # Rules for pod authors
//! * **Images map to binaries**: `--image PREFIX=PATH` (see [`config::ImageMap`]). A pod with an
//!   image no prefix matches does not run: its container waits with reason `ErrImageNotMapped`
//!   and a message that lists the mapped prefixes (and a Warning Event says the same). The pod
//!   stays `Pending`, as with an image that cannot be pulled, rather than `Failed`: a Failed pod
//!   makes its ReplicaSet or DaemonSet create replacements in a hot loop. A `command`, when
//!   given, replaces the entrypoint as in Kubernetes, but its first word must name the mapped
//!   binary (its file name, or any path ending in it, such as `/usr/local/bin/llmo-serve`),
//!   else the container waits with reason `ErrCommandNotMapped`; `args` follow. Pods with
//!   `exec` (or HTTPS) probes wait with reason `ProbeNotSupported`.
//! * **Addresses**: each pod has its own address `127.0.0.x` (from 127.0.0.10 up, never shared
//!   while in use, also across kubelets of the machine); hostNetwork pods use their node's
//!   address. A process has no network namespace, so an argument or env value that is exactly
//!   `0.0.0.0` or starts with `0.0.0.0:` is rewritten to the pod IP (see [`env`]). `POD_IP` is
//!   always set.
//! * **Volumes**: each pod has a directory under `--state-dir` ([`volumes`]); the process's
//!   working directory is that directory and `HOME` is its `home/`. An argument or env value
//!   equal to a volumeMount's `mountPath` or under it is rewritten to the volume's directory.
//! * **Credentials**: a pod that mounts a ServiceAccount token gets `KUBECONFIG` pointing to a
//!   kubeconfig with exactly that ServiceAccount's token ([`credentials`]); nothing of the
//!   kubelet's own environment (its admin kubeconfig included) reaches a process, except names
//!   passed with `--pass-env`. `KUBERNETES_SERVICE_HOST`/`PORT` name the real API server.
//! * **Services**: reachable on the host through the proxy, at the address published in the
//!   Service's `llmo.dev/local-address` annotation and in `<state-dir>/services.json`.
//!
//! # What it does not do
//! * No DNS: Service and pod DNS names (`<pod>.<group>.<ns>.svc:29500`) do not resolve; a
//!   pipeline spread over several pods cannot find its peers (out of scope for now).
//! * No kubelet API: `kubectl logs`, `exec`, `port-forward` and `attach` do not work. Each
//!   container's stdout and stderr are appended to
//!   `<state-dir>/logs/<namespace>_<pod>_<container>.log`, every run after a separator line.
//! * Endpoints objects stay empty: the API server refuses loopback addresses in them (the
//!   controller-manager logs `FailedToUpdateEndpoint`); EndpointSlices carry the pods.
//! * When the kubelet stops, its pods' objects are left as they were (Running, Ready) and the
//!   Nodes are marked not ready; the next kubelet restarts those pods.
//! * No isolation or limits: processes run as the kubelet's user, security contexts and
//!   resource limits are not enforced; lifecycle hooks, exec probes, ephemeral containers and
//!   `enableServiceLinks` variables are not supported. ConfigMap and Secret volumes are written
//!   when the pod starts and not updated.
//! * A process's own children are signalled with its process group, but if the kubelet is
//!   killed outright only the direct child gets the parent-death signal.

pub mod addresses;
pub mod config;
pub mod container;
pub mod credentials;
pub mod env;
mod error;
pub mod events;
pub mod node;
pub mod pods;
pub mod probes;
pub mod process;
pub mod proxy;
pub mod status;
pub mod volumes;
pub mod worker;

use std::{collections::BTreeMap, future::Future, sync::Arc};

use k8s_openapi::jiff::Timestamp;
use kube::{runtime::events::Recorder, Client};

pub use config::{KubeletConfig, NodeSpec, NodesFile};
pub use error::KubeletError;

use self::{addresses::AddressPool, node::NodeHandle};

/// Field manager of everything the kubelet writes.
pub const FIELD_MANAGER: &str = "llmo-kubelet";

/// What every task of the kubelet shares.
pub struct Shared {
    /// API client.
    pub client: Client,
    /// Configuration.
    pub config: KubeletConfig,
    /// Loopback addresses.
    pub addresses: AddressPool,
    /// The nodes, by name.
    pub nodes: BTreeMap<String, NodeHandle>,
    /// Publishes Events.
    pub recorder: Recorder,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("config", &self.config)
            .field("nodes", &self.nodes)
            .finish_non_exhaustive()
    }
}

/// Runs the kubelet until `shutdown` completes, then stops every process (SIGTERM, then SIGKILL
/// after the pod's grace period, at most `config.shutdown_grace`) and releases the nodes.
pub async fn run(
    client: Client,
    config: KubeletConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), KubeletError> {
    for dir in ["pods", "logs"] {
        let path = config.state_dir.join(dir);
        std::fs::create_dir_all(&path)
            .map_err(|e| KubeletError::io("creating the state directory", &path, e))?;
    }
    let addresses = AddressPool::new(config.address_lock_dir.clone(), config.first_address)?;
    let mut nodes = BTreeMap::new();
    for spec in &config.nodes {
        let ip = addresses.allocate(None)?;
        nodes.insert(
            spec.name.clone(),
            NodeHandle {
                spec: spec.clone(),
                ip,
            },
        );
    }
    let since = Timestamp::now();
    for node in nodes.values() {
        node::register(&client, node, since).await?;
    }
    let recorder = Recorder::new(
        client.clone(),
        kube::runtime::events::Reporter {
            controller: FIELD_MANAGER.to_owned(),
            instance: config.nodes.first().map(|n| n.name.clone()),
        },
    );
    let shared = Arc::new(Shared {
        client: client.clone(),
        addresses,
        nodes,
        recorder,
        config,
    });
    let node_list: Arc<Vec<NodeHandle>> = Arc::new(shared.nodes.values().cloned().collect());
    let heartbeats = tokio::spawn(node::heartbeats(
        client.clone(),
        node_list.clone(),
        shared.config.heartbeat,
        since,
    ));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let pods = tokio::spawn(pods::run(shared.clone(), stop_rx.clone()));
    let proxy = shared
        .config
        .service_proxy
        .then(|| tokio::spawn(proxy::run(shared.clone(), stop_rx)));
    tracing::info!(
        nodes = shared.nodes.len(),
        state_dir = %shared.config.state_dir.display(),
        "llmo-kubelet running"
    );
    shutdown.await;
    tracing::info!("stopping");
    stop_tx.send_replace(true);
    let _ = pods.await;
    if let Some(proxy) = proxy {
        let _ = proxy.await;
    }
    heartbeats.abort();
    let release = node::on_exit(&client, &node_list, shared.config.delete_nodes_on_exit);
    if tokio::time::timeout(std::time::Duration::from_secs(10), release)
        .await
        .is_err()
    {
        tracing::warn!("the API server did not answer; Nodes left as they were");
    }
    tracing::info!("stopped");
    Ok(())
}
