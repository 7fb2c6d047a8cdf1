//! What an API server checks before it stores an llmo object, reproduced offline: the CRD's
//! OpenAPI schema (enforced by every Kubernetes version) and its CEL rules (1.25 and later).

use kube::CustomResourceExt;
use llmo_operator::api::{GPUClass, GPUNode, ModelDeployment};
use serde_json::Value;

/// How a server would refuse an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The OpenAPI schema refused it, with the validator's messages.
    Schema(Vec<String>),
    /// A CEL rule refused it, with the rules' messages.
    Cel(Vec<String>),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Schema(m) => write!(f, "schema: {}", m.join("; ")),
            Self::Cel(m) => write!(f, "CEL: {}", m.join("; ")),
        }
    }
}

/// The `openAPIV3Schema` of the CRD for `kind`, as generated from the Rust types.
pub fn schema_for_kind(kind: &str) -> Option<Value> {
    let crd = match kind {
        "ModelDeployment" => ModelDeployment::crd(),
        "GPUClass" => GPUClass::crd(),
        "GPUNode" => GPUNode::crd(),
        _ => return None,
    };
    let schema = crd.spec.versions[0]
        .schema
        .as_ref()?
        .open_api_v3_schema
        .as_ref()?;
    Some(serde_json::to_value(schema).expect("schema serializes"))
}

/// Checks `object` as the API server would: schema first, then CEL rules.
pub fn admit(object: &Value) -> Result<(), Refusal> {
    let kind = object
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let schema = schema_for_kind(kind).unwrap_or_else(|| panic!("{kind:?} is not an llmo kind"));
    check_schema(&schema, object).map_err(Refusal::Schema)?;
    check_cel(&schema, object).map_err(Refusal::Cel)
}

/// OpenAPI v3.0 schemas are closest to JSON Schema draft 4 (boolean exclusive bounds).
pub fn check_schema(schema: &Value, object: &Value) -> Result<(), Vec<String>> {
    let validator = jsonschema::options()
        .with_draft(jsonschema::Draft::Draft4)
        .build(schema)
        .expect("the generated schema compiles");
    let errors: Vec<String> = validator
        .iter_errors(object)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// Evaluates every `x-kubernetes-validations` rule of the schema against the object.
pub fn check_cel(schema: &Value, object: &Value) -> Result<(), Vec<String>> {
    kube::core::cel::Validator::new()
        .validate(schema, object, None)
        .map_err(|errors| {
            errors
                .into_iter()
                .map(|e| format!("{:?} at {}: {}", e.kind, e.field_path, e.message))
                .collect()
        })
}
