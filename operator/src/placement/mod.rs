//! Placement: which nodes and GPUs each replica group of a plan runs on. Pure and deterministic:
//! the same inventory and plan always give the same answer.
//!
//! For each rank (pipeline stage) of a group, a node must offer `tensor` GPUs that are healthy,
//! not MIG-partitioned, not already taken, and each with the plan's memory free. Among nodes that
//! can, the choice prefers, in order: a node without other groups of the same deployment (spread),
//! a zone without them, NVLink-connected GPU sets when tensor > 1, healthy over degraded GPUs,
//! and cool GPUs over hot ones; ties go to the node name.

mod inventory;

use std::collections::{BTreeSet, HashMap};

pub use inventory::{NodeInventory, ZONE_LABEL};

use crate::{
    api::{DeviceKind, GpuDevice, GpuHealth, RankPlacement},
    plan::Plan,
};

/// What one replica group needs.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupRequest {
    /// GPUClass the nodes must have.
    pub gpu_class: String,
    /// GPUs per rank (the tensor degree); 0 for `cpu` classes, whose ranks take a node but no GPU.
    pub tensor: u32,
    /// Ranks per group (pipeline degree).
    pub pipeline: u32,
    /// Free memory each chosen GPU must have, MiB.
    pub memory_mib: u64,
}

impl GroupRequest {
    /// What one replica group of `plan` needs on `gpu_class`. Ranks of a `cpu` class take a
    /// node but no GPU; GPU ranks need `tensor` GPUs with the plan's memory free on each.
    pub fn for_plan(gpu_class: &str, device: DeviceKind, plan: &Plan) -> Self {
        let (tensor, memory_mib) = match device {
            DeviceKind::Cpu => (0, 0),
            DeviceKind::Gpu => (
                plan.layout.tensor,
                (plan.memory.total() / (1024.0 * 1024.0)).ceil() as u64,
            ),
        };
        Self {
            gpu_class: gpu_class.to_owned(),
            tensor,
            pipeline: plan.layout.pipeline,
            memory_mib,
        }
    }
}

/// GPUs already in use: node name to GPU indices. A hash map: it is read once per node per
/// decision, which dominates the cost of placing into a large fleet.
pub type TakenGpus = HashMap<String, BTreeSet<u32>>;

/// Why a group could not be placed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "needs {needed} {class} GPU{plural} with {memory} free on one node for rank {rank}; {best}"
)]
pub struct PlacementError {
    /// Rank that could not be placed.
    pub rank: u32,
    /// GPUs needed on one node.
    pub needed: u32,
    /// GPU class.
    pub class: String,
    /// Memory needed per GPU, formatted.
    pub memory: String,
    /// `s` or nothing.
    plural: &'static str,
    /// The best node and why it falls short, or why no node is a candidate.
    pub best: String,
}

/// Places one replica group, marking its GPUs in `taken`. `spread` counts groups of the same
/// deployment per node and per zone, and is updated too.
pub fn place_group(
    request: &GroupRequest,
    nodes: &[NodeInventory],
    taken: &mut TakenGpus,
    spread: &mut Spread,
) -> Result<Vec<RankPlacement>, PlacementError> {
    let mut ranks = Vec::with_capacity(request.pipeline as usize);
    let mut chosen_here: Vec<(String, Vec<u32>)> = Vec::new();
    for rank in 0..request.pipeline {
        let mut best: Option<(Score, &NodeInventory, Vec<&GpuDevice>)> = None;
        for node in nodes.iter().filter(|n| {
            n.gpu_class.as_deref() == Some(request.gpu_class.as_str()) && !n.unschedulable
        }) {
            let node_taken = taken.get(&node.name);
            // Skip the GPU choice where even the best possible set cannot win.
            let Some(bound) = score_bound(node, request, node_taken, spread) else {
                continue;
            };
            if let Some((s, b, _)) = &best {
                if (bound, &node.name) > (*s, &b.name) {
                    continue;
                }
            }
            let Some(gpus) = choose_gpus(node, request, node_taken) else {
                continue;
            };
            let s = score(node, &gpus, spread);
            if best
                .as_ref()
                .is_none_or(|(bs, b, _)| (s, &node.name) < (*bs, &b.name))
            {
                best = Some((s, node, gpus));
            }
        }
        let Some((_, node, gpus)) = best else {
            // Give back what earlier ranks of this group took.
            for (name, indices) in chosen_here {
                if let Some(set) = taken.get_mut(&name) {
                    for i in indices {
                        set.remove(&i);
                    }
                }
            }
            return Err(explain(request, rank, nodes, taken));
        };
        let indices: Vec<u32> = gpus.iter().map(|g| g.index).collect();
        taken
            .entry(node.name.clone())
            .or_default()
            .extend(indices.iter().copied());
        chosen_here.push((node.name.clone(), indices.clone()));
        ranks.push(RankPlacement {
            rank,
            node: node.name.clone(),
            gpus: indices,
        });
    }
    for r in &ranks {
        spread.add(r, nodes);
    }
    Ok(ranks)
}

