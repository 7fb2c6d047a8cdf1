//! The operator's own metrics and its `/metrics`, `/healthz` and `/readyz` endpoints.
//!
//! Metrics (OpenMetrics text at `/metrics`):
//! - `llmo_operator_reconciles_total{result}`: reconciles by outcome (`ok`, `refused`, `error`);
//! - `llmo_operator_reconcile_duration_seconds`: how long one reconcile took;
//! - `llmo_operator_api_requests_total{verb,resource}`: requests sent to the API server (`get`,
//!   `list`, `watch`, `create`, `patch`, `update`, `delete`) by resource, counted on the client
//!   itself, so nothing is missed;
//! - `llmo_operator_groups{state}`: replica groups by state, summed over deployments;
//! - `llmo_operator_deployment_replicas{namespace,deployment,kind}`: `desired` and `ready`, and
//!   `recommended`, the count the autoscaler's policy recommends (in `external` mode, for HPA or
//!   KEDA to follow);
//! - `llmo_operator_leader`: 1 while this replica holds the lease.
//!
//! `/healthz` answers 200 while the process runs its loops; `/readyz` answers 200 once the CRDs
//! were found and the controller (or the standby wait for the lease) started.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
};

use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Router};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};
use tracing::{info, warn};

use crate::api::GroupState;

/// Label of `llmo_operator_reconciles_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// `ok`, `refused` or `error`.
    pub result: &'static str,
}

/// Labels of `llmo_operator_api_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerbLabel {
    /// The Kubernetes verb of the request.
    pub verb: &'static str,
    /// The resource (plural), e.g. `pods` or `leases`.
    pub resource: String,
}

/// Label of `llmo_operator_groups`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    /// Group state, as in status.
    pub state: &'static str,
}

/// Labels of `llmo_operator_scaling_decisions`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    /// Namespace of the deployment.
    pub namespace: String,
    /// Name of the deployment.
    pub deployment: String,
    /// `up`, `burst` or `down`.
    pub direction: &'static str,
}

/// Labels of `llmo_operator_deployment_replicas`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReplicaLabels {
    /// Namespace of the deployment.
    pub namespace: String,
    /// Name of the deployment.
    pub deployment: String,
    /// `desired`, `ready` or `recommended`.
    pub kind: &'static str,
}

/// Groups per state of one deployment.
type StateCounts = BTreeMap<&'static str, i64>;

