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
    pub started: u64,
}

impl AppState {
    pub fn new(served_name: String, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            engine: OnceLock::new(),
            served_name,
            metrics,
            draining: AtomicBool::new(false),
            started: unix_now(),
        })
    }

    fn engine(&self) -> Result<&EngineHandle, ApiError> {
        if self.draining.load(Ordering::SeqCst) {
            return Err(ApiError::unavailable(
                "the server is draining and accepts no new requests".into(),
            ));
        }
        self.engine
            .get()
            .ok_or_else(|| ApiError::unavailable("the model is still loading".into()))
    }

    /// Stops admitting new requests; in-flight ones continue.
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
        .with_state(state)
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
    if s.draining.load(Ordering::SeqCst) {
        (StatusCode::SERVICE_UNAVAILABLE, "draining")
    } else if s.engine.get().is_none() {
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

async fn drain(State(s): State<Arc<AppState>>) -> impl IntoResponse {
    s.start_drain();
    tracing::info!(in_flight = s.in_flight(), "drain requested");
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
