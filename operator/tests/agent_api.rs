//! The node agent's requests to the API server, checked one by one against a mock server
//! (kube's tower-test): method, path, query (`fieldManager=llmo-agent`) and body.

use http::{Method, Request, Response};
use k8s_openapi::api::core::v1::Node;
use kube::{client::Body, Client};
use llmo_operator::{
    api::{GPUNodeStatus, GpuDevice, GpuHealth},
    inventory::{NodeWriter, FIELD_MANAGER, GPU_CLASS_LABEL},
};
use serde_json::{json, Value};
use tower_test::mock::{self, Handle};

type ApiServerHandle = Handle<Request<Body>, Response<Body>>;

/// Plays the API server: checks each request in turn and answers it.
struct ApiServerVerifier(ApiServerHandle);

/// What one request must look like, and the answer to give.
struct Expect {
    method: Method,
    uri: &'static str,
    content_type: &'static str,
    reply_status: u16,
    reply: Value,
}

impl ApiServerVerifier {
    /// Answers the requests in order, returning each request's JSON body.
    fn run(mut self, script: Vec<Expect>) -> tokio::task::JoinHandle<Vec<Value>> {
        tokio::spawn(async move {
            let mut bodies = Vec::new();
            for step in script {
                let (request, send) = self.0.next_request().await.expect("a request was expected");
                assert_eq!(request.method(), step.method);
                assert_eq!(request.uri().to_string(), step.uri);
                assert_eq!(
                    request.headers()["content-type"].to_str().unwrap(),
                    step.content_type
                );
                let bytes = request.into_body().collect_bytes().await.unwrap();
                bodies.push(serde_json::from_slice(&bytes).unwrap());
                let response = Response::builder()
                    .status(step.reply_status)
                    .body(Body::from(serde_json::to_vec(&step.reply).unwrap()))
                    .unwrap();
                send.send_response(response);
            }
            bodies
        })
    }
}

fn mock_client() -> (Client, ApiServerVerifier) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(service, "default"), ApiServerVerifier(handle))
}

const APPLY: &str = "application/apply-patch+yaml";

fn status() -> GPUNodeStatus {
    GPUNodeStatus {
        gpu_class: Some("l4".into()),
        gpu_count: 1,
        healthy_gpus: 1,
        memory_free_mib: 22000,
        gpus: vec![GpuDevice {
            index: 0,
            uuid: "GPU-0".into(),
            product: "NVIDIA L4".into(),
            memory_total_mib: 23034,
            memory_free_mib: 22000,
            health: GpuHealth::Healthy,
            ..GpuDevice::default()
        }],
        ..GPUNodeStatus::default()
    }
}

fn gpunode(name: &str) -> Value {
    json!({"apiVersion": "llmo.dev/v1alpha1", "kind": "GPUNode", "metadata": {"name": name}, "spec": {}})
}

fn not_found() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404,
           "message": "gpunodes.llmo.dev \"node-1\" not found"})
}

fn node() -> Node {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "node-1", "uid": "0b7c5a3e-1111-2222-3333-444455556666"}
    }))
    .unwrap()
}

#[tokio::test]
async fn status_is_written_by_server_side_apply_as_llmo_agent() {
    assert_eq!(FIELD_MANAGER, "llmo-agent");
    let (client, server) = mock_client();
    let server = server.run(vec![Expect {
        method: Method::PATCH,
        uri: "/apis/llmo.dev/v1alpha1/gpunodes/node-1/status?&force=true&fieldManager=llmo-agent",
        content_type: APPLY,
        reply_status: 200,
        reply: gpunode("node-1"),
    }]);
    let writer = NodeWriter::new(client, "node-1", None);
    writer.apply_status(&status()).await.unwrap();
    let bodies = server.await.unwrap();
    assert_eq!(bodies[0]["apiVersion"], "llmo.dev/v1alpha1");
    assert_eq!(bodies[0]["kind"], "GPUNode");
    assert_eq!(bodies[0]["metadata"], json!({"name": "node-1"}));
    assert_eq!(bodies[0]["status"]["gpuClass"], "l4");
    assert_eq!(bodies[0]["status"]["memoryFreeMiB"], 22000);
    assert_eq!(bodies[0]["status"]["gpus"][0]["health"], "Healthy");
    assert!(
        bodies[0].get("spec").is_none(),
        "the agent never writes spec"
    );
}

