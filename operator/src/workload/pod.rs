//! The pods of one replica group.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::{
        Affinity, Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
        HTTPGetAction, NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm,
        PersistentVolumeClaimVolumeSource, Pod, PodSecurityContext, PodSpec, Probe,
        ResourceRequirements, SeccompProfile, SecurityContext, Toleration, Volume, VolumeMount,
    },
    apimachinery::pkg::{
        api::resource::Quantity, apis::meta::v1::ObjectMeta, util::intstr::IntOrString,
    },
};
use kube::{Resource, ResourceExt};

use super::{
    group_name, pod_name, DEFAULT_SERVE_IMAGE, LABEL_DEPLOYMENT, LABEL_GROUP, LABEL_RANK,
    LABEL_REVISION, LABEL_SERVING,
};
use crate::{
    api::{DeviceKind, ModelDeployment, RankPlacement},
    plan::Plan,
};

/// Port of the OpenAI API, `/health`, `/ready` and `/metrics`.
pub const HTTP_PORT: i32 = 8000;
/// Port ranks of a group exchange activations on.
pub const DIST_PORT: i32 = 29500;
/// Seconds a pod has to finish in-flight requests after SIGTERM.
pub const TERMINATION_GRACE_SECONDS: i64 = 60;
const MODEL_CACHE: &str = "/var/cache/llmo";

/// Everything one group's pods are built from.
#[derive(Debug, Clone, Copy)]
pub struct GroupSpec<'a> {
    /// The owner.
    pub deployment: &'a ModelDeployment,
    /// Its plan.
    pub plan: &'a Plan,
    /// Revision hash of spec and plan.
    pub revision: &'a str,
    /// Group index at this revision.
    pub index: u32,
    /// Node of each rank, in rank order (`plan.layout.pipeline` entries).
    pub placement: &'a [RankPlacement],
    /// GPU or CPU serving.
    pub device: DeviceKind,
}

impl GroupSpec<'_> {
    /// This group's name.
    pub fn name(&self) -> String {
        group_name(&self.deployment.name_any(), self.revision, self.index)
    }

    /// Labels every object of this group carries.
    pub fn labels(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (LABEL_DEPLOYMENT.to_owned(), self.deployment.name_any()),
            (LABEL_GROUP.to_owned(), self.name()),
            (LABEL_REVISION.to_owned(), self.revision.to_owned()),
            ("app.kubernetes.io/name".to_owned(), "llmo-serve".to_owned()),
            (
                "app.kubernetes.io/managed-by".to_owned(),
                "llmo-operator".to_owned(),
            ),
        ])
    }
}

/// The pods of a group, one per pipeline rank, in rank order.
pub fn build_group_pods(group: &GroupSpec<'_>) -> Vec<Pod> {
    let md = group.deployment;
    let namespace = md.namespace().unwrap_or_else(|| "default".to_owned());
    let name = group.name();
    let pipeline = group.plan.layout.pipeline;
    let peers: Vec<String> = (0..pipeline)
        .map(|r| format!("{}.{name}.{namespace}.svc:{DIST_PORT}", pod_name(&name, r)))
        .collect();
    group
        .placement
        .iter()
        .map(|placement| build_pod(group, &namespace, &peers, placement))
        .collect()
}

