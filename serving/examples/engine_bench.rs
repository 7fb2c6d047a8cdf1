//! Measures engine throughput on a GGUF model without HTTP: N concurrent greedy requests with a
//! fixed prompt, reporting output tokens per second.
//!
//! `cargo run --release -p llmo-serve --example engine_bench -- MODEL.gguf [quantization] [threads] [concurrency...]`

use std::sync::Arc;
use std::time::Instant;

use llmo_serve::engine::{EngineConfig, EngineHandle, Event, SamplingParams};
use llmo_serve::metrics::Metrics;
use llmo_serve::model::{load, Quantization};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let path = args
        .get(1)
        .expect("usage: engine_bench MODEL.gguf [quantization] [threads] [concurrency...]");
    let q: Quantization = args
        .get(2)
        .map(|s| s.parse().unwrap())
        .unwrap_or(Quantization::Auto);
    let threads: usize = args.get(3).map(|s| s.parse().unwrap()).unwrap_or(1);
    let levels: Vec<usize> = if args.len() > 4 {
        args[4..].iter().map(|s| s.parse().unwrap()).collect()
    } else {
        vec![1, 16]
    };
    llmo_serve::set_compute_threads(threads);
    let t0 = Instant::now();
    let loaded = load(std::path::Path::new(path), q, 4096, threads).unwrap();
    println!(
        "loaded {} ({q}) in {:.2}s, weights {} MiB",
        path,
        t0.elapsed().as_secs_f64(),
        loaded.model.weight_bytes() >> 20
    );
    let e = EngineHandle::start(
        loaded,
        EngineConfig {
            block_size: 16,
            num_blocks: 4096,
            max_batch_tokens: 512,
            max_running: 64,
            max_waiting: 256,
            context_length: 4096,
        },
        Arc::new(Metrics::new()),
    )
    .unwrap();
    let prompt = e.tokenizer.encode("<|im_start|>user\nWrite a short story about a robot who learns to paint.<|im_end|>\n<|im_start|>assistant\n");
    for &c in &levels {
        let t = Instant::now();
        let mut handles = Vec::new();
        for i in 0..c {
            let params = SamplingParams {
                temperature: 0.8,
                seed: Some(i as u64),
                max_tokens: 128,
                ..Default::default()
            };
            let mut rx = e.submit(format!("b{i}"), prompt.clone(), params).unwrap();
            handles.push(tokio::spawn(async move {
                let start = Instant::now();
                let mut first = None;
                let mut n = 0;
                while let Some(ev) = rx.recv().await {
                    match ev {
                        Event::Delta(_) => {
                            first.get_or_insert(start.elapsed());
                        }
                        Event::Done { usage, .. } => {
                            n = usage.completion_tokens;
                            break;
                        }
                        Event::Error(err) => panic!("{err}"),
                    }
                }
                (n, first.unwrap_or_default())
            }));
        }
        let mut total = 0;
        let mut ttft = Vec::new();
        for h in handles {
            let (n, f) = h.await.unwrap();
            total += n;
            ttft.push(f.as_secs_f64());
        }
        let secs = t.elapsed().as_secs_f64();
        ttft.sort_by(f64::total_cmp);
        println!(
            "concurrency {c:>3}: {total} tokens in {secs:.2}s = {:.1} tok/s; TTFT p50 {:.3}s",
            total as f64 / secs,
            ttft[ttft.len() / 2]
        );
    }
}
