//! One container of a pod: prepare its command line and environment, run it as a process, probe
//! it, and restart it under the pod's restart policy with a capped exponential back-off.

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use k8s_openapi::{
    api::core::v1::{Container, Pod},
    jiff::Timestamp,
};
use tokio::{
    sync::{mpsc, watch, Notify},
    time::Instant,
};

use super::{
    env::{self, EnvInputs, EnvList, Rewriter},
    events::Events,
    probes::{ProbeEvent, Probes},
    process::{self, Exit, ProcessSpec},
    status::{ContainerRecord, PodState, State, Terminated},
    volumes::{self, PodVolumes},
    KubeletError, Shared,
};

/// Asks a container to stop: the instant after which SIGKILL follows SIGTERM.
pub type StopSignal = watch::Receiver<Option<Instant>>;

/// Everything a container runner works with.
#[derive(Clone, Debug)]
pub struct ContainerCtx {
    /// Kubelet-wide state.
    pub shared: Arc<Shared>,
    /// The pod, as first seen.
    pub pod: Arc<Pod>,
    /// Its address.
    pub pod_ip: Ipv4Addr,
    /// Its node's address.
    pub host_ip: Ipv4Addr,
    /// Node CPU and memory capacity.
    pub node_resources: (String, String),
    /// The pod directory.
    pub pod_dir: PathBuf,
    /// Its volumes.
    pub volumes: Arc<PodVolumes>,
    /// Variables every container gets first.
    pub base_env: EnvList,
    /// The pod's state, shared with its worker.
    pub state: Arc<Mutex<PodState>>,
    /// Wakes the worker to write status.
    pub changed: Arc<Notify>,
    /// Events about the pod.
    pub events: Events,
    /// Stop request.
    pub stop: StopSignal,
}

/// Whether the container is an init container, and which.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot {
    /// `spec.initContainers[i]`.
    Init(usize),
    /// `spec.containers[i]`.
    Main(usize),
}

/// How a container's runs ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// It exited and its restart policy does not restart it; `true` when it succeeded.
    Done(bool),
    /// The kubelet stopped it.
    Stopped,
}

/// A doubling delay between restarts, capped.
#[derive(Clone, Debug)]
struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_secs(1);

    fn new(max: Duration) -> Self {
        Self {
            next: Self::FIRST.min(max),
            max,
        }
    }

    fn take(&mut self) -> Duration {
        let now = self.next;
        self.next = (self.next * 2).min(self.max);
        now
    }

    fn reset(&mut self) {
        self.next = Self::FIRST.min(self.max);
    }
}

impl ContainerCtx {
    fn container(&self, slot: Slot) -> &Container {
        let spec = self.pod.spec.as_ref().expect("pods have a spec");
        match slot {
            Slot::Init(i) => &spec.init_containers.as_ref().expect("init containers")[i],
            Slot::Main(i) => &spec.containers[i],
        }
    }

    fn update(&self, slot: Slot, f: impl FnOnce(&mut ContainerRecord)) {
        {
            let mut state = self.state.lock().expect("pod state lock");
            let record = match slot {
                Slot::Init(i) => &mut state.init_containers[i],
                Slot::Main(i) => &mut state.containers[i],
            };
            f(record);
        }
        self.changed.notify_one();
    }

    fn stopping(&self) -> bool {
        self.stop.borrow().is_some()
    }

    fn pod_name(&self) -> String {
        format!(
            "{}/{}",
            self.pod.metadata.namespace.as_deref().unwrap_or("default"),
            self.pod.metadata.name.as_deref().unwrap_or_default()
        )
    }

    /// `<state-dir>/logs/<namespace>_<pod>_<container>.log`.
    pub fn log_path(&self, container: &str) -> PathBuf {
        self.shared.config.state_dir.join("logs").join(format!(
            "{}_{}_{container}.log",
            self.pod.metadata.namespace.as_deref().unwrap_or("default"),
            self.pod.metadata.name.as_deref().unwrap_or_default()
        ))
    }

