//! The reconcile loop: the thin part that reads from and writes to the API server.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use futures::{FutureExt, StreamExt};
use k8s_openapi::{
    api::core::v1::{ObjectReference, Pod, Service},
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    jiff::{SignedDuration, Timestamp},
};
use kube::{
    api::{DeleteParams, ListParams, Patch, PatchParams},
    runtime::{
        controller::Action,
        events::{Event, EventType, Recorder},
        reflector::{self, ObjectRef, Store},
        watcher, Controller, WatchStreamExt,
    },
    Api, Client, Resource, ResourceExt,
};
use serde_json::json;
use tracing::{info, warn};

use super::{
    conditions::set_condition,
    decide::{
        decide, desired_replicas, drain_step, observe_groups, DrainProbe, DrainStep, ObservedGroup,
        DRAIN_PROPAGATION,
    },
    leader::{Elector, LeaseConfig},
    telemetry::{self, Health, Metrics, ResultLabel},
    ReconcileError,
};
use crate::{
    api::{
        conditions::{self as cond, reasons},
        validate_model_deployment, AutoscalingMode, EnvVar, GPUClass, GPUNode, GroupState,
        GroupStatus, ModelDeployment, ModelDeploymentStatus, RankPlacement,
    },
    autoscale::status::METRICS_AVAILABLE,
    placement::{place_group, GroupRequest, NodeInventory, Spread, TakenGpus},
    plan::{plan_layout, ModelArch, Plan},
    preview::{hardware_for, plan_request},
    workload::{
        build_endpoint_service, build_group_pods, build_group_service, group_name, revision_hash,
        with_cluster_env, GroupSpec, ANNOTATION_DRAIN_STARTED, FIELD_MANAGER, HTTP_PORT,
        LABEL_DEPLOYMENT, LABEL_GROUP, LABEL_SERVING,
    },
};

/// Flags of `llmo-operator run`.
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// How often a deployment is reconciled when nothing changes.
    #[arg(long, env = "LLMO_RESYNC", default_value = "5m", value_parser = parse_duration)]
    pub resync: Duration,
    /// Address of the /metrics, /healthz and /readyz endpoints.
    #[arg(long, env = "LLMO_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,
    /// Elect one leader among the operator's replicas through a Lease; only it reconciles.
    #[arg(long, env = "LLMO_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_elect: bool,
    /// Name of the Lease.
    #[arg(long, env = "LLMO_LEASE_NAME", default_value = "llmo-operator")]
    pub lease_name: String,
    /// Namespace of the Lease: the operator's own (POD_NAMESPACE in a pod).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,
    /// This replica's identity in the Lease (POD_NAME in a pod; the host name otherwise).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// How long a Lease renewal is good for; a standby takes over this long after the leader's
    /// death at most.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    pub lease_duration: Duration,
    /// An environment variable for every llmo-serve pod, as NAME=VALUE (repeatable): a Hub
    /// mirror (HF_ENDPOINT), proxies, a token. A deployment's own `spec.serving.env` wins.
    #[arg(long = "serving-env", value_name = "NAME=VALUE", value_parser = parse_env)]
    pub serving_env: Vec<EnvVar>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    s.parse::<crate::api::HumanDuration>()
        .map(|d| d.get())
        .map_err(|e| e.to_string())
}

fn parse_env(s: &str) -> Result<EnvVar, String> {
    let (name, value) = s
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=VALUE, got {s:?}"))?;
    let valid = !name.is_empty()
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.starts_with(|c: char| c.is_ascii_digit());
    if !valid {
        return Err(format!("{name:?} is not a valid environment variable name"));
    }
    if name.starts_with("LLMO_") {
        return Err(format!(
            "{name} is reserved: llmo sets LLMO_ variables from each deployment's plan"
        ));
    }
    Ok(EnvVar {
        name: name.to_owned(),
        value: value.to_owned(),
    })
}

struct Context {
    client: Client,
    recorder: Recorder,
    resync: Duration,
    metrics: Arc<Metrics>,
    serving_env: Vec<EnvVar>,
    /// For `POST /drain` to serving pods.
    http: reqwest::Client,
    /// What the watches know: llmo's pods, the GPU nodes and the classes. Reads come from here,
    /// not from a LIST per reconcile, so a reconcile costs the API server its writes only.
    pods: Store<Pod>,
    services: Store<Service>,
    nodes: Store<GPUNode>,
    classes: Store<GPUClass>,
    /// Placement is one critical section across deployments, so two reconciles running at once
    /// never hand out the same GPU; pods created but not yet seen by the watch are held here.
    placing: tokio::sync::Mutex<Reservations>,
}

/// GPUs of pods created by this operator that its pod watch has not delivered yet.
#[derive(Debug, Default)]
struct Reservations {
    /// `namespace/pod` -> what it holds.
    pods: BTreeMap<String, Reservation>,
}

#[derive(Debug)]
struct Reservation {
    group: String,
    node: String,
    gpus: BTreeSet<u32>,
    at: std::time::Instant,
}

