//! The engine loop: take new requests, schedule a step, run the model, sample, stream out.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use super::group::Executor;
use super::request::{Event, FinishReason, GenerationRequest, Usage};
use super::sampling::Sampler;
use super::scheduler::{Scheduler, SchedulerConfig, Sequence};
use super::stop::OutputText;
use super::{Command, EngineConfig, EngineState};
use crate::metrics::{outcome, Metrics};
use crate::model::{ModelError, StepInput};
use crate::tokenizer::Tokenizer;

/// Window over which `llmo_engine_busy_ratio` is computed.
const BUSY_WINDOW: Duration = Duration::from_secs(10);

/// Per-sequence state that the scheduler carries along.
#[derive(Debug)]
struct SeqState {
    req: GenerationRequest,
    sampler: Sampler,
    out: OutputText,
    admitted: bool,
    first_token_at: Option<Instant>,
    last_token_at: Option<Instant>,
    finished: Option<FinishReason>,
}

pub(super) struct Worker {
    exec: Executor,
    tokenizer: Arc<Tokenizer>,
    cfg: EngineConfig,
    state: Arc<EngineState>,
    metrics: Arc<Metrics>,
    sched: Scheduler<SeqState>,
    next_id: u64,
    steps: VecDeque<(Instant, Duration)>,
    seen_prefix: (u64, u64),
    seen_preemptions: u64,
    /// Why the engine cannot go on (a rank of its group was lost); set once, then it stops.
    fatal: Option<String>,
    on_fatal: Option<Box<dyn FnOnce(String) + Send>>,
}

impl Worker {
    pub(super) fn new(
        exec: Executor,
        tokenizer: Arc<Tokenizer>,
        cfg: EngineConfig,
        state: Arc<EngineState>,
        metrics: Arc<Metrics>,
        on_fatal: Option<Box<dyn FnOnce(String) + Send>>,
    ) -> Self {
        let sched = Scheduler::new(
            SchedulerConfig {
                max_batch_tokens: cfg.max_batch_tokens,
                max_running: cfg.max_running,
                watermark_blocks: (cfg.num_blocks / 100).max(1),
            },
            cfg.num_blocks,
            cfg.block_size,
        );
        Self {
            exec,
            tokenizer,
            cfg,
            state,
            metrics,
            sched,
            next_id: 0,
            steps: VecDeque::new(),
            seen_prefix: (0, 0),
            seen_preemptions: 0,
            fatal: None,
            on_fatal,
        }
    }

