//! `llmo-kubelet` against a real Kubernetes v1.20.2 control plane: Nodes, pods bound by the real
//! scheduler running as local processes (`llmo-testserver`), probes, restarts, deletion,
//! Services through the proxy, ServiceAccount credentials, and no process outliving the kubelet.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use llmo_e2e::cluster::{ControlPlane, KillOnDrop};

const IMAGE: &str = "example.com/llmo/testserver";

fn testserver() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_llmo-testserver"))
}

/// A control plane, a kubelet and its state directory. Dropped (also when a test fails), it
/// kills the kubelet and any process of the test that is left, and shows the kubelet's log when
/// the test failed.
struct Fixture {
    kubelet: Option<KillOnDrop>,
    tag: String,
    state: tempfile::TempDir,
    plane: ControlPlane,
    nodes: String,
}

impl Fixture {
    fn start(tag: &str, nodes: &str) -> Self {
        let plane = ControlPlane::start();
        let state = tempfile::Builder::new()
            .prefix("llmo-kubelet-test-")
            .tempdir()
            .expect("a temporary directory");
        let mut fixture = Self {
            kubelet: None,
            tag: format!("{tag}-{}", std::process::id()),
            state,
            plane,
            nodes: nodes.to_owned(),
        };
        fixture.start_kubelet();
        fixture
    }

    fn start_kubelet(&mut self) {
        let bin = testserver();
        self.kubelet = Some(self.plane.spawn_kubelet(
            &self.nodes,
            self.state.path(),
            &[(IMAGE, bin.as_path())],
            &["--shutdown-grace-seconds", "10"],
        ));
    }

    fn state_dir(&self) -> PathBuf {
        std::fs::canonicalize(self.state.path()).expect("the state directory exists")
    }

    /// A pod tag: every process of this test carries `--tag <tag>-<pod>`.
    fn tag(&self, pod: &str) -> String {
        format!("{}-{pod}", self.tag)
    }

    fn get(&self, what: &str, jsonpath: &str) -> String {
        let (_, text) =
            self.plane
                .try_kubectl(&["get", what, "-o", &format!("jsonpath={jsonpath}")]);
        text
    }

    fn pod_field(&self, pod: &str, jsonpath: &str) -> String {
        self.get(&format!("pod/{pod}"), jsonpath)
    }

    fn condition(&self, pod: &str, type_: &str) -> String {
        self.pod_field(
            pod,
            &format!("{{.status.conditions[?(@.type==\"{type_}\")].status}}"),
        )
    }

    fn wait_ready(&self, pod: &str) -> String {
        self.plane.eventually(
            &format!("pod {pod} Running and Ready"),
            &[
                "get",
                "pod",
                pod,
                "-o",
                "jsonpath={.status.phase}/{.status.conditions[?(@.type==\"Ready\")].status}/{.status.podIP}",
            ],
            |t| t.starts_with("Running/True/127."),
        );
        self.pod_field(pod, "{.status.podIP}")
    }

    fn log(&self, pod: &str, container: &str) -> String {
        std::fs::read_to_string(
            self.state
                .path()
                .join(format!("logs/default_{pod}_{container}.log")),
        )
        .unwrap_or_default()
    }

