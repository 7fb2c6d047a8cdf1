//! Pod directories and volumes.
//!
//! Each pod has a directory `<state-dir>/pods/<namespace>_<name>_<uid>/` holding `home/` (the
//! processes' `HOME`), `volumes/<volume>/` and, with ServiceAccount credentials, `kubeconfig`.
//! Volumes map to directories: `emptyDir` to a fresh one (kept across container restarts),
//! `configMap`, `secret` and `downwardAPI` (and those sources of `projected`) to a directory
//! with one file per key, written when the pod starts and not updated afterwards, `hostPath` to
//! the host path itself, anything else (PersistentVolumeClaims, ...) to an empty directory, with
//! a warning. `subPath` is honoured. Mount paths themselves are not visible to processes: see
//! [`super::env`] for how arguments and environment values that name them are rewritten.

use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
    os::unix::fs::PermissionsExt,
    path::{Component, Path, PathBuf},
};

use k8s_openapi::api::core::v1::{
    ConfigMap, Container, DownwardAPIVolumeFile, KeyToPath, Pod, Secret, Volume,
};
use kube::{Api, Client};

use super::{env::field_value, KubeletError};

/// The reason of a pod whose volumes cannot be prepared yet.
pub const MOUNT_ERROR: &str = "ContainerCreating";

/// The directory of a pod.
pub fn pod_dir(state_dir: &Path, pod: &Pod) -> PathBuf {
    let meta = &pod.metadata;
    state_dir.join("pods").join(format!(
        "{}_{}_{}",
        meta.namespace.as_deref().unwrap_or("default"),
        meta.name.as_deref().unwrap_or("unnamed"),
        meta.uid.as_deref().unwrap_or("no-uid"),
    ))
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> KubeletError + 'a {
    move |e| KubeletError::io(what, path, e)
}

fn mount_error(msg: String) -> KubeletError {
    KubeletError::pod(MOUNT_ERROR, msg)
}

/// The prepared volumes of a pod: name → directory (or file, for a `hostPath` file).
#[derive(Clone, Debug, Default)]
pub struct PodVolumes {
    /// Volume name to host path.
    pub paths: HashMap<String, PathBuf>,
    /// Volumes that are only stand-ins (say why, for an Event).
    pub warnings: Vec<String>,
}