/// How long a reservation waits for its pod to show up in the watch before it is dropped.
const RESERVATION_TTL: Duration = Duration::from_secs(60);

impl Reservations {
    /// Drops reservations whose pods the watch now shows, or that are too old to matter.
    fn settle(&mut self, seen: &[Arc<Pod>]) {
        let seen: BTreeSet<String> = seen
            .iter()
            .map(|p| format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any()))
            .collect();
        self.pods
            .retain(|key, r| !seen.contains(key) && r.at.elapsed() < RESERVATION_TTL);
    }

    /// Groups (`namespace/group`) with pods in flight.
    fn groups(&self, namespace: &str) -> BTreeSet<String> {
        self.pods
            .iter()
            .filter(|(key, _)| key.split('/').next() == Some(namespace))
            .map(|(_, r)| r.group.clone())
            .collect()
    }
}

impl Context {
    /// Records a decision as an Event on the deployment (`kubectl describe md` shows them). A
    /// failed Event write is logged, never fatal: the decision itself already happened.
    async fn event(
        &self,
        md: &ModelDeployment,
        warning: bool,
        reason: &str,
        action: &str,
        note: String,
    ) {
        self.event_about(md, None, warning, reason, action, note)
            .await;
    }

    /// An Event about one of the deployment's groups. The group (its Service) is the Event's
    /// related object, so decisions about different groups are separate Events rather than
    /// repeats of the first one.
    async fn event_about(
        &self,
        md: &ModelDeployment,
        group: Option<&str>,
        warning: bool,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let secondary = group.map(|g| ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Service".into()),
            name: Some(g.to_owned()),
            namespace: md.namespace(),
            ..Default::default()
        });
        let event = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.to_owned(),
            note: Some(note),
            action: action.to_owned(),
            secondary,
        };
        if let Err(e) = self.recorder.publish(&event, &md.object_ref(&())).await {
            warn!(deployment = %md.name_any(), error = %e, "could not record an event");
        }
    }
}

const MANAGED: &str = "app.kubernetes.io/managed-by=llmo-operator";
const PLANNED_GPUS: &str = "llmo.dev/planned-gpus";

/// A client whose every request is counted in `llmo_operator_api_requests_total`.
async fn counting_client(metrics: Arc<Metrics>) -> Result<Client, ReconcileError> {
    let config = kube::Config::infer()
        .await
        .map_err(|e| ReconcileError::Config(e.to_string()))?;
    let builder = kube::client::ClientBuilder::try_from(config)
        .map_err(|e| ReconcileError::Config(e.to_string()))?;
    let layer = tower::util::MapRequestLayer::new(move |req: http::Request<kube::client::Body>| {
        metrics.count_request(req.method(), req.uri());
        req
    });
    Ok(builder.with_layer(&layer).build())
}

/// Fails with a message that says how to install the CRDs when they are missing.
async fn check_crds(client: &Client) -> Result<(), ReconcileError> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for name in [
        "modeldeployments.llmo.dev",
        "gpuclasses.llmo.dev",
        "gpunodes.llmo.dev",
    ] {
        match crds.get_opt(name).await {
            Ok(Some(_)) => {}
            Ok(None) => return Err(ReconcileError::CrdsMissing(format!("{name} not found"))),
            Err(e) => return Err(ReconcileError::kube(format!("reading CRD {name}"), e)),
        }
    }
    Ok(())
}

/// Runs the operator until SIGTERM or Ctrl-C: the health and metrics endpoints, the leader
/// election and, while leading, the controller.
pub async fn run(args: RunArgs) -> Result<(), ReconcileError> {
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::default());
    let addr = args.metrics_addr;
    let server = tokio::spawn(telemetry::serve(addr, metrics.clone(), health.clone()).map(
        move |r| {
            if let Err(e) = r {
                tracing::error!(%addr, error = %e, "cannot serve /metrics, /healthz and /readyz; pick another --metrics-addr");
            }
        },
    ));
    let result = run_inner(args, metrics, health).await;
    server.abort();
    result
}

