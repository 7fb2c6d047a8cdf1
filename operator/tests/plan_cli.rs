//! `llmo-operator plan` on the shipped examples, as a reviewer would run it.

use std::{path::Path, process::Command};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

fn plan(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_llmo-operator"))
        .current_dir(repo())
        .arg("plan")
        .args(args)
        .output()
        .expect("llmo-operator runs");
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn every_example_plans_on_the_default_classes() {
    for example in [
        "examples/smollm2-cpu.yaml",
        "examples/llama3-8b-l4.yaml",
        "examples/llama3-70b-h100-fp8.yaml",
        "examples/llama3-405b-multinode.yaml",
    ] {
        let (ok, out, err) = plan(&["-f", example, "--classes", "examples/gpuclasses.yaml"]);
        assert!(ok, "{example}: {err}");
        assert!(
            out.contains("layout") && out.contains("KV cache"),
            "{example}: {out}"
        );
    }
}

#[test]
fn the_multinode_example_spans_two_nodes() {
    let (ok, out, err) = plan(&[
        "-f",
        "examples/llama3-405b-multinode.yaml",
        "--classes",
        "examples/gpuclasses.yaml",
    ]);
    assert!(ok, "{err}");
    assert!(
        out.contains("tensor 8 x pipeline 2 = 16 h100 per replica"),
        "{out}"
    );
}

#[test]
fn placement_uses_the_inventory_and_avoids_the_failed_gpu() {
    let (ok, out, err) = plan(&[
        "-f",
        "examples/llama3-70b-h100-fp8.yaml",
        "--classes",
        "examples/gpuclasses.yaml",
        "--inventory",
        "examples/inventory/small-fleet.yaml",
    ]);
    assert!(ok, "{err}");
    assert!(
        out.contains("layout           tensor 2 x pipeline 1 = 2 h100 per replica"),
        "{out}"
    );
    assert!(
        out.contains("group 0: rank 0 on h100-node-a GPUs 0,1"),
        "{out}"
    );
    assert!(
        out.contains("group 1: rank 0 on h100-node-a GPUs 2,3"),
        "{out}"
    );

    // The 8B example wants 4 L4 on one node: only l4-node-a has 4 healthy.
    let (ok, out, err) = plan(&[
        "-f",
        "examples/llama3-8b-l4.yaml",
        "--classes",
        "examples/gpuclasses.yaml",
        "--inventory",
        "examples/inventory/small-fleet.yaml",
    ]);
    assert!(ok, "{err}");
    assert!(
        out.contains("group 0: rank 0 on l4-node-a GPUs 0,1,2,3"),
        "{out}"
    );
}

#[test]
fn the_cpu_plan_respects_the_pod_memory_limit() {
    let (ok, out, err) = plan(&[
        "-f",
        "examples/smollm2-cpu.yaml",
        "--classes",
        "examples/gpuclasses.yaml",
    ]);
    assert!(ok, "{err}");
    // resources.memory is 1Gi in the example, well under the class's 16Gi.
    assert!(out.contains("of 1.0GiB"), "{out}");
}

#[test]
fn an_unknown_class_says_how_to_pass_classes() {
    let (ok, _, err) = plan(&["-f", "examples/llama3-8b-l4.yaml"]);
    assert!(!ok);
    assert!(err.contains("GPUClass \"l4\" is not defined"), "{err}");
    assert!(err.contains("--classes"), "{err}");
}

#[test]
fn reads_the_model_from_a_gguf_file() {
    let model = std::env::var("LLMO_TEST_MODEL").unwrap_or_else(|_| {
        let cache = std::env::var("LLMO_CACHE")
            .unwrap_or_else(|_| format!("{}/.cache/llmo", std::env::var("HOME").unwrap()));
        format!("{cache}/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    });
    assert!(
        Path::new(&model).exists(),
        "{model} is missing; run scripts/fetch-model.sh first"
    );
    let (ok, out, err) = plan(&[
        "-f",
        "examples/smollm2-cpu.yaml",
        "--classes",
        "examples/gpuclasses.yaml",
        "--model-config",
        &model,
    ]);
    assert!(ok, "{err}");
    assert!(
        out.contains("(134M parameters)") || out.contains("(135M parameters)"),
        "{out}"
    );
}

#[test]
fn a_cpu_deployment_is_placed_on_cpu_nodes_as_the_operator_would() {
    let inventory =
        std::env::temp_dir().join(format!("llmo-cpu-inventory-{}.yaml", std::process::id()));
    std::fs::write(
        &inventory,
        "apiVersion: llmo.dev/v1alpha1\nkind: GPUNode\nmetadata: {name: cpu-a}\nspec: {}\nstatus: {gpuClass: cpu}\n",
    )
    .unwrap();
    let (ok, out, err) = plan(&[
        "-f",
        "examples/smollm2-cpu.yaml",
        "--classes",
        "examples/gpuclasses.yaml",
        "--inventory",
        inventory.to_str().unwrap(),
    ]);
    let _ = std::fs::remove_file(&inventory);
    assert!(ok, "{err}");
    assert!(out.contains("group 0: rank 0 on cpu-a GPUs "), "{out}");
    assert!(!out.contains("cannot place"), "{out}");
}
