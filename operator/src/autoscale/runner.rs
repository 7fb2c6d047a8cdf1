//! The autoscaler loop the operator runs while it leads: every deployment's `interval`, read the
//! ready serving pods' `/metrics`, turn the scrapes into signals, let the policy decide, and write
//! the outcome to `status.desiredReplicas` and `status.autoscaling`.
//!
//! It writes status under its own field manager, `llmo-autoscaler`, and only the fields it owns
//! (`desiredReplicas` and `autoscaling`), so the reconciler's status writes and its never overwrite
//! each other. The reconciler turns `autoscaling.metricsReason` into the `MetricsAvailable`
//! condition: Kubernetes 1.20 applies a CRD's condition list as one atomic field, so the list must
//! have one writer. The reconciler reacts to the new
//! `desiredReplicas` like to any other change of the object.
//!
//! Deployments in `external` mode are measured and decided on the same way, but only recommended
//! for: HPA or KEDA drive `replicas.count` through the scale subresource, and may follow
//! `status.autoscaling.recommendedReplicas`, exported as
//! `llmo_operator_deployment_replicas{kind="recommended"}`. The policy then runs on its own last
//! recommendation, as if it had been applied, so the recommendation is the count llmo would set
//! in `slo` mode, with the same stabilization, and it does not chase the external count. No Events
//! and no `scaling_decisions_total`: nothing was scaled.
//!
//! Pods and deployments come from watches (reflector stores), so a round costs the API server
//! nothing unless the outcome changed; scrapes go straight to the pods.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::{api::core::v1::Pod, jiff::Timestamp};
use kube::{
    api::{Patch, PatchParams},
    runtime::{
        events::{Event, EventType, Recorder},
        reflector, watcher, WatchStreamExt,
    },
    Api, Client, Resource, ResourceExt,
};
use serde_json::json;
use tracing::{debug, info, warn};

use super::{
    compute_signals, decide, parse_metrics,
    status::{metrics_condition, record, record_hold},
    DecisionKind, Observation, PolicyConfig, PolicyState, ScrapeHistory, SignalConfig,
};
use crate::{
    api::{AutoscalingMode, AutoscalingStatus, ModelDeployment},
    reconcile::{
        desired_replicas,
        telemetry::{DecisionLabels, Metrics},
    },
    workload::{HTTP_PORT, LABEL_DEPLOYMENT, LABEL_RANK, LABEL_SERVING},
};

/// Event reasons of the autoscaler's decisions.
pub mod reasons {
    /// Replicas added for load or an SLO error.
    pub const SCALED_UP: &str = "ScaledUp";
    /// Replicas added at once for a burst.
    pub const BURST: &str = "BurstScaledUp";
    /// Replicas removed.
    pub const SCALED_DOWN: &str = "ScaledDown";
}

/// Event reason and metric direction of a decision that changes the count.
pub fn decision_reason(kind: DecisionKind) -> Option<(&'static str, &'static str)> {
    match kind {
        DecisionKind::Hold => None,
        DecisionKind::ScaleUp => Some((reasons::SCALED_UP, "up")),
        DecisionKind::Panic => Some((reasons::BURST, "burst")),
        DecisionKind::ScaleDown => Some((reasons::SCALED_DOWN, "down")),
    }
}

/// What a round reports to besides status.
struct Outputs<'a> {
    client: &'a Client,
    http: &'a reqwest::Client,
    recorder: &'a Recorder,
    metrics: &'a Metrics,
}

/// Field manager of the autoscaler's status writes.
pub const FIELD_MANAGER: &str = "llmo-autoscaler";

/// What the autoscaler keeps per deployment between rounds.
#[derive(Debug, Default)]
struct Tracked {
    state: PolicyState,
    history: ScrapeHistory,
    next_due: f64,
}

/// A serving pod as the autoscaler sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct ServingPod {
    /// Pod name.
    pub name: String,
    /// Its address, once it has one.
    pub ip: Option<String>,
    /// Running and Ready.
    pub ready: bool,
    /// Seconds since it was created.
    pub age: f64,
    /// Seconds from creation to its last turn to Ready, for a ready pod: how long this
    /// deployment's replicas take to start (scheduling, download, load).
    pub startup: Option<f64>,
}