async fn run_inner(
    args: RunArgs,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
) -> Result<(), ReconcileError> {
    // One listener for the whole run, installed first: a SIGTERM that arrives while the controller
    // is still starting (say, right after winning the lease) must not be lost.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        info!("stop requested: finishing running reconciles, then giving up the lease");
        let _ = stop_tx.send(true);
    });
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let client = counting_client(metrics.clone()).await?;
    check_crds(&client).await?;
    // Ready: the process is up and configured; a standby is as ready as the leader.
    health.ready.store(true, Ordering::SeqCst);

    let mut elector = None;
    if args.leader_elect {
        let identity = args.identity.clone().unwrap_or_else(default_identity);
        let mut e = Elector::new(
            client.clone(),
            LeaseConfig {
                name: args.lease_name.clone(),
                namespace: args.lease_namespace.clone(),
                identity,
                duration: args.lease_duration,
                renew: (args.lease_duration / 3).max(Duration::from_millis(500)),
            },
        );
        tokio::select! {
            r = e.acquire() => r?,
            _ = stopped() => {
                info!("stopped while standing by");
                return Ok(());
            }
        }
        metrics.leader.set(1);
        elector = Some(e);
    }

    // Stop reconciling on a signal, or at once when the lease is lost.
    let (lost_tx, lost_rx) = tokio::sync::oneshot::channel::<()>();
    let (done_tx, mut done_rx) = tokio::sync::oneshot::channel::<()>();
    let renewer = elector.map(|mut e| {
        let period = (args.lease_duration / 3).max(Duration::from_millis(500));
        let deadline = args.lease_duration;
        tokio::spawn(async move {
            let mut last_ok = tokio::time::Instant::now();
            let mut lost_tx = Some(lost_tx);
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(period) => {}
                    // The controller stopped: hand the elector back for release.
                    _ = &mut done_rx => return e,
                }
                match e.renew().await {
                    Ok(true) => last_ok = tokio::time::Instant::now(),
                    Ok(false) => {
                        warn!("another replica took the lease");
                        break;
                    }
                    Err(err) => {
                        warn!(error = %err, "could not renew the lease");
                        if last_ok.elapsed() >= deadline {
                            warn!("lease not renewed within its duration");
                            break;
                        }
                    }
                }
            }
            if let Some(tx) = lost_tx.take() {
                let _ = tx.send(());
            }
            e
        })
    });
    // Halting: a stop was asked for, or the lease was lost.
    let lost = Arc::new(AtomicBool::new(false));
    let lost_flag = lost.clone();
    let (halt_tx, halt_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        tokio::select! {
            _ = stopped() => {}
            r = lost_rx => {
                if r.is_ok() {
                    lost_flag.store(true, Ordering::SeqCst);
                }
            }
        }
        let _ = halt_tx.send(true);
    });
    let halted = move || {
        let mut rx = halt_rx.clone();
        async move {
            let _ = rx.wait_for(|h| *h).await;
        }
    };

    let mds: Api<ModelDeployment> = Api::all(client.clone());
    let managed = watcher::Config::default().labels(MANAGED);
    let controller = Controller::new(mds, watcher::Config::default())
        .with_config(kube::runtime::controller::Config::default().concurrency(8));
    let store = controller.store();
    // kube's controller starts reconciling only once its cache of deployments is filled, and
    // its graceful stop waits for that start: a stop that came before the first list (say, a
    // SIGTERM right after winning the lease) would wait forever. So the graceful stop is
    // passed on only once the cache is filled, or after a bounded wait.
    let graceful = {
        let cache = store.clone();
        let halt = halted();
        async move {
            halt.await;
            let _ = tokio::time::timeout(CACHE_WAIT, cache.wait_until_ready()).await;
        }
    };
    let (pods, pod_watch) = watched::<Pod>(&client, managed.clone());
    let (services, service_watch) = watched::<Service>(&client, managed.clone());
    let (nodes, node_watch) = watched::<GPUNode>(&client, watcher::Config::default());
    let (classes, class_watch) = watched::<GPUClass>(&client, watcher::Config::default());
    let _watches = AbortOnDrop(vec![pod_watch, service_watch, node_watch, class_watch]);
    for (what, ready) in [
        ("pods", pods.wait_until_ready().boxed()),
        ("services", services.wait_until_ready().boxed()),
        ("GPUNodes", nodes.wait_until_ready().boxed()),
        ("GPUClasses", classes.wait_until_ready().boxed()),
    ] {
        ready
            .await
            .map_err(|e| ReconcileError::Config(format!("the {what} watch stopped: {e}")))?;
    }
    let ctx = Arc::new(Context {
        client: client.clone(),
        recorder: Recorder::new(client.clone(), "llmo-operator".into()),
        resync: args.resync,
        metrics: metrics.clone(),
        serving_env: args.serving_env.clone(),
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .connect_timeout(Duration::from_secs(1))
            .build()
            .map_err(|e| ReconcileError::Config(format!("HTTP client: {e}")))?,
        pods,
        services,
        nodes,
        classes,
        placing: tokio::sync::Mutex::new(Reservations::default()),
    });
    info!("llmo operator started");
    // The autoscaler runs beside the controller, under the same leadership.
    let (autoscaler_stop_tx, autoscaler_stop) = tokio::sync::oneshot::channel::<()>();
    let autoscaler = tokio::spawn(crate::autoscale::runner::run(
        client.clone(),
        ctx.http.clone(),
        ctx.metrics.clone(),
        MANAGED,
        async move {
            let _ = autoscaler_stop.await;
        },
    ));
    let controller = controller
        .owns(Api::<Pod>::all(client.clone()), managed.clone())
        .owns(Api::<Service>::all(client.clone()), managed)
        // Capacity changed: deployments still waiting for GPUs may fit now, and those running on
        // the node may have lost it. Settled deployments elsewhere are not disturbed.
        .watches(
            Api::<GPUNode>::all(client),
            watcher::Config::default(),
            move |node: GPUNode| {
                let node = node.name_any();
                store
                    .state()
                    .iter()
                    .filter(|md| concerned_by_node(md, &node))
                    .map(|md| ObjectRef::from_obj(md.as_ref()))
                    .collect::<Vec<_>>()
            },
        )
        .graceful_shutdown_on(graceful)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                warn!(error = %e, "reconcile failed");
            }
        });
    // Running reconciles get a bounded time to finish, so the lease is always given up within
    // the pod's termination grace period.
    tokio::select! {
        () = controller => info!("controller stopped"),
        () = async {
            halted().await;
            tokio::time::sleep(STOP_GRACE).await;
        } => warn!(
            grace = ?STOP_GRACE,
            "reconciles still running after the grace period; stopping without them"
        ),
    }
    let _ = autoscaler_stop_tx.send(());
    let _ = autoscaler.await;
    metrics.leader.set(0);
    if lost.load(Ordering::SeqCst) {
        return Err(ReconcileError::LeaseLost);
    }
    if let Some(handle) = renewer {
        let _ = done_tx.send(());
        if let Ok(mut e) = handle.await {
            e.release().await;
        }
    }
    info!("llmo operator stopped");
    Ok(())
}