    /// The testserver pod manifest.
    fn pod(&self, name: &str, extra_args: &[&str], spec_extra: &str) -> String {
        let mut args = vec!["--listen", "0.0.0.0:8080", "--tag"];
        let tag = self.tag(name);
        args.push(&tag);
        args.extend_from_slice(extra_args);
        let args: Vec<String> = args.iter().map(|a| format!("{a:?}")).collect();
        format!(
            r#"apiVersion: v1
kind: Pod
metadata: {{name: {name}, labels: {{test: kubelet}}}}
spec:
  terminationGracePeriodSeconds: 10
{spec_extra}
  containers:
  - name: main
    image: {IMAGE}:1
    args: [{}]
    ports: [{{name: http, containerPort: 8080}}]
    readinessProbe: {{httpGet: {{path: /ready, port: http}}, periodSeconds: 1}}
"#,
            args.join(", ")
        )
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log =
                std::fs::read_to_string(self.state.path().join("kubelet.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(80).collect();
            eprintln!("---- llmo-kubelet log (last lines) ----");
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
        drop(self.kubelet.take());
        for pid in pids_with(&self.tag) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Processes whose command line contains `needle`.
fn pids_with(needle: &str) -> Vec<i32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        // A zombie has an empty command line; it is no longer running.
        if String::from_utf8_lossy(&cmdline).contains(needle) {
            pids.push(pid);
        }
    }
    pids
}

/// `GET path` on `addr`: status code and body.
fn http_get(addr: &str, path: &str) -> Result<(u16, String), String> {
    llmo_e2e::net::http(addr, "GET", path, "", Duration::from_secs(3))
}

fn body(addr: &str, path: &str) -> String {
    match http_get(addr, path) {
        Ok((200, body)) => body,
        other => panic!("GET http://{addr}{path}: {other:?}"),
    }
}

/// Polls `check` until it returns `Some` (30 s at most).
fn until<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn pod_dir(fixture: &Fixture, pod: &str) -> PathBuf {
    let uid = fixture.pod_field(pod, "{.metadata.uid}");
    fixture
        .state_dir()
        .join(format!("pods/default_{pod}_{uid}"))
}

#[test]
fn nodes_register_and_pods_run_as_processes() {
    let f = Fixture::start(
        "run",
        "nodes:\n\
         - {name: gpu-l4-a, gpus: 4, product: NVIDIA-L4, memoryMiB: 23034, zone: zone-a, cpu: '16', memory: 64Gi}\n\
         - {name: cpu-a, cpu: '8', memory: 32Gi}\n",
    );
    let plane = &f.plane;

    // Nodes: Ready, GPU capacity and feature-discovery labels.
    plane.eventually(
        "both nodes Ready",
        &["get", "nodes", "-o", "jsonpath={range .items[*]}{.metadata.name}={.status.conditions[?(@.type==\"Ready\")].status} {end}"],
        |t| t.contains("gpu-l4-a=True") && t.contains("cpu-a=True"),
    );
    let gpu = |path: &str| f.get("node/gpu-l4-a", path);
    assert_eq!(gpu("{.status.capacity.nvidia\\.com/gpu}"), "4");
    assert_eq!(gpu("{.status.allocatable.nvidia\\.com/gpu}"), "4");
    assert_eq!(
        gpu("{.status.capacity.cpu}/{.status.capacity.memory}/{.status.capacity.pods}"),
        "16/64Gi/110"
    );
    assert_eq!(
        gpu("{.metadata.labels.nvidia\\.com/gpu\\.product}/{.metadata.labels.nvidia\\.com/gpu\\.count}/{.metadata.labels.nvidia\\.com/gpu\\.memory}/{.metadata.labels.nvidia\\.com/gpu\\.present}"),
        "NVIDIA-L4/4/23034/true"
    );
    assert_eq!(
        gpu("{.metadata.labels.topology\\.kubernetes\\.io/zone}"),
        "zone-a"
    );
    assert_eq!(
        gpu("{.metadata.labels.kubernetes\\.io/hostname}"),
        "gpu-l4-a"
    );
    assert_eq!(
        f.get("node/cpu-a", "{.status.capacity.nvidia\\.com/gpu}"),
        ""
    );
    let node_ip = gpu("{.status.addresses[?(@.type==\"InternalIP\")].address}");
    assert!(node_ip.starts_with("127."), "{node_ip}");

    // Pods whose restarts are checked at the end start first, to overlap their waits.
    // A crashing container under Always; two under Never; one failing its liveness probe.
    plane.apply_yaml(&f.pod(
        "crashy",
        &["--exit-after-ms", "300", "--exit-code", "3"],
        "",
    ));
    for (name, code) in [("once-ok", "0"), ("once-bad", "4")] {
        plane.apply_yaml(&f.pod(
            name,
            &["--exit-after-ms", "200", "--exit-code", code],
            "  restartPolicy: Never",
        ));
    }
    plane.apply_yaml(&f.pod("unlive", &[], "").replace(
        "    readinessProbe:",
        "    livenessProbe: {httpGet: {path: /missing, port: http}, periodSeconds: 1, failureThreshold: 2}\n    readinessProbe:",
    ));

    // A pod that needs a GPU: the scheduler binds it to the GPU node, the kubelet runs it.
    plane.apply_yaml("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: settings}\ndata: {greeting: hello from a configmap}\n");
    plane.apply_yaml(
        "apiVersion: v1\nkind: Secret\nmetadata: {name: creds}\nstringData: {password: s3cret}\n",
    );
    // An init container runs to completion first.
    let init = format!(
        "  initContainers:\n  - {{name: init, image: {IMAGE}:1, args: [--listen, 0.0.0.0:8081, --exit-after-ms, '100', --exit-code, '0', --tag, {}]}}",
        f.tag("web")
    );
    let web = f.pod(
        "web",
        &["--name", "$(GREETING)", "--data=/data/sub", "/etc/settings/greeting"],
        &init,
    )
    .replace(
        "    ports:",
        r#"    env:
    - {name: MY_POD, valueFrom: {fieldRef: {fieldPath: metadata.name}}}
    - {name: MY_NODE, valueFrom: {fieldRef: {fieldPath: spec.nodeName}}}
    - {name: MY_IP, valueFrom: {fieldRef: {fieldPath: status.podIP}}}
    - {name: GREETING, value: "hello $(MY_POD) on $(MY_NODE)"}
    - {name: FROM_CM, valueFrom: {configMapKeyRef: {name: settings, key: greeting}}}
    - {name: FROM_SECRET, valueFrom: {secretKeyRef: {name: creds, key: password}}}
    - {name: LISTEN, value: "0.0.0.0:8080"}
    - {name: DATA, value: /data}
    resources: {limits: {nvidia.com/gpu: 1}}
    volumeMounts: [{name: data, mountPath: /data}, {name: settings, mountPath: /etc/settings}]
    ports:"#,
    ) + "  volumes: [{name: data, emptyDir: {}}, {name: settings, configMap: {name: settings}}]\n";
    plane.apply_yaml(&web);
    let ip = f.wait_ready("web");
    assert_eq!(f.pod_field("web", "{.spec.nodeName}"), "gpu-l4-a");
    assert_eq!(f.pod_field("web", "{.status.hostIP}"), node_ip);
    assert_ne!(ip, node_ip);
    assert_eq!(f.pod_field("web", "{.status.podIPs[0].ip}"), ip);
    let id = f.pod_field("web", "{.status.containerStatuses[0].containerID}");
    assert!(id.starts_with("process://"), "{id}");
    assert_eq!(
        f.pod_field("web", "{.status.containerStatuses[0].ready}/{.status.containerStatuses[0].restartCount}/{.status.containerStatuses[0].image}"),
        format!("true/0/{IMAGE}:1")
    );
    assert_eq!(
        f.pod_field("web", "{.status.initContainerStatuses[0].state.terminated.reason}/{.status.initContainerStatuses[0].state.terminated.exitCode}"),
        "Completed/0"
    );
    for cond in ["PodScheduled", "Initialized", "ContainersReady", "Ready"] {
        assert_eq!(f.condition("web", cond), "True", "{cond}");
    }

    // Environment: fieldRef, $(VAR), ConfigMap keys, and the two rewriting rules.
    let addr = format!("{ip}:8080");
    let env = |name: &str| body(&addr, &format!("/env?name={name}"));
    let dir = pod_dir(&f, "web");
    assert_eq!(env("MY_POD"), "web");
    assert_eq!(env("MY_NODE"), "gpu-l4-a");
    assert_eq!(env("MY_IP"), ip);
    assert_eq!(env("POD_IP"), ip);
    assert_eq!(env("GREETING"), "hello web on gpu-l4-a");
    assert_eq!(env("FROM_CM"), "hello from a configmap");
    assert_eq!(env("FROM_SECRET"), "s3cret");
    assert_eq!(env("LISTEN"), format!("{ip}:8080"));
    assert_eq!(env("DATA"), dir.join("volumes/data").display().to_string());
    assert_eq!(env("HOME"), dir.join("home").display().to_string());
    assert_eq!(body(&addr, "/cwd"), dir.display().to_string());
    assert_eq!(body(&addr, "/"), "hello web on gpu-l4-a");
    let args: Vec<String> = body(&addr, "/args").lines().map(str::to_owned).collect();
    let settings_file = dir.join("volumes/settings/greeting").display().to_string();
    assert_eq!(
        args,
        [
            "--listen".to_owned(),
            format!("{ip}:8080"),
            "--tag".to_owned(),
            f.tag("web"),
            "--name".to_owned(),
            "hello web on gpu-l4-a".to_owned(),
            format!("--data={}", dir.join("volumes/data/sub").display()),
            settings_file.clone(),
        ]
    );
    assert_eq!(
        body(&addr, &format!("/file?path={settings_file}")),
        "hello from a configmap"
    );
    // The admin credentials of the kubelet do not leak into pods.
    assert!(!body(&addr, "/env").contains("llmo-admin-token"));

    // Unknown image: the pod says why it cannot run (Pending, as with an image that cannot be
    // pulled, so that controllers do not replace it in a loop).
    plane.apply_yaml(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: ghost}\nspec:\n  nodeName: cpu-a\n  containers: [{name: main, image: example.com/unknown:1}]\n",
    );
    let waiting = plane.eventually(
        "the unmapped pod's reason",
        &["get", "pod", "ghost", "-o", "jsonpath={.status.phase}/{.status.containerStatuses[0].state.waiting.reason}: {.status.containerStatuses[0].state.waiting.message}"],
        |t| t.contains("ErrImageNotMapped"),
    );
    assert_eq!(
        waiting,
        format!("Pending/ErrImageNotMapped: image example.com/unknown:1 is not mapped to a local binary; mapped: {IMAGE}; start llmo-kubelet with --image PREFIX=PATH")
    );
    assert_eq!(
        f.pod_field("ghost", "{.status.conditions[?(@.type==\"Ready\")].reason}"),
        "ContainersNotReady"
    );

    // Readiness gates Ready: running, probed and failing, not ready; then ready.
    plane.apply_yaml(&f.pod(
        "gated",
        &["--not-ready"],
        "  nodeSelector: {kubernetes.io/hostname: cpu-a}",
    ));
    plane.eventually(
        "gated Running",
        &["get", "pod", "gated", "-o", "jsonpath={.status.phase}"],
        |t| t == "Running",
    );
    until("three failed readiness probes", || {
        (f.log("gated", "main")
            .matches("request GET /ready\n")
            .count()
            >= 3)
            .then_some(())
    });
    assert_eq!(f.condition("gated", "Ready"), "False");
    assert_eq!(
        f.pod_field("gated", "{.status.containerStatuses[0].ready}"),
        "false"
    );
    let gated_ip = f.pod_field("gated", "{.status.podIP}");
    assert_eq!(
        body(&format!("{gated_ip}:8080"), "/ready/set?value=true"),
        "true"
    );
    f.wait_ready("gated");

    // The crashing container restarted under Always, its runs appended to one log.
    plane.eventually(
        "crashy restarted twice",
        &[
            "get",
            "pod",
            "crashy",
            "-o",
            "jsonpath={.status.containerStatuses[0].restartCount}",
        ],
        |t| t.parse::<u32>().is_ok_and(|n| n >= 2),
    );
    assert_eq!(
        f.pod_field("crashy", "{.status.containerStatuses[0].lastState.terminated.exitCode}/{.status.containerStatuses[0].lastState.terminated.reason}"),
        "3/Error"
    );
    assert!(f.log("crashy", "main").matches("==== llmo-kubelet").count() >= 3);

    // restartPolicy Never: exit 0 is Succeeded, exit 4 is Failed.
    for (name, code, phase) in [("once-ok", "0", "Succeeded"), ("once-bad", "4", "Failed")] {
        plane.eventually(
            &format!("{name} {phase}"),
            &[
                "get",
                "pod",
                name,
                "-o",
                "jsonpath={.status.phase}/{.status.containerStatuses[0].state.terminated.exitCode}",
            ],
            |t| t == format!("{phase}/{code}"),
        );
        assert_eq!(
            f.pod_field(name, "{.status.containerStatuses[0].restartCount}"),
            "0"
        );
    }

    // A failing liveness probe restarts the container.
    plane.eventually(
        "unlive restarted",
        &[
            "get",
            "pod",
            "unlive",
            "-o",
            "jsonpath={.status.containerStatuses[0].restartCount}",
        ],
        |t| t.parse::<u32>().is_ok_and(|n| n >= 1),
    );
    assert_eq!(
        f.pod_field(
            "unlive",
            "{.status.containerStatuses[0].lastState.terminated.message}"
        ),
        "Liveness probe failed: HTTP probe failed with statuscode: 404"
    );
    assert!(f.log("unlive", "main").contains("received SIGTERM"));
}

#[test]
fn services_deletion_and_service_account_credentials() {
    let f = Fixture::start("svc", "nodes:\n- {name: cpu-a}\n");
    let plane = &f.plane;
    for name in ["echo-a", "echo-b"] {
        plane.apply_yaml(
            &f.pod(name, &["--name", name, "--term-delay-ms", "300"], "")
                .replace(
                    "labels: {test: kubelet}",
                    "labels: {test: kubelet, app: echo}",
                ),
        );
    }
    plane.apply_yaml(
        "apiVersion: v1\nkind: Service\nmetadata: {name: echo}\nspec:\n  selector: {app: echo}\n  ports: [{name: web, port: 80, targetPort: http}]\n",
    );
    let ip_a = f.wait_ready("echo-a");
    let ip_b = f.wait_ready("echo-b");
    assert_ne!(ip_a, ip_b);

    // The proxy publishes its address, and spreads connections over the ready pods.
    let proxy = plane.eventually(
        "the local address annotation",
        &[
            "get",
            "svc",
            "echo",
            "-o",
            "jsonpath={.metadata.annotations.llmo\\.dev/local-address}",
        ],
        |t| t.starts_with("127.0.0.1:"),
    );
    assert_eq!(
        f.get(
            "svc/echo",
            "{.metadata.annotations.llmo\\.dev/local-address\\.web}"
        ),
        proxy
    );
    let published: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(f.state.path().join("services.json")).expect("services.json"),
    )
    .expect("services.json is JSON");
    assert_eq!(published["default/echo"]["web"], proxy.as_str());
    until("answers from both pods through the proxy", || {
        let seen: Vec<String> = (0..6)
            .filter_map(|_| http_get(&proxy, "/").ok())
            .map(|(_, b)| b)
            .collect();
        (seen.iter().any(|b| b == "echo-a") && seen.iter().any(|b| b == "echo-b")).then_some(())
    });

