//! Start-up and shutdown: resolve and load the model, size the KV cache, start the engine,
//! serve HTTP, and drain on SIGTERM.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::{available_memory, Args, DeviceArg};
use crate::engine::{EngineConfig, EngineError, EngineHandle};
use crate::http::{router, AppState};
use crate::kv::KvStorage;
use crate::metrics::Metrics;
use crate::model::{load_gguf, resolve, LoadedModel, ModelError};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Config(String),
    #[error("cannot load the model: {0}")]
    Model(#[from] ModelError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
}

fn check_layout(args: &Args) -> Result<(), ServeError> {
    if args.tensor_parallel != 1 || args.pipeline_parallel != 1 {
        return Err(ServeError::Config(format!(
            "--tensor-parallel {} --pipeline-parallel {}: this build runs one rank per model (1 × 1); split models are not supported yet",
            args.tensor_parallel, args.pipeline_parallel
        )));
    }
    if args.device == DeviceArg::Cuda {
        return Err(ServeError::Config(
            "--device cuda: this build has no CUDA backend; use --device cpu".into(),
        ));
    }
    if args.block_size == 0 || args.max_batch_tokens == 0 || args.max_running == 0 {
        return Err(ServeError::Config(
            "--block-size, --max-batch-tokens and --max-running must be positive".into(),
        ));
    }
    if !(args.kv_cache_fraction > 0.0 && args.kv_cache_fraction <= 1.0) {
        return Err(ServeError::Config(format!(
            "--kv-cache-fraction must be in (0, 1], got {}",
            args.kv_cache_fraction
        )));
    }
    Ok(())
}

/// Sizes the engine from the flags and the loaded model.
pub fn engine_config(args: &Args, loaded: &LoadedModel) -> Result<EngineConfig, ServeError> {
    let cfg = &loaded.model.config;
    let per_token = KvStorage::bytes_per_token(cfg.n_layers, cfg.n_kv_heads * cfg.head_dim);
    let capacity = match args.kv_cache_tokens {
        Some(t) => t,
        None => {
            let avail = available_memory().unwrap_or(4 << 30);
            (avail as f64 * args.kv_cache_fraction) as usize / per_token
        }
    };
    let num_blocks = capacity / args.block_size;
    let capacity = num_blocks * args.block_size;
    let model_ctx = loaded.model.max_positions();
    let context_length = match args.context_length {
        Some(c) if c > model_ctx => {
            return Err(ServeError::Config(format!(
                "--context-length {c} exceeds the model's context length {model_ctx}"
            )))
        }
        Some(c) if c > capacity => {
            return Err(ServeError::Config(format!(
                "--context-length {c} does not fit the KV cache of {capacity} tokens; raise --kv-cache-fraction or --kv-cache-tokens"
            )))
        }
        Some(c) => c,
        None => model_ctx.min(capacity),
    };
    if context_length < 2 {
        return Err(ServeError::Config(format!(
            "the KV cache holds only {capacity} tokens; raise --kv-cache-fraction or --kv-cache-tokens"
        )));
    }
    Ok(EngineConfig {
        block_size: args.block_size,
        num_blocks,
        max_batch_tokens: args.max_batch_tokens,
        max_running: args.max_running,
        max_waiting: args.max_waiting,
        context_length,
    })
}

/// Loads the model and starts the engine (blocking; run off the async threads).
pub fn start_engine(
    args: &Args,
    path: &std::path::Path,
    metrics: Arc<Metrics>,
) -> Result<EngineHandle, ServeError> {
    let t0 = Instant::now();
    let max_pos = args.context_length.unwrap_or(usize::MAX);
    let loaded = load_gguf(path, args.quantization, max_pos, args.threads())?;
    let ec = engine_config(args, &loaded)?;
    tracing::info!(
        path = %path.display(),
        architecture = %loaded.model.config.architecture,
        quantization = %loaded.model.quantization,
        weight_mib = loaded.model.weight_bytes() / (1 << 20),
        kv_cache_tokens = ec.num_blocks * ec.block_size,
        context_length = ec.context_length,
        load_secs = t0.elapsed().as_secs_f64(),
        "model loaded"
    );
    Ok(EngineHandle::start(loaded, ec, metrics)?)
}

/// Runs the server until SIGTERM/SIGINT and the drain that follows.
pub async fn run(args: Args) -> Result<(), ServeError> {
    check_layout(&args)?;
    let served = args
        .served_name
        .clone()
        .unwrap_or_else(|| default_served_name(&args.model));
    let metrics = Arc::new(Metrics::new());
    let state = AppState::new(served.clone(), metrics.clone());
    let addr = format!("{}:{}", args.host, args.port);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|source| ServeError::Bind {
            addr: addr.clone(),
            source,
        })?;
    tracing::info!(%addr, model = %served, "listening; loading model");

    // Listening before the download and the load lets probes see /health (alive) and /ready
    // (503 until loaded) meanwhile.
    let load_args = args.clone();
    let engine = async move {
        let path = resolve(&load_args.model, &load_args.cache_dir()).await?;
        tokio::task::spawn_blocking(move || start_engine(&load_args, &path, metrics))
            .await
            .map_err(|e| ServeError::Config(format!("model loading panicked: {e}")))?
    };
    let app = router(state.clone());
    let shutdown_state = state.clone();
    let deadline = Duration::from_secs(args.shutdown_timeout);
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        shutdown_signal().await;
        tracing::info!(
            in_flight = shutdown_state.in_flight(),
            "shutdown signal: draining"
        );
        shutdown_state.start_drain();
        if !shutdown_state.wait_idle(deadline).await {
            tracing::warn!(
                in_flight = shutdown_state.in_flight(),
                "drain deadline passed; closing"
            );
        }
    });
    let server = tokio::spawn(async move { server.await });
    let handle = engine.await?;
    let _ = state.engine.set(handle);
    tracing::info!("ready");
    // Streams that are still open after the drain deadline are cut a little later.
    match server.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(ServeError::Bind { addr, source: e }),
        Err(e) => Err(ServeError::Config(format!("server task failed: {e}"))),
    }
}

/// The served name when `--served-name` is not given: the model file's name without `.gguf`,
/// or the repository name for `hf://org/repo`.
pub fn default_served_name(uri: &str) -> String {
    let last = uri.trim_end_matches('/').rsplit('/').next().unwrap_or(uri);
    let last = last.split('@').next().unwrap_or(last);
    let name = last.strip_suffix(".gguf").unwrap_or(last);
    if name.is_empty() {
        "model".into()
    } else {
        name.to_string()
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

#[cfg(test)]
mod tests {
    use super::default_served_name;

    #[test]
    fn served_name_from_uri() {
        assert_eq!(default_served_name("/m/SmolLM2.Q4_1.gguf"), "SmolLM2.Q4_1");
        assert_eq!(default_served_name("file:///m/x.gguf"), "x");
        assert_eq!(default_served_name("hf://org/repo@v1"), "repo");
        assert_eq!(default_served_name("hf://org/repo/sub/f.gguf"), "f");
    }
}