/// Groups of one deployment already on each node and zone.
#[derive(Debug, Clone, Default)]
pub struct Spread {
    per_node: HashMap<String, u32>,
    per_zone: HashMap<String, u32>,
}

impl Spread {
    /// Counts an existing rank of the deployment.
    pub fn add(&mut self, rank: &RankPlacement, nodes: &[NodeInventory]) {
        *self.per_node.entry(rank.node.clone()).or_default() += 1;
        if let Some(zone) = nodes
            .iter()
            .find(|n| n.name == rank.node)
            .and_then(|n| n.zone.clone())
        {
            *self.per_zone.entry(zone).or_default() += 1;
        }
    }
}

fn eligible<'a>(
    node: &'a NodeInventory,
    request: &GroupRequest,
    taken: Option<&'a BTreeSet<u32>>,
) -> impl Iterator<Item = &'a GpuDevice> + 'a {
    let memory = request.memory_mib;
    node.gpus.iter().filter(move |g| {
        g.health != GpuHealth::Unhealthy
            && !g.mig_enabled
            && g.memory_free_mib >= memory
            && !taken.is_some_and(|t| t.contains(&g.index))
    })
}

/// The GPUs of `node` a rank would use: an NVLink clique when one exists, else the coolest.
fn choose_gpus<'a>(
    node: &'a NodeInventory,
    request: &GroupRequest,
    taken: Option<&'a BTreeSet<u32>>,
) -> Option<Vec<&'a GpuDevice>> {
    let need = request.tensor as usize;
    if (node.allocatable_gpus as usize) < need {
        return None;
    }
    if need == 0 {
        return Some(Vec::new());
    }
    // Cheap rejection first: most nodes of a busy fleet have too few usable GPUs.
    eligible(node, request, taken).nth(need - 1)?;
    let mut candidates: Vec<&GpuDevice> = eligible(node, request, taken).collect();
    // Healthy before degraded, then cool before hot, then by index.
    candidates.sort_by_key(|g| {
        (
            g.health != GpuHealth::Healthy,
            g.utilization_percent,
            g.index,
        )
    });
    if need > 1 && candidates.len() <= 64 {
        if let Some(clique) = best_nvlink_clique(&candidates, need) {
            return Some(clique);
        }
    }
    let mut chosen: Vec<&GpuDevice> = candidates.into_iter().take(need).collect();
    chosen.sort_by_key(|g| g.index);
    Some(chosen)
}

/// Grows a clique greedily from every seed (best members first) and keeps the one whose worst
/// member is best. Positions in `candidates` are bits of a mask, so no allocation per seed.
fn best_nvlink_clique<'a>(candidates: &[&'a GpuDevice], need: usize) -> Option<Vec<&'a GpuDevice>> {
    let peers: Vec<u64> = candidates
        .iter()
        .map(|g| {
            candidates
                .iter()
                .enumerate()
                .filter(|(_, o)| g.nvlink_peers.contains(&o.index))
                .fold(0u64, |mask, (j, _)| mask | (1 << j))
        })
        .collect();
    let mut best: Option<((usize, u32, u64), u64)> = None;
    for seed in 0..candidates.len() {
        let mut clique = 1u64 << seed;
        let mut size = 1;
        for (j, peer_mask) in peers.iter().enumerate() {
            if size == need {
                break;
            }
            // j joins when every member so far is its peer.
            if clique & (1 << j) == 0 && peer_mask & clique == clique {
                clique |= 1 << j;
                size += 1;
            }
        }
        if size < need {
            continue;
        }
        let members = (0..candidates.len()).filter(|j| clique & (1 << j) != 0);
        let degraded = members
            .clone()
            .filter(|&j| candidates[j].health != GpuHealth::Healthy)
            .count();
        let heat = members
            .clone()
            .map(|j| candidates[j].utilization_percent)
            .max()
            .unwrap_or(0);
        let by_index = members.fold(0u64, |m, j| m | (1u64 << candidates[j].index.min(63)));
        // Among equals, the set with the lowest GPU indices.
        let key = (degraded, heat, !by_index.reverse_bits());
        if best.is_none_or(|(k, _)| key < k) {
            best = Some((key, clique));
        }
    }
    let (_, clique) = best?;
    let mut chosen: Vec<&GpuDevice> = (0..candidates.len())
        .filter(|j| clique & (1 << j) != 0)
        .map(|j| candidates[j])
        .collect();
    chosen.sort_by_key(|g| g.index);
    Some(chosen)
}

