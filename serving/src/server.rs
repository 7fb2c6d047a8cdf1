//! Start-up and shutdown: resolve and load the model, size the KV cache, start the engine,
//! serve HTTP, and drain on SIGTERM.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::{available_memory, Args, DeviceArg};
use crate::dist::{join_tcp_on, local_group, CommError, Communicator, Tag};
use crate::engine::group::{follow, Executor, Leader};
use crate::engine::{EngineConfig, EngineError, EngineHandle};
use crate::http::{router, AppState};
use crate::kv::KvStorage;
use crate::metrics::Metrics;
use crate::model::shard::Layout;
use crate::model::{load, resolve, LlamaConfig, LlamaModel, LoadedModel, ModelError};
use crate::tokenizer::Tokenizer;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Config(String),
    #[error("cannot load the model: {0}")]
    Model(#[from] ModelError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("parallel group: {0}")]
    Group(#[from] CommError),
    #[error("parallel group stopped: {0}")]
    GroupFailed(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
}

/// Where this process sits in its tensor × pipeline group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Place {
    pub layout: Layout,
    /// This process's index in `--peers`.
    pub process: usize,
    /// Processes in the group.
    pub processes: usize,
}

impl Place {
    /// Global ranks this process hosts.
    pub fn ranks(&self) -> std::ops::Range<usize> {
        let per = self.layout.world() / self.processes;
        self.process * per..(self.process + 1) * per
    }
}

/// Checks the flags and works out this process's place in its group.
pub fn check_layout(args: &Args) -> Result<Place, ServeError> {
    let layout = Layout {
        tp: args.tensor_parallel,
        pp: args.pipeline_parallel,
    };
    if layout.tp == 0 || layout.pp == 0 || layout.world() > 1024 {
        return Err(ServeError::Config(format!(
            "--tensor-parallel {} --pipeline-parallel {}: both must be at least 1 (and the group at most 1024 ranks)",
            layout.tp, layout.pp
        )));
    }
    let processes = args.peers.len().max(1);
    if !layout.world().is_multiple_of(processes) {
        return Err(ServeError::Config(format!(
            "--peers lists {processes} processes but the group has {} × {} = {} ranks; give one address per rank, or one per pipeline stage ({})",
            layout.tp,
            layout.pp,
            layout.world(),
            layout.pp
        )));
    }
    if args.rank >= processes {
        return Err(ServeError::Config(format!(
            "--rank {} is not an index into --peers ({processes} entries)",
            args.rank
        )));
    }
    let place = Place {
        layout,
        process: args.rank,
        processes,
    };
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
    Ok(place)
}

/// Sizes the engine from the flags and the loaded model.
pub fn engine_config(args: &Args, loaded: &LoadedModel) -> Result<EngineConfig, ServeError> {
    engine_config_for(args, &loaded.model, 1)
}

/// Sizes the engine from the flags and rank 0's model (or shard); `ranks_here` ranks of about
/// that size share this process's memory.
pub fn engine_config_for(
    args: &Args,
    model: &LlamaModel,
    ranks_here: usize,
) -> Result<EngineConfig, ServeError> {
    let per_token =
        KvStorage::bytes_per_token(model.local_layers(), model.kv_slot_stride()) * ranks_here;
    let capacity = match args.kv_cache_tokens {
        Some(t) => t,
        None => {
            let avail = available_memory().unwrap_or(4 << 30);
            (avail as f64 * args.kv_cache_fraction) as usize / per_token.max(1)
        }
    };
    let num_blocks = capacity / args.block_size;
    let capacity = num_blocks * args.block_size;
    let model_ctx = model.max_positions();
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
    let loaded = load(path, args.quantization, max_pos, args.threads())?;
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

/// What the ranks of a group report to the server: one message per rank thread when it ends
/// (`Ok` after a clean stop), or when rank 0's engine stops because the group broke.
pub type GroupEvents = std::sync::mpsc::Sender<Result<(), String>>;

/// Joins the group, loads this process's shards and starts them: rank 0's engine (returned)
/// and a thread per other rank hosted here. Blocking; returns once every local rank has loaded.
pub fn start_group(
    args: &Args,
    path: &std::path::Path,
    place: Place,
    metrics: Arc<Metrics>,
    events: GroupEvents,
) -> Result<Option<EngineHandle>, ServeError> {
    let t0 = Instant::now();
    let layout = place.layout;
    let g = Arc::new(crate::model::open(path)?);
    let cfg = LlamaConfig::from_gguf(&g)?;
    layout
        .check(&cfg)
        .map_err(|e| ServeError::Config(format!("{}: {e}", path.display())))?;
    let comms: Vec<Arc<dyn Communicator>> = if place.processes == 1 {
        local_group(layout.world())
    } else {
        tracing::info!(peers = ?args.peers, process = place.process, ranks = ?place.ranks(), "joining the group");
        // Listen where HTTP listens (all interfaces by default), on the port of this
        // process's own --peers entry.
        join_tcp_on(
            &args.host,
            &args.peers,
            place.process,
            layout.world(),
            Duration::from_secs(args.join_timeout),
        )?
    };
    let max_pos = args.context_length.unwrap_or(usize::MAX);
    let load = |rank: usize| {
        LlamaModel::shard_from_gguf(
            &g,
            args.quantization,
            max_pos,
            args.threads(),
            layout.shard(rank, &cfg),
        )
    };
    let mut leader = None;
    let ranks_here = place.ranks().len();
    for (rank, comm) in place.ranks().zip(comms) {
        if rank == 0 {
            leader = Some(comm);
            continue;
        }
        let model = load(rank)?;
        tracing::info!(rank, layers = ?model.shard.layers, tensor_rank = model.shard.tp_rank, weight_mib = model.weight_bytes() >> 20, "rank loaded");
        let events = events.clone();
        std::thread::Builder::new()
            .name(format!("llmo-rank-{rank}"))
            .spawn(move || {
                let result = follow(model, comm, layout);
                if let Err(e) = &result {
                    tracing::error!(rank, error = %e, "rank stopped");
                }
                let _ = events.send(result.map_err(|e| format!("rank {rank}: {e}")));
            })
            .map_err(|e| {
                ServeError::Config(format!("cannot start the thread of rank {rank}: {e}"))
            })?;
    }
    let Some(comm) = leader else {
        tracing::info!(ranks = ?place.ranks(), load_secs = t0.elapsed().as_secs_f64(), "ranks joined and loaded");
        return Ok(None);
    };
    let tokenizer = Tokenizer::from_gguf(&g).map_err(|source| ModelError::Tokenizer {
        path: path.to_path_buf(),
        source,
    })?;
    let model = load(0)?;
    let ec = engine_config_for(args, &model, ranks_here)?;
    tracing::info!(
        path = %path.display(),
        tensor_parallel = layout.tp,
        pipeline_parallel = layout.pp,
        quantization = %model.quantization,
        rank0_weight_mib = model.weight_bytes() >> 20,
        kv_cache_tokens = ec.num_blocks * ec.block_size,
        context_length = ec.context_length,
        load_secs = t0.elapsed().as_secs_f64(),
        "group loaded"
    );
    if place.processes > 1 {
        // Rank 0 waits on no peer while idle, so a lost rank would go unnoticed until the next
        // request. Nothing is ever sent to rank 0 on this channel: the wait ends only when the
        // group breaks, and then the whole process stops so that the group is restarted.
        let watch = comm.clone();
        let events = events.clone();
        std::thread::Builder::new()
            .name("llmo-group-watch".into())
            .spawn(move || {
                let reason = match watch.recv(1, Tag::Control) {
                    Err(e) => e.to_string(),
                    Ok(_) => {
                        "rank 1 sent rank 0 a control message; the ranks disagree on the protocol"
                            .into()
                    }
                };
                tracing::error!(error = %reason, "the group broke");
                let _ = events.send(Err(format!("rank 0: {reason}")));
            })
            .map_err(|e| ServeError::Config(format!("cannot start the group watch: {e}")))?;
    }
    let leader = Leader::start(model, comm, layout, ec.num_blocks, ec.block_size)?;
    let on_fatal: Box<dyn FnOnce(String) + Send> = Box::new(move |reason| {
        let _ = events.send(Err(format!("rank 0: {reason}")));
    });
    Ok(Some(EngineHandle::start_with(
        Executor::Leader(leader),
        tokenizer,
        ec,
        metrics,
        Some(on_fatal),
    )?))
}

/// Runs the server until SIGTERM/SIGINT and the drain that follows.
pub async fn run(args: Args) -> Result<(), ServeError> {
    let place = check_layout(&args)?;
    let grouped = place.layout.world() > 1;
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
    // (503 until loaded and, in a group, until every rank has joined) meanwhile.
    let (events_tx, events_rx) = std::sync::mpsc::channel();
    let load_args = args.clone();
    let engine = async move {
        let path = resolve(&load_args.model, &load_args.cache_dir()).await?;
        tokio::task::spawn_blocking(move || {
            if grouped {
                start_group(&load_args, &path, place, metrics, events_tx)
            } else {
                start_engine(&load_args, &path, metrics).map(Some)
            }
        })
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
    let mut server = tokio::spawn(async move { server.await });
    match engine.await? {
        Some(handle) => {
            let _ = state.engine.set(handle);
        }
        None => {
            let _ = state.group_worker.set(format!(
                "this process runs ranks {:?} of a parallel group and serves no requests; send them to rank 0 ({})",
                place.ranks(),
                args.peers.first().map(String::as_str).unwrap_or("process 0")
            ));
        }
    }
    tracing::info!("ready");
    // A group ends when one of this process's ranks fails (an error: the group must restart)
    // or when all of them were told to stop by rank 0.
    let group_end = async move {
        if !grouped {
            return std::future::pending().await;
        }
        tokio::task::spawn_blocking(move || {
            for event in events_rx {
                event?;
            }
            Ok::<(), String>(())
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()))
    };
    // Streams that are still open after the drain deadline are cut a little later.
    let result = tokio::select! {
        r = &mut server => match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(ServeError::Bind { addr, source: e }),
            Err(e) => Err(ServeError::Config(format!("server task failed: {e}"))),
        },
        end = group_end => match end {
            Ok(()) => {
                tracing::info!("rank 0 stopped the group");
                Ok(())
            }
            Err(e) => Err(ServeError::GroupFailed(e)),
        },
    };
    if let Some(engine) = state.engine.get().cloned() {
        // Stops rank 0's engine, which tells the other ranks to stop.
        let _ = tokio::task::spawn_blocking(move || engine.stop()).await;
    }
    result
}

/// The served name when `--served-name` is not given: the model file's name without `.gguf`,
/// the checkpoint directory's name, or the repository name for `hf://org/repo`.
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
        assert_eq!(
            default_served_name("/models/SmolLM2-135M-Instruct/"),
            "SmolLM2-135M-Instruct"
        );
        assert_eq!(default_served_name("hf://org/repo/sub/f.gguf"), "f");
    }
}
