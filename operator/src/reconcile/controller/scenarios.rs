//! Scenario tests of `reconcile_once` against a mock API server (tower-test).
//!
//! The Context is the one `run` builds, but its client talks to the test, and its stores (what the
//! pod, Service, GPUNode and GPUClass watches would have delivered) are filled by the test. Each test then
//! plays the API server: it takes the reconciler's requests one at a time, checks each (method,
//! path, query, content type and, where it matters, the body) and answers it the way a server
//! would. The request sequence of every reconcile path is asserted exactly: a request added,
//! dropped, reordered or changed fails the test, naming the request that came and the one that
//! was expected. Every wait is bounded, so a test never hangs.
//!
//! Paths, selectors and field managers are spelled out as literals on purpose: a change of any of
//! them is a change of what the operator sends to clusters, and should show up here.

use std::{sync::Arc, time::Duration};

use http::{Method, Request, Response};
use k8s_openapi::{
    api::core::v1::{Pod, PodCondition, PodStatus, Service},
    apimachinery::pkg::apis::meta::v1::Time,
    jiff::{SignedDuration, Timestamp},
};
use kube::{
    client::Body,
    runtime::{
        controller::Action,
        events::Recorder,
        reflector::{self, Store},
        watcher,
    },
    Client, Resource, ResourceExt,
};
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tower_test::mock::{self, Handle, SendResponse};

use super::{reconcile_once, Context, Outcome, Reservations};
use crate::{
    api::{
        parse_manifests, AutoscalingMode, GPUClass, GPUNode, GPUNodeSpec, GPUNodeStatus, GpuDevice,
        Manifest, ModelDeployment, ModelDeploymentStatus, RankPlacement,
    },
    plan::{plan_layout, ModelArch, Plan},
    preview::{hardware_for, plan_request},
    reconcile::{telemetry::Metrics, ReconcileError},
    workload::{build_endpoint_service, build_group_pods, revision_hash, GroupSpec},
};

/// How long the mock server waits for each request, and for the reconcile to end.
const STEP: Duration = Duration::from_secs(5);
const NAME: &str = "smollm2";
const UID: &str = "5f0c2b7e-8a41-4d7c-9e36-2b1f0a9d4c11";
const APPLY: &str = "application/apply-patch+yaml";
const MERGE: &str = "application/merge-patch+json";
const JSON: &str = "application/json";
/// Query of every server-side apply the reconciler sends.
const SSA: &[(&str, &str)] = &[("fieldManager", "llmo-operator"), ("force", "true")];
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/default/events";
const PODS: &str = "/api/v1/namespaces/default/pods";
const SERVICES: &str = "/api/v1/namespaces/default/services";
const DEPLOYMENTS: &str = "/apis/llmo.dev/v1alpha1/namespaces/default/modeldeployments";

// ---------------------------------------------------------------------------------------------
// The mock API server.

type Reconcile = JoinHandle<Result<(Action, Outcome), ReconcileError>>;

/// What the operator's watches have delivered when a reconcile starts.
#[derive(Default)]
struct Cluster {
    classes: Vec<GPUClass>,
    nodes: Vec<GPUNode>,
    /// llmo's pods, every namespace.
    pods: Vec<Pod>,
}

/// A store whose watch the test drives: `see` delivers an object to it.
fn live_store<K>() -> (Store<K>, reflector::store::Writer<K>)
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    let (reader, mut writer) = reflector::store();
    writer.apply_watcher_event(&watcher::Event::Init);
    writer.apply_watcher_event(&watcher::Event::InitDone);
    (reader, writer)
}

/// A store as a watch leaves it after its initial list of `objects`.
fn watched<K>(objects: &[K]) -> Store<K>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    let (reader, mut writer) = reflector::store();
    writer.apply_watcher_event(&watcher::Event::Init);
    for o in objects {
        writer.apply_watcher_event(&watcher::Event::InitApply(o.clone()));
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);
    reader
}

/// One request of the reconciler, held until it is answered.
struct Call {
    method: Method,
    path: String,
    query: Vec<(String, String)>,
    content_type: Option<String>,
    body: Value,
    reply: SendResponse<Response<Body>>,
}

impl Call {
    fn respond(self, code: u16, body: &Value) {
        let response = Response::builder()
            .status(code)
            .header("content-type", JSON)
            .body(Body::from(serde_json::to_vec(body).unwrap()))
            .unwrap();
        self.reply.send_response(response);
    }

    fn ok(self, body: &Value) {
        self.respond(200, body);
    }

    /// Answers a write with the object as the server keeps it; returns what was sent.
    fn store(self, code: u16) -> Value {
        let sent = self.body.clone();
        let kept = stored(sent.clone());
        self.respond(code, &kept);
        sent
    }
}

fn describe(method: &Method, path: &str, query: &[(String, String)]) -> String {
    let q: Vec<String> = query.iter().map(|(k, v)| format!("{k}={v}")).collect();
    if q.is_empty() {
        format!("{method} {path}")
    } else {
        format!("{method} {path}?{}", q.join("&"))
    }
}

/// Decodes `application/x-www-form-urlencoded` text.
fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).unwrap()
}

/// Query pairs, decoded and sorted (kube writes a leading empty pair: `?&force=true`).
fn parse_query(query: Option<&str>) -> Vec<(String, String)> {
    let mut pairs: Vec<(String, String)> = query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect();
    pairs.sort();
    pairs
}

fn ended(
    result: Result<Result<(Action, Outcome), ReconcileError>, tokio::task::JoinError>,
) -> String {
    match result {
        Ok(Ok((action, _))) => format!("returned {action:?}"),
        Ok(Err(e)) => format!("failed: {e}"),
        Err(e) => format!("panicked: {e}"),
    }
}

