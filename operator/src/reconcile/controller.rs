//! The reconcile loop: the thin part that reads from and writes to the API server.

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use futures::StreamExt;
use k8s_openapi::{
    api::core::v1::{Pod, Service},
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    jiff::Timestamp,
};
use kube::{
    api::{DeleteParams, ListParams, Patch, PatchParams},
    runtime::{
        controller::Action,
        events::{Event, EventType, Recorder},
        reflector::ObjectRef,
        watcher, Controller,
    },
    Api, Client, Resource, ResourceExt,
};
use serde_json::json;
use tracing::{info, warn};

use super::{
    conditions::set_condition,
    decide::{decide, desired_replicas, observe_groups, ObservedGroup},
    ReconcileError,
};
use crate::{
    api::{
        conditions::{self as cond, reasons},
        validate_model_deployment, GPUClass, GPUNode, GroupStatus, ModelDeployment,
        ModelDeploymentStatus, RankPlacement,
    },
    placement::{place_group, GroupRequest, NodeInventory, Spread, TakenGpus},
    plan::{plan_layout, ModelArch, Plan},
    preview::{hardware_for, plan_request},
    workload::{
        build_endpoint_service, build_group_pods, build_group_service, revision_hash, GroupSpec,
        FIELD_MANAGER, LABEL_DEPLOYMENT, LABEL_GROUP,
    },
};

/// Flags of `llmo-operator run`.
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// How often a deployment is reconciled when nothing changes.
    #[arg(long, env = "LLMO_RESYNC", default_value = "5m", value_parser = parse_duration)]
    pub resync: Duration,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    s.parse::<crate::api::HumanDuration>()
        .map(|d| d.get())
        .map_err(|e| e.to_string())
}

struct Context {
    client: Client,
    recorder: Recorder,
    resync: Duration,
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
        let event = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.to_owned(),
            note: Some(note),
            action: action.to_owned(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &md.object_ref(&())).await {
            warn!(deployment = %md.name_any(), error = %e, "could not record an event");
        }
    }
}

const MANAGED: &str = "app.kubernetes.io/managed-by=llmo-operator";
const PLANNED_GPUS: &str = "llmo.dev/planned-gpus";

/// Runs the controller until SIGTERM or Ctrl-C.
pub async fn run(args: RunArgs) -> Result<(), ReconcileError> {
    let client = Client::try_default()
        .await
        .map_err(|e| ReconcileError::Config(e.to_string()))?;
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
    let mds: Api<ModelDeployment> = Api::all(client.clone());
    let managed = watcher::Config::default().labels(MANAGED);
    let controller = Controller::new(mds, watcher::Config::default());
    let store = controller.store();
    let ctx = Arc::new(Context {
        client: client.clone(),
        recorder: Recorder::new(client.clone(), "llmo-operator".into()),
        resync: args.resync,
    });
    info!("llmo operator started");
    controller
        .owns(Api::<Pod>::all(client.clone()), managed.clone())
        .owns(Api::<Service>::all(client.clone()), managed)
        // Capacity changed: every deployment may now fit, or lose a node.
        .watches(
            Api::<GPUNode>::all(client),
            watcher::Config::default(),
            move |_| {
                store
                    .state()
                    .iter()
                    .map(|md| ObjectRef::from_obj(md.as_ref()))
                    .collect::<Vec<_>>()
            },
        )
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                warn!(error = %e, "reconcile failed");
            }
        })
        .await;
    info!("llmo operator stopped");
    Ok(())
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