    /// Waits `delay`, or less when asked to stop; returns whether it was asked to stop.
    async fn pause(&mut self, delay: Duration) -> bool {
        let deadline = Instant::now() + delay;
        loop {
            if self.stopping() {
                return true;
            }
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => return self.stopping(),
                changed = self.stop.changed() => if changed.is_err() { return true },
            }
        }
    }

    /// The process to start, or why the container cannot be started now.
    async fn prepare(&self, slot: Slot, run: i32) -> Result<(ProcessSpec, Probes), KubeletError> {
        let container = self.container(slot);
        let image = container.image.as_deref().unwrap_or_default();
        let mapped = self.shared.config.images.resolve(image)?;
        let probes = Probes::of(container, self.pod_ip)?;
        let env = env::container_env(
            &self.shared.client,
            EnvInputs {
                pod: &self.pod,
                container,
                pod_ip: self.pod_ip,
                host_ip: self.host_ip,
                node_resources: (&self.node_resources.0, &self.node_resources.1),
                base: self.base_env.clone(),
            },
        )
        .await?;
        let (program, args) = env::command_line(container, &mapped, &env)?;
        let mounts = volumes::container_mounts(container, &self.volumes)?;
        let rewriter = Rewriter::new(self.pod_ip, mounts);
        let args: Vec<String> = args.iter().map(|a| rewriter.rewrite(a)).collect();
        let env: Vec<(String, String)> = env
            .vars()
            .iter()
            .map(|(k, v)| (k.clone(), rewriter.rewrite(v)))
            .collect();
        let cwd = container
            .working_dir
            .as_deref()
            .map(|w| PathBuf::from(rewriter.rewrite(w)))
            .filter(|w| w.is_dir())
            .unwrap_or_else(|| self.pod_dir.clone());
        let header = format!(
            "==== llmo-kubelet {}: pod {} container {} run {} ({}{}{}) ====",
            Timestamp::now(),
            self.pod_name(),
            container.name,
            run + 1,
            program.display(),
            if args.is_empty() { "" } else { " " },
            args.join(" ")
        );
        Ok((
            ProcessSpec {
                program,
                args,
                env,
                cwd,
                log: self.log_path(&container.name),
                header,
            },
            probes,
        ))
    }
}

