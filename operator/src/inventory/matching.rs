//! Which GPUClass a node's GPUs belong to. Pure: the agent and the tests call the same function.
//!
//! Rules, in order:
//! 1. Each GPU's NVML product name is compared with every `gpu` class's `matching.products`
//!    patterns (`*` matches any run of characters, case is ignored).
//! 2. A GPU whose product matched no class is compared through the node label
//!    `nvidia.com/gpu.product` (set by GPU feature discovery) with `matching.productLabels`. The
//!    label names the node's GPU model, so it only fills in for products the names do not cover.
//! 3. When several classes match, the most specific pattern wins (most literal characters:
//!    `NVIDIA H100 NVL` beats `NVIDIA H100*`), then the class name in byte order. The API server
//!    lists objects in no promised order, so the order of the input never matters.
//! 4. The node's class is the class of most of its GPUs (ties by name); a node with mixed
//!    models reports the others in `other_classes` for the log.
//! 5. Products that matched nothing are reported in `unknown_products`, never guessed.
//! 6. A node without GPUs gets a `cpu` class only when the agent is told which one
//!    (`--cpu-class`): a GPU node whose driver broke must not silently turn into a CPU node.

use std::collections::BTreeMap;

use crate::api::{DeviceKind, GPUClass};

/// The result of matching one node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClassMatch {
    /// The node's class, if any GPU (or the CPU fallback) matched.
    pub class: Option<String>,
    /// Distinct product names that matched no class, sorted.
    pub unknown_products: Vec<String>,
    /// Other classes found on a node with mixed GPU models, sorted.
    pub other_classes: Vec<String>,
    /// Why no class was chosen, or how it was chosen when that is not obvious.
    pub note: Option<String>,
}

/// Matches a node: `products` are the NVML product names of its GPUs (one per GPU, in index
/// order), `product_label` the node's `nvidia.com/gpu.product` label, `cpu_class` the class to
/// report for a node without GPUs.
pub fn match_gpu_class(
    classes: &[GPUClass],
    products: &[String],
    product_label: Option<&str>,
    cpu_class: Option<&str>,
) -> ClassMatch {
    if products.is_empty() {
        return match_cpu(classes, cpu_class);
    }
    let mut per_class = BTreeMap::<String, usize>::new();
    let mut unknown = Vec::<String>::new();
    for product in products {
        let by_product = best_class(classes, product, |m| &m.products);
        let found = by_product.or_else(|| {
            product_label.and_then(|label| best_class(classes, label, |m| &m.product_labels))
        });
        match found {
            Some(name) => *per_class.entry(name).or_default() += 1,
            None => {
                if !unknown.contains(product) {
                    unknown.push(product.clone());
                }
            }
        }
    }
    unknown.sort();
    // BTreeMap iterates by name and the fold keeps the first name with the most GPUs.
    let class = per_class
        .iter()
        .fold(None::<(&String, usize)>, |best, (name, &n)| match best {
            Some((_, m)) if m >= n => best,
            _ => Some((name, n)),
        })
        .map(|(name, _)| name.clone());
    let other_classes: Vec<String> = per_class
        .keys()
        .filter(|name| Some(*name) != class.as_ref())
        .cloned()
        .collect();
    let note = match (&class, unknown.is_empty()) {
        (None, _) => Some(format!(
            "no GPUClass matches {}; add a GPUClass whose matching.products covers it",
            unknown.join(", ")
        )),
        (Some(_), false) => Some(format!(
            "some GPUs match no GPUClass: {}",
            unknown.join(", ")
        )),
        (Some(c), true) if !other_classes.is_empty() => Some(format!(
            "mixed GPU models; most GPUs are {c}, others are {}",
            other_classes.join(", ")
        )),
        _ => None,
    };
    ClassMatch {
        class,
        unknown_products: unknown,
        other_classes,
        note,
    }
}

