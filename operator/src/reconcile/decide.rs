//! What to do with a deployment's replica groups, decided from what exists. Pure.
//!
//! A group lives at one revision. Scaling creates groups at the lowest free indices and removes
//! the highest. A group with a failed pod is removed whole and created again. A revision change
//! rolls with a surge of one: one new group at a time, and an old group goes only once a new one
//! is ready, so capacity never drops below what is ready.

use std::collections::BTreeMap;

use std::time::Duration;

use k8s_openapi::{
    api::core::v1::Pod,
    jiff::{SignedDuration, Timestamp},
};

use crate::{
    api::{AutoscalingMode, GroupState, ModelDeployment},
    workload::{ANNOTATION_DRAIN_STARTED, LABEL_GROUP, LABEL_RANK, LABEL_REVISION},
};

/// Replicas the deployment should have now, before autoscaling: `replicas.count` in external
/// mode, otherwise the autoscaler's last decision, clamped to the bounds. Without either (a
/// switch of mode, where the other writer's field is gone), the last known count holds rather
/// than `replicas.min`: `desiredReplicas`, then the autoscaler's recommendation. Never the
/// groups that exist: during a rollout they include the surge, which would then be kept.
pub fn desired_replicas(md: &ModelDeployment) -> u32 {
    let r = &md.spec.replicas;
    let last = md.status.as_ref().and_then(|s| {
        [
            Some(s.desired_replicas),
            s.autoscaling.as_ref().and_then(|a| a.recommended_replicas),
        ]
        .into_iter()
        .flatten()
        .find(|n| *n > 0)
    });
    let wanted = match md.spec.autoscaling.mode {
        AutoscalingMode::External => r.count.or(last).unwrap_or(r.min),
        AutoscalingMode::Slo => last.unwrap_or(r.min),
    };
    u32::try_from(wanted.clamp(r.min, r.max.max(r.min))).unwrap_or(1)
}

/// One group as its pods show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedGroup {
    /// Group name.
    pub name: String,
    /// Revision label.
    pub revision: String,
    /// Index parsed from the name (`<deployment>-<revision>-<index>`).
    pub index: u32,
    /// Pods that exist.
    pub pods: u32,
    /// Pods running and ready.
    pub ready: u32,
    /// Whether a pod failed or is being deleted.
    pub failed: bool,
    /// When the group was taken out of the Service to drain, if it was.
    pub draining_since: Option<Timestamp>,
    /// Every pod of the group is already being deleted: nothing more to do for it.
    pub deleting: bool,
}

impl ObservedGroup {
    /// Lifecycle state for status.
    pub fn state(&self, pipeline: u32) -> GroupState {
        if self.failed {
            GroupState::Failed
        } else if self.draining_since.is_some() {
            GroupState::Draining
        } else if self.ready >= pipeline && self.pods >= pipeline {
            GroupState::Ready
        } else if self.pods > 0 && self.ready == 0 && self.pods < pipeline {
            GroupState::Pending
        } else {
            GroupState::Starting
        }
    }
}

/// Groups the deployment's pods belong to, by name.
pub fn observe_groups(pods: &[Pod]) -> Vec<ObservedGroup> {
    let mut groups: BTreeMap<String, ObservedGroup> = BTreeMap::new();
    for pod in pods {
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        let (Some(name), Some(revision)) = (labels.get(LABEL_GROUP), labels.get(LABEL_REVISION))
        else {
            continue;
        };
        if !labels.contains_key(LABEL_RANK) {
            continue;
        }
        let index = name
            .rsplit('-')
            .next()
            .and_then(|i| i.parse().ok())
            .unwrap_or(u32::MAX);
        let g = groups.entry(name.clone()).or_insert_with(|| ObservedGroup {
            name: name.clone(),
            revision: revision.clone(),
            index,
            pods: 0,
            ready: 0,
            failed: false,
            draining_since: None,
            deleting: true,
        });
        g.deleting &= pod.metadata.deletion_timestamp.is_some();
        let drain = pod
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ANNOTATION_DRAIN_STARTED))
            .and_then(|t| t.parse::<Timestamp>().ok());
        if let Some(t) = drain {
            g.draining_since = Some(g.draining_since.map_or(t, |d| d.min(t)));
        }
        g.pods += 1;
        let status = pod.status.as_ref();
        let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("Pending");
        let ready = status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        if phase == "Running" && ready {
            g.ready += 1;
        }
        if phase == "Failed" || phase == "Succeeded" || pod.metadata.deletion_timestamp.is_some() {
            g.failed = true;
        }
    }
    groups.into_values().collect()
}