#[tokio::test]
async fn a_missing_gpunode_is_created_owned_by_its_node_then_written() {
    let (client, server) = mock_client();
    let status_uri =
        "/apis/llmo.dev/v1alpha1/gpunodes/node-1/status?&force=true&fieldManager=llmo-agent";
    let server = server.run(vec![
        Expect {
            method: Method::PATCH,
            uri: status_uri,
            content_type: APPLY,
            reply_status: 404,
            reply: not_found(),
        },
        Expect {
            method: Method::PATCH,
            uri: "/apis/llmo.dev/v1alpha1/gpunodes/node-1?&fieldManager=llmo-agent",
            content_type: APPLY,
            reply_status: 201,
            reply: gpunode("node-1"),
        },
        Expect {
            method: Method::PATCH,
            uri: status_uri,
            content_type: APPLY,
            reply_status: 200,
            reply: gpunode("node-1"),
        },
    ]);
    let writer = NodeWriter::new(client, "node-1", Some(&node()));
    writer.apply_status(&status()).await.unwrap();
    let bodies = server.await.unwrap();
    assert_eq!(
        bodies[1],
        json!({
            "apiVersion": "llmo.dev/v1alpha1",
            "kind": "GPUNode",
            "metadata": {
                "name": "node-1",
                "ownerReferences": [{
                    "apiVersion": "v1", "kind": "Node", "name": "node-1",
                    "uid": "0b7c5a3e-1111-2222-3333-444455556666"
                }]
            },
            // The CRD requires spec; a real v1.20 API server refuses the object without it.
            "spec": {}
        })
    );
    assert_eq!(bodies[2], bodies[0], "the same status is applied again");
}

#[tokio::test]
async fn the_class_label_is_applied_and_removed_by_leaving_it_out() {
    let (client, server) = mock_client();
    let uri = "/api/v1/nodes/node-1?&force=true&fieldManager=llmo-agent";
    let reply = serde_json::to_value(node()).unwrap();
    let server = server.run(vec![
        Expect {
            method: Method::PATCH,
            uri,
            content_type: APPLY,
            reply_status: 200,
            reply: reply.clone(),
        },
        Expect {
            method: Method::PATCH,
            uri,
            content_type: APPLY,
            reply_status: 200,
            reply,
        },
    ]);
    let writer = NodeWriter::new(client, "node-1", None);
    writer.apply_class_label(Some("h100")).await.unwrap();
    writer.apply_class_label(None).await.unwrap();
    let bodies = server.await.unwrap();
    assert_eq!(
        bodies[0],
        json!({"apiVersion": "v1", "kind": "Node",
               "metadata": {"name": "node-1", "labels": {GPU_CLASS_LABEL: "h100"}}})
    );
    assert_eq!(
        bodies[1],
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1"}})
    );
}

#[tokio::test]
async fn a_refused_write_says_what_the_agent_was_doing() {
    let (client, server) = mock_client();
    let server = server.run(vec![Expect {
        method: Method::PATCH,
        uri: "/apis/llmo.dev/v1alpha1/gpunodes/node-1/status?&force=true&fieldManager=llmo-agent",
        content_type: APPLY,
        reply_status: 403,
        reply: json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden",
                      "code": 403, "message": "gpunodes.llmo.dev \"node-1\" is forbidden"}),
    }]);
    let writer = NodeWriter::new(client, "node-1", None);
    let error = writer
        .apply_status(&status())
        .await
        .unwrap_err()
        .to_string();
    server.await.unwrap();
    assert!(
        error.starts_with("writing GPUNode node-1 status: "),
        "{error}"
    );
    assert!(error.contains("forbidden"), "{error}");
}
