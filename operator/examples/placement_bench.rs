//! Placement benchmark: 1,000 replica groups (tensor 1, 2, 4 or 8) placed one by one over
//! simulated fleets of 8-GPU nodes with varied free memory, utilization and failed GPUs.
//! Prints time per decision by fleet size and the growth against the smallest fleet, measured
//! in the same run.
//!
//! `cargo run --release -p llmo-operator --example placement_bench`

use std::time::{Duration, Instant};

use llmo_operator::{
    api::{GpuDevice, GpuHealth},
    placement::{place_group, GroupRequest, NodeInventory, Spread, TakenGpus},
};

/// A small deterministic generator, so every run sees the same fleet.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

fn fleet(nodes: usize, rng: &mut Lcg) -> Vec<NodeInventory> {
    (0..nodes)
        .map(|n| NodeInventory {
            name: format!("node-{n:05}"),
            zone: Some(format!("zone-{}", n % 3)),
            gpu_class: Some("h100".into()),
            unschedulable: false,
            allocatable_gpus: 8,
            gpus: (0..8u32)
                .map(|i| GpuDevice {
                    index: i,
                    uuid: format!("GPU-{n}-{i}"),
                    product: "NVIDIA H100 80GB HBM3".into(),
                    memory_total_mib: 81559,
                    // Most GPUs idle, some partly used by other tenants.
                    memory_free_mib: if rng.next().is_multiple_of(4) {
                        20_000 + rng.next() % 40_000
                    } else {
                        81_000
                    },
                    utilization_percent: (rng.next() % 100) as u32,
                    health: if rng.next().is_multiple_of(200) {
                        GpuHealth::Unhealthy
                    } else {
                        GpuHealth::Healthy
                    },
                    // NVSwitch: every GPU reaches every other.
                    nvlink_peers: (0..8).filter(|p| *p != i).collect(),
                    ..Default::default()
                })
                .collect(),
        })
        .collect()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    const GROUPS: usize = 1000;
    let sizes = [500usize, 1000, 2000, 5000];
    println!("{GROUPS} groups per fleet, tensor 1/2/4/8 with 30-70 GiB per GPU, 8 GPUs per node");
    println!(
        "{:>7} {:>10} {:>10} {:>10} {:>8} {:>14}",
        "nodes", "p50", "p99", "max", "placed", "p99 vs 500"
    );
    let mut anchor = None;
    for nodes in sizes {
        let mut rng = Lcg(42);
        let inventory = fleet(nodes, &mut rng);
        let mut taken = TakenGpus::new();
        let mut times = Vec::with_capacity(GROUPS);
        let mut placed = 0;
        for g in 0..GROUPS {
            let request = GroupRequest {
                gpu_class: "h100".into(),
                tensor: [1, 2, 4, 8][g % 4],
                pipeline: 1,
                memory_mib: 30_000 + (rng.next() % 40_000),
            };
            // Each deployment has five groups; spread is per deployment.
            let mut spread = Spread::default();
            let start = Instant::now();
            let result = place_group(&request, &inventory, &mut taken, &mut spread);
            times.push(start.elapsed());
            placed += usize::from(result.is_ok());
        }
        times.sort();
        let p99 = percentile(&times, 0.99);
        let anchor_p99 = *anchor.get_or_insert(p99);
        println!(
            "{nodes:>7} {:>10.3?} {:>10.3?} {:>10.3?} {placed:>8} {:>13.2}x",
            percentile(&times, 0.5),
            p99,
            times[times.len() - 1],
            p99.as_secs_f64() / anchor_p99.as_secs_f64()
        );
    }
}
