//! A TCP proxy that makes Services reachable from the host.
//!
//! For every Service with a selector and a cluster IP (ClusterIP, NodePort, LoadBalancer; not
//! headless, whose clients resolve pod IPs themselves, and not ExternalName), each port gets a
//! listener: on `<clusterIP>:<port>` when that address can be bound on this machine (the API
//! server's default range, 10.96.0.0/16, cannot: nothing routes it to loopback), otherwise on
//! `127.0.0.1:<free port>` (the same port again after a kubelet restart when it is still free).
//! NodePort Services also listen on `127.0.0.1:<nodePort>`.
//!
//! A connection goes to the ready endpoints of the Service, round-robin, skipping endpoints that
//! refuse; with no ready endpoint the connection is closed at once. Endpoints come from the
//! Service's EndpointSlices (`discovery.k8s.io/v1`, or `v1beta1` on Kubernetes 1.20), which the
//! controller-manager's EndpointSlice controller fills from ready pods. Endpoints objects cannot
//! be used: their validation refuses loopback addresses, so in the local cluster they stay empty
//! (and the endpoints controller logs `FailedToUpdateEndpoint` warnings).
//!
//! Where each Service listens is published two ways:
//! * `<state-dir>/services.json`: `{"<namespace>/<name>": {"<port name or number>": "127.0.0.1:PORT"}}`;
//! * annotations on the Service (merge patch, field manager `llmo-kubelet`):
//!   `llmo.dev/local-address: 127.0.0.1:PORT` for its first port, and
//!   `llmo.dev/local-address.<port name or number>: 127.0.0.1:PORT` for every port.
//!
//! There is no DNS: names such as `<svc>.<namespace>.svc` or `<pod>.<group>.<ns>.svc` do not
//! resolve on the host, so only clients that are given addresses can use Services.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, RwLock,
    },
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::{
    api::{ApiResource, DynamicObject, Patch, PatchParams},
    runtime::{watcher, WatchStreamExt},
    Api, Client, ResourceExt,
};
use serde_json::{json, Value};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinHandle,
};

use super::{Shared, FIELD_MANAGER};

/// Annotation with the local address of a Service's first port.
pub const LOCAL_ADDRESS_ANNOTATION: &str = "llmo.dev/local-address";
/// File with every Service's local addresses.
pub const SERVICES_FILE: &str = "services.json";

type Targets = Arc<RwLock<Vec<SocketAddr>>>;

#[derive(Debug)]
struct PortProxy {
    /// Port name, or its number when unnamed.
    key: String,
    /// Name as Endpoints ports carry it ("" when unnamed).
    name: String,
    address: SocketAddr,
    targets: Targets,
    _tasks: Vec<AbortOnDrop>,
}

#[derive(Debug)]
struct ServiceProxy {
    fingerprint: Value,
    ports: Vec<PortProxy>,
}

#[derive(Debug)]
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn key_of(svc: &Service) -> String {
    format!("{}/{}", svc.namespace().unwrap_or_default(), svc.name_any())
}

/// What the listeners depend on: when it changes they are made anew.
fn fingerprint(svc: &Service) -> Option<Value> {
    let spec = svc.spec.as_ref()?;
    let type_ = spec.type_.as_deref().unwrap_or("ClusterIP");
    let cluster_ip = spec.cluster_ip.as_deref().unwrap_or("");
    let eligible = matches!(type_, "ClusterIP" | "NodePort" | "LoadBalancer")
        && !cluster_ip.is_empty()
        && cluster_ip != "None"
        && spec.selector.as_ref().is_some_and(|s| !s.is_empty())
        && spec.ports.as_ref().is_some_and(|p| !p.is_empty());
    eligible.then(|| json!({"clusterIP": cluster_ip, "ports": spec.ports}))
}