fn match_cpu(classes: &[GPUClass], cpu_class: Option<&str>) -> ClassMatch {
    let Some(wanted) = cpu_class else {
        return ClassMatch {
            note: Some("the node has no GPUs; pass --cpu-class to report it as a CPU node".into()),
            ..ClassMatch::default()
        };
    };
    let found = classes
        .iter()
        .find(|c| c.metadata.name.as_deref() == Some(wanted));
    match found {
        Some(c) if c.spec.device == DeviceKind::Cpu => ClassMatch {
            class: Some(wanted.to_owned()),
            ..ClassMatch::default()
        },
        Some(_) => ClassMatch {
            note: Some(format!(
                "--cpu-class {wanted} names a GPUClass whose device is not cpu"
            )),
            ..ClassMatch::default()
        },
        None => ClassMatch {
            note: Some(format!("--cpu-class {wanted}: no GPUClass of that name")),
            ..ClassMatch::default()
        },
    }
}

/// The most specific `gpu` class whose patterns (picked by `patterns`) match `text`.
fn best_class(
    classes: &[GPUClass],
    text: &str,
    patterns: impl Fn(&crate::api::GpuMatching) -> &Vec<String>,
) -> Option<String> {
    classes
        .iter()
        .filter(|c| c.spec.device == DeviceKind::Gpu)
        .filter_map(|c| {
            let name = c.metadata.name.as_deref()?;
            let matching = c.spec.matching.as_ref()?;
            let specificity = patterns(matching)
                .iter()
                .filter(|p| glob_match(p, text))
                .map(|p| p.chars().filter(|&ch| ch != '*').count())
                .max()?;
            Some((specificity, name))
        })
        // Highest specificity first, then the smallest name.
        .min_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)))
        .map(|(_, name)| name.to_owned())
}