    // A pod that is no longer ready leaves the endpoints, and the proxy stops using it.
    body(&format!("{ip_b}:8080"), "/ready/set?value=false");
    plane.eventually(
        "echo-b not ready",
        &[
            "get",
            "pod",
            "echo-b",
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
        ],
        |t| t == "False",
    );
    until("only echo-a answering", || {
        (0..6)
            .all(|_| http_get(&proxy, "/").is_ok_and(|(_, b)| b == "echo-a"))
            .then_some(())
    });

    // Deletion: SIGTERM, the process exits within its grace period, the object goes away.
    let pid: i32 = f
        .pod_field("echo-a", "{.status.containerStatuses[0].containerID}")
        .trim_start_matches("process://")
        .parse()
        .expect("a process id");
    assert_eq!(pids_with(&f.tag("echo-a")), vec![pid]);
    plane.ok(&["delete", "pod", "echo-a", "--wait=false"]);
    plane.eventually(
        "echo-a gone",
        &["get", "pod", "echo-a", "-o", "name"],
        |t| t.contains("NotFound"),
    );
    let log = f.log("echo-a", "main");
    assert!(
        log.contains("received SIGTERM\nexiting after SIGTERM"),
        "{log}"
    );
    assert!(pids_with(&f.tag("echo-a")).is_empty());
    // No ready endpoint left: connections are closed without an answer.
    until("the proxy refusing", || {
        http_get(&proxy, "/").is_err().then_some(())
    });