/// The start-up time the policy plans with: the median over the ready pods that report one.
pub fn measured_startup(pods: &[ServingPod]) -> Option<f64> {
    let mut v: Vec<f64> = pods.iter().filter_map(|p| p.startup).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

/// The rank-0 pods of `md` that take traffic (draining groups excluded). Pure.
pub fn serving_pods(md: &ModelDeployment, pods: &[Arc<Pod>], now: Timestamp) -> Vec<ServingPod> {
    let name = md.name_any();
    let namespace = md.namespace().unwrap_or_default();
    pods.iter()
        .filter(|p| p.namespace().unwrap_or_default() == namespace)
        .filter(|p| {
            let l = p.labels();
            l.get(LABEL_DEPLOYMENT) == Some(&name)
                && l.get(LABEL_RANK).map(String::as_str) == Some("0")
                && l.get(LABEL_SERVING).map(String::as_str) != Some("false")
        })
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| {
            let status = p.status.as_ref();
            let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("Pending");
            if phase == "Failed" || phase == "Succeeded" {
                return None;
            }
            let ready_condition = status
                .and_then(|s| s.conditions.as_ref())
                .and_then(|c| c.iter().find(|c| c.type_ == "Ready" && c.status == "True"));
            let ready = phase == "Running" && ready_condition.is_some();
            let created = p.metadata.creation_timestamp.as_ref();
            let age = created
                .map(|t| now.duration_since(t.0).as_secs_f64().max(0.0))
                .unwrap_or(0.0);
            let startup = ready
                .then(|| {
                    let since = ready_condition?.last_transition_time.as_ref()?;
                    Some(since.0.duration_since(created?.0).as_secs_f64())
                })
                .flatten()
                .filter(|s| *s >= 0.0);
            Some(ServingPod {
                name: p.name_any(),
                ip: status.and_then(|s| s.pod_ip.clone()),
                ready,
                age,
                startup,
            })
        })
        .collect()
}

/// Runs the autoscaler until `shutdown` resolves.
pub async fn run(
    client: Client,
    http: reqwest::Client,
    metrics: Arc<Metrics>,
    managed_pods: &str,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let (mds, md_writer) = reflector::store::<ModelDeployment>();
    let md_watch = reflector::reflector(
        md_writer,
        watcher(
            Api::<ModelDeployment>::all(client.clone()),
            watcher::Config::default(),
        ),
    )
    .default_backoff()
    .applied_objects()
    .for_each(|_| futures::future::ready(()));
    let (pods, pod_writer) = reflector::store::<Pod>();
    let pod_watch = reflector::reflector(
        pod_writer,
        watcher(
            Api::<Pod>::all(client.clone()),
            watcher::Config::default().labels(managed_pods),
        ),
    )
    .default_backoff()
    .applied_objects()
    .for_each(|_| futures::future::ready(()));
    let watches = tokio::spawn(async move {
        tokio::join!(md_watch, pod_watch);
    });
    tokio::pin!(shutdown);
    // A stop that comes while the caches still fill (say, a SIGTERM right after winning the
    // lease) ends the autoscaler at once: the operator releases the lease only after it.
    tokio::select! {
        _ = async {
            let _ = mds.wait_until_ready().await;
            let _ = pods.wait_until_ready().await;
        } => {}
        () = &mut shutdown => {
            watches.abort();
            info!("autoscaler stopped before it started");
            return;
        }
    }
    info!("autoscaler started");
    let recorder = Recorder::new(client.clone(), "llmo-autoscaler".into());
    let out = Outputs {
        client: &client,
        http: &http,
        recorder: &recorder,
        metrics: &metrics,
    };

    let start = tokio::time::Instant::now();
    let mut tracked: BTreeMap<(String, String), Tracked> = BTreeMap::new();
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = &mut shutdown => break,
        }
        let t = start.elapsed().as_secs_f64();
        let all = mds.state();
        let existing: BTreeSet<(String, String)> = all
            .iter()
            .map(|m| (m.namespace().unwrap_or_default(), m.name_any()))
            .collect();
        tracked.retain(|key, _| existing.contains(key));
        // The reconciler is not called for a deployment that is gone; its series end here
        // (checked every tick, so a reconcile that finished after the delete is undone too).
        metrics.retain_deployments(&existing);
        let pod_list = pods.state();
        for md in all {
            if md.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let key = (md.namespace().unwrap_or_default(), md.name_any());
            let entry = tracked.entry(key).or_default();
            if t < entry.next_due {
                continue;
            }
            let interval = md.spec.autoscaling.interval.get().as_secs_f64().max(1.0);
            entry.next_due = t + interval;
            if let Err(e) = round(&out, &md, &pod_list, entry, t).await {
                warn!(deployment = %md.name_any(), error = %e, "autoscaler round failed");
            }
        }
    }
    watches.abort();
    info!("autoscaler stopped");
}