/// `*` matches any run of characters (also none); every other character matches itself,
/// ignoring case. Surrounding spaces of `text` are ignored, since NVML pads some names.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().flat_map(char::to_lowercase).collect();
    let t: Vec<char> = text.trim().chars().flat_map(char::to_lowercase).collect();
    // Greedy match with one backtrack point: linear in practice, no recursion.
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{GPUClassSpec, GpuMatching, Interconnect, Tflops};
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

    fn class(name: &str, products: &[&str], labels: &[&str]) -> GPUClass {
        GPUClass::new(
            name,
            GPUClassSpec {
                device: DeviceKind::Gpu,
                matching: Some(GpuMatching {
                    products: products.iter().map(|s| s.to_string()).collect(),
                    product_labels: labels.iter().map(|s| s.to_string()).collect(),
                }),
                memory: Quantity("80Gi".into()),
                memory_bandwidth_gbps: 1.0,
                tflops: Tflops::default(),
                interconnect: Interconnect::default(),
                devices_per_node: 8,
                price_per_hour: None,
            },
        )
    }

    fn cpu(name: &str) -> GPUClass {
        let mut c = class(name, &[], &[]);
        c.spec.device = DeviceKind::Cpu;
        c.spec.matching = None;
        c
    }

    fn defaults() -> Vec<GPUClass> {
        vec![
            class("l4", &["NVIDIA L4"], &["NVIDIA-L4"]),
            class("h100", &["NVIDIA H100*"], &["NVIDIA-H100*"]),
            class("a100", &["NVIDIA A100*80GB*"], &["NVIDIA-A100-SXM4-80GB*"]),
            cpu("cpu"),
        ]
    }

    fn gpus(product: &str, n: usize) -> Vec<String> {
        vec![product.to_owned(); n]
    }

    #[test]
    fn glob_matches_stars_anywhere_and_ignores_case() {
        assert!(glob_match("NVIDIA H100*", "NVIDIA H100 80GB HBM3"));
        assert!(glob_match("nvidia h100*", "NVIDIA H100 80GB HBM3"));
        assert!(glob_match("*L4", "NVIDIA L4"));
        assert!(glob_match("NVIDIA A100*80GB*", "NVIDIA A100-SXM4-80GB"));
        assert!(glob_match("*", ""));
        assert!(glob_match("a*b*c", "aXXbYYbc"));
        assert!(glob_match("NVIDIA L4", "  NVIDIA L4 "));
        assert!(!glob_match("NVIDIA L4", "NVIDIA L40S"));
        assert!(!glob_match("NVIDIA A100*80GB*", "NVIDIA A100-SXM4-40GB"));
        assert!(!glob_match("", "x"));
        assert!(!glob_match("a*b", "ba"));
    }

    #[test]
    fn products_match_their_class() {
        let m = match_gpu_class(&defaults(), &gpus("NVIDIA H100 80GB HBM3", 8), None, None);
        assert_eq!(m.class.as_deref(), Some("h100"));
        assert!(m.unknown_products.is_empty());
        assert_eq!(m.note, None);
        let m = match_gpu_class(&defaults(), &gpus("NVIDIA L4", 4), None, None);
        assert_eq!(m.class.as_deref(), Some("l4"));
    }

    #[test]
    fn unknown_products_are_reported_not_guessed() {
        let m = match_gpu_class(&defaults(), &gpus("NVIDIA A100-SXM4-40GB", 8), None, None);
        assert_eq!(m.class, None);
        assert_eq!(m.unknown_products, ["NVIDIA A100-SXM4-40GB"]);
        assert!(m
            .note
            .unwrap()
            .contains("no GPUClass matches NVIDIA A100-SXM4-40GB"));
    }

    #[test]
    fn the_node_label_fills_in_for_unknown_product_names() {
        let m = match_gpu_class(
            &defaults(),
            &gpus("NVIDIA Graphics Device", 8),
            Some("NVIDIA-H100-80GB-HBM3"),
            None,
        );
        assert_eq!(m.class.as_deref(), Some("h100"));
        assert!(m.unknown_products.is_empty());
        // A label never overrides a product name that matched.
        let m = match_gpu_class(
            &defaults(),
            &gpus("NVIDIA L4", 1),
            Some("NVIDIA-H100"),
            None,
        );
        assert_eq!(m.class.as_deref(), Some("l4"));
    }

    #[test]
    fn the_most_specific_pattern_wins_whatever_the_listing_order() {
        let mut classes = defaults();
        classes.push(class("h100-nvl", &["NVIDIA H100 NVL"], &[]));
        let products = gpus("NVIDIA H100 NVL", 2);
        let forward = match_gpu_class(&classes, &products, None, None);
        classes.reverse();
        let backward = match_gpu_class(&classes, &products, None, None);
        assert_eq!(forward.class.as_deref(), Some("h100-nvl"));
        assert_eq!(forward, backward);
        // Equal specificity: the smaller name, in either order.
        let mut tie = vec![class("b", &["X*"], &[]), class("a", &["*X"], &[])];
        let one = match_gpu_class(&tie, &gpus("X", 1), None, None);
        tie.reverse();
        let two = match_gpu_class(&tie, &gpus("X", 1), None, None);
        assert_eq!(one.class.as_deref(), Some("a"));
        assert_eq!(one, two);
    }

    #[test]
    fn mixed_nodes_take_the_majority_and_name_the_rest() {
        let mut products = gpus("NVIDIA L4", 3);
        products.push("NVIDIA H100 PCIe".into());
        products.push("Mystery GPU".into());
        let m = match_gpu_class(&defaults(), &products, None, None);
        assert_eq!(m.class.as_deref(), Some("l4"));
        assert_eq!(m.other_classes, ["h100"]);
        assert_eq!(m.unknown_products, ["Mystery GPU"]);
    }

    #[test]
    fn cpu_classes_are_used_only_when_asked_and_only_for_nodes_without_gpus() {
        let none = match_gpu_class(&defaults(), &[], None, None);
        assert_eq!(none.class, None);
        assert!(none.note.unwrap().contains("--cpu-class"));
        let asked = match_gpu_class(&defaults(), &[], None, Some("cpu"));
        assert_eq!(asked.class.as_deref(), Some("cpu"));
        let wrong = match_gpu_class(&defaults(), &[], None, Some("l4"));
        assert_eq!(wrong.class, None);
        assert!(wrong.note.unwrap().contains("not cpu"));
        let missing = match_gpu_class(&defaults(), &[], None, Some("tiny"));
        assert!(missing.note.unwrap().contains("no GPUClass of that name"));
        // GPUs present: the cpu class is never chosen, even when it is named.
        let gpu = match_gpu_class(&defaults(), &gpus("NVIDIA L4", 1), None, Some("cpu"));
        assert_eq!(gpu.class.as_deref(), Some("l4"));
        // A cpu class with patterns is still never matched by products.
        let mut odd = cpu("cpu");
        odd.spec.matching = Some(GpuMatching {
            products: vec!["*".into()],
            product_labels: vec![],
        });
        let m = match_gpu_class(&[odd], &gpus("NVIDIA L4", 1), None, None);
        assert_eq!(m.class, None);
    }
}