/// Plays the API server for the reconciles of one Context, one reconcile at a time.
struct ApiServer {
    handle: Handle<Request<Body>, Response<Body>>,
    ctx: Arc<Context>,
    /// The reconcile running.
    task: Option<Reconcile>,
    /// The requests of the running (or last) reconcile, for failure messages.
    log: Vec<String>,
    /// The Service watch (llmo's Services), driven by [`ApiServer::see`].
    services: reflector::store::Writer<Service>,
}

impl ApiServer {
    /// A Context like the one `run` builds, with `cluster` in its stores and this server behind
    /// its client (and so behind its Recorder too).
    fn new(cluster: Cluster) -> Self {
        let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "default");
        let (service_store, services) = live_store();
        let ctx = Context {
            recorder: Recorder::new(client.clone(), "llmo-operator".into()),
            client,
            resync: Duration::from_secs(300),
            metrics: Arc::new(Metrics::new()),
            serving_env: Vec::new(),
            // Drain probes go nowhere in these scenarios: pods without an IP are not asked.
            http: reqwest::Client::builder()
                .timeout(Duration::from_millis(500))
                .build()
                .unwrap(),
            pods: watched(&cluster.pods),
            services: service_store,
            nodes: watched(&cluster.nodes),
            classes: watched(&cluster.classes),
            placing: tokio::sync::Mutex::new(Reservations::default()),
        };
        Self {
            handle,
            ctx: Arc::new(ctx),
            task: None,
            log: Vec::new(),
            services,
        }
    }

    /// The Service watch delivers `svc` (as it would after an apply).
    fn see(&mut self, svc: &Service) {
        self.services
            .apply_watcher_event(&watcher::Event::Apply(svc.clone()));
    }

    /// Starts `reconcile_once(md)`.
    fn start(&mut self, md: &ModelDeployment) {
        assert!(self.task.is_none(), "one reconcile at a time");
        let (md, ctx) = (md.clone(), self.ctx.clone());
        self.task = Some(tokio::spawn(async move { reconcile_once(&md, &ctx).await }));
        self.log.clear();
    }

    fn history(&self) -> String {
        if self.log.is_empty() {
            return "  (none)".into();
        }
        self.log
            .iter()
            .enumerate()
            .map(|(i, r)| format!("  {}. {r}", i + 1))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The next request, expected to be `want`.
    async fn next(&mut self, want: &str) -> Call {
        let n = self.log.len() + 1;
        let task = self.task.as_mut().expect("no reconcile running");
        let handle = &mut self.handle;
        let next = tokio::time::timeout(STEP, async {
            tokio::select! {
                biased;
                r = handle.next_request() => Ok(r),
                end = task => Err(end),
            }
        })
        .await;
        let (request, reply) = match next {
            Ok(Ok(Some(r))) => r,
            Ok(Ok(None)) => panic!("expected request {n}: {want}\nbut the client was dropped"),
            Ok(Err(end)) => {
                self.task = None;
                panic!(
                    "expected request {n}: {want}\nbut the reconcile {} without it; requests made:\n{}",
                    ended(end),
                    self.history()
                )
            }
            Err(_) => panic!(
                "expected request {n}: {want}\nbut none came within {STEP:?}; requests made:\n{}",
                self.history()
            ),
        };
        let (parts, body) = request.into_parts();
        let bytes = body.collect_bytes().await.unwrap();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                panic!(
                    "request body is not JSON ({e}): {}",
                    String::from_utf8_lossy(&bytes)
                )
            })
        };
        let path = parts.uri.path().to_owned();
        let query = parse_query(parts.uri.query());
        self.log.push(describe(&parts.method, &path, &query));
        Call {
            method: parts.method,
            path,
            query,
            content_type: parts
                .headers
                .get(http::header::CONTENT_TYPE)
                .map(|v| v.to_str().unwrap().to_owned()),
            body,
            reply,
        }
    }

    /// The next request, which must be `method path?query` (query in any order) with a body of
    /// `content_type` (`None`: a read, without a body).
    async fn expect(
        &mut self,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        content_type: Option<&str>,
    ) -> Call {
        let mut want_query: Vec<(String, String)> = query
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        want_query.sort();
        let want = describe(&method, path, &want_query);
        let call = self.next(&want).await;
        let got = describe(&call.method, &call.path, &call.query);
        assert!(
            call.method == method && call.path == path && call.query == want_query,
            "request {}: expected {want}\n                got {got}\nwith body {}\nrequests made:\n{}",
            self.log.len(),
            call.body,
            self.history()
        );
        assert_eq!(
            call.content_type.as_deref(),
            content_type,
            "content type of request {} ({got})",
            self.log.len()
        );
        if content_type.is_none() {
            assert_eq!(call.body, Value::Null, "a read has no body: {got}");
        }
        call
    }

    /// Waits for the reconcile to end, failing on any further request.
    async fn finish(&mut self) -> (Action, Outcome) {
        let mut task = self.task.take().expect("no reconcile running");
        let handle = &mut self.handle;
        let log = &self.log;
        let result = tokio::time::timeout(STEP, async {
            tokio::select! {
                biased;
                extra = handle.next_request() => match extra {
                    Some((request, _)) => panic!(
                        "unexpected request after the last expected one: {} {}\nrequests made:\n{}",
                        request.method(),
                        request.uri(),
                        log.iter().map(|r| format!("  {r}")).collect::<Vec<_>>().join("\n")
                    ),
                    None => (&mut task).await,
                },
                r = &mut task => r,
            }
        })
        .await;
        let Ok(joined) = result else {
            panic!(
                "the reconcile did not end within {STEP:?}; requests made:\n{}",
                self.history()
            );
        };
        joined
            .expect("the reconcile panicked")
            .unwrap_or_else(|e| panic!("the reconcile failed: {e}"))
    }

    // -- The reconciler's requests, one helper per kind. --

    /// A new events.k8s.io/v1 Event about the deployment; returns it.
    async fn event(&mut self, type_: &str, reason: &str, action: &str) -> Value {
        self.event_about(NAME, UID, type_, reason, action).await
    }

    /// A new Event about deployment `md_name`.
    async fn event_about(
        &mut self,
        md_name: &str,
        md_uid: &str,
        type_: &str,
        reason: &str,
        action: &str,
    ) -> Value {
        let call = self.expect(Method::POST, EVENTS, &[], Some(JSON)).await;
        let e = &call.body;
        assert_eq!(e["apiVersion"], "events.k8s.io/v1", "{e}");
        assert_eq!(e["kind"], "Event", "{e}");
        assert_eq!(
            (
                e["type"].as_str(),
                e["reason"].as_str(),
                e["action"].as_str()
            ),
            (Some(type_), Some(reason), Some(action)),
            "event {e}"
        );
        assert_eq!(e["reportingController"], "llmo-operator", "{e}");
        // `Reporter::from(&str)` names the instance after the host: the pod in a cluster.
        assert!(
            e["reportingInstance"]
                .as_str()
                .is_some_and(|i| !i.is_empty()),
            "{e}"
        );
        assert_eq!(e["metadata"]["namespace"], "default", "{e}");
        let name = e["metadata"]["name"].as_str().unwrap();
        assert!(
            name.starts_with(&format!("{md_name}.")),
            "event name {name}"
        );
        assert_eq!(
            e["regarding"],
            json!({"apiVersion": "llmo.dev/v1alpha1", "kind": "ModelDeployment",
                   "name": md_name, "namespace": "default", "uid": md_uid}),
        );
        assert!(e["eventTime"].is_string(), "{e}");
        assert!(e.get("series").is_none(), "{e}");
        call.store(201)
    }

    /// A server-side apply of `path`; returns the applied object.
    async fn apply(&mut self, path: &str) -> Value {
        let call = self.expect(Method::PATCH, path, SSA, Some(APPLY)).await;
        call.store(200)
    }

    /// The status apply; returns the `status` it carries.
    async fn status(&mut self, md: &ModelDeployment) -> Value {
        let path = format!("{DEPLOYMENTS}/{}/status", md.name_any());
        let call = self.expect(Method::PATCH, &path, SSA, Some(APPLY)).await;
        let body = call.body.clone();
        assert_eq!(body["apiVersion"], "llmo.dev/v1alpha1", "{body}");
        assert_eq!(body["kind"], "ModelDeployment", "{body}");
        let keys: Vec<&String> = body.as_object().unwrap().keys().collect();
        assert_eq!(
            keys,
            ["apiVersion", "kind", "status"],
            "the status apply carries status only"
        );
        let mut kept = serde_json::to_value(md).unwrap();
        kept["status"] = body["status"].clone();
        kept["metadata"]["resourceVersion"] = json!("1001");
        call.ok(&kept);
        body["status"].clone()
    }

    /// DELETE of a group: its pods by label, then its headless Service.
    async fn delete_group(&mut self, group: &str, pods: &[Pod]) {
        let selector = format!("llmo.dev/group={group}");
        let call = self
            .expect(
                Method::DELETE,
                PODS,
                &[("labelSelector", selector.as_str())],
                Some(JSON),
            )
            .await;
        assert_eq!(call.body, Value::Null, "default DeleteParams: no body");
        // The server answers a collection delete with the pods it marked for deletion.
        let now = Timestamp::now();
        let deleting: Vec<Pod> = pods
            .iter()
            .cloned()
            .map(|mut p| {
                p.metadata.deletion_timestamp = Some(Time(now));
                p
            })
            .collect();
        call.ok(&list("v1", "PodList", &deleting));
        let call = self
            .expect(
                Method::DELETE,
                &format!("{SERVICES}/{group}"),
                &[],
                Some(JSON),
            )
            .await;
        call.ok(&json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": group, "namespace": "default", "uid": format!("uid-{group}")},
            "spec": {"clusterIP": "None", "selector": {"llmo.dev/group": group}},
        }));
    }
}

