//! The operator as it runs in production, against a real Kubernetes v1.20.2 API server with RBAC:
//! installed by the Helm chart and running with the chart's ServiceAccounts and nothing more,
//! several replicas electing one leader, and a crash in the middle of a rollout.

use std::{
    net::TcpListener,
    time::{Duration, Instant},
};

use llmo_e2e::cluster::{ControlPlane, KillOnDrop};

const NS: &str = "llmo-system";

fn free_addr() -> String {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port");
    format!("127.0.0.1:{port}")
}

/// The Lease's holder; empty while there is no Lease (or no holder).
fn lease_holder(plane: &ControlPlane, ns: &str) -> String {
    let (found, text) = plane.try_kubectl(&[
        "-n",
        ns,
        "get",
        "lease",
        "llmo-operator",
        "-o",
        "jsonpath={.spec.holderIdentity}",
    ]);
    if found {
        text.trim().to_owned()
    } else {
        String::new()
    }
}

/// Marks a pod ready unless it went away meanwhile (a drained group is deleted under our feet).
fn mark_ready_if_present(plane: &ControlPlane, pod: &str) {
    let (_, text) = plane.try_kubectl(&[
        "patch",
        "pod",
        pod,
        "--subresource=status",
        "--type",
        "merge",
        "-p",
        r#"{"status":{"phase":"Running","conditions":[{"type":"Ready","status":"True"}]}}"#,
    ]);
    assert!(
        !text.contains("Error") || text.contains("NotFound"),
        "marking {pod} ready: {text}"
    );
}

/// Polls `f` every 200 ms until it returns Some, for at most `limit`; a timeout shows the
/// operators' logs.
fn wait_for<T>(
    plane: &ControlPlane,
    what: &str,
    limit: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> (T, Duration) {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return (v, start.elapsed());
        }
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}{}",
            plane.operator_logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn can_i(plane: &ControlPlane, sa: &str, args: &[&str]) -> bool {
    let who = format!("--as=system:serviceaccount:{NS}:{sa}");
    let mut all = vec!["auth", "can-i", who.as_str()];
    all.extend_from_slice(args);
    // The answer is on stdout; warnings (e.g. for cluster-scoped kinds) go to stderr.
    String::from_utf8_lossy(&plane.kubectl(&all).stdout).trim() == "yes"
}

