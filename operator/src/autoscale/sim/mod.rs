//! The fleet simulator: replays a request trace against simulated replicas under six scaling
//! strategies, llmo's own policy among them (the same [`crate::autoscale::decide`] the operator
//! runs), and reports SLO attainment, GPU-hours, cost and reaction to bursts.
//!
//! Replicas follow a roofline step-time model fitted to published measurements
//! ([`latency::fit`]) and simulate continuous batching step by step ([`replica`]). Everything is
//! seeded, so a run is reproducible to the byte.

pub mod cluster;
pub mod fleet;
pub mod latency;
pub mod replica;
pub mod report;
pub mod rng;
pub mod scalers;
pub mod trace;

use std::{path::PathBuf, process::ExitCode};

use self::{
    cluster::Cluster,
    fleet::Fleet,
    latency::{FitReport, LatencyModel},
    replica::{EngineLimits, Outcome, Replica},
    report::{RunResult, Summary},
    rng::Rng,
    scalers::{Knowledge, Scaler},
    trace::Request,
};
use crate::autoscale::PolicyConfig;

/// Errors of the simulator.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// A file could not be read or written.
    #[error("{path}: {message}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        message: String,
    },
    /// A CSV row could not be read.
    #[error("{path}, line {line}: {message}")]
    Csv {
        /// The file.
        path: PathBuf,
        /// 1-based line (0: the whole file).
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// A command-line value is out of range.
    #[error("{message}")]
    Args {
        /// What is wrong and what is accepted.
        message: String,
    },
    /// The fleet file is wrong.
    #[error("fleet file: {message}")]
    Fleet {
        /// What is wrong and how to fix it.
        message: String,
    },
}

/// `llmo-operator simulate`: replay a trace against a simulated fleet.
#[derive(Debug, Clone, clap::Args)]
pub struct SimulateArgs {
    /// Fleet file (node pools, the deployment, its plan and SLO), e.g. examples/fleet/llama2-70b-h100.yaml.
    #[arg(long)]
    pub fleet: PathBuf,
    /// Request trace, `TIMESTAMP,ContextTokens,GeneratedTokens` (the Azure 2023 traces).
    #[arg(long)]
    pub trace: PathBuf,
    /// Multiply the request rate.
    #[arg(long, default_value_t = 1.0)]
    pub rate_scale: f64,
    /// Instead of replaying the trace, synthesize a diurnal run of this length (e.g. 24h) with
    /// the trace's lengths and minute-scale burstiness.
    #[arg(long)]
    pub diurnal: Option<crate::api::HumanDuration>,
    /// Seed of every random choice.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Measurements the latency model is fitted to.
    #[arg(long, default_value = "data/splitwise-perf-model.csv")]
    pub perf_model: PathBuf,
    /// Directory for the table, timeline CSV and SVG plot.
    #[arg(long, default_value = "sim-out")]
    pub out: PathBuf,
    /// Also run each strategy over a range of its main setting (HPA's and the planner's
    /// utilization target, KEDA's requests per replica, ...) and compare GPU-hours at equal SLO
    /// attainment: writes sweep.md and sweep.svg.
    #[arg(long)]
    pub sweep: bool,
    /// Give llmo's policy a prior capacity this many times the calibrated one, as when the
    /// planner's latency model is off: shows how the estimate follows the SLO.
    #[arg(long, default_value_t = 1.0)]
    pub prior_error: f64,
    /// Also run llmo's policy in `external` mode, its recommendation followed by KEDA's HPA
    /// (`llmo-via-keda`: 15 s sync on a 15 s old value, tolerance 0.1), as
    /// examples/autoscaling/keda-scaledobject.yaml sets it up.
    #[arg(long)]
    pub external: bool,
}

/// Everything one simulation produced.
#[derive(Debug)]
pub struct Simulation {
    /// The latency model's fit.
    pub fit: FitReport,
    /// Calibrated capacity of one replica, tokens per second within the SLO.
    pub capacity: f64,
    /// One row per strategy.
    pub summaries: Vec<Summary>,
    /// The full runs, for the timeline and plot.
    pub runs: Vec<RunResult>,
    /// Burst onsets found in the demand, seconds.
    pub bursts: Vec<f64>,
    /// Length of the run, seconds.
    pub duration: f64,
    /// Demand per 10 s bin, tokens per second.
    pub demand_10: Vec<f64>,
}

