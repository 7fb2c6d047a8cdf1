//! The objects that run a ModelDeployment, built as pure functions of the spec, the plan and the
//! placement, so the reconciler only has to apply them and tests need no server.
//!
//! One replica is a group of `pipeline` pods with `tensor` GPUs each. The pods are named
//! `<deployment>-<revision>-<group>-<rank>`, sit behind a headless Service named after the group
//! (so rank `r` is reachable as `<group>-<r>.<group>.<namespace>.svc`), and carry the labels the
//! operator selects them by. A group lives at exactly one revision: a hash of everything that
//! shapes its pods.

use crate::api::{EnvVar, ModelDeployment};

mod names;
mod pod;
mod service;

pub use names::{
    group_name, pod_name, revision_hash, ANNOTATION_DRAIN_STARTED, LABEL_DEPLOYMENT, LABEL_GROUP,
    LABEL_RANK, LABEL_REVISION, LABEL_SERVING,
};
pub use pod::{build_group_pods, GroupSpec, DIST_PORT, HTTP_PORT};
pub use service::{build_endpoint_service, build_group_service};

/// Field manager of every object the operator applies.
pub const FIELD_MANAGER: &str = "llmo-operator";
/// Image of llmo-serve when the spec names none.
pub const DEFAULT_SERVE_IMAGE: &str =
    concat!("ghcr.io/llmo-dev/llmo-serve:", env!("CARGO_PKG_VERSION"));

/// The deployment with cluster-wide serving environment added to `spec.serving.env`: the
/// operator's `--serving-env` entries, each unless the deployment sets the same name itself. As
/// part of the spec it shapes the pods, so a change of it rolls the groups like any other.
pub fn with_cluster_env(md: &ModelDeployment, cluster: &[EnvVar]) -> ModelDeployment {
    let mut md = md.clone();
    let own = &md.spec.serving.env;
    let mut env: Vec<EnvVar> = cluster
        .iter()
        .filter(|c| !own.iter().any(|e| e.name == c.name))
        .cloned()
        .collect();
    env.extend(own.iter().cloned());
    md.spec.serving.env = env;
    md
}

#[cfg(test)]
mod tests;
