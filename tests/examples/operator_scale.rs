//! Scale benchmark of `llmo-operator run` on a real Kubernetes v1.20.2 API server:
//! 500 ModelDeployments over 200 simulated GPU nodes (150 with 4 L4, 50 with 8 H100).
//!
//!     make bench-operator
//!     (cargo build --release -p llmo-operator && cargo run --release -p llmo-e2e --example operator_scale)
//!
//! The operator starts once every object exists (a cold start, the hardest case) and the table
//! reports: time until every deployment has its group's pods and a status, the operator's peak
//! resident memory, API requests per reconcile (counted by the operator itself), and the writes
//! it makes in an idle minute after converging, which should be none.

use std::{
    net::TcpListener,
    time::{Duration, Instant},
};

use futures::{stream, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::{
    api::{ListParams, Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
    Api, Client, Config,
};
use llmo_e2e::cluster::ControlPlane;
use llmo_operator::api::{GPUNode, ModelDeployment};
use serde_json::json;

const L4_NODES: usize = 150;
const H100_NODES: usize = 50;
const DEPLOYMENTS: usize = 500;
const H100_DEPLOYMENTS: usize = 100;

fn gpu_node(
    name: &str,
    zone: &str,
    class: &str,
    product: &str,
    count: u32,
    mib: u64,
) -> serde_json::Value {
    let gpus: Vec<serde_json::Value> = (0..count)
        .map(|i| {
            json!({"index": i, "uuid": format!("GPU-{name}-{i}"), "product": product,
                   "memoryTotalMiB": mib, "memoryFreeMiB": mib - 300, "utilizationPercent": 0})
        })
        .collect();
    json!({
        "apiVersion": "llmo.dev/v1alpha1", "kind": "GPUNode",
        "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone}},
        "spec": {},
        "status": {"gpuClass": class, "gpuCount": count, "healthyGpus": count,
                   "memoryFreeMiB": (mib - 300) * u64::from(count), "gpus": gpus},
    })
}

fn deployment(i: usize) -> serde_json::Value {
    let class = if i < H100_DEPLOYMENTS { "h100" } else { "l4" };
    json!({
        "apiVersion": "llmo.dev/v1alpha1", "kind": "ModelDeployment",
        "metadata": {"name": format!("m{i:03}"), "namespace": "default"},
        "spec": {
            "model": {"uri": "hf://meta-llama/Llama-3.1-8B-Instruct",
                      "architecture": {"parameters": "8B", "layers": 32, "hiddenSize": 4096,
                                       "attentionHeads": 32, "kvHeads": 8, "vocabSize": 128256,
                                       "maxContext": 8192}},
            "quantization": "int4",
            "gpu": {"class": class},
            "parallelism": {"tensor": 1, "pipeline": 1},
            "replicas": {"min": 1, "max": 2},
            "slo": {"ttft": "2s"},
        },
    })
}

fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Writes (create, update, patch, delete) to anything but the leader Lease, and to the Lease.
fn writes(text: &str) -> (f64, f64) {
    let mut other = 0.0;
    let mut lease = 0.0;
    for line in text
        .lines()
        .filter(|l| l.starts_with("llmo_operator_api_requests_total{"))
    {
        let write = ["create", "update", "patch", "delete"]
            .iter()
            .any(|v| line.contains(&format!("verb=\"{v}\"")));
        let n: f64 = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        if write && line.contains("resource=\"leases\"") {
            lease += n;
        } else if write {
            other += n;
        }
    }
    (other, lease)
}

async fn scrape(addr: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("metrics endpoint");
    s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .expect("request");
    let mut body = String::new();
    s.read_to_string(&mut body).await.expect("response");
    body
}

fn peak_rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

#[tokio::main]
async fn main() {
    let plane = ControlPlane::start();
    plane.install_crds();
    plane.ok(&["apply", "-f", "examples/gpuclasses.yaml"]);
    let kubeconfig = Kubeconfig::read_from(plane.kubeconfig()).expect("kubeconfig");
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("config");
    let client = Client::try_from(config).expect("client");

    let setup = Instant::now();
    let nodes: Api<GPUNode> = Api::all(client.clone());
    let specs: Vec<serde_json::Value> = (0..L4_NODES)
        .map(|i| {
            gpu_node(
                &format!("l4-{i:03}"),
                ["zone-a", "zone-b", "zone-c"][i % 3],
                "l4",
                "NVIDIA L4",
                4,
                23034,
            )
        })
        .chain((0..H100_NODES).map(|i| {
            gpu_node(
                &format!("h100-{i:03}"),
                ["zone-a", "zone-b"][i % 2],
                "h100",
                "NVIDIA H100 80GB HBM3",
                8,
                81559,
            )
        }))
        .collect();
    stream::iter(specs)
        .for_each_concurrent(16, |spec| {
            let nodes = nodes.clone();
            async move {
                let name = spec["metadata"]["name"].as_str().unwrap().to_owned();
                let object: GPUNode = serde_json::from_value(spec.clone()).unwrap();
                nodes
                    .create(&PostParams::default(), &object)
                    .await
                    .expect("GPUNode created");
                let status = json!({"status": spec["status"]});
                nodes
                    .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                    .await
                    .expect("GPUNode status");
            }
        })
        .await;
    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), "default");
    stream::iter(0..DEPLOYMENTS)
        .for_each_concurrent(16, |i| {
            let mds = mds.clone();
            async move {
                let md: ModelDeployment = serde_json::from_value(deployment(i)).unwrap();
                mds.create(&PostParams::default(), &md)
                    .await
                    .expect("ModelDeployment created");
            }
        })
        .await;
    println!(
        "created {} GPUNodes and {DEPLOYMENTS} ModelDeployments in {:.1}s",
        L4_NODES + H100_NODES,
        setup.elapsed().as_secs_f64()
    );

    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let operator = plane.spawn_operator_as(
        plane.kubeconfig(),
        "operator-scale",
        &["run", "--metrics-addr", &addr, "--identity", "scale"],
    );
    let pid = operator.0.id();
    let start = Instant::now();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let converged = loop {
        let pod_count = pods
            .list_metadata(&ListParams::default().labels("llmo.dev/deployment"))
            .await
            .map(|l| l.items.len())
            .unwrap_or(0);
        let statused = mds
            .list(&ListParams::default())
            .await
            .map(|l| {
                l.items
                    .iter()
                    .filter(|m| {
                        m.status
                            .as_ref()
                            .is_some_and(|s| s.replicas >= 1 && s.plan.is_some())
                    })
                    .count()
            })
            .unwrap_or(0);
        if pod_count >= DEPLOYMENTS && statused == DEPLOYMENTS {
            break start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(600),
            "not converged after 10 minutes: {pod_count} pods, {statused} statuses"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    // Let the requeues of the convergence itself settle before counting.
    tokio::time::sleep(Duration::from_secs(20)).await;
    let at_converge = scrape(&addr).await;
    let requests = metric(&at_converge, "llmo_operator_api_requests_total");
    let reconciles = metric(&at_converge, "llmo_operator_reconciles_total");
    let (writes_before, lease_before) = writes(&at_converge);
    tokio::time::sleep(Duration::from_secs(60)).await;
    let after_idle = scrape(&addr).await;
    let (writes_after, lease_after) = writes(&after_idle);
    let idle_reconciles = metric(&after_idle, "llmo_operator_reconciles_total") - reconciles;
    let peak = peak_rss_mib(pid);

    println!();
    println!("| measure | value | goal |");
    println!("|---|---|---|");
    println!(
        "| deployments / GPU nodes | {DEPLOYMENTS} / {} | |",
        L4_NODES + H100_NODES
    );
    println!(
        "| time to converge (cold start) | {:.1} s | < 60 s |",
        converged.as_secs_f64()
    );
    println!("| operator peak RSS | {peak:.0} MiB | < 150 MB |");
    println!("| reconciles until settled | {reconciles:.0} | |");
    println!(
        "| API requests per reconcile | {:.1} (of which writes {:.1}) | |",
        requests / reconciles.max(1.0),
        writes_before / reconciles.max(1.0)
    );
    println!(
        "| writes in the idle minute after | {:.0} ({idle_reconciles:.0} reconciles) | 0 |",
        writes_after - writes_before
    );
    println!(
        "| leader Lease renewals in that minute | {:.0} | |",
        lease_after - lease_before
    );
    drop(operator);
}