async fn plan_for(md: &ModelDeployment, client: &Client) -> Result<Planned, ReconcileError> {
    if let Err(errors) = validate_model_deployment(md) {
        return Ok(Planned::Refused {
            reason: reasons::INVALID_SPEC,
            message: errors.to_string(),
        });
    }
    let class_name = &md.spec.gpu.class;
    let classes: Api<GPUClass> = Api::all(client.clone());
    let Some(class) = classes
        .get_opt(class_name)
        .await
        .map_err(|e| ReconcileError::kube(format!("reading GPUClass {class_name}"), e))?
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
    let client = &ctx.client;
    let name = md.name_any();
    let namespace = md.namespace().unwrap_or_else(|| "default".into());
    let generation = md.metadata.generation;
    let now = Timestamp::now();
    let mut status = md.status.clone().unwrap_or_default();
    status.observed_generation = generation;

    let (plan, class) = match plan_for(&md, client).await? {
        Planned::Ready { plan, class } => (plan, class),
        Planned::Refused { reason, message } => {
            info!(deployment = %name, %reason, %message, "not planned");
            // One Event per new refusal, not one per resync.
            let already = status
                .conditions
                .iter()
                .any(|c| c.type_ == cond::PLANNED && c.status == "False" && c.message == message);
            if !already {
                ctx.event(&md, true, reason, "Plan", message.clone()).await;
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
            write_status(client, &md, &status).await?;
            // An invalid spec waits for a change; a missing class or capacity is retried.
            return Ok(if degraded {
                Action::await_change()
            } else {
                Action::requeue(Duration::from_secs(60))
            });
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
        ctx.event(&md, false, "Planned", "Plan", note).await;
    }

    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let own = ListParams::default().labels(&format!("{LABEL_DEPLOYMENT}={name}"));
    let existing = pods
        .list(&own)
        .await
        .map_err(|e| ReconcileError::kube(format!("listing pods of {name}"), e))?
        .items;
    let observed = observe_groups(&existing);
    let desired = desired_replicas(&md);
    let decision = decide(&revision, plan.layout.pipeline, desired, &observed);

    let services: Api<Service> = Api::namespaced(client.clone(), &namespace);
    for (group, why) in &decision.delete {
        info!(deployment = %name, %group, why, "deleting group");
        let note = format!("deleted group {group}: {why}");
        ctx.event(&md, false, "GroupDeleted", "Delete", note).await;
        pods.delete_collection(
            &DeleteParams::default(),
            &ListParams::default().labels(&format!("{LABEL_GROUP}={group}")),
        )
        .await
        .map_err(|e| ReconcileError::kube(format!("deleting pods of group {group}"), e))?;
        match services.delete(group, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.is_not_found() => {}
            Err(e) => return Err(ReconcileError::kube(format!("deleting service {group}"), e)),
        }
    }

    let apply = PatchParams::apply(FIELD_MANAGER).force();
    let mut placement_error = None;
    if !decision.create.is_empty() {
        let (nodes, mut taken) = inventory(client).await?;
        let mut spread = Spread::default();
        for g in observed.iter().filter(|g| g.revision == revision) {
            for rank in ranks_of(&existing, &g.name) {
                spread.add(&rank, &nodes);
            }
        }
        let request = GroupRequest::for_plan(&md.spec.gpu.class, device, &plan);
        for &index in &decision.create {
            let placement = match place_group(&request, &nodes, &mut taken, &mut spread) {
                Ok(p) => p,
                Err(e) => {
                    let message = e.to_string();
                    let already = status.conditions.iter().any(|c| {
                        c.type_ == cond::PLACED && c.status == "False" && c.message == message
                    });
                    if !already {
                        let reason = reasons::INSUFFICIENT_CAPACITY;
                        ctx.event(&md, true, reason, "Place", message.clone()).await;
                    }
                    placement_error = Some(message);
                    break;
                }
            };
            let group = GroupSpec {
                deployment: &md,
                plan: &plan,
                revision: &revision,
                index,
                placement: &placement,
                device,
            };
            info!(deployment = %name, group = %group.name(), "creating group");
            let nodes: Vec<String> = placement.iter().map(|r| r.node.clone()).collect();
            let note = format!("created group {} on {}", group.name(), nodes.join(", "));
            ctx.event(&md, false, "GroupCreated", "Create", note).await;
            let svc = build_group_service(&group);
            services
                .patch(&group.name(), &apply, &Patch::Apply(&svc))
                .await
                .map_err(|e| {
                    ReconcileError::kube(format!("applying service {}", group.name()), e)
                })?;
            for pod in build_group_pods(&group) {
                let pod_name = pod.name_any();
                pods.patch(&pod_name, &apply, &Patch::Apply(&pod))
                    .await
                    .map_err(|e| ReconcileError::kube(format!("applying pod {pod_name}"), e))?;
            }
        }
    }
    let endpoint = build_endpoint_service(&md);
    services
        .patch(&name, &apply, &Patch::Apply(&endpoint))
        .await
        .map_err(|e| ReconcileError::kube(format!("applying service {name}"), e))?;

    // Status from what exists now (deleted groups excluded; created ones show up next time).
    let live: Vec<&ObservedGroup> = observed
        .iter()
        .filter(|g| !decision.delete.iter().any(|(n, _)| *n == g.name))
        .collect();
    let pipeline = plan.layout.pipeline;
    let ready = live
        .iter()
        .filter(|g| g.state(pipeline) == crate::api::GroupState::Ready)
        .count();
    status.replicas = count(live.len() + decision.create.len());
    status.ready_replicas = count(ready);
    status.updated_replicas =
        count(live.iter().filter(|g| g.revision == revision).count() + decision.create.len());
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
    let progressing = decision.rolling || !decision.create.is_empty() || ready < desired as usize;
    set_condition(
        &mut status.conditions,
        cond::PROGRESSING,
        progressing,
        if decision.rolling {
            "RollingOut"
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
    write_status(client, &md, &status).await?;
    Ok(if placement_error.is_some() || progressing {
        Action::requeue(Duration::from_secs(15))
    } else {
        Action::requeue(ctx.resync)
    })
}

fn count(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// Nodes of the fleet and the GPUs llmo pods already hold.
async fn inventory(client: &Client) -> Result<(Vec<NodeInventory>, TakenGpus), ReconcileError> {
    let gpunodes: Api<GPUNode> = Api::all(client.clone());
    let mut nodes: Vec<NodeInventory> = gpunodes
        .list(&ListParams::default())
        .await
        .map_err(|e| ReconcileError::kube("listing GPUNodes", e))?
        .items
        .iter()
        .map(NodeInventory::from_gpu_node)
        .collect();
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    let all_pods: Api<Pod> = Api::all(client.clone());
    let mut taken = TakenGpus::new();
    for pod in all_pods
        .list(&ListParams::default().labels(MANAGED))
        .await
        .map_err(|e| ReconcileError::kube("listing llmo pods", e))?
        .items
    {
        let Some(node) = pinned_node(&pod) else {
            continue;
        };
        let gpus: BTreeSet<u32> = planned_gpus(&pod);
        taken.entry(node).or_default().extend(gpus);
    }
    Ok((nodes, taken))
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

async fn write_status(
    client: &Client,
    md: &ModelDeployment,
    status: &ModelDeploymentStatus,
) -> Result<(), ReconcileError> {
    let api: Api<ModelDeployment> =
        Api::namespaced(client.clone(), &md.namespace().unwrap_or_default());
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
    .map_err(|e| ReconcileError::kube(format!("writing status of {}", md.name_any()), e))?;
    Ok(())
}