// ---------------------------------------------------------------------------------------------
// The cluster's objects.

/// The example deployment (`examples/smollm2-cpu.yaml`) as the API server returns it.
fn smollm2() -> ModelDeployment {
    let text = include_str!("../../../../examples/smollm2-cpu.yaml");
    let Manifest::ModelDeployment(md) = parse_manifests(text).remove(0).unwrap() else {
        panic!("smollm2-cpu.yaml holds a ModelDeployment first");
    };
    let mut md = *md;
    md.metadata.uid = Some(UID.into());
    md.metadata.generation = Some(1);
    md.metadata.resource_version = Some("1000".into());
    md
}

/// A class of `examples/gpuclasses.yaml` as the API server returns it.
fn class(name: &str) -> GPUClass {
    let text = include_str!("../../../../examples/gpuclasses.yaml");
    let mut class = parse_manifests(text)
        .into_iter()
        .find_map(|m| match m.unwrap() {
            Manifest::GpuClass(c) if c.name_any() == name => Some(*c),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no class {name} in the examples"));
    class.metadata.uid = Some(format!("uid-class-{name}"));
    class.metadata.resource_version = Some("10".into());
    class
}

/// The plan and revision the reconciler computes for `md` on `class`.
fn planned(md: &ModelDeployment, class: &GPUClass) -> (Plan, String) {
    let arch = ModelArch::from_hints(md.spec.model.architecture.as_ref().unwrap()).unwrap();
    let hw = hardware_for(md, class).unwrap();
    let plan = plan_layout(&plan_request(md, &arch, &hw)).unwrap();
    let revision = revision_hash(&md.spec, &plan);
    (plan, revision)
}

fn group_name(md: &ModelDeployment, class: &GPUClass, index: u32) -> String {
    format!("{NAME}-{}-{index}", planned(md, class).1)
}

/// The pods of group `index`, as built by the operator, scheduled on `node` and running: ready
/// with an address when `pod_ip` is given, starting without one otherwise.
fn running_group(
    md: &ModelDeployment,
    class: &GPUClass,
    index: u32,
    node: &str,
    pod_ip: Option<&str>,
) -> Vec<Pod> {
    let (plan, revision) = planned(md, class);
    assert_eq!(
        plan.layout.pipeline, 1,
        "these scenarios use one-pod groups"
    );
    let placement = [RankPlacement {
        rank: 0,
        node: node.into(),
        gpus: Vec::new(),
    }];
    let group = GroupSpec {
        deployment: md,
        plan: &plan,
        revision: &revision,
        index,
        placement: &placement,
        device: class.spec.device,
    };
    build_group_pods(&group)
        .into_iter()
        .map(|mut pod| {
            pod.metadata.uid = Some(format!("uid-{}", pod.name_any()));
            pod.metadata.resource_version = Some("500".into());
            pod.spec.as_mut().unwrap().node_name = Some(node.into());
            pod.status = Some(PodStatus {
                phase: Some("Running".into()),
                pod_ip: pod_ip.map(str::to_owned),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: if pod_ip.is_some() { "True" } else { "False" }.into(),
                    ..Default::default()
                }]),
                ..Default::default()
            });
            pod
        })
        .collect()
}