    // A pod of a ServiceAccount gets a kubeconfig with that ServiceAccount's token.
    plane.ok(&["create", "serviceaccount", "robot"]);
    let secret = plane.eventually(
        "the token Secret of robot",
        &[
            "get",
            "serviceaccount",
            "robot",
            "-o",
            "jsonpath={.secrets[0].name}",
        ],
        |t| t.starts_with("robot-token-"),
    );
    let sa_pod = f.pod("sa-pod", &[], "  serviceAccountName: robot");
    // The ServiceAccount admission plugin may refuse the pod until the token exists.
    until("sa-pod created", || {
        let path = f.state.path().join("sa-pod.yaml");
        std::fs::write(&path, &sa_pod).expect("writable");
        plane
            .try_kubectl(&["apply", "-f", path.to_str().expect("UTF-8")])
            .0
            .then_some(())
    });
    let ip = f.wait_ready("sa-pod");
    let kubeconfig = body(&format!("{ip}:8080"), "/env?name=KUBECONFIG");
    assert_eq!(
        kubeconfig,
        pod_dir(&f, "sa-pod")
            .join("kubeconfig")
            .display()
            .to_string()
    );
    let config: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(&kubeconfig).expect("the pod kubeconfig"))
            .expect("YAML");
    let token = config["users"][0]["user"]["token"]
        .as_str()
        .expect("a token")
        .to_owned();
    let expected = plane.ok(&[
        "get",
        "secret",
        &secret,
        "-o",
        "go-template={{.data.token | base64decode}}",
    ]);
    assert_eq!(token, expected);
    // With it, the pod has the ServiceAccount's rights (none), not the kubelet's.
    let can = |config: &str| {
        let out = std::process::Command::new("kubectl")
            .args(["--kubeconfig", config, "auth", "can-i", "list", "pods"])
            .output()
            .expect("kubectl runs");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!(can(&kubeconfig), "no");
    assert_eq!(can(plane.kubeconfig().to_str().expect("UTF-8")), "yes");

    // No token mounted: no kubeconfig.
    plane.apply_yaml(&f.pod("no-sa", &[], "  automountServiceAccountToken: false"));
    let ip = f.wait_ready("no-sa");
    assert_eq!(
        http_get(&format!("{ip}:8080"), "/env?name=KUBECONFIG").map(|r| r.0),
        Ok(404)
    );

    // A pod object removed at once (force deletion): its process is stopped all the same.
    assert_eq!(pids_with(&f.tag("no-sa")).len(), 1);
    plane.ok(&["delete", "pod", "no-sa", "--grace-period=0", "--force"]);
    until("no-sa's process gone", || {
        pids_with(&f.tag("no-sa")).is_empty().then_some(())
    });
    assert!(f.log("no-sa", "main").contains("received SIGTERM"));
}