/// What to change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decision {
    /// Indices of groups to create at the current revision.
    pub create: Vec<u32>,
    /// Names of groups to delete now, with why: their pods failed.
    pub delete: Vec<(String, &'static str)>,
    /// Names of groups to take out of service and delete once idle, with why.
    pub drain: Vec<(String, &'static str)>,
    /// Groups at the current revision that are ready.
    pub ready_current: u32,
    /// Whether groups of an older revision remain.
    pub rolling: bool,
}

/// Decides creations and deletions for `desired` groups of `pipeline` pods at `revision`.
pub fn decide(revision: &str, pipeline: u32, desired: u32, all: &[ObservedGroup]) -> Decision {
    let mut d = Decision::default();
    // Draining groups are on their way out: the drain step deletes them, a failed one at once.
    let observed: Vec<&ObservedGroup> = all.iter().filter(|g| g.draining_since.is_none()).collect();
    for g in observed.iter().filter(|g| g.failed && !g.deleting) {
        d.delete.push((
            g.name.clone(),
            "a pod of the group failed; the group restarts whole",
        ));
    }
    let live = |current: bool| -> Vec<&ObservedGroup> {
        let mut v: Vec<&ObservedGroup> = observed
            .iter()
            .copied()
            .filter(|g| !g.failed && (g.revision == revision) == current)
            .collect();
        v.sort_by_key(|g| g.index);
        v
    };
    let current = live(true);
    let old = live(false);
    d.ready_current = u32::try_from(
        current
            .iter()
            .filter(|g| g.state(pipeline) == GroupState::Ready)
            .count(),
    )
    .unwrap_or(u32::MAX);
    d.rolling = !old.is_empty();

    let target = if old.is_empty() {
        desired
    } else {
        // Surge by one: start one more new group than are ready, never more than desired.
        desired.min(d.ready_current + 1)
    };
    let have = u32::try_from(current.len()).unwrap_or(u32::MAX);
    if have < target {
        // Indices of failed groups are free again once their pods are gone; new ones avoid them
        // until then.
        // Draining groups keep their indices until their pods are gone.
        let taken: Vec<u32> = all
            .iter()
            .filter(|g| g.revision == revision)
            .map(|g| g.index)
            .collect();
        let mut index = 0;
        while u32::try_from(d.create.len()).unwrap_or(u32::MAX) < target - have {
            if !taken.contains(&index) {
                d.create.push(index);
            }
            index += 1;
        }
    } else if have > target && old.is_empty() {
        for g in current.iter().rev().take((have - target) as usize) {
            d.drain.push((g.name.clone(), "scaled down"));
        }
    }
    if !old.is_empty() {
        // Keep old groups while new ones are not ready to replace them.
        let keep = desired.saturating_sub(d.ready_current) as usize;
        // Like scaling down, the highest indices go first.
        for g in old.iter().skip(keep).rev() {
            d.drain.push((
                g.name.clone(),
                "replaced by a ready group at the new revision",
            ));
        }
    }
    d
}

/// How long a group stays out of the Service before it is asked to drain, so that no new
/// request reaches it after it refuses new work: the endpoints controller and the proxies need a
/// moment to see the label change.
pub const DRAIN_PROPAGATION: Duration = Duration::from_secs(5);
/// How long a group may take to finish its requests before it is deleted anyway.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(120);

/// What one pod of a draining group answered to `POST /drain`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainProbe {
    /// Draining, with this many requests still running.
    InFlight(u64),
    /// No address, or the connection was refused: nothing can be running there.
    Gone,
    /// No answer in time: it may still be busy.
    Unknown,
}

/// The next step for a draining group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DrainStep {
    /// Let the Service forget the group before asking it to drain.
    Propagate,
    /// Requests are still running (or the pods cannot tell): look again soon.
    Wait,
    /// Delete the group, with why.
    Delete(String),
}