#[test]
fn the_chart_installs_and_the_operator_works_with_its_service_account_alone() {
    let plane = ControlPlane::start();
    plane.ok(&["create", "namespace", NS]);
    let out = plane.helm(&[
        "install",
        "llmo",
        "charts/llmo",
        "--namespace",
        NS,
        "--set",
        "agent.simulate=true",
        "--set",
        "agent.cpuClass=cpu",
    ]);
    assert!(out.contains("STATUS: deployed"), "{out}");
    // The CRDs (the variant 1.20 accepts) and the default GPUClasses from the post-install hook.
    plane.wait_for_crds();
    let classes = plane.eventually(
        "the default GPUClasses",
        &[
            "get",
            "gpuclasses",
            "-o",
            "jsonpath={.items[*].metadata.name}",
        ],
        |t| t.contains("cpu") && t.contains("h100"),
    );
    assert!(classes.contains("l4"), "{classes}");

    // Least privilege, spot checks: what the operator and agent need, and not more.
    let op = "llmo-operator";
    let agent = "llmo-agent";
    assert!(can_i(&plane, op, &["create", "pods", "-n", "default"]));
    assert!(can_i(
        &plane,
        op,
        &[
            "patch",
            "modeldeployments.llmo.dev",
            "--subresource=status",
            "-n",
            "default"
        ]
    ));
    assert!(!can_i(
        &plane,
        op,
        &["update", "modeldeployments.llmo.dev", "-n", "default"]
    ));
    assert!(!can_i(&plane, op, &["get", "secrets", "-n", "default"]));
    assert!(!can_i(&plane, op, &["delete", "nodes"]));
    assert!(!can_i(
        &plane,
        op,
        &["create", "leases.coordination.k8s.io", "-n", "default"]
    ));
    assert!(can_i(
        &plane,
        agent,
        &["patch", "gpunodes.llmo.dev", "--subresource=status"]
    ));
    assert!(!can_i(&plane, agent, &["create", "pods", "-n", "default"]));
    assert!(!can_i(&plane, agent, &["delete", "gpunodes.llmo.dev"]));

    // The node agent and the operator, each with its own ServiceAccount's token only.
    plane.add_node("cpu-a", &[]);
    let agent_config = plane.service_account_kubeconfig(NS, agent);
    let _agent = plane.spawn_operator_as(
        &agent_config,
        "agent",
        &[
            "agent",
            "--node-name",
            "cpu-a",
            "--simulate-from-node",
            "--cpu-class",
            "cpu",
            "--interval",
            "1s",
        ],
    );
    let op_config = plane.service_account_kubeconfig(NS, op);
    let metrics = free_addr();
    let _operator = plane.spawn_operator_as(
        &op_config,
        "operator",
        &[
            "run",
            "--lease-namespace",
            NS,
            "--identity",
            "op-0",
            "--metrics-addr",
            &metrics,
        ],
    );
    plane.eventually(
        "the GPUNode from the agent",
        &[
            "get",
            "gpunodes",
            "-o",
            "jsonpath={.items[*].status.gpuClass}",
        ],
        |t| t == "cpu",
    );
    let (holder, _) = wait_for(&plane, "the lease", Duration::from_secs(30), || {
        Some(lease_holder(&plane, NS)).filter(|h| !h.is_empty())
    });
    assert_eq!(holder, "op-0");

    plane.ok(&["apply", "-f", "examples/smollm2-cpu.yaml"]);
    plane.eventually(
        "the group's pod",
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
    plane.eventually(
        "status from the operator",
        &[
            "get",
            "md",
            "smollm2",
            "-o",
            "jsonpath={.status.plan.layout}",
        ],
        |t| t == "1x1",
    );
    let svcs = plane.ok(&[
        "get",
        "svc",
        "-l",
        "llmo.dev/deployment=smollm2",
        "-o",
        "name",
    ]);
    assert_eq!(
        svcs.lines().count(),
        2,
        "group and endpoint services: {svcs}"
    );
    plane.eventually(
        "an event recorded with the operator's rights",
        &[
            "get",
            "events",
            "--field-selector",
            "involvedObject.name=smollm2",
            "-o",
            "jsonpath={.items[*].reason}",
        ],
        |t| t.contains("GroupCreated"),
    );
    let pod = plane.pods_of("smollm2");
    plane.mark_pod_ready(&pod[0]);
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

    // Its own endpoints answer.
    let body = http_get(&plane, &metrics, "/metrics");
    assert!(
        body.contains("llmo_operator_reconciles_total{result=\"ok\"}"),
        "{body}"
    );
    assert!(body.contains("llmo_operator_leader 1"), "{body}");
    assert!(
        body.contains("llmo_operator_api_requests_total{verb=\"patch\",resource=\"pods\"}"),
        "{body}"
    );
    assert!(http_get(&plane, &metrics, "/readyz").contains("ready"));

    // Deleting the deployment removes what it made; uninstalling keeps the CRDs (crds.keep).
    plane.ok(&["delete", "md", "smollm2"]);
    plane.eventually(
        "nothing left",
        &[
            "get",
            "pods,svc",
            "-l",
            "llmo.dev/deployment=smollm2",
            "-o",
            "name",
        ],
        |t| t.trim().is_empty(),
    );
    // ... and its series leave the operator's metrics.
    assert!(
        body.contains("deployment=\"smollm2\""),
        "no per-deployment series before the delete: {body}"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left: Vec<String> = http_get(&plane, &metrics, "/metrics")
            .lines()
            .filter(|l| l.contains("deployment=\"smollm2\""))
            .map(str::to_owned)
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "30 s after the delete the operator still exports:\n{}",
            left.join("\n")
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    plane.helm(&["uninstall", "llmo", "--namespace", NS]);
    let crds = plane.ok(&["get", "crd", "-o", "name"]);
    assert!(crds.contains("modeldeployments.llmo.dev"), "{crds}");
}

/// A plain HTTP/1.0 GET, enough for the operator's own endpoints.
fn http_get(plane: &ControlPlane, addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let (mut stream, _) = wait_for(
        plane,
        "the metrics endpoint",
        Duration::from_secs(20),
        || std::net::TcpStream::connect(addr).ok(),
    );
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").expect("request sent");
    let mut body = String::new();
    stream.read_to_string(&mut body).expect("response read");
    body
}

#[test]
fn a_standby_takes_over_when_the_leader_dies_and_at_once_when_it_steps_down() {
    let plane = ControlPlane::start();
    plane.install_crds();
    let admin = plane.kubeconfig().to_path_buf();
    let spawn = |id: &str| -> KillOnDrop {
        plane.spawn_operator_as(
            &admin,
            id,
            &["run", "--identity", id, "--metrics-addr", &free_addr()],
        )
    };
    let mut replicas: Vec<(String, Option<KillOnDrop>)> = ["op-a", "op-b", "op-c"]
        .iter()
        .map(|id| ((*id).to_owned(), Some(spawn(id))))
        .collect();
    let (first, _) = wait_for(&plane, "a leader", Duration::from_secs(30), || {
        Some(lease_holder(&plane, "default")).filter(|h| !h.is_empty())
    });

    // SIGKILL: no release, the standbys wait for the lease to expire (15 s).
    let leader = replicas.iter_mut().find(|(id, _)| *id == first).unwrap();
    let killed_at = Instant::now();
    drop(leader.1.take());
    let (second, _) = wait_for(&plane, "a new leader", Duration::from_secs(30), || {
        Some(lease_holder(&plane, "default")).filter(|h| !h.is_empty() && *h != first)
    });
    let takeover = killed_at.elapsed();
    println!(
        "takeover after the leader was killed: {:.1}s",
        takeover.as_secs_f64()
    );
    assert!(
        takeover <= Duration::from_secs(20),
        "takeover took {takeover:?}"
    );

    // SIGTERM: the leader gives the lease up, the last standby takes it within a renew period.
    let leader = replicas.iter_mut().find(|(id, _)| *id == second).unwrap();
    let pid = leader.1.as_ref().unwrap().0.id().to_string();
    let stopped_at = Instant::now();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill runs");
    assert!(status.success());
    let (third, _) = wait_for(
        &plane,
        "the last standby to lead",
        Duration::from_secs(20),
        || {
            Some(lease_holder(&plane, "default"))
                .filter(|h| !h.is_empty() && *h != first && *h != second)
        },
    );
    let handover = stopped_at.elapsed();
    println!(
        "takeover after the leader stepped down: {:.1}s",
        handover.as_secs_f64()
    );
    assert!(
        handover <= Duration::from_secs(8),
        "handover took {handover:?}"
    );
    let exited = leader.1.as_mut().unwrap().0.wait().expect("waits");
    assert!(exited.success(), "a clean stop exits 0: {exited:?}");
    assert!(!third.is_empty());
}

#[test]
fn killing_the_operator_mid_rollout_converges_without_duplicates_or_orphans() {
    let plane = ControlPlane::start();
    let _agents = plane.cpu_nodes_with_agents(&["cpu-a", "cpu-b"]);
    let admin = plane.kubeconfig().to_path_buf();
    let run = |log: &str| {
        plane.spawn_operator_as(
            &admin,
            log,
            &[
                "run",
                "--identity",
                log,
                "--metrics-addr",
                &free_addr(),
                "--lease-duration",
                "3s",
            ],
        )
    };
    let mut operator = Some(run("op-1"));
    plane.ok(&["apply", "-f", "examples/smollm2-cpu.yaml"]);
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
    let old = plane.ok(&["get", "md", "smollm2", "-o", "jsonpath={.status.revision}"]);

    // Start a rollout, and kill the operator as soon as the first new group exists.
    plane.ok(&[
        "patch",
        "md",
        "smollm2",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"serving":{"maxBatchTokens":1024}}}"#,
    ]);
    plane.eventually(
        "the first new group",
        &[
            "get",
            "pods",
            "-l",
            "llmo.dev/deployment=smollm2",
            "-o",
            "name",
        ],
        |t| t.lines().count() == 3,
    );
    drop(operator.take());
    for p in plane.pods_of("smollm2") {
        mark_ready_if_present(&plane, &p);
    }
    operator = Some(run("op-2"));

    // Play the kubelet until the rollout is done; at no point more than one surge group.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let serving = plane.serving_pods_of("smollm2");
        assert!(
            serving.len() <= 3,
            "surge is one group even across a restart: {serving:?}"
        );
        let pods = plane.pods_of("smollm2");
        for p in &pods {
            mark_ready_if_present(&plane, p);
        }
        let revisions = plane.ok(&[
            "get",
            "pods",
            "-l",
            "llmo.dev/deployment=smollm2",
            "-o",
            "jsonpath={.items[*].metadata.labels.llmo\\.dev/revision}",
        ]);
        let revs: Vec<&str> = revisions.split_whitespace().collect();
        if revs.len() == 2 && revs.iter().all(|r| *r != old) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no convergence: {pods:?} at {revs:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // Converged: two groups of distinct indices, one service per group plus the endpoint, and
    // nothing of the old revision left.
    let pods = plane.pods_of("smollm2");
    let groups: std::collections::BTreeSet<String> = pods
        .iter()
        .map(|p| p.rsplit_once('-').unwrap().0.to_owned())
        .collect();
    assert_eq!(groups.len(), 2, "{pods:?}");
    let svcs = plane.eventually(
        "old group services gone",
        &[
            "get",
            "svc",
            "-l",
            "llmo.dev/deployment=smollm2",
            "-o",
            "jsonpath={.items[*].metadata.name}",
        ],
        |t| t.split_whitespace().count() == 3,
    );
    assert!(!svcs.contains(&old), "{svcs}");
    plane.eventually(
        "status settled",
        &[
            "get",
            "md",
            "smollm2",
            "-o",
            "jsonpath={.status.updatedReplicas}/{.status.readyReplicas}",
        ],
        |t| t == "2/2",
    );
    drop(operator);
}
