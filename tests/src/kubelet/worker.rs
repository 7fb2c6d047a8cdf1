//! One pod from the moment the kubelet sees it bound to one of its nodes until its object is
//! deleted: address, directory, volumes and credentials, containers, status, termination.

use std::{
    collections::HashMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use k8s_openapi::api::core::v1::{Container, ContainerStatus, Pod};
use kube::{
    api::{DeleteParams, Patch, PatchParams, Preconditions},
    Api, Resource,
};
use serde_json::json;
use tokio::{
    sync::{watch, Notify},
    task::JoinHandle,
    time::Instant,
};

use super::{
    container::{run_container, ContainerCtx, Outcome, Slot},
    credentials,
    env::EnvList,
    events::Events,
    probes::Probes,
    status::{ContainerRecord, PodState, State},
    volumes::{self, PodVolumes},
    KubeletError, Shared, FIELD_MANAGER,
};

/// What the dispatcher tells a pod worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    /// Keep the pod running (the object may have changed, e.g. a deletion timestamp).
    Run,
    /// The object is gone: stop the processes now.
    Gone,
    /// The kubelet stops: stop the processes, leave the object as it is.
    Shutdown,
}

/// The latest pod object and what to do with it.
#[derive(Clone, Debug)]
pub struct PodUpdate {
    /// The object.
    pub pod: Arc<Pod>,
    /// The order.
    pub control: Control,
}

/// Grace period for processes of a pod object that vanished.
const GONE_GRACE: Duration = Duration::from_secs(2);

fn pod_key(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or("default"),
        pod.metadata.name.as_deref().unwrap_or_default()
    )
}