async fn round(
    out: &Outputs<'_>,
    md: &ModelDeployment,
    pods: &[Arc<Pod>],
    tracked: &mut Tracked,
    t: f64,
) -> Result<(), kube::Error> {
    let now = Timestamp::now();
    let cfg = PolicyConfig::from_spec(&md.spec);
    let signal_cfg = SignalConfig::for_interval(cfg.interval);
    let serving = serving_pods(md, pods, now);
    let ready: Vec<&ServingPod> = serving.iter().filter(|p| p.ready).collect();
    let starting_ages: Vec<f64> = serving.iter().filter(|p| !p.ready).map(|p| p.age).collect();

    let scrapes = futures::future::join_all(ready.iter().map(|p| scrape(out.http, p))).await;
    for (pod, scraped) in ready.iter().zip(scrapes) {
        match scraped {
            Ok(m) => tracked.history.record(&pod.name, t, m),
            Err(e) => debug!(pod = %pod.name, error = %e, "scrape failed"),
        }
    }
    let names: Vec<&str> = ready.iter().map(|p| p.name.as_str()).collect();
    tracked
        .history
        .prune(&names, t, signal_cfg.window + cfg.interval);
    let signals = compute_signals(&tracked.history, &names, t, &signal_cfg);

    let status = md.status.clone().unwrap_or_default();
    let mut autoscaling = status.autoscaling.clone().unwrap_or_default();
    let external = md.spec.autoscaling.mode == AutoscalingMode::External;
    // The count the policy last chose: applied (`desiredReplicas`) in `slo` mode, recommended in
    // `external` mode, where it starts from the count HPA or KEDA set.
    let recommended = autoscaling
        .recommended_replicas
        .and_then(|r| u32::try_from(r).ok())
        .filter(|r| *r > 0 && external);
    let current = recommended
        .unwrap_or_else(|| desired_replicas(md))
        .clamp(cfg.min, cfg.max.max(cfg.min));
    let mut desired = current;
    if let Ok(s) = &signals {
        let obs = Observation {
            now: t,
            signals: s,
            ready: u32::try_from(ready.len()).unwrap_or(u32::MAX),
            starting_ages: &starting_ages,
            current,
            startup_time: measured_startup(&serving),
        };
        let (decision, next) = decide(&cfg, &tracked.state, &obs);
        tracked.state = next;
        if decision.kind == DecisionKind::Hold {
            debug!(
                external,
                deployment = %md.name_any(),
                replicas = decision.from,
                ready = obs.ready,
                starting = starting_ages.len(),
                load = decision.load,
                capacity = ?decision.capacity,
                queue = decision.queue_depth,
                reason = %decision.reason,
                "holding"
            );
        } else {
            info!(
                deployment = %md.name_any(),
                external,
                from = decision.from,
                to = decision.to,
                reason = %decision.reason,
                "scaling decision"
            );
        }
        if let Some((reason, direction)) = decision_reason(decision.kind).filter(|_| !external) {
            out.metrics
                .scaling_decisions
                .get_or_create(&DecisionLabels {
                    namespace: md.namespace().unwrap_or_default(),
                    deployment: md.name_any(),
                    direction,
                })
                .inc();
            let event = Event {
                type_: EventType::Normal,
                reason: reason.to_owned(),
                note: Some(format!(
                    "{} -> {} replicas: {}",
                    decision.from, decision.to, decision.reason
                )),
                action: "Scale".to_owned(),
                secondary: None,
            };
            if let Err(e) = out.recorder.publish(&event, &md.object_ref(&())).await {
                warn!(deployment = %md.name_any(), error = %e, "could not record a scaling event");
            }
        }
        desired = decision.to;
        // Tokens per dollar from the plan's price of one replica (the GPUClass price times its
        // GPUs), when the class has a price.
        let price = status.plan.as_ref().and_then(|p| p.cost_per_hour);
        record(&mut autoscaling, s, &decision, price, now);
    }
    if let Err(e) = &signals {
        debug!(deployment = %md.name_any(), reason = e.reason, message = %e.message, "no signals");
        record_hold(&mut autoscaling, current, e);
    }
    // The policy's count this round (`current` when there were no signals to decide on).
    out.metrics
        .record_recommendation(&md.namespace().unwrap_or_default(), &md.name_any(), desired);
    let (_, reason, message) = metrics_condition(&signals);
    autoscaling.metrics_reason = Some(reason.to_owned());
    autoscaling.metrics_message = Some(message);
    // In `external` mode `desiredReplicas` is the reconciler's: the count HPA or KEDA set.
    let desired = (!external).then_some(desired);
    let unchanged = desired.is_none_or(|d| i64::from(d) == i64::from(status.desired_replicas))
        && status.autoscaling.as_ref() == Some(&autoscaling);
    if unchanged {
        return Ok(());
    }
    write(out.client, md, desired, &autoscaling).await
}

