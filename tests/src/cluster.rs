//! A real control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler v1.20.2)
//! for tests, started by `scripts/cluster.sh` in a private directory on free loopback ports, and
//! stopped when the guard is dropped, also when a test fails.

use std::{
    net::TcpListener,
    path::PathBuf,
    process::{Command, Output},
};

use crate::repo_root;

/// A running control plane; dropped, it stops every process and removes its files.
#[derive(Debug)]
pub struct ControlPlane {
    dir: tempfile::TempDir,
    kubeconfig: PathBuf,
    api_port: u16,
    etcd_port: u16,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
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
