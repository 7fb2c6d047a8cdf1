//! What tensor and pipeline parallelism cost on this machine: decode time per step of each
//! layout, with its ranks connected over TCP on loopback, against the whole model in one rank,
//! and the weights each rank holds against the whole model's.
//!
//! `cargo run --release -p llmo-serve --example parallel_bench -- MODEL.gguf [batch...]`
//! (`make bench-parallel`). Every rank is a thread with one compute thread of its own, so a
//! layout with more ranks than cores also shares the cores: the ratios are what a group pays on
//! this machine, communication and all, not a speed-up estimate for one GPU per rank.

use std::sync::Arc;
use std::time::{Duration, Instant};

use llmo_serve::dist::{join_tcp, Communicator};
use llmo_serve::engine::group::{follow, Leader};
use llmo_serve::engine::sampling::argmax;
use llmo_serve::kv::KvStorage;
use llmo_serve::model::gguf::GgufFile;
use llmo_serve::model::shard::Layout;
use llmo_serve::model::{LlamaConfig, LlamaModel, Quantization, StepInput};

const PROMPT: usize = 32;
const STEPS: usize = 32;
const BLOCK: usize = 16;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// Weights of every rank, and a way to step rank 0 over the group.
enum Runner {
    Single(LlamaModel, KvStorage),
    Group(Leader),
}

impl Runner {
    fn step(&mut self, inputs: &[StepInput<'_>]) -> Vec<Vec<f32>> {
        match self {
            Self::Single(m, kv) => m.step(inputs, kv).expect("step"),
            Self::Group(l) => l.step(inputs, false).expect("step"),
        }
    }
}

fn start(
    g: &Arc<GgufFile>,
    cfg: &LlamaConfig,
    layout: Layout,
    blocks: usize,
) -> (Runner, Vec<usize>) {
    let load = |rank: usize| {
        LlamaModel::shard_from_gguf(g, Quantization::Auto, 1024, 1, layout.shard(rank, cfg))
            .expect("load shard")
    };
    if layout.world() == 1 {
        let m = load(0);
        let kv = KvStorage::new(m.local_layers(), blocks, BLOCK, m.kv_slot_stride());
        let w = m.weight_bytes();
        return (Runner::Single(m, kv), vec![w]);
    }
    let peers: Vec<String> = (0..layout.world())
        .map(|_| format!("127.0.0.1:{}", free_port()))
        .collect();
    let model = load(0);
    let mut weights = vec![model.weight_bytes()];
    for rank in 1..layout.world() {
        let model = load(rank);
        weights.push(model.weight_bytes());
        let peers = peers.clone();
        std::thread::spawn(move || {
            let comm: Arc<dyn Communicator> =
                join_tcp(&peers, rank, layout.world(), Duration::from_secs(30))
                    .expect("join")
                    .remove(0);
            let _ = follow(model, comm, layout);
        });
    }
    let comm = join_tcp(&peers, 0, layout.world(), Duration::from_secs(30))
        .expect("join")
        .remove(0);
    let leader = Leader::start(model, comm, layout, blocks, BLOCK).expect("start");
    (Runner::Group(leader), weights)
}

/// Seconds per decode step of `batch` sequences after a prefill of [`PROMPT`] tokens each.
fn decode_step_time(r: &mut Runner, batch: usize, vocab: usize) -> f64 {
    let per_seq = (PROMPT + STEPS + 1).div_ceil(BLOCK);
    let tables: Vec<Vec<u32>> = (0..batch)
        .map(|b| ((b * per_seq) as u32..((b + 1) * per_seq) as u32).collect())
        .collect();
    let prompts: Vec<Vec<u32>> = (0..batch)
        .map(|b| {
            (0..PROMPT)
                .map(|i| ((b * 7919 + i * 104_729) % vocab) as u32)
                .collect()
        })
        .collect();
    let inputs: Vec<StepInput<'_>> = (0..batch)
        .map(|b| StepInput {
            tokens: &prompts[b],
            start: 0,
            block_table: &tables[b],
            want_logits: true,
        })
        .collect();
    let logits = r.step(&inputs);
    let mut next: Vec<[u32; 1]> = logits.iter().map(|l| [argmax(l)]).collect();
    let t = Instant::now();
    for s in 0..STEPS {
        let inputs: Vec<StepInput<'_>> = (0..batch)
            .map(|b| StepInput {
                tokens: &next[b],
                start: PROMPT + s,
                block_table: &tables[b],
                want_logits: true,
            })
            .collect();
        let logits = r.step(&inputs);
        next = logits.iter().map(|l| [argmax(l)]).collect();
    }
    t.elapsed().as_secs_f64() / STEPS as f64
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let path = args
        .get(1)
        .expect("usage: parallel_bench MODEL.gguf [batch...]");
    let batches: Vec<usize> = if args.len() > 2 {
        args[2..]
            .iter()
            .map(|s| s.parse().expect("batch"))
            .collect()
    } else {
        vec![1, 8]
    };
    llmo_serve::set_compute_threads(1);
    let g = Arc::new(GgufFile::open(std::path::Path::new(path)).expect("open"));
    let cfg = LlamaConfig::from_gguf(&g).expect("config");
    let layouts = [
        Layout::SINGLE,
        Layout { tp: 1, pp: 2 },
        Layout { tp: 3, pp: 1 },
        Layout { tp: 3, pp: 2 },
    ];
    let max_batch = batches.iter().copied().max().unwrap_or(1);
    let blocks = max_batch * (PROMPT + STEPS + 1).div_ceil(BLOCK);
    let mut single_times = Vec::new();
    let mut single_weights = 0usize;
    println!(
        "decode step time over TCP on loopback ({} layers, {STEPS} steps after a {PROMPT}-token prefill; ranks are threads, 1 compute thread each)\n",
        cfg.n_layers
    );
    let mut header = format!("{:<10} {:>5}", "layout", "ranks");
    for b in &batches {
        header += &format!(" {:>13} {:>8}", format!("ms/step b={b}"), "÷ single");
    }
    header += &format!(
        " {:>16} {:>10} {:>8}",
        "max weights MiB", "÷ single", "goal"
    );
    println!("{header}");
    for layout in layouts {
        layout.check(&cfg).expect("layout");
        let (mut runner, weights) = start(&g, &cfg, layout, blocks);
        let mut line = format!(
            "{:<10} {:>5}",
            format!("TP{}×PP{}", layout.tp, layout.pp),
            layout.world()
        );
        for (i, &b) in batches.iter().enumerate() {
            let t = decode_step_time(&mut runner, b, cfg.vocab);
            if layout.world() == 1 {
                single_times.push(t);
            }
            line += &format!(" {:>13.1} {:>7.2}×", t * 1e3, t / single_times[i]);
        }
        let max_w = weights.iter().copied().max().unwrap_or(0);
        if layout.world() == 1 {
            single_weights = max_w;
        }
        let share = max_w as f64 / single_weights as f64;
        let goal = 1.0 / layout.tp as f64 + 0.05;
        line += &format!(
            " {:>16.1} {:>10.3} {:>8}",
            max_w as f64 / (1 << 20) as f64,
            share,
            if layout.pp == 1 {
                format!("≤{goal:.3}")
            } else {
                "-".into()
            }
        );
        println!("{line}");
        drop(runner);
        std::thread::sleep(Duration::from_millis(200));
    }
}
