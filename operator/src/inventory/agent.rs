//! `llmo-operator agent`: the node agent's command line and loop.
//!
//! Each interval: read the GPUs, match them to a GPUClass, build the status, and let the change
//! detector decide whether it is worth a write. GPUClasses and the agent's own Node are watched
//! (one watch each, the Node through a field selector) rather than fetched every interval, so
//! an idle fleet costs the API server watches, not requests.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, Instant},
};

use futures::{FutureExt, Stream, StreamExt};
use k8s_openapi::{api::core::v1::Node, jiff::Timestamp};
use kube::{
    api::ListParams,
    runtime::{
        reflector::{self, ObjectRef, Store},
        watcher, WatchStreamExt,
    },
    Api, Client, ResourceExt,
};

use crate::api::{parse_manifests, GPUClass, HumanDuration, Manifest};

use super::{
    change::{ChangeDetector, WritePolicy},
    matching::match_gpu_class,
    nvml::NvmlSource,
    profile::SimulationProfile,
    simulated::SimulatedSource,
    source::{InventorySource, NoGpus, SourceKind},
    status::{build_status, failed_status},
    write_rate::{measure_write_rate, render_table},
    writer::NodeWriter,
    InventoryError, GPU_CLASS_LABEL, GPU_PRODUCT_LABEL,
};

/// Run the node agent: read this node's GPUs and keep its GPUNode up to date.
#[derive(clap::Args, Debug, Clone)]
pub struct AgentArgs {
    /// Name of this node (in a DaemonSet: from the downward API, `spec.nodeName`).
    #[arg(
        long,
        env = "LLMO_NODE_NAME",
        required_unless_present = "measure_writes"
    )]
    pub node_name: Option<String>,
    /// Simulate the GPUs of this profile instead of reading NVML. With --measure-writes it may
    /// be given several times.
    #[arg(long, env = "LLMO_SIMULATE", value_name = "PROFILE.yaml")]
    pub simulate: Vec<PathBuf>,
    /// Simulate idle GPUs as this node's labels describe them (`nvidia.com/gpu.count`,
    /// `.product`, `.memory`), for local and test clusters whose nodes carry those labels but no
    /// GPUs. A node without them is a CPU node (see --cpu-class).
    #[arg(long, env = "LLMO_SIMULATE_FROM_NODE", conflicts_with_all = ["simulate", "measure_writes"])]
    pub simulate_from_node: bool,
    /// How often to read the GPUs.
    #[arg(long, env = "LLMO_INTERVAL", default_value = "10s")]
    pub interval: HumanDuration,
    /// Longest time between two writes when nothing changes.
    #[arg(long, env = "LLMO_HEARTBEAT", default_value = "5m")]
    pub heartbeat: HumanDuration,
    /// Write when a GPU's free memory moved this much since the last write.
    #[arg(long, env = "LLMO_MEMORY_THRESHOLD_MIB", default_value_t = 2048)]
    pub memory_threshold_mib: u64,
    /// Write budget: one write is earned per this interval, up to a burst of 3, and every write
    /// spends from it. Figure changes (free memory, utilization band) wait for the budget;
    /// health and inventory changes are always written at once.
    #[arg(long, env = "LLMO_SOFT_WRITE_INTERVAL", default_value = "4m")]
    pub soft_write_interval: HumanDuration,
    /// Report a node without GPUs as this `cpu` GPUClass. Without it, such a node (or one where
    /// NVML is missing) gets no class, so a GPU node with a broken driver is never taken for a
    /// CPU node by accident.
    #[arg(long, env = "LLMO_CPU_CLASS")]
    pub cpu_class: Option<String>,
    /// Touch no cluster: replay each --simulate profile for this long, sampling every
    /// --interval, and print writes per hour against writing every sample.
    #[arg(long, value_name = "DURATION", requires = "simulate")]
    pub measure_writes: Option<HumanDuration>,
    /// GPUClass manifests to match against with --measure-writes (e.g. examples/gpuclasses.yaml).
    #[arg(long, value_name = "FILE", requires = "measure_writes")]
    pub classes: Option<PathBuf>,
}

impl AgentArgs {
    /// The write policy the flags describe.
    pub fn policy(&self) -> WritePolicy {
        WritePolicy {
            memory_threshold_mib: self.memory_threshold_mib,
            heartbeat: self.heartbeat.get(),
            soft_write_interval: self.soft_write_interval.get(),
            ..WritePolicy::default()
        }
    }
}