/// Every metric of the operator, with its registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Reconciles by outcome.
    pub reconciles: Family<ResultLabel, Counter>,
    /// Reconcile durations in seconds.
    pub reconcile_duration: Histogram,
    /// API requests by verb.
    pub api_requests: Family<VerbLabel, Counter>,
    /// Groups by state.
    pub groups: Family<StateLabel, Gauge>,
    /// Desired, ready and recommended replicas per deployment.
    pub replicas: Family<ReplicaLabels, Gauge>,
    /// The autoscaler's replica changes per deployment, by direction.
    pub scaling_decisions: Family<DecisionLabels, Counter>,
    /// 1 while this replica leads.
    pub leader: Gauge,
    /// Group states per deployment, summed into `groups` on every change.
    per_deployment: Mutex<BTreeMap<(String, String), StateCounts>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers the metrics.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("llmo_operator");
        let reconciles = Family::<ResultLabel, Counter>::default();
        registry.register(
            "reconciles",
            "Reconciles of ModelDeployments by outcome",
            reconciles.clone(),
        );
        let reconcile_duration = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        registry.register(
            "reconcile_duration_seconds",
            "Time one reconcile took",
            reconcile_duration.clone(),
        );
        let api_requests = Family::<VerbLabel, Counter>::default();
        registry.register(
            "api_requests",
            "Requests sent to the Kubernetes API server, by verb",
            api_requests.clone(),
        );
        let groups = Family::<StateLabel, Gauge>::default();
        registry.register(
            "groups",
            "Replica groups of all deployments, by state",
            groups.clone(),
        );
        let replicas = Family::<ReplicaLabels, Gauge>::default();
        registry.register(
            "deployment_replicas",
            "Desired, ready and recommended (by the SLO policy) replicas of each ModelDeployment",
            replicas.clone(),
        );
        let scaling_decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "scaling_decisions",
            "Replica changes the SLO autoscaler decided, per deployment and direction",
            scaling_decisions.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica holds the leader lease",
            leader.clone(),
        );
        Self {
            registry,
            reconciles,
            reconcile_duration,
            api_requests,
            groups,
            replicas,
            scaling_decisions,
            leader,
            per_deployment: Mutex::new(BTreeMap::new()),
        }
    }

    /// Records the group states and replica counts of one deployment after a reconcile.
    pub fn record_deployment(
        &self,
        namespace: &str,
        deployment: &str,
        states: &[GroupState],
        desired: u32,
        ready: u32,
    ) {
        let mut counts = StateCounts::new();
        for s in states {
            *counts.entry(state_name(*s)).or_default() += 1;
        }
        self.set_groups((namespace.to_owned(), deployment.to_owned()), Some(counts));
        for (kind, value) in [("desired", desired), ("ready", ready)] {
            self.replicas
                .get_or_create(&ReplicaLabels {
                    namespace: namespace.to_owned(),
                    deployment: deployment.to_owned(),
                    kind,
                })
                .set(i64::from(value));
        }
    }

    /// Records the replica count the autoscaler's policy recommends for one deployment.
    pub fn record_recommendation(&self, namespace: &str, deployment: &str, replicas: u32) {
        // Known to `retain_deployments` even before its first reconcile, so the series ends
        // with the deployment.
        self.per_deployment
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry((namespace.to_owned(), deployment.to_owned()))
            .or_default();
        self.replicas
            .get_or_create(&ReplicaLabels {
                namespace: namespace.to_owned(),
                deployment: deployment.to_owned(),
                kind: "recommended",
            })
            .set(i64::from(replicas));
    }

    /// Forgets every deployment not in `existing` (namespace, name): their series end.
    pub fn retain_deployments(&self, existing: &std::collections::BTreeSet<(String, String)>) {
        let gone: Vec<(String, String)> = self
            .per_deployment
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .keys()
            .filter(|k| !existing.contains(*k))
            .cloned()
            .collect();
        for (ns, name) in gone {
            self.forget_deployment(&ns, &name);
        }
    }

    /// Forgets a deleted deployment.
    pub fn forget_deployment(&self, namespace: &str, deployment: &str) {
        self.set_groups((namespace.to_owned(), deployment.to_owned()), None);
        for kind in ["desired", "ready", "recommended"] {
            self.replicas.remove(&ReplicaLabels {
                namespace: namespace.to_owned(),
                deployment: deployment.to_owned(),
                kind,
            });
        }
        for direction in ["up", "burst", "down"] {
            self.scaling_decisions.remove(&DecisionLabels {
                namespace: namespace.to_owned(),
                deployment: deployment.to_owned(),
                direction,
            });
        }
    }

    fn set_groups(&self, key: (String, String), counts: Option<StateCounts>) {
        let mut all = self
            .per_deployment
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match counts {
            Some(c) => {
                all.insert(key, c);
            }
            None => {
                all.remove(&key);
            }
        }
        for state in ["Pending", "Starting", "Ready", "Draining", "Failed"] {
            let total: i64 = all.values().filter_map(|c| c.get(state)).sum();
            self.groups.get_or_create(&StateLabel { state }).set(total);
        }
    }

    /// Counts one API request.
    pub fn count_request(&self, method: &http::Method, uri: &http::Uri) {
        let verb = request_verb(method, uri);
        let resource = request_resource(uri).to_owned();
        self.api_requests
            .get_or_create(&VerbLabel { verb, resource })
            .inc();
    }

    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            warn!(error = %e, "could not encode metrics");
        }
        out
    }
}

