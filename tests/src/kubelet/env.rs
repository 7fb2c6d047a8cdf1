//! What a process sees of its container: command line, environment, and the two rewriting rules
//! that stand in for a network namespace and a mount namespace.
//!
//! * `$(VAR)` references in env values, `command` and `args` expand as Kubernetes does: against
//!   the variables defined before (env) or all of them (command, args); `$$` is a literal `$`;
//!   an unknown reference stays as written.
//! * **Addresses.** A value that is exactly `0.0.0.0`, or starts with `0.0.0.0:`, becomes the pod
//!   IP (`0.0.0.0:8000` → `127.0.0.12:8000`), so "listen everywhere" means "listen on my own
//!   address" and two pods can use the same port.
//! * **Mount paths.** A value equal to a volumeMount's `mountPath`, or starting with it and `/`
//!   (also after `file://`), is rewritten to the directory that volume maps to (longest mount path
//!   first).
//!
//! Both rules apply to whole env values and whole arguments, and to the value part of a
//! `--flag=value` argument. Nothing else is rewritten: a path or address inside a config file or
//! a longer string reaches the process unchanged.

use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use k8s_openapi::api::core::v1::{ConfigMap, Container, EnvVar, Pod, Secret};
use kube::{Api, Client};

use super::{config::MappedImage, KubeletError};

/// The reason of a container that cannot be configured (missing Secret key, bad reference...).
pub const CONFIG_ERROR: &str = "CreateContainerConfigError";

