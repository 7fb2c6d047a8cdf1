//! The CRDs, the examples and the broken manifests against a real Kubernetes v1.20.2 API server:
//! the oldest version llmo supports, which enforces the OpenAPI schema but not CEL rules.

use llmo_e2e::{cluster::ControlPlane, yaml_files};

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn a_v1_20_api_server_installs_the_crds_admits_the_examples_and_refuses_broken_manifests() {
    let plane = ControlPlane::start();
    let version = plane.kubectl(&["version", "-o", "json"]);
    assert!(
        text(&version).contains("\"gitVersion\": \"v1.20.2\""),
        "{}",
        text(&version)
    );

    // 1.20's CRD schema has no CEL rules: the crds/ set is refused by kubectl, the variant
    // without them installs.
    let with_cel = plane.kubectl(&["apply", "--dry-run=server", "-f", "crds/"]);
    assert!(!with_cel.status.success(), "{}", text(&with_cel));
    assert!(
        text(&with_cel).contains("x-kubernetes-validations"),
        "{}",
        text(&with_cel)
    );
    let out = plane.kubectl(&["apply", "-f", "crds/without-cel/"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = plane.kubectl(&[
        "wait",
        "--for",
        "condition=established",
        "crd",
        "--all",
        "--timeout",
        "60s",
    ]);
    assert!(out.status.success(), "{}", text(&out));

    let out = plane.kubectl(&["create", "namespace", "inference"]);
    assert!(out.status.success(), "{}", text(&out));
    for file in yaml_files("examples") {
        let path = file.to_string_lossy().into_owned();
        let out = plane.kubectl(&["apply", "-f", &path]);
        assert!(out.status.success(), "{path}: {}", text(&out));
    }
    let out = plane.kubectl(&["get", "modeldeployments", "-A", "-o", "name"]);
    assert_eq!(text(&out).lines().count(), 4, "{}", text(&out));
    // The printer columns are served.
    let out = plane.kubectl(&["get", "md", "-n", "inference"]);
    assert!(
        text(&out).contains("TPXPP") && text(&out).contains("TTFT-P95"),
        "{}",
        text(&out)
    );

    for file in yaml_files("tests/fixtures/invalid") {
        let path = file.to_string_lossy().into_owned();
        let fixture = std::fs::read_to_string(&file).unwrap();
        let server = fixture
            .lines()
            .find_map(|l| l.strip_prefix("# server: "))
            .expect("each fixture says how a server refuses it");
        let field = fixture
            .lines()
            .find_map(|l| l.strip_prefix("# expect: "))
            .and_then(|e| e.split([':', '[']).next())
            .unwrap()
            .to_owned();
        let out = plane.kubectl(&["apply", "--dry-run=server", "-f", &path]);
        match server {
            "schema" => {
                assert!(!out.status.success(), "{path} was admitted");
                // The refusal names the field: `spec.slo.ttft: Invalid value`, or kubectl's
                // `missing required field "uri"` for a missing one.
                let leaf = field.rsplit('.').next().unwrap();
                assert!(
                    text(&out).contains(&field) || text(&out).contains(leaf),
                    "{path}: {}",
                    text(&out)
                );
            }
            // 1.20 does not evaluate CEL: the operator's validation refuses these instead.
            "cel" => assert!(out.status.success(), "{path}: {}", text(&out)),
            other => panic!("{path}: unknown server mode {other}"),
        }
    }
}
