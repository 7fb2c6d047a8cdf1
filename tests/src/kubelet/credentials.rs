//! ServiceAccount credentials for processes.
//!
//! A process cannot see `/var/run/secrets/kubernetes.io/serviceaccount` (though the
//! ServiceAccount admission plugin's token volume is materialized like any Secret volume, and
//! paths into it are rewritten). So for a pod that mounts a token (`automountServiceAccountToken`
//! not false on the pod, or unset there and not false on the ServiceAccount), the kubelet reads
//! the ServiceAccount's token Secret (`kubernetes.io/service-account-token`, which the
//! controller-manager's token controller creates; the pod waits in `ContainerCreating` until it
//! exists), writes `<pod dir>/kubeconfig` with the API server of the kubelet's own kubeconfig and
//! that token, and sets `KUBECONFIG` for every container: the process runs with exactly its
//! ServiceAccount's rights.

use std::{
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

use k8s_openapi::api::core::v1::{Pod, Secret, ServiceAccount};
use kube::{api::ListParams, Api, Client};
use serde_json::json;

use super::{config::ApiServer, KubeletError};

/// The reason of a pod waiting for its ServiceAccount token.
pub const WAITING: &str = "ContainerCreating";
/// Type of the token Secrets of ServiceAccounts.
pub const TOKEN_SECRET_TYPE: &str = "kubernetes.io/service-account-token";
const SA_NAME_ANNOTATION: &str = "kubernetes.io/service-account.name";
const SA_UID_ANNOTATION: &str = "kubernetes.io/service-account.uid";

/// The pod's ServiceAccount name.
pub fn service_account_name(pod: &Pod) -> String {
    pod.spec
        .as_ref()
        .and_then(|s| {
            s.service_account_name
                .clone()
                .or_else(|| s.service_account.clone())
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".to_owned())
}

/// Writes the pod's kubeconfig and returns its path, or `None` when the pod mounts no token.
pub async fn pod_kubeconfig(
    client: &Client,
    pod: &Pod,
    dir: &Path,
    api: &ApiServer,
) -> Result<Option<PathBuf>, KubeletError> {
    let pod_setting = pod
        .spec
        .as_ref()
        .and_then(|s| s.automount_service_account_token);
    if pod_setting == Some(false) {
        return Ok(None);
    }
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let name = service_account_name(pod);
    let waiting = |msg: String| KubeletError::pod(WAITING, msg);
    let sa = Api::<ServiceAccount>::namespaced(client.clone(), namespace)
        .get_opt(&name)
        .await
        .map_err(|e| KubeletError::kube(format!("reading ServiceAccount {namespace}/{name}"), e))?
        .ok_or_else(|| waiting(format!("ServiceAccount {namespace}/{name} not found")))?;
    if pod_setting.is_none() && sa.automount_service_account_token == Some(false) {
        return Ok(None);
    }
    let token = token_of(client, &sa).await?.ok_or_else(|| {
        waiting(format!(
            "waiting for the token Secret of ServiceAccount {namespace}/{name} (the controller-manager's token controller creates it)"
        ))
    })?;
    let path = dir.join("kubeconfig");
    write_kubeconfig(&path, api, namespace, &name, &token)?;
    Ok(Some(path))
}

/// The token of a ServiceAccount, from its token Secret.
pub async fn token_of(
    client: &Client,
    sa: &ServiceAccount,
) -> Result<Option<String>, KubeletError> {
    let namespace = sa.metadata.namespace.as_deref().unwrap_or("default");
    let name = sa.metadata.name.as_deref().unwrap_or_default();
    let secrets = Api::<Secret>::namespaced(client.clone(), namespace)
        .list(&ListParams::default().fields(&format!("type={TOKEN_SECRET_TYPE}")))
        .await
        .map_err(|e| KubeletError::kube(format!("listing token Secrets of {namespace}"), e))?;
    let listed: Vec<&str> = sa
        .secrets
        .iter()
        .flatten()
        .filter_map(|r| r.name.as_deref())
        .collect();
    let mut candidates: Vec<&Secret> = secrets
        .items
        .iter()
        .filter(|s| {
            let annotations = s.metadata.annotations.as_ref();
            let get = |k: &str| annotations.and_then(|a| a.get(k)).map(String::as_str);
            get(SA_NAME_ANNOTATION) == Some(name)
                && (sa.metadata.uid.is_none()
                    || get(SA_UID_ANNOTATION) == sa.metadata.uid.as_deref())
                && s.data.as_ref().is_some_and(|d| d.contains_key("token"))
        })
        .collect();
    // The Secrets the ServiceAccount lists first, in its order; then the oldest.
    candidates.sort_by_key(|s| {
        let listed_at = s
            .metadata
            .name
            .as_deref()
            .and_then(|n| listed.iter().position(|l| *l == n))
            .unwrap_or(usize::MAX);
        (
            listed_at,
            s.metadata.creation_timestamp.clone().map(|t| t.0),
        )
    });
    Ok(candidates.first().and_then(|s| {
        s.data
            .as_ref()
            .and_then(|d| d.get("token"))
            .map(|t| String::from_utf8_lossy(&t.0).into_owned())
    }))
}

fn write_kubeconfig(
    path: &Path,
    api: &ApiServer,
    namespace: &str,
    service_account: &str,
    token: &str,
) -> Result<(), KubeletError> {
    let mut cluster = json!({ "server": api.server });
    if api.insecure_skip_tls_verify {
        cluster["insecure-skip-tls-verify"] = json!(true);
    } else if let Some(data) = &api.certificate_authority_data {
        cluster["certificate-authority-data"] = json!(data);
    } else if let Some(file) = &api.certificate_authority {
        cluster["certificate-authority"] = json!(file);
    }
    let user = format!("system:serviceaccount:{namespace}:{service_account}");
    let config = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "cluster", "cluster": cluster}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "pod", "context": {"cluster": "cluster", "user": user, "namespace": namespace}}],
        "current-context": "pod",
    });
    let text = serde_yaml::to_string(&config)
        .map_err(|e| KubeletError::Kubeconfig(format!("serializing a pod kubeconfig: {e}")))?;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| KubeletError::io("writing a pod kubeconfig", &tmp, e))?;
    file.write_all(text.as_bytes())
        .map_err(|e| KubeletError::io("writing a pod kubeconfig", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| KubeletError::io("writing a pod kubeconfig", path, e))
}
