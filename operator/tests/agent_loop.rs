//! The whole agent loop against a mock API server: startup checks, the two watches, creating
//! the GPUNode, the first status write and the Node label, on a simulated 8×H100 node.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use http::{Method, Request, Response};
use kube::{client::Body, Client};
use llmo_operator::{
    api::HumanDuration,
    inventory::{run_agent, AgentArgs, SimulatedSource, SimulationProfile},
};
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tower_test::mock;

fn repo(path: &str) -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
}

fn classes() -> Value {
    let text = std::fs::read_to_string(repo("examples/gpuclasses.yaml")).unwrap();
    let items: Vec<Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .map(|mut v: Value| {
            v["metadata"]["resourceVersion"] = json!("5");
            v
        })
        .collect();
    json!({"apiVersion": "llmo.dev/v1alpha1", "kind": "GPUClassList",
           "metadata": {"resourceVersion": "5"}, "items": items})
}

fn node() -> Value {
    json!({"apiVersion": "v1", "kind": "Node",
           "metadata": {"name": "node-1", "uid": "3f1c0000-aaaa-bbbb-cccc-000000000001",
                        "resourceVersion": "7",
                        "labels": {"kubernetes.io/hostname": "node-1"}}})
}

fn gpunode() -> Value {
    json!({"apiVersion": "llmo.dev/v1alpha1", "kind": "GPUNode",
           "metadata": {"name": "node-1", "resourceVersion": "9"}, "spec": {}})
}

#[tokio::test]
async fn the_agent_creates_its_gpunode_writes_status_and_labels_the_node() {
    let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let (stop_tx, stop_rx) = oneshot::channel::<()>();

    let log = Arc::new(Mutex::new(Vec::<(Method, String, Value)>::new()));
    let server_log = log.clone();
    let server = tokio::spawn(async move {
        let mut parked = Vec::new();
        let mut stop = Some(stop_tx);
        while let Some((request, send)) = handle.next_request().await {
            let method = request.method().clone();
            let uri = request.uri().to_string();
            let bytes = request.into_body().collect_bytes().await.unwrap();
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let path = uri.split('?').next().unwrap().to_owned();
            let reply = match (method.as_str(), path.as_str()) {
                _ if uri.contains("watch=true") => {
                    // A watch with nothing new: keep it open.
                    parked.push(send);
                    server_log.lock().unwrap().push((method, uri, body));
                    continue;
                }
                ("GET", "/apis/llmo.dev/v1alpha1/gpuclasses") => classes(),
                ("GET", "/api/v1/nodes/node-1") => node(),
                ("GET", "/api/v1/nodes") => json!({"apiVersion": "v1", "kind": "NodeList",
                    "metadata": {"resourceVersion": "7"}, "items": [node()]}),
                ("PATCH", "/apis/llmo.dev/v1alpha1/gpunodes/node-1") => gpunode(),
                ("PATCH", "/apis/llmo.dev/v1alpha1/gpunodes/node-1/status") => gpunode(),
                ("PATCH", "/api/v1/nodes/node-1") => node(),
                other => panic!("unexpected request {other:?}: {uri}"),
            };
            let labelled = path == "/api/v1/nodes/node-1" && method == Method::PATCH;
            server_log.lock().unwrap().push((method, uri, body));
            send.send_response(
                Response::builder()
                    .body(Body::from(serde_json::to_vec(&reply).unwrap()))
                    .unwrap(),
            );
            if labelled {
                if let Some(stop) = stop.take() {
                    let _ = stop.send(());
                }
            }
        }
        drop(parked);
    });

    let profile = SimulationProfile::load(&repo("examples/simulated/8xh100-nvlink.yaml")).unwrap();
    let source = SimulatedSource::new(profile, "8xh100-nvlink.yaml", "node-1");
    let args = AgentArgs {
        node_name: Some("node-1".into()),
        simulate: vec![],
        simulate_from_node: false,
        interval: HumanDuration::new(Duration::from_millis(50)),
        heartbeat: HumanDuration::new(Duration::from_secs(300)),
        memory_threshold_mib: 2048,
        soft_write_interval: HumanDuration::new(Duration::from_secs(240)),
        cpu_class: None,
        measure_writes: None,
        classes: None,
    };
    let shutdown = async {
        let _ = stop_rx.await;
    };
    tokio::time::timeout(
        Duration::from_secs(60),
        run_agent(client, &args, "node-1", Box::new(source), shutdown),
    )
    .await
    .expect("the agent stops once the node is labelled")
    .unwrap();
    server.abort();
    let seen = log.lock().unwrap().clone();

    let first = |method: &str, path: &str| {
        seen.iter()
            .position(|(m, u, _)| m == method && u.split('?').next() == Some(path))
            .unwrap_or_else(|| panic!("no {method} {path} in {seen:#?}"))
    };
    let crd_check = first("GET", "/apis/llmo.dev/v1alpha1/gpuclasses");
    assert!(
        seen[crd_check].1.contains("limit=1"),
        "{}",
        seen[crd_check].1
    );
    let create = first("PATCH", "/apis/llmo.dev/v1alpha1/gpunodes/node-1");
    let status = first("PATCH", "/apis/llmo.dev/v1alpha1/gpunodes/node-1/status");
    let label = first("PATCH", "/api/v1/nodes/node-1");
    assert!(crd_check < create && create < status && status < label);
    // The Node is watched by name, not listed whole.
    assert!(seen.iter().any(|(_, u, _)| u.starts_with("/api/v1/nodes?")
        && u.contains("fieldSelector=metadata.name%3Dnode-1")));

    for i in [create, status, label] {
        assert!(
            seen[i].1.contains("fieldManager=llmo-agent"),
            "{}",
            seen[i].1
        );
    }
    assert_eq!(
        seen[create].2["metadata"]["ownerReferences"][0]["uid"],
        "3f1c0000-aaaa-bbbb-cccc-000000000001"
    );
    let written = &seen[status].2["status"];
    assert_eq!(written["gpuClass"], "h100", "{written:#}");
    assert_eq!(written["gpuCount"], 8);
    assert_eq!(written["gpus"].as_array().unwrap().len(), 8);
    assert_eq!(
        written["gpus"][0]["nvlinkPeers"],
        json!([1, 2, 3, 4, 5, 6, 7])
    );
    assert_eq!(written["driverVersion"], "550.54.15");
    let conditions = written["conditions"].as_array().unwrap();
    assert!(conditions
        .iter()
        .any(|c| c["type"] == "Simulated" && c["status"] == "True"));
    assert!(conditions
        .iter()
        .any(|c| c["type"] == "Ready" && c["status"] == "True"));
    assert_eq!(
        seen[label].2["metadata"]["labels"],
        json!({"llmo.dev/gpu-class": "h100"})
    );
    // Only one status write: nothing material changed in the few samples before the stop.
    let status_writes = seen
        .iter()
        .filter(|(m, u, _)| m == "PATCH" && u.contains("/status"))
        .count();
    assert_eq!(status_writes, 1);
}

