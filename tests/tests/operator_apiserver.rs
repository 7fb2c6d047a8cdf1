//! `llmo-operator run` against a real Kubernetes v1.20.2 API server. There is no kubelet here:
//! the test plays it by marking pods ready through their status, and watches the operator
//! create, scale, roll, repair and delete replica groups.

use llmo_e2e::cluster::ControlPlane;

fn condition(plane: &ControlPlane, type_: &str) -> String {
    plane.ok(&["get", "md", "smollm2", "-o", &format!("jsonpath={{.status.conditions[?(@.type==\"{type_}\")].status}}/{{.status.conditions[?(@.type==\"{type_}\")].reason}}")])
}

#[test]
fn the_operator_runs_a_deployment_through_its_life() {
    let plane = ControlPlane::start();
    // Node agents report both nodes as `cpu` (no NVML here).
    let _agents = plane.cpu_nodes_with_agents(&["cpu-a", "cpu-b"]);
    let _operator = plane.spawn_operator(&["run"]);

    // Apply: one group, planned, placed, its services, and status that says so.
    plane.ok(&["apply", "-f", "examples/smollm2-cpu.yaml"]);
    plane.eventually(
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
    let layout = plane.eventually(
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
    assert_eq!(layout, "1x1/bf16");
    let svcs = plane.ok(&[
        "get",
        "svc",
        "-l",
        "llmo.dev/deployment=smollm2",
        "-o",
        "jsonpath={.items[*].spec.clusterIP}",
    ]);
    assert!(
        svcs.contains("None"),
        "a headless group service and the endpoint: {svcs}"
    );
    assert_eq!(condition(&plane, "Planned"), "True/Planned");
    // Each decision is an Event on the deployment.
    let events = [
        "get",
        "events",
        "--field-selector",
        "involvedObject.name=smollm2",
        "-o",
        "jsonpath={range .items[*]}{.type}/{.reason}: {.message}{\"\\n\"}{end}",
    ];
    let seen = plane.eventually("the decisions as events", &events, |t| {
        t.contains("Normal/GroupCreated") && t.contains("Normal/Planned")
    });
    assert!(seen.contains("created group smollm2-"), "{seen}");
    assert_eq!(condition(&plane, "Available"), "False/Starting");

    // The kubelet reports the pod ready: Available.
    let first = plane.pods_of("smollm2");
    plane.mark_pod_ready(&first[0]);
    plane.eventually(
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
    plane.ok(&[
        "patch",
        "md",
        "smollm2",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"replicas":{"min":2}}}"#,
    ]);
    plane.eventually(
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
    let nodes = plane.ok(&["get", "pods", "-l", "llmo.dev/deployment=smollm2", "-o", "jsonpath={.items[*].spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchExpressions[0].values[0]}"]);
    let mut nodes: Vec<&str> = nodes.split_whitespace().collect();
    nodes.sort();
    assert_eq!(nodes, ["cpu-a", "cpu-b"], "replicas spread over nodes");
    for p in plane.pods_of("smollm2") {
        plane.mark_pod_ready(&p);
    }
    plane.eventually(
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
    let old_revision = plane.ok(&["get", "md", "smollm2", "-o", "jsonpath={.status.revision}"]);
    plane.ok(&[
        "patch",
        "md",
        "smollm2",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"serving":{"maxBatchTokens":1024}}}"#,
    ]);
    let new_revision = plane.eventually(
        "a new revision",
        &["get", "md", "smollm2", "-o", "jsonpath={.status.revision}"],
        |t| !t.is_empty() && t != old_revision,
    );
    for step in 0..2 {
        let new_pod = plane.eventually(
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
        // Replaced groups leave the Service at once and drain before they go.
        let serving = plane.serving_pods_of("smollm2");
        assert!(serving.len() <= 3, "surge is one group: {serving:?}");
        let newest = new_pod.split_whitespace().max().unwrap().to_owned();
        assert_eq!(condition(&plane, "Progressing"), "True/RollingOut");
        plane.mark_pod_ready(&newest);
        if step == 0 {
            // The old group it replaces leaves the Service, then drains, then goes.
            plane.eventually(
                "a replaced group draining",
                &[
                    "get",
                    "pods",
                    "-l",
                    "llmo.dev/serving=false",
                    "-o",
                    "jsonpath={.items[*].metadata.annotations.llmo\\.dev/drain-started}",
                ],
                |t| !t.trim().is_empty(),
            );
        }
    }
    plane.eventually(
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
    plane.eventually(
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
    let before = plane.pods_of("smollm2");
    plane.set_pod_phase(&before[0], "Failed");
    let after = plane.eventually(
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
    plane.ok(&[
        "patch",
        "md",
        "smollm2",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"replicas":{"min":3,"max":1}}}"#,
    ]);
    plane.eventually(
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
    plane.eventually("a warning event", &events, |t| {
        t.contains("Warning/InvalidSpec: spec.replicas: min (3) must not exceed max (1)")
    });

    // Deleting the deployment removes everything it made.
    plane.ok(&["delete", "md", "smollm2"]);
    plane.eventually(
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
    plane.eventually(
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
