//! The agent's writes to the API server, all by server-side apply under one field manager:
//! the node's `GPUNode` (created if missing, owned by the Node so it goes when the node goes),
//! its status, and the Node's class label.
//!
//! Server-side apply rather than merge patches because the agent owns exactly these fields and
//! nothing else: people own `GPUNode.spec`, the kubelet owns the rest of the Node, and removing
//! the class label is done by applying without it.

use k8s_openapi::{api::core::v1::Node, apimachinery::pkg::apis::meta::v1::OwnerReference};
use kube::{
    api::{Patch, PatchParams},
    Api, Client, Resource, ResourceExt,
};
use serde_json::{json, Value};

use crate::{
    api::{GPUNode, GPUNodeStatus},
    placement::ZONE_LABEL,
};

use super::{InventoryError, FIELD_MANAGER, GPU_CLASS_LABEL};

/// Writes one node's inventory.
#[derive(Clone)]
pub struct NodeWriter {
    gpunodes: Api<GPUNode>,
    nodes: Api<Node>,
    node_name: String,
    owner: Option<OwnerReference>,
    zone: Option<String>,
}

impl std::fmt::Debug for NodeWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeWriter")
            .field("node_name", &self.node_name)
            .finish_non_exhaustive()
    }
}

impl NodeWriter {
    /// A writer for node `node_name`; `node` (when known) becomes the GPUNode's owner.
    pub fn new(client: Client, node_name: &str, node: Option<&Node>) -> Self {
        Self {
            gpunodes: Api::all(client.clone()),
            nodes: Api::all(client),
            node_name: node_name.to_owned(),
            owner: node.and_then(owner_reference),
            zone: node.and_then(|n| n.labels().get(ZONE_LABEL).cloned()),
        }
    }

    /// Creates the GPUNode if it is missing; a no-op write otherwise.
    pub async fn ensure_gpunode(&self) -> Result<(), InventoryError> {
        let patch = gpunode_patch(&self.node_name, self.owner.as_ref(), self.zone.as_deref());
        self.gpunodes
            .patch(
                &self.node_name,
                &PatchParams::apply(FIELD_MANAGER),
                &Patch::Apply(patch),
            )
            .await
            .map_err(|e| InventoryError::kube(format!("creating GPUNode {}", self.node_name), e))?;
        Ok(())
    }

    /// Applies the status. When the GPUNode was deleted under the agent, it is created again and
    /// the status applied once more.
    pub async fn apply_status(&self, status: &GPUNodeStatus) -> Result<(), InventoryError> {
        let patch = Patch::Apply(status_patch(&self.node_name, status));
        // The agent is the only writer of this status; forcing takes over fields a previous
        // manager (an older agent, a person with kubectl) left behind.
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let action = || format!("writing GPUNode {} status", self.node_name);
        match self
            .gpunodes
            .patch_status(&self.node_name, &params, &patch)
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.is_not_found() => {
                tracing::info!(node = %self.node_name, "GPUNode missing, creating it");
                self.ensure_gpunode().await?;
                self.gpunodes
                    .patch_status(&self.node_name, &params, &patch)
                    .await
                    .map(|_| ())
                    .map_err(|e| InventoryError::kube(action(), e))
            }
            Err(e) => Err(InventoryError::kube(action(), e)),
        }
    }

    /// Sets the Node's `llmo.dev/gpu-class` label, or removes it when `class` is `None`.
    pub async fn apply_class_label(&self, class: Option<&str>) -> Result<(), InventoryError> {
        self.nodes
            .patch(
                &self.node_name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(label_patch(&self.node_name, class)),
            )
            .await
            .map_err(|e| InventoryError::kube(format!("labelling Node {}", self.node_name), e))?;
        Ok(())
    }
}

/// The Node as the GPUNode's owner, so that deleting the node deletes its inventory.
fn owner_reference(node: &Node) -> Option<OwnerReference> {
    Some(OwnerReference {
        api_version: "v1".into(),
        kind: "Node".into(),
        name: node.name_any(),
        uid: node.uid()?,
        ..OwnerReference::default()
    })
}

/// The apply body that creates a GPUNode: its identity, owner and the Node's zone label (which
/// placement spreads replicas by), and an empty `spec`, which the CRD requires. Owning the empty
/// object claims none of its fields: people keep `spec.unschedulable` under their own manager.
pub fn gpunode_patch(node_name: &str, owner: Option<&OwnerReference>, zone: Option<&str>) -> Value {
    let mut metadata = json!({ "name": node_name });
    if let Some(owner) = owner {
        metadata["ownerReferences"] = json!([owner]);
    }
    if let Some(zone) = zone {
        metadata["labels"] = json!({ ZONE_LABEL: zone });
    }
    json!({
        "apiVersion": GPUNode::api_version(&()),
        "kind": GPUNode::kind(&()),
        "metadata": metadata,
        "spec": {},
    })
}

/// The apply body of a status write.
pub fn status_patch(node_name: &str, status: &GPUNodeStatus) -> Value {
    json!({
        "apiVersion": GPUNode::api_version(&()),
        "kind": GPUNode::kind(&()),
        "metadata": { "name": node_name },
        "status": status,
    })
}

/// The apply body of the class label; without a class the label is left out, which removes it.
pub fn label_patch(node_name: &str, class: Option<&str>) -> Value {
    let mut metadata = json!({ "name": node_name });
    if let Some(class) = class {
        metadata["labels"] = json!({ GPU_CLASS_LABEL: class });
    }
    json!({ "apiVersion": "v1", "kind": "Node", "metadata": metadata })
}