/// Label of an EndpointSlice that names its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The ready `ip:port` endpoints of a Service port (by name, "" when unnamed) in its slices.
pub fn ready_targets<'a>(
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    port_name: &str,
) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for slice in slices {
        let Some(port) = slice
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref().unwrap_or("") == port_name)
        else {
            continue;
        };
        let Some(port_number) = port.port.and_then(|p| u16::try_from(p).ok()) else {
            continue;
        };
        for endpoint in &slice.endpoints {
            // An unknown readiness counts as ready, as the API documents.
            let ready = endpoint
                .conditions
                .as_ref()
                .and_then(|c| c.ready)
                .unwrap_or(true);
            if !ready {
                continue;
            }
            for address in &endpoint.addresses {
                if let Ok(ip) = address.parse::<IpAddr>() {
                    out.push(SocketAddr::new(ip, port_number));
                }
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// The EndpointSlice API this server serves: `discovery.k8s.io/v1`, else `v1beta1` (1.20).
async fn slice_api(client: &Client) -> ApiResource {
    let version = match client.list_api_group_resources("discovery.k8s.io/v1").await {
        Ok(list) if list.resources.iter().any(|r| r.name == "endpointslices") => "v1",
        _ => "v1beta1",
    };
    ApiResource {
        group: "discovery.k8s.io".to_owned(),
        version: version.to_owned(),
        api_version: format!("discovery.k8s.io/{version}"),
        kind: "EndpointSlice".to_owned(),
        plural: "endpointslices".to_owned(),
    }
}

/// A slice of either version, read as `v1` (the fields used here are the same).
fn as_v1(object: DynamicObject) -> Option<EndpointSlice> {
    let mut value = serde_json::to_value(object).ok()?;
    value["apiVersion"] = json!("discovery.k8s.io/v1");
    value["kind"] = json!("EndpointSlice");
    match serde_json::from_value(value) {
        Ok(slice) => Some(slice),
        Err(error) => {
            tracing::warn!(%error, "an EndpointSlice could not be read");
            None
        }
    }
}

/// Applies a watch event to a local copy of the objects, and returns the objects it touched
/// (new and replaced or removed versions).
fn apply_event<K: Clone>(
    map: &mut HashMap<String, K>,
    relist: &mut Option<HashSet<String>>,
    event: watcher::Event<K>,
    key: impl Fn(&K) -> String,
) -> Vec<K> {
    match event {
        watcher::Event::Apply(obj) | watcher::Event::InitApply(obj) => {
            let k = key(&obj);
            if let Some(seen) = relist.as_mut() {
                seen.insert(k.clone());
            }
            let mut touched = vec![obj.clone()];
            touched.extend(map.insert(k, obj));
            touched
        }
        watcher::Event::Delete(obj) => map.remove(&key(&obj)).into_iter().chain([obj]).collect(),
        watcher::Event::Init => {
            *relist = Some(HashSet::new());
            Vec::new()
        }
        watcher::Event::InitDone => {
            let seen = relist.take().unwrap_or_default();
            let gone: Vec<String> = map.keys().filter(|k| !seen.contains(*k)).cloned().collect();
            gone.iter().filter_map(|k| map.remove(k)).collect()
        }
    }
}

fn slice_key(s: &EndpointSlice) -> String {
    format!(
        "{}/{}",
        s.metadata.namespace.as_deref().unwrap_or_default(),
        s.metadata.name.as_deref().unwrap_or_default()
    )
}

/// `namespace/service` of a slice.
fn service_of(slice: &EndpointSlice) -> Option<String> {
    let service = slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
    Some(format!(
        "{}/{service}",
        slice.metadata.namespace.as_deref().unwrap_or_default()
    ))
}

/// The port an earlier kubelet used for this Service port, from the Service's annotations.
fn previous_port(svc: &Service, key: &str) -> Option<u16> {
    svc.annotations()
        .get(&format!("{LOCAL_ADDRESS_ANNOTATION}.{key}"))
        .and_then(|a| a.parse::<SocketAddr>().ok())
        .filter(|a| a.ip() == IpAddr::V4(Ipv4Addr::LOCALHOST))
        .map(|a| a.port())
}

async fn bind(
    svc: &Service,
    key: &str,
    cluster_ip: &str,
    port: u16,
) -> std::io::Result<TcpListener> {
    if let Ok(ip) = cluster_ip.parse::<IpAddr>() {
        if let Ok(listener) = TcpListener::bind((ip, port)).await {
            return Ok(listener);
        }
    }
    if let Some(previous) = previous_port(svc, key) {
        if let Ok(listener) = TcpListener::bind((Ipv4Addr::LOCALHOST, previous)).await {
            return Ok(listener);
        }
    }
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await
}

async fn serve(listener: TcpListener, targets: Targets, service: String) {
    let next = Arc::new(AtomicUsize::new(0));
    loop {
        let (mut inbound, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(error) => {
                tracing::warn!(%service, %error, "accepting failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let list = targets.read().expect("targets lock").clone();
        if list.is_empty() {
            tracing::debug!(%service, %peer, "no ready endpoint; closing the connection");
            continue;
        }
        let first = next.fetch_add(1, Ordering::Relaxed);
        let service = service.clone();
        tokio::spawn(async move {
            for i in 0..list.len() {
                let target = list[(first + i) % list.len()];
                match tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(target)).await
                {
                    Ok(Ok(mut outbound)) => {
                        tracing::trace!(%service, %peer, %target, "proxying");
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        return;
                    }
                    _ => tracing::debug!(%service, %target, "endpoint refused; trying the next"),
                }
            }
        });
    }
}

struct Proxy {
    client: Client,
    state_file: std::path::PathBuf,
    /// Services by `namespace/name`.
    services: HashMap<String, Service>,
    /// EndpointSlices by `namespace/name`.
    slices: HashMap<String, EndpointSlice>,
    proxies: HashMap<String, ServiceProxy>,
    published: BTreeMap<String, BTreeMap<String, String>>,
    annotated: HashSet<String>,
}

impl Proxy {
    fn slices_of<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a EndpointSlice> + 'a {
        self.slices
            .values()
            .filter(move |s| service_of(s).as_deref() == Some(key))
    }

    async fn reconcile(&mut self, key: &str) {
        let svc = self.services.get(key).cloned();
        let wanted = svc.as_ref().and_then(fingerprint);
        let (Some(svc), Some(wanted)) = (svc, wanted) else {
            if self.proxies.remove(key).is_some() {
                tracing::info!(service = %key, "stopped proxying");
            }
            return;
        };
        if self
            .proxies
            .get(key)
            .is_none_or(|p| p.fingerprint != wanted)
        {
            self.proxies.remove(key);
            let spec = svc.spec.clone().unwrap_or_default();
            let cluster_ip = spec.cluster_ip.clone().unwrap_or_default();
            let mut ports = Vec::new();
            for port in spec.ports.iter().flatten() {
                let name = port.name.clone().unwrap_or_default();
                let pkey = if name.is_empty() {
                    port.port.to_string()
                } else {
                    name.clone()
                };
                let Ok(number) = u16::try_from(port.port) else {
                    continue;
                };
                if port.protocol.as_deref().is_some_and(|p| p != "TCP") {
                    tracing::warn!(service = %key, port = %pkey, "only TCP ports are proxied");
                    continue;
                }
                let targets: Targets = Arc::default();
                let mut tasks = Vec::new();
                let listener = match bind(&svc, &pkey, &cluster_ip, number).await {
                    Ok(l) => l,
                    Err(error) => {
                        tracing::warn!(service = %key, port = %pkey, %error, "cannot listen");
                        continue;
                    }
                };
                let Ok(address) = listener.local_addr() else {
                    continue;
                };
                tasks.push(AbortOnDrop(tokio::spawn(serve(
                    listener,
                    targets.clone(),
                    format!("{key}:{pkey}"),
                ))));
                if let Some(node_port) = port.node_port.and_then(|p| u16::try_from(p).ok()) {
                    match TcpListener::bind((Ipv4Addr::LOCALHOST, node_port)).await {
                        Ok(l) => tasks.push(AbortOnDrop(tokio::spawn(serve(
                            l,
                            targets.clone(),
                            format!("{key}:{pkey} (nodePort)"),
                        )))),
                        Err(error) => {
                            tracing::warn!(service = %key, node_port, %error, "cannot listen on the node port")
                        }
                    }
                }
                tracing::info!(service = %key, port = %pkey, %address, "proxying");
                ports.push(PortProxy {
                    key: pkey,
                    name,
                    address,
                    targets,
                    _tasks: tasks,
                });
            }
            self.proxies.insert(
                key.to_owned(),
                ServiceProxy {
                    fingerprint: wanted,
                    ports,
                },
            );
        }
        let proxy = &self.proxies[key];
        for port in &proxy.ports {
            let targets = ready_targets(self.slices_of(key), &port.name);
            let mut current = port.targets.write().expect("targets lock");
            if *current != targets {
                tracing::info!(service = %key, port = %port.key, endpoints = ?targets, "endpoints changed");
                *current = targets;
            }
        }
        self.annotate(&svc).await;
    }

    fn desired_annotations(&self, key: &str) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        if let Some(proxy) = self.proxies.get(key) {
            if let Some(first) = proxy.ports.first() {
                out.insert(
                    LOCAL_ADDRESS_ANNOTATION.to_owned(),
                    first.address.to_string(),
                );
            }
            for port in &proxy.ports {
                out.insert(
                    format!("{LOCAL_ADDRESS_ANNOTATION}.{}", port.key),
                    port.address.to_string(),
                );
            }
        }
        out
    }

    async fn annotate(&mut self, svc: &Service) {
        let key = key_of(svc);
        let desired = self.desired_annotations(&key);
        let current: BTreeMap<String, String> = svc
            .annotations()
            .iter()
            .filter(|(k, _)| k.starts_with(LOCAL_ADDRESS_ANNOTATION))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if current == desired {
            return;
        }
        let mut patch = serde_json::Map::new();
        for k in current.keys().filter(|k| !desired.contains_key(*k)) {
            patch.insert(k.clone(), Value::Null);
        }
        for (k, v) in &desired {
            patch.insert(k.clone(), Value::from(v.clone()));
        }
        let api: Api<Service> =
            Api::namespaced(self.client.clone(), &svc.namespace().unwrap_or_default());
        let body = json!({"metadata": {"annotations": patch}});
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.to_owned()),
            ..Default::default()
        };
        match api
            .patch(&svc.name_any(), &params, &Patch::Merge(&body))
            .await
        {
            Ok(_) => {
                self.annotated.insert(key);
            }
            Err(error) => tracing::warn!(service = %key, %error, "annotating the Service failed"),
        }
    }

    fn publish_file(&mut self) {
        let map: BTreeMap<String, BTreeMap<String, String>> = self
            .proxies
            .iter()
            .map(|(k, p)| {
                (
                    k.clone(),
                    p.ports
                        .iter()
                        .map(|port| (port.key.clone(), port.address.to_string()))
                        .collect(),
                )
            })
            .collect();
        if map == self.published && self.state_file.exists() {
            return;
        }
        if let Err(error) = write_atomically(
            &self.state_file,
            &serde_json::to_vec_pretty(&map).unwrap_or_default(),
        ) {
            tracing::warn!(file = %self.state_file.display(), %error, "writing services.json failed");
            return;
        }
        self.published = map;
    }

    /// Removes what was published: the file, and the annotations.
    async fn unpublish(&mut self) {
        let _ = std::fs::remove_file(&self.state_file);
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.to_owned()),
            ..Default::default()
        };
        for key in std::mem::take(&mut self.annotated) {
            let (namespace, name) = key.split_once('/').unwrap_or(("", &key));
            let Some(svc) = self.services.get(&key) else {
                continue;
            };
            let nulls: serde_json::Map<String, Value> = svc
                .annotations()
                .keys()
                .filter(|k| k.starts_with(LOCAL_ADDRESS_ANNOTATION))
                .map(|k| (k.clone(), Value::Null))
                .collect();
            let api: Api<Service> = Api::namespaced(self.client.clone(), namespace);
            let body = json!({"metadata": {"annotations": nulls}});
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                api.patch(name, &params, &Patch::Merge(&body)),
            )
            .await;
        }
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// Runs the proxy until `shutdown` turns true.
pub async fn run(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let client = shared.client.clone();
    let mut svc_events = watcher(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .boxed();
    let slice_resource = slice_api(&client).await;
    tracing::debug!(api = %slice_resource.api_version, "watching EndpointSlices");
    let mut slice_events = watcher(
        Api::<DynamicObject>::all_with(client.clone(), &slice_resource),
        watcher::Config::default(),
    )
    .default_backoff()
    .boxed();
    let (mut svc_relist, mut slice_relist) = (None, None);
    let mut proxy = Proxy {
        client,
        state_file: shared.config.state_dir.join(SERVICES_FILE),
        services: HashMap::new(),
        slices: HashMap::new(),
        proxies: HashMap::new(),
        published: BTreeMap::new(),
        annotated: HashSet::new(),
    };
    // A full pass now and then catches objects deleted while a watch was re-listing.
    let mut resync = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            changed = shutdown.changed() => {
                if changed.is_err() || *shutdown.borrow() {
                    break;
                }
            }
            Some(event) = svc_events.next() => match event {
                Ok(event) => {
                    let touched: HashSet<String> = apply_event(&mut proxy.services, &mut svc_relist, event, key_of)
                        .iter()
                        .map(key_of)
                        .collect();
                    for key in touched {
                        proxy.reconcile(&key).await;
                    }
                    proxy.publish_file();
                }
                Err(error) => tracing::warn!(%error, "service watch failed; retrying"),
            },
            Some(event) = slice_events.next() => match event {
                Ok(event) => {
                    let event = match event {
                        watcher::Event::Apply(o) => as_v1(o).map(watcher::Event::Apply),
                        watcher::Event::InitApply(o) => as_v1(o).map(watcher::Event::InitApply),
                        watcher::Event::Delete(o) => as_v1(o).map(watcher::Event::Delete),
                        watcher::Event::Init => Some(watcher::Event::Init),
                        watcher::Event::InitDone => Some(watcher::Event::InitDone),
                    };
                    let Some(event) = event else { continue };
                    let touched: HashSet<String> = apply_event(&mut proxy.slices, &mut slice_relist, event, slice_key)
                        .iter()
                        .filter_map(service_of)
                        .collect();
                    for key in touched {
                        proxy.reconcile(&key).await;
                    }
                    proxy.publish_file();
                }
                Err(error) => tracing::warn!(%error, "EndpointSlice watch failed; retrying"),
            },
            _ = resync.tick() => {
                let mut keys: HashSet<String> = proxy.proxies.keys().cloned().collect();
                keys.extend(proxy.services.keys().cloned());
                for key in keys {
                    proxy.reconcile(&key).await;
                }
                proxy.publish_file();
            }
        }
    }
    proxy.proxies.clear();
    proxy.unpublish().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_ready_addresses_of_the_named_port_are_targets() {
        // As a v1.20 server sends it (v1beta1, with `topology`).
        let slice: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "discovery.k8s.io/v1beta1", "kind": "EndpointSlice",
            "metadata": {"name": "s-x", "namespace": "d", "labels": {"kubernetes.io/service-name": "s"}},
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": ["127.0.0.11"], "conditions": {"ready": true}, "topology": {"kubernetes.io/hostname": "a"}},
                {"addresses": ["127.0.0.10"]},
                {"addresses": ["127.0.0.12"], "conditions": {"ready": false}},
            ],
            "ports": [{"name": "http", "port": 8080}, {"name": "metrics", "port": 9090}],
        }))
        .unwrap();
        let slice = as_v1(slice).unwrap();
        assert_eq!(service_of(&slice).as_deref(), Some("d/s"));
        let t = ready_targets([&slice], "http");
        assert_eq!(
            t,
            vec![
                "127.0.0.10:8080".parse().unwrap(),
                "127.0.0.11:8080".parse().unwrap()
            ]
        );
        assert!(ready_targets([&slice], "").is_empty());
        assert!(ready_targets([], "http").is_empty());
    }

    #[test]
    fn headless_and_selectorless_services_are_not_proxied() {
        let svc = |spec: Value| -> Service {
            serde_json::from_value(json!({"metadata": {"name": "s"}, "spec": spec})).unwrap()
        };
        let ports = json!([{"port": 80}]);
        assert!(fingerprint(&svc(
            json!({"clusterIP": "10.96.0.5", "selector": {"a": "b"}, "ports": ports})
        ))
        .is_some());
        assert!(fingerprint(&svc(
            json!({"clusterIP": "None", "selector": {"a": "b"}, "ports": ports})
        ))
        .is_none());
        assert!(fingerprint(&svc(json!({"clusterIP": "10.96.0.5", "ports": ports}))).is_none());
        assert!(fingerprint(&svc(json!({"type": "ExternalName", "externalName": "x"}))).is_none());
    }
}
