//! Setting status conditions the way Kubernetes expects: one per type, and the transition time
//! moves only when the status does.

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};

/// Sets condition `type_`, keeping its `lastTransitionTime` when its status is unchanged.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: bool,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
    now: Timestamp,
) {
    let status = if status { "True" } else { "False" }.to_owned();
    let message = message.into();
    if let Some(c) = conditions.iter_mut().find(|c| c.type_ == type_) {
        if c.status != status {
            c.last_transition_time = Time(now);
        }
        c.status = status;
        c.reason = reason.to_owned();
        c.message = message;
        c.observed_generation = generation;
        return;
    }
    conditions.push(Condition {
        type_: type_.to_owned(),
        status,
        reason: reason.to_owned(),
        message,
        observed_generation: generation,
        last_transition_time: Time(now),
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_time_moves_only_with_the_status() {
        let t0: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let t1: Timestamp = "2026-01-01T00:01:00Z".parse().unwrap();
        let mut c = Vec::new();
        set_condition(
            &mut c,
            "Available",
            false,
            "Starting",
            "0 of 1 ready",
            Some(1),
            t0,
        );
        set_condition(
            &mut c,
            "Available",
            false,
            "Starting",
            "still 0 of 1",
            Some(1),
            t1,
        );
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].last_transition_time.0, t0);
        assert_eq!(c[0].message, "still 0 of 1");
        set_condition(
            &mut c,
            "Available",
            true,
            "Ready",
            "1 of 1 ready",
            Some(2),
            t1,
        );
        assert_eq!(c[0].last_transition_time.0, t1);
        assert_eq!(c[0].observed_generation, Some(2));
    }
}
