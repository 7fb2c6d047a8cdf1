//! The HTTP server: OpenAI-compatible endpoints plus health, readiness, metrics and drain.

mod completions;
pub mod error;
pub mod openai;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use crate::engine::EngineHandle;
use crate::metrics::Metrics;
use error::ApiError;

/// Shared by all handlers. The engine is set once the model has loaded.
#[derive(Debug)]
pub struct AppState {
    pub engine: OnceLock<EngineHandle>,
    pub served_name: String,
    pub metrics: Arc<Metrics>,
    pub draining: AtomicBool,
    /// Set by `POST /drain`: out of the load balancer. Requests that still arrive (on kept-alive
    /// connections opened before) are served, and every response closes its connection, so
    /// clients reconnect through the Service to a pod that is in it.
    pub out_of_service: AtomicBool,
    pub started: u64,
    /// Set in a process that hosts only other ranks of a parallel group (not rank 0): it is ready
    /// once its ranks have joined and loaded, and it serves no requests; this says where to go.
    pub group_worker: OnceLock<String>,
}

impl AppState {
    pub fn new(served_name: String, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            engine: OnceLock::new(),
            served_name,
            metrics,
            draining: AtomicBool::new(false),
            out_of_service: AtomicBool::new(false),
            started: unix_now(),
            group_worker: OnceLock::new(),
        })
    }

    fn engine(&self) -> Result<&EngineHandle, ApiError> {
        if self.draining.load(Ordering::SeqCst) {
            return Err(ApiError::unavailable(
                "the server is draining and accepts no new requests".into(),
            ));
        }
        if let Some(w) = self.group_worker.get() {
            return Err(ApiError::unavailable(w.clone()));
        }
        self.engine
            .get()
            .ok_or_else(|| ApiError::unavailable("the model is still loading".into()))
    }

    /// Leaves the load balancer (readiness fails) without refusing anything.
    pub fn leave_service(&self) {
        self.out_of_service.store(true, Ordering::SeqCst);
    }

    /// Stops admitting new requests; in-flight ones continue. For shutdown.
    pub fn start_drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
        if let Some(e) = self.engine.get() {
            e.state.draining.store(true, Ordering::SeqCst);
        }
    }

    pub fn in_flight(&self) -> usize {
        self.engine
            .get()
            .map(|e| e.state.in_flight.load(Ordering::SeqCst))
            .unwrap_or(0)
    }

    /// Waits until no request is in flight, or `deadline` passes.
    pub async fn wait_idle(&self, deadline: Duration) -> bool {
        let until = tokio::time::Instant::now() + deadline;
        while self.in_flight() > 0 {
            if tokio::time::Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        true
    }
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(completions::chat))
        .route("/v1/completions", post(completions::completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/drain", post(drain))
        .fallback(not_found)
        .layer(axum::middleware::map_response_with_state(
            state.clone(),
            close_when_out_of_service,
        ))
        .with_state(state)
}

/// Out of service, every response asks the client to reconnect elsewhere.
async fn close_when_out_of_service(
    State(s): State<Arc<AppState>>,
    mut response: axum::response::Response,
) -> axum::response::Response {
    if s.out_of_service.load(Ordering::SeqCst) {
        response.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
    }
    response
}

async fn models(State(s): State<Arc<AppState>>) -> impl IntoResponse {
    let ctx = s.engine.get().map(|e| e.config.context_length);
    Json(json!({
        "object": "list",
        "data": [{
            "id": s.served_name,
            "object": "model",
            "created": s.started,
            "owned_by": "llmo",
            "max_model_len": ctx,
        }]
    }))
}

async fn health() -> &'static str {
    "ok"
}

async fn ready(State(s): State<Arc<AppState>>) -> impl IntoResponse {
    if s.draining.load(Ordering::SeqCst) || s.out_of_service.load(Ordering::SeqCst) {
        (StatusCode::SERVICE_UNAVAILABLE, "draining")
    } else if s.engine.get().is_none() && s.group_worker.get().is_none() {
        (StatusCode::SERVICE_UNAVAILABLE, "loading")
    } else {
        (StatusCode::OK, "ready")
    }
}

async fn metrics(State(s): State<Arc<AppState>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
}

/// `POST /drain`: the operator took this pod out of its Service and asks it to wind down. It
/// turns not-ready, still serves what arrives on connections opened before (closing each after
/// its response), and reports how many requests are running. Idempotent: the operator polls it.
async fn drain(State(s): State<Arc<AppState>>) -> impl IntoResponse {
    if !s.out_of_service.swap(true, Ordering::SeqCst) {
        tracing::info!(in_flight = s.in_flight(), "drain requested");
    }
    Json(json!({"draining": true, "in_flight": s.in_flight()}))
}

async fn not_found() -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        message: "unknown route; see /v1/chat/completions, /v1/completions, /v1/models".into(),
        kind: "invalid_request_error",
        param: None,
        code: Some("not_found"),
        retry_after: None,
    }
}
