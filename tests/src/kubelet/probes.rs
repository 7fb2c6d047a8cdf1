//! Startup, readiness and liveness probes: `httpGet` (HTTP only) and `tcpSocket`, with
//! `initialDelaySeconds`, `periodSeconds`, `timeoutSeconds`, `successThreshold` and
//! `failureThreshold` as Kubernetes defines them. `exec` probes (and HTTPS ones) are refused when
//! the pod starts, with a message, rather than ignored.

use std::{net::Ipv4Addr, time::Duration};

use k8s_openapi::{
    api::core::v1::{Container, Probe},
    apimachinery::pkg::util::intstr::IntOrString,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::mpsc,
    task::JoinHandle,
    time::Instant,
};

use super::KubeletError;

/// The reason of a pod whose probes llmo-kubelet cannot run.
pub const UNSUPPORTED: &str = "ProbeNotSupported";

/// What the probes of a container report to its runner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeEvent {
    /// The startup probe passed (or there is none): liveness and readiness probes begin.
    Started,
    /// Readiness changed.
    Ready(bool),
    /// One probe attempt failed (for an Event).
    Unhealthy {
        /// `Startup`, `Readiness` or `Liveness`.
        probe: &'static str,
        /// What failed.
        message: String,
    },
    /// A startup or liveness probe reached its failure threshold: restart the container.
    Failed {
        /// `Startup` or `Liveness`.
        probe: &'static str,
        /// The last failure.
        message: String,
    },
}

#[derive(Clone, Debug, PartialEq)]
enum Action {
    Http {
        host: String,
        port: u16,
        path: String,
        headers: Vec<(String, String)>,
    },
    Tcp {
        host: String,
        port: u16,
    },
}

#[derive(Clone, Debug, PartialEq)]
struct Settings {
    action: Action,
    initial_delay: Duration,
    period: Duration,
    timeout: Duration,
    success_threshold: u32,
    failure_threshold: u32,
}

/// The probes of one container, checked and ready to run.
#[derive(Clone, Debug, PartialEq)]
pub struct Probes {
    startup: Option<Settings>,
    readiness: Option<Settings>,
    liveness: Option<Settings>,
}

impl Probes {
    /// Checks a container's probes: ports must exist, only `httpGet` (HTTP) and `tcpSocket` run.
    pub fn of(container: &Container, pod_ip: Ipv4Addr) -> Result<Self, KubeletError> {
        let parse = |kind: &str, probe: &Option<Probe>| {
            probe
                .as_ref()
                .map(|p| settings(container, kind, p, pod_ip))
                .transpose()
        };
        Ok(Self {
            startup: parse("startup", &container.startup_probe)?,
            readiness: parse("readiness", &container.readiness_probe)?,
            liveness: parse("liveness", &container.liveness_probe)?,
        })
    }

    /// Runs them until the handle is aborted (or a startup/liveness probe fails for good).
    pub fn spawn(self, tx: mpsc::UnboundedSender<ProbeEvent>) -> JoinHandle<()> {
        tokio::spawn(self.run(tx))
    }

