//! Configuration: the simulated nodes (`--nodes FILE`), the image map (`--image PREFIX=PATH`)
//! and everything else the kubelet is started with.

use std::{
    collections::{BTreeMap, HashSet},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use super::KubeletError;

/// The nodes file: `nodes: [{name: gpu-l4-a, gpus: 4, product: NVIDIA-L4, ...}]`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodesFile {
    /// The simulated nodes, each registered as a Node object.
    pub nodes: Vec<NodeSpec>,
}

/// One simulated node.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeSpec {
    /// Node name (and its `kubernetes.io/hostname` label).
    pub name: String,
    /// Number of GPUs: the node's `nvidia.com/gpu` capacity (none when 0).
    #[serde(default)]
    pub gpus: u32,
    /// GPU product as GPU feature discovery writes it (`NVIDIA-L4`); required when `gpus > 0`.
    #[serde(default)]
    pub product: Option<String>,
    /// Memory of one GPU in MiB, for the `nvidia.com/gpu.memory` label.
    #[serde(default, rename = "memoryMiB")]
    pub memory_mib: Option<u64>,
    /// `topology.kubernetes.io/zone`.
    #[serde(default)]
    pub zone: Option<String>,
    /// Whether the GPUs are linked by NVLink (annotation `llmo.dev/nvlink`).
    #[serde(default)]
    pub nvlink: bool,
    /// CPU capacity, a Kubernetes quantity.
    #[serde(default = "default_cpu")]
    pub cpu: String,
    /// Memory capacity, a Kubernetes quantity.
    #[serde(default = "default_memory")]
    pub memory: String,
    /// Most pods the node takes.
    #[serde(default = "default_pods")]
    pub pods: u32,
    /// Further labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

fn default_cpu() -> String {
    "8".to_owned()
}

fn default_memory() -> String {
    "32Gi".to_owned()
}

fn default_pods() -> u32 {
    110
}

impl NodesFile {
    /// Reads and checks a nodes file.
    pub fn read(path: &Path) -> Result<Self, KubeletError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| KubeletError::io("reading nodes file", path, e))?;
        Self::parse(&text).map_err(|message| KubeletError::NodesFile {
            path: path.to_owned(),
            message,
        })
    }

    /// Parses and checks the YAML of a nodes file; the error names the wrong field.
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: Self = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
        if file.nodes.is_empty() {
            return Err("`nodes` lists no node".to_owned());
        }
        let mut seen = HashSet::new();
        for (i, node) in file.nodes.iter().enumerate() {
            let at = format!("nodes[{i}] ({})", node.name);
            if !is_dns_subdomain(&node.name) {
                return Err(format!(
                    "{at}: name must be lowercase letters, digits, '-' and '.'"
                ));
            }
            if !seen.insert(node.name.as_str()) {
                return Err(format!("{at}: the name is listed twice"));
            }
            if node.gpus > 0 && node.product.as_deref().is_none_or(str::is_empty) {
                return Err(format!(
                    "{at}: `product` is required when gpus > 0 (for example NVIDIA-L4)"
                ));
            }
            if node.pods == 0 {
                return Err(format!("{at}: `pods` must be at least 1"));
            }
        }
        Ok(file)
    }
}

fn is_dns_subdomain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// Which local binary runs which image: `--image PREFIX=PATH`, in order.
///
/// An image matches a prefix when its name without tag or digest equals the prefix or continues
/// it with `/`; a prefix that carries a tag (`repo/name:1.2`) matches that exact reference only.
/// The longest matching prefix wins.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ImageMap {
    entries: Vec<(String, PathBuf)>,
}

/// The binary an image maps to.
#[derive(Clone, Debug, PartialEq)]
pub struct MappedImage {
    /// The prefix that matched.
    pub prefix: String,
    /// The binary.
    pub binary: PathBuf,
}

impl ImageMap {
    /// An image map from `(prefix, binary)` pairs.
    pub fn new(entries: Vec<(String, PathBuf)>) -> Self {
        Self { entries }
    }

    /// Parses one `PREFIX=PATH` flag.
    pub fn parse_flag(flag: &str) -> Result<(String, PathBuf), KubeletError> {
        let (prefix, path) = flag
            .split_once('=')
            .ok_or_else(|| KubeletError::Config(format!("--image {flag}: expected PREFIX=PATH")))?;
        if prefix.is_empty() || path.is_empty() {
            return Err(KubeletError::Config(format!(
                "--image {flag}: expected PREFIX=PATH, both non-empty"
            )));
        }
        Ok((prefix.to_owned(), PathBuf::from(path)))
    }