/// The endpoint Service as it exists once applied.
fn endpoint(md: &ModelDeployment) -> Service {
    let mut svc = build_endpoint_service(md);
    svc.metadata.uid = Some("uid-endpoint".into());
    svc.metadata.resource_version = Some("600".into());
    svc.spec.as_mut().unwrap().cluster_ip = Some("10.96.12.34".into());
    svc
}

/// A node without GPUs that serves `cpu` classes.
fn cpu_node(name: &str) -> GPUNode {
    let mut node = GPUNode::new(name, GPUNodeSpec::default());
    node.status = Some(GPUNodeStatus {
        gpu_class: Some("cpu".into()),
        ..Default::default()
    });
    node
}

/// A node with `count` healthy L4 GPUs.
fn l4_node(name: &str, count: u32) -> GPUNode {
    let mut node = GPUNode::new(name, GPUNodeSpec::default());
    let gpus: Vec<GpuDevice> = (0..count)
        .map(|index| GpuDevice {
            index,
            uuid: format!("GPU-{name}-{index}"),
            product: "NVIDIA L4".into(),
            memory_total_mib: 23034,
            memory_free_mib: 22800,
            ..Default::default()
        })
        .collect();
    node.status = Some(GPUNodeStatus {
        gpu_class: Some("l4".into()),
        gpu_count: count,
        healthy_gpus: count,
        memory_free_mib: 22800 * u64::from(count),
        gpus,
        ..Default::default()
    });
    node
}

fn list<T: serde::Serialize>(api_version: &str, kind: &str, items: &[T]) -> Value {
    json!({
        "apiVersion": api_version, "kind": kind,
        "metadata": {"resourceVersion": "3000"},
        "items": items,
    })
}

/// An applied or created object as the server keeps it: with the fields the server sets.
fn stored(mut obj: Value) -> Value {
    let name = obj["metadata"]["name"].as_str().unwrap_or("x").to_owned();
    let meta = obj["metadata"].as_object_mut().unwrap();
    meta.entry("uid")
        .or_insert_with(|| json!(format!("uid-{name}")));
    meta.insert("resourceVersion".into(), json!("2000"));
    meta.entry("creationTimestamp").or_insert_with(|| {
        json!(Timestamp::now()
            .round(k8s_openapi::jiff::Unit::Second)
            .unwrap()
            .to_string())
    });
    match obj["kind"].as_str() {
        Some("Pod") if obj.get("status").is_none() => {
            obj["status"] = json!({"phase": "Pending", "qosClass": "Burstable"});
        }
        Some("Service") if obj["spec"]["clusterIP"].is_null() => {
            obj["spec"]["clusterIP"] = json!("10.96.12.34");
        }
        _ => {}
    }
    obj
}

// ---------------------------------------------------------------------------------------------
// Status checks.

/// Condition `type_` of a status, which must be there.
fn condition<'a>(status: &'a Value, type_: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == type_))
        .unwrap_or_else(|| panic!("no {type_} condition in {status}"))
}

fn assert_condition(status: &Value, type_: &str, value: &str, reason: &str) {
    let c = condition(status, type_);
    assert_eq!(
        (c["status"].as_str(), c["reason"].as_str()),
        (Some(value), Some(reason)),
        "condition {type_}: {c}"
    );
    assert_eq!(c["observedGeneration"], 1, "{c}");
}

fn condition_types(status: &Value) -> Vec<&str> {
    status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["type"].as_str().unwrap())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Scenarios.

/// An invalid spec is refused before the class is even looked up: one Warning Event, one status
/// apply (Degraded=True/InvalidSpec), and the reconcile waits for a change of the object.
#[tokio::test]
async fn invalid_spec_records_an_event_and_marks_degraded() {
    let mut md = smollm2();
    md.spec.replicas.min = 3;
    md.spec.replicas.max = 1;
    let mut api = ApiServer::new(Cluster {
        classes: vec![class("cpu")],
        ..Default::default()
    });
    api.start(&md);

    let event = api.event("Warning", "InvalidSpec", "Plan").await;
    let note = event["note"].as_str().unwrap();
    assert!(note.contains("spec.replicas"), "{note}");
    let status = api.status(&md).await;
    assert_eq!(condition_types(&status), ["Planned", "Degraded"]);
    assert_condition(&status, "Degraded", "True", "InvalidSpec");
    assert_condition(&status, "Planned", "False", "InvalidSpec");
    assert_eq!(condition(&status, "Degraded")["message"], note);
    assert_eq!(status["observedGeneration"], 1);
    assert!(status.get("plan").is_none() && status.get("revision").is_none());

    let (action, outcome) = api.finish().await;
    assert_eq!(action, Action::await_change());
    assert!(matches!(outcome, Outcome::Refused));
}

