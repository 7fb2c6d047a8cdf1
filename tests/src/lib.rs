//! End-to-end tests of llmo and the helpers they share: locating the repository's manifests
//! and checking objects the way an API server would (OpenAPI schema, then CEL rules).
#![forbid(unsafe_code)]

pub mod cluster;
pub mod helm;
pub mod kubelet;
pub mod net;
pub mod pods;
pub mod server_side;

use std::path::{Path, PathBuf};

/// The repository root (the parent of this crate's directory).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives inside the repository")
        .to_path_buf()
}

/// The YAML files of a repository directory, sorted by name.
pub fn yaml_files(dir: &str) -> Vec<PathBuf> {
    let dir = repo_root().join(dir);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("readable directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    files
}

/// A binary of the workspace, from the target directory this test was built into. `cargo test
/// --workspace` builds every package's binaries; run `cargo build -p PACKAGE` when testing this
/// crate alone.
pub fn workspace_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary has a path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let path = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join(name))
        .expect("the test binary sits in target/<profile>/deps");
    assert!(
        path.exists(),
        "{} is missing: build it first (cargo build -p llmo-operator)",
        path.display()
    );
    path
}
