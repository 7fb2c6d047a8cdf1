//! The operator's pods of a tensor × pipeline group, run as they are specified: each pod's
//! `llmo-serve` started with exactly its container's environment, with only what a cluster's
//! network provides substituted (the pod's address, and the peers' headless Service names
//! resolved to loopback ports, as DNS would). The group must serve the single process's greedy
//! answer, and a lost stage must stop the other.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use llmo_e2e::{net::free_port, workspace_binary};
use llmo_operator::{
    api::{parse_manifests, DeviceKind, GPUClass, Manifest, ModelDeployment, RankPlacement},
    plan::{plan_layout, Hardware, ModelArch},
    preview::plan_request,
    workload::{build_group_pods, revision_hash, GroupSpec},
};

fn model_path() -> std::path::PathBuf {
    let cache = std::env::var_os("LLMO_CACHE")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/llmo")
        });
    let p = cache.join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.is_file(),
        "{} is missing: run scripts/fetch-model.sh",
        p.display()
    );
    p
}

/// The demo's SmolLM2 deployment with `tensor × pipeline` parallelism on GPU `class`, in bf16.
fn deployment(class: &str, tensor: u32, pipeline: u32) -> ModelDeployment {
    let text = std::fs::read_to_string(format!(
        "{}/../examples/smollm2-cpu.yaml",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
    .replace("tensor: 1", &format!("tensor: {tensor}"))
    .replace("pipeline: 1", &format!("pipeline: {pipeline}"))
    .replace("class: cpu", &format!("class: {class}"));
    // The example serves bf16, which CPUs widen to f32: a tensor-parallel group then differs
    // from one process only in the order of partial sums (8-bit activations would make greedy
    // text comparisons brittle; serving/tests/parallel.rs bounds those).
    assert!(
        text.contains("quantization: bf16"),
        "the example's precision changed"
    );
    let Manifest::ModelDeployment(mut md) = parse_manifests(&text).remove(0).unwrap() else {
        panic!("not a ModelDeployment")
    };
    md.metadata.uid = Some("uid-1".into());
    *md
}

fn group_pods(md: &ModelDeployment) -> Vec<Pod> {
    let text = std::fs::read_to_string(format!(
        "{}/../examples/gpuclasses.yaml",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let class = parse_manifests(&text)
        .into_iter()
        .filter_map(|m| match m.unwrap() {
            Manifest::GpuClass(c) => Some(*c),
            _ => None,
        })
        .find(|c: &GPUClass| c.metadata.name.as_deref() == Some(&md.spec.gpu.class))
        .expect("the cpu class");
    let hw = Hardware::from_class(&md.spec.gpu.class, &class.spec).unwrap();
    let arch = ModelArch::from_hints(md.spec.model.architecture.as_ref().unwrap()).unwrap();
    let plan = plan_layout(&plan_request(md, &arch, &hw)).unwrap();
    let rev = revision_hash(&md.spec, &plan);
    let placement: Vec<RankPlacement> = (0..plan.layout.pipeline)
        .map(|rank| RankPlacement {
            rank,
            node: format!("cpu-{rank}"),
            gpus: vec![],
        })
        .collect();
    let device = if md.spec.gpu.class == "cpu" {
        DeviceKind::Cpu
    } else {
        DeviceKind::Gpu
    };
    build_group_pods(&GroupSpec {
        deployment: md,
        plan: &plan,
        revision: &rev,
        index: 0,
        placement: &placement,
        device,
    })
}

struct Proc {
    child: Child,
    log: std::path::PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts every pod's process with its container environment; returns them and rank 0's
/// address.
fn start(pods: &[Pod], dir: &std::path::Path) -> (Vec<Proc>, String) {
    let dns: Vec<(String, String)> = pods
        .iter()
        .map(|p| {
            let spec = p.spec.as_ref().unwrap();
            let fqdn = format!(
                "{}.{}.{}.svc",
                spec.hostname.as_deref().unwrap(),
                spec.subdomain.as_deref().unwrap(),
                p.metadata.namespace.as_deref().unwrap()
            );
            (fqdn, format!("127.0.0.1:{}", free_port()))
        })
        .collect();
    let http: Vec<u16> = pods.iter().map(|_| free_port()).collect();
    let procs = pods
        .iter()
        .enumerate()
        .map(|(i, pod)| {
            let container = &pod.spec.as_ref().unwrap().containers[0];
            let mut cmd = Command::new(workspace_binary("llmo-serve"));
            cmd.env_clear().env("RUST_LOG", "info");
            for e in container.env.as_deref().unwrap_or_default() {
                let mut value = e.value.clone().unwrap_or_default();
                match e.name.as_str() {
                    // The model from the local cache rather than the Hub.
                    "LLMO_MODEL" => value = model_path().display().to_string(),
                    "LLMO_CACHE_DIR" | "HF_HOME" => value = dir.display().to_string(),
                    "LLMO_HOST" => {
                        assert_eq!(value, "0.0.0.0");
                        value = "127.0.0.1".into();
                    }
                    "LLMO_PORT" => value = http[i].to_string(),
                    // This machine has no GPU: a GPU group's pods run their ranks on the CPU.
                    "LLMO_DEVICE" => value = "cpu".into(),
                    "LLMO_PEERS" => {
                        for (fqdn, addr) in &dns {
                            value = value.replace(&format!("{fqdn}:29500"), addr);
                        }
                        assert!(!value.contains(".svc"), "unresolved peer in {value}");
                    }
                    _ => {}
                }
                cmd.env(&e.name, value);
            }
            // The pods' CPU requests are what a node would give them.
            cmd.env("LLMO_THREADS", "1")
                .env("LLMO_KV_CACHE_TOKENS", "8192");
            let log = dir.join(format!("{}.log", pod.metadata.name.as_deref().unwrap()));
            let child = cmd
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .expect("start llmo-serve");
            Proc { child, log }
        })
        .collect();
    (procs, format!("127.0.0.1:{}", http[0]))
}

fn http(addr: &str, method: &str, path: &str, body: &str) -> Result<(u16, String), String> {
    llmo_e2e::net::http(addr, method, path, body, Duration::from_secs(120))
}

fn logs(procs: &[Proc]) -> String {
    procs
        .iter()
        .map(|p| std::fs::read_to_string(&p.log).unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n----\n")
}

fn wait_ready(addr: &str, procs: &mut [Proc]) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !matches!(http(addr, "GET", "/ready", ""), Ok((200, _))) {
        for p in procs.iter_mut() {
            if let Ok(Some(status)) = p.child.try_wait() {
                panic!("a pod's process exited with {status}:\n{}", logs(procs));
            }
        }
        assert!(
            Instant::now() < deadline,
            "not ready after 120 s:\n{}",
            logs(procs)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn ask(addr: &str) -> String {
    let body = r#"{"model":"smollm2","messages":[{"role":"user","content":"What is the capital of France?"}],"max_tokens":24,"temperature":0}"#;
    let (code, resp) = http(addr, "POST", "/v1/chat/completions", body).unwrap();
    assert_eq!(code, 200, "{resp}");
    let v: serde_json::Value = serde_json::from_str(&resp).unwrap();
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[test]
fn the_operators_group_pods_serve_as_one_model() {
    let dir = tempfile::tempdir().unwrap();
    let single = group_pods(&deployment("cpu", 1, 1));
    assert_eq!(single.len(), 1);
    let (mut procs, addr) = start(&single, dir.path());
    wait_ready(&addr, &mut procs);
    let expected = ask(&addr);
    assert!(expected.contains("Paris"), "{expected}");
    drop(procs);

    // PP 2 on CPU nodes: two pods of one rank each.
    let pods = group_pods(&deployment("cpu", 1, 2));
    assert_eq!(pods.len(), 2);
    let (mut procs, addr) = start(&pods, dir.path());
    wait_ready(&addr, &mut procs);
    assert_eq!(ask(&addr), expected, "{}", logs(&procs));
    drop(procs);

    // TP 3 × PP 2 on L4 nodes: two pods, one per stage, each holding its stage's three tensor
    // ranks (one per GPU) as threads.
    let pods = group_pods(&deployment("l4", 3, 2));
    assert_eq!(pods.len(), 2);
    let (mut procs, addr) = start(&pods, dir.path());
    wait_ready(&addr, &mut procs);
    assert_eq!(ask(&addr), expected, "{}", logs(&procs));
    let stage1 = logs(&procs[1..]);
    assert!(
        stage1.contains("layers=15..30") && stage1.contains("tensor_rank=2"),
        "stage 1 should hold layers 15..30 as tensor ranks 0..3:\n{stage1}"
    );

    // A lost stage stops the other with an error: the pod fails (restartPolicy Never) and the
    // operator replaces the whole group.
    procs[1].child.kill().unwrap();
    let _ = procs[1].child.wait();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Ok(Some(s)) = procs[0].child.try_wait() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "rank 0 still runs 30 s after stage 1 died"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success(), "rank 0 exited with {status}");
    assert!(logs(&procs[..1]).contains("lost"), "{}", logs(&procs[..1]));
}
