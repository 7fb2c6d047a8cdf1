//! The inference engine: a dedicated thread that owns the model and the KV cache and runs the
//! continuous-batching loop; callers talk to it through an [`EngineHandle`].

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
        }
    }
}

impl EngineHandle {
    /// Starts the engine thread.
    pub fn start(
        loaded: LoadedModel,
        config: EngineConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Self, EngineError> {
        let capacity = config.num_blocks * config.block_size;
        if capacity < config.context_length {
            return Err(KvError::TooSmall {
                capacity,
                context: config.context_length,
            }
            .into());
        }
        let cfg = &loaded.model.config;
        let kv = KvStorage::new(
            cfg.n_layers,
            config.num_blocks,
            config.block_size,
            cfg.n_kv_heads * cfg.head_dim,
        );
        let tokenizer = Arc::new(loaded.tokenizer);
        let state = Arc::new(EngineState::default());
        let (tx, rx) = mpsc::channel();
        let w = worker::Worker::new(
            loaded.model,
            kv,
            tokenizer.clone(),
            config.clone(),
            state.clone(),
            metrics.clone(),
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
