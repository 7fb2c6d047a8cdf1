//! A real control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler v1.20.2)
//! for tests, started by `scripts/cluster.sh` in a private directory on free loopback ports, and
//! stopped when the guard is dropped, also when a test fails.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use crate::{net::free_port, repo_root, workspace_binary};

/// A child process killed (and reaped) when the guard is dropped, also when a test fails.
#[derive(Debug)]
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A running control plane; dropped, it stops every process and removes its files.
#[derive(Debug)]
pub struct ControlPlane {
    dir: tempfile::TempDir,
    kubeconfig: PathBuf,
    api_port: u16,
    etcd_port: u16,
}

impl ControlPlane {
    /// Starts one. Panics with the script's output when it cannot: the binaries come from
    /// `scripts/k8s-build.sh` (`make k8s`), which `make test` runs first.
    pub fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("llmo-cluster-")
            .tempdir()
            .expect("a temporary directory");
        let plane = Self {
            kubeconfig: dir.path().join("state/kubeconfig"),
            dir,
            api_port: free_port(),
            // etcd takes this port and the next one.
            etcd_port: free_port(),
        };
        let out = plane.script("up");
        assert!(
            out.status.success(),
            "scripts/cluster.sh up failed (run `make k8s` to build the control plane first):\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        plane
    }

    fn script(&self, verb: &str) -> Output {
        Command::new("bash")
            .arg(repo_root().join("scripts/cluster.sh"))
            .arg(verb)
            .env("LLMO_CLUSTER_DIR", self.dir.path().join("state"))
            .env("LLMO_API_PORT", self.api_port.to_string())
            .env("LLMO_ETCD_PORT", self.etcd_port.to_string())
            .output()
            .expect("bash runs")
    }

    /// Path of an admin kubeconfig.
    pub fn kubeconfig(&self) -> &std::path::Path {
        &self.kubeconfig
    }