fn state_name(s: GroupState) -> &'static str {
    match s {
        GroupState::Pending => "Pending",
        GroupState::Starting => "Starting",
        GroupState::Ready => "Ready",
        GroupState::Draining => "Draining",
        GroupState::Failed => "Failed",
    }
}

/// The Kubernetes verb of a request, from its method and URL.
pub fn request_verb(method: &http::Method, uri: &http::Uri) -> &'static str {
    let query = uri.query().unwrap_or("");
    let watch = query
        .split('&')
        .any(|kv| kv == "watch=true" || kv == "watch=1");
    match *method {
        http::Method::GET if watch => "watch",
        http::Method::GET => {
            // A collection URL ends in a resource plural: .../namespaces/ns/pods or /api/v1/pods.
            // A named object has one more segment than its collection; count segments after the
            // group/version prefix.
            let path = uri.path().trim_end_matches('/');
            let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
            let after_version = if segments.first() == Some(&"api") {
                segments.get(2..).unwrap_or(&[])
            } else {
                segments.get(3..).unwrap_or(&[])
            };
            // [plural] or [namespaces, ns, plural] are lists; [plural, name],
            // [namespaces, ns, plural, name] and subresources are gets.
            let list = matches!(after_version, [_] | ["namespaces", _, _]);
            if list {
                "list"
            } else {
                "get"
            }
        }
        http::Method::POST => "create",
        http::Method::PUT => "update",
        http::Method::PATCH => "patch",
        http::Method::DELETE => "delete",
        _ => "other",
    }
}

/// The resource (plural) a request is about, from its URL; `""` for discovery and the like.
pub fn request_resource(uri: &http::Uri) -> &str {
    let segments: Vec<&str> = uri.path().split('/').filter(|s| !s.is_empty()).collect();
    let after_version = if segments.first() == Some(&"api") {
        segments.get(2..).unwrap_or(&[])
    } else {
        segments.get(3..).unwrap_or(&[])
    };
    match after_version {
        ["namespaces", _, plural, ..] => plural,
        [plural, ..] => plural,
        [] => "",
    }
}

/// Liveness and readiness flags the endpoints report.
#[derive(Debug, Default)]
pub struct Health {
    /// Set once the controller (or the standby loop) runs.
    pub ready: AtomicBool,
}

#[derive(Debug, Clone)]
struct ServerState {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `addr` until the task is dropped.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready_handler))
        .with_state(ServerState { metrics, health });
    let listener = tokio::net::TcpListener::bind(addr).await?;
    info!(%addr, "serving /metrics, /healthz and /readyz");
    axum::serve(listener, app).await
}

async fn metrics_handler(State(s): State<ServerState>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
}

