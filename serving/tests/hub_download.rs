//! `hf://` downloads against a local server that mimics the Hub's file layout:
//! `/api/models/{org}/{repo}/revision/{rev}` and `/{org}/{repo}/resolve/{rev}/{file}` with
//! HTTP Range support and an `X-Linked-Etag` sha256.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use sha2::{Digest, Sha256};

use llmo_serve::model::hub::{download, HubError, HubSpec};

struct Hub {
    file: Vec<u8>,
    announced_sha: String,
    bytes_served: AtomicU64,
}

async fn listing() -> Json<serde_json::Value> {
    Json(serde_json::json!({"siblings": [
        {"rfilename": "README.md"},
        {"rfilename": "model.Q4_K_M.gguf"},
        {"rfilename": "model.Q8_0.gguf"},
    ]}))
}

async fn resolve(
    State(hub): State<Arc<Hub>>,
    Path((_o, _r, _rev, file)): Path<(String, String, String, String)>,
    headers: HeaderMap,
) -> Response {
    if !file.ends_with(".gguf") {
        return StatusCode::NOT_FOUND.into_response();
    }
    let start: usize = headers
        .get("range")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes="))
        .and_then(|v| v.trim_end_matches('-').parse().ok())
        .unwrap_or(0);
    let body = hub.file[start..].to_vec();
    hub.bytes_served
        .fetch_add(body.len() as u64, Ordering::SeqCst);
    let status = if start > 0 {
        StatusCode::PARTIAL_CONTENT
    } else {
        StatusCode::OK
    };
    (
        status,
        [("x-linked-etag", format!("\"{}\"", hub.announced_sha))],
        body,
    )
        .into_response()
}

async fn serve(hub: Arc<Hub>) -> String {
    let app = Router::new()
        .route("/api/models/{org}/{repo}/revision/{rev}", get(listing))
        .route("/{org}/{repo}/resolve/{rev}/{*file}", get(resolve))
        .with_state(hub);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

fn hub(sha_ok: bool) -> Arc<Hub> {
    let file: Vec<u8> = (0..1_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let sha = if sha_ok {
        format!("{:x}", Sha256::digest(&file))
    } else {
        "0".repeat(64)
    };
    Arc::new(Hub {
        file,
        announced_sha: sha,
        bytes_served: AtomicU64::new(0),
    })
}

#[tokio::test]
async fn downloads_picks_gguf_and_reuses_cache() {
    let h = hub(true);
    let endpoint = serve(h.clone()).await;
    let cache = tempfile::tempdir().unwrap();
    let spec = HubSpec::parse("org/repo").unwrap();
    let p = download(&spec, &endpoint, cache.path()).await.unwrap();
    assert!(
        p.ends_with("hub/org--repo/main/model.Q8_0.gguf"),
        "{}",
        p.display()
    );
    assert_eq!(std::fs::read(&p).unwrap(), h.file);
    let served = h.bytes_served.load(Ordering::SeqCst);
    // second call: from the cache, nothing downloaded
    let again = download(&spec, &endpoint, cache.path()).await.unwrap();
    assert_eq!(again, p);
    assert_eq!(h.bytes_served.load(Ordering::SeqCst), served);
}

#[tokio::test]
async fn interrupted_download_resumes_with_range() {
    let h = hub(true);
    let endpoint = serve(h.clone()).await;
    let cache = tempfile::tempdir().unwrap();
    let spec = HubSpec::parse("org/repo@v2/sub/m.gguf").unwrap();
    let dir = cache.path().join("hub/org--repo/v2/sub");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("m.partial"), &h.file[..400_000]).unwrap();
    let p = download(&spec, &endpoint, cache.path()).await.unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), h.file);
    assert_eq!(
        h.bytes_served.load(Ordering::SeqCst),
        600_000,
        "only the missing bytes are fetched"
    );
}

#[tokio::test]
async fn checksum_mismatch_is_an_error_and_leaves_nothing() {
    let h = hub(false);
    let endpoint = serve(h).await;
    let cache = tempfile::tempdir().unwrap();
    let spec = HubSpec::parse("org/repo/m.gguf").unwrap();
    let err = download(&spec, &endpoint, cache.path()).await.unwrap_err();
    assert!(matches!(err, HubError::Checksum { .. }), "{err}");
    assert!(!cache.path().join("hub/org--repo/main/m.gguf").exists());
    assert!(!cache.path().join("hub/org--repo/main/m.partial").exists());
}

#[tokio::test]
async fn missing_file_names_the_url_and_status() {
    let endpoint = serve(hub(true)).await;
    let cache = tempfile::tempdir().unwrap();
    let spec = HubSpec::parse("org/repo/config.json").unwrap();
    let err = download(&spec, &endpoint, cache.path())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("404") && err.contains("config.json"), "{err}");
}
