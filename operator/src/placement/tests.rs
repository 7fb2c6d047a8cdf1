use super::*;

fn gpu(index: u32, free_mib: u64, util: u32, peers: &[u32]) -> GpuDevice {
    GpuDevice {
        index,
        uuid: format!("GPU-{index}"),
        product: "NVIDIA H100 80GB HBM3".into(),
        memory_total_mib: 81559,
        memory_free_mib: free_mib,
        utilization_percent: util,
        nvlink_peers: peers.to_vec(),
        ..Default::default()
    }
}

/// An 8-GPU node; NVLink joins GPUs 0-3 and 4-7 (two islands), all 80 GB free and idle.
fn node(name: &str, zone: &str) -> NodeInventory {
    let island = |i: u32| -> Vec<u32> {
        let base = i / 4 * 4;
        (base..base + 4).filter(|p| *p != i).collect()
    };
    NodeInventory {
        name: name.into(),
        zone: Some(zone.into()),
        gpu_class: Some("h100".into()),
        unschedulable: false,
        gpus: (0..8).map(|i| gpu(i, 81000, 0, &island(i))).collect(),
        allocatable_gpus: 8,
    }
}

fn request(tensor: u32, pipeline: u32, memory_mib: u64) -> GroupRequest {
    GroupRequest {
        gpu_class: "h100".into(),
        tensor,
        pipeline,
        memory_mib,
    }
}

#[test]
fn tensor_groups_take_an_nvlink_island() {
    let mut nodes = vec![node("a", "z1")];
    // GPU 1 is busy and GPU 5 hot: the 4-wide group must still be linked.
    nodes[0].gpus[1].utilization_percent = 95;
    let mut taken = TakenGpus::new();
    let ranks = place_group(
        &request(4, 1, 40_000),
        &nodes,
        &mut taken,
        &mut Spread::default(),
    )
    .unwrap();
    assert_eq!(ranks[0].gpus, [4, 5, 6, 7], "the cool island");
    let ranks = place_group(
        &request(4, 1, 40_000),
        &nodes,
        &mut taken,
        &mut Spread::default(),
    )
    .unwrap();
    assert_eq!(ranks[0].gpus, [0, 1, 2, 3], "what is left");
}

#[test]
fn replicas_spread_over_nodes_and_zones() {
    let nodes = vec![node("a", "z1"), node("b", "z1"), node("c", "z2")];
    let mut taken = TakenGpus::new();
    let mut spread = Spread::default();
    let mut order = Vec::new();
    for _ in 0..3 {
        let ranks = place_group(&request(2, 1, 40_000), &nodes, &mut taken, &mut spread).unwrap();
        order.push(ranks[0].node.clone());
    }
    // a (first by name), then c (another zone), then b (a fresh node in z1).
    assert_eq!(order, ["a", "c", "b"]);
}

#[test]
fn unhealthy_small_mig_and_unschedulable_are_avoided() {
    let mut nodes = vec![node("a", "z1"), node("b", "z1")];
    nodes[0].unschedulable = true;
    nodes[1].gpus[0].health = GpuHealth::Unhealthy;
    nodes[1].gpus[1].memory_free_mib = 10_000;
    nodes[1].gpus[2].mig_enabled = true;
    let ranks = place_group(
        &request(1, 1, 40_000),
        &nodes,
        &mut TakenGpus::new(),
        &mut Spread::default(),
    )
    .unwrap();
    assert_eq!(ranks[0].node, "b");
    assert_eq!(ranks[0].gpus, [3]);
}

#[test]
fn degraded_gpus_are_a_last_resort() {
    let mut nodes = vec![node("a", "z1")];
    for g in &mut nodes[0].gpus[..7] {
        g.health = GpuHealth::Degraded;
    }
    let ranks = place_group(
        &request(1, 1, 1000),
        &nodes,
        &mut TakenGpus::new(),
        &mut Spread::default(),
    )
    .unwrap();
    assert_eq!(ranks[0].gpus, [7]);
}

#[test]
fn pipeline_stages_span_nodes() {
    let nodes = vec![node("a", "z1"), node("b", "z1")];
    let mut taken = TakenGpus::new();
    let ranks = place_group(
        &request(8, 2, 60_000),
        &nodes,
        &mut taken,
        &mut Spread::default(),
    )
    .unwrap();
    assert_eq!(ranks.len(), 2);
    assert_ne!(ranks[0].node, ranks[1].node);
    assert!(ranks.iter().all(|r| r.gpus.len() == 8));
}

#[test]
fn failure_says_exactly_why() {
    let mut nodes = vec![node("a", "z1"), node("b", "z1")];
    let mut taken = TakenGpus::new();
    taken.insert("a".into(), (0..7).collect());
    nodes[1]
        .gpus
        .iter_mut()
        .for_each(|g| g.memory_free_mib = 20_000);
    let err = place_group(
        &request(2, 1, 39_424),
        &nodes,
        &mut taken,
        &mut Spread::default(),
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "needs 2 h100 GPUs with 38.5GiB free on one node for rank 0; best node a has 1 of 8 GPUs usable (7 taken)"
    );
    let err = place_group(
        &GroupRequest {
            gpu_class: "l4".into(),
            ..request(1, 1, 1)
        },
        &nodes,
        &mut taken,
        &mut Spread::default(),
    )
    .unwrap_err();
    assert!(
        err.to_string().ends_with("no node reports GPU class l4"),
        "{err}"
    );
}

#[test]
fn a_failed_group_gives_back_what_earlier_ranks_took() {
    let nodes = vec![node("a", "z1")];
    let mut taken = TakenGpus::new();
    // Two stages of 8 need two nodes; only one exists.
    let err = place_group(
        &request(8, 2, 1000),
        &nodes,
        &mut taken,
        &mut Spread::default(),
    )
    .unwrap_err();
    assert_eq!(err.rank, 1);
    assert!(taken.get("a").is_none_or(BTreeSet::is_empty), "{taken:?}");
}

#[test]
fn the_same_input_gives_the_same_answer() {
    let nodes: Vec<NodeInventory> = (0..20)
        .map(|i| node(&format!("n{i:02}"), &format!("z{}", i % 3)))
        .collect();
    let run = || {
        let mut taken = TakenGpus::new();
        let mut spread = Spread::default();
        (0..30)
            .map(|_| place_group(&request(2, 1, 30_000), &nodes, &mut taken, &mut spread).unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(run(), run());
}

#[test]
fn cpu_ranks_take_a_node_but_no_gpu() {
    let mut cpu = node("cpu-a", "z1");
    cpu.gpu_class = Some("cpu".into());
    cpu.gpus.clear();
    cpu.allocatable_gpus = 0;
    let mut other = cpu.clone();
    other.name = "cpu-b".into();
    let nodes = vec![cpu, other];
    let request = GroupRequest {
        gpu_class: "cpu".into(),
        tensor: 0,
        pipeline: 1,
        memory_mib: 0,
    };
    let mut spread = Spread::default();
    let mut taken = TakenGpus::new();
    let a = place_group(&request, &nodes, &mut taken, &mut spread).unwrap();
    let b = place_group(&request, &nodes, &mut taken, &mut spread).unwrap();
    assert_eq!(
        (a[0].node.as_str(), b[0].node.as_str()),
        ("cpu-a", "cpu-b"),
        "spread"
    );
    assert!(a[0].gpus.is_empty());
}
