//! Condition types and reasons of `ModelDeployment` status, as constants so that the reconciler,
//! the autoscaler, tests and docs spell them the same way.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use schemars::{Schema, SchemaGenerator};

/// The layout was planned (`True`) or cannot be (`False`, with the reason).
pub const PLANNED: &str = "Planned";
/// Every replica group has nodes (`True`) or some cannot be placed (`False`).
pub const PLACED: &str = "Placed";
/// At least `replicas.min` groups serve requests.
pub const AVAILABLE: &str = "Available";
/// A rollout or scale change is under way; the message says how far it is.
pub const PROGRESSING: &str = "Progressing";
/// The spec is invalid or a group keeps failing; the message says what to change.
pub const DEGRADED: &str = "Degraded";
/// The autoscaler reads fresh metrics from the serving pods.
pub const METRICS_AVAILABLE: &str = "MetricsAvailable";

/// Reasons, in CamelCase as Kubernetes expects.
pub mod reasons {
    /// The spec failed validation.
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// No layout fits the model on the GPU class.
    pub const DOES_NOT_FIT: &str = "DoesNotFit";
    /// Not enough free GPUs on healthy nodes.
    pub const INSUFFICIENT_CAPACITY: &str = "InsufficientCapacity";
    /// Metrics are older than the window or missing.
    pub const METRICS_STALE: &str = "MetricsStale";
}

/// Schema of a condition list: a list-map keyed by `type`, so that server-side apply merges
/// conditions written by different field managers instead of replacing the list.
pub fn conditions_schema(generator: &mut SchemaGenerator) -> Schema {
    let mut schema = generator.subschema_for::<Vec<Condition>>();
    schema.insert("x-kubernetes-list-type".into(), "map".into());
    schema.insert(
        "x-kubernetes-list-map-keys".into(),
        serde_json::json!(["type"]),
    );
    schema
}
