//! `llmo-testserver`: a tiny HTTP server that tests run as pods under `llmo-kubelet`.
//!
//! Routes (GET): `/` (its name), `/healthz` (200), `/ready` (200 when ready, else 503),
//! `/ready/set?value=true|false`, `/exit?code=N` (answers, then exits with N), `/env` (every
//! variable, `K=V` lines), `/env?name=K` (one, 404 when unset), `/args` (one per line), `/cwd`,
//! `/file?path=P` (the file's contents). Each request is logged on stdout; on SIGTERM it logs
//! `received SIGTERM` and exits after `--term-delay-ms`.

use std::{
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use clap::Parser;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// A tiny HTTP server for kubelet tests.
#[derive(Debug, Parser)]
#[command(name = "llmo-testserver")]
struct Args {
    /// Address to listen on.
    #[arg(long)]
    listen: String,
    /// Name it answers `/` with [default: $HOSTNAME].
    #[arg(long)]
    name: Option<String>,
    /// Start not ready (`/ready/set?value=true` makes it ready).
    #[arg(long)]
    not_ready: bool,
    /// Ready only while this file exists.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Milliseconds to wait after SIGTERM before exiting.
    #[arg(long, default_value_t = 0)]
    term_delay_ms: u64,
    /// Exit on its own after this many milliseconds (a crashing container).
    #[arg(long)]
    exit_after_ms: Option<u64>,
    /// Exit code of `--exit-after-ms`.
    #[arg(long, default_value_t = 1)]
    exit_code: i32,
    /// Ignored: lets tests find their processes.
    #[arg(long)]
    tag: Option<String>,
    /// Further arguments, echoed by `/args`.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    rest: Vec<String>,
}

#[derive(Debug)]
struct State {
    name: String,
    ready: AtomicBool,
    ready_file: Option<PathBuf>,
}

fn query<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn handle(mut stream: TcpStream, state: Arc<State>) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16384 {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&head);
    let target = text.split_whitespace().nth(1).unwrap_or("/").to_owned();
    println!("request GET {target}");
    let (path, q) = target.split_once('?').unwrap_or((&target, ""));
    let mut exit = None;
    let (code, body) = match path {
        "/" => (200, state.name.clone()),
        "/healthz" => (200, "ok".to_owned()),
        "/ready" => {
            let ready = state.ready.load(Ordering::SeqCst)
                && state.ready_file.as_ref().is_none_or(|f| f.exists());
            if ready {
                (200, "ready".to_owned())
            } else {
                (503, "not ready".to_owned())
            }
        }
        "/ready/set" => {
            let value = query(q, "value") == Some("true");
            state.ready.store(value, Ordering::SeqCst);
            println!("ready set to {value}");
            (200, value.to_string())
        }
        "/exit" => {
            let code: i32 = query(q, "code").and_then(|c| c.parse().ok()).unwrap_or(0);
            exit = Some(code);
            (200, format!("exiting with {code}"))
        }
        "/env" => match query(q, "name") {
            Some(name) => match std::env::var(decode(name)) {
                Ok(v) => (200, v),
                Err(_) => (404, format!("{name} is not set")),
            },
            None => {
                let mut vars: Vec<String> =
                    std::env::vars().map(|(k, v)| format!("{k}={v}")).collect();
                vars.sort();
                (200, vars.join("\n"))
            }
        },
        "/args" => (200, std::env::args().skip(1).collect::<Vec<_>>().join("\n")),
        "/cwd" => (
            200,
            std::env::current_dir()
                .map(|d| d.display().to_string())
                .unwrap_or_default(),
        ),
        "/file" => match std::fs::read_to_string(decode(query(q, "path").unwrap_or(""))) {
            Ok(content) => (200, content),
            Err(e) => (404, e.to_string()),
        },
        _ => (404, "not found".to_owned()),
    };
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        _ => "Service Unavailable",
    };
    let response = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.flush().await?;
    if let Some(code) = exit {
        println!("exiting with {code} as asked");
        std::process::exit(code);
    }
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = Args::parse();
    let listener = match TcpListener::bind(&args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("llmo-testserver: cannot listen on {}: {e}", args.listen);
            std::process::exit(3);
        }
    };
    println!("listening on {}", args.listen);
    let state = Arc::new(State {
        name: args
            .name
            .clone()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_else(|| "llmo-testserver".to_owned()),
        ready: AtomicBool::new(!args.not_ready),
        ready_file: args.ready_file.clone(),
    });
    if let Some(ms) = args.exit_after_ms {
        let code = args.exit_code;
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            println!("exiting with {code} after {ms} ms");
            std::process::exit(code);
        });
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                if let Ok((stream, _)) = accepted {
                    let state = state.clone();
                    tokio::spawn(async move {
                        let _ = handle(stream, state).await;
                    });
                }
            }
            _ = term.recv() => {
                println!("received SIGTERM");
                tokio::time::sleep(Duration::from_millis(args.term_delay_ms)).await;
                println!("exiting after SIGTERM");
                std::process::exit(0);
            }
        }
    }
}
