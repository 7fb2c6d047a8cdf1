//! Names, labels and the revision hash of serving objects.

use sha2::{Digest, Sha256};

use crate::{api::ModelDeploymentSpec, plan::Plan};

/// Label: the ModelDeployment a pod serves.
pub const LABEL_DEPLOYMENT: &str = "llmo.dev/deployment";
/// Label: the replica group of a pod.
pub const LABEL_GROUP: &str = "llmo.dev/group";
/// Label: the pipeline rank of a pod within its group.
pub const LABEL_RANK: &str = "llmo.dev/rank";
/// Label: the revision a group was created at.
pub const LABEL_REVISION: &str = "llmo.dev/revision";
/// Label: `true` while a pod takes traffic from the deployment's Service; set to `false` when its
/// group starts draining, which takes it out of the Service before it is asked to drain.
pub const LABEL_SERVING: &str = "llmo.dev/serving";
/// Annotation: when the group of a pod started draining (RFC 3339).
pub const ANNOTATION_DRAIN_STARTED: &str = "llmo.dev/drain-started";

/// Hash of everything that shapes the serving pods: the spec minus what only the autoscaler or
/// status reads (replica bounds, SLO, autoscaling), and the plan's layout. Eight hex digits.
pub fn revision_hash(spec: &ModelDeploymentSpec, plan: &Plan) -> String {
    let shaping = serde_json::json!({
        "model": spec.model,
        "gpu": spec.gpu,
        "serving": spec.serving,
        "quantization": plan.quantization,
        "tensor": plan.layout.tensor,
        "pipeline": plan.layout.pipeline,
        "contextLength": plan.context_length,
        "maxBatchTokens": plan.max_batch_tokens,
    });
    let digest = Sha256::digest(shaping.to_string().as_bytes());
    digest[..4].iter().map(|b| format!("{b:02x}")).collect()
}

/// Name of replica group `index` at `revision`.
pub fn group_name(deployment: &str, revision: &str, index: u32) -> String {
    format!("{deployment}-{revision}-{index}")
}

/// Name of the pod of `rank` in a group.
pub fn pod_name(group: &str, rank: u32) -> String {
    format!("{group}-{rank}")
}