    async fn run(self, tx: mpsc::UnboundedSender<ProbeEvent>) {
        let start = Instant::now();
        if let Some(startup) = &self.startup {
            tokio::time::sleep_until(start + startup.initial_delay).await;
            let mut failures = 0;
            loop {
                match check(&startup.action, startup.timeout).await {
                    Ok(()) => break,
                    Err(message) => {
                        failures += 1;
                        let _ = tx.send(ProbeEvent::Unhealthy {
                            probe: "Startup",
                            message: message.clone(),
                        });
                        if failures >= startup.failure_threshold {
                            let _ = tx.send(ProbeEvent::Failed {
                                probe: "Startup",
                                message,
                            });
                            return;
                        }
                    }
                }
                tokio::time::sleep(startup.period).await;
            }
        }
        let _ = tx.send(ProbeEvent::Started);
        let readiness = async {
            let Some(probe) = &self.readiness else {
                let _ = tx.send(ProbeEvent::Ready(true));
                return;
            };
            tokio::time::sleep_until(start + probe.initial_delay).await;
            let (mut ready, mut successes, mut failures) = (false, 0, 0);
            loop {
                match check(&probe.action, probe.timeout).await {
                    Ok(()) => {
                        successes += 1;
                        failures = 0;
                        if !ready && successes >= probe.success_threshold {
                            ready = true;
                            let _ = tx.send(ProbeEvent::Ready(true));
                        }
                    }
                    Err(message) => {
                        failures += 1;
                        successes = 0;
                        let _ = tx.send(ProbeEvent::Unhealthy {
                            probe: "Readiness",
                            message,
                        });
                        if ready && failures >= probe.failure_threshold {
                            ready = false;
                            let _ = tx.send(ProbeEvent::Ready(false));
                        }
                    }
                }
                tokio::time::sleep(probe.period).await;
            }
        };
        let liveness = async {
            let Some(probe) = &self.liveness else {
                return;
            };
            tokio::time::sleep_until(start + probe.initial_delay).await;
            let mut failures = 0;
            loop {
                match check(&probe.action, probe.timeout).await {
                    Ok(()) => failures = 0,
                    Err(message) => {
                        failures += 1;
                        let _ = tx.send(ProbeEvent::Unhealthy {
                            probe: "Liveness",
                            message: message.clone(),
                        });
                        if failures >= probe.failure_threshold {
                            let _ = tx.send(ProbeEvent::Failed {
                                probe: "Liveness",
                                message,
                            });
                            return;
                        }
                    }
                }
                tokio::time::sleep(probe.period).await;
            }
        };
        tokio::join!(readiness, liveness);
    }
}

fn seconds(value: Option<i32>, default: i32) -> Duration {
    Duration::from_secs(u64::try_from(value.unwrap_or(default).max(0)).unwrap_or_default())
}

fn settings(
    container: &Container,
    kind: &str,
    probe: &Probe,
    pod_ip: Ipv4Addr,
) -> Result<Settings, KubeletError> {
    let unsupported = |what: &str| {
        KubeletError::pod(
            UNSUPPORTED,
            format!(
                "container {}: {kind} probe: {what}; llmo-kubelet runs httpGet (HTTP) and tcpSocket probes only",
                container.name
            ),
        )
    };
    let port = |port: &IntOrString| -> Result<u16, KubeletError> {
        let number = match port {
            IntOrString::Int(n) => *n,
            IntOrString::String(name) => match name.parse::<i32>() {
                Ok(n) => n,
                Err(_) => container
                    .ports
                    .iter()
                    .flatten()
                    .find(|p| p.name.as_deref() == Some(name.as_str()))
                    .map(|p| p.container_port)
                    .ok_or_else(|| {
                        KubeletError::pod(
                            UNSUPPORTED,
                            format!(
                                "container {}: {kind} probe: no container port is named {name}",
                                container.name
                            ),
                        )
                    })?,
            },
        };
        u16::try_from(number)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| {
                KubeletError::pod(
                    UNSUPPORTED,
                    format!(
                        "container {}: {kind} probe: port {number} is out of range",
                        container.name
                    ),
                )
            })
    };
    let action = if let Some(http) = &probe.http_get {
        if http
            .scheme
            .as_deref()
            .is_some_and(|s| !s.eq_ignore_ascii_case("HTTP"))
        {
            return Err(unsupported("scheme HTTPS"));
        }
        let path = http.path.clone().unwrap_or_else(|| "/".to_owned());
        Action::Http {
            host: http
                .host
                .clone()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| pod_ip.to_string()),
            port: port(&http.port)?,
            path: if path.starts_with('/') {
                path
            } else {
                format!("/{path}")
            },
            headers: http
                .http_headers
                .iter()
                .flatten()
                .map(|h| (h.name.clone(), h.value.clone()))
                .collect(),
        }
    } else if let Some(tcp) = &probe.tcp_socket {
        Action::Tcp {
            host: tcp
                .host
                .clone()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| pod_ip.to_string()),
            port: port(&tcp.port)?,
        }
    } else if probe.exec.is_some() {
        return Err(unsupported("exec probes cannot run in a process kubelet"));
    } else {
        return Err(unsupported("no handler (httpGet or tcpSocket) is given"));
    };
    let success_threshold = probe.success_threshold.unwrap_or(1).max(1);
    Ok(Settings {
        action,
        initial_delay: seconds(probe.initial_delay_seconds, 0),
        period: seconds(probe.period_seconds, 10).max(Duration::from_secs(1)),
        timeout: seconds(probe.timeout_seconds, 1).max(Duration::from_secs(1)),
        success_threshold: u32::try_from(success_threshold).unwrap_or(1),
        failure_threshold: u32::try_from(probe.failure_threshold.unwrap_or(3).max(1)).unwrap_or(3),
    })
}

