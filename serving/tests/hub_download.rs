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
    ranged(&hub.file, &headers, &hub.announced_sha, &hub.bytes_served)
}

/// `bytes` from where an HTTP `Range: bytes=N-` header asks (206), or whole (200), with the
/// sha256 the Hub announces; counts what it sends in `served`.
fn ranged(bytes: &[u8], headers: &HeaderMap, sha: &str, served: &AtomicU64) -> Response {
    let start: usize = headers
        .get("range")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes="))
        .and_then(|v| v.trim_end_matches('-').parse().ok())
        .unwrap_or(0);
    let body = bytes[start..].to_vec();
    served.fetch_add(body.len() as u64, Ordering::SeqCst);
    let status = if start > 0 {
        StatusCode::PARTIAL_CONTENT
    } else {
        StatusCode::OK
    };
    (status, [("x-linked-etag", format!("\"{sha}\""))], body).into_response()
}

async fn serve(hub: Arc<Hub>) -> String {
    listen(
        Router::new()
            .route("/api/models/{org}/{repo}/revision/{rev}", get(listing))
            .route("/{org}/{repo}/resolve/{rev}/{*file}", get(resolve))
            .with_state(hub),
    )
    .await
}

/// Serves `app` on a loopback port; returns its base URL.
async fn listen(app: Router) -> String {
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
    std::fs::write(dir.join("m.gguf.partial"), &h.file[..400_000]).unwrap();
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
    assert!(!cache
        .path()
        .join("hub/org--repo/main/m.gguf.partial")
        .exists());
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

/// A Hub that serves a directory: the listing is its files, each file with its sha256.
struct DirHub {
    root: std::path::PathBuf,
    bytes_served: AtomicU64,
    fetched: std::sync::Mutex<Vec<String>>,
}

fn files_under(root: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                out.push(rel);
            }
        }
    }
    out.sort();
    out
}

async fn dir_listing(State(hub): State<Arc<DirHub>>) -> Json<serde_json::Value> {
    let siblings: Vec<_> = files_under(&hub.root)
        .into_iter()
        .map(|f| serde_json::json!({ "rfilename": f }))
        .collect();
    Json(serde_json::json!({ "siblings": siblings }))
}

async fn dir_resolve(
    State(hub): State<Arc<DirHub>>,
    Path((_o, _r, _rev, file)): Path<(String, String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let Ok(bytes) = std::fs::read(hub.root.join(&file)) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    hub.fetched.lock().unwrap().push(file);
    let sha = format!("{:x}", Sha256::digest(&bytes));
    ranged(&bytes, &headers, &sha, &hub.bytes_served)
}

async fn serve_dir(hub: Arc<DirHub>) -> String {
    listen(
        Router::new()
            .route("/api/models/{org}/{repo}/revision/{rev}", get(dir_listing))
            .route("/{org}/{repo}/resolve/{rev}/{*file}", get(dir_resolve))
            .with_state(hub),
    )
    .await
}

#[tokio::test]
async fn checkpoint_repository_downloads_as_a_directory_following_the_index() {
    let repo = tempfile::tempdir().unwrap();
    let r = repo.path();
    let noise = |n: usize, seed: u32| -> Vec<u8> {
        (0..n as u32)
            .map(|i| (i.wrapping_add(seed).wrapping_mul(2654435761) >> 11) as u8)
            .collect()
    };
    std::fs::write(r.join("config.json"), r#"{"model_type":"llama"}"#).unwrap();
    std::fs::write(r.join("tokenizer.json"), "{}").unwrap();
    std::fs::write(r.join("tokenizer_config.json"), "{}").unwrap();
    std::fs::write(r.join("README.md"), "# model").unwrap();
    std::fs::write(
        r.join("model.safetensors.index.json"),
        r#"{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}"#,
    )
    .unwrap();
    std::fs::write(
        r.join("model-00001-of-00002.safetensors"),
        noise(300_000, 1),
    )
    .unwrap();
    std::fs::write(
        r.join("model-00002-of-00002.safetensors"),
        noise(200_000, 2),
    )
    .unwrap();
    // Not named by the index: a second copy of the weights in another layout.
    std::fs::write(r.join("consolidated.safetensors"), noise(500_000, 3)).unwrap();
    std::fs::create_dir(r.join("original")).unwrap();
    std::fs::write(r.join("original/params.json"), "{}").unwrap();

    let hub = Arc::new(DirHub {
        root: r.to_path_buf(),
        bytes_served: AtomicU64::new(0),
        fetched: Default::default(),
    });
    let endpoint = serve_dir(hub.clone()).await;
    let cache = tempfile::tempdir().unwrap();
    let spec = HubSpec::parse("org/model@v1").unwrap();
    let dest = cache.path().join("hub/org--model/v1");
    // An earlier download was cut short in the middle of the first shard.
    std::fs::create_dir_all(&dest).unwrap();
    std::fs::write(
        dest.join("model-00001-of-00002.safetensors.partial"),
        &noise(300_000, 1)[..100_000],
    )
    .unwrap();

    let got = download(&spec, &endpoint, cache.path()).await.unwrap();
    assert_eq!(got, dest);
    let mut fetched = hub.fetched.lock().unwrap().clone();
    fetched.sort();
    assert_eq!(
        fetched,
        [
            "config.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "model.safetensors.index.json",
            "tokenizer.json",
            "tokenizer_config.json"
        ]
    );
    for f in &fetched {
        assert_eq!(
            std::fs::read(got.join(f)).unwrap(),
            std::fs::read(r.join(f)).unwrap(),
            "{f}"
        );
    }
    let index_len = std::fs::metadata(r.join("model.safetensors.index.json"))
        .unwrap()
        .len();
    assert_eq!(
        hub.bytes_served.load(Ordering::SeqCst),
        200_000 + 200_000 + index_len + 22 + 2 + 2,
        "the partial shard resumes; nothing else is fetched twice"
    );
    assert!(!got.join("consolidated.safetensors").exists());
    assert!(!got
        .join("model-00001-of-00002.safetensors.partial")
        .exists());

    // From the cache: only the listing is asked for.
    hub.fetched.lock().unwrap().clear();
    assert_eq!(
        download(&spec, &endpoint, cache.path()).await.unwrap(),
        dest
    );
    assert!(hub.fetched.lock().unwrap().is_empty());
}

#[tokio::test]
async fn repository_without_a_model_says_what_it_lacks() {
    let repo = tempfile::tempdir().unwrap();
    std::fs::write(repo.path().join("README.md"), "# nothing").unwrap();
    std::fs::write(repo.path().join("config.json"), "{}").unwrap();
    let hub = Arc::new(DirHub {
        root: repo.path().to_path_buf(),
        bytes_served: AtomicU64::new(0),
        fetched: Default::default(),
    });
    let endpoint = serve_dir(hub).await;
    let cache = tempfile::tempdir().unwrap();
    let err = download(
        &HubSpec::parse("org/empty").unwrap(),
        &endpoint,
        cache.path(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, HubError::NoModel { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("neither a .gguf file nor a Hugging Face checkpoint"),
        "{err}"
    );
}