/// Expands `$(NAME)` references in `input` with `lookup`, the Kubernetes way.
pub fn expand(input: &str, lookup: &dyn Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(') {
            match inner.find(')') {
                Some(close) => {
                    let name = &inner[..close];
                    match lookup(name) {
                        Some(value) => out.push_str(&value),
                        None => {
                            out.push_str("$(");
                            out.push_str(name);
                            out.push(')');
                        }
                    }
                    rest = &inner[close + 1..];
                }
                None => {
                    out.push_str(&rest[at..]);
                    rest = "";
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// Applies the address and mount path rules to argument and env values.
#[derive(Clone, Debug, PartialEq)]
pub struct Rewriter {
    pod_ip: String,
    /// `(mountPath, host directory)`, longest mount path first.
    mounts: Vec<(String, PathBuf)>,
}

impl Rewriter {
    /// Rules for a pod on `pod_ip` whose container mounts `mounts`.
    pub fn new(pod_ip: Ipv4Addr, mut mounts: Vec<(String, PathBuf)>) -> Self {
        for (path, _) in &mut mounts {
            while path.len() > 1 && path.ends_with('/') {
                path.pop();
            }
        }
        mounts.sort_by_key(|(path, _)| std::cmp::Reverse(path.len()));
        Self {
            pod_ip: pod_ip.to_string(),
            mounts,
        }
    }

    /// The value as the process gets it.
    pub fn rewrite(&self, value: &str) -> String {
        if value.starts_with('-') {
            if let Some((flag, v)) = value.split_once('=') {
                return format!("{flag}={}", self.rewrite_whole(v));
            }
        }
        self.rewrite_whole(value)
    }

    fn rewrite_whole(&self, value: &str) -> String {
        if value == "0.0.0.0" {
            return self.pod_ip.clone();
        }
        if let Some(port) = value.strip_prefix("0.0.0.0:") {
            return format!("{}:{port}", self.pod_ip);
        }
        let (scheme, path) = match value.strip_prefix("file://") {
            Some(path) => ("file://", path),
            None => ("", value),
        };
        for (mount, dir) in &self.mounts {
            let rest = if path == mount {
                Some("")
            } else if mount == "/" {
                path.strip_prefix('/')
                    .map(|r| if r.is_empty() { "" } else { r })
            } else {
                path.strip_prefix(mount.as_str())
                    .and_then(|r| r.strip_prefix('/'))
            };
            if let Some(rest) = rest {
                let mapped = if rest.is_empty() {
                    dir.clone()
                } else {
                    dir.join(rest)
                };
                return format!("{scheme}{}", mapped.display());
            }
        }
        value.to_owned()
    }
}

/// A field of the pod, as `fieldRef` and downward API volumes read it.
pub fn field_value(
    pod: &Pod,
    field_path: &str,
    pod_ip: Ipv4Addr,
    host_ip: Ipv4Addr,
) -> Result<String, KubeletError> {
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    let map_entry = |map: &Option<BTreeMap<String, String>>, key: &str| {
        map.as_ref()
            .and_then(|m| m.get(key))
            .cloned()
            .unwrap_or_default()
    };
    let keyed = |prefix: &str| {
        field_path
            .strip_prefix(prefix)
            .and_then(|r| r.strip_suffix("']"))
            .map(str::to_owned)
    };
    let value = match field_path {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "metadata.labels" => format_map(meta.labels.as_ref()),
        "metadata.annotations" => format_map(meta.annotations.as_ref()),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        "spec.serviceAccountName" => spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".to_owned()),
        "status.podIP" | "status.podIPs" => pod_ip.to_string(),
        "status.hostIP" | "status.hostIPs" => host_ip.to_string(),
        _ => {
            if let Some(key) = keyed("metadata.labels['") {
                map_entry(&meta.labels, &key)
            } else if let Some(key) = keyed("metadata.annotations['") {
                map_entry(&meta.annotations, &key)
            } else {
                return Err(KubeletError::pod(
                    CONFIG_ERROR,
                    format!("fieldRef {field_path} is not supported"),
                ));
            }
        }
    };
    Ok(value)
}

/// `key="value"` lines, the downward API's format for labels and annotations.
fn format_map(map: Option<&BTreeMap<String, String>>) -> String {
    map.map(|m| {
        m.iter()
            .map(|(k, v)| format!("{k}={v:?}\n"))
            .collect::<String>()
    })
    .unwrap_or_default()
}

/// The value of a `resourceFieldRef`: the container's request or limit (limits default to the
/// node's allocatable), divided by `divisor` and rounded up, as Kubernetes does.
pub fn resource_value(
    container: &Container,
    resource: &str,
    divisor: Option<&str>,
    node_cpu: &str,
    node_memory: &str,
) -> Result<String, KubeletError> {
    let bad = |what: String| KubeletError::pod(CONFIG_ERROR, what);
    let (kind, name) = resource
        .split_once('.')
        .ok_or_else(|| bad(format!("resourceFieldRef {resource} is not supported")))?;
    let res = container.resources.as_ref();
    let list = match kind {
        "limits" => res.and_then(|r| r.limits.as_ref()),
        "requests" => res.and_then(|r| r.requests.as_ref()),
        _ => return Err(bad(format!("resourceFieldRef {resource} is not supported"))),
    };
    let given = list.and_then(|l| l.get(name)).map(|q| q.0.clone());
    let quantity = match (given, kind, name) {
        (Some(q), _, _) => q,
        (None, "limits", "cpu") => node_cpu.to_owned(),
        (None, "limits", "memory") => node_memory.to_owned(),
        (None, "requests", _) => "0".to_owned(),
        _ => return Err(bad(format!("resourceFieldRef {resource} is not supported"))),
    };
    let value = parse_quantity(&quantity).ok_or_else(|| {
        bad(format!(
            "quantity {quantity} of {resource} is not understood"
        ))
    })?;
    let divisor = match divisor {
        Some(d) => parse_quantity(d)
            .filter(|d| *d > 0.0)
            .ok_or_else(|| bad(format!("divisor {d} of {resource} is not understood")))?,
        None => 1.0,
    };
    let scaled = (value / divisor)
        .ceil()
        .max(if name == "cpu" { 1.0 } else { 0.0 });
    Ok(format!("{scaled:.0}"))
}

/// A Kubernetes quantity as a number (`500m` = 0.5, `1Gi` = 2^30, `1e3` = 1000): the
/// operator's reading, so both sides agree on the grammar.
pub fn parse_quantity(q: &str) -> Option<f64> {
    llmo_operator::api::quantity::parse_quantity(q).ok()
}

/// Whether `name` may be an environment variable (what `envFrom` imports).
fn is_env_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
}

/// Ordered environment: later definitions of a name replace earlier ones in place.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EnvList {
    vars: Vec<(String, String)>,
}

impl EnvList {
    /// Sets `name`.
    pub fn set(&mut self, name: impl Into<String>, value: impl Into<String>) {
        let (name, value) = (name.into(), value.into());
        match self.vars.iter_mut().find(|(n, _)| *n == name) {
            Some(slot) => slot.1 = value,
            None => self.vars.push((name, value)),
        }
    }

    /// The value of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.vars
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every variable, in definition order.
    pub fn vars(&self) -> &[(String, String)] {
        &self.vars
    }

    fn expand(&self, value: &str) -> String {
        expand(value, &|name| self.get(name).map(str::to_owned))
    }
}

/// What the environment of a container is built from besides the API.
#[derive(Clone, Debug)]
pub struct EnvInputs<'a> {
    /// The pod.
    pub pod: &'a Pod,
    /// The container.
    pub container: &'a Container,
    /// Its address.
    pub pod_ip: Ipv4Addr,
    /// Its node's address.
    pub host_ip: Ipv4Addr,
    /// Node CPU and memory capacity, for `resourceFieldRef` limits.
    pub node_resources: (&'a str, &'a str),
    /// Variables set before the container's own (PATH, HOME, POD_IP, KUBECONFIG...).
    pub base: EnvList,
}

/// Reads ConfigMaps and Secrets of one namespace once per container start.
struct Sources {
    configmaps: Api<ConfigMap>,
    secrets: Api<Secret>,
    cache_cm: HashMap<String, Option<BTreeMap<String, String>>>,
    cache_secret: HashMap<String, Option<BTreeMap<String, String>>>,
}

impl Sources {
    async fn configmap(
        &mut self,
        name: &str,
    ) -> Result<Option<&BTreeMap<String, String>>, KubeletError> {
        if !self.cache_cm.contains_key(name) {
            let cm = self
                .configmaps
                .get_opt(name)
                .await
                .map_err(|e| KubeletError::kube(format!("reading ConfigMap {name}"), e))?;
            let data = cm.map(|cm| {
                let mut data = cm.data.unwrap_or_default();
                for (k, v) in cm.binary_data.unwrap_or_default() {
                    data.insert(k, String::from_utf8_lossy(&v.0).into_owned());
                }
                data
            });
            self.cache_cm.insert(name.to_owned(), data);
        }
        Ok(self.cache_cm[name].as_ref())
    }

    async fn secret(
        &mut self,
        name: &str,
    ) -> Result<Option<&BTreeMap<String, String>>, KubeletError> {
        if !self.cache_secret.contains_key(name) {
            let secret = self
                .secrets
                .get_opt(name)
                .await
                .map_err(|e| KubeletError::kube(format!("reading Secret {name}"), e))?;
            let data = secret.map(|s| {
                s.data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, String::from_utf8_lossy(&v.0).into_owned()))
                    .collect()
            });
            self.cache_secret.insert(name.to_owned(), data);
        }
        Ok(self.cache_secret[name].as_ref())
    }
}