/// After a stop, how long the controller's cache may take to fill before the stop is passed on.
const CACHE_WAIT: Duration = Duration::from_secs(5);

/// After a stop, how long running reconciles may take to finish. Kubernetes gives a pod 30 s
/// by default; the lease is released after this.
const STOP_GRACE: Duration = Duration::from_secs(20);

fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "llmo-operator".into());
    format!("{host}-{}", std::process::id())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

fn error_policy(md: Arc<ModelDeployment>, error: &ReconcileError, _: Arc<Context>) -> Action {
    warn!(deployment = %md.name_any(), %error, "will retry");
    Action::requeue(Duration::from_secs(15))
}

/// The inputs of one reconcile that decide its outcome, short of the API calls.
enum Planned {
    Ready {
        plan: Box<Plan>,
        class: Box<GPUClass>,
    },
    Refused {
        reason: &'static str,
        message: String,
    },
}

fn plan_for(md: &ModelDeployment, classes: &Store<GPUClass>) -> Result<Planned, ReconcileError> {
    if let Err(errors) = validate_model_deployment(md) {
        return Ok(Planned::Refused {
            reason: reasons::INVALID_SPEC,
            message: errors.to_string(),
        });
    }
    let class_name = &md.spec.gpu.class;
    let Some(class) = classes
        .get(&ObjectRef::new(class_name))
        .map(|c| (*c).clone())
    else {
        return Ok(Planned::Refused {
            reason: reasons::DOES_NOT_FIT,
            message: format!("GPUClass {class_name:?} does not exist; `kubectl get gpuclasses` lists the classes, and the chart installs the defaults"),
        });
    };
    let planned = md
        .spec
        .model
        .architecture
        .as_ref()
        .ok_or_else(|| crate::plan::PlanError::Architecture {
            message: "spec.model.architecture is needed to plan: give parameters, layers, hiddenSize, attentionHeads and kvHeads".into(),
        })
        .and_then(ModelArch::from_hints)
        .and_then(|arch| {
            let hw = hardware_for(md, &class)?;
            plan_layout(&plan_request(md, &arch, &hw))
        });
    Ok(match planned {
        Ok(plan) => Planned::Ready {
            plan: Box::new(plan),
            class: Box::new(class),
        },
        Err(e) => Planned::Refused {
            reason: reasons::DOES_NOT_FIT,
            message: e.to_string(),
        },
    })
}

async fn reconcile(md: Arc<ModelDeployment>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let started = std::time::Instant::now();
    let result = reconcile_once(&md, &ctx).await;
    ctx.metrics
        .reconcile_duration
        .observe(started.elapsed().as_secs_f64());
    let outcome = match &result {
        Ok((_, Outcome::Refused)) => "refused",
        Ok((_, Outcome::Reconciled)) => "ok",
        Err(_) => "error",
    };
    ctx.metrics
        .reconciles
        .get_or_create(&ResultLabel { result: outcome })
        .inc();
    result.map(|(action, _)| action)
}

/// Whether a reconcile got as far as applying objects.
enum Outcome {
    Reconciled,
    Refused,
}