#[test]
fn kubelet_restarts_pods_and_leaves_no_process_behind() {
    let mut f = Fixture::start("life", "nodes:\n- {name: cpu-a}\n");
    f.plane
        .apply_yaml(&f.pod("survivor", &["--term-delay-ms", "200"], ""));
    f.wait_ready("survivor");
    let first = f.pod_field("survivor", "{.status.containerStatuses[0].containerID}");
    assert_eq!(pids_with(&f.tag("survivor")).len(), 1);

    // Killed outright, the kubelet takes its processes with it (parent-death signal).
    drop(f.kubelet.take());
    until("no process left after SIGKILL", || {
        pids_with(&f.tag("survivor")).is_empty().then_some(())
    });

    // A new kubelet restarts the pod it finds running.
    f.start_kubelet();
    f.plane.eventually(
        "survivor restarted",
        &["get", "pod", "survivor", "-o", "jsonpath={.status.containerStatuses[0].containerID}/{.status.containerStatuses[0].restartCount}/{.status.conditions[?(@.type==\"Ready\")].status}"],
        |t| !t.starts_with(&format!("{first}/")) && t.ends_with("/1/True"),
    );
    assert_eq!(pids_with(&f.tag("survivor")).len(), 1);

    // SIGTERM: the pods get SIGTERM, the kubelet exits cleanly, the node is marked not ready.
    let mut kubelet = f.kubelet.take().expect("a kubelet");
    let pid = nix::unistd::Pid::from_raw(i32::try_from(kubelet.0.id()).expect("a pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("signalled");
    let status = until("the kubelet to exit", || {
        kubelet.0.try_wait().expect("waitable")
    });
    assert!(status.success(), "{status:?}");
    assert!(pids_with(&f.tag("survivor")).is_empty());
    let log = f.log("survivor", "main");
    assert!(
        log.contains("received SIGTERM\nexiting after SIGTERM"),
        "{log}"
    );
    assert_eq!(
        f.get("node/cpu-a", "{.status.conditions[?(@.type==\"Ready\")].status}/{.status.conditions[?(@.type==\"Ready\")].reason}"),
        "False/KubeletStopped"
    );
}