/// A GPUClass the class watch does not know: a Warning Event and Planned=False/DoesNotFit; the
/// deployment is looked at again in a minute. Once that status is written, the same refusal
/// sends nothing at all.
#[tokio::test]
async fn missing_gpu_class_is_refused_with_one_event_per_refusal() {
    let mut md = smollm2();
    // The default classes are there, but not `cpu`.
    let mut api = ApiServer::new(Cluster {
        classes: vec![class("h100"), class("l4")],
        ..Default::default()
    });
    api.start(&md);
    let event = api.event("Warning", "DoesNotFit", "Plan").await;
    assert!(
        event["note"]
            .as_str()
            .unwrap()
            .starts_with("GPUClass \"cpu\" does not exist"),
        "{event}"
    );
    let status = api.status(&md).await;
    assert_eq!(condition_types(&status), ["Planned", "Degraded"]);
    assert_condition(&status, "Planned", "False", "DoesNotFit");
    assert_condition(&status, "Degraded", "False", "Valid");
    assert_eq!(condition(&status, "Planned")["message"], event["note"]);
    let (action, outcome) = api.finish().await;
    assert_eq!(action, Action::requeue(Duration::from_secs(60)));
    assert!(matches!(outcome, Outcome::Refused));

    // The retry a minute later, with that status: no request.
    md.status = Some(serde_json::from_value(status).unwrap());
    api.start(&md);
    let (action, _) = api.finish().await;
    assert!(api.log.is_empty(), "{:?}", api.log);
    assert_eq!(action, Action::requeue(Duration::from_secs(60)));
}

/// The first reconcile of a valid deployment on a GPU class with room: an Event for the new
/// revision, then the group (Event, headless Service, pod pinned to the chosen node and GPU),
/// then the endpoint Service (not in the Service watch yet, so applied) and the status. A second reconcile before the
/// pod watch has delivered the pod does not create the group again.
#[tokio::test]
async fn first_reconcile_places_a_group_and_applies_service_pods_endpoint_and_status() {
    let mut md = smollm2();
    md.spec.gpu.class = "l4".into();
    let l4 = class("l4");
    let (plan, revision) = planned(&md, &l4);
    assert_eq!((plan.layout.tensor, plan.layout.pipeline), (1, 1));
    let group = format!("smollm2-{revision}-0");
    // A deployment of the same name in another namespace holds GPU 0 of the only node: the group
    // must get GPU 1, and that pod is no group of this deployment.
    let other: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": "smollm2-0a1b2c3d-0-0", "namespace": "team-b", "uid": "uid-team-b",
            "labels": {
                "llmo.dev/deployment": "smollm2", "llmo.dev/group": "smollm2-0a1b2c3d-0",
                "llmo.dev/revision": "0a1b2c3d", "llmo.dev/rank": "0", "llmo.dev/serving": "true",
                "app.kubernetes.io/name": "llmo-serve",
                "app.kubernetes.io/managed-by": "llmo-operator",
            },
            "annotations": {"llmo.dev/planned-gpus": "0"},
        },
        "spec": {"nodeName": "gpu-a", "containers": [{"name": "llmo-serve"}]},
        "status": {"phase": "Running", "podIP": "10.0.0.9"},
    }))
    .unwrap();
    let mut api = ApiServer::new(Cluster {
        classes: vec![class("cpu"), l4.clone()],
        nodes: vec![l4_node("gpu-a", 2)],
        pods: vec![other],
    });
    api.start(&md);

    let planned_event = api.event("Normal", "Planned", "Plan").await;
    let note = planned_event["note"].as_str().unwrap();
    assert!(
        note.starts_with(&format!("revision {revision}: ")),
        "{note}"
    );
    let created = api.event("Normal", "GroupCreated", "Create").await;
    assert_eq!(created["note"], format!("created group {group} on gpu-a"));

    let svc = api.apply(&format!("{SERVICES}/{group}")).await;
    assert_eq!(svc["apiVersion"], "v1");
    assert_eq!(svc["kind"], "Service");
    assert_eq!(svc["metadata"]["name"], group);
    assert_eq!(svc["spec"]["clusterIP"], "None");
    assert_eq!(svc["spec"]["publishNotReadyAddresses"], true);
    assert_eq!(svc["spec"]["selector"], json!({"llmo.dev/group": group}));
    let owner = json!([{"apiVersion": "llmo.dev/v1alpha1", "kind": "ModelDeployment",
                        "name": NAME, "uid": UID, "controller": true}]);
    assert_eq!(svc["metadata"]["ownerReferences"], owner);

    let pod = api.apply(&format!("{PODS}/{group}-0")).await;
    assert_eq!(pod["kind"], "Pod");
    assert_eq!(pod["metadata"]["name"], format!("{group}-0"));
    assert_eq!(
        pod["metadata"]["labels"],
        json!({
            "llmo.dev/deployment": NAME,
            "llmo.dev/group": group,
            "llmo.dev/revision": revision,
            "llmo.dev/rank": "0",
            "llmo.dev/serving": "true",
            "app.kubernetes.io/name": "llmo-serve",
            "app.kubernetes.io/managed-by": "llmo-operator",
        })
    );
    assert_eq!(
        pod["metadata"]["annotations"],
        json!({"llmo.dev/planned-gpus": "1"})
    );
    assert_eq!(pod["metadata"]["ownerReferences"], owner);
    assert_eq!(
        pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"],
        json!({"nodeSelectorTerms": [{"matchExpressions": [
            {"key": "kubernetes.io/hostname", "operator": "In", "values": ["gpu-a"]}
        ]}]})
    );
    assert_eq!(
        pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"],
        "1"
    );
    assert!(pod.get("status").is_none(), "{pod}");

    let ep = api.apply(&format!("{SERVICES}/smollm2")).await;
    assert_eq!(
        ep["spec"]["selector"],
        json!({"llmo.dev/deployment": NAME, "llmo.dev/rank": "0", "llmo.dev/serving": "true"})
    );
    assert_eq!(
        ep["spec"]["ports"],
        json!([{"name": "http", "port": 80, "targetPort": 8000, "protocol": "TCP"}])
    );

    let status = api.status(&md).await;
    assert_eq!(
        condition_types(&status),
        ["Degraded", "Planned", "Placed", "Available", "Progressing"]
    );
    assert_condition(&status, "Degraded", "False", "Valid");
    assert_condition(&status, "Planned", "True", "Planned");
    assert_condition(&status, "Placed", "True", "Placed");
    assert_condition(&status, "Available", "False", "Starting");
    assert_condition(&status, "Progressing", "True", "Scaling");
    assert_eq!(status["replicas"], 1);
    assert_eq!(status["readyReplicas"], 0);
    assert_eq!(status["updatedReplicas"], 1);
    assert!(
        status.get("desiredReplicas").is_none(),
        "slo mode: the autoscaler owns desiredReplicas"
    );
    assert_eq!(status["revision"], revision);
    assert_eq!(status["selector"], "llmo.dev/deployment=smollm2");
    assert_eq!(status["endpoint"], "http://smollm2.default.svc");
    assert_eq!(status["plan"]["gpuClass"], "l4");
    assert!(
        status.get("groups").is_none(),
        "created groups show up in status from the next reconcile: {status}"
    );
    let (action, outcome) = api.finish().await;
    // The pod watch wakes the deployment up as the group starts: no polling.
    assert_eq!(action, Action::requeue(Duration::from_secs(300)));
    assert!(matches!(outcome, Outcome::Reconciled));

    // The status write wakes the deployment up again before the pod watch has delivered the new
    // pod: the group is in flight, so it is not created twice, and nothing else changed.
    md.status = Some(serde_json::from_value(status).unwrap());
    api.see(&endpoint(&md));
    api.start(&md);
    let (action, _) = api.finish().await;
    assert_eq!(action, Action::requeue(Duration::from_secs(300)));
}