async fn reconcile_once(
    md: &ModelDeployment,
    ctx: &Context,
) -> Result<(Action, Outcome), ReconcileError> {
    let client = &ctx.client;
    let name = md.name_any();
    let namespace = md.namespace().unwrap_or_else(|| "default".into());
    let generation = md.metadata.generation;
    let now = Timestamp::now();
    let original = md.status.clone();
    let mut status = original.clone().unwrap_or_default();
    status.observed_generation = generation;
    // Cluster-wide serving env is part of what shapes the pods (and so of the revision).
    let md = &with_cluster_env(md, &ctx.serving_env);

    let (plan, class) = match plan_for(md, &ctx.classes)? {
        Planned::Ready { plan, class } => (plan, class),
        Planned::Refused { reason, message } => {
            info!(deployment = %name, %reason, %message, "not planned");
            // One Event per new refusal, not one per resync.
            let already = status
                .conditions
                .iter()
                .any(|c| c.type_ == cond::PLANNED && c.status == "False" && c.message == message);
            if !already {
                ctx.event(md, true, reason, "Plan", message.clone()).await;
            }
            set_condition(
                &mut status.conditions,
                cond::PLANNED,
                false,
                reason,
                &message,
                generation,
                now,
            );
            let degraded = reason == reasons::INVALID_SPEC;
            set_condition(
                &mut status.conditions,
                cond::DEGRADED,
                degraded,
                if degraded { reason } else { "Valid" },
                if degraded {
                    message.clone()
                } else {
                    "the spec is valid".into()
                },
                generation,
                now,
            );
            write_status(client, md, original.as_ref(), &status).await?;
            // An invalid spec waits for a change; a missing class or capacity is retried.
            let action = if degraded {
                Action::await_change()
            } else {
                Action::requeue(Duration::from_secs(60))
            };
            return Ok((action, Outcome::Refused));
        }
    };
    set_condition(
        &mut status.conditions,
        cond::DEGRADED,
        false,
        "Valid",
        "the spec is valid",
        generation,
        now,
    );
    set_condition(
        &mut status.conditions,
        cond::PLANNED,
        true,
        "Planned",
        &plan.reason,
        generation,
        now,
    );
    let device = class.spec.device;
    status.plan = Some(plan.to_status(&md.spec.gpu.class));
    let revision = revision_hash(&md.spec, &plan);
    if status.revision.as_deref() != Some(revision.as_str()) {
        let note = format!("revision {revision}: {}", plan.reason);
        ctx.event(md, false, "Planned", "Plan", note).await;
    }

    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let existing: Vec<Pod> = ctx
        .pods
        .state()
        .iter()
        .filter(|p| {
            p.namespace().as_deref() == Some(namespace.as_str())
                && p.labels().get(LABEL_DEPLOYMENT) == Some(&name)
        })
        .map(|p| (**p).clone())
        .collect();
    let observed = observe_groups(&existing);
    let desired = desired_replicas(md);
    let decision = decide(&revision, plan.layout.pipeline, desired, &observed);

    let services: Api<Service> = Api::namespaced(client.clone(), &namespace);
    let mut deleted: Vec<String> = Vec::new();
    for (group, why) in &decision.delete {
        delete_group(ctx, md, &pods, &services, group, why).await?;
        deleted.push(group.clone());
    }
    // Graceful removals: out of the Service first, then drained, then deleted.
    let mut drain_pending = false;
    for (group, why) in &decision.drain {
        info!(deployment = %name, %group, why, "draining group");
        let note = format!("draining group {group}: {why}");
        ctx.event_about(md, Some(group), false, "GroupDraining", "Drain", note)
            .await;
        start_drain(&pods, &existing, group, now).await?;
        drain_pending = true;
    }
    for g in observed
        .iter()
        .filter(|g| g.draining_since.is_some() && !g.deleting)
    {
        let step = if g.failed {
            DrainStep::Delete("a pod failed while draining".into())
        } else {
            let started = g.draining_since.unwrap_or(now);
            let probes = if now.duration_since(started)
                < SignedDuration::try_from(DRAIN_PROPAGATION).unwrap_or_default()
            {
                Vec::new()
            } else {
                probe_drain(&ctx.http, &existing, &g.name).await
            };
            drain_step(started, now, &probes)
        };
        match step {
            DrainStep::Propagate | DrainStep::Wait => drain_pending = true,
            DrainStep::Delete(why) => {
                delete_group(ctx, md, &pods, &services, &g.name, &why).await?;
                deleted.push(g.name.clone());
            }
        }
    }

    let apply = PatchParams::apply(FIELD_MANAGER).force();
    let mut placement_error = None;
    // Groups applied in this reconcile (or a moment ago, still in flight).
    let mut created = 0usize;
    if !decision.create.is_empty() {
        let mut reservations = ctx.placing.lock().await;
        let all_pods = ctx.pods.state();
        reservations.settle(&all_pods);
        let in_flight = reservations.groups(&namespace);
        let (nodes, mut taken) = inventory(&ctx.nodes.state(), &all_pods, &reservations);
        let mut spread = Spread::default();
        for g in observed.iter().filter(|g| g.revision == revision) {
            for rank in ranks_of(&existing, &g.name) {
                spread.add(&rank, &nodes);
            }
        }
        let request = GroupRequest::for_plan(&md.spec.gpu.class, device, &plan);
        for &index in &decision.create {
            if in_flight.contains(&group_name(&name, &revision, index)) {
                // Created a moment ago; the pod watch has not delivered it yet.
                created += 1;
                continue;
            }
            let placement = match place_group(&request, &nodes, &mut taken, &mut spread) {
                Ok(p) => p,
                Err(e) => {
                    let message = e.to_string();
                    let already = status.conditions.iter().any(|c| {
                        c.type_ == cond::PLACED && c.status == "False" && c.message == message
                    });
                    if !already {
                        let reason = reasons::INSUFFICIENT_CAPACITY;
                        ctx.event(md, true, reason, "Place", message.clone()).await;
                    }
                    placement_error = Some(message);
                    break;
                }
            };
            let group = GroupSpec {
                deployment: md,
                plan: &plan,
                revision: &revision,
                index,
                placement: &placement,
                device,
            };
            info!(deployment = %name, group = %group.name(), "creating group");
            let nodes: Vec<String> = placement.iter().map(|r| r.node.clone()).collect();
            let note = format!("created group {} on {}", group.name(), nodes.join(", "));
            ctx.event_about(
                md,
                Some(&group.name()),
                false,
                "GroupCreated",
                "Create",
                note,
            )
            .await;
            let svc = build_group_service(&group);
            services
                .patch(&group.name(), &apply, &Patch::Apply(&svc))
                .await
                .map_err(|e| {
                    ReconcileError::kube(format!("applying service {}", group.name()), e)
                })?;
            created += 1;
            for (pod, rank) in build_group_pods(&group).into_iter().zip(placement.iter()) {
                let pod_name = pod.name_any();
                pods.patch(&pod_name, &apply, &Patch::Apply(&pod))
                    .await
                    .map_err(|e| ReconcileError::kube(format!("applying pod {pod_name}"), e))?;
                reservations.pods.insert(
                    format!("{namespace}/{pod_name}"),
                    Reservation {
                        group: group.name(),
                        node: rank.node.clone(),
                        gpus: rank.gpus.iter().copied().collect(),
                        at: std::time::Instant::now(),
                    },
                );
            }
        }
    }
    let endpoint = build_endpoint_service(md);
    let current_endpoint = ctx.services.get(&ObjectRef::new(&name).within(&namespace));
    if !endpoint_matches(current_endpoint.as_deref(), &endpoint) {
        services
            .patch(&name, &apply, &Patch::Apply(&endpoint))
            .await
            .map_err(|e| ReconcileError::kube(format!("applying service {name}"), e))?;
    }

    // Status from what exists now (deleted groups excluded; created ones show up next time).
    let live: Vec<&ObservedGroup> = observed
        .iter()
        .filter(|g| !deleted.contains(&g.name))
        .collect();
    let pipeline = plan.layout.pipeline;
    let ready = live
        .iter()
        .filter(|g| g.state(pipeline) == crate::api::GroupState::Ready)
        .count();
    status.replicas = count(live.len() + created);
    status.ready_replicas = count(ready);
    status.updated_replicas =
        count(live.iter().filter(|g| g.revision == revision).count() + created);
    status.desired_replicas = i32::try_from(desired).unwrap_or(i32::MAX);
    status.selector = Some(format!("{LABEL_DEPLOYMENT}={name}"));
    status.revision = Some(revision.clone());
    status.endpoint = Some(format!("http://{name}.{namespace}.svc"));
    status.groups = live
        .iter()
        .map(|g| GroupStatus {
            name: g.name.clone(),
            revision: g.revision.clone(),
            state: g.state(pipeline),
            ranks: ranks_of(&existing, &g.name),
        })
        .collect();
    match &placement_error {
        Some(e) => set_condition(
            &mut status.conditions,
            cond::PLACED,
            false,
            reasons::INSUFFICIENT_CAPACITY,
            e,
            generation,
            now,
        ),
        None => set_condition(
            &mut status.conditions,
            cond::PLACED,
            true,
            "Placed",
            "every group has nodes",
            generation,
            now,
        ),
    }
    let min = u32::try_from(md.spec.replicas.min).unwrap_or(1) as usize;
    set_condition(
        &mut status.conditions,
        cond::AVAILABLE,
        ready >= min,
        if ready >= min {
            "MinimumReplicasReady"
        } else {
            "Starting"
        },
        format!("{ready} of {desired} replicas ready (at least {min} needed)"),
        generation,
        now,
    );
    let progressing = decision.rolling
        || drain_pending
        || !decision.create.is_empty()
        || ready < desired as usize;
    set_condition(
        &mut status.conditions,
        cond::PROGRESSING,
        progressing,
        if decision.rolling {
            "RollingOut"
        } else if drain_pending {
            "Draining"
        } else if progressing {
            "Scaling"
        } else {
            "Stable"
        },
        format!(
            "{} of {desired} replicas at revision {revision} are ready",
            decision.ready_current
        ),
        generation,
        now,
    );
    // The autoscaler's verdict on the metrics, as a condition (it writes no conditions itself).
    if md.spec.autoscaling.mode == AutoscalingMode::Slo {
        if let Some(a) = status.autoscaling.clone() {
            if let Some(reason) = a.metrics_reason {
                set_condition(
                    &mut status.conditions,
                    METRICS_AVAILABLE,
                    reason == crate::autoscale::status::REASON_SCRAPED,
                    &reason,
                    a.metrics_message.unwrap_or_default(),
                    generation,
                    now,
                );
            }
        }
    } else {
        status.conditions.retain(|c| c.type_ != METRICS_AVAILABLE);
    }
    write_status(client, md, original.as_ref(), &status).await?;
    let states: Vec<GroupState> = status.groups.iter().map(|g| g.state).collect();
    ctx.metrics.record_deployment(
        &namespace,
        &name,
        &states,
        desired,
        u32::try_from(ready).unwrap_or(u32::MAX),
    );
    // Pods and GPU nodes are watched, so progress and new capacity wake the deployment up on
    // their own; only drains, which move with the pods' traffic, are polled.
    let action = if drain_pending {
        Action::requeue(Duration::from_secs(3))
    } else if placement_error.is_some() {
        Action::requeue(Duration::from_secs(60))
    } else {
        Action::requeue(ctx.resync)
    };
    Ok((action, Outcome::Reconciled))
}