/// Runs the command; every failure is one line on standard error and a non-zero exit.
pub fn main(args: AgentArgs) -> ExitCode {
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("llmo-operator agent: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: AgentArgs) -> Result<(), InventoryError> {
    if args.interval.get().is_zero() {
        return Err(InventoryError::Usage(
            "--interval must be longer than 0s".into(),
        ));
    }
    if let Some(duration) = args.measure_writes {
        return measure(&args, duration.get());
    }
    let node_name = args
        .node_name
        .clone()
        .ok_or_else(|| InventoryError::Usage("--node-name is required".into()))?;
    // Open the source before logging starts, so that a node without NVML prints one line.
    let source = if args.simulate_from_node {
        None
    } else {
        Some(open_source(&args, &node_name)?)
    };
    init_tracing();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| InventoryError::Usage(format!("cannot start the async runtime: {e}")))?;
    runtime.block_on(async {
        let client = Client::try_default().await.map_err(|e| {
            InventoryError::kube(
                "connecting to the Kubernetes API (in a pod: its service account; elsewhere: KUBECONFIG)",
                e,
            )
        })?;
        let source = match source {
            Some(s) => s,
            None => from_node(&client, &node_name).await?,
        };
        run_agent(client, &args, &node_name, source, shutdown_signal()).await
    })
}

fn open_source(
    args: &AgentArgs,
    node_name: &str,
) -> Result<Box<dyn InventorySource>, InventoryError> {
    match args.simulate.as_slice() {
        [] => match NvmlSource::open() {
            Ok(source) => Ok(Box::new(source)),
            Err(InventoryError::NvmlUnavailable { .. }) if args.cpu_class.is_some() => {
                Ok(Box::new(NoGpus))
            }
            Err(e) => Err(e),
        },
        [profile] => Ok(Box::new(simulated(profile, node_name)?)),
        _ => Err(InventoryError::Usage(
            "pass one --simulate profile to run the agent; several are for --measure-writes".into(),
        )),
    }
}

/// The simulated source `--simulate-from-node` describes: this node's GPU labels.
async fn from_node(
    client: &Client,
    node_name: &str,
) -> Result<Box<dyn InventorySource>, InventoryError> {
    let node = Api::<Node>::all(client.clone())
        .get(node_name)
        .await
        .map_err(|e| InventoryError::kube(format!("reading Node {node_name}"), e))?;
    let profile = SimulationProfile::from_node_labels(node_name, node.labels())?;
    if profile.gpu_count() == 0 {
        return Ok(Box::new(NoGpus));
    }
    Ok(Box::new(SimulatedSource::new(
        profile,
        format!("labels of Node {node_name}"),
        node_name,
    )))
}

fn simulated(path: &Path, node_name: &str) -> Result<SimulatedSource, InventoryError> {
    let profile = SimulationProfile::load(path)?;
    let origin = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string());
    Ok(SimulatedSource::new(profile, origin, node_name))
}

fn measure(args: &AgentArgs, duration: Duration) -> Result<(), InventoryError> {
    let classes = match &args.classes {
        Some(path) => load_classes(path)?,
        None => Vec::new(),
    };
    let node = args.node_name.as_deref().unwrap_or("simulated-node");
    let policy = args.policy();
    let mut rows = Vec::new();
    for path in &args.simulate {
        let source = simulated(path, node)?;
        let mut row = measure_write_rate(&source, &classes, &policy, duration, args.interval.get());
        row.profile = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        rows.push(row);
    }
    print!("{}", render_table(&rows, &policy, args.interval.get()));
    Ok(())
}

