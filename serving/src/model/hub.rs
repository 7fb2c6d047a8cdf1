//! Downloads from a Hugging Face Hub style file server: `hf://org/repo[@revision][/file]`.
//!
//! Files are fetched from `{endpoint}/{org}/{repo}/resolve/{revision}/{file}` (the endpoint
//! comes from `HF_ENDPOINT`, default `https://huggingface.co`) into a cache directory. An
//! interrupted download resumes with an HTTP Range request; when the server names a sha256
//! (`X-Linked-Etag` or `ETag` of 64 hex digits, as the Hub does for LFS files) the finished file
//! is checked against it before it is moved into place.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("request to {url} failed: {source}")]
    Http { url: String, source: reqwest::Error },
    #[error("{url} answered HTTP {status}; check the repository, revision and file name (and HF_TOKEN for gated models)")]
    Status { url: String, status: u16 },
    #[error("repository {repo}@{revision} has no .gguf file; name one with hf://{repo}/FILE.gguf")]
    NoGguf { repo: String, revision: String },
    #[error("download of {url} is corrupt: sha256 {actual}, the server announced {expected}; it was deleted, try again")]
    Checksum {
        url: String,
        expected: String,
        actual: String,
    },
    #[error("cache {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A parsed `hf://` reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubSpec {
    pub repo: String,
    pub revision: String,
    pub file: Option<String>,
}

impl HubSpec {
    /// Parses what follows `hf://`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut parts = s.splitn(3, '/');
        let org = parts.next().filter(|p| !p.is_empty());
        let name = parts.next().filter(|p| !p.is_empty());
        let (Some(org), Some(name)) = (org, name) else {
            return Err("expected hf://org/repo[@revision][/file]".into());
        };
        let (name, revision) = match name.split_once('@') {
            Some((n, r)) if !r.is_empty() => (n, r.to_string()),
            Some(_) => return Err("empty revision after `@`".into()),
            None => (name, "main".to_string()),
        };
        let file = parts.next().filter(|f| !f.is_empty()).map(str::to_string);
        if let Some(f) = &file {
            if f.split('/').any(|seg| seg == "..") {
                return Err("file path must not contain `..`".into());
            }
        }
        Ok(Self {
            repo: format!("{org}/{name}"),
            revision,
            file,
        })
    }
}

/// The Hub endpoint from `HF_ENDPOINT`.
pub fn endpoint() -> String {
    std::env::var("HF_ENDPOINT")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "https://huggingface.co".into())
        .trim_end_matches('/')
        .to_string()
}

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

fn with_auth(r: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
    match std::env::var("HF_TOKEN") {
        Ok(t) if !t.is_empty() => r.bearer_auth(t),
        _ => r,
    }
}

async fn pick_gguf(spec: &HubSpec, endpoint: &str) -> Result<String, HubError> {
    let url = format!(
        "{endpoint}/api/models/{}/revision/{}",
        spec.repo, spec.revision
    );
    let resp = with_auth(client().get(&url))
        .send()
        .await
        .map_err(|source| HubError::Http {
            url: url.clone(),
            source,
        })?;
    if !resp.status().is_success() {
        return Err(HubError::Status {
            url,
            status: resp.status().as_u16(),
        });
    }
    let body: serde_json::Value = resp
        .json()
        .await
        .map_err(|source| HubError::Http { url, source })?;
    let mut files: Vec<String> = body["siblings"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["rfilename"].as_str())
        .filter(|f| f.ends_with(".gguf"))
        .map(str::to_string)
        .collect();
    // Prefer 8-bit, then 4-bit k-quants, then whatever comes first by name.
    files.sort_by_key(|f| {
        let u = f.to_ascii_uppercase();
        let rank = if u.contains("Q8_0") {
            0
        } else if u.contains("Q4_K_M") {
            1
        } else {
            2
        };
        (rank, f.clone())
    });
    files.into_iter().next().ok_or_else(|| HubError::NoGguf {
        repo: spec.repo.clone(),
        revision: spec.revision.clone(),
    })
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> HubError + '_ {
    move |source| HubError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn announced_sha256(headers: &reqwest::header::HeaderMap) -> Option<String> {
    ["x-linked-etag", "etag"].iter().find_map(|h| {
        let v = headers.get(*h)?.to_str().ok()?;
        let v = v
            .trim_start_matches("W/")
            .trim_matches('"')
            .to_ascii_lowercase();
        (v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit())).then_some(v)
    })
}

/// Downloads (or finds in the cache) the file `spec` names and returns its local path.
pub async fn download(spec: &HubSpec, endpoint: &str, cache: &Path) -> Result<PathBuf, HubError> {
    let file = match &spec.file {
        Some(f) => f.clone(),
        None => pick_gguf(spec, endpoint).await?,
    };
    let dir = cache
        .join("hub")
        .join(spec.repo.replace('/', "--"))
        .join(&spec.revision);
    let dest = dir.join(&file);
    if dest.is_file() {
        tracing::info!(path = %dest.display(), "model found in cache");
        return Ok(dest);
    }
    if let Some(parent) = dest.parent() {
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(io(parent))?;
    }
    let partial = dest.with_extension("partial");
    let have = tokio::fs::metadata(&partial)
        .await
        .map(|m| m.len())
        .unwrap_or(0);
    let url = format!("{endpoint}/{}/resolve/{}/{file}", spec.repo, spec.revision);
    let mut req = with_auth(client().get(&url));
    if have > 0 {
        req = req.header(reqwest::header::RANGE, format!("bytes={have}-"));
    }
    let mut resp = req.send().await.map_err(|source| HubError::Http {
        url: url.clone(),
        source,
    })?;
    let status = resp.status().as_u16();
    let append = match status {
        206 => true,
        200 => false,
        _ => return Err(HubError::Status { url, status }),
    };
    let expected = announced_sha256(resp.headers());
    tracing::info!(%url, resume_from = if append { have } else { 0 }, "downloading model");
    let mut out = tokio::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .open(&partial)
        .await
        .map_err(io(&partial))?;
    while let Some(chunk) = resp.chunk().await.map_err(|source| HubError::Http {
        url: url.clone(),
        source,
    })? {
        out.write_all(&chunk).await.map_err(io(&partial))?;
    }
    out.flush().await.map_err(io(&partial))?;
    drop(out);
    if let Some(expected) = expected {
        let p = partial.clone();
        let actual = tokio::task::spawn_blocking(move || -> std::io::Result<String> {
            let mut f = std::fs::File::open(&p)?;
            let mut h = Sha256::new();
            std::io::copy(&mut f, &mut h)?;
            Ok(format!("{:x}", h.finalize()))
        })
        .await
        .map_err(|e| HubError::Io {
            path: partial.clone(),
            source: std::io::Error::other(e),
        })?
        .map_err(io(&partial))?;
        if actual != expected {
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(HubError::Checksum {
                url,
                expected,
                actual,
            });
        }
    }
    tokio::fs::rename(&partial, &dest)
        .await
        .map_err(io(&dest))?;
    Ok(dest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hub_references() {
        assert_eq!(
            HubSpec::parse("org/repo@v1/sub/m.gguf").unwrap(),
            HubSpec {
                repo: "org/repo".into(),
                revision: "v1".into(),
                file: Some("sub/m.gguf".into())
            }
        );
        assert_eq!(HubSpec::parse("org/repo").unwrap().revision, "main");
        assert!(HubSpec::parse("org").is_err());
        assert!(HubSpec::parse("org/repo/../x").is_err());
    }
}
