//! The llmo operator: API types, layout planning, placement, reconciliation and autoscaling of
//! LLM deployments on Kubernetes.
#![forbid(unsafe_code)]

pub mod api;
pub mod autoscale;
pub mod crdgen;
pub mod inventory;
pub mod placement;
pub mod plan;
pub mod preview;
pub mod reconcile;
pub mod workload;