/// Entry point of the subcommand.
pub fn main(args: SimulateArgs) -> ExitCode {
    let started = std::time::Instant::now();
    let setup = match Setup::new(&args) {
        Ok(setup) => setup,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let sim = compare(&setup);
    let table = report::table(&sim);
    println!("{table}");
    let files = [
        ("table.md", table),
        ("timeline.csv", report::timeline_csv(&sim)),
        ("timeline.svg", report::svg(&sim)),
        ("decisions.csv", report::decisions_csv(&sim)),
    ];
    if !write_outputs(&args.out, &files, started) {
        return ExitCode::FAILURE;
    }
    if args.sweep {
        let Some(reference) = sim.summaries.iter().find(|s| s.name == "llmo-slo") else {
            eprintln!("error: the comparison has no llmo-slo run to sweep against");
            return ExitCode::FAILURE;
        };
        let points = sweep(&setup);
        let text = report::sweep_table(&points, reference);
        println!("{text}");
        let files = [
            ("sweep.md", text),
            ("sweep.svg", report::sweep_svg(&points, reference)),
        ];
        if !write_outputs(&args.out, &files, started) {
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}

/// Writes `files` (name, contents) into `dir` and says so; on failure prints the error and
/// returns false.
fn write_outputs(
    dir: &std::path::Path,
    files: &[(&str, String)],
    started: std::time::Instant,
) -> bool {
    let written = std::fs::create_dir_all(dir).and_then(|()| {
        files
            .iter()
            .try_for_each(|(name, text)| std::fs::write(dir.join(name), text))
    });
    match written {
        Ok(()) => {
            let names: Vec<&str> = files.iter().map(|(n, _)| *n).collect();
            println!(
                "wrote {} into {} after {:.1}s",
                names.join(", "),
                dir.display(),
                started.elapsed().as_secs_f64()
            );
            true
        }
        Err(e) => {
            eprintln!("error: {}: {e}", dir.display());
            false
        }
    }
}

/// One strategy at one setting of a sweep.
#[derive(Debug, Clone)]
pub struct SweepPoint {
    /// The setting, in words.
    pub setting: String,
    /// How it did.
    pub summary: Summary,
}

/// Every strategy over a range of its main setting, in order of strategy then setting: static
/// provisioning, HPA, KEDA and the planner toward tighter and looser targets, and llmo's policy
/// at several utilization targets; the oracle too, as a lower bound at each attainment.
pub fn sweep(setup: &Setup) -> Vec<SweepPoint> {
    let k = &setup.knowledge;
    let mut scalers = Vec::new();
    for u in [0.6, 0.7, 0.8, 0.9, 1.0, 1.1] {
        scalers.push(Scaler::Static { utilization: u });
    }
    for t in [0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95] {
        scalers.push(Scaler::hpa(t));
    }
    for f in [0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.2] {
        scalers.push(Scaler::keda(f * k.concurrency));
    }
    for u in [0.5, 0.6, 0.7, 0.8, 0.9, 1.0] {
        scalers.push(Scaler::Planner { utilization: u });
    }
    for u in [0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95] {
        let cfg = PolicyConfig {
            utilization_target: u,
            ..setup.policy.clone()
        };
        scalers.push(Scaler::slo(cfg, setup.cold_start));
    }
    for u in [0.8, 0.85, 0.9, 0.95, 1.0] {
        scalers.push(Scaler::Oracle { utilization: u });
    }
    let settings: Vec<String> = scalers.iter().map(Scaler::setting).collect();
    setup
        .run_all(scalers)
        .iter()
        .zip(settings)
        .map(|(run, setting)| SweepPoint {
            setting,
            summary: setup.summarize(run),
        })
        .collect()
}

/// Everything a run of one strategy needs: the trace, the fitted replica model and what the
/// strategies may know in advance. Built once, shared by every run.
#[derive(Debug)]
pub struct Setup {
    /// The latency model's fit.
    pub fit: FitReport,
    /// The replica model.
    pub model: LatencyModel,
    /// The engine's batch limits.
    pub limits: EngineLimits,
    /// The requests, in arrival order.
    pub requests: Vec<Request>,
    /// What every strategy may know before the run.
    pub knowledge: Knowledge,
    /// llmo's policy as the fleet file configures it.
    pub policy: PolicyConfig,
    /// Seconds a new replica takes to serve.
    pub cold_start: f64,
    /// GPUs per replica.
    pub gpus: u32,
    /// Price of one GPU-hour.
    pub gpu_price: f64,
    /// TTFT target, seconds.
    pub ttft_target: f64,
    /// Inter-token latency target, seconds.
    pub itl_target: Option<f64>,
    /// Burst onsets found in the demand, seconds.
    pub bursts: Vec<f64>,
    /// Length of the run, seconds.
    pub duration: f64,
    /// Whether the comparison includes llmo in `external` mode behind KEDA.
    pub external: bool,
}

impl Setup {
    /// Loads the fleet and the trace, fits the latency model and calibrates one replica.
    pub fn new(args: &SimulateArgs) -> Result<Self, SimError> {
        if !(args.prior_error.is_finite() && args.prior_error > 0.0) {
            return Err(SimError::Args {
                message: format!(
                    "--prior-error {} must be a positive factor (1 is the calibrated capacity)",
                    args.prior_error
                ),
            });
        }
        let fleet = Fleet::load(&args.fleet)?;
        let d = fleet.deployment().clone();
        let fit = latency::fit(&args.perf_model, &d.calibration, &fleet.hardware)?;
        let model = LatencyModel::new(&fleet.arch, &fleet.hardware, d.tensor, fit.costs)?;
        let limits = EngineLimits {
            max_batch_tokens: d.max_batch_tokens,
            max_running: d.max_running,
        };
        let source = trace::load_azure(&args.trace)?;
        let mut rng = Rng::new(args.seed);
        let requests = match args.diurnal {
            Some(len) => {
                trace::diurnal(&source, len.get().as_secs_f64(), args.rate_scale, &mut rng)
            }
            None => trace::rate_scale(&source, args.rate_scale, &mut rng),
        };
        let duration = requests
            .last()
            .map(|r| r.arrival.ceil() + 1.0)
            .unwrap_or(1.0);
        let ttft_target = d.slo.ttft.get().as_secs_f64();
        let itl_target = d.slo.inter_token_latency.map(|x| x.get().as_secs_f64());
        let (capacity, concurrency) =
            calibrate(&model, limits, &source, ttft_target, itl_target, args.seed);
        tracing::info!(capacity, concurrency, "calibrated one replica");
        let (min, max) = fleet.bounds();
        let demand_10 = trace::demand_bins(&requests, 10.0, duration);
        let bursts = report::burst_onsets(&demand_10);
        let knowledge = Knowledge {
            capacity,
            concurrency,
            demand_60: trace::demand_bins(&requests, 60.0, duration),
            demand_10,
            utilization: d.slo.utilization,
            min,
            max,
        };
        let cold_start = d.cold_start.get().as_secs_f64();
        let policy = PolicyConfig {
            min,
            max,
            ttft_target,
            itl_target,
            utilization_target: d.slo.utilization,
            default_startup: cold_start,
            prior_capacity: Some(capacity * args.prior_error),
            ..PolicyConfig::default()
        };
        Ok(Self {
            fit,
            model,
            limits,
            bursts,
            requests,
            knowledge,
            policy,
            cold_start,
            gpus: d.tensor,
            gpu_price: fleet.replica_price() / f64::from(d.tensor),
            ttft_target,
            itl_target,
            duration,
            external: args.external,
        })
    }

    /// Replays the requests under one strategy.
    pub fn run(&self, scaler: Scaler) -> RunResult {
        let start = if matches!(scaler, Scaler::Oracle { .. }) {
            0.0
        } else {
            self.cold_start
        };
        run_strategy(
            scaler,
            &self.knowledge,
            &self.requests,
            &self.model,
            self.limits,
            start,
            self.gpus,
            self.duration,
        )
    }

    /// Scores a run.
    pub fn summarize(&self, run: &RunResult) -> Summary {
        report::summarize(
            run,
            &self.bursts,
            self.ttft_target,
            self.itl_target,
            self.gpu_price,
            self.duration,
        )
    }

    /// Runs `scalers`, two at a time, keeping their order.
    pub fn run_all(&self, scalers: Vec<Scaler>) -> Vec<RunResult> {
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .clamp(1, 2);
        let mut slots: Vec<Option<RunResult>> = Vec::new();
        slots.resize_with(scalers.len(), || None);
        let queue = std::sync::Mutex::new(scalers.into_iter().enumerate());
        let done = std::sync::Mutex::new(&mut slots);
        std::thread::scope(|scope| {
            for _ in 0..threads {
                scope.spawn(|| loop {
                    let next = queue.lock().map(|mut q| q.next()).ok().flatten();
                    let Some((i, scaler)) = next else { break };
                    let run = self.run(scaler);
                    if let Ok(mut slots) = done.lock() {
                        slots[i] = Some(run);
                    }
                });
            }
        });
        slots.into_iter().flatten().collect()
    }
}

/// Runs every strategy on the trace the arguments describe.
pub fn simulate(args: &SimulateArgs) -> Result<Simulation, SimError> {
    let setup = Setup::new(args)?;
    Ok(compare(&setup))
}

/// Runs every strategy at its default setting (and llmo behind KEDA when asked for).
pub fn compare(setup: &Setup) -> Simulation {
    let mut scalers = Scaler::defaults(&setup.knowledge, &setup.policy, setup.cold_start);
    if setup.external {
        scalers.push(Scaler::slo_via_keda(setup.policy.clone(), setup.cold_start));
    }
    let runs = setup.run_all(scalers);
    let summaries = runs.iter().map(|r| setup.summarize(r)).collect();
    Simulation {
        fit: setup.fit.clone(),
        capacity: setup.knowledge.capacity,
        summaries,
        runs,
        bursts: setup.bursts.clone(),
        duration: setup.duration,
        demand_10: setup.knowledge.demand_10.clone(),
    }
}

/// Replays `requests` under one strategy.
#[allow(clippy::too_many_arguments)]
fn run_strategy(
    mut scaler: Scaler,
    k: &Knowledge,
    requests: &[Request],
    model: &LatencyModel,
    limits: EngineLimits,
    cold_start: f64,
    gpus: u32,
    duration: f64,
) -> RunResult {
    let mut cluster = Cluster::new(scaler.initial(k), cold_start, k.max, gpus);
    let mut next = 0;
    let mut targets = Vec::new();
    let mut ready = Vec::new();
    let end = duration as u64;
    for second in 1..=end {
        let now = second as f64;
        while next < requests.len() && requests[next].arrival < now {
            let r = requests[next];
            cluster.advance(r.arrival, model, limits);
            cluster.route(r, r.arrival);
            next += 1;
        }
        cluster.advance(now, model, limits);
        cluster.sample(now);
        if scaler.period() != u64::MAX && second % scaler.period() == 0 {
            let target = scaler.decide(now, &cluster, k);
            cluster.set_target(target, now);
        }
        if second % 10 == 0 {
            targets.push(cluster.target);
            ready.push(cluster.ready(now));
        }
    }
    // Let in-flight requests finish for up to two minutes, then cut off.
    for second in end + 1..=end + 120 {
        cluster.advance(second as f64, model, limits);
    }
    cluster.finish((end + 120) as f64);
    let decisions = match &mut scaler {
        Scaler::Slo { decisions, .. } => std::mem::take(decisions),
        _ => Vec::new(),
    };
    RunResult {
        decisions,
        name: scaler.name(),
        gpu_hours: cluster.gpu_seconds / 3600.0,
        outcomes: std::mem::take(&mut cluster.outcomes),
        actions: cluster.actions.clone(),
        targets,
        ready,
    }
}

/// Finds the request rate one replica sustains within the SLO (p95 TTFT and p95 time per output
/// token at most their targets) by bisection over seeded 15-minute Poisson runs with the trace's
/// lengths. Returns (tokens per second in and out, mean outstanding requests) at that rate.
pub fn calibrate(
    model: &LatencyModel,
    limits: EngineLimits,
    source: &[Request],
    ttft: f64,
    itl: Option<f64>,
    seed: u64,
) -> (f64, f64) {
    let mean_tokens = source
        .iter()
        .map(|r| f64::from(r.prompt + r.output))
        .sum::<f64>()
        / source.len().max(1) as f64;
    let run = |rate: f64| -> (bool, f64) {
        let mut rng = Rng::new(seed ^ 0xCA1B);
        let mut replica = Replica::new("calibration".into(), 0.0, 0.0);
        let mut done: Vec<Outcome> = Vec::new();
        let horizon = 900.0;
        let mut t = 0.0;
        let mut outstanding_sum = 0.0f64;
        let mut samples = 0.0f64;
        let mut next_sample = 60.0;
        loop {
            t += -rng.uniform_open().ln() / rate;
            if t > horizon {
                break;
            }
            while next_sample < t {
                replica.advance(next_sample, model, limits, &mut done);
                outstanding_sum += replica.outstanding() as f64;
                samples += 1.0;
                next_sample += 1.0;
            }
            replica.advance(t, model, limits, &mut done);
            let r = source[rng.below(source.len())];
            replica.enqueue(Request { arrival: t, ..r });
        }
        replica.advance(horizon + 300.0, model, limits, &mut done);
        done.extend(replica.unfinished(horizon + 300.0));
        let measured: Vec<&Outcome> = done.iter().filter(|o| o.arrival >= 60.0).collect();
        let p95 = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v.get(((v.len() as f64) * 0.95) as usize)
                .copied()
                .unwrap_or(0.0)
        };
        let ok_ttft = p95(measured.iter().map(|o| o.ttft).collect()) <= ttft;
        let ok_itl = itl.is_none_or(|i| p95(measured.iter().map(|o| o.tpot).collect()) <= i);
        (ok_ttft && ok_itl, outstanding_sum / samples.max(1.0))
    };
    let (mut lo, mut hi) = (0.01f64, 200.0f64);
    let mut concurrency = 1.0;
    for _ in 0..14 {
        let mid = (lo * hi).sqrt();
        let (ok, c) = run(mid);
        if ok {
            lo = mid;
            concurrency = c;
        } else {
            hi = mid;
        }
    }
    (lo * mean_tokens, concurrency.max(1.0))
}