/// Creates the pod's directory and its volumes.
pub async fn prepare(
    client: &Client,
    pod: &Pod,
    dir: &Path,
    pod_ip: Ipv4Addr,
    host_ip: Ipv4Addr,
) -> Result<PodVolumes, KubeletError> {
    std::fs::create_dir_all(dir.join("home")).map_err(io("creating the pod directory", dir))?;
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let mut out = PodVolumes::default();
    for volume in pod.spec.iter().flat_map(|s| s.volumes.iter().flatten()) {
        let path = prepare_volume(
            client, pod, namespace, volume, dir, pod_ip, host_ip, &mut out,
        )
        .await?;
        out.paths.insert(volume.name.clone(), path);
    }
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
async fn prepare_volume(
    client: &Client,
    pod: &Pod,
    namespace: &str,
    volume: &Volume,
    dir: &Path,
    pod_ip: Ipv4Addr,
    host_ip: Ipv4Addr,
    out: &mut PodVolumes,
) -> Result<PathBuf, KubeletError> {
    let target = dir.join("volumes").join(&volume.name);
    if let Some(host) = &volume.host_path {
        let path = PathBuf::from(&host.path);
        match host.type_.as_deref() {
            Some("DirectoryOrCreate") => {
                std::fs::create_dir_all(&path).map_err(io("creating a hostPath", &path))?
            }
            Some("FileOrCreate") if !path.exists() => {
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent).map_err(io("creating a hostPath", parent))?;
                }
                std::fs::write(&path, b"").map_err(io("creating a hostPath", &path))?;
            }
            Some("Directory") if !path.is_dir() => {
                return Err(mount_error(format!(
                    "volume {}: hostPath {} is not a directory",
                    volume.name, host.path
                )))
            }
            Some("File") if !path.is_file() => {
                return Err(mount_error(format!(
                    "volume {}: hostPath {} is not a file",
                    volume.name, host.path
                )))
            }
            _ => {}
        }
        return Ok(path);
    }
    if volume.empty_dir.is_some() {
        std::fs::create_dir_all(&target).map_err(io("creating an emptyDir", &target))?;
        return Ok(target);
    }
    // Files from the API are written afresh each time the pod starts.
    let files = if let Some(cm) = &volume.config_map {
        let data = read_configmap(client, namespace, &cm.name).await?;
        match data {
            Some(data) => key_files(&data, cm.items.as_deref(), cm.default_mode, &volume.name)?,
            None if cm.optional.unwrap_or(false) => Vec::new(),
            None => {
                return Err(mount_error(format!(
                    "volume {}: ConfigMap {namespace}/{} not found",
                    volume.name, cm.name
                )))
            }
        }
    } else if let Some(secret) = &volume.secret {
        let name = secret.secret_name.clone().unwrap_or_default();
        match read_secret(client, namespace, &name).await? {
            Some(data) => key_files(
                &data,
                secret.items.as_deref(),
                secret.default_mode,
                &volume.name,
            )?,
            None if secret.optional.unwrap_or(false) => Vec::new(),
            None => {
                return Err(mount_error(format!(
                    "volume {}: Secret {namespace}/{name} not found",
                    volume.name
                )))
            }
        }
    } else if let Some(downward) = &volume.downward_api {
        downward_files(
            pod,
            downward.items.as_deref().unwrap_or_default(),
            downward.default_mode,
            pod_ip,
            host_ip,
        )?
    } else if let Some(projected) = &volume.projected {
        let mut files = Vec::new();
        for source in projected.sources.iter().flatten() {
            if let Some(cm) = &source.config_map {
                if let Some(data) = read_configmap(client, namespace, &cm.name).await? {
                    files.extend(key_files(
                        &data,
                        cm.items.as_deref(),
                        projected.default_mode,
                        &volume.name,
                    )?);
                } else if !cm.optional.unwrap_or(false) {
                    return Err(mount_error(format!(
                        "volume {}: ConfigMap {namespace}/{} not found",
                        volume.name, cm.name
                    )));
                }
            } else if let Some(secret) = &source.secret {
                if let Some(data) = read_secret(client, namespace, &secret.name).await? {
                    files.extend(key_files(
                        &data,
                        secret.items.as_deref(),
                        projected.default_mode,
                        &volume.name,
                    )?);
                } else if !secret.optional.unwrap_or(false) {
                    return Err(mount_error(format!(
                        "volume {}: Secret {namespace}/{} not found",
                        volume.name, secret.name
                    )));
                }
            } else if let Some(downward) = &source.downward_api {
                files.extend(downward_files(
                    pod,
                    downward.items.as_deref().unwrap_or_default(),
                    projected.default_mode,
                    pod_ip,
                    host_ip,
                )?);
            } else {
                out.warnings.push(format!(
                    "volume {}: a projected source other than configMap, secret and downwardAPI is left out",
                    volume.name
                ));
            }
        }
        files
    } else {
        out.warnings.push(format!(
            "volume {} is not supported by llmo-kubelet (only emptyDir, configMap, secret, downwardAPI, projected and hostPath); it is an empty directory",
            volume.name
        ));
        std::fs::create_dir_all(&target).map_err(io("creating a volume", &target))?;
        return Ok(target);
    };
    if target.exists() {
        std::fs::remove_dir_all(&target).map_err(io("clearing a volume", &target))?;
    }
    std::fs::create_dir_all(&target).map_err(io("creating a volume", &target))?;
    for (relative, bytes, mode) in files {
        let path = target.join(&relative);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io("creating a volume", parent))?;
        }
        std::fs::write(&path, bytes).map_err(io("writing a volume file", &path))?;
        std::fs::set_permissions(
            &path,
            std::fs::Permissions::from_mode(u32::try_from(mode & 0o777).unwrap_or(0o644)),
        )
        .map_err(io("setting a volume file's mode", &path))?;
    }
    Ok(target)
}

async fn read_configmap(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<Option<BTreeMap<String, Vec<u8>>>, KubeletError> {
    let cm = Api::<ConfigMap>::namespaced(client.clone(), namespace)
        .get_opt(name)
        .await
        .map_err(|e| KubeletError::kube(format!("reading ConfigMap {namespace}/{name}"), e))?;
    Ok(cm.map(|cm| {
        let mut data: BTreeMap<String, Vec<u8>> = cm
            .data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.into_bytes()))
            .collect();
        data.extend(
            cm.binary_data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.0)),
        );
        data
    }))
}