fn load_classes(path: &Path) -> Result<Vec<GPUClass>, InventoryError> {
    let fail = |message: String| InventoryError::Classes {
        path: path.to_owned(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
    let mut classes = Vec::new();
    for manifest in parse_manifests(&text) {
        if let Manifest::GpuClass(class) = manifest.map_err(|e| fail(e.to_string()))? {
            classes.push(*class);
        }
    }
    Ok(classes)
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// The agent loop, until `shutdown` resolves.
pub async fn run_agent(
    client: Client,
    args: &AgentArgs,
    node_name: &str,
    mut source: Box<dyn InventorySource>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), InventoryError> {
    let class_api: Api<GPUClass> = Api::all(client.clone());
    if let Err(e) = class_api.list(&ListParams::default().limit(1)).await {
        return Err(match e {
            kube::Error::Api(s) if s.is_not_found() => InventoryError::CrdMissing {
                crd: "gpuclasses.llmo.dev",
            },
            e => InventoryError::kube("listing GPUClasses", e),
        });
    }
    let node_api: Api<Node> = Api::all(client.clone());
    let node = node_api.get(node_name).await.map_err(|e| {
        InventoryError::kube(
            format!("reading Node {node_name} (is --node-name / LLMO_NODE_NAME right?)"),
            e,
        )
    })?;

    let (classes, class_watch) =
        watch_into_store(class_api, watcher::Config::default(), "GPUClass");
    let (nodes, node_watch) = watch_into_store(
        node_api,
        watcher::Config::default().fields(&format!("metadata.name={node_name}")),
        "Node",
    );
    let _watches = AbortOnDrop(vec![class_watch, node_watch]);

    // Matching before the GPUClasses are known would write a node without a class, then
    // correct it a moment later; wait for the first listing (bounded, in case of a slow server).
    for (what, ready) in [
        ("GPUClass", classes.wait_until_ready().boxed()),
        ("Node", nodes.wait_until_ready().boxed()),
    ] {
        if tokio::time::timeout(STORE_WAIT, ready).await.is_err() {
            tracing::warn!(kind = what, "watch not ready yet; going on without it");
        }
    }

    let writer = NodeWriter::new(client, node_name, Some(&node));
    writer.ensure_gpunode().await?;
    let kind = source.kind();
    if kind == SourceKind::NoGpus {
        tracing::info!("NVML is not available; reporting a CPU node as --cpu-class asks");
    }
    tracing::info!(node = %node_name, source = ?kind, interval = %args.interval, "node agent started");

    let mut detector = ChangeDetector::new(args.policy());
    let mut label_sent: Option<Option<String>> = None;
    let mut ticker = tokio::time::interval(args.interval.get());
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let start = Instant::now();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = &mut shutdown => {
                tracing::info!("stopping");
                return Ok(());
            }
        }
        let elapsed = start.elapsed();
        let now = Timestamp::now();
        let node = nodes
            .get(&ObjectRef::new(node_name))
            .unwrap_or_else(|| std::sync::Arc::new(node.clone()));
        let labels = node.labels();
        let class_list: Vec<GPUClass> = classes.state().iter().map(|c| (**c).clone()).collect();
        let previous = detector
            .last_written()
            .map(|s| s.conditions.clone())
            .unwrap_or_default();
        let candidate = match source.read(elapsed) {
            Ok(reading) => {
                let products: Vec<String> =
                    reading.gpus.iter().map(|g| g.product.clone()).collect();
                let matched = match_gpu_class(
                    &class_list,
                    &products,
                    labels.get(GPU_PRODUCT_LABEL).map(String::as_str),
                    args.cpu_class.as_deref(),
                );
                build_status(&reading, &matched, &kind, now, &previous)
            }
            Err(error) => {
                tracing::warn!(%error, "reading GPUs failed");
                failed_status(detector.last_written(), &kind, &error.to_string(), now)
            }
        };

        if let Some(reason) = detector.observe(&candidate, elapsed) {
            match writer.apply_status(&candidate).await {
                Ok(()) => {
                    detector.write_succeeded();
                    tracing::info!(
                        reason = reason.as_str(),
                        gpus = candidate.gpu_count,
                        healthy = candidate.healthy_gpus,
                        free_mib = candidate.memory_free_mib,
                        class = candidate.gpu_class.as_deref().unwrap_or(""),
                        "wrote GPUNode status"
                    );
                }
                Err(error) => {
                    detector.write_failed(start.elapsed());
                    tracing::warn!(%error, "status write failed; retrying after a backoff");
                }
            }
        }

        let have = labels.get(GPU_CLASS_LABEL).cloned();
        let want = candidate.gpu_class.clone();
        if have == want {
            label_sent = None;
        } else if label_sent.as_ref() != Some(&want) {
            match writer.apply_class_label(want.as_deref()).await {
                Ok(()) => {
                    tracing::info!(class = want.as_deref().unwrap_or(""), "labelled Node");
                    label_sent = Some(want);
                }
                Err(error) => tracing::warn!(%error, "labelling the Node failed"),
            }
        }
    }
}

/// How long to wait for the first listing of GPUClasses and of the Node.
const STORE_WAIT: Duration = Duration::from_secs(30);

/// Starts a reflector in the background and returns its store. Watch errors are logged and
/// retried with backoff; the store keeps its last contents meanwhile.
fn watch_into_store<K>(
    api: Api<K>,
    config: watcher::Config,
    what: &'static str,
) -> (Store<K>, tokio::task::JoinHandle<()>)
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher(api, config))
        .default_backoff()
        .touched_objects();
    (store, tokio::spawn(drive(stream, what)))
}

/// Stops the watches when the agent loop ends, however it ends.
struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

async fn drive<S, K, E>(stream: S, what: &'static str)
where
    S: Stream<Item = Result<K, E>>,
    E: std::fmt::Display,
{
    futures::pin_mut!(stream);
    while let Some(item) = stream.next().await {
        if let Err(error) = item {
            tracing::warn!(%error, kind = what, "watch failed; retrying");
        }
    }
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
