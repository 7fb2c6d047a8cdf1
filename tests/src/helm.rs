//! Helm and ServiceAccount credentials for tests: install the chart on a test control plane,
//! and run llmo's binaries with exactly the rights the chart grants them.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::OnceLock,
};

use crate::{
    cluster::{ControlPlane, KillOnDrop},
    repo_root, workspace_binary,
};

/// The helm binary, installed once by `scripts/helm.sh` (cached under ~/.cache/llmo/helm).
pub fn helm_binary() -> PathBuf {
    static HELM: OnceLock<PathBuf> = OnceLock::new();
    HELM.get_or_init(|| {
        let out = Command::new("bash")
            .arg(repo_root().join("scripts/helm.sh"))
            .stderr(Stdio::inherit())
            .output()
            .expect("bash runs scripts/helm.sh");
        assert!(out.status.success(), "scripts/helm.sh failed");
        let path = String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or_default()
            .trim()
            .to_owned();
        assert!(
            Path::new(&path).exists(),
            "scripts/helm.sh printed {path:?}, which does not exist"
        );
        PathBuf::from(path)
    })
    .clone()
}

impl ControlPlane {
    /// Runs `helm ARGS` against this control plane; panics with its output when it fails.
    ///
    /// An `install` whose post-install hook (the GPUClasses) meets Helm's discovery cache before
    /// the chart's CRDs are served ("no matches for kind … ensure CRDs are installed first", seen
    /// on a loaded machine) is completed as a user would: once the CRDs are established, the same
    /// release again with `upgrade --install`, which reruns the hook.
    pub fn helm(&self, args: &[&str]) -> String {
        let (ok, text) = self.try_helm(args);
        if !ok && args.first() == Some(&"install") && text.contains("ensure CRDs are installed") {
            self.wait_for_crds();
            let again: Vec<&str> = ["upgrade", "--install"]
                .into_iter()
                .chain(args[1..].iter().copied())
                .collect();
            let (ok, retried) = self.try_helm(&again);
            assert!(ok, "helm {again:?} after {text}: {retried}");
            return retried;
        }
        assert!(ok, "helm {args:?}: {text}");
        text
    }

    fn try_helm(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new(helm_binary())
            .args(args)
            .env("KUBECONFIG", self.kubeconfig())
            .env("HELM_CACHE_HOME", self.state_dir().join("helm/cache"))
            .env("HELM_CONFIG_HOME", self.state_dir().join("helm/config"))
            .env("HELM_DATA_HOME", self.state_dir().join("helm/data"))
            .current_dir(repo_root())
            .output()
            .expect("helm runs");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    /// The control plane's state directory (kubeconfig, logs).
    pub fn state_dir(&self) -> PathBuf {
        self.kubeconfig()
            .parent()
            .expect("the kubeconfig sits in the state directory")
            .to_path_buf()
    }

    /// A kubeconfig that authenticates as ServiceAccount `namespace/name` with its token (the
    /// token Secret the 1.20 token controller creates), and nothing else.
    pub fn service_account_kubeconfig(&self, namespace: &str, name: &str) -> PathBuf {
        let secret = self.eventually(
            "the service account's token secret",
            &[
                "-n",
                namespace,
                "get",
                "serviceaccount",
                name,
                "-o",
                "jsonpath={.secrets[0].name}",
            ],
            |t| !t.trim().is_empty(),
        );
        let token_b64 = self.eventually(
            "the token",
            &[
                "-n",
                namespace,
                "get",
                "secret",
                secret.trim(),
                "-o",
                "jsonpath={.data.token}",
            ],
            |t| !t.trim().is_empty(),
        );
        let token = base64_decode(token_b64.trim());
        let server = self.ok(&[
            "config",
            "view",
            "--minify",
            "-o",
            "jsonpath={.clusters[0].cluster.server}",
        ]);
        let config = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: llmo\n  cluster: {{server: \"{server}\", insecure-skip-tls-verify: true}}\nusers:\n- name: {name}\n  user: {{token: \"{token}\"}}\ncontexts:\n- name: sa\n  context: {{cluster: llmo, user: {name}, namespace: {namespace}}}\ncurrent-context: sa\n"
        );
        let path = self
            .state_dir()
            .join(format!("kubeconfig-{namespace}-{name}"));
        std::fs::write(&path, config).expect("the state directory is writable");
        path
    }

    /// Starts `llmo-operator ARGS` with `kubeconfig`; its log goes to `<state>/<log>.log`.
    pub fn spawn_operator_as(&self, kubeconfig: &Path, log: &str, args: &[&str]) -> KillOnDrop {
        // Named like `spawn_operator`'s logs, so a failure message shows them too.
        let log_path = self.state_dir().join(format!("operator-{log}.log"));
        let file = std::fs::File::create(&log_path).expect("a log file");
        KillOnDrop(
            Command::new(workspace_binary("llmo-operator"))
                .args(args)
                .env("KUBECONFIG", kubeconfig)
                .env("RUST_LOG", "info")
                .current_dir(repo_root())
                // The log goes to stdout (as pod logs expect); panics go to stderr.
                .stdout(file.try_clone().expect("the log file can be shared"))
                .stderr(file)
                .spawn()
                .expect("llmo-operator starts"),
        )
    }
}

/// Decodes standard base64 (what Secrets hold).
fn base64_decode(text: &str) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut bits = 0u32;
    let mut n = 0;
    let mut out = Vec::new();
    for c in text.bytes().filter(|c| *c != b'=') {
        let v = ALPHABET
            .iter()
            .position(|a| *a == c)
            .unwrap_or_else(|| panic!("not base64: {text}")) as u32;
        bits = (bits << 6) | v;
        n += 6;
        if n >= 8 {
            n -= 8;
            out.push((bits >> n) as u8);
            bits &= (1 << n) - 1;
        }
    }
    String::from_utf8(out).expect("a token is text")
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_round_trip() {
        assert_eq!(super::base64_decode("aGVsbG8gd29ybGQ="), "hello world");
        assert_eq!(super::base64_decode("YWI="), "ab");
    }
}