/// The first reconcile of the CPU example at two replicas: two groups, spread over two nodes.
/// kube's Recorder keys its event cache by (type, reason, action, object, related object), not by
/// note; the group is the related object, so each group's `GroupCreated` is its own Event with
/// its own note.
#[tokio::test]
async fn first_reconcile_of_two_cpu_groups_spreads_them_with_an_event_each() {
    let mut md = smollm2();
    md.spec.replicas.min = 2;
    let cpu = class("cpu");
    let g0 = group_name(&md, &cpu, 0);
    let g1 = group_name(&md, &cpu, 1);
    let mut api = ApiServer::new(Cluster {
        classes: vec![cpu],
        nodes: vec![cpu_node("cpu-a"), cpu_node("cpu-b")],
        pods: Vec::new(),
    });
    api.start(&md);

    api.event("Normal", "Planned", "Plan").await;
    let first = api.event("Normal", "GroupCreated", "Create").await;
    assert_eq!(first["note"], format!("created group {g0} on cpu-a"));
    api.apply(&format!("{SERVICES}/{g0}")).await;
    let pod0 = api.apply(&format!("{PODS}/{g0}-0")).await;
    // The group is the Event's related object, so the second group gets its own Event.
    assert_eq!(first["related"]["name"], g0.as_str(), "{first}");
    let second = api.event("Normal", "GroupCreated", "Create").await;
    assert_eq!(second["note"], format!("created group {g1} on cpu-b"));
    assert_eq!(second["related"]["name"], g1.as_str(), "{second}");
    api.apply(&format!("{SERVICES}/{g1}")).await;
    let pod1 = api.apply(&format!("{PODS}/{g1}-0")).await;
    api.apply(&format!("{SERVICES}/smollm2")).await;
    let status = api.status(&md).await;
    assert_eq!(
        (&status["replicas"], &status["updatedReplicas"]),
        (&json!(2), &json!(2))
    );

    let node = |pod: &Value| {
        pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            ["nodeSelectorTerms"][0]["matchExpressions"][0]["values"][0]
            .clone()
    };
    assert_eq!((node(&pod0), node(&pod1)), (json!("cpu-a"), json!("cpu-b")));
    // A cpu class takes no GPU: the annotation is there, empty.
    assert_eq!(pod0["metadata"]["annotations"]["llmo.dev/planned-gpus"], "");
    assert!(pod0["spec"]["containers"][0]["resources"]["limits"]
        .get("nvidia.com/gpu")
        .is_none());
    let (action, _) = api.finish().await;
    assert_eq!(action, Action::requeue(Duration::from_secs(300)));
}

