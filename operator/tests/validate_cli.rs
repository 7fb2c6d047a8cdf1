//! `llmo-operator validate`: what a GitOps pipeline runs before it commits a manifest.

use std::{path::Path, process::Command};

fn validate(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_llmo-operator"))
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap())
        .arg("validate")
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
fn a_directory_of_examples_is_valid() {
    let (ok, out, err) = validate(&["-f", "examples/"]);
    assert!(ok, "{err}");
    // 4 ModelDeployments and 7 GPUClasses.
    assert_eq!(
        out.lines().filter(|l| l.ends_with(" is valid")).count(),
        11,
        "{out}"
    );
    assert!(
        out.contains("examples/gpuclasses.yaml: GPUClass/h100 is valid"),
        "{out}"
    );
}

#[test]
fn every_broken_manifest_fails_with_its_message() {
    let (ok, _, err) = validate(&["-f", "tests/fixtures/invalid/"]);
    assert!(!ok);
    assert!(
        err.contains("min-greater-than-max.yaml: document 1 (ModelDeployment/broken): spec.replicas: min (3) must not exceed max (1)"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 18, "one line per broken file:\n{err}");
}