fn build_pod(
    group: &GroupSpec<'_>,
    namespace: &str,
    peers: &[String],
    placement: &RankPlacement,
) -> Pod {
    let md = group.deployment;
    let spec = &md.spec;
    let plan = group.plan;
    let name = group.name();
    let mut labels = group.labels();
    labels.insert(LABEL_RANK.to_owned(), placement.rank.to_string());
    labels.insert(LABEL_SERVING.to_owned(), "true".to_owned());
    let mut annotations = BTreeMap::from([(
        "llmo.dev/planned-gpus".to_owned(),
        placement
            .gpus
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(","),
    )]);
    if let Some(extra) = &spec.serving.pod_metadata {
        for (k, v) in &extra.labels {
            labels.entry(k.clone()).or_insert_with(|| v.clone());
        }
        annotations.extend(extra.annotations.clone());
    }

    let (model_uri, mut volumes, mut mounts) = model_source(&spec.model.uri);
    let gpus = plan.layout.tensor;
    let shm = match group.device {
        DeviceKind::Gpu => format!("{}Gi", gpus.max(1)),
        DeviceKind::Cpu => "256Mi".to_owned(),
    };
    volumes.push(Volume {
        name: "dshm".into(),
        empty_dir: Some(EmptyDirVolumeSource {
            medium: Some("Memory".into()),
            size_limit: Some(Quantity(shm)),
        }),
        ..Default::default()
    });
    mounts.push(VolumeMount {
        name: "dshm".into(),
        mount_path: "/dev/shm".into(),
        ..Default::default()
    });
    volumes.push(Volume {
        name: "cache".into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Default::default()
    });
    mounts.push(VolumeMount {
        name: "cache".into(),
        mount_path: MODEL_CACHE.into(),
        ..Default::default()
    });

    let served = spec
        .model
        .served_name
        .clone()
        .unwrap_or_else(|| md.name_any());
    let mut env: Vec<EnvVar> = [
        ("LLMO_MODEL", model_uri),
        ("LLMO_SERVED_NAME", served),
        ("LLMO_QUANTIZATION", plan.quantization.to_string()),
        ("LLMO_TENSOR_PARALLEL", plan.layout.tensor.to_string()),
        ("LLMO_PIPELINE_PARALLEL", plan.layout.pipeline.to_string()),
        ("LLMO_RANK", placement.rank.to_string()),
        ("LLMO_PEERS", peers.join(",")),
        ("LLMO_HOST", "0.0.0.0".to_owned()),
        ("LLMO_PORT", HTTP_PORT.to_string()),
        ("LLMO_CONTEXT_LENGTH", plan.context_length.to_string()),
        ("LLMO_MAX_BATCH_TOKENS", plan.max_batch_tokens.to_string()),
        (
            "LLMO_DEVICE",
            match group.device {
                DeviceKind::Gpu => "cuda".to_owned(),
                DeviceKind::Cpu => "cpu".to_owned(),
            },
        ),
        ("LLMO_CACHE_DIR", MODEL_CACHE.to_owned()),
        ("HF_HOME", format!("{MODEL_CACHE}/huggingface")),
    ]
    .into_iter()
    .map(|(k, v)| EnvVar {
        name: k.into(),
        value: Some(v),
        ..Default::default()
    })
    .collect();
    if let Some(f) = spec.serving.kv_cache_fraction {
        env.push(EnvVar {
            name: "LLMO_KV_CACHE_FRACTION".into(),
            value: Some(f.to_string()),
            ..Default::default()
        });
    }
    env.extend(spec.serving.env.iter().map(|e| EnvVar {
        name: e.name.clone(),
        value: Some(e.value.clone()),
        ..Default::default()
    }));

    let mut limits = BTreeMap::new();
    let mut requests = BTreeMap::new();
    if group.device == DeviceKind::Gpu {
        limits.insert("nvidia.com/gpu".to_owned(), Quantity(gpus.to_string()));
    }
    if let Some(res) = &spec.serving.resources {
        for (key, q) in [("cpu", &res.cpu), ("memory", &res.memory)] {
            if let Some(q) = q {
                requests.insert(key.to_owned(), q.clone());
                limits.insert(key.to_owned(), q.clone());
            }
        }
    }

    let probe = |path: &str, period: i32, failures: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("http".into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(2),
        ..Default::default()
    };

    let container = Container {
        name: "llmo-serve".into(),
        image: Some(
            spec.serving
                .image
                .clone()
                .unwrap_or_else(|| DEFAULT_SERVE_IMAGE.to_owned()),
        ),
        args: (!spec.serving.args.is_empty()).then(|| spec.serving.args.clone()),
        env: Some(env),
        ports: Some(vec![
            ContainerPort {
                name: Some("http".into()),
                container_port: HTTP_PORT,
                protocol: Some("TCP".into()),
                ..Default::default()
            },
            ContainerPort {
                name: Some("dist".into()),
                container_port: DIST_PORT,
                protocol: Some("TCP".into()),
                ..Default::default()
            },
        ]),
        resources: Some(ResourceRequirements {
            limits: (!limits.is_empty()).then_some(limits),
            requests: (!requests.is_empty()).then_some(requests),
            ..Default::default()
        }),
        // Loading weights can take minutes: the startup probe allows 30 minutes before liveness
        // takes over; readiness means weights loaded and peers joined.
        startup_probe: Some(probe("/health", 10, 180)),
        liveness_probe: Some(probe("/health", 10, 6)),
        readiness_probe: Some(probe("/ready", 5, 2)),
        volume_mounts: Some(mounts),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };

    Pod {
        metadata: ObjectMeta {
            name: Some(pod_name(&name, placement.rank)),
            namespace: Some(namespace.to_owned()),
            labels: Some(labels),
            annotations: Some(annotations),
            owner_references: md.controller_owner_ref(&()).map(|o| vec![o]),
            ..Default::default()
        },
        spec: Some(PodSpec {
            // Rank r resolves as <pod>.<group>.<namespace>.svc through the headless Service.
            hostname: Some(pod_name(&name, placement.rank)),
            subdomain: Some(name.clone()),
            // A failed rank fails its group: the operator recreates the whole group rather than
            // letting one rank rejoin peers that have already given up on it.
            restart_policy: Some("Never".into()),
            termination_grace_period_seconds: Some(TERMINATION_GRACE_SECONDS),
            affinity: Some(Affinity {
                node_affinity: Some(NodeAffinity {
                    required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                        node_selector_terms: vec![NodeSelectorTerm {
                            match_expressions: Some(vec![NodeSelectorRequirement {
                                key: "kubernetes.io/hostname".into(),
                                operator: "In".into(),
                                values: Some(vec![placement.node.clone()]),
                            }]),
                            ..Default::default()
                        }],
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            tolerations: (group.device == DeviceKind::Gpu).then(|| {
                vec![Toleration {
                    key: Some("nvidia.com/gpu".into()),
                    operator: Some("Exists".into()),
                    effect: Some("NoSchedule".into()),
                    ..Default::default()
                }]
            }),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(65532),
                run_as_group: Some(65532),
                fs_group: Some(65532),
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            containers: vec![container],
            volumes: Some(volumes),
            ..Default::default()
        }),
        status: None,
    }
}

/// The URI llmo-serve loads, and the volumes that make it reachable: a `pvc://claim/path` is
/// mounted read-only under `/models/<claim>` and served as a file path.
fn model_source(uri: &str) -> (String, Vec<Volume>, Vec<VolumeMount>) {
    let Some(rest) = uri.strip_prefix("pvc://") else {
        return (uri.to_owned(), Vec::new(), Vec::new());
    };
    let (claim, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mount = format!("/models/{claim}");
    (
        format!("file://{mount}/{path}"),
        vec![Volume {
            name: "model".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: claim.to_owned(),
                read_only: Some(true),
            }),
            ..Default::default()
        }],
        vec![VolumeMount {
            name: "model".into(),
            mount_path: mount,
            read_only: Some(true),
            ..Default::default()
        }],
    )
}