    /// Checks that every mapped binary exists, and makes its path absolute.
    pub fn checked(self) -> Result<Self, KubeletError> {
        let entries = self
            .entries
            .into_iter()
            .map(|(prefix, path)| {
                let abs = std::fs::canonicalize(&path).map_err(|e| {
                    KubeletError::Config(format!(
                        "--image {prefix}={}: the binary cannot be used: {e}",
                        path.display()
                    ))
                })?;
                if !abs.is_file() {
                    return Err(KubeletError::Config(format!(
                        "--image {prefix}={}: not a file",
                        path.display()
                    )));
                }
                Ok((prefix, abs))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { entries })
    }

    /// The mapped prefixes, for messages.
    pub fn prefixes(&self) -> Vec<&str> {
        self.entries.iter().map(|(p, _)| p.as_str()).collect()
    }

    /// The binary for `image`, or an `ErrImageNotMapped` error that lists what is mapped.
    pub fn resolve(&self, image: &str) -> Result<MappedImage, KubeletError> {
        let name = image_name(image);
        self.entries
            .iter()
            .filter(|(prefix, _)| prefix_matches(prefix, image, name))
            .max_by_key(|(prefix, _)| prefix.len())
            .map(|(prefix, binary)| MappedImage {
                prefix: prefix.clone(),
                binary: binary.clone(),
            })
            .ok_or_else(|| {
                let mapped = self.prefixes();
                KubeletError::pod(
                    "ErrImageNotMapped",
                    format!(
                        "image {image} is not mapped to a local binary; mapped: {}; start llmo-kubelet with --image PREFIX=PATH",
                        if mapped.is_empty() {
                            "nothing".to_owned()
                        } else {
                            mapped.join(", ")
                        }
                    ),
                )
            })
    }
}

/// The image reference without its tag and digest.
pub fn image_name(image: &str) -> &str {
    let image = image.split('@').next().unwrap_or(image);
    let last_slash = image.rfind('/').map_or(0, |i| i + 1);
    match image[last_slash..].find(':') {
        Some(colon) => &image[..last_slash + colon],
        None => image,
    }
}

fn prefix_matches(prefix: &str, image: &str, name: &str) -> bool {
    if image_name(prefix) != prefix {
        // A prefix with a tag or digest names one exact image.
        return prefix == image;
    }
    name == prefix
        || (name.starts_with(prefix)
            && (prefix.ends_with('/') || name[prefix.len()..].starts_with('/')))
}

/// How pods reach the API server: copied from the kubelet's own kubeconfig into each pod's.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ApiServer {
    /// `https://host:port`.
    pub server: String,
    /// Skip TLS verification (as the test harness's kubeconfig does).
    pub insecure_skip_tls_verify: bool,
    /// Base64 PEM of the CA, when the kubeconfig has one inline.
    pub certificate_authority_data: Option<String>,
    /// Path of the CA file, when the kubeconfig names one.
    pub certificate_authority: Option<String>,
}

impl ApiServer {
    /// Host and port of the server URL, for `KUBERNETES_SERVICE_HOST`/`PORT`.
    pub fn host_port(&self) -> Option<(String, u16)> {
        let rest = self
            .server
            .strip_prefix("https://")
            .or_else(|| self.server.strip_prefix("http://"))?;
        let authority = rest.split('/').next()?;
        let default = if self.server.starts_with("https://") {
            443
        } else {
            80
        };
        if let Some(v6) = authority.strip_prefix('[') {
            let (host, rest) = v6.split_once(']')?;
            let port = rest
                .strip_prefix(':')
                .map_or(Some(default), |p| p.parse().ok())?;
            return Some((host.to_owned(), port));
        }
        match authority.rsplit_once(':') {
            Some((host, port)) => Some((host.to_owned(), port.parse().ok()?)),
            None => Some((authority.to_owned(), default)),
        }
    }

    /// Reads the current context's cluster of a kubeconfig.
    pub fn from_kubeconfig(config: &kube::config::Kubeconfig) -> Result<Self, KubeletError> {
        let context_name = config
            .current_context
            .clone()
            .or_else(|| config.contexts.first().map(|c| c.name.clone()))
            .ok_or_else(|| KubeletError::Kubeconfig("no context".to_owned()))?;
        let context = config
            .contexts
            .iter()
            .find(|c| c.name == context_name)
            .and_then(|c| c.context.as_ref())
            .ok_or_else(|| KubeletError::Kubeconfig(format!("context {context_name} not found")))?;
        let cluster = config
            .clusters
            .iter()
            .find(|c| c.name == context.cluster)
            .and_then(|c| c.cluster.as_ref())
            .ok_or_else(|| {
                KubeletError::Kubeconfig(format!("cluster {} not found", context.cluster))
            })?;
        Ok(Self {
            server: cluster
                .server
                .clone()
                .ok_or_else(|| KubeletError::Kubeconfig("the cluster has no server".to_owned()))?,
            insecure_skip_tls_verify: cluster.insecure_skip_tls_verify.unwrap_or(false),
            certificate_authority_data: cluster.certificate_authority_data.clone(),
            certificate_authority: cluster.certificate_authority.clone(),
        })
    }
}

/// Adjusts every process the kubelet starts, just before it is spawned (the binary uses it to
/// set a parent-death signal, which needs `unsafe` code this library does not contain).
pub type SpawnHook = fn(&mut std::process::Command);