async fn ready_handler(State(s): State<ServerState>) -> impl IntoResponse {
    if s.health.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verb(method: http::Method, uri: &str) -> &'static str {
        request_verb(&method, &uri.parse().unwrap())
    }

    #[test]
    fn verbs_from_requests() {
        use http::Method;
        assert_eq!(verb(Method::GET, "/api/v1/pods?labelSelector=a"), "list");
        assert_eq!(verb(Method::GET, "/api/v1/namespaces/d/pods"), "list");
        assert_eq!(verb(Method::GET, "/api/v1/namespaces/d/pods/p"), "get");
        assert_eq!(
            verb(Method::GET, "/api/v1/namespaces/d/pods?watch=true&x=1"),
            "watch"
        );
        assert_eq!(
            verb(Method::GET, "/apis/llmo.dev/v1alpha1/gpunodes"),
            "list"
        );
        assert_eq!(
            verb(Method::GET, "/apis/llmo.dev/v1alpha1/gpunodes/n1"),
            "get"
        );
        assert_eq!(
            verb(
                Method::GET,
                "/apis/llmo.dev/v1alpha1/namespaces/d/modeldeployments/m/status"
            ),
            "get"
        );
        assert_eq!(
            verb(
                Method::GET,
                "/apis/llmo.dev/v1alpha1/namespaces/d/modeldeployments"
            ),
            "list"
        );
        assert_eq!(verb(Method::PATCH, "/api/v1/namespaces/d/pods/p"), "patch");
        assert_eq!(verb(Method::POST, "/api/v1/namespaces/d/events"), "create");
        assert_eq!(verb(Method::DELETE, "/api/v1/namespaces/d/pods"), "delete");
    }

    #[test]
    fn group_gauges_sum_over_deployments_and_forget() {
        let m = Metrics::new();
        m.record_deployment("a", "x", &[GroupState::Ready, GroupState::Starting], 2, 1);
        m.record_deployment("b", "y", &[GroupState::Ready], 1, 1);
        let ready = |m: &Metrics| m.groups.get_or_create(&StateLabel { state: "Ready" }).get();
        assert_eq!(ready(&m), 2);
        m.forget_deployment("a", "x");
        assert_eq!(ready(&m), 1);
        let text = m.encode();
        assert!(text.contains("llmo_operator_deployment_replicas{namespace=\"b\",deployment=\"y\",kind=\"desired\"} 1"), "{text}");
        assert!(!text.contains("deployment=\"x\""), "{text}");
        // Keeping only what exists drops the rest, decisions included.
        m.scaling_decisions
            .get_or_create(&DecisionLabels {
                namespace: "b".into(),
                deployment: "y".into(),
                direction: "up",
            })
            .inc();
        m.retain_deployments(&[("b".to_owned(), "z".to_owned())].into_iter().collect());
        assert_eq!(ready(&m), 0);
        let text = m.encode();
        assert!(!text.contains("deployment=\"y\""), "{text}");
    }

    #[test]
    fn recommendations_are_exported_and_end_with_their_deployment() {
        let m = Metrics::new();
        m.record_recommendation("a", "x", 3);
        m.record_deployment("a", "x", &[GroupState::Ready], 2, 2);
        m.record_recommendation("b", "y", 5);
        let text = m.encode();
        for want in [
            r#"llmo_operator_deployment_replicas{namespace="a",deployment="x",kind="recommended"} 3"#,
            r#"llmo_operator_deployment_replicas{namespace="a",deployment="x",kind="desired"} 2"#,
            r#"llmo_operator_deployment_replicas{namespace="b",deployment="y",kind="recommended"} 5"#,
        ] {
            assert!(text.contains(want), "{want} in {text}");
        }
        // A recommendation alone (no reconcile yet) still ends when its deployment goes.
        m.retain_deployments(&[("a".to_owned(), "x".to_owned())].into_iter().collect());
        let text = m.encode();
        assert!(!text.contains("deployment=\"y\""), "{text}");
        assert!(text.contains("kind=\"recommended\"} 3"), "{text}");
        m.forget_deployment("a", "x");
        assert!(!m.encode().contains("kind=\"recommended\""));
    }

    #[test]
    fn requests_are_counted_by_verb_and_resource() {
        let m = Metrics::new();
        m.count_request(&http::Method::GET, &"/api/v1/pods".parse().unwrap());
        m.count_request(
            &http::Method::PATCH,
            &"/api/v1/namespaces/d/pods/p".parse().unwrap(),
        );
        m.count_request(
            &http::Method::PUT,
            &"/apis/coordination.k8s.io/v1/namespaces/d/leases/l"
                .parse()
                .unwrap(),
        );
        let text = m.encode();
        for want in [
            r#"llmo_operator_api_requests_total{verb="list",resource="pods"} 1"#,
            r#"llmo_operator_api_requests_total{verb="patch",resource="pods"} 1"#,
            r#"llmo_operator_api_requests_total{verb="update",resource="leases"} 1"#,
        ] {
            assert!(text.contains(want), "{want} in {text}");
        }
        let resource = |u: &str| request_resource(&u.parse().unwrap()).to_owned();
        assert_eq!(
            resource("/apis/llmo.dev/v1alpha1/gpunodes/n/status"),
            "gpunodes"
        );
        assert_eq!(resource("/api/v1/namespaces/d"), "namespaces");
        assert_eq!(resource("/apis"), "");
    }
}
