//! The OpenAI-compatible API of a real `llmo-serve` process serving SmolLM2-135M-Instruct.

mod common;

use std::time::Duration;

use futures::StreamExt;
use serde_json::{json, Value};

use common::Server;

async fn post(base: &str, path: &str, body: Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{base}{path}"))
        .json(&body)
        .send()
        .await
        .unwrap()
}

/// Reads an SSE response into its `data:` payloads.
async fn sse_events(resp: reqwest::Response) -> Vec<String> {
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let mut buf = String::new();
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        buf.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    buf.lines()
        .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
        .map(str::to_string)
        .collect()
}

fn chat_body(content: &str, stream: bool) -> Value {
    json!({
        "model": "smollm2",
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
        "max_tokens": 40,
        "stream": stream,
        "stream_options": {"include_usage": true},
    })
}

#[tokio::test]
async fn api_end_to_end() {
    let server = Server::start(&[]);
    let base = &server.base;

    // Non-streamed chat answers the capital question.
    let resp = post(
        base,
        "/v1/chat/completions",
        chat_body("What is the capital of France?", false),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    let text = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "smollm2");
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() > 0);

    // Streamed text is identical; chunks end with finish_reason, usage, then [DONE].
    let events = sse_events(
        post(
            base,
            "/v1/chat/completions",
            chat_body("What is the capital of France?", true),
        )
        .await,
    )
    .await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, text);
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["object"], "chat.completion.chunk");
    assert!(finish["choices"][0]["finish_reason"].is_string());
    let usage = &chunks[chunks.len() - 1];
    assert_eq!(usage["choices"].as_array().unwrap().len(), 0);
    assert_eq!(
        usage["usage"]["completion_tokens"],
        v["usage"]["completion_tokens"]
    );
    assert_eq!(usage["usage"]["prompt_tokens"], v["usage"]["prompt_tokens"]);
    // The second identical prompt reused the first one's full KV blocks.
    assert!(
        usage["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
            >= 16
    );
    assert!(text.contains("Paris"), "{text:?}");

    // Completions, streamed and not.
    let body = json!({"model": "smollm2", "prompt": "Once upon a time", "max_tokens": 12, "temperature": 0});
    let v: Value = post(base, "/v1/completions", body.clone())
        .await
        .json()
        .await
        .unwrap();
    let ctext = v["choices"][0]["text"].as_str().unwrap().to_string();
    assert!(ctext.starts_with(", the city of"), "{ctext:?}");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    let events = sse_events(post(base, "/v1/completions", sbody).await).await;
    let streamed: String = events[..events.len() - 1]
        .iter()
        .map(|e| {
            serde_json::from_str::<Value>(e).unwrap()["choices"][0]["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(streamed, ctext);

    // Stop strings end the text before the stop string.
    let mut stop = body.clone();
    stop["stop"] = json!(["Nova"]);
    let v: Value = post(base, "/v1/completions", stop)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["choices"][0]["text"], ", the city of ");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");

    // Same seed, same sampled text.
    let mut sampled = body.clone();
    sampled["temperature"] = json!(0.9);
    sampled["seed"] = json!(1234);
    let a: Value = post(base, "/v1/completions", sampled.clone())
        .await
        .json()
        .await
        .unwrap();
    let b: Value = post(base, "/v1/completions", sampled)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"]);

    // /v1/models, /health, /metrics
    let v: Value = reqwest::get(format!("{base}/v1/models"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["data"][0]["id"], "smollm2");
    assert_eq!(
        reqwest::get(format!("{base}/health"))
            .await
            .unwrap()
            .status(),
        200
    );
    let m = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "llmo_time_to_first_token_seconds_bucket",
        "llmo_inter_token_latency_seconds_bucket",
        "llmo_request_duration_seconds_bucket",
        "llmo_requests_running",
        "llmo_requests_waiting",
        "llmo_kv_cache_usage_ratio",
        "llmo_engine_busy_ratio",
        "llmo_prompt_tokens_total",
        "llmo_generation_tokens_total",
        "llmo_requests_total{outcome=\"success\"}",
        "llmo_prefix_cache_hit_ratio",
    ] {
        assert!(m.contains(name), "metric {name} missing from:\n{m}");
    }
    // The identical chat prompts above shared their prompt blocks.
    let hits: f64 = m
        .lines()
        .find(|l| l.starts_with("llmo_prefix_cache_hit_tokens_total"))
        .and_then(|l| l.split_whitespace().last())
        .unwrap()
        .parse()
        .unwrap();
    assert!(hits > 0.0, "no prefix cache hits:\n{m}");
}

#[tokio::test]
async fn concurrent_greedy_requests_match_each_alone() {
    let server = Server::start(&[]);
    let base = server.base.clone();
    let prompts: Vec<String> = (0..16)
        .map(|i| {
            format!(
                "Write one sentence about the number {i} and a {}.",
                ["cat", "ship", "tree", "cloud"][i % 4]
            )
        })
        .collect();
    let body = |p: &str| json!({"model": "smollm2", "messages": [{"role": "user", "content": p}], "temperature": 0, "max_tokens": 24});
    let mut alone = Vec::new();
    for p in &prompts {
        let v: Value = post(&base, "/v1/chat/completions", body(p))
            .await
            .json()
            .await
            .unwrap();
        alone.push(
            v["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    let tasks: Vec<_> = prompts
        .iter()
        .map(|p| {
            let b = body(p);
            let base = base.clone();
            tokio::spawn(async move {
                let v: Value = post(&base, "/v1/chat/completions", b)
                    .await
                    .json()
                    .await
                    .unwrap();
                v["choices"][0]["message"]["content"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
        })
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        assert_eq!(t.await.unwrap(), alone[i], "prompt {i}");
    }
}

#[tokio::test]
async fn bad_requests_get_openai_errors() {
    let server = Server::start(&["--context-length", "256"]);
    let base = &server.base;
    let client = reqwest::Client::new();
    let long = "word ".repeat(400);
    let cases: Vec<(&str, String)> = vec![
        ("/v1/chat/completions", "{not json".into()),
        (
            "/v1/chat/completions",
            json!({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}).to_string(),
        ),
        ("/v1/chat/completions", json!({"messages": []}).to_string()),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": long}]}).to_string(),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000})
                .to_string(),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "hi"}], "temperature": -0.5})
                .to_string(),
        ),
        ("/v1/completions", json!({"prompt": 42}).to_string()),
    ];
    for (path, body) in cases {
        let r = client
            .post(format!("{base}{path}"))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{body}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error", "{body}");
        assert!(!v["error"]["message"].as_str().unwrap().is_empty());
    }
    let m = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        m.contains("llmo_requests_total{outcome=\"rejected\"} 7"),
        "{m}"
    );
}

#[tokio::test]
async fn full_queue_gets_429_and_drain_leaves_service_closing_connections() {
    let server = Server::start(&["--max-running", "1", "--max-waiting", "1"]);
    let base = server.base.clone();
    let body = json!({"prompt": "Tell me a long story.", "max_tokens": 200, "temperature": 0});
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let base = base.clone();
            let body = body.clone();
            tokio::spawn(async move {
                let r = post(&base, "/v1/completions", body).await;
                let retry = r
                    .headers()
                    .get("retry-after")
                    .map(|h| h.to_str().unwrap().to_string());
                (r.status().as_u16(), retry, r.text().await.unwrap())
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        let (s, retry, text) = t.await.unwrap();
        if s == 429 {
            assert!(retry.is_some(), "429 without Retry-After");
            assert!(text.contains("rate_limit_exceeded"), "{text}");
        }
        statuses.push(s);
    }
    assert!(statuses.contains(&429), "{statuses:?}");
    assert!(statuses.contains(&200), "{statuses:?}");

    let r = reqwest::Client::new()
        .post(format!("{base}/drain"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        reqwest::get(format!("{base}/ready"))
            .await
            .unwrap()
            .status(),
        503
    );
    // Out of the Service, a request that still arrives (on an old connection) is served, and
    // its connection closed so the client reconnects elsewhere.
    let short = json!({"prompt": "Hello", "max_tokens": 2, "temperature": 0});
    let r = post(&base, "/v1/completions", short).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers().get("connection").map(|v| v.to_str().unwrap()),
        Some("close")
    );
    let drained: serde_json::Value = reqwest::Client::new()
        .post(format!("{base}/drain"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(drained["in_flight"], 0, "{drained}");
    assert_eq!(
        reqwest::get(format!("{base}/health"))
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test]
async fn sigterm_finishes_in_flight_requests_then_exits() {
    let mut server = Server::start(&[]);
    let base = server.base.clone();
    let req = tokio::spawn(async move {
        let body = json!({"prompt": "Once upon a time", "max_tokens": 48, "temperature": 0, "stream": true});
        sse_events(post(&base, "/v1/completions", body).await).await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid = server.child.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let events = req.await.unwrap();
    assert_eq!(events.last().unwrap(), "[DONE]");
    let n: usize = events.len();
    assert!(n > 10, "stream was cut: {events:?}");
    // The stream has ended, so blocking this test's thread on the exit is fine.
    let status = server.child.wait().unwrap();
    assert!(status.success(), "exit status {status}");
}

#[tokio::test]
async fn client_disconnect_frees_the_sequence() {
    let server = Server::start(&[]);
    let base = server.base.clone();
    let body =
        json!({"prompt": "Once upon a time", "max_tokens": 1000, "temperature": 0, "stream": true});
    let resp = post(&base, "/v1/completions", body).await;
    let mut stream = resp.bytes_stream();
    // a few chunks arrive, then the client goes away
    for _ in 0..3 {
        stream.next().await.unwrap().unwrap();
    }
    drop(stream);
    let metric = |m: &str, name: &str| -> f64 {
        m.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse().ok())
            .unwrap_or(-1.0)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let m = reqwest::get(format!("{base}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let cancelled = metric(&m, "llmo_requests_total{outcome=\"cancelled\"}");
        if cancelled == 1.0 {
            assert_eq!(metric(&m, "llmo_requests_running"), 0.0, "{m}");
            assert_eq!(metric(&m, "llmo_kv_cache_usage_ratio"), 0.0, "{m}");
            let generated = metric(&m, "llmo_generation_tokens_total");
            assert!(
                generated < 1000.0,
                "the sequence ran to the end: {generated}"
            );
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not cancelled:\n{m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
