//! Processes: one per container run, in its own process group, with output appended to a log.
//!
//! Every container process leads a new process group, and every signal goes to the whole group,
//! so that helpers a process starts stop with it. When the leader exits, what is left of its group
//! is killed. The kubelet binary also sets a parent-death signal (see
//! [`super::config::SpawnHook`]), so a container process dies with a kubelet that is killed
//! outright (SIGKILL). That signal reaches the container process only, not processes it started
//! itself: such processes should stop when their parent does.

use std::{
    io::Write,
    os::unix::process::ExitStatusExt,
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    time::Duration,
};

use nix::{
    sys::signal::{killpg, Signal},
    unistd::Pid,
};

use super::{config::SpawnHook, KubeletError};

/// What to run.
#[derive(Clone, Debug)]
pub struct ProcessSpec {
    /// The binary.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// Its whole environment (nothing is inherited from the kubelet).
    pub env: Vec<(String, String)>,
    /// Working directory.
    pub cwd: PathBuf,
    /// Log file that stdout and stderr are appended to.
    pub log: PathBuf,
    /// Separator line written to the log before the process starts.
    pub header: String,
}

/// A running process.
#[derive(Debug)]
pub struct Process {
    child: tokio::process::Child,
    pid: u32,
}

/// How a process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exit {
    /// Exit code, 128 + signal number for a process killed by a signal (as container runtimes
    /// report it).
    pub code: i32,
    /// The signal that killed it.
    pub signal: Option<i32>,
}

impl From<ExitStatus> for Exit {
    fn from(status: ExitStatus) -> Self {
        match (status.code(), status.signal()) {
            (Some(code), _) => Self { code, signal: None },
            (None, Some(sig)) => Self {
                code: 128 + sig,
                signal: Some(sig),
            },
            (None, None) => Self {
                code: 255,
                signal: None,
            },
        }
    }
}

/// Appends a line to a log file (creating it).
pub fn append_log_line(path: &Path, line: &str) -> Result<(), KubeletError> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| KubeletError::io("opening a container log", path, e))?;
    writeln!(file, "{line}").map_err(|e| KubeletError::io("writing a container log", path, e))
}

/// Starts a process.
pub fn spawn(spec: &ProcessSpec, hook: Option<SpawnHook>) -> Result<Process, KubeletError> {
    if let Some(parent) = spec.log.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| KubeletError::io("creating the log directory", parent, e))?;
    }
    append_log_line(&spec.log, &spec.header)?;
    let out = std::fs::OpenOptions::new()
        .append(true)
        .open(&spec.log)
        .map_err(|e| KubeletError::io("opening a container log", &spec.log, e))?;
    let err = out
        .try_clone()
        .map_err(|e| KubeletError::io("opening a container log", &spec.log, e))?;
    let mut cmd = std::process::Command::new(&spec.program);
    cmd.args(&spec.args)
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&spec.cwd)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    if let Some(hook) = hook {
        hook(&mut cmd);
    }
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(true);
    let child = cmd.spawn().map_err(|e| {
        KubeletError::pod(
            "StartError",
            format!("starting {}: {e}", spec.program.display()),
        )
    })?;
    let pid = child.id().unwrap_or_default();
    Ok(Process { child, pid })
}

impl Process {
    /// Its process id, which is also its process group id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Sends `signal` to the whole process group.
    pub fn signal(&self, signal: Signal) {
        signal_group(self.pid, signal);
    }

    /// Waits until it exits, then kills what is left of its group.
    pub async fn wait(&mut self) -> Exit {
        let exit = match self.child.wait().await {
            Ok(status) => Exit::from(status),
            Err(error) => {
                tracing::warn!(pid = self.pid, %error, "waiting for a process failed");
                Exit {
                    code: 255,
                    signal: None,
                }
            }
        };
        signal_group(self.pid, Signal::SIGKILL);
        exit
    }

    /// SIGTERM to the group, then SIGKILL when it has not exited within `grace`.
    pub async fn terminate(&mut self, grace: Duration) -> Exit {
        self.signal(Signal::SIGTERM);
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(_) => {}
            Err(_) => {
                tracing::info!(
                    pid = self.pid,
                    grace_s = grace.as_secs_f64(),
                    "grace period over; killing"
                );
                self.signal(Signal::SIGKILL);
            }
        }
        self.wait().await
    }
}

fn signal_group(pid: u32, signal: Signal) {
    let Ok(pid) = i32::try_from(pid) else { return };
    if pid <= 1 {
        return;
    }
    match killpg(Pid::from_raw(pid), signal) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
        Err(error) => tracing::warn!(pid, ?signal, %error, "signalling a process group failed"),
    }
}
