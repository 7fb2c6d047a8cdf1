//! The node agent against a real Kubernetes v1.20.2 API server, with simulated GPUs: it creates
//! the node's GPUNode, writes its status by server-side apply and labels the Node with its class.

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use llmo_e2e::{cluster::ControlPlane, workspace_binary};

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn ok(plane: &ControlPlane, args: &[&str]) -> String {
    let out = plane.kubectl(args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "kubectl {args:?}: {text}");
    text
}

fn eventually(what: &str, mut check: impl FnMut() -> Option<String>) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn the_agent_reports_simulated_gpus_and_labels_its_node() {
    let plane = ControlPlane::start();
    ok(&plane, &["apply", "-f", "crds/without-cel/"]);
    ok(
        &plane,
        &[
            "wait",
            "--for",
            "condition=established",
            "crd",
            "--all",
            "--timeout",
            "60s",
        ],
    );
    ok(&plane, &["apply", "-f", "examples/gpuclasses.yaml"]);
    let node = r#"{"apiVersion":"v1","kind":"Node","metadata":{"name":"l4-node-1","labels":{"kubernetes.io/hostname":"l4-node-1","topology.kubernetes.io/zone":"zone-b"}}}"#;
    let path = std::env::temp_dir().join(format!("llmo-node-{}.json", std::process::id()));
    std::fs::write(&path, node).unwrap();
    ok(&plane, &["apply", "-f", path.to_str().unwrap()]);
    let _ = std::fs::remove_file(&path);

    let _agent = KillOnDrop(
        Command::new(workspace_binary("llmo-operator"))
            .args([
                "agent",
                "--node-name",
                "l4-node-1",
                "--simulate",
                "examples/simulated/4xl4-pcie.yaml",
                "--interval",
                "1s",
            ])
            .env("KUBECONFIG", plane.kubeconfig())
            .current_dir(llmo_e2e::repo_root())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("llmo-operator starts"),
    );

    let class = eventually("the GPUNode status", || {
        let out = plane.kubectl(&[
            "get",
            "gpunode",
            "l4-node-1",
            "-o",
            "jsonpath={.status.gpuClass}/{.status.gpuCount}/{.status.healthyGpus}",
        ]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (out.status.success() && !text.starts_with('/')).then_some(text)
    });
    assert_eq!(class, "l4/4/4");
    let label = eventually("the class label", || {
        let out = plane.kubectl(&[
            "get",
            "node",
            "l4-node-1",
            "-o",
            "jsonpath={.metadata.labels.llmo\\.dev/gpu-class}",
        ]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (!text.is_empty()).then_some(text)
    });
    assert_eq!(label, "l4");
    // Written with server-side apply by the agent's own field manager, owned by the Node.
    let managers = ok(
        &plane,
        &[
            "get",
            "gpunode",
            "l4-node-1",
            "-o",
            "jsonpath={.metadata.managedFields[*].manager}",
        ],
    );
    assert!(
        managers.split_whitespace().all(|m| m == "llmo-agent"),
        "{managers}"
    );
    let owner = ok(
        &plane,
        &[
            "get",
            "gpunode",
            "l4-node-1",
            "-o",
            "jsonpath={.metadata.ownerReferences[0].kind}/{.metadata.ownerReferences[0].name}",
        ],
    );
    assert_eq!(owner, "Node/l4-node-1");
    // The Node's zone is copied, for placement to spread replicas by.
    let zone = ok(
        &plane,
        &[
            "get",
            "gpunode",
            "l4-node-1",
            "-o",
            "jsonpath={.metadata.labels.topology\\.kubernetes\\.io/zone}",
        ],
    );
    assert_eq!(zone, "zone-b");
    // A person marks the node unschedulable for llmo; the agent's writes leave that alone.
    ok(
        &plane,
        &[
            "patch",
            "gpunode",
            "l4-node-1",
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"unschedulable":true}}"#,
        ],
    );
    std::thread::sleep(Duration::from_secs(2));
    let spec = ok(
        &plane,
        &[
            "get",
            "gpunode",
            "l4-node-1",
            "-o",
            "jsonpath={.spec.unschedulable}",
        ],
    );
    assert_eq!(spec, "true");
}
