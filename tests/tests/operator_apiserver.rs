//! `llmo-operator run` against a real Kubernetes v1.20.2 API server. There is no kubelet here:
//! the test plays it by marking pods ready through their status, and watches the operator
//! create, scale, roll, repair and delete replica groups.

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use llmo_e2e::{cluster::ControlPlane, repo_root, workspace_binary};

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn output(plane: &ControlPlane, args: &[&str]) -> (bool, String) {
    let out = plane.kubectl(args);
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn ok(plane: &ControlPlane, args: &[&str]) -> String {
    let (success, text) = output(plane, args);
    assert!(success, "kubectl {args:?}: {text}");
    text
}

fn eventually(
    plane: &ControlPlane,
    what: &str,
    args: &[&str],
    want: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(45);
    loop {
        let (_, text) = output(plane, args);
        if want(&text) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; last: {text}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn spawn(plane: &ControlPlane, args: &[&str]) -> KillOnDrop {
    KillOnDrop(
        Command::new(workspace_binary("llmo-operator"))
            .args(args)
            .env("KUBECONFIG", plane.kubeconfig())
            .env("RUST_LOG", "warn")
            .current_dir(repo_root())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("llmo-operator starts"),
    )
}

fn pods(plane: &ControlPlane) -> Vec<String> {
    let text = ok(
        plane,
        &[
            "get",
            "pods",
            "-l",
            "llmo.dev/deployment=smollm2",
            "-o",
            "jsonpath={.items[*].metadata.name}",
        ],
    );
    let mut names: Vec<String> = text.split_whitespace().map(str::to_owned).collect();
    names.sort();
    names
}

/// Plays the kubelet: sets a pod's phase, and its Ready condition when running.
fn set_phase(plane: &ControlPlane, pod: &str, phase: &str) {
    let ready = if phase == "Running" { "True" } else { "False" };
    let patch = format!(
        r#"{{"status":{{"phase":"{phase}","conditions":[{{"type":"Ready","status":"{ready}"}}]}}}}"#
    );
    ok(
        plane,
        &[
            "patch",
            "pod",
            pod,
            "--subresource=status",
            "--type",
            "merge",
            "-p",
            &patch,
        ],
    );
}

fn mark_ready(plane: &ControlPlane, pod: &str) {
    set_phase(plane, pod, "Running");
}

fn condition(plane: &ControlPlane, type_: &str) -> String {
    ok(plane, &["get", "md", "smollm2", "-o", &format!("jsonpath={{.status.conditions[?(@.type==\"{type_}\")].status}}/{{.status.conditions[?(@.type==\"{type_}\")].reason}}")])
}

#[test]
fn the_operator_runs_a_deployment_through_its_life() {
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
    for node in ["cpu-a", "cpu-b"] {
        let json = format!(
            r#"{{"apiVersion":"v1","kind":"Node","metadata":{{"name":"{node}","labels":{{"kubernetes.io/hostname":"{node}"}}}}}}"#
        );
        let path = std::env::temp_dir().join(format!("llmo-{node}-{}.json", std::process::id()));
        std::fs::write(&path, json).unwrap();
        ok(&plane, &["apply", "-f", path.to_str().unwrap()]);
        let _ = std::fs::remove_file(path);
    }
    // Node agents report both nodes as `cpu` (no NVML here).
    let _agents: Vec<KillOnDrop> = ["cpu-a", "cpu-b"]
        .iter()
        .map(|n| {
            spawn(
                &plane,
                &[
                    "agent",
                    "--node-name",
                    n,
                    "--cpu-class",
                    "cpu",
                    "--interval",
                    "1s",
                ],
            )
        })
        .collect();
    let _operator = spawn(&plane, &["run"]);
    eventually(
        &plane,
        "both GPUNodes",
        &[
            "get",
            "gpunodes",
            "-o",
            "jsonpath={.items[*].status.gpuClass}",
        ],
        |t| t == "cpu cpu",
    );

    // Apply: one group, planned, placed, its services, and status that says so.
    ok(&plane, &["apply", "-f", "examples/smollm2-cpu.yaml"]);
    eventually(
        &plane,
        "the first pod",
        &[
            "get",
            "pods",
            "-l",
            "llmo.dev/deployment=smollm2",
            "-o",
            "name",
        ],
        |t| t.lines().count() == 1,
    );
    let layout = eventually(
        &plane,
        "the plan in status",
        &[
            "get",
            "md",
            "smollm2",
            "-o",
            "jsonpath={.status.plan.layout}/{.status.plan.quantization}",
        ],
        |t| !t.starts_with('/'),
    );
    assert_eq!(layout, "1x1/int4");
    let svcs = ok(
        &plane,
        &[
            "get",
            "svc",
            "-l",
            "llmo.dev/deployment=smollm2",
            "-o",
            "jsonpath={.items[*].spec.clusterIP}",
        ],
    );
    assert!(
        svcs.contains("None"),
        "a headless group service and the endpoint: {svcs}"
    );
    assert_eq!(condition(&plane, "Planned"), "True/Planned");
    assert_eq!(condition(&plane, "Available"), "False/Starting");

    // The kubelet reports the pod ready: Available.
    let first = pods(&plane);
    mark_ready(&plane, &first[0]);
    eventually(
        &plane,
        "Available",
        &[
            "get",
            "md",
            "smollm2",
            "-o",
            "jsonpath={.status.readyReplicas}",
        ],
        |t| t == "1",
    );
    assert_eq!(condition(&plane, "Available"), "True/MinimumReplicasReady");

    // Scale to two: a second group, on the other node.
    ok(
        &plane,
        &[
            "patch",
            "md",
            "smollm2",
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"replicas":{"min":2}}}"#,
        ],
    );
    eventually(
        &plane,
        "two groups",
        &[
            "get",
            "pods",
            "-l",
            "llmo.dev/deployment=smollm2",
            "-o",
            "name",
        ],
        |t| t.lines().count() == 2,
    );
    let nodes = ok(&plane, &["get", "pods", "-l", "llmo.dev/deployment=smollm2", "-o", "jsonpath={.items[*].spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchExpressions[0].values[0]}"]);
    let mut nodes: Vec<&str> = nodes.split_whitespace().collect();
    nodes.sort();
    assert_eq!(nodes, ["cpu-a", "cpu-b"], "replicas spread over nodes");
    for p in pods(&plane) {
        mark_ready(&plane, &p);
    }
    eventually(
        &plane,
        "two ready",
        &[
            "get",
            "md",
            "smollm2",
            "-o",
            "jsonpath={.status.readyReplicas}",
        ],
        |t| t == "2",
    );

    // A spec change rolls group by group: one new group at a time, old ones go as new ones are ready.
    let old_revision = ok(
        &plane,
        &["get", "md", "smollm2", "-o", "jsonpath={.status.revision}"],
    );
    ok(
        &plane,
        &[
            "patch",
            "md",
            "smollm2",
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"serving":{"maxBatchTokens":1024}}}"#,
        ],
    );
    let new_revision = eventually(
        &plane,
        "a new revision",
        &["get", "md", "smollm2", "-o", "jsonpath={.status.revision}"],
        |t| !t.is_empty() && t != old_revision,
    );
    for step in 0..2 {
        let new_pod = eventually(
            &plane,
            "a new group",
            &[
                "get",
                "pods",
                "-l",
                &format!("llmo.dev/revision={new_revision}"),
                "-o",
                "jsonpath={.items[*].metadata.name}",
            ],
            |t| t.split_whitespace().count() == step + 1,
        );
        let all = pods(&plane);
        assert!(all.len() <= 3, "surge is one group: {all:?}");
        let newest = new_pod.split_whitespace().max().unwrap().to_owned();
        assert_eq!(condition(&plane, "Progressing"), "True/RollingOut");
        mark_ready(&plane, &newest);
    }
    eventually(
        &plane,
        "the old revision gone",
        &[
            "get",
            "pods",
            "-l",
            &format!("llmo.dev/revision={old_revision}"),
            "-o",
            "name",
        ],
        |t| t.trim().is_empty(),
    );
    eventually(
        &plane,
        "two ready at the new revision",
        &[
            "get",
            "md",
            "smollm2",
            "-o",
            "jsonpath={.status.updatedReplicas}/{.status.readyReplicas}",
        ],
        |t| t == "2/2",
    );

    // A failed rank restarts its whole group: the group is deleted and a replacement created at
    // once, under a free index (the failed group's index stays reserved while its pods go).
    let before = pods(&plane);
    set_phase(&plane, &before[0], "Failed");
    let after = eventually(
        &plane,
        "the failed group replaced",
        &[
            "get",
            "pods",
            "-l",
            "llmo.dev/deployment=smollm2",
            "-o",
            "jsonpath={.items[*].metadata.name}",
        ],
        |t| t.split_whitespace().count() == 2 && !t.split_whitespace().any(|p| p == before[0]),
    );
    assert!(
        after.contains(&before[1]),
        "the healthy group stays: {after}"
    );

    // An invalid change is refused by the operator's validation (1.20 ignores CEL).
    ok(
        &plane,
        &[
            "patch",
            "md",
            "smollm2",
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"replicas":{"min":3,"max":1}}}"#,
        ],
    );
    eventually(
        &plane,
        "Degraded",
        &[
            "get",
            "md",
            "smollm2",
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Degraded\")].message}",
        ],
        |t| t.contains("spec.replicas: min (3) must not exceed max (1)"),
    );
    assert_eq!(condition(&plane, "Degraded"), "True/InvalidSpec");

    // Deleting the deployment removes everything it made.
    ok(&plane, &["delete", "md", "smollm2"]);
    eventually(
        &plane,
        "pods gone",
        &[
            "get",
            "pods",
            "-l",
            "llmo.dev/deployment=smollm2",
            "-o",
            "name",
        ],
        |t| t.trim().is_empty(),
    );
    eventually(
        &plane,
        "services gone",
        &[
            "get",
            "svc",
            "-l",
            "llmo.dev/deployment=smollm2",
            "-o",
            "name",
        ],
        |t| t.trim().is_empty(),
    );
}
