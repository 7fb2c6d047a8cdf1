//! The node agent's write rate under simulated load, against writing every sample. Run with
//! `cargo test -p llmo-operator --test agent_write_rate -- --nocapture` to see the table.

use std::{path::PathBuf, time::Duration};

use llmo_operator::{
    api::{parse_manifests, GPUClass, Manifest},
    inventory::{
        measure_write_rate, render_table, SimulatedSource, SimulationProfile, WritePolicy,
        WriteReason,
    },
};

const DAY: Duration = Duration::from_secs(24 * 3600);
const INTERVAL: Duration = Duration::from_secs(10);

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
}

fn classes() -> Vec<GPUClass> {
    let text = std::fs::read_to_string(repo("examples/gpuclasses.yaml")).unwrap();
    parse_manifests(&text)
        .into_iter()
        .filter_map(|m| match m.unwrap() {
            Manifest::GpuClass(c) => Some(*c),
            _ => None,
        })
        .collect()
}

fn source(name: &str) -> SimulatedSource {
    let path = repo(&format!("examples/simulated/{name}.yaml"));
    SimulatedSource::new(SimulationProfile::load(&path).unwrap(), name, "node-1")
}

#[test]
fn a_day_of_fluctuating_load_stays_within_twenty_writes_an_hour() {
    let policy = WritePolicy::default();
    let mut rows = Vec::new();
    for name in ["8xh100-nvlink", "4xl4-pcie", "8xa100-40gb-idle"] {
        let mut row = measure_write_rate(&source(name), &classes(), &policy, DAY, INTERVAL);
        row.profile = name.into();
        rows.push(row);
    }
    println!("{}", render_table(&rows, &policy, INTERVAL));

    for row in &rows {
        assert_eq!(row.samples, 8640);
        assert!((row.every_sample_per_hour - 360.0).abs() < 1e-9);
        assert!(
            row.per_hour <= 20.0,
            "{}: {:.1} writes/h",
            row.profile,
            row.per_hour
        );
        assert!(
            row.busiest_hour <= 20,
            "{}: {} writes in one hour",
            row.profile,
            row.busiest_hour
        );
        // Every health or presence change goes out at the sample that saw it.
        assert_eq!(row.worst_health_delay_samples, 0, "{}", row.profile);
        // A live agent writes at least once per heartbeat.
        assert!(row.per_hour >= 12.0, "{}", row.profile);
    }
    let h100 = &rows[0];
    // The scripted faults: GPU 3 and 6 each fail and recover, GPU 5 goes and comes back.
    assert_eq!(h100.health_changes, 6);
    assert_eq!(h100.by_reason[&WriteReason::Health], 4);
    assert_eq!(h100.by_reason[&WriteReason::Inventory], 2);
    // Under this load thresholds alone do not bound the rate; the budget does.
    assert!(
        h100.thresholds_only_per_hour > 200.0,
        "{}",
        h100.thresholds_only_per_hour
    );
    assert!(h100.per_hour * 20.0 < h100.every_sample_per_hour);
}

#[test]
fn the_measurement_is_deterministic() {
    let policy = WritePolicy::default();
    let a = measure_write_rate(
        &source("8xh100-nvlink"),
        &classes(),
        &policy,
        DAY / 4,
        INTERVAL,
    );
    let b = measure_write_rate(
        &source("8xh100-nvlink"),
        &classes(),
        &policy,
        DAY / 4,
        INTERVAL,
    );
    assert_eq!(a, b);
}