async fn scrape(http: &reqwest::Client, pod: &ServingPod) -> Result<super::PodMetrics, String> {
    let ip = pod.ip.as_deref().ok_or("no pod IP yet")?;
    let body = http
        .get(format!("http://{ip}:{HTTP_PORT}/metrics"))
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .map_err(|e| e.to_string())?
        .text()
        .await
        .map_err(|e| e.to_string())?;
    parse_metrics(&body).map_err(|e| e.to_string())
}

async fn write(
    client: &Client,
    md: &ModelDeployment,
    desired: Option<u32>,
    autoscaling: &AutoscalingStatus,
) -> Result<(), kube::Error> {
    let api: Api<ModelDeployment> =
        Api::namespaced(client.clone(), &md.namespace().unwrap_or_default());
    let mut status = json!({ "autoscaling": autoscaling });
    if let Some(desired) = desired {
        status["desiredReplicas"] = json!(desired);
    }
    let body = json!({
        "apiVersion": ModelDeployment::api_version(&()),
        "kind": ModelDeployment::kind(&()),
        "status": status,
    });
    api.patch_status(
        &md.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(body),
    )
    .await
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(
        name: &str,
        labels: serde_json::Value,
        phase: &str,
        ready: bool,
        created: Timestamp,
    ) -> Arc<Pod> {
        let ready_at = created + k8s_openapi::jiff::SignedDuration::from_secs(12);
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {
                    "name": name, "namespace": "default", "labels": labels,
                    "creationTimestamp": created.to_string(),
                },
                "status": {
                    "phase": phase,
                    "podIP": "10.0.0.1",
                    "conditions": [{
                        "type": "Ready",
                        "status": if ready {"True"} else {"False"},
                        "lastTransitionTime": ready_at.to_string(),
                    }],
                },
            }))
            .unwrap(),
        )
    }

    #[test]
    fn serving_pods_are_rank_zero_of_this_deployment_and_not_draining() {
        let md: ModelDeployment = serde_json::from_value(json!({
            "apiVersion": "llmo.dev/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": "m", "namespace": "default"},
            "spec": {"model": {"uri": "hf://a/b"}, "gpu": {"class": "l4"}},
        }))
        .unwrap();
        let now = Timestamp::now();
        let t0 = now - k8s_openapi::jiff::SignedDuration::from_secs(30);
        let l = |dep: &str, rank: &str, serving: &str| json!({LABEL_DEPLOYMENT: dep, LABEL_RANK: rank, LABEL_SERVING: serving});
        let pods = vec![
            pod("a", l("m", "0", "true"), "Running", true, t0),
            pod("b", l("m", "1", "true"), "Running", true, t0),
            pod("c", l("other", "0", "true"), "Running", true, t0),
            pod("d", l("m", "0", "false"), "Running", true, t0),
            pod("e", l("m", "0", "true"), "Pending", false, t0),
            pod("f", l("m", "0", "true"), "Failed", false, t0),
        ];
        let got = serving_pods(&md, &pods, now);
        let names: Vec<(&str, bool)> = got.iter().map(|p| (p.name.as_str(), p.ready)).collect();
        assert_eq!(names, [("a", true), ("e", false)]);
        assert!((got[1].age - 30.0).abs() < 1.0);
        // Ready 12 s after creation: the measured start-up; a pod still starting has none.
        assert_eq!(got[0].startup, Some(12.0));
        assert_eq!(got[1].startup, None);
        assert_eq!(measured_startup(&got), Some(12.0));
        assert_eq!(measured_startup(&got[1..]), None);
    }
}