#[tokio::test]
async fn without_the_crds_the_agent_stops_with_an_install_hint() {
    let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let server = tokio::spawn(async move {
        let (request, send) = handle.next_request().await.unwrap();
        assert_eq!(
            request.uri().to_string(),
            "/apis/llmo.dev/v1alpha1/gpuclasses?&limit=1"
        );
        let body = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                          "reason": "NotFound", "code": 404, "message": "the server could not find the requested resource"});
        send.send_response(
            Response::builder()
                .status(404)
                .body(Body::from(serde_json::to_vec(&body).unwrap()))
                .unwrap(),
        );
    });
    let profile = SimulationProfile::load(&repo("examples/simulated/4xl4-pcie.yaml")).unwrap();
    let args = AgentArgs {
        node_name: Some("node-1".into()),
        simulate: vec![],
        simulate_from_node: false,
        interval: HumanDuration::new(Duration::from_secs(10)),
        heartbeat: HumanDuration::new(Duration::from_secs(300)),
        memory_threshold_mib: 2048,
        soft_write_interval: HumanDuration::new(Duration::from_secs(240)),
        cpu_class: None,
        measure_writes: None,
        classes: None,
    };
    let error = run_agent(
        client,
        &args,
        "node-1",
        Box::new(SimulatedSource::new(profile, "p", "node-1")),
        std::future::pending(),
    )
    .await
    .unwrap_err()
    .to_string();
    server.await.unwrap();
    assert_eq!(
        error,
        "the gpuclasses.llmo.dev CRD is not installed; install the llmo CRDs first (kubectl apply -f crds/)"
    );
}