    pub(super) fn run(mut self, rx: mpsc::Receiver<Command>) {
        loop {
            if self.sched.is_idle() {
                self.update_gauges();
                match rx.recv() {
                    Ok(Command::Stop(done)) => return self.stop(&done),
                    Ok(cmd) => self.handle(cmd),
                    Err(_) => return,
                }
            }
            while let Ok(cmd) = rx.try_recv() {
                if let Command::Stop(done) = cmd {
                    return self.stop(&done);
                }
                self.handle(cmd);
            }
            self.drop_cancelled();
            let stepped = self.step();
            if let Some(reason) = self.fatal.take() {
                self.fail_everything(&reason);
                if let Some(f) = self.on_fatal.take() {
                    f(reason);
                }
                return;
            }
            if !stepped {
                // Nothing could be scheduled (waiting sequences do not fit yet); avoid spinning.
                std::thread::sleep(Duration::from_millis(2));
            }
            self.update_gauges();
        }
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Stop(_) => {}
            Command::Submit(req) => {
                let id = self.next_id;
                self.next_id += 1;
                tracing::debug!(request = %req.id, seq = id, prompt_tokens = req.prompt.len(), "queued");
                let st = SeqState {
                    sampler: Sampler::new(&req.params),
                    out: OutputText::new(req.params.stop.clone()),
                    admitted: false,
                    first_token_at: None,
                    last_token_at: None,
                    finished: None,
                    req: *req,
                };
                let prompt = st.req.prompt.clone();
                self.sched.enqueue(Sequence::new(id, prompt, st));
            }
        }
    }

    fn release(&self, s: &SeqState) {
        if !s.admitted {
            self.state.queued.fetch_sub(1, Ordering::SeqCst);
        }
        self.state.in_flight.fetch_sub(1, Ordering::SeqCst);
    }

    /// Stops: what is still running fails, the executor is dropped (a group's ranks are told
    /// to stop), then `done` hears of it.
    fn stop(mut self, done: &mpsc::Sender<()>) {
        self.fail_everything("the server stopped");
        drop(self);
        let _ = done.send(());
    }

    /// Fails every running and waiting request with `reason`.
    fn fail_everything(&mut self, reason: &str) {
        let mut all = self.sched.remove_running(|_| true);
        all.extend(self.sched.remove_waiting(|_| true));
        self.fail(all, reason);
        self.update_gauges();
    }

    /// Ends removed sequences with an error event that gives `reason`.
    fn fail(&self, seqs: Vec<Sequence<SeqState>>, reason: &str) {
        for s in seqs {
            let _ = s
                .data
                .req
                .events
                .send(Event::Error(format!("inference failed: {reason}")));
            self.metrics.count_request(outcome::ERROR);
            self.release(&s.data);
        }
    }

    /// Frees sequences whose client went away.
    fn drop_cancelled(&mut self) {
        let mut gone = self.sched.remove_running(|s| s.data.req.events.is_closed());
        gone.extend(self.sched.remove_waiting(|s| s.data.req.events.is_closed()));
        if gone.is_empty() {
            return;
        }
        // Gauges before the counter: a scrape that sees the cancellation counted also sees the
        // sequence gone from the running count and its blocks back in the cache.
        self.update_gauges();
        for s in gone {
            tracing::info!(request = %s.data.req.id, generated = s.generated().len(), "client disconnected; sequence freed");
            self.release(&s.data);
            self.metrics.count_request(outcome::CANCELLED);
        }
    }

    /// Runs one step; false when nothing was scheduled.
    fn step(&mut self) -> bool {
        let plan = self.sched.schedule();
        if plan.is_empty() {
            return false;
        }
        for p in &plan {
            let st = &mut self.sched.running[p.index].data;
            if !st.admitted {
                st.admitted = true;
                self.state.queued.fetch_sub(1, Ordering::SeqCst);
                self.metrics
                    .prompt_tokens
                    .inc_by(st.req.prompt.len() as u64);
            }
        }
        let inputs: Vec<StepInput<'_>> = plan
            .iter()
            .map(|p| {
                let s = &self.sched.running[p.index];
                StepInput {
                    tokens: &s.tokens[p.start..p.start + p.len],
                    start: p.start,
                    block_table: &s.blocks,
                    want_logits: p.wants_logits,
                }
            })
            .collect();
        let t0 = Instant::now();
        let result = self.exec.step(&inputs);
        let now = Instant::now();
        self.record_busy(t0, now - t0);
        let logits = match result {
            Ok(l) => l,
            Err(e @ ModelError::Comm(_)) => {
                tracing::error!(error = %e, "a rank of the group was lost; the engine stops");
                self.fatal = Some(e.to_string());
                return true;
            }
            Err(e) => {
                tracing::error!(error = %e, "model step failed; failing its requests");
                let ids: Vec<u64> = plan
                    .iter()
                    .map(|p| self.sched.running[p.index].id)
                    .collect();
                let failed = self.sched.remove_running(|s| ids.contains(&s.id));
                self.fail(failed, &e.to_string());
                return true;
            }
        };
        let mut logits = logits.into_iter();
        for p in &plan {
            self.sched.commit(*p);
            if !p.wants_logits {
                continue;
            }
            let Some(mut l) = logits.next() else { break };
            self.emit_token(p.index, &mut l, now);
        }
        let finished = self.sched.remove_running(|s| s.data.finished.is_some());
        for s in finished {
            self.finish(s, now);
        }
        true
    }

    fn emit_token(&mut self, index: usize, logits: &mut [f32], now: Instant) {
        let max_ctx = self.cfg.context_length;
        let seq = &mut self.sched.running[index];
        let st = &mut seq.data;
        let tok = st.sampler.sample(logits);
        st.sampler.observe(tok);
        seq.tokens.push(tok);
        self.metrics.generation_tokens.inc();
        match st.last_token_at {
            None => {
                st.first_token_at = Some(now);
                self.metrics
                    .ttft
                    .observe((now - st.req.arrived).as_secs_f64());
            }
            Some(prev) => self.metrics.itl.observe((now - prev).as_secs_f64()),
        }
        st.last_token_at = Some(now);
        let generated = seq.tokens.len() - seq.prompt_len;
        let (mut delta, mut stopped) = if self.tokenizer.stop_tokens.contains(&tok) {
            (String::new(), true)
        } else {
            st.out.push(&self.tokenizer.token_bytes(tok))
        };
        let mut reason = stopped.then_some(FinishReason::Stop);
        if reason.is_none()
            && (generated >= st.req.params.max_tokens || seq.tokens.len() >= max_ctx)
        {
            reason = Some(FinishReason::Length);
        }
        if reason.is_some() && !stopped {
            let (tail, hit) = st.out.finish();
            delta.push_str(&tail);
            stopped = hit;
            if hit {
                reason = Some(FinishReason::Stop);
            }
        }
        let _ = stopped;
        if !delta.is_empty() {
            let _ = st.req.events.send(Event::Delta(delta));
        }
        st.finished = reason;
    }

    fn finish(&mut self, s: Sequence<SeqState>, now: Instant) {
        let st = &s.data;
        let reason = st.finished.unwrap_or(FinishReason::Stop);
        let usage = Usage {
            prompt_tokens: s.prompt_len,
            completion_tokens: s.generated().len(),
            cached_tokens: s.cached_tokens,
        };
        self.metrics
            .request_duration
            .observe((now - st.req.arrived).as_secs_f64());
        self.metrics.count_request(outcome::SUCCESS);
        tracing::debug!(request = %st.req.id, reason = reason.as_str(), completion_tokens = usage.completion_tokens, "finished");
        let _ = st.req.events.send(Event::Done { reason, usage });
        self.release(st);
    }

    fn record_busy(&mut self, start: Instant, took: Duration) {
        self.steps.push_back((start, took));
        while let Some(&(t, _)) = self.steps.front() {
            if start.duration_since(t) > BUSY_WINDOW {
                self.steps.pop_front();
            } else {
                break;
            }
        }
    }

    fn update_gauges(&mut self) {
        let m = &self.metrics;
        m.running.set(self.sched.running.len() as i64);
        m.waiting.set(self.sched.waiting.len() as i64);
        m.kv_usage.set(self.sched.usage());
        let now = Instant::now();
        let busy: Duration = self
            .steps
            .iter()
            .filter(|(t, _)| now.duration_since(*t) <= BUSY_WINDOW)
            .map(|(_, d)| *d)
            .sum();
        m.busy
            .set((busy.as_secs_f64() / BUSY_WINDOW.as_secs_f64()).min(1.0));
        let p = self.sched.prefix;
        m.prefix_queried.inc_by(p.queried - self.seen_prefix.0);
        m.prefix_hits.inc_by(p.hits - self.seen_prefix.1);
        self.seen_prefix = (p.queried, p.hits);
        if p.queried > 0 {
            m.prefix_hit_ratio.set(p.hits as f64 / p.queried as f64);
        }
        m.preemptions
            .inc_by(self.sched.preemptions - self.seen_preemptions);
        self.seen_preemptions = self.sched.preemptions;
    }
}