fn is_terminal_phase(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

/// The shortest grace period a container gets, as the real kubelet's
/// `minimumGracePeriodInSeconds`: even a force deletion (`--grace-period=0`) lets the process
/// see its SIGTERM.
const MIN_GRACE: Duration = Duration::from_secs(2);

/// The grace period a deletion gives the pod (at least [`MIN_GRACE`]).
fn deletion_grace(pod: &Pod) -> Duration {
    let seconds = pod
        .metadata
        .deletion_grace_period_seconds
        .or_else(|| {
            pod.spec
                .as_ref()
                .and_then(|s| s.termination_grace_period_seconds)
        })
        .unwrap_or(30);
    Duration::from_secs(u64::try_from(seconds).unwrap_or_default()).max(MIN_GRACE)
}

/// Writes a pod's status when it changed; remembers a failed write for a retry.
struct StatusWriter {
    api: Api<Pod>,
    name: String,
    last: Option<serde_json::Value>,
    dirty: bool,
    suppressed: bool,
}

impl StatusWriter {
    async fn write(&mut self, state: &Mutex<PodState>) {
        if self.suppressed {
            return;
        }
        let status = state.lock().expect("pod state lock").to_status();
        let value = serde_json::to_value(&status).unwrap_or_default();
        if self.last.as_ref() == Some(&value) {
            self.dirty = false;
            return;
        }
        let patch = json!({ "status": value });
        match self
            .api
            .patch_status(
                &self.name,
                &PatchParams {
                    field_manager: Some(FIELD_MANAGER.to_owned()),
                    ..Default::default()
                },
                &Patch::Merge(&patch),
            )
            .await
        {
            Ok(_) => {
                tracing::debug!(pod = %self.name, phase = status.phase.as_deref().unwrap_or(""), "wrote status");
                self.last = Some(value);
                self.dirty = false;
            }
            Err(kube::Error::Api(s)) if s.is_not_found() => self.dirty = false,
            Err(error) => {
                tracing::warn!(pod = %self.name, %error, "writing pod status failed; retrying");
                self.dirty = true;
            }
        }
    }
}

/// Deletes the pod object for good (grace period 0), once its processes are gone.
async fn delete_object(shared: &Shared, pod: &Pod) {
    let api: Api<Pod> = Api::namespaced(
        shared.client.clone(),
        pod.metadata.namespace.as_deref().unwrap_or("default"),
    );
    let params = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(Preconditions {
            uid: pod.metadata.uid.clone(),
            resource_version: None,
        }),
        ..Default::default()
    };
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    for attempt in 0..5 {
        match api.delete(name, &params).await {
            Ok(_) => {
                tracing::info!(pod = %pod_key(pod), "deleted pod object");
                return;
            }
            Err(kube::Error::Api(s)) if s.is_not_found() || s.code == 409 => return,
            Err(error) => {
                tracing::warn!(pod = %pod_key(pod), %error, attempt, "deleting the pod object failed");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

fn remove_dir(dir: &Path) {
    if let Err(error) = std::fs::remove_dir_all(dir) {
        if error.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(dir = %dir.display(), %error, "removing a pod directory failed");
        }
    }
}

/// Waits, doing nothing, until the object is deleted (then deletes it for good) or gone.
async fn idle_until_deleted(shared: &Shared, rx: &mut watch::Receiver<PodUpdate>) {
    loop {
        let update = rx.borrow_and_update().clone();
        match update.control {
            Control::Gone | Control::Shutdown => return,
            Control::Run if update.pod.metadata.deletion_timestamp.is_some() => {
                delete_object(shared, &update.pod).await;
                remove_dir(&volumes::pod_dir(&shared.config.state_dir, &update.pod));
                return;
            }
            Control::Run => {}
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Checks what can be checked before anything runs: images map to binaries, commands start
/// with them, probes are supported.
fn validate(shared: &Shared, pod: &Pod) -> Result<(), (Slot, KubeletError)> {
    let spec = pod.spec.as_ref().expect("pods have a spec");
    let init = spec
        .init_containers
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, c)| (Slot::Init(i), c));
    let main = spec
        .containers
        .iter()
        .enumerate()
        .map(|(i, c)| (Slot::Main(i), c));
    for (slot, container) in init.chain(main) {
        let check = || -> Result<(), KubeletError> {
            let image = container.image.as_deref().unwrap_or_default();
            let mapped = shared.config.images.resolve(image)?;
            // A command must start with the mapped binary (checked again, expanded, at start).
            if container
                .command
                .iter()
                .flatten()
                .next()
                .is_some_and(|first| !first.contains("$("))
            {
                super::env::command_line(container, &mapped, &EnvList::default())?;
            }
            Probes::of(container, Ipv4Addr::LOCALHOST)?;
            if container.lifecycle.is_some() {
                tracing::warn!(pod = %pod_key(pod), container = %container.name, "lifecycle hooks are not run by llmo-kubelet");
            }
            Ok(())
        };
        check().map_err(|e| (slot, e))?;
    }
    Ok(())
}

fn records(containers: &[Container], previous: &[ContainerStatus]) -> Vec<ContainerRecord> {
    let previous: HashMap<&str, &ContainerStatus> =
        previous.iter().map(|s| (s.name.as_str(), s)).collect();
    containers
        .iter()
        .map(|c| {
            let mut record = ContainerRecord::new(&c.name, c.image.as_deref().unwrap_or_default());
            // A pod taken over from an earlier kubelet: its processes are gone, so the next
            // run is a restart.
            if let Some(prev) = previous.get(c.name.as_str()) {
                if prev.container_id.is_some() {
                    record.restart_count = prev.restart_count + 1;
                }
            }
            record
        })
        .collect()
}

/// What the setup of a pod (volumes, credentials) works with.
struct PodSetup<'a> {
    shared: &'a Shared,
    pod: &'a Pod,
    dir: &'a Path,
    pod_ip: Ipv4Addr,
    host_ip: Ipv4Addr,
    events: &'a Events,
}

impl PodSetup<'_> {
    async fn attempt(&self) -> Result<(PodVolumes, Option<PathBuf>), KubeletError> {
        let client = &self.shared.client;
        let vols = volumes::prepare(client, self.pod, self.dir, self.pod_ip, self.host_ip).await?;
        let kubeconfig =
            credentials::pod_kubeconfig(client, self.pod, self.dir, &self.shared.config.api_server)
                .await?;
        Ok((vols, kubeconfig))
    }

    /// Prepares volumes and credentials, retrying each second (containers wait in
    /// `ContainerCreating` with the reason as message). Gives up with the update that stopped
    /// it (`None`: the kubelet is going away).
    async fn run(
        &self,
        state: &Mutex<PodState>,
        writer: &mut StatusWriter,
        rx: &mut watch::Receiver<PodUpdate>,
    ) -> Result<(PodVolumes, Option<PathBuf>), Option<PodUpdate>> {
        let mut last_warning: Option<Instant> = None;
        loop {
            let error = match self.attempt().await {
                Ok(done) => return Ok(done),
                Err(error) => error,
            };
            let message = match &error {
                KubeletError::Pod { message, .. } => message.clone(),
                other => other.to_string(),
            };
            if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                last_warning = Some(Instant::now());
                tracing::warn!(pod = %pod_key(self.pod), %message, "pod cannot start yet");
                self.events.warning("FailedMount", message.clone());
            }
            {
                let mut guard = state.lock().expect("pod state lock");
                let s = &mut *guard;
                for record in s.init_containers.iter_mut().chain(s.containers.iter_mut()) {
                    record.state = State::Waiting {
                        reason: "ContainerCreating".to_owned(),
                        message: Some(message.clone()),
                    };
                }
            }
            writer.write(state).await;
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                res = rx.changed() => {
                    let update = res.ok().map(|()| rx.borrow_and_update().clone());
                    let go_on = update.as_ref().is_some_and(|u| {
                        u.control == Control::Run && u.pod.metadata.deletion_timestamp.is_none()
                    });
                    if !go_on {
                        return Err(update);
                    }
                }
            }
        }
    }
}