/// Runs one container until it is done under its restart policy or asked to stop.
pub async fn run_container(mut ctx: ContainerCtx, slot: Slot) -> Outcome {
    let container = ctx.container(slot).clone();
    let policy = ctx
        .pod
        .spec
        .as_ref()
        .and_then(|s| s.restart_policy.clone())
        .unwrap_or_else(|| "Always".to_owned());
    let termination_grace = Duration::from_secs(
        ctx.pod
            .spec
            .as_ref()
            .and_then(|s| s.termination_grace_period_seconds)
            .and_then(|s| u64::try_from(s).ok())
            .unwrap_or(30),
    );
    let max_backoff = ctx.shared.config.max_backoff;
    let mut backoff = Backoff::new(max_backoff);
    let mut runs = 0;
    loop {
        if ctx.stopping() {
            return Outcome::Stopped;
        }
        let prepared = ctx.prepare(slot, runs).await;
        let (spec, probes) = match prepared {
            Ok(p) => p,
            Err(error) => {
                let (reason, message) = match &error {
                    KubeletError::Pod { reason, message } => {
                        ((*reason).to_owned(), message.clone())
                    }
                    other => (env::CONFIG_ERROR.to_owned(), other.to_string()),
                };
                tracing::warn!(pod = %ctx.pod_name(), container = %container.name, %reason, %message, "container cannot start yet");
                ctx.events.warning("Failed", format!("Error: {message}"));
                ctx.update(slot, |r| {
                    r.state = State::Waiting {
                        reason,
                        message: Some(message),
                    }
                });
                if ctx.pause(backoff.take()).await {
                    return Outcome::Stopped;
                }
                continue;
            }
        };
        let image_id = format!("file://{}", spec.program.display());
        let started_at = Timestamp::now();
        let started = Instant::now();
        let mut exit_message = None;
        let exit = match process::spawn(&spec, ctx.shared.config.spawn_hook) {
            Err(error) => {
                tracing::warn!(pod = %ctx.pod_name(), container = %container.name, %error, "start failed");
                ctx.events.warning("Failed", format!("Error: {error}"));
                exit_message = Some(error.to_string());
                ctx.update(slot, |r| r.image_id = image_id.clone());
                None
            }
            Ok(mut proc) => {
                let container_id = format!("process://{}", proc.pid());
                tracing::info!(pod = %ctx.pod_name(), container = %container.name, pid = proc.pid(), program = %spec.program.display(), "started");
                ctx.events.normal(
                    "Started",
                    format!("Started container {} (pid {})", container.name, proc.pid()),
                );
                ctx.update(slot, |r| {
                    r.state = State::Running { started_at };
                    r.container_id = Some(container_id.clone());
                    r.image_id = image_id.clone();
                    r.ready = false;
                    r.started = false;
                });
                let (tx, mut rx) = mpsc::unbounded_channel();
                let probe_task = AbortOnDrop(probes.spawn(tx));
                let mut last_unhealthy: Option<Instant> = None;
                let exit = loop {
                    tokio::select! {
                        exit = proc.wait() => break exit,
                        changed = ctx.stop.changed() => {
                            let deadline = if changed.is_err() { Some(Instant::now()) } else { *ctx.stop.borrow() };
                            if let Some(deadline) = deadline {
                                ctx.events.normal("Killing", format!("Stopping container {}", container.name));
                                let grace = deadline.saturating_duration_since(Instant::now());
                                break proc.terminate(grace).await;
                            }
                        }
                        Some(event) = rx.recv() => match event {
                            ProbeEvent::Started => ctx.update(slot, |r| r.started = true),
                            ProbeEvent::Ready(ready) => {
                                tracing::info!(pod = %ctx.pod_name(), container = %container.name, ready, "readiness changed");
                                ctx.update(slot, |r| r.ready = ready);
                            }
                            ProbeEvent::Unhealthy { probe, message } => {
                                tracing::debug!(pod = %ctx.pod_name(), container = %container.name, probe, %message, "probe failed");
                                if last_unhealthy.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                                    last_unhealthy = Some(Instant::now());
                                    ctx.events.warning("Unhealthy", format!("{probe} probe failed: {message}"));
                                }
                            }
                            ProbeEvent::Failed { probe, message } => {
                                tracing::info!(pod = %ctx.pod_name(), container = %container.name, probe, %message, "probe failed for good; restarting");
                                ctx.events.normal("Killing", format!("Container {} failed {} probe, will be restarted", container.name, probe.to_lowercase()));
                                exit_message = Some(format!("{probe} probe failed: {message}"));
                                break proc.terminate(termination_grace).await;
                            }
                        },
                    }
                };
                drop(probe_task);
                tracing::info!(pod = %ctx.pod_name(), container = %container.name, code = exit.code, signal = exit.signal, "exited");
                Some((exit, container_id))
            }
        };
        let (exit, container_id, reason) = match exit {
            Some((exit, id)) => (
                exit,
                Some(id),
                if exit.code == 0 { "Completed" } else { "Error" },
            ),
            None => (
                Exit {
                    code: 128,
                    signal: None,
                },
                None,
                "StartError",
            ),
        };
        let terminated = Terminated {
            exit,
            reason: reason.to_owned(),
            message: exit_message,
            started_at: container_id.as_ref().map(|_| started_at),
            finished_at: Timestamp::now(),
            container_id,
        };
        runs += 1;
        if ctx.stopping() {
            ctx.update(slot, |r| {
                r.state = State::Terminated(terminated);
                r.ready = false;
                r.started = false;
                r.done = true;
            });
            return Outcome::Stopped;
        }
        let succeeded = exit.code == 0;
        let restart = match (slot, policy.as_str()) {
            (Slot::Init(_), "Never") => false,
            (Slot::Init(_), _) => !succeeded,
            (Slot::Main(_), "Always") => true,
            (Slot::Main(_), "OnFailure") => !succeeded,
            _ => false,
        };
        if !restart {
            ctx.update(slot, |r| {
                r.state = State::Terminated(terminated);
                r.ready = false;
                r.started = false;
                r.done = true;
            });
            return Outcome::Done(succeeded);
        }
        // A container that ran well for a while starts over with short back-offs.
        if started.elapsed() > max_backoff * 2 {
            backoff.reset();
        }
        let delay = backoff.take();
        let message = format!(
            "back-off {}s restarting failed container={} pod={}",
            delay.as_secs_f64(),
            container.name,
            ctx.pod_name()
        );
        ctx.events.warning("BackOff", message.clone());
        ctx.update(slot, |r| {
            r.state = State::Waiting {
                reason: "CrashLoopBackOff".to_owned(),
                message: Some(message),
            };
            r.last = Some(terminated);
            r.ready = false;
            r.started = false;
        });
        if ctx.pause(delay).await {
            return Outcome::Stopped;
        }
        ctx.update(slot, |r| r.restart_count += 1);
    }
}

/// Aborts a task when dropped.
#[derive(Debug)]
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_secs(5));
        let taken: Vec<u64> = (0..5).map(|_| b.take().as_secs()).collect();
        assert_eq!(taken, [1, 2, 4, 5, 5]);
        b.reset();
        assert_eq!(b.take(), Duration::from_secs(1));
    }
}
