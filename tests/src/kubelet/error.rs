//! Errors of the process kubelet.

use std::path::PathBuf;

/// What can go wrong in the process kubelet.
#[derive(Debug, thiserror::Error)]
pub enum KubeletError {
    /// A file (nodes file, kubeconfig, pod directory, log) could not be read or written.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The nodes file is not valid.
    #[error("nodes file {path}: {message}")]
    NodesFile {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the field.
        message: String,
    },
    /// A command-line or configuration value is not valid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A request to the API server failed.
    #[error("{what}: {source}")]
    Kube {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: kube::Error,
    },
    /// The kubeconfig could not be used.
    #[error("kubeconfig: {0}")]
    Kubeconfig(String),
    /// No loopback address was free.
    #[error("no free loopback address: {0}")]
    Addresses(String),
    /// A pod cannot be run as asked (unknown image, bad command, unsupported probe...). The
    /// reason is a CamelCase word for the pod's status, the message says what to change.
    #[error("{reason}: {message}")]
    Pod {
        /// CamelCase reason, shown by `kubectl get pods`.
        reason: &'static str,
        /// For people.
        message: String,
    },
}

impl KubeletError {
    /// An I/O error on `path`.
    pub fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            what,
            path: path.into(),
            source,
        }
    }

    /// An API error while doing `what`.
    pub fn kube(what: impl Into<String>, source: kube::Error) -> Self {
        Self::Kube {
            what: what.into(),
            source,
        }
    }

    /// A pod that cannot run as asked.
    pub fn pod(reason: &'static str, message: impl Into<String>) -> Self {
        Self::Pod {
            reason,
            message: message.into(),
        }
    }

    /// Whether this is a 404 from the API server.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::Kube { source: kube::Error::Api(status), .. } if status.is_not_found())
    }
}
