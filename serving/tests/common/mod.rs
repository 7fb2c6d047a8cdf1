//! Shared by the integration tests: where the real model is, and a server process.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The SmolLM2-135M-Instruct GGUF: `LLMO_TEST_MODEL`, or where scripts/fetch-model.sh puts it.
pub fn model_path() -> PathBuf {
    let p = match std::env::var_os("LLMO_TEST_MODEL") {
        Some(p) => PathBuf::from(p),
        None => {
            let cache = std::env::var_os("LLMO_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/llmo")
                });
            cache.join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
        }
    };
    assert!(
        p.is_file(),
        "test model not found at {}: run scripts/fetch-model.sh (or set LLMO_TEST_MODEL)",
        p.display()
    );
    p
}

/// A running `llmo-serve` on a free port, killed on drop.
pub struct Server {
    pub child: Child,
    _serial: std::sync::MutexGuard<'static, ()>,
    pub base: String,
    pub stderr_log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Server {
    pub fn start(extra: &[&str]) -> Self {
        // One server at a time: they share two cores, and timing-based checks need them.
        static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let port = free_port();
        let mut child = Command::new(env!("CARGO_BIN_EXE_llmo-serve"))
            .arg("--model")
            .arg(model_path())
            .args([
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--served-name",
                "smollm2",
            ])
            .args(["--kv-cache-tokens", "65536", "--threads", "1"])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start llmo-serve");
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                log2.lock().unwrap().push_str(&line);
                log2.lock().unwrap().push('\n');
            }
        });
        let base = format!("http://127.0.0.1:{port}");
        let server = Self {
            child,
            _serial: serial,
            base,
            stderr_log: log,
        };
        server.wait_ready();
        server
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        let client = raw_http::Client;
        loop {
            if let Ok(r) = client.get(format!("{}/ready", self.base)).send() {
                if r.status() == 200 {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "llmo-serve not ready after 120 s; log:\n{}",
                self.stderr_log.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A tiny blocking GET, used only while waiting for readiness (before any async runtime).
pub mod raw_http {
    pub struct Client;
    pub struct Req(String);
    pub struct Resp(u16);
    impl Client {
        pub fn get(&self, url: String) -> Req {
            Req(url)
        }
    }
    impl Req {
        pub fn send(self) -> std::io::Result<Resp> {
            use std::io::{Read, Write};
            let rest = self.0.trim_start_matches("http://");
            let (host, path) = rest.split_once('/').unwrap();
            let mut s = std::net::TcpStream::connect(host)?;
            write!(
                s,
                "GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
            )?;
            let mut buf = String::new();
            s.read_to_string(&mut buf)?;
            let code = buf
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .unwrap_or(0);
            Ok(Resp(code))
        }
    }
    impl Resp {
        pub fn status(&self) -> u16 {
            self.0
        }
    }
}