/// Lower is better, compared lexicographically: groups of the deployment on the node, in its
/// zone, GPUs not all NVLink-connected, degraded GPUs, hottest GPU's utilization.
type Score = (u32, u32, bool, usize, u32);

fn spread_of(node: &NodeInventory, spread: &Spread) -> (u32, u32) {
    let on_node = spread.per_node.get(&node.name).copied().unwrap_or(0);
    let in_zone = node
        .zone
        .as_ref()
        .and_then(|z| spread.per_zone.get(z).copied())
        .unwrap_or(0);
    (on_node, in_zone)
}

/// A score no GPU set of `node` can beat (linked, the fewest degraded GPUs possible, the
/// `tensor`-th coolest utilization), or `None` when too few GPUs are usable.
fn score_bound(
    node: &NodeInventory,
    request: &GroupRequest,
    taken: Option<&BTreeSet<u32>>,
    spread: &Spread,
) -> Option<Score> {
    let need = request.tensor as usize;
    let mut utils = [0u32; 64];
    let (mut count, mut healthy) = (0usize, 0usize);
    for g in eligible(node, request, taken) {
        if count < utils.len() {
            utils[count] = g.utilization_percent;
        }
        count += 1;
        healthy += usize::from(g.health == GpuHealth::Healthy);
    }
    if count < need {
        return None;
    }
    let (on_node, in_zone) = spread_of(node, spread);
    if need == 0 || count > utils.len() {
        return Some((on_node, in_zone, false, 0, 0));
    }
    utils[..count].sort_unstable();
    Some((
        on_node,
        in_zone,
        false,
        need.saturating_sub(healthy),
        utils[need - 1],
    ))
}

fn score(node: &NodeInventory, gpus: &[&GpuDevice], spread: &Spread) -> Score {
    let (on_node, in_zone) = spread_of(node, spread);
    let linked = gpus.len() <= 1
        || gpus.iter().all(|a| {
            gpus.iter()
                .all(|b| a.index == b.index || a.nvlink_peers.contains(&b.index))
        });
    let degraded = gpus
        .iter()
        .filter(|g| g.health != GpuHealth::Healthy)
        .count();
    let heat = gpus
        .iter()
        .map(|g| g.utilization_percent)
        .max()
        .unwrap_or(0);
    (on_node, in_zone, !linked, degraded, heat)
}

fn explain(
    request: &GroupRequest,
    rank: u32,
    nodes: &[NodeInventory],
    taken: &TakenGpus,
) -> PlacementError {
    let of_class: Vec<&NodeInventory> = nodes
        .iter()
        .filter(|n| n.gpu_class.as_deref() == Some(request.gpu_class.as_str()))
        .collect();
    let best = if of_class.is_empty() {
        format!("no node reports GPU class {}", request.gpu_class)
    } else {
        let schedulable: Vec<&&NodeInventory> =
            of_class.iter().filter(|n| !n.unschedulable).collect();
        match schedulable
            .iter()
            .map(|n| (eligible(n, request, taken.get(&n.name)).count(), *n))
            .max_by(|a, b| a.0.cmp(&b.0).then_with(|| b.1.name.cmp(&a.1.name)))
        {
            None => format!(
                "all {} {} nodes are marked unschedulable",
                of_class.len(),
                request.gpu_class
            ),
            Some((count, node)) => {
                let t = taken.get(&node.name);
                let mut why = Vec::new();
                let busy = node
                    .gpus
                    .iter()
                    .filter(|g| t.is_some_and(|t| t.contains(&g.index)))
                    .count();
                let sick = node
                    .gpus
                    .iter()
                    .filter(|g| g.health == GpuHealth::Unhealthy)
                    .count();
                let mig = node.gpus.iter().filter(|g| g.mig_enabled).count();
                let small = node
                    .gpus
                    .iter()
                    .filter(|g| {
                        g.memory_free_mib < request.memory_mib && g.health != GpuHealth::Unhealthy
                    })
                    .count();
                for (n, what) in [
                    (busy, "taken"),
                    (sick, "unhealthy"),
                    (mig, "in MIG mode"),
                    (small, "with too little free memory"),
                ] {
                    if n > 0 {
                        why.push(format!("{n} {what}"));
                    }
                }
                format!(
                    "best node {} has {count} of {} GPUs usable{}",
                    node.name,
                    node.gpus.len(),
                    if why.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", why.join(", "))
                    }
                )
            }
        }
    };
    PlacementError {
        rank,
        needed: request.tensor,
        class: request.gpu_class.clone(),
        memory: format!("{:.1}GiB", request.memory_mib as f64 / 1024.0),
        plural: if request.tensor == 1 { "" } else { "s" },
        best,
    }
}

#[cfg(test)]
mod tests;
