//! The fleet simulator: the latency model's fit to the measurements, and determinism.

use std::path::{Path, PathBuf};

use llmo_operator::autoscale::sim::{self, fleet::Fleet, latency, SimulateArgs};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn fleet() -> Fleet {
    Fleet::load(&root().join("examples/fleet/llama2-70b-h100.yaml")).unwrap()
}

/// The stated error of the step-time model: within 15% mean absolute error on prompt and on
/// per-token times for both measured classes, at most 40% on any fitted row, and at most 15% of
/// the rows left out as outliers.
#[test]
fn latency_model_fits_the_measurements() {
    let csv = root().join("data/splitwise-perf-model.csv");
    let text = std::fs::read_to_string(root().join("examples/gpuclasses.yaml")).unwrap();
    let classes: Vec<_> = llmo_operator::api::parse_manifests(&text)
        .into_iter()
        .filter_map(Result::ok)
        .filter_map(|m| match m {
            llmo_operator::api::Manifest::GpuClass(c) => Some(c),
            _ => None,
        })
        .collect();
    for (class, rows) in [("h100", "h100-80gb"), ("a100", "a100-80gb")] {
        let c = classes
            .iter()
            .find(|c| c.metadata.name.as_deref() == Some(class))
            .unwrap();
        let hw = llmo_operator::plan::Hardware::from_class(class, &c.spec).unwrap();
        let fit = latency::fit(&csv, rows, &hw).unwrap();
        eprintln!("{fit:?}");
        assert!(fit.prefill_mape < 0.15, "{fit:?}");
        assert!(fit.decode_mape < 0.15, "{fit:?}");
        assert!(fit.max_error < 0.40, "{fit:?}");
        assert!(
            fit.excluded * 100 <= 15 * (fit.rows + fit.excluded),
            "{fit:?}"
        );
        assert!(fit.costs.compute_efficiency > 0.1 && fit.costs.compute_efficiency <= 1.0);
        assert!(fit.costs.bandwidth_efficiency > 0.1 && fit.costs.bandwidth_efficiency <= 1.0);
    }
}

fn args(seed: u64) -> SimulateArgs {
    SimulateArgs {
        fleet: root().join("examples/fleet/llama2-70b-h100.yaml"),
        trace: root().join("data/azure-2023-conv.csv"),
        rate_scale: 1.0,
        diurnal: None,
        seed,
        perf_model: root().join("data/splitwise-perf-model.csv"),
        out: std::env::temp_dir(),
        sweep: false,
        prior_error: 1.0,
        external: false,
    }
}

#[test]
fn the_same_seed_gives_the_same_table() {
    let a = sim::simulate(&args(7)).unwrap();
    let b = sim::simulate(&args(7)).unwrap();
    assert_eq!(sim::report::table(&a), sim::report::table(&b));
    assert_eq!(sim::report::timeline_csv(&a), sim::report::timeline_csv(&b));
    assert_eq!(a.summaries.len(), 6);
    // Every request of the trace is accounted for in every strategy.
    for run in &a.runs {
        assert_eq!(run.outcomes.len(), 19_366, "{}", run.name);
    }
    let svg = sim::report::svg(&a);
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
}

#[test]
fn a_sweep_reproduces_the_defaults_and_buys_attainment_with_gpus() {
    let setup = sim::Setup::new(&args(3)).unwrap();
    let defaults = sim::compare(&setup);
    let points = sim::sweep(&setup);
    let of = |name: &str| -> Vec<&sim::SweepPoint> {
        points.iter().filter(|p| p.summary.name == name).collect()
    };
    // llmo's policy at the fleet file's utilization (0.8) is the default run, to the bit.
    let llmo = defaults
        .summaries
        .iter()
        .find(|s| s.name == "llmo-slo")
        .unwrap();
    let same = of("llmo-slo")
        .into_iter()
        .find(|p| p.setting == "utilization 0.80")
        .expect("the sweep includes the default setting");
    assert_eq!(&same.summary, llmo);
    let oracle = defaults
        .summaries
        .iter()
        .find(|s| s.name == "oracle")
        .unwrap();
    let full = of("oracle")
        .into_iter()
        .find(|p| p.setting == "utilization 1.00")
        .expect("the sweep includes the oracle at full capacity");
    assert_eq!(&full.summary, oracle);
    // Static provisioning for a lower utilization holds more replicas all the time.
    let statics = of("static-peak");
    assert_eq!(statics.len(), 6);
    for pair in statics.windows(2) {
        assert!(
            pair[0].summary.gpu_hours >= pair[1].summary.gpu_hours,
            "{} then {}",
            pair[0].setting,
            pair[1].setting
        );
    }
    // Every strategy is in the comparison at equal attainment, in order.
    let rows = sim::report::cheapest_at(&points, llmo);
    let names: Vec<&str> = rows.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        names,
        [
            "static-peak",
            "hpa-gpu-util",
            "keda-queue",
            "planner-180s",
            "llmo-slo",
            "oracle"
        ]
    );
    let table = sim::report::sweep_table(&points, llmo);
    assert!(
        table.contains("At equal or better attainment than llmo-slo"),
        "{table}"
    );
    let svg = sim::report::sweep_svg(&points, llmo);
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
}

#[test]
fn the_fleet_file_bounds_replicas_by_the_pools() {
    let f = fleet();
    // 12 nodes of 8 H100s at 4 GPUs per replica hold 24 replicas.
    assert_eq!(f.pool_replicas, 24);
    assert_eq!(f.bounds(), (1, 24));
    assert!((f.replica_price() - 4.0 * 2.99).abs() < 1e-9);
}

#[test]
fn external_mode_runs_behind_keda_on_its_sync_period() {
    let a = sim::simulate(&SimulateArgs {
        external: true,
        ..args(3)
    })
    .unwrap();
    let names: Vec<&str> = a.summaries.iter().map(|s| s.name).collect();
    assert_eq!(names.len(), 7, "{names:?}");
    assert_eq!(names[6], "llmo-via-keda");
    let run = &a.runs[6];
    assert!(
        !run.actions.is_empty(),
        "KEDA never followed a recommendation"
    );
    // KEDA's HPA changes the count only on its 15 s sync.
    for (t, from, to) in &run.actions {
        assert!(t % 15.0 == 0.0, "{from} -> {to} at {t}s");
    }
    // Only llmo's own run writes decisions.csv.
    assert!(run.decisions.is_empty());
    assert!(!a.runs[4].decisions.is_empty());
}

#[test]
fn a_prior_error_must_be_a_positive_factor() {
    for bad in [0.0, -1.0, f64::NAN] {
        let err = sim::Setup::new(&SimulateArgs {
            prior_error: bad,
            ..args(1)
        })
        .unwrap_err();
        assert!(err.to_string().contains("--prior-error"), "{err}");
    }
}