/// Deletes a group's pods and its headless Service now.
async fn delete_group(
    ctx: &Context,
    md: &ModelDeployment,
    pods: &Api<Pod>,
    services: &Api<Service>,
    group: &str,
    why: &str,
) -> Result<(), ReconcileError> {
    info!(deployment = %md.name_any(), %group, why, "deleting group");
    let note = format!("deleted group {group}: {why}");
    ctx.event_about(md, Some(group), false, "GroupDeleted", "Delete", note)
        .await;
    pods.delete_collection(
        &DeleteParams::default(),
        &ListParams::default().labels(&format!("{LABEL_GROUP}={group}")),
    )
    .await
    .map_err(|e| ReconcileError::kube(format!("deleting pods of group {group}"), e))?;
    match services.delete(group, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.is_not_found() => Ok(()),
        Err(e) => Err(ReconcileError::kube(format!("deleting service {group}"), e)),
    }
}

/// Takes a group's pods out of the deployment's Service and records when its drain started.
async fn start_drain(
    pods: &Api<Pod>,
    existing: &[Pod],
    group: &str,
    now: Timestamp,
) -> Result<(), ReconcileError> {
    let patch = json!({
        "metadata": {
            "labels": {LABEL_SERVING: "false"},
            "annotations": {ANNOTATION_DRAIN_STARTED: now.to_string()},
        }
    });
    for pod in existing
        .iter()
        .filter(|p| p.labels().get(LABEL_GROUP).map(String::as_str) == Some(group))
    {
        let pod_name = pod.name_any();
        match pods
            .patch(
                &pod_name,
                &PatchParams {
                    field_manager: Some(FIELD_MANAGER.into()),
                    ..PatchParams::default()
                },
                &Patch::Merge(&patch),
            )
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.is_not_found() => {}
            Err(e) => {
                return Err(ReconcileError::kube(
                    format!("marking pod {pod_name} as draining"),
                    e,
                ))
            }
        }
    }
    Ok(())
}

