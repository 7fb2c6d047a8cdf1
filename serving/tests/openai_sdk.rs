//! The official `openai` Python SDK against a real server (needs python3 with `openai`).

mod common;

use std::process::Command;

#[test]
fn openai_python_sdk_works() {
    let server = common::Server::start(&[]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/openai_sdk_client.py");
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let out = Command::new(&python)
        .arg(script)
        .arg(&server.base)
        .arg("smollm2")
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {python}: {e}; install python3 and `pip install openai`")
        });
    assert!(
        out.status.success(),
        "openai SDK checks failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