/// Variables every container of the pod gets before its own.
fn base_env(
    shared: &Shared,
    pod: &Pod,
    pod_dir: &Path,
    pod_ip: Ipv4Addr,
    kubeconfig: Option<&Path>,
) -> EnvList {
    let mut base = EnvList::default();
    for (k, v) in &shared.config.pass_env {
        base.set(k.clone(), v.clone());
    }
    base.set(
        "PATH",
        std::env::var("PATH").unwrap_or_else(|_| {
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_owned()
        }),
    );
    base.set("HOME", pod_dir.join("home").display().to_string());
    base.set(
        "HOSTNAME",
        pod.spec
            .as_ref()
            .and_then(|s| s.hostname.clone())
            .unwrap_or_else(|| pod.metadata.name.clone().unwrap_or_default()),
    );
    base.set("POD_IP", pod_ip.to_string());
    if let Some((host, port)) = shared.config.api_server.host_port() {
        base.set("KUBERNETES_SERVICE_HOST", host);
        base.set("KUBERNETES_SERVICE_PORT", port.to_string());
    }
    if let Some(path) = kubeconfig {
        base.set("KUBECONFIG", path.display().to_string());
    }
    base
}

/// Runs init containers in order, then every container at once.
async fn run_all(ctx: ContainerCtx, inits: usize, mains: usize) {
    for i in 0..inits {
        match run_container(ctx.clone(), Slot::Init(i)).await {
            Outcome::Done(true) => {}
            Outcome::Done(false) | Outcome::Stopped => return,
        }
    }
    if inits > 0 {
        ctx.state.lock().expect("pod state lock").init_done = true;
        ctx.changed.notify_one();
    }
    futures::future::join_all((0..mains).map(|i| run_container(ctx.clone(), Slot::Main(i)))).await;
}

