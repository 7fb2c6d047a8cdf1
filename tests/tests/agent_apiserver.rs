//! The node agent against a real Kubernetes v1.20.2 API server, with simulated GPUs: it creates
//! the node's GPUNode, writes its status by server-side apply and labels the Node with its class.

use std::time::Duration;

use llmo_e2e::cluster::ControlPlane;

#[test]
fn the_agent_reports_simulated_gpus_and_labels_its_node() {
    let plane = ControlPlane::start();
    plane.install_crds();
    plane.ok(&["apply", "-f", "examples/gpuclasses.yaml"]);
    plane.add_node("l4-node-1", &[("topology.kubernetes.io/zone", "zone-b")]);
    let _agent = plane.spawn_operator(&[
        "agent",
        "--node-name",
        "l4-node-1",
        "--simulate",
        "examples/simulated/4xl4-pcie.yaml",
        "--interval",
        "1s",
    ]);

    let class = plane.eventually(
        "the GPUNode status",
        &[
            "get",
            "gpunode",
            "l4-node-1",
            "-o",
            "jsonpath={.status.gpuClass}/{.status.gpuCount}/{.status.healthyGpus}",
        ],
        |t| t.starts_with("l4/"),
    );
    assert_eq!(class, "l4/4/4");
    let label = plane.eventually(
        "the class label",
        &[
            "get",
            "node",
            "l4-node-1",
            "-o",
            "jsonpath={.metadata.labels.llmo\\.dev/gpu-class}",
        ],
        |t| !t.is_empty(),
    );
    assert_eq!(label, "l4");
    // Written with server-side apply by the agent's own field manager, owned by the Node.
    let managers = plane.ok(&[
        "get",
        "gpunode",
        "l4-node-1",
        "-o",
        "jsonpath={.metadata.managedFields[*].manager}",
    ]);
    assert!(
        managers.split_whitespace().all(|m| m == "llmo-agent"),
        "{managers}"
    );
    let owner = plane.ok(&[
        "get",
        "gpunode",
        "l4-node-1",
        "-o",
        "jsonpath={.metadata.ownerReferences[0].kind}/{.metadata.ownerReferences[0].name}",
    ]);
    assert_eq!(owner, "Node/l4-node-1");
    // The Node's zone is copied, for placement to spread replicas by.
    let zone = plane.ok(&[
        "get",
        "gpunode",
        "l4-node-1",
        "-o",
        "jsonpath={.metadata.labels.topology\\.kubernetes\\.io/zone}",
    ]);
    assert_eq!(zone, "zone-b");
    // A person marks the node unschedulable for llmo; the agent's writes leave that alone.
    plane.ok(&[
        "patch",
        "gpunode",
        "l4-node-1",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"unschedulable":true}}"#,
    ]);
    std::thread::sleep(Duration::from_secs(2));
    let spec = plane.ok(&[
        "get",
        "gpunode",
        "l4-node-1",
        "-o",
        "jsonpath={.spec.unschedulable}",
    ]);
    assert_eq!(spec, "true");
}