async fn check(action: &Action, timeout: Duration) -> Result<(), String> {
    match action {
        Action::Tcp { host, port } => {
            match tokio::time::timeout(timeout, TcpStream::connect((host.as_str(), *port))).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(format!("dial tcp {host}:{port}: {e}")),
                Err(_) => Err(format!("dial tcp {host}:{port}: i/o timeout")),
            }
        }
        Action::Http {
            host,
            port,
            path,
            headers,
        } => {
            let url = format!("http://{host}:{port}{path}");
            match tokio::time::timeout(timeout, http_status(host, *port, path, headers)).await {
                Ok(Ok(code)) if (200..400).contains(&code) => Ok(()),
                Ok(Ok(code)) => Err(format!("HTTP probe failed with statuscode: {code}")),
                Ok(Err(e)) => Err(format!("Get {url:?}: {e}")),
                Err(_) => Err(format!(
                    "Get {url:?}: context deadline exceeded (Client.Timeout exceeded while awaiting headers)"
                )),
            }
        }
    }
}

/// The status code of `GET path`.
async fn http_status(
    host: &str,
    port: u16,
    path: &str,
    headers: &[(String, String)],
) -> std::io::Result<u16> {
    let mut stream = TcpStream::connect((host, port)).await?;
    let mut request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: kube-probe/1.20\r\nAccept: */*\r\nConnection: close\r\n"
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut head = Vec::with_capacity(256);
    let mut buf = [0u8; 256];
    while !head.contains(&b'\n') && head.len() < 4096 {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    line.lines()
        .next()
        .filter(|l| l.starts_with("HTTP/"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other("malformed HTTP response"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(probe: serde_json::Value) -> Container {
        serde_json::from_value(serde_json::json!({
            "name": "c",
            "ports": [{"name": "http", "containerPort": 8000}],
            "readinessProbe": probe,
        }))
        .unwrap()
    }

    #[test]
    fn probes_resolve_named_ports_and_refuse_exec() {
        let ip = Ipv4Addr::new(127, 0, 0, 10);
        let p = Probes::of(
            &container(serde_json::json!({"httpGet": {"path": "ready", "port": "http"}, "periodSeconds": 2})),
            ip,
        )
        .unwrap();
        let r = p.readiness.unwrap();
        assert_eq!(
            r.action,
            Action::Http {
                host: "127.0.0.10".into(),
                port: 8000,
                path: "/ready".into(),
                headers: vec![]
            }
        );
        assert_eq!((r.period, r.failure_threshold), (Duration::from_secs(2), 3));
        let err = Probes::of(
            &container(serde_json::json!({"exec": {"command": ["true"]}})),
            ip,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("exec probes cannot run"), "{err}");
        let err = Probes::of(
            &container(serde_json::json!({"tcpSocket": {"port": "grpc"}})),
            ip,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("no container port is named grpc"), "{err}");
    }
}