/// Runs one pod; returns when the kubelet is done with it.
pub async fn run_pod(shared: Arc<Shared>, mut rx: watch::Receiver<PodUpdate>) {
    let pod = rx.borrow_and_update().pod.clone();
    let key = pod_key(&pod);
    let node_name = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .unwrap_or_default();
    let Some(node) = shared.nodes.get(&node_name).cloned() else {
        tracing::warn!(pod = %key, node = %node_name, "not one of our nodes");
        return;
    };
    let events = Events::new(shared.recorder.clone(), pod.object_ref(&()));
    let pod_dir = volumes::pod_dir(&shared.config.state_dir, &pod);

    if pod.metadata.deletion_timestamp.is_some() {
        // Deleted while no kubelet ran it: nothing runs, so it can go.
        delete_object(&shared, &pod).await;
        remove_dir(&pod_dir);
        return;
    }
    if is_terminal_phase(&pod) {
        idle_until_deleted(&shared, &mut rx).await;
        return;
    }

    let spec = pod.spec.clone().unwrap_or_default();
    let old_status = pod.status.clone().unwrap_or_default();
    let init_containers = spec.init_containers.clone().unwrap_or_default();
    let mut state = PodState::new(
        node.ip,
        records(
            &init_containers,
            old_status
                .init_container_statuses
                .as_deref()
                .unwrap_or_default(),
        ),
        records(
            &spec.containers,
            old_status.container_statuses.as_deref().unwrap_or_default(),
        ),
    );
    if let Some(start) = &old_status.start_time {
        state.start_time = start.0;
    }
    let mut writer = StatusWriter {
        api: Api::namespaced(
            shared.client.clone(),
            pod.metadata.namespace.as_deref().unwrap_or("default"),
        ),
        name: pod.metadata.name.clone().unwrap_or_default(),
        last: None,
        dirty: false,
        suppressed: false,
    };

    // Refuse what cannot run, with a reason and a message, rather than hang. The pod stays
    // Pending with its container waiting, as with an image that cannot be pulled: a Failed pod
    // would make its ReplicaSet or DaemonSet create replacements in a hot loop.
    if let Err((slot, error)) = validate(&shared, &pod) {
        let (reason, message) = match &error {
            KubeletError::Pod { reason, message } => ((*reason).to_owned(), message.clone()),
            other => ("Failed".to_owned(), other.to_string()),
        };
        tracing::warn!(pod = %key, %reason, %message, "pod cannot run");
        events.warning(&reason, message.clone());
        let record = match slot {
            Slot::Init(i) => &mut state.init_containers[i],
            Slot::Main(i) => &mut state.containers[i],
        };
        record.state = State::Waiting {
            reason,
            message: Some(message),
        };
        let state = Mutex::new(state);
        writer.write(&state).await;
        while writer.dirty {
            tokio::time::sleep(Duration::from_secs(1)).await;
            writer.write(&state).await;
        }
        idle_until_deleted(&shared, &mut rx).await;
        return;
    }

    let host_network = spec.host_network == Some(true);
    let previous_ip = old_status
        .pod_ip
        .as_deref()
        .and_then(|ip| ip.parse::<Ipv4Addr>().ok());
    let pod_ip = if host_network {
        node.ip
    } else {
        match shared.addresses.allocate(previous_ip) {
            Ok(ip) => ip,
            Err(error) => {
                tracing::error!(pod = %key, %error, "no address");
                state.failure = Some(("AddressesExhausted".to_owned(), error.to_string()));
                let state = Mutex::new(state);
                writer.write(&state).await;
                idle_until_deleted(&shared, &mut rx).await;
                return;
            }
        }
    };
    let release = |shared: &Shared| {
        if !host_network {
            shared.addresses.release(pod_ip);
        }
    };
    state.pod_ip = Some(pod_ip);
    tracing::info!(pod = %key, node = %node_name, ip = %pod_ip, "taking pod");
    let state = Arc::new(Mutex::new(state));
    let changed = Arc::new(Notify::new());
    writer.write(&state).await;

    // Volumes and credentials; a missing ConfigMap or token Secret is waited for.
    let setup = PodSetup {
        shared: &shared,
        pod: &pod,
        dir: &pod_dir,
        pod_ip,
        host_ip: node.ip,
        events: &events,
    };
    let (pod_volumes, kubeconfig) = match setup.run(&state, &mut writer, &mut rx).await {
        Ok(done) => done,
        Err(update) => {
            let deleted = update.as_ref().is_some_and(|u| {
                u.control == Control::Run && u.pod.metadata.deletion_timestamp.is_some()
            });
            if deleted {
                delete_object(&shared, &pod).await;
            }
            if deleted || update.is_some_and(|u| u.control == Control::Gone) {
                remove_dir(&pod_dir);
            }
            release(&shared);
            return;
        }
    };
    for warning in &pod_volumes.warnings {
        tracing::warn!(pod = %key, %warning, "volume stand-in");
        events.warning("VolumeNotSupported", warning.clone());
    }

    let base = base_env(&shared, &pod, &pod_dir, pod_ip, kubeconfig.as_deref());
    let (stop_tx, stop_rx) = watch::channel(None);
    let ctx = ContainerCtx {
        shared: shared.clone(),
        pod: pod.clone(),
        pod_ip,
        host_ip: node.ip,
        node_resources: (node.spec.cpu.clone(), node.spec.memory.clone()),
        pod_dir: pod_dir.clone(),
        volumes: Arc::new(pod_volumes),
        base_env: base,
        state: state.clone(),
        changed: changed.clone(),
        events: events.clone(),
        stop: stop_rx,
    };
    let mut runner: Option<JoinHandle<()>> = Some(tokio::spawn(run_all(
        ctx,
        init_containers.len(),
        spec.containers.len(),
    )));
    let mut released = false;

    // Stops every container: SIGTERM, then SIGKILL at the deadline.
    async fn stop(
        stop_tx: &watch::Sender<Option<Instant>>,
        runner: &mut Option<JoinHandle<()>>,
        grace: Duration,
    ) {
        stop_tx.send_replace(Some(Instant::now() + grace));
        if let Some(task) = runner.take() {
            let _ = task.await;
        }
    }

    loop {
        tokio::select! {
            () = changed.notified() => writer.write(&state).await,
            () = tokio::time::sleep(Duration::from_secs(1)), if writer.dirty => writer.write(&state).await,
            res = rx.changed() => {
                let update = match res {
                    Ok(()) => rx.borrow_and_update().clone(),
                    Err(_) => PodUpdate { pod: pod.clone(), control: Control::Shutdown },
                };
                match update.control {
                    Control::Shutdown => {
                        // The pod stays as it is in the API: the next kubelet restarts it.
                        writer.suppressed = true;
                        let grace = deletion_grace(&pod).min(shared.config.shutdown_grace);
                        tracing::info!(pod = %key, grace_s = grace.as_secs_f64(), "kubelet stopping: stopping pod");
                        stop(&stop_tx, &mut runner, grace).await;
                        if !released { release(&shared); }
                        return;
                    }
                    Control::Gone => {
                        tracing::info!(pod = %key, "pod object gone: stopping its processes");
                        writer.suppressed = true;
                        stop(&stop_tx, &mut runner, deletion_grace(&pod).min(GONE_GRACE)).await;
                        if !released { release(&shared); }
                        remove_dir(&pod_dir);
                        return;
                    }
                    Control::Run if update.pod.metadata.deletion_timestamp.is_some() => {
                        let grace = deletion_grace(&update.pod);
                        tracing::info!(pod = %key, grace_s = grace.as_secs_f64(), "pod deleted: stopping it");
                        events.normal("Killing", format!("Stopping pod (grace period {}s)", grace.as_secs()));
                        stop(&stop_tx, &mut runner, grace).await;
                        writer.write(&state).await;
                        delete_object(&shared, &update.pod).await;
                        if !released { release(&shared); }
                        remove_dir(&pod_dir);
                        return;
                    }
                    Control::Run => {}
                }
            }
            _ = async { runner.as_mut().expect("guarded").await }, if runner.is_some() => {
                runner = None;
                writer.write(&state).await;
                // Nothing of this pod runs any more: its address can serve another.
                if !released {
                    release(&shared);
                    released = true;
                }
                tracing::info!(pod = %key, phase = state.lock().expect("pod state lock").phase(), "pod finished");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(deletion: Option<i64>, spec: Option<i64>) -> Pod {
        let mut pod = Pod::default();
        pod.metadata.deletion_grace_period_seconds = deletion;
        pod.spec = Some(k8s_openapi::api::core::v1::PodSpec {
            termination_grace_period_seconds: spec,
            ..Default::default()
        });
        pod
    }

    #[test]
    fn a_deletion_gives_its_grace_period_and_a_force_deletion_the_minimum() {
        assert_eq!(
            deletion_grace(&pod(Some(10), Some(5))),
            Duration::from_secs(10)
        );
        assert_eq!(deletion_grace(&pod(None, Some(5))), Duration::from_secs(5));
        assert_eq!(deletion_grace(&pod(None, None)), Duration::from_secs(30));
        assert_eq!(deletion_grace(&pod(Some(0), Some(5))), MIN_GRACE);
        assert_eq!(deletion_grace(&pod(None, Some(0))), MIN_GRACE);
    }
}