async fn read_secret(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<Option<BTreeMap<String, Vec<u8>>>, KubeletError> {
    let secret = Api::<Secret>::namespaced(client.clone(), namespace)
        .get_opt(name)
        .await
        .map_err(|e| KubeletError::kube(format!("reading Secret {namespace}/{name}"), e))?;
    Ok(secret.map(|s| {
        s.data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.0))
            .collect()
    }))
}

/// A relative path inside a volume; `..` and absolute paths are refused.
fn relative(path: &str, volume: &str) -> Result<PathBuf, KubeletError> {
    let p = Path::new(path);
    if path.is_empty() || p.components().any(|c| !matches!(c, Component::Normal(_))) {
        return Err(mount_error(format!(
            "volume {volume}: path {path:?} must be relative and stay inside the volume"
        )));
    }
    Ok(p.to_owned())
}

type File = (PathBuf, Vec<u8>, i32);

fn key_files(
    data: &BTreeMap<String, Vec<u8>>,
    items: Option<&[KeyToPath]>,
    default_mode: Option<i32>,
    volume: &str,
) -> Result<Vec<File>, KubeletError> {
    let mode = default_mode.unwrap_or(0o644);
    match items {
        Some(items) if !items.is_empty() => items
            .iter()
            .map(|item| {
                let bytes = data.get(&item.key).ok_or_else(|| {
                    mount_error(format!("volume {volume}: no key {} to project", item.key))
                })?;
                Ok((
                    relative(&item.path, volume)?,
                    bytes.clone(),
                    item.mode.unwrap_or(mode),
                ))
            })
            .collect(),
        _ => data
            .iter()
            .map(|(k, v)| Ok((relative(k, volume)?, v.clone(), mode)))
            .collect(),
    }
}

fn downward_files(
    pod: &Pod,
    items: &[DownwardAPIVolumeFile],
    default_mode: Option<i32>,
    pod_ip: Ipv4Addr,
    host_ip: Ipv4Addr,
) -> Result<Vec<File>, KubeletError> {
    let mode = default_mode.unwrap_or(0o644);
    let mut files = Vec::new();
    for item in items {
        let Some(field) = &item.field_ref else {
            // resourceFieldRef items need a container; leave them out rather than guess.
            continue;
        };
        let value = field_value(pod, &field.field_path, pod_ip, host_ip)?;
        files.push((
            relative(&item.path, "downwardAPI")?,
            value.into_bytes(),
            item.mode.unwrap_or(mode),
        ));
    }
    Ok(files)
}

/// `(mountPath, host path)` of each of a container's volumeMounts.
pub fn container_mounts(
    container: &Container,
    volumes: &PodVolumes,
) -> Result<Vec<(String, PathBuf)>, KubeletError> {
    container
        .volume_mounts
        .iter()
        .flatten()
        .map(|mount| {
            let base = volumes.paths.get(&mount.name).ok_or_else(|| {
                mount_error(format!(
                    "container {}: volumeMount {} names no volume of the pod",
                    container.name, mount.name
                ))
            })?;
            let path = match mount.sub_path.as_deref().filter(|s| !s.is_empty()) {
                Some(sub) => {
                    let path = base.join(relative(sub, &mount.name)?);
                    if !path.exists() {
                        std::fs::create_dir_all(&path).map_err(io("creating a subPath", &path))?;
                    }
                    path
                }
                None => base.clone(),
            };
            Ok((mount.mount_path.clone(), path))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_become_files_and_paths_stay_inside() {
        let data = BTreeMap::from([
            ("a".to_owned(), b"1".to_vec()),
            ("b".to_owned(), b"2".to_vec()),
        ]);
        let files = key_files(&data, None, None, "v").unwrap();
        assert_eq!(files.len(), 2);
        assert_eq!(files[0], (PathBuf::from("a"), b"1".to_vec(), 0o644));
        let items = [KeyToPath {
            key: "b".into(),
            path: "sub/b.txt".into(),
            mode: Some(0o600),
        }];
        let files = key_files(&data, Some(&items), None, "v").unwrap();
        assert_eq!(
            files,
            vec![(PathBuf::from("sub/b.txt"), b"2".to_vec(), 0o600)]
        );
        let items = [KeyToPath {
            key: "b".into(),
            path: "../escape".into(),
            mode: None,
        }];
        assert!(key_files(&data, Some(&items), None, "v").is_err());
    }
}
