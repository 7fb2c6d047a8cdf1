//! The inference engine: a dedicated thread that owns the model and the KV cache and runs the
//! continuous-batching loop; callers talk to it through an [`EngineHandle`].

pub mod group;
pub mod request;
pub mod sampling;
pub mod scheduler;
pub mod stop;
mod worker;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

pub use request::{Event, FinishReason, GenerationRequest, SamplingParams, Usage};

use crate::kv::{KvError, KvStorage};
use crate::metrics::Metrics;
use crate::model::LoadedModel;
use crate::tokenizer::Tokenizer;
use group::Executor;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("the request queue is full ({0} waiting); retry later")]
    QueueFull(usize),
    #[error("the server is draining and accepts no new requests")]
    Draining,
    #[error("the engine has stopped")]
    Stopped,
    #[error(transparent)]
    Kv(#[from] KvError),
}

/// Sizing and limits of the engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub block_size: usize,
    pub num_blocks: usize,
    pub max_batch_tokens: usize,
    pub max_running: usize,
    pub max_waiting: usize,
    pub context_length: usize,
}

/// Counters shared between the engine thread and request handlers.
#[derive(Debug, Default)]
pub struct EngineState {
    /// Requests submitted and not yet finished.
    pub in_flight: AtomicUsize,
    /// Requests submitted and not yet admitted to the running batch.
    pub queued: AtomicUsize,
    pub draining: AtomicBool,
}

enum Command {
    Submit(Box<GenerationRequest>),
    /// Stop the engine thread (dropping the executor tells a group's ranks to stop), then
    /// report on the channel.
    Stop(mpsc::Sender<()>),
}

fn check_capacity(config: &EngineConfig) -> Result<(), EngineError> {
    let capacity = config.num_blocks * config.block_size;
    if capacity < config.context_length {
        return Err(KvError::TooSmall {
            capacity,
            context: config.context_length,
        }
        .into());
    }
    Ok(())
}

/// A cheap, cloneable handle to the engine thread.
#[derive(Debug, Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Command>,
    pub state: Arc<EngineState>,
    pub tokenizer: Arc<Tokenizer>,
    pub metrics: Arc<Metrics>,
    pub config: EngineConfig,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Submit(r) => write!(f, "Submit({})", r.id),
            Command::Stop(_) => f.write_str("Stop"),
        }
    }
}

impl EngineHandle {
    /// Starts the engine thread over the whole model.
    pub fn start(
        loaded: LoadedModel,
        config: EngineConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Self, EngineError> {
        check_capacity(&config)?;
        let kv = KvStorage::new(
            loaded.model.local_layers(),
            config.num_blocks,
            config.block_size,
            loaded.model.kv_slot_stride(),
        );
        let exec = Executor::Single {
            model: loaded.model,
            kv,
        };
        Self::start_with(exec, loaded.tokenizer, config, metrics, None)
    }

    /// Starts the engine thread over `exec` (a single model or rank 0 of a group).
    /// `on_fatal` is called, once, if the engine stops because its group broke.
    pub fn start_with(
        exec: Executor,
        tokenizer: Tokenizer,
        config: EngineConfig,
        metrics: Arc<Metrics>,
        on_fatal: Option<Box<dyn FnOnce(String) + Send>>,
    ) -> Result<Self, EngineError> {
        check_capacity(&config)?;
        let tokenizer = Arc::new(tokenizer);
        let state = Arc::new(EngineState::default());
        let (tx, rx) = mpsc::channel();
        let w = worker::Worker::new(
            exec,
            tokenizer.clone(),
            config.clone(),
            state.clone(),
            metrics.clone(),
            on_fatal,
        );
        std::thread::Builder::new()
            .name("llmo-engine".into())
            .spawn(move || w.run(rx))
            .map_err(|_| EngineError::Stopped)?;
        Ok(Self {
            tx,
            state,
            tokenizer,
            metrics,
            config,
        })
    }

    /// Stops the engine thread after the step in progress (a group's other ranks are told to
    /// stop too). Requests still running get no more tokens.
    /// Blocks until it has stopped, at most a few seconds.
    pub fn stop(&self) {
        let (done, wait) = mpsc::channel();
        if self.tx.send(Command::Stop(done)).is_ok() {
            let _ = wait.recv_timeout(std::time::Duration::from_secs(5));
        }
    }

    /// Queues a request; events arrive on the returned receiver. Dropping it cancels the request.
    pub fn submit(
        &self,
        id: String,
        prompt: Vec<u32>,
        params: SamplingParams,
    ) -> Result<UnboundedReceiver<Event>, EngineError> {
        if self.state.draining.load(Ordering::SeqCst) {
            return Err(EngineError::Draining);
        }
        let queued = self.state.queued.load(Ordering::SeqCst);
        if queued >= self.config.max_waiting {
            return Err(EngineError::QueueFull(queued));
        }
        let (etx, erx) = unbounded_channel();
        self.state.queued.fetch_add(1, Ordering::SeqCst);
        self.state.in_flight.fetch_add(1, Ordering::SeqCst);
        let req = GenerationRequest {
            id,
            prompt,
            params,
            events: etx,
            arrived: Instant::now(),
        };
        if self.tx.send(Command::Submit(Box::new(req))).is_err() {
            self.state.queued.fetch_sub(1, Ordering::SeqCst);
            self.state.in_flight.fetch_sub(1, Ordering::SeqCst);
            return Err(EngineError::Stopped);
        }
        Ok(erx)
    }
}