/// The container's environment: `base`, then `envFrom`, then `env` in order, with `$(VAR)`
/// expanded (not yet rewritten).
pub async fn container_env(
    client: &Client,
    inputs: EnvInputs<'_>,
) -> Result<EnvList, KubeletError> {
    let namespace = inputs
        .pod
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".to_owned());
    let mut sources = Sources {
        configmaps: Api::namespaced(client.clone(), &namespace),
        secrets: Api::namespaced(client.clone(), &namespace),
        cache_cm: HashMap::new(),
        cache_secret: HashMap::new(),
    };
    let config_error = |msg: String| KubeletError::pod(CONFIG_ERROR, msg);
    let mut env = inputs.base.clone();
    for from in inputs.container.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        let (data, kind, name, optional) = if let Some(r) = &from.config_map_ref {
            let name = r.name.clone();
            (
                sources.configmap(&name).await?.cloned(),
                "ConfigMap",
                name,
                r.optional.unwrap_or(false),
            )
        } else if let Some(r) = &from.secret_ref {
            let name = r.name.clone();
            (
                sources.secret(&name).await?.cloned(),
                "Secret",
                name,
                r.optional.unwrap_or(false),
            )
        } else {
            continue;
        };
        match data {
            Some(data) => {
                for (k, v) in data {
                    let key = format!("{prefix}{k}");
                    if is_env_name(&key) {
                        env.set(key, v);
                    }
                }
            }
            None if optional => {}
            None => {
                return Err(config_error(format!(
                    "{kind} {namespace}/{name} (envFrom) not found"
                )))
            }
        }
    }
    for var in inputs.container.env.iter().flatten() {
        if let Some(value) = env_var_value(&mut sources, &inputs, &env, var, &namespace).await? {
            env.set(var.name.clone(), value);
        }
    }
    Ok(env)
}