/// Asks every pod of a draining group to drain (`POST /drain`, idempotent) and reads how many
/// requests each still runs.
async fn probe_drain(http: &reqwest::Client, existing: &[Pod], group: &str) -> Vec<DrainProbe> {
    let targets: Vec<Option<String>> = existing
        .iter()
        .filter(|p| p.labels().get(LABEL_GROUP).map(String::as_str) == Some(group))
        .map(|p| p.status.as_ref().and_then(|s| s.pod_ip.clone()))
        .collect();
    let asks = targets.into_iter().map(|ip| async move {
        let Some(ip) = ip else {
            return DrainProbe::Gone;
        };
        let url = format!("http://{ip}:{HTTP_PORT}/drain");
        match http.post(&url).send().await {
            Ok(resp) => match resp.json::<serde_json::Value>().await {
                Ok(v) => v
                    .get("in_flight")
                    .and_then(serde_json::Value::as_u64)
                    .map_or(DrainProbe::Unknown, DrainProbe::InFlight),
                Err(_) => DrainProbe::Unknown,
            },
            Err(e) if e.is_connect() => DrainProbe::Gone,
            Err(_) => DrainProbe::Unknown,
        }
    });
    futures::future::join_all(asks).await
}

/// Whether the live endpoint Service already has what `desired` applies.
fn endpoint_matches(current: Option<&Service>, desired: &Service) -> bool {
    let Some(current) = current else {
        return false;
    };
    let (Some(cs), Some(ds)) = (current.spec.as_ref(), desired.spec.as_ref()) else {
        return false;
    };
    let ports = |s: &k8s_openapi::api::core::v1::ServiceSpec| {
        s.ports
            .iter()
            .flatten()
            .map(|p| (p.name.clone(), p.port, p.target_port.clone()))
            .collect::<Vec<_>>()
    };
    cs.selector == ds.selector
        && ports(cs) == ports(ds)
        && current.metadata.owner_references == desired.metadata.owner_references
        && desired
            .metadata
            .labels
            .iter()
            .flatten()
            .all(|(k, v)| current.labels().get(k) == Some(v))
}

