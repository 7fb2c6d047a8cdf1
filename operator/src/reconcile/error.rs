//! Errors of the reconciler.

/// Why a reconcile failed; each is retried with backoff by the controller.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// A call to the API server failed.
    #[error("{action}: {source}")]
    Kube {
        /// What was being done.
        action: String,
        /// The client's error.
        source: kube::Error,
    },
    /// The CRDs are not installed.
    #[error("the llmo CRDs are not installed in this cluster ({0}); install them with `kubectl apply -f crds/` (Kubernetes 1.23+) or `kubectl apply -f crds/without-cel/` (1.20-1.22), or with the Helm chart")]
    CrdsMissing(String),
    /// Another replica took the leader lease; this one exits and comes back as a standby.
    #[error(
        "lost the leader lease to another replica; exiting so this replica restarts as a standby"
    )]
    LeaseLost,
    /// No kubeconfig or in-cluster configuration.
    #[error("cannot reach the API server: {0}")]
    Config(String),
}

impl ReconcileError {
    pub(crate) fn kube(action: impl Into<String>, source: kube::Error) -> Self {
        Self::Kube {
            action: action.into(),
            source,
        }
    }
}