/// Everything the kubelet runs with.
#[derive(Clone, Debug)]
pub struct KubeletConfig {
    /// The simulated nodes.
    pub nodes: Vec<NodeSpec>,
    /// Images to binaries.
    pub images: ImageMap,
    /// Pod directories, logs and `services.json` live here.
    pub state_dir: PathBuf,
    /// Where pods reach the API server.
    pub api_server: ApiServer,
    /// First loopback address handed out (to nodes, then pods).
    pub first_address: Ipv4Addr,
    /// Directory of the lock files that keep loopback addresses unique across every kubelet
    /// of this machine.
    pub address_lock_dir: PathBuf,
    /// Interval of Node status heartbeats.
    pub heartbeat: Duration,
    /// Longest wait between restarts of a crashing container.
    pub max_backoff: Duration,
    /// Longest grace period given to pods when the kubelet itself stops.
    pub shutdown_grace: Duration,
    /// Whether to run the Service proxy.
    pub service_proxy: bool,
    /// Whether to delete the Node objects on exit (otherwise they are marked not ready).
    pub delete_nodes_on_exit: bool,
    /// Host environment variables passed to every process (`--pass-env NAME`).
    pub pass_env: Vec<(String, String)>,
    /// Called on every process before it is spawned.
    pub spawn_hook: Option<SpawnHook>,
}

impl KubeletConfig {
    /// A configuration with the defaults of the command line.
    pub fn new(
        nodes: Vec<NodeSpec>,
        images: ImageMap,
        state_dir: PathBuf,
        api_server: ApiServer,
    ) -> Self {
        Self {
            nodes,
            images,
            state_dir,
            api_server,
            first_address: Ipv4Addr::new(127, 0, 0, 10),
            address_lock_dir: default_address_lock_dir(),
            heartbeat: Duration::from_secs(10),
            max_backoff: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(30),
            service_proxy: true,
            delete_nodes_on_exit: false,
            pass_env: Vec::new(),
            spawn_hook: None,
        }
    }
}

/// `$TMPDIR/llmo-kubelet-addresses`, shared by every kubelet of this machine.
pub fn default_address_lock_dir() -> PathBuf {
    std::env::temp_dir().join("llmo-kubelet-addresses")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_names_lose_tag_and_digest() {
        assert_eq!(
            image_name("ghcr.io/llmo-dev/llmo-serve:0.1.0"),
            "ghcr.io/llmo-dev/llmo-serve"
        );
        assert_eq!(
            image_name("localhost:5000/x@sha256:abc"),
            "localhost:5000/x"
        );
        assert_eq!(image_name("localhost:5000/x"), "localhost:5000/x");
        assert_eq!(image_name("busybox"), "busybox");
    }

    #[test]
    fn images_map_by_path_prefix() {
        let map = ImageMap::new(vec![
            ("ghcr.io/llmo-dev/llmo-serve".into(), "/bin/serve".into()),
            ("ghcr.io/llmo-dev".into(), "/bin/any".into()),
            ("example.com/t:2".into(), "/bin/two".into()),
        ]);
        let bin = |i: &str| map.resolve(i).map(|m| m.binary.display().to_string());
        assert_eq!(
            bin("ghcr.io/llmo-dev/llmo-serve:0.1").unwrap(),
            "/bin/serve"
        );
        assert_eq!(bin("ghcr.io/llmo-dev/llmo-operator").unwrap(), "/bin/any");
        assert_eq!(bin("example.com/t:2").unwrap(), "/bin/two");
        assert!(bin("example.com/t:3").is_err());
        let err = map.resolve("ghcr.io/llmo-devx/a").unwrap_err().to_string();
        assert!(err.contains("ErrImageNotMapped"), "{err}");
        assert!(err.contains("image ghcr.io/llmo-devx/a is not mapped to a local binary; mapped: ghcr.io/llmo-dev/llmo-serve"), "{err}");
    }

    #[test]
    fn nodes_files_are_checked() {
        let ok = NodesFile::parse(
            "nodes:\n- {name: gpu-l4-a, gpus: 4, product: NVIDIA-L4, memoryMiB: 23034, zone: zone-a, cpu: '16', memory: 64Gi}\n- {name: cpu-a}\n",
        )
        .unwrap();
        assert_eq!(ok.nodes[0].memory_mib, Some(23034));
        assert_eq!(ok.nodes[1].cpu, "8");
        let err = NodesFile::parse("nodes:\n- {name: g, gpus: 2}\n").unwrap_err();
        assert!(err.contains("`product` is required"), "{err}");
        let err = NodesFile::parse("nodes:\n- {name: g, gpu: 2}\n").unwrap_err();
        assert!(err.contains("unknown field `gpu`"), "{err}");
        let err = NodesFile::parse("nodes:\n- {name: a}\n- {name: a}\n").unwrap_err();
        assert!(err.contains("listed twice"), "{err}");
    }

    #[test]
    fn api_server_host_and_port() {
        let api = ApiServer {
            server: "https://127.0.0.1:16443".into(),
            ..Default::default()
        };
        assert_eq!(api.host_port(), Some(("127.0.0.1".into(), 16443)));
    }
}
