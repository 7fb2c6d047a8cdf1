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

/// A loopback port free right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Server {
    /// Serves the test model.
    pub fn start(extra: &[&str]) -> Self {
        Self::start_model(&model_path(), extra)
    }

    /// Serves `model` (a GGUF file or a checkpoint directory).
    pub fn start_model(model: &std::path::Path, extra: &[&str]) -> Self {
        // One server at a time: they share two cores, and timing-based checks need them.
        static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let port = free_port();
        let mut child = Command::new(env!("CARGO_BIN_EXE_llmo-serve"))
            .arg("--model")
            .arg(model)
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
        let addr = self.base.trim_start_matches("http://");
        loop {
            if let Ok((200, _)) = http(addr, "GET", "/ready", "") {
                return;
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

/// One blocking HTTP/1.1 request with a JSON body to `addr` (HOST:PORT), connection closed
/// after: the status code and the body. For use outside an async runtime.
pub fn http(addr: &str, method: &str, path: &str, body: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let code = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((code, body))
}

/// Greedy text of `prompt` from the engine, at most `max_tokens` tokens.
pub async fn generate(
    e: &llmo_serve::engine::EngineHandle,
    prompt: Vec<u32>,
    max_tokens: usize,
) -> String {
    use llmo_serve::engine::{Event, SamplingParams};
    let params = SamplingParams {
        temperature: 0.0,
        max_tokens,
        ..Default::default()
    };
    let mut rx = e.submit("t".into(), prompt, params).unwrap();
    let mut text = String::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Delta(d) => text.push_str(&d),
            Event::Done { .. } => return text,
            Event::Error(err) => panic!("engine error: {err}"),
        }
    }
    panic!("engine dropped the request")
}

/// Perplexity of `tokens` given `logits[i]`, the next-token logits after token `i`.
pub fn perplexity_of(logits: &[Vec<f32>], tokens: &[u32]) -> f64 {
    let mut nll = 0.0;
    for (l, &next) in logits.iter().zip(&tokens[1..]) {
        let max = l.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = max + l.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
        nll += lse - l[next as usize] as f64;
    }
    (nll / (tokens.len() - 1) as f64).exp()
}

/// The first 128 tokens of the fixed text the quantization tests measure perplexity on.
pub fn prompt_tokens(tk: &llmo_serve::tokenizer::Tokenizer) -> Vec<u32> {
    let mut t = tk.encode(include_str!("../data/perplexity.txt"));
    t.truncate(128);
    t
}

/// Rank `rank`'s shard of `layout`.
pub fn shard(
    g: &llmo_serve::model::gguf::GgufFile,
    q: llmo_serve::model::Quantization,
    layout: llmo_serve::model::shard::Layout,
    rank: usize,
) -> llmo_serve::model::LlamaModel {
    let cfg = llmo_serve::model::LlamaConfig::from_gguf(g).unwrap();
    layout.check(&cfg).unwrap();
    llmo_serve::model::LlamaModel::shard_from_gguf(g, q, 1024, 1, layout.shard(rank, &cfg)).unwrap()
}

/// Starts ranks 1.. of `layout` as threads and returns rank 0's leader over them.
pub fn group(
    g: &std::sync::Arc<llmo_serve::model::gguf::GgufFile>,
    q: llmo_serve::model::Quantization,
    layout: llmo_serve::model::shard::Layout,
    num_blocks: usize,
) -> llmo_serve::engine::group::Leader {
    use llmo_serve::dist::Communicator;
    let comms = llmo_serve::dist::local_group(layout.world());
    for (rank, comm) in comms.iter().enumerate().skip(1) {
        let model = shard(g, q, layout, rank);
        let comm: std::sync::Arc<dyn Communicator> = comm.clone();
        std::thread::spawn(move || {
            llmo_serve::engine::group::follow(model, comm, layout).expect("rank failed")
        });
    }
    llmo_serve::engine::group::Leader::start(
        shard(g, q, layout, 0),
        comms[0].clone(),
        layout,
        num_blocks,
        16,
    )
    .unwrap()
}

/// Next-token logits after every token of `tokens`, from one prefill of a fresh KV cache.
pub fn logits_of(model: &llmo_serve::model::LlamaModel, tokens: &[u32]) -> Vec<Vec<f32>> {
    let table: Vec<u32> = (0..tokens.len().div_ceil(16) as u32).collect();
    let mut kv = llmo_serve::kv::KvStorage::new(
        model.local_layers(),
        table.len(),
        16,
        model.kv_slot_stride(),
    );
    model
        .logits_all(
            llmo_serve::model::StepInput {
                tokens,
                start: 0,
                block_table: &table,
                want_logits: true,
            },
            &mut kv,
        )
        .unwrap()
}

/// One greedy, non-streamed chat completion of `question` against the server at `addr`
/// (HOST:PORT): the parsed response, after checking it is a 200.
pub fn chat(addr: &str, question: &str, max_tokens: usize) -> serde_json::Value {
    let body = serde_json::json!({
        "model": "smollm2",
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
    });
    let (code, resp) = http(addr, "POST", "/v1/chat/completions", &body.to_string()).unwrap();
    assert_eq!(code, 200, "{resp}");
    serde_json::from_str(&resp).unwrap()
}
