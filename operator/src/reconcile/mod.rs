//! The controller: turns each ModelDeployment into running replica groups and keeps them so.
//!
//! Each reconcile is a fixed pipeline: read, validate (the shared validation; an invalid spec is
//! reported and waits for a change), plan and place (pure), build the desired objects (pure),
//! apply them with server-side apply under one field manager, and write status. Only reading,
//! applying and the status write talk to the API server.

mod conditions;
mod controller;
mod decide;
mod error;
pub mod leader;
pub mod telemetry;

pub use conditions::set_condition;
pub use controller::{run, RunArgs};
pub use decide::{
    decide, desired_replicas, drain_step, observe_groups, Decision, DrainProbe, DrainStep,
    ObservedGroup, DRAIN_DEADLINE, DRAIN_PROPAGATION,
};
pub use error::ReconcileError;
