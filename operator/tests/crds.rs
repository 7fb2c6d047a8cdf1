//! The committed CRDs are exactly what the types generate, and the types make good CRDs:
//! documented, small, with the subresources, columns and list semantics users rely on.

use std::path::Path;

use kube::CustomResourceExt;
use llmo_operator::{
    api::{GPUClass, GPUNode, ModelDeployment},
    crdgen,
};
use serde_json::Value;

#[test]
fn committed_crds_match_the_types() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds");
    if let Err(e) = crdgen::check(&dir) {
        panic!("{e}");
    }
}

fn schema_of(
    crd: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
) -> Value {
    serde_json::to_value(
        crd.spec.versions[0]
            .schema
            .as_ref()
            .unwrap()
            .open_api_v3_schema
            .as_ref()
            .unwrap(),
    )
    .unwrap()
}

/// Paths of properties without a description, so `kubectl explain` has something to say.
fn undocumented(schema: &Value, path: &str, out: &mut Vec<String>) {
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        for (name, prop) in props {
            let here = format!("{path}.{name}");
            let described = prop
                .get("description")
                .and_then(Value::as_str)
                .is_some_and(|d| !d.trim().is_empty());
            // apiVersion, kind and metadata are documented by Kubernetes itself.
            if !described && !matches!(name.as_str(), "apiVersion" | "kind" | "metadata") {
                out.push(here.clone());
            }
            undocumented(prop, &here, out);
        }
    }
    if let Some(items) = schema.get("items") {
        undocumented(items, &format!("{path}[]"), out);
    }
}

#[test]
fn every_field_is_documented() {
    for crd in crdgen::crds() {
        let mut missing = Vec::new();
        undocumented(&schema_of(&crd), crd.spec.names.kind.as_str(), &mut missing);
        assert!(missing.is_empty(), "undocumented fields: {missing:#?}");
    }
}

#[test]
fn crds_stay_small() {
    // KubeAI's Model CRD is about 16 KB; an embedded PodSpec alone would be over 400 KB.
    for (file, yaml) in crdgen::render() {
        println!("{file}: {} bytes", yaml.len());
        assert!(yaml.len() < 40 * 1024, "{file} is {} bytes", yaml.len());
    }
}

#[test]
fn model_deployment_crd_has_the_subresources_columns_and_names_users_rely_on() {
    let crd = ModelDeployment::crd();
    assert_eq!(crd.spec.group, "llmo.dev");
    assert_eq!(crd.spec.scope, "Namespaced");
    assert_eq!(
        crd.spec.names.short_names.as_deref(),
        Some(&["md".to_owned(), "mdep".to_owned()][..])
    );
    let v = &crd.spec.versions[0];
    assert_eq!(v.name, "v1alpha1");
    let sub = v.subresources.as_ref().unwrap();
    assert!(sub.status.is_some());
    let scale = sub.scale.as_ref().unwrap();
    assert_eq!(scale.spec_replicas_path, ".spec.replicas.count");
    assert_eq!(scale.status_replicas_path, ".status.replicas");
    assert_eq!(
        scale.label_selector_path.as_deref(),
        Some(".status.selector")
    );
    let columns: Vec<&str> = v
        .additional_printer_columns
        .as_ref()
        .unwrap()
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(
        columns,
        ["Model", "Quant", "GPU", "TPxPP", "Ready", "Desired", "TTFT-P95", "Age"]
    );

    let schema = schema_of(&crd);
    let conditions = &schema["properties"]["status"]["properties"]["conditions"];
    assert_eq!(conditions["x-kubernetes-list-type"], "map");
    assert_eq!(
        conditions["x-kubernetes-list-map-keys"],
        serde_json::json!(["type"])
    );
    let replicas = &schema["properties"]["spec"]["properties"]["replicas"];
    assert_eq!(
        replicas["x-kubernetes-validations"][0]["rule"],
        "self.min <= self.max"
    );
    let quant = &schema["properties"]["spec"]["properties"]["quantization"]["enum"];
    assert_eq!(
        *quant,
        serde_json::json!(["auto", "bf16", "fp16", "fp8", "int8", "int4"])
    );
    let tensor = &schema["properties"]["spec"]["properties"]["parallelism"]["properties"]["tensor"];
    assert_eq!(tensor["x-kubernetes-int-or-string"], true);
    assert_eq!(tensor["minimum"].as_f64(), Some(1.0));
    assert_eq!(tensor["maximum"].as_f64(), Some(64.0));
    assert!(
        tensor.get("nullable").is_none_or(|n| n == false),
        "{tensor}"
    );
    assert!(schema["x-kubernetes-validations"][0]["rule"]
        .as_str()
        .unwrap()
        .contains("metadata.name"));
}

