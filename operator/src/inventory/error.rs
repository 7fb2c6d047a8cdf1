//! The one error type of the node agent. Each message says what to do next, because the agent
//! runs unattended in a DaemonSet and its last log line is often all an operator reads.

use std::path::PathBuf;

/// Why the node agent could not read its GPUs, load a profile, or write to the cluster.
#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    /// NVML could not be initialised: no driver, no library, or no permission.
    #[error(
        "NVML is not available on this node ({reason}); run on a node with the NVIDIA driver or pass --simulate PROFILE"
    )]
    NvmlUnavailable {
        /// What NVML or the dynamic loader said, on one line.
        reason: String,
    },
    /// An NVML call failed for the whole node (per-GPU failures become GPU health instead).
    #[error("NVML {call} failed: {source}; check the driver with nvidia-smi")]
    Nvml {
        /// The NVML function that failed.
        call: &'static str,
        /// NVML's error.
        #[source]
        source: nvml_wrapper::error::NvmlError,
    },
    /// The simulation profile file could not be read.
    #[error("cannot read simulation profile {path}: {source}")]
    ProfileRead {
        /// The file given to --simulate.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The simulation profile is not valid.
    #[error("simulation profile {path}: {field}: {message}")]
    Profile {
        /// The file given to --simulate.
        path: String,
        /// Where in the profile, e.g. `events[2].gpu`.
        field: String,
        /// What is wrong and what is expected.
        message: String,
    },
    /// A GPUClass manifest file given to --classes could not be used.
    #[error("GPU classes {path}: {message}")]
    Classes {
        /// The file given to --classes.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The llmo CRDs are not installed in the cluster.
    #[error(
        "the {crd} CRD is not installed; install the llmo CRDs first (kubectl apply -f crds/)"
    )]
    CrdMissing {
        /// The missing CRD's name, e.g. `gpunodes.llmo.dev`.
        crd: &'static str,
    },
    /// A request to the Kubernetes API failed.
    #[error("{action}: {source}")]
    Kube {
        /// What the agent was doing, e.g. `writing GPUNode node-1 status`.
        action: String,
        /// The client's error.
        #[source]
        source: kube::Error,
    },
    /// The command line is inconsistent in a way clap cannot express.
    #[error("{0}")]
    Usage(String),
}

impl InventoryError {
    /// Wraps a client error with what the agent was doing.
    pub(crate) fn kube(action: impl Into<String>, source: kube::Error) -> Self {
        Self::Kube {
            action: action.into(),
            source,
        }
    }
}