/// A settled deployment: its pods ready, its endpoint as desired and its status what the
/// reconciler computes. Everything it reads comes from the watches: it sends no request at all.
#[tokio::test]
async fn settled_deployment_makes_no_writes() {
    let mut md = smollm2();
    let cpu = class("cpu");
    let pods = running_group(&md, &cpu, 0, "cpu-a", Some("10.0.1.5"));
    let ep = endpoint(&md);
    let mut api = ApiServer::new(Cluster {
        classes: vec![cpu.clone()],
        nodes: vec![cpu_node("cpu-a")],
        pods: pods.clone(),
    });

    // The reconcile that sees the group ready writes the status once...
    api.see(&ep);
    api.start(&md);
    api.event("Normal", "Planned", "Plan").await;
    let status = api.status(&md).await;
    assert_condition(&status, "Available", "True", "MinimumReplicasReady");
    assert_condition(&status, "Progressing", "False", "Stable");
    assert_eq!(status["readyReplicas"], 1);
    assert_eq!(
        status["groups"],
        json!([{"name": group_name(&md, &cpu, 0), "revision": planned(&md, &cpu).1,
                "state": "Ready", "ranks": [{"rank": 0, "node": "cpu-a"}]}])
    );
    let (action, _) = api.finish().await;
    assert_eq!(action, Action::requeue(Duration::from_secs(300)));

    // ...and every reconcile after it only reads.
    let status: ModelDeploymentStatus = serde_json::from_value(status).unwrap();
    md.status = Some(status);
    api.see(&ep);
    api.start(&md);
    let (action, outcome) = api.finish().await;
    assert!(api.log.is_empty(), "no requests at all: {:?}", api.log);
    assert_eq!(action, Action::requeue(Duration::from_secs(300)));
    assert!(matches!(outcome, Outcome::Reconciled));
}

/// Scale down from two groups to one (external mode, `replicas.count: 1`): the higher index is
/// taken out of the endpoint Service by a merge PATCH of its pods (`llmo.dev/serving=false` and
/// the drain start); nothing is deleted yet and the reconcile comes back in 3 s.
#[tokio::test]
async fn scale_down_takes_the_highest_group_out_of_service_without_deleting() {
    let mut md = smollm2();
    md.spec.autoscaling.mode = AutoscalingMode::External;
    md.spec.replicas.count = Some(1);
    let cpu = class("cpu");
    let (_, revision) = planned(&md, &cpu);
    md.status = Some(ModelDeploymentStatus {
        revision: Some(revision.clone()),
        replicas: 2,
        ready_replicas: 2,
        desired_replicas: 2,
        ..Default::default()
    });
    let g1 = group_name(&md, &cpu, 1);
    let mut pods = running_group(&md, &cpu, 0, "cpu-a", Some("10.0.1.5"));
    pods.extend(running_group(&md, &cpu, 1, "cpu-b", Some("10.0.2.7")));
    let mut api = ApiServer::new(Cluster {
        classes: vec![cpu],
        nodes: vec![cpu_node("cpu-a"), cpu_node("cpu-b")],
        pods: pods.clone(),
    });
    api.see(&endpoint(&md));
    api.start(&md);

    let event = api.event("Normal", "GroupDraining", "Drain").await;
    assert_eq!(event["note"], format!("draining group {g1}: scaled down"));
    let before = Timestamp::now();
    let call = api
        .expect(
            Method::PATCH,
            &format!("{PODS}/{g1}-0"),
            &[("fieldManager", "llmo-operator")],
            Some(MERGE),
        )
        .await;
    let started: Timestamp = call.body["metadata"]["annotations"]["llmo.dev/drain-started"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        before.duration_since(started) < SignedDuration::from_secs(5)
            && started <= Timestamp::now(),
        "drain started at {started}"
    );
    assert_eq!(
        call.body,
        json!({"metadata": {
            "labels": {"llmo.dev/serving": "false"},
            "annotations": {"llmo.dev/drain-started": started.to_string()},
        }})
    );
    let mut patched = serde_json::to_value(&pods[1]).unwrap();
    patched["metadata"]["labels"]["llmo.dev/serving"] = json!("false");
    patched["metadata"]["annotations"]["llmo.dev/drain-started"] = json!(started.to_string());
    call.ok(&patched);
    let status = api.status(&md).await;
    assert_condition(&status, "Progressing", "True", "Draining");
    assert_eq!(
        status["desiredReplicas"], 1,
        "external mode: the reconciler owns it"
    );
    assert_eq!(status["replicas"], 2, "the draining group still exists");
    // Status is computed from the pods as the watch last showed them, before the PATCH: the group
    // just taken out of service still shows Ready until the next reconcile, 3 s later.
    assert_eq!(status["groups"][1]["name"], g1);
    assert_eq!(status["groups"][1]["state"], "Ready");

    let (action, _) = api.finish().await;
    assert_eq!(action, Action::requeue(Duration::from_secs(3)));
}

/// A group draining for longer than the propagation delay, whose pod has no address (so no
/// `POST /drain` is sent: nothing can run there): its pods are deleted by label and its headless
/// Service by name, and the deployment settles on the remaining group.
#[tokio::test]
async fn drained_group_without_addresses_is_deleted() {
    let mut md = smollm2();
    md.spec.autoscaling.mode = AutoscalingMode::External;
    md.spec.replicas.count = Some(1);
    let cpu = class("cpu");
    let (_, revision) = planned(&md, &cpu);
    md.status = Some(ModelDeploymentStatus {
        revision: Some(revision),
        ..Default::default()
    });
    let g1 = group_name(&md, &cpu, 1);
    let mut pods = running_group(&md, &cpu, 0, "cpu-a", Some("10.0.1.5"));
    let mut draining = running_group(&md, &cpu, 1, "cpu-b", None);
    let since = Timestamp::now() - SignedDuration::from_secs(10);
    draining[0]
        .labels_mut()
        .insert("llmo.dev/serving".into(), "false".into());
    draining[0]
        .annotations_mut()
        .insert("llmo.dev/drain-started".into(), since.to_string());
    pods.extend(draining.clone());
    let mut api = ApiServer::new(Cluster {
        classes: vec![cpu.clone()],
        nodes: vec![cpu_node("cpu-a"), cpu_node("cpu-b")],
        pods,
    });
    api.see(&endpoint(&md));
    api.start(&md);

    let event = api.event("Normal", "GroupDeleted", "Delete").await;
    assert_eq!(
        event["note"],
        format!("deleted group {g1}: drained: no requests in flight")
    );
    api.delete_group(&g1, &draining).await;
    let status = api.status(&md).await;
    assert_eq!(status["replicas"], 1);
    assert_eq!(status["groups"].as_array().unwrap().len(), 1);
    assert_eq!(status["groups"][0]["name"], group_name(&md, &cpu, 0));
    assert_condition(&status, "Progressing", "False", "Stable");

    let (action, _) = api.finish().await;
    assert_eq!(action, Action::requeue(Duration::from_secs(300)));
}