async fn env_var_value(
    sources: &mut Sources,
    inputs: &EnvInputs<'_>,
    env: &EnvList,
    var: &EnvVar,
    namespace: &str,
) -> Result<Option<String>, KubeletError> {
    let config_error = |msg: String| KubeletError::pod(CONFIG_ERROR, msg);
    let Some(from) = &var.value_from else {
        return Ok(Some(env.expand(var.value.as_deref().unwrap_or(""))));
    };
    if let Some(field) = &from.field_ref {
        return field_value(inputs.pod, &field.field_path, inputs.pod_ip, inputs.host_ip).map(Some);
    }
    if let Some(res) = &from.resource_field_ref {
        let container = match &res.container_name {
            Some(name) if !name.is_empty() && *name != inputs.container.name => inputs
                .pod
                .spec
                .iter()
                .flat_map(|s| s.containers.iter())
                .find(|c| c.name == *name)
                .ok_or_else(|| config_error(format!("resourceFieldRef: no container {name}")))?,
            _ => inputs.container,
        };
        return resource_value(
            container,
            &res.resource,
            res.divisor.as_ref().map(|d| d.0.as_str()),
            inputs.node_resources.0,
            inputs.node_resources.1,
        )
        .map(Some);
    }
    let (kind, name, key, optional, data) = if let Some(r) = &from.config_map_key_ref {
        (
            "ConfigMap",
            r.name.clone(),
            r.key.clone(),
            r.optional.unwrap_or(false),
            sources.configmap(&r.name).await?.cloned(),
        )
    } else if let Some(r) = &from.secret_key_ref {
        (
            "Secret",
            r.name.clone(),
            r.key.clone(),
            r.optional.unwrap_or(false),
            sources.secret(&r.name).await?.cloned(),
        )
    } else {
        return Ok(None);
    };
    match data.as_ref().map(|d| d.get(&key)) {
        Some(Some(value)) => Ok(Some(value.clone())),
        _ if optional => Ok(None),
        None => Err(config_error(format!(
            "{kind} {namespace}/{name} not found (env {})",
            var.name
        ))),
        Some(None) => Err(config_error(format!(
            "couldn't find key {key} in {kind} {namespace}/{name} (env {})",
            var.name
        ))),
    }
}