    /// Runs kubectl against this control plane from the repository root.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        Command::new("kubectl")
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .current_dir(repo_root())
            .output()
            .expect("kubectl runs (it ships with the machine image)")
    }

    /// Runs kubectl and returns whether it succeeded with its stdout and stderr.
    pub fn try_kubectl(&self, args: &[&str]) -> (bool, String) {
        let out = self.kubectl(args);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    /// Runs kubectl, panicking with its output when it fails.
    pub fn ok(&self, args: &[&str]) -> String {
        let (success, text) = self.try_kubectl(args);
        assert!(success, "kubectl {args:?}: {text}");
        text
    }

    /// Polls kubectl until `want` accepts its output (45 s at most), and returns that output.
    pub fn eventually(&self, what: &str, args: &[&str], want: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(45);
        loop {
            let (_, text) = self.try_kubectl(args);
            if want(&text) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; last: {text}{}",
                self.operator_logs()
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// Installs the CRDs (the variant a v1.20 server accepts) and waits until they are served.
    pub fn install_crds(&self) {
        self.ok(&["apply", "-f", "crds/without-cel/"]);
        self.wait_for_crds();
    }

    /// Waits until every CRD on the server is established (served), at most 60 s.
    pub fn wait_for_crds(&self) {
        self.ok(&[
            "wait",
            "--for",
            "condition=established",
            "crd",
            "--all",
            "--timeout",
            "60s",
        ]);
    }

    /// Registers a Node object (no kubelet behind it) with these labels.
    pub fn add_node(&self, name: &str, labels: &[(&str, &str)]) {
        let labels: serde_json::Map<String, serde_json::Value> = [("kubernetes.io/hostname", name)]
            .iter()
            .chain(labels)
            .map(|(k, v)| ((*k).to_owned(), serde_json::Value::from(*v)))
            .collect();
        let node = serde_json::json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}});
        let path = self.dir.path().join(format!("node-{name}.json"));
        std::fs::write(&path, node.to_string()).expect("the state directory is writable");
        self.ok(&[
            "apply",
            "-f",
            path.to_str().expect("a UTF-8 temporary path"),
        ]);
    }

    /// The CRDs, the default GPU classes, and GPU-less nodes `names`, each with a node agent that
    /// reports it as the `cpu` class (no NVML here); returns once every GPUNode says so. The
    /// agents stop when the guards drop.
    pub fn cpu_nodes_with_agents(&self, names: &[&str]) -> Vec<KillOnDrop> {
        self.install_crds();
        self.ok(&["apply", "-f", "examples/gpuclasses.yaml"]);
        let agents = names
            .iter()
            .map(|n| {
                self.add_node(n, &[]);
                self.spawn_operator(&[
                    "agent",
                    "--node-name",
                    n,
                    "--cpu-class",
                    "cpu",
                    "--interval",
                    "1s",
                ])
            })
            .collect();
        let want = vec!["cpu"; names.len()].join(" ");
        self.eventually(
            "a GPUNode from every agent",
            &[
                "get",
                "gpunodes",
                "-o",
                "jsonpath={.items[*].status.gpuClass}",
            ],
            |t| t == want,
        );
        agents
    }

    /// Starts `llmo-operator ARGS` against this control plane; it stops when the guard drops.
    /// Its log (info level) goes to a file of this control plane's directory, and a timed-out
    /// [`Self::eventually`] shows the end of it.
    pub fn spawn_operator(&self, args: &[&str]) -> KillOnDrop {
        static COUNT: AtomicUsize = AtomicUsize::new(0);
        let log = self.dir.path().join(format!(
            "operator-{}.log",
            COUNT.fetch_add(1, Ordering::Relaxed)
        ));
        let file = std::fs::File::create(&log).expect("the state directory is writable");
        KillOnDrop(
            Command::new(workspace_binary("llmo-operator"))
                .args(args)
                .env("KUBECONFIG", &self.kubeconfig)
                .env("RUST_LOG", "info")
                .current_dir(repo_root())
                // The log goes to stdout (as pod logs expect); panics go to stderr.
                .stdout(file.try_clone().expect("the log file can be shared"))
                .stderr(file)
                .spawn()
                .expect("llmo-operator starts"),
        )
    }

    /// The last lines of every operator log of this control plane, for a failure message.
    pub fn operator_logs(&self) -> String {
        // `spawn_operator` logs beside the control plane, `spawn_operator_as` in its state dir.
        let mut logs: Vec<PathBuf> = [self.dir.path().to_path_buf(), self.dir.path().join("state")]
            .iter()
            .filter_map(|dir| std::fs::read_dir(dir).ok())
            .flat_map(|d| {
                d.filter_map(|e| e.ok().map(|e| e.path()))
                    .collect::<Vec<_>>()
            })
            .collect();
        logs.retain(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("operator-") && n.ends_with(".log"))
        });
        logs.sort();
        let mut out = String::new();
        for p in logs {
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            out.push_str(&format!(
                "\n--- {} (last {} lines)\n{}",
                p.display(),
                tail.len(),
                tail.join("\n")
            ));
        }
        out
    }

    /// Applies a YAML manifest (written to a file of this control plane's directory).
    pub fn apply_yaml(&self, yaml: &str) -> String {
        static COUNT: AtomicUsize = AtomicUsize::new(0);
        let path = self.dir.path().join(format!(
            "manifest-{}.yaml",
            COUNT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, yaml).expect("the state directory is writable");
        self.ok(&[
            "apply",
            "-f",
            path.to_str().expect("a UTF-8 temporary path"),
        ])
    }

    /// Starts `llmo-kubelet` against this control plane for the nodes of `nodes_yaml` (see
    /// `llmo_e2e::kubelet::NodesFile`), with `images` as `--image PREFIX=PATH` flags and `extra`
    /// arguments. Its state (pod directories, logs, `services.json`) goes to `state_dir`, which
    /// also receives `nodes.yaml` and the kubelet's own log, `kubelet.log`. Dropping the guard
    /// kills it, and with it every process it started.
    pub fn spawn_kubelet(
        &self,
        nodes_yaml: &str,
        state_dir: &Path,
        images: &[(&str, &Path)],
        extra: &[&str],
    ) -> KillOnDrop {
        std::fs::create_dir_all(state_dir).expect("the kubelet state directory can be created");
        let nodes = state_dir.join("nodes.yaml");
        std::fs::write(&nodes, nodes_yaml).expect("the kubelet state directory is writable");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(state_dir.join("kubelet.log"))
            .expect("the kubelet log can be opened");
        let mut cmd = Command::new(workspace_binary("llmo-kubelet"));
        cmd.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--nodes")
            .arg(&nodes)
            .arg("--state-dir")
            .arg(state_dir);
        for (prefix, path) in images {
            cmd.arg("--image")
                .arg(format!("{prefix}={}", path.display()));
        }
        KillOnDrop(
            cmd.args(extra)
                .env(
                    "RUST_LOG",
                    std::env::var("LLMO_KUBELET_LOG")
                        .unwrap_or_else(|_| "info,kube_client=error".into()),
                )
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("llmo-kubelet starts"),
        )
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let out = self.script("down");
        if !out.status.success() {
            eprintln!(
                "scripts/cluster.sh down: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}