#[test]
fn cluster_scoped_kinds() {
    assert_eq!(GPUClass::crd().spec.scope, "Cluster");
    assert_eq!(GPUNode::crd().spec.scope, "Cluster");
    assert!(GPUNode::crd().spec.versions[0]
        .subresources
        .as_ref()
        .unwrap()
        .status
        .is_some());
}

#[test]
fn the_variant_without_cel_differs_only_by_the_cel_rules() {
    let files: std::collections::BTreeMap<String, String> = crdgen::render().into_iter().collect();
    for crd in crdgen::crds() {
        let name = crd.metadata.name.clone().unwrap();
        let with: Value = serde_yaml::from_str(&files[&format!("{name}.yaml")]).unwrap();
        let without_text = &files[&format!("{}/{name}.yaml", crdgen::WITHOUT_CEL_DIR)];
        assert!(!without_text.contains("x-kubernetes-validations"), "{name}");
        let mut stripped = with.clone();
        fn strip(v: &mut Value) {
            match v {
                Value::Object(m) => {
                    m.remove("x-kubernetes-validations");
                    m.values_mut().for_each(strip);
                }
                Value::Array(a) => a.iter_mut().for_each(strip),
                _ => {}
            }
        }
        strip(&mut stripped);
        let without: Value = serde_yaml::from_str(without_text).unwrap();
        assert_eq!(stripped, without, "{name}");
    }
}

/// The KEDA example targets the scale subresource and reads the series the operator exports.
#[test]
fn the_keda_example_follows_the_exported_recommendation() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/autoscaling/keda-scaledobject.yaml");
    let doc: Value = serde_yaml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let target = &doc["spec"]["scaleTargetRef"];
    assert_eq!(target["apiVersion"], "llmo.dev/v1alpha1");
    assert_eq!(target["kind"], "ModelDeployment");
    let trigger = &doc["spec"]["triggers"][0];
    // AverageValue with threshold 1: the HPA sets ceil(value / 1) replicas, the recommendation.
    assert_eq!(trigger["metricType"], "AverageValue");
    assert_eq!(trigger["metadata"]["threshold"], "1");
    // A missing series holds the count instead of reading as zero.
    assert_eq!(trigger["metadata"]["ignoreNullValues"], "false");
    // Scale-ups are not capped at HPA's default of 100 % or 4 replicas per 15 s.
    let behavior = &doc["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"];
    assert!(
        behavior["scaleUp"]["policies"][0]["value"]
            .as_i64()
            .unwrap()
            >= 1000
    );
    let query = trigger["metadata"]["query"].as_str().unwrap();

    let metrics = llmo_operator::reconcile::telemetry::Metrics::new();
    metrics.record_recommendation("default", "chat", 3);
    let text = metrics.encode();
    let series = text
        .lines()
        .find(|l| l.contains("kind=\"recommended\""))
        .expect("the recommendation is exported");
    let (name, labels) = series.split_once('{').unwrap();
    assert!(
        query.contains(&format!("{name}{{")),
        "{query} reads {series}"
    );
    for label in labels.split('}').next().unwrap().split(',') {
        assert!(query.contains(label), "{query} lacks {label} of {series}");
    }
}
