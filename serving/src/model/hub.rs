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
    #[error("repository {repo}@{revision} has neither a .gguf file nor a Hugging Face checkpoint (config.json and *.safetensors); name a file with hf://{repo}/FILE.gguf")]
    NoModel { repo: String, revision: String },
    #[error("{path}: {reason}")]
    Index { path: PathBuf, reason: String },
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

async fn list_files(spec: &HubSpec, endpoint: &str) -> Result<Vec<String>, HubError> {
    let url = format!(
        "{endpoint}/api/models/{}/revision/{}",
        spec.repo, spec.revision
    );
    let body: serde_json::Value = get_json(&url).await?;
    Ok(body["siblings"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["rfilename"].as_str())
        .map(str::to_string)
        .collect())
}

async fn get_json(url: &str) -> Result<serde_json::Value, HubError> {
    let resp = with_auth(client().get(url))
        .send()
        .await
        .map_err(|source| HubError::Http {
            url: url.to_string(),
            source,
        })?;
    if !resp.status().is_success() {
        return Err(HubError::Status {
            url: url.to_string(),
            status: resp.status().as_u16(),
        });
    }
    resp.json().await.map_err(|source| HubError::Http {
        url: url.to_string(),
        source,
    })
}

/// What to fetch from a repository when the reference names no file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pick {
    /// One GGUF file.
    Gguf(String),
    /// A Hugging Face checkpoint: these files at the top of the repository, with the weights
    /// still to be read from `model.safetensors.index.json` when `indexed`.
    Checkpoint { files: Vec<String>, indexed: bool },
}

/// Files of a checkpoint that are fetched when the repository has them.
const CHECKPOINT_FILES: &[&str] = &[
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "generation_config.json",
];

/// Chooses from a repository's file list: a GGUF file (8-bit first, then Q4_K_M, then the
/// first by name), else the checkpoint when it has `config.json` and safetensors weights.
pub fn pick(files: &[String]) -> Option<Pick> {
    let mut ggufs: Vec<&String> = files.iter().filter(|f| f.ends_with(".gguf")).collect();
    ggufs.sort_by_key(|f| {
        let u = f.to_ascii_uppercase();
        let rank = if u.contains("Q8_0") {
            0
        } else if u.contains("Q4_K_M") {
            1
        } else {
            2
        };
        (rank, f.to_string())
    });
    if let Some(f) = ggufs.first() {
        return Some(Pick::Gguf(f.to_string()));
    }
    let has = |name: &str| files.iter().any(|f| f == name);
    if !has("config.json") {
        return None;
    }
    let mut out: Vec<String> = CHECKPOINT_FILES
        .iter()
        .filter(|f| has(f))
        .map(|f| f.to_string())
        .collect();
    let indexed = has("model.safetensors.index.json");
    if indexed {
        out.push("model.safetensors.index.json".into());
    } else if has("model.safetensors") {
        out.push("model.safetensors".into());
    } else {
        let mut shards: Vec<String> = files
            .iter()
            .filter(|f| !f.contains('/') && f.ends_with(".safetensors"))
            .cloned()
            .collect();
        if shards.is_empty() {
            return None;
        }
        shards.sort();
        out.extend(shards);
    }
    Some(Pick::Checkpoint {
        files: out,
        indexed,
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

/// Downloads (or finds in the cache) what `spec` names and returns its local path: the named
/// file; else the repository's GGUF file; else its Hugging Face checkpoint, as a directory.
/// Every file is cached, resumed and checked on its own.
pub async fn download(spec: &HubSpec, endpoint: &str, cache: &Path) -> Result<PathBuf, HubError> {
    let dir = cache
        .join("hub")
        .join(spec.repo.replace('/', "--"))
        .join(&spec.revision);
    if let Some(f) = &spec.file {
        return fetch(spec, endpoint, &dir, f).await;
    }
    let files = list_files(spec, endpoint).await?;
    match pick(&files) {
        Some(Pick::Gguf(f)) => fetch(spec, endpoint, &dir, &f).await,
        Some(Pick::Checkpoint { files, indexed }) => {
            for f in &files {
                fetch(spec, endpoint, &dir, f).await?;
            }
            if indexed {
                for f in index_files(&dir.join("model.safetensors.index.json"))? {
                    fetch(spec, endpoint, &dir, &f).await?;
                }
            }
            Ok(dir)
        }
        None => Err(HubError::NoModel {
            repo: spec.repo.clone(),
            revision: spec.revision.clone(),
        }),
    }
}

/// The weight files a safetensors index names.
fn index_files(path: &Path) -> Result<Vec<String>, HubError> {
    let bad = |reason: String| HubError::Index {
        path: path.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    let ix: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("is not valid JSON: {e}")))?;
    let map = ix["weight_map"]
        .as_object()
        .ok_or_else(|| bad("has no `weight_map` object".into()))?;
    let mut files: Vec<String> = map
        .values()
        .filter_map(|v| v.as_str())
        .map(str::to_string)
        .collect();
    files.sort();
    files.dedup();
    if let Some(f) = files
        .iter()
        .find(|f| f.contains("..") || f.starts_with('/'))
    {
        return Err(bad(format!("names a file outside the repository: `{f}`")));
    }
    Ok(files)
}

/// Fetches one file of the repository into `dir`, unless it is there already.
async fn fetch(
    spec: &HubSpec,
    endpoint: &str,
    dir: &Path,
    file: &str,
) -> Result<PathBuf, HubError> {
    let dest = dir.join(file);
    if dest.is_file() {
        tracing::info!(path = %dest.display(), "found in the cache");
        return Ok(dest);
    }
    if let Some(parent) = dest.parent() {
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(io(parent))?;
    }
    let partial = dir.join(format!("{file}.partial"));
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
    tracing::info!(%url, resume_from = if append { have } else { 0 }, "downloading");
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

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn picks_gguf_first_then_the_checkpoint() {
        let both = names(&[
            "config.json",
            "model.safetensors",
            "m.Q4_K_M.gguf",
            "m.F16.gguf",
        ]);
        assert_eq!(pick(&both), Some(Pick::Gguf("m.Q4_K_M.gguf".into())));
        let single = names(&[
            "README.md",
            "config.json",
            "tokenizer.json",
            "model.safetensors",
        ]);
        assert_eq!(
            pick(&single),
            Some(Pick::Checkpoint {
                files: names(&["config.json", "tokenizer.json", "model.safetensors"]),
                indexed: false
            })
        );
        let indexed = names(&[
            "config.json",
            "generation_config.json",
            "model.safetensors.index.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "consolidated.safetensors",
        ]);
        assert_eq!(
            pick(&indexed),
            Some(Pick::Checkpoint {
                files: names(&[
                    "config.json",
                    "generation_config.json",
                    "model.safetensors.index.json"
                ]),
                indexed: true
            })
        );
        let unindexed = names(&[
            "config.json",
            "b.safetensors",
            "a.safetensors",
            "sub/c.safetensors",
        ]);
        assert_eq!(
            pick(&unindexed),
            Some(Pick::Checkpoint {
                files: names(&["config.json", "a.safetensors", "b.safetensors"]),
                indexed: false
            })
        );
        assert_eq!(pick(&names(&["config.json", "pytorch_model.bin"])), None);
        assert_eq!(pick(&names(&["model.safetensors"])), None);
    }
}
