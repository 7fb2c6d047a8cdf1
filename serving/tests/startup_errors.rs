//! A broken or truncated model file fails at start-up with a message naming the file.

mod common;

use std::process::Command;

use llmo_serve::model::{load, Quantization};

fn truncated_copy(dir: &std::path::Path, len: usize) -> std::path::PathBuf {
    let bytes = std::fs::read(common::model_path()).unwrap();
    let p = dir.join("cut.gguf");
    std::fs::write(&p, &bytes[..len]).unwrap();
    p
}

#[test]
fn truncated_gguf_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    for len in [3, 100, 1_000_000, 50_000_000] {
        let p = truncated_copy(dir.path(), len);
        let err = load(&p, Quantization::Auto, 512, 1)
            .unwrap_err()
            .to_string();
        assert!(err.contains("cut.gguf"), "{len}: {err}");
        assert!(
            err.contains("truncated") || err.contains("not a GGUF file"),
            "{len}: {err}"
        );
    }
}

#[test]
fn server_refuses_to_start_on_a_truncated_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = truncated_copy(dir.path(), 50_000_000);
    let out = Command::new(env!("CARGO_BIN_EXE_llmo-serve"))
        .arg("--model")
        .arg(&p)
        .args(["--port", "0", "--host", "127.0.0.1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cut.gguf") && stderr.contains("truncated"),
        "{stderr}"
    );
}

#[test]
fn missing_file_and_wrong_format_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let err = load(&dir.path().join("absent.gguf"), Quantization::Auto, 512, 1)
        .unwrap_err()
        .to_string();
    assert!(err.contains("absent.gguf"), "{err}");
    let p = dir.path().join("model.safetensors");
    std::fs::write(&p, b"{\"__metadata__\":{}}").unwrap();
    let err = load(&p, Quantization::Auto, 512, 1)
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a GGUF file"), "{err}");
}