fn count(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// Nodes of the fleet and the GPUs llmo pods already hold (or were just given).
fn inventory(
    gpunodes: &[Arc<GPUNode>],
    pods: &[Arc<Pod>],
    reservations: &Reservations,
) -> (Vec<NodeInventory>, TakenGpus) {
    let mut nodes: Vec<NodeInventory> = gpunodes
        .iter()
        .map(|n| NodeInventory::from_gpu_node(n))
        .collect();
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    let mut taken = TakenGpus::new();
    for pod in pods {
        let Some(node) = pinned_node(pod) else {
            continue;
        };
        taken.entry(node).or_default().extend(planned_gpus(pod));
    }
    for r in reservations.pods.values() {
        taken
            .entry(r.node.clone())
            .or_default()
            .extend(r.gpus.iter().copied());
    }
    (nodes, taken)
}

/// Whether a change of GPU node `node` may change what `md` should do: it is not fully placed
/// yet, or it runs there.
fn concerned_by_node(md: &ModelDeployment, node: &str) -> bool {
    let Some(status) = &md.status else {
        return true;
    };
    let placed = status
        .conditions
        .iter()
        .any(|c| c.type_ == cond::PLACED && c.status == "True");
    !placed
        || status
            .groups
            .iter()
            .any(|g| g.ranks.iter().any(|r| r.node == node))
}

/// Starts a watch of `K` into a store; the task ends when dropped through [`AbortOnDrop`].
fn watched<K>(client: &Client, config: watcher::Config) -> (Store<K>, tokio::task::JoinHandle<()>)
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store::<K>();
    let stream = reflector::reflector(writer, watcher(Api::<K>::all(client.clone()), config))
        .default_backoff()
        .touched_objects()
        .for_each(|_| futures::future::ready(()));
    (reader, tokio::spawn(stream))
}

/// Aborts its tasks when dropped.
struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

fn pinned_node(pod: &Pod) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    if let Some(node) = &spec.node_name {
        return Some(node.clone());
    }
    spec.affinity
        .as_ref()?
        .node_affinity
        .as_ref()?
        .required_during_scheduling_ignored_during_execution
        .as_ref()?
        .node_selector_terms
        .first()?
        .match_expressions
        .as_ref()?
        .first()?
        .values
        .as_ref()?
        .first()
        .cloned()
}

fn planned_gpus(pod: &Pod) -> BTreeSet<u32> {
    pod.annotations()
        .get(PLANNED_GPUS)
        .map(|v| v.split(',').filter_map(|i| i.parse().ok()).collect())
        .unwrap_or_default()
}

fn ranks_of(pods: &[Pod], group: &str) -> Vec<RankPlacement> {
    let mut ranks: Vec<RankPlacement> = pods
        .iter()
        .filter(|p| p.labels().get(LABEL_GROUP).map(String::as_str) == Some(group))
        .filter_map(|p| {
            Some(RankPlacement {
                rank: p.labels().get(crate::workload::LABEL_RANK)?.parse().ok()?,
                node: pinned_node(p)?,
                gpus: planned_gpus(p).into_iter().collect(),
            })
        })
        .collect();
    ranks.sort_by_key(|r| r.rank);
    ranks
}

/// Writes status, unless it is what the object already says: a settled deployment makes no
/// writes at all.
async fn write_status(
    client: &Client,
    md: &ModelDeployment,
    current: Option<&ModelDeploymentStatus>,
    status: &ModelDeploymentStatus,
) -> Result<(), ReconcileError> {
    let owned = reconciler_status(md, status);
    if current.map(|c| reconciler_status(md, c)).as_ref() == Some(&owned) {
        return Ok(());
    }
    let api: Api<ModelDeployment> =
        Api::namespaced(client.clone(), &md.namespace().unwrap_or_default());
    let body = json!({
        "apiVersion": ModelDeployment::api_version(&()),
        "kind": ModelDeployment::kind(&()),
        "status": owned,
    });
    api.patch_status(
        &md.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(body),
    )
    .await
    .map_err(|e| ReconcileError::kube(format!("writing status of {}", md.name_any()), e))?;
    Ok(())
}

/// The part of status the reconciler owns: all but what the autoscaler writes under its own
/// field manager (`autoscaling`, and `desiredReplicas` in `slo` mode). Applying only these never
/// reverts the autoscaler's newer values.
fn reconciler_status(md: &ModelDeployment, status: &ModelDeploymentStatus) -> serde_json::Value {
    let mut value = serde_json::to_value(status).unwrap_or_default();
    if let Some(obj) = value.as_object_mut() {
        obj.remove("autoscaling");
        if md.spec.autoscaling.mode == AutoscalingMode::Slo {
            obj.remove("desiredReplicas");
        }
    }
    value
}

#[cfg(test)]
mod scenarios;
