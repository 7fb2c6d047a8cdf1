//! The `agent` command as a person runs it, through the built binary.

use std::process::Command;

fn agent(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_llmo-operator"))
        .arg("agent")
        .args(args)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        // Whatever the machine running the tests has, these variables must not leak in.
        .env_remove("LLMO_SIMULATE")
        .env_remove("LLMO_CPU_CLASS")
        .env_remove("LLMO_NODE_NAME")
        .output()
        .expect("the binary runs")
}

fn nvml_present() -> bool {
    [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib64",
        "/usr/lib",
        "/usr/local/nvidia/lib64",
    ]
    .iter()
    .any(|dir| std::path::Path::new(dir).join("libnvidia-ml.so.1").exists())
}

#[test]
fn without_nvml_the_agent_says_so_in_one_line_and_fails() {
    if nvml_present() {
        eprintln!("skipped: this machine has NVML; the no-NVML path cannot be exercised here");
        return;
    }
    let out = agent(&["--node-name", "node-1"]);
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(out.stdout.is_empty());
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr:?}");
    assert!(
        stderr.starts_with("llmo-operator agent: NVML is not available on this node (libnvidia-ml.so.1 not found); run on a node with the NVIDIA driver or pass --simulate PROFILE"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"));
}

#[test]
fn the_node_name_comes_from_the_environment_too() {
    if nvml_present() {
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_llmo-operator"))
        .args(["agent"])
        .env("LLMO_NODE_NAME", "node-1")
        .env_remove("LLMO_SIMULATE")
        .output()
        .unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    // Past argument parsing: it fails on NVML, not on a missing --node-name.
    assert!(stderr.contains("NVML is not available"), "{stderr}");
}

#[test]
fn a_bad_profile_is_refused_with_its_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        "gpus: [{count: 2, product: X, memoryTotalMiB: 100}]\nevents: [{at: 1m, gpu: 5, health: Unhealthy}]\n",
    )
    .unwrap();
    let out = agent(&["--node-name", "n", "--simulate", path.to_str().unwrap()]);
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stderr.lines().count(), 1, "{stderr:?}");
    assert!(
        stderr.contains(
            "bad.yaml: events[0].gpu: GPU 5 does not exist; the profile has 2 GPUs (0..1)"
        ),
        "{stderr}"
    );
    let out = agent(&["--node-name", "n", "--simulate", "no/such/profile.yaml"]);
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("cannot read simulation profile no/such/profile.yaml"),
        "{stderr}"
    );
}

#[test]
fn measure_writes_prints_the_table_without_a_cluster() {
    let out = agent(&[
        "--simulate",
        "examples/simulated/8xh100-nvlink.yaml",
        "--simulate",
        "examples/simulated/4xl4-pcie.yaml",
        "--classes",
        "examples/gpuclasses.yaml",
        "--measure-writes",
        "6h",
    ]);
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{stdout}");
    assert!(stdout.contains("every-sample"), "{stdout}");
    let row = stdout
        .lines()
        .find(|l| l.starts_with("8xh100-nvlink"))
        .expect("a row per profile");
    let columns: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(columns[1], "6.0");
    assert_eq!(columns[2], "2160", "6 h of 10 s samples");
    assert_eq!(columns[3], "360.0");
}
