//! `/v1/chat/completions` and `/v1/completions`, streamed (SSE) or not.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedReceiver;

use super::error::ApiError;
use super::openai::{parse, ChatRequest, Common, CompletionRequest, Limits};
use super::{unix_now, AppState};
use crate::engine::{EngineError, EngineHandle, Event, FinishReason, Usage};
use crate::metrics::outcome;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Text,
}

struct Job {
    id: String,
    model: String,
    created: u64,
    kind: Kind,
    include_usage: bool,
    rx: UnboundedReceiver<Event>,
}

fn reject(s: &AppState, e: ApiError) -> Response {
    s.metrics.count_request(outcome::REJECTED);
    tracing::debug!(status = e.status.as_u16(), message = %e.message, "request rejected");
    e.into_response()
}

fn new_id(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}-{:x}{:06x}",
        unix_now(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn start(
    s: &AppState,
    engine: &EngineHandle,
    common: &Common,
    prompt: Vec<u32>,
    kind: Kind,
) -> Result<(Job, bool), ApiError> {
    let limits = Limits {
        served_name: s.served_name.clone(),
        context_length: engine.config.context_length,
    };
    let params = common.validate(&limits, prompt.len())?;
    let id = new_id(if kind == Kind::Chat {
        "chatcmpl"
    } else {
        "cmpl"
    });
    let rx = engine
        .submit(id.clone(), prompt, params)
        .map_err(|e| match e {
            EngineError::QueueFull(_) => ApiError::queue_full(e.to_string()),
            EngineError::Draining => ApiError::unavailable(e.to_string()),
            _ => ApiError::internal(e.to_string()),
        })?;
    Ok((
        Job {
            id,
            model: s.served_name.clone(),
            created: unix_now(),
            kind,
            include_usage: common.include_usage(),
            rx,
        },
        common.stream,
    ))
}

pub async fn chat(State(s): State<Arc<AppState>>, body: Bytes) -> Response {
    let prepared = (|| {
        let engine = s.engine()?;
        let req: ChatRequest = parse(&body)?;
        let messages = req.chat_messages()?;
        let text = engine
            .tokenizer
            .chat_template
            .render(&messages)
            .map_err(|e| ApiError::invalid(e.to_string(), Some("messages")))?;
        let prompt = engine.tokenizer.encode(&text);
        start(&s, engine, &req.common, prompt, Kind::Chat)
    })();
    respond(&s, prepared).await
}

pub async fn completions(State(s): State<Arc<AppState>>, body: Bytes) -> Response {
    let prepared = (|| {
        let engine = s.engine()?;
        let req: CompletionRequest = parse(&body)?;
        let prompt = engine.tokenizer.encode(&req.prompt_text()?);
        start(&s, engine, &req.common, prompt, Kind::Text)
    })();
    respond(&s, prepared).await
}

async fn respond(s: &AppState, prepared: Result<(Job, bool), ApiError>) -> Response {
    match prepared {
        Err(e) => reject(s, e),
        Ok((job, true)) => stream(job).into_response(),
        Ok((job, false)) => collect(job).await,
    }
}

fn usage_json(u: &Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    })
}

async fn collect(mut job: Job) -> Response {
    let mut text = String::new();
    while let Some(ev) = job.rx.recv().await {
        match ev {
            Event::Delta(d) => text.push_str(&d),
            Event::Error(e) => return ApiError::internal(e).into_response(),
            Event::Done { reason, usage } => {
                let choice = match job.kind {
                    Kind::Chat => json!({
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": null,
                        "finish_reason": reason.as_str(),
                    }),
                    Kind::Text => json!({
                        "index": 0,
                        "text": text,
                        "logprobs": null,
                        "finish_reason": reason.as_str(),
                    }),
                };
                return Json(json!({
                    "id": job.id,
                    "object": if job.kind == Kind::Chat { "chat.completion" } else { "text_completion" },
                    "created": job.created,
                    "model": job.model,
                    "choices": [choice],
                    "usage": usage_json(&usage),
                }))
                .into_response();
            }
        }
    }
    ApiError::internal("the engine stopped before the request finished".into()).into_response()
}

impl Job {
    fn chunk(&self, delta: Option<&str>, first: bool, finish: Option<FinishReason>) -> Value {
        let choice = match self.kind {
            Kind::Chat => {
                let mut d = serde_json::Map::new();
                if first {
                    d.insert("role".into(), json!("assistant"));
                }
                if let Some(t) = delta {
                    d.insert("content".into(), json!(t));
                }
                json!({"index": 0, "delta": d, "logprobs": null, "finish_reason": finish.map(FinishReason::as_str)})
            }
            Kind::Text => json!({
                "index": 0,
                "text": delta.unwrap_or(""),
                "logprobs": null,
                "finish_reason": finish.map(FinishReason::as_str),
            }),
        };
        self.envelope(json!([choice]))
    }

    fn envelope(&self, choices: Value) -> Value {
        json!({
            "id": self.id,
            "object": if self.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" },
            "created": self.created,
            "model": self.model,
            "choices": choices,
        })
    }
}

fn data(v: &Value) -> Result<SseEvent, Infallible> {
    Ok(SseEvent::default().data(v.to_string()))
}

/// Server-sent events as OpenAI clients expect: chunks, an optional usage chunk, `[DONE]`.
/// Dropping the stream (client gone) drops the receiver, which cancels the sequence.
fn stream(mut job: Job) -> Sse<impl futures::Stream<Item = Result<SseEvent, Infallible>>> {
    let s = async_stream::stream! {
        if job.kind == Kind::Chat {
            yield data(&job.chunk(Some(""), true, None));
        }
        while let Some(ev) = job.rx.recv().await {
            match ev {
                Event::Delta(d) => yield data(&job.chunk(Some(&d), false, None)),
                Event::Error(e) => {
                    yield data(&ApiError::internal(e).body());
                    break;
                }
                Event::Done { reason, usage } => {
                    yield data(&job.chunk(None, false, Some(reason)));
                    if job.include_usage {
                        let mut v = job.envelope(json!([]));
                        v["usage"] = usage_json(&usage);
                        yield data(&v);
                    }
                    break;
                }
            }
        }
        yield Ok(SseEvent::default().data("[DONE]"));
    };
    Sse::new(s).keep_alive(KeepAlive::default())
}