/// Decides the next step of a group draining since `started`, given each pod's answer. Pure.
pub fn drain_step(started: Timestamp, now: Timestamp, probes: &[DrainProbe]) -> DrainStep {
    let elapsed = now.duration_since(started);
    let after = |d: Duration| elapsed >= SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX);
    if after(DRAIN_DEADLINE) {
        let running: u64 = probes
            .iter()
            .map(|p| match p {
                DrainProbe::InFlight(n) => *n,
                _ => 0,
            })
            .sum();
        return DrainStep::Delete(format!(
            "drain deadline of {}s passed with {running} requests in flight",
            DRAIN_DEADLINE.as_secs()
        ));
    }
    if !after(DRAIN_PROPAGATION) {
        return DrainStep::Propagate;
    }
    let idle = probes
        .iter()
        .all(|p| matches!(p, DrainProbe::InFlight(0) | DrainProbe::Gone));
    if idle {
        DrainStep::Delete("drained: no requests in flight".into())
    } else {
        DrainStep::Wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(rev: &str, index: u32, pods: u32, ready: u32) -> ObservedGroup {
        ObservedGroup {
            name: format!("m-{rev}-{index}"),
            revision: rev.into(),
            index,
            pods,
            ready,
            failed: false,
            draining_since: None,
            deleting: false,
        }
    }

    fn deployment(mode: &str, count: Option<i32>, status: serde_json::Value) -> ModelDeployment {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "llmo.dev/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": "m", "namespace": "default"},
            "spec": {
                "model": {"uri": "hf://a/b"}, "gpu": {"class": "l4"},
                "replicas": {"min": 1, "max": 8, "count": count},
                "autoscaling": {"mode": mode},
            },
            "status": status,
        }))
        .unwrap()
    }

    #[test]
    fn a_switch_of_autoscaling_mode_keeps_the_replica_count() {
        use serde_json::json;
        // Each mode reads its own writer's count.
        let running = json!({"replicas": 5, "desiredReplicas": 5});
        assert_eq!(
            desired_replicas(&deployment("slo", None, running.clone())),
            5
        );
        assert_eq!(
            desired_replicas(&deployment("external", Some(3), running)),
            3
        );
        // external -> slo: the autoscaler gave up `desiredReplicas` in external mode and the
        // reconciler no longer writes it, so it is gone; the recommendation holds, not min.
        let after_external = json!({"replicas": 5, "autoscaling": {"recommendedReplicas": 4}});
        assert_eq!(
            desired_replicas(&deployment("slo", None, after_external)),
            4
        );
        // Without a recommendation either, min: the groups that exist are no count to hold, as
        // during a rollout they include the surge.
        assert_eq!(
            desired_replicas(&deployment("slo", None, json!({"replicas": 5}))),
            1
        );
        // slo -> external before anything set `replicas.count`: the last count holds.
        let after_slo = json!({"replicas": 5, "desiredReplicas": 6});
        assert_eq!(
            desired_replicas(&deployment("external", None, after_slo)),
            6
        );
        // A new deployment starts at min; counts are clamped to the bounds.
        assert_eq!(desired_replicas(&deployment("slo", None, json!({}))), 1);
        assert_eq!(
            desired_replicas(&deployment("external", Some(20), json!({}))),
            8
        );
    }

    #[test]
    fn scales_up_at_the_lowest_free_indices_and_down_from_the_highest() {
        let d = decide("r1", 1, 3, &[g("r1", 1, 1, 1)]);
        assert_eq!(d.create, [0, 2]);
        let d = decide(
            "r1",
            1,
            1,
            &[g("r1", 0, 1, 1), g("r1", 1, 1, 1), g("r1", 2, 1, 0)],
        );
        assert_eq!(
            d.drain,
            [
                ("m-r1-2".to_owned(), "scaled down"),
                ("m-r1-1".to_owned(), "scaled down")
            ]
        );
        assert!(d.delete.is_empty(), "scaling down drains, it does not cut");
        assert!(d.create.is_empty());
        assert_eq!(
            decide("r1", 1, 2, &[g("r1", 0, 1, 1), g("r1", 1, 1, 0)]),
            Decision {
                ready_current: 1,
                ..Default::default()
            }
        );
    }

    #[test]
    fn a_failed_group_is_deleted_whole_and_its_index_waits_for_its_pods_to_go() {
        let mut failed = g("r1", 0, 2, 1);
        failed.failed = true;
        let d = decide("r1", 2, 2, &[failed, g("r1", 1, 2, 2)]);
        assert_eq!(d.delete[0].0, "m-r1-0");
        assert_eq!(d.create, [2], "index 0 is reused once its pods are gone");
    }

    #[test]
    fn a_rollout_surges_one_group_and_retires_old_ones_only_as_new_ones_get_ready() {
        let old = [g("r1", 0, 1, 1), g("r1", 1, 1, 1), g("r1", 2, 1, 1)];
        // Nothing new yet: create one, keep all old.
        let d = decide("r2", 1, 3, &old);
        assert_eq!(d.create, [0]);
        assert!(d.drain.is_empty());
        assert!(d.rolling);
        // The new one is starting: wait.
        let mut seen = old.to_vec();
        seen.push(g("r2", 0, 1, 0));
        let d = decide("r2", 1, 3, &seen);
        assert!(d.create.is_empty() && d.drain.is_empty(), "{d:?}");
        // It is ready: one more new, one old goes.
        seen.pop();
        seen.push(g("r2", 0, 1, 1));
        let d = decide("r2", 1, 3, &seen);
        assert_eq!(d.create, [1]);
        assert_eq!(d.drain.len(), 1);
        assert_eq!(d.drain[0].0, "m-r1-2");
        // All new ready: every old one goes.
        let all_new = [
            g("r1", 0, 1, 1),
            g("r2", 0, 1, 1),
            g("r2", 1, 1, 1),
            g("r2", 2, 1, 1),
        ];
        let d = decide("r2", 1, 3, &all_new);
        assert!(d.create.is_empty());
        assert_eq!(
            d.drain,
            [(
                "m-r1-0".to_owned(),
                "replaced by a ready group at the new revision"
            )]
        );
    }

    #[test]
    fn ready_capacity_never_drops_during_a_rollout() {
        // Simulate a rollout of 4 groups step by step, new groups turning ready one step later.
        let mut groups: Vec<ObservedGroup> = (0..4).map(|i| g("a", i, 1, 1)).collect();
        for _ in 0..20 {
            let ready_before = groups.iter().filter(|g| g.ready == 1).count();
            let d = decide("b", 1, 4, &groups);
            for g in groups.iter_mut().filter(|g| g.revision == "b") {
                g.ready = 1;
            }
            groups.retain(|g| !d.drain.iter().any(|(n, _)| *n == g.name));
            groups.extend(d.create.iter().map(|i| g("b", *i, 1, 0)));
            let ready_after = groups.iter().filter(|g| g.ready == 1).count();
            assert!(
                ready_after + 1 >= ready_before.min(4),
                "{ready_before} -> {ready_after}"
            );
            assert!(groups.len() <= 5, "surge is one group: {groups:?}");
        }
        assert!(groups.iter().all(|g| g.revision == "b" && g.ready == 1));
        assert_eq!(groups.len(), 4);
    }

    #[test]
    fn draining_groups_are_left_to_the_drain_step_and_keep_their_index() {
        let mut draining = g("r1", 1, 1, 1);
        draining.draining_since = Some(Timestamp::now());
        assert_eq!(draining.state(1), GroupState::Draining);
        // Scale back up to 2 while index 1 drains: a new index, nothing deleted twice.
        let d = decide("r1", 1, 2, &[g("r1", 0, 1, 1), draining.clone()]);
        assert_eq!(d.create, [2]);
        assert!(d.delete.is_empty() && d.drain.is_empty(), "{d:?}");
        // A draining group does not hold a rollout back either.
        let d = decide("r2", 1, 1, &[g("r2", 0, 1, 1), draining]);
        assert!(!d.rolling);
    }

    #[test]
    fn observe_reads_the_drain_annotation() {
        let t: Timestamp = "2026-01-02T03:04:05Z".parse().unwrap();
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "m-r1-0-0",
                "labels": {LABEL_GROUP: "m-r1-0", LABEL_REVISION: "r1", LABEL_RANK: "0"},
                "annotations": {ANNOTATION_DRAIN_STARTED: t.to_string()},
            },
        }))
        .unwrap();
        let groups = observe_groups(&[pod]);
        assert_eq!(groups[0].draining_since, Some(t));
    }

    #[test]
    fn drain_waits_for_propagation_then_for_requests_then_for_the_deadline() {
        let t0: Timestamp = "2026-01-02T03:04:05Z".parse().unwrap();
        let at = |s: i64| t0 + SignedDuration::from_secs(s);
        use DrainProbe::*;
        assert_eq!(drain_step(t0, at(1), &[InFlight(0)]), DrainStep::Propagate);
        assert_eq!(drain_step(t0, at(6), &[InFlight(3)]), DrainStep::Wait);
        assert_eq!(
            drain_step(t0, at(6), &[InFlight(0), Unknown]),
            DrainStep::Wait
        );
        assert!(matches!(
            drain_step(t0, at(6), &[InFlight(0), Gone]),
            DrainStep::Delete(_)
        ));
        assert!(matches!(drain_step(t0, at(6), &[]), DrainStep::Delete(_)));
        match drain_step(t0, at(121), &[InFlight(2), InFlight(1)]) {
            DrainStep::Delete(why) => assert!(why.contains("3 requests"), "{why}"),
            other => panic!("{other:?}"),
        }
    }
}
