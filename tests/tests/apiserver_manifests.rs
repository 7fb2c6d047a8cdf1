//! The CRDs, the examples and the broken manifests against a real Kubernetes v1.20.2 API server:
//! the oldest version llmo supports, which enforces the OpenAPI schema but not CEL rules.

use llmo_e2e::{cluster::ControlPlane, yaml_files};

#[test]
fn a_v1_20_api_server_installs_the_crds_admits_the_examples_and_refuses_broken_manifests() {
    let plane = ControlPlane::start();
    let version = plane.ok(&["version", "-o", "json"]);
    assert!(version.contains("\"gitVersion\": \"v1.20.2\""), "{version}");

    // 1.20's CRD schema has no CEL rules: the crds/ set is refused by kubectl, the variant
    // without them installs.
    let (accepted, text) = plane.try_kubectl(&["apply", "--dry-run=server", "-f", "crds/"]);
    assert!(!accepted, "{text}");
    assert!(text.contains("x-kubernetes-validations"), "{text}");
    plane.install_crds();

    plane.ok(&["create", "namespace", "inference"]);
    for file in yaml_files("examples") {
        plane.ok(&["apply", "-f", &file.to_string_lossy()]);
    }
    let names = plane.ok(&["get", "modeldeployments", "-A", "-o", "name"]);
    assert_eq!(names.lines().count(), 4, "{names}");
    // The printer columns are served.
    let table = plane.ok(&["get", "md", "-n", "inference"]);
    assert!(
        table.contains("TPXPP") && table.contains("TTFT-P95"),
        "{table}"
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
        let (accepted, text) = plane.try_kubectl(&["apply", "--dry-run=server", "-f", &path]);
        match server {
            "schema" => {
                assert!(!accepted, "{path} was admitted");
                // The refusal names the field: `spec.slo.ttft: Invalid value`, or kubectl's
                // `missing required field "uri"` for a missing one.
                let leaf = field.rsplit('.').next().unwrap();
                assert!(
                    text.contains(&field) || text.contains(leaf),
                    "{path}: {text}"
                );
            }
            // 1.20 does not evaluate CEL: the operator's validation refuses these instead.
            "cel" => assert!(accepted, "{path}: {text}"),
            other => panic!("{path}: unknown server mode {other}"),
        }
    }
}