/// The program and arguments of a container: the mapped binary, `command[1..]` then `args`,
/// expanded against `env`. A `command` must start with the mapped binary (its file name, or any
/// path ending in it).
pub fn command_line(
    container: &Container,
    image: &MappedImage,
    env: &EnvList,
) -> Result<(PathBuf, Vec<String>), KubeletError> {
    let mut args = Vec::new();
    if let Some(command) = container.command.as_ref().filter(|c| !c.is_empty()) {
        let first = env.expand(&command[0]);
        let binary_name = image.binary.file_name().unwrap_or_default();
        if Path::new(&first).file_name() != Some(binary_name) {
            return Err(KubeletError::pod(
                "ErrCommandNotMapped",
                format!(
                    "container {}: command[0] {first:?} is not the binary image {} maps to ({}); start the command with {:?} or leave `command` out",
                    container.name,
                    container.image.as_deref().unwrap_or_default(),
                    image.binary.display(),
                    binary_name.to_string_lossy(),
                ),
            ));
        }
        args.extend(command[1..].iter().map(|a| env.expand(a)));
    }
    args.extend(container.args.iter().flatten().map(|a| env.expand(a)));
    Ok((image.binary.clone(), args))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(name: &str) -> Option<String> {
        match name {
            "A" => Some("alpha".into()),
            "PORT" => Some("8080".into()),
            _ => None,
        }
    }

    #[test]
    fn expansion_follows_kubernetes() {
        assert_eq!(expand("x-$(A)-y", &lookup), "x-alpha-y");
        assert_eq!(expand("$(A)$(PORT)", &lookup), "alpha8080");
        assert_eq!(expand("$$(A)", &lookup), "$(A)");
        assert_eq!(expand("$(B)", &lookup), "$(B)");
        assert_eq!(expand("$A $", &lookup), "$A $");
        assert_eq!(expand("$(A", &lookup), "$(A");
        assert_eq!(expand("a$$b", &lookup), "a$b");
    }

    #[test]
    fn rewriting_maps_addresses_and_mounts() {
        let r = Rewriter::new(
            Ipv4Addr::new(127, 0, 0, 12),
            vec![
                ("/data".into(), "/state/pod/volumes/data".into()),
                ("/data/models/".into(), "/state/pod/volumes/models".into()),
                ("/etc/config".into(), "/state/pod/volumes/cfg".into()),
            ],
        );
        assert_eq!(r.rewrite("0.0.0.0"), "127.0.0.12");
        assert_eq!(r.rewrite("0.0.0.0:8000"), "127.0.0.12:8000");
        assert_eq!(r.rewrite("--listen=0.0.0.0:80"), "--listen=127.0.0.12:80");
        assert_eq!(r.rewrite("10.0.0.0:80"), "10.0.0.0:80");
        assert_eq!(r.rewrite("http://0.0.0.0:80"), "http://0.0.0.0:80");
        assert_eq!(r.rewrite("/data"), "/state/pod/volumes/data");
        assert_eq!(r.rewrite("/data/x/y"), "/state/pod/volumes/data/x/y");
        assert_eq!(
            r.rewrite("/data/models/m.gguf"),
            "/state/pod/volumes/models/m.gguf"
        );
        assert_eq!(r.rewrite("/database"), "/database");
        assert_eq!(
            r.rewrite("file:///etc/config/a"),
            "file:///state/pod/volumes/cfg/a"
        );
        assert_eq!(
            r.rewrite("--config=/etc/config/a"),
            "--config=/state/pod/volumes/cfg/a"
        );
        assert_eq!(r.rewrite("x=/data"), "x=/data");
    }

    #[test]
    fn quantities_and_resource_fields() {
        assert_eq!(parse_quantity("500m"), Some(0.5));
        assert_eq!(parse_quantity("64Gi"), Some(64.0 * 1024f64.powi(3)));
        assert_eq!(parse_quantity("1e3"), Some(1000.0));
        let c: Container = serde_json::from_value(serde_json::json!({
            "name": "c", "resources": {"limits": {"cpu": "1500m", "memory": "1Gi"}}
        }))
        .unwrap();
        assert_eq!(
            resource_value(&c, "limits.cpu", None, "8", "32Gi").unwrap(),
            "2"
        );
        assert_eq!(
            resource_value(&c, "limits.memory", Some("1Mi"), "8", "32Gi").unwrap(),
            "1024"
        );
        assert_eq!(
            resource_value(&c, "requests.cpu", None, "8", "32Gi").unwrap(),
            "1"
        );
    }

    #[test]
    fn commands_must_start_with_the_mapped_binary() {
        let image = MappedImage {
            prefix: "x/serve".into(),
            binary: "/build/llmo-serve".into(),
        };
        let mut env = EnvList::default();
        env.set("PORT", "9000");
        let c: Container = serde_json::from_value(serde_json::json!({
            "name": "c", "command": ["/usr/local/bin/llmo-serve", "--port", "$(PORT)"], "args": ["--x"]
        }))
        .unwrap();
        let (bin, args) = command_line(&c, &image, &env).unwrap();
        assert_eq!(bin, PathBuf::from("/build/llmo-serve"));
        assert_eq!(args, ["--port", "9000", "--x"]);
        let c: Container = serde_json::from_value(serde_json::json!({
            "name": "c", "image": "x/serve", "command": ["sh", "-c", "true"]
        }))
        .unwrap();
        let err = command_line(&c, &image, &env).unwrap_err().to_string();
        assert!(
            err.contains("command[0] \"sh\" is not the binary image x/serve maps to"),
            "{err}"
        );
    }
}