/// A failed pod: its group is deleted at once (no drain, no serving-label PATCH) and a
/// replacement is created at the next free index: the failed group's index stays taken while
/// the watch still shows its pods.
#[tokio::test]
async fn failed_group_is_deleted_at_once_and_replaced() {
    let mut md = smollm2();
    let cpu = class("cpu");
    md.status = Some(ModelDeploymentStatus {
        revision: Some(planned(&md, &cpu).1),
        ..Default::default()
    });
    let g0 = group_name(&md, &cpu, 0);
    let g1 = group_name(&md, &cpu, 1);
    let mut failed = running_group(&md, &cpu, 0, "cpu-a", Some("10.0.1.5"));
    let status = failed[0].status.as_mut().unwrap();
    status.phase = Some("Failed".into());
    status.conditions.as_mut().unwrap()[0].status = "False".into();
    let mut api = ApiServer::new(Cluster {
        classes: vec![cpu],
        nodes: vec![cpu_node("cpu-a"), cpu_node("cpu-b")],
        pods: failed.clone(),
    });
    api.see(&endpoint(&md));
    api.start(&md);

    let event = api.event("Normal", "GroupDeleted", "Delete").await;
    assert_eq!(
        event["note"],
        format!("deleted group {g0}: a pod of the group failed; the group restarts whole")
    );
    api.delete_group(&g0, &failed).await;
    let event = api.event("Normal", "GroupCreated", "Create").await;
    // The deleted group still counts for spread: the replacement goes to the other node.
    assert_eq!(event["note"], format!("created group {g1} on cpu-b"));
    api.apply(&format!("{SERVICES}/{g1}")).await;
    let pod = api.apply(&format!("{PODS}/{g1}-0")).await;
    assert_eq!(pod["metadata"]["labels"]["llmo.dev/serving"], "true");
    let status = api.status(&md).await;
    assert_eq!(status["replicas"], 1);
    assert!(status.get("groups").is_none(), "{status}");
    assert_condition(&status, "Available", "False", "Starting");
    assert_condition(&status, "Progressing", "True", "Scaling");

    let (action, _) = api.finish().await;
    assert_eq!(action, Action::requeue(Duration::from_secs(300)));
}

/// No node of the class: the group cannot be placed. A Warning Event with the placement's
/// explanation, Placed=False/InsufficientCapacity, no pod or group Service; the endpoint Service
/// is still applied, and the deployment is looked at again in a minute.
#[tokio::test]
async fn insufficient_capacity_is_reported_and_nothing_is_created() {
    let md = smollm2();
    let mut api = ApiServer::new(Cluster {
        classes: vec![class("cpu")],
        ..Default::default()
    });
    api.start(&md);

    api.event("Normal", "Planned", "Plan").await;
    let event = api.event("Warning", "InsufficientCapacity", "Place").await;
    let note = event["note"].as_str().unwrap().to_owned();
    assert!(note.starts_with("needs 0 cpu GPUs"), "{note}");
    api.apply(&format!("{SERVICES}/smollm2")).await;
    let status = api.status(&md).await;
    assert_condition(&status, "Placed", "False", "InsufficientCapacity");
    assert_eq!(condition(&status, "Placed")["message"], note);
    assert_condition(&status, "Progressing", "True", "Scaling");
    // The group that could not be placed is not counted.
    assert_eq!(status["replicas"], 0);
    assert_eq!(status["updatedReplicas"], 0);

    let (action, _) = api.finish().await;
    assert_eq!(action, Action::requeue(Duration::from_secs(60)));
}

/// Two deployments placed one right after the other, before the pod watch has delivered the
/// first one's pod: the GPU the first got is reserved, so the second is not given it too.
#[tokio::test]
async fn a_gpu_given_to_a_pod_not_yet_watched_is_not_given_twice() {
    let mut md = smollm2();
    md.spec.gpu.class = "l4".into();
    let mut second = md.clone();
    second.metadata.name = Some("smollm2-b".into());
    second.metadata.uid = Some("uid-smollm2-b".into());
    let l4 = class("l4");
    let group = format!("smollm2-{}-0", planned(&md, &l4).1);
    let mut api = ApiServer::new(Cluster {
        classes: vec![l4],
        nodes: vec![l4_node("gpu-a", 1)],
        pods: Vec::new(),
    });

    api.start(&md);
    api.event("Normal", "Planned", "Plan").await;
    api.event("Normal", "GroupCreated", "Create").await;
    api.apply(&format!("{SERVICES}/{group}")).await;
    let pod = api.apply(&format!("{PODS}/{group}-0")).await;
    assert_eq!(pod["metadata"]["annotations"]["llmo.dev/planned-gpus"], "0");
    api.apply(&format!("{SERVICES}/smollm2")).await;
    api.status(&md).await;
    api.finish().await;

    api.start(&second);
    let uid = "uid-smollm2-b";
    api.event_about("smollm2-b", uid, "Normal", "Planned", "Plan")
        .await;
    let event = api
        .event_about("smollm2-b", uid, "Warning", "InsufficientCapacity", "Place")
        .await;
    assert!(
        event["note"]
            .as_str()
            .unwrap()
            .starts_with("needs 1 l4 GPU "),
        "{event}"
    );
    api.apply(&format!("{SERVICES}/smollm2-b")).await;
    let status = api.status(&second).await;
    assert_condition(&status, "Placed", "False", "InsufficientCapacity");
    let (action, _) = api.finish().await;
    assert_eq!(action, Action::requeue(Duration::from_secs(60)));
}
