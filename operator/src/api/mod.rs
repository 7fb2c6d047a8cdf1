//! The llmo API, group `llmo.dev`, version `v1alpha1`: custom resource types, their validation
//! and manifest parsing. No client code lives here.

pub mod conditions;
mod duration;
mod gpu_class;
mod gpu_node;
mod manifest;
mod model_deployment;
mod parallelism;
pub mod quantity;
mod validation;

pub use duration::{DurationParseError, HumanDuration, DURATION_PATTERN};
pub use gpu_class::*;
pub use gpu_node::*;
pub use manifest::{parse_manifests, Manifest, ManifestError};
pub use model_deployment::*;
pub use parallelism::{ParallelDegree, MAX_PARALLEL_DEGREE};
pub use validation::{
    parse_parameter_count, validate_gpu_class, validate_model_deployment, FieldError,
    ValidationErrors, MAX_NAME_LEN,
};

/// API group of every llmo resource.
pub const GROUP: &str = "llmo.dev";
/// API version served.
pub const VERSION: &str = "v1alpha1";
