//! `llmo-kubelet`: runs the pods of simulated nodes as local processes. See the module
//! documentation of `llmo_e2e::kubelet` for what it does and the rules pods must follow.
//!
//! ```console
//! $ llmo-kubelet --kubeconfig ~/.cache/llmo/cluster/kubeconfig --nodes nodes.yaml \
//!     --state-dir /tmp/kubelet \
//!     --image ghcr.io/llmo-dev/llmo-serve=$CARGO_TARGET_DIR/debug/llmo-serve \
//!     --image ghcr.io/llmo-dev/llmo-operator=$CARGO_TARGET_DIR/debug/llmo-operator
//! ```

use std::{net::Ipv4Addr, path::PathBuf, process::ExitCode, time::Duration};

use clap::Parser;
use kube::config::{KubeConfigOptions, Kubeconfig};
use llmo_e2e::kubelet::{
    config::{default_address_lock_dir, ApiServer, ImageMap},
    KubeletConfig, KubeletError, NodesFile,
};

/// Runs the pods bound to simulated nodes as local processes.
#[derive(Debug, Parser)]
#[command(name = "llmo-kubelet", version)]
struct Args {
    /// Kubeconfig of the cluster (admin rights: it writes Nodes, pod status and Services).
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: PathBuf,
    /// YAML file listing the simulated nodes.
    #[arg(long)]
    nodes: PathBuf,
    /// Directory of pod directories, logs and services.json [default: ~/.cache/llmo/kubelet].
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Image to binary: PREFIX=PATH, repeated. An image matches when its name without tag is
    /// PREFIX or continues it with `/`.
    #[arg(long = "image", value_name = "PREFIX=PATH")]
    images: Vec<String>,
    /// Host environment variables passed to every process, repeated (nothing else is).
    #[arg(long = "pass-env", value_name = "NAME")]
    pass_env: Vec<String>,
    /// First loopback address handed to nodes and pods.
    #[arg(long, default_value = "127.0.0.10")]
    first_address: Ipv4Addr,
    /// Directory of the address locks, shared by every kubelet of this machine
    /// [default: $TMPDIR/llmo-kubelet-addresses].
    #[arg(long)]
    address_lock_dir: Option<PathBuf>,
    /// Seconds between Node heartbeats.
    #[arg(long, default_value_t = 10)]
    heartbeat_seconds: u64,
    /// Longest back-off between restarts of a crashing container, in seconds.
    #[arg(long, default_value_t = 30)]
    max_backoff_seconds: u64,
    /// Longest grace period given to pods when the kubelet stops, in seconds.
    #[arg(long, default_value_t = 30)]
    shutdown_grace_seconds: u64,
    /// Do not run the Service proxy (when another kubelet of the cluster runs it).
    #[arg(long)]
    no_service_proxy: bool,
    /// Delete the Node objects on exit (otherwise they are marked not ready).
    #[arg(long)]
    delete_nodes_on_exit: bool,
}

/// Makes a child die with the kubelet even when the kubelet is killed outright (SIGKILL).
fn die_with_parent(cmd: &mut std::process::Command) {
    let parent = nix::unistd::getpid();
    #[allow(unsafe_code)]
    // SAFETY: the closure runs in the forked child before exec and only makes two
    // async-signal-safe system calls (prctl and getppid); it allocates nothing and takes no
    // lock, and it captures only a plain pid.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, move || {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
            // The kubelet may have died between fork and prctl: then nothing would signal us.
            if nix::unistd::getppid() != parent {
                return Err(std::io::Error::other("llmo-kubelet exited"));
            }
            Ok(())
        });
    }
}

fn config(args: &Args) -> Result<(KubeletConfig, Kubeconfig), KubeletError> {
    let nodes = NodesFile::read(&args.nodes)?.nodes;
    let images = ImageMap::new(
        args.images
            .iter()
            .map(|flag| ImageMap::parse_flag(flag))
            .collect::<Result<_, _>>()?,
    )
    .checked()?;
    let kubeconfig = Kubeconfig::read_from(&args.kubeconfig)
        .map_err(|e| KubeletError::Kubeconfig(format!("{}: {e}", args.kubeconfig.display())))?;
    let api_server = ApiServer::from_kubeconfig(&kubeconfig)?;
    let state_dir = match &args.state_dir {
        Some(dir) => dir.clone(),
        None => std::env::var_os("HOME")
            .map(PathBuf::from)
            .ok_or_else(|| KubeletError::Config("no --state-dir and no HOME".to_owned()))?
            .join(".cache/llmo/kubelet"),
    };
    std::fs::create_dir_all(&state_dir)
        .map_err(|e| KubeletError::io("creating the state directory", &state_dir, e))?;
    let state_dir = std::fs::canonicalize(&state_dir)
        .map_err(|e| KubeletError::io("resolving the state directory", &state_dir, e))?;
    let mut config = KubeletConfig::new(nodes, images, state_dir, api_server);
    config.first_address = args.first_address;
    config.address_lock_dir = args
        .address_lock_dir
        .clone()
        .unwrap_or_else(default_address_lock_dir);
    config.heartbeat = Duration::from_secs(args.heartbeat_seconds.max(1));
    config.max_backoff = Duration::from_secs(args.max_backoff_seconds.max(1));
    config.shutdown_grace = Duration::from_secs(args.shutdown_grace_seconds);
    config.service_proxy = !args.no_service_proxy;
    config.delete_nodes_on_exit = args.delete_nodes_on_exit;
    config.pass_env = args
        .pass_env
        .iter()
        .filter_map(|name| std::env::var(name).ok().map(|v| (name.clone(), v)))
        .collect();
    config.spawn_hook = Some(die_with_parent);
    Ok((config, kubeconfig))
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(error) => {
            tracing::error!(%error, "cannot listen for SIGTERM");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted"),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    let (config, kubeconfig) = match config(&args) {
        Ok(c) => c,
        Err(error) => {
            eprintln!("llmo-kubelet: {error}");
            return ExitCode::from(2);
        }
    };
    let client =
        match kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .map_err(|e| e.to_string())
            .and_then(|c| kube::Client::try_from(c).map_err(|e| e.to_string()))
        {
            Ok(client) => client,
            Err(error) => {
                eprintln!(
                    "llmo-kubelet: kubeconfig {}: {error}",
                    args.kubeconfig.display()
                );
                return ExitCode::from(2);
            }
        };
    match llmo_e2e::kubelet::run(client, config, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("llmo-kubelet: {error}");
            ExitCode::FAILURE
        }
    }
}
