//! Every example is accepted and every broken manifest is refused with its own message, both by
//! the operator's Rust validation and by the checks an API server applies (schema and CEL).

use std::collections::BTreeMap;

use llmo_e2e::{
    server_side::{admit, check_schema, schema_for_kind, Refusal},
    yaml_files,
};
use llmo_operator::api::{parse_manifests, HumanDuration};
use serde_json::Value;

fn documents(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|d| serde::Deserialize::deserialize(d).expect("valid YAML"))
        .filter(|v: &Value| !v.is_null())
        .collect()
}

#[test]
fn every_example_is_valid_for_the_operator_and_the_api_server() {
    let files = yaml_files("examples");
    assert!(
        files.len() >= 5,
        "examples/ should hold the documented manifests"
    );
    let mut kinds = BTreeMap::<String, usize>::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for result in parse_manifests(&text) {
            let manifest = result.unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            let kind = manifest.describe().split('/').next().unwrap().to_owned();
            *kinds.entry(kind).or_default() += 1;
        }
        for doc in documents(&text) {
            admit(&doc).unwrap_or_else(|refusal| panic!("{}: {refusal}", file.display()));
        }
    }
    assert!(kinds["ModelDeployment"] >= 4, "{kinds:?}");
    assert_eq!(kinds["GPUClass"], 7, "the default GPU classes: {kinds:?}");
}

#[test]
fn gpu_class_defaults_cover_the_documented_fleet() {
    let text =
        std::fs::read_to_string(llmo_e2e::repo_root().join("examples/gpuclasses.yaml")).unwrap();
    let names: Vec<String> = documents(&text)
        .iter()
        .map(|d| d["metadata"]["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["h100", "h200", "a100", "l40s", "l4", "a10g", "cpu"]);
}

struct Fixture {
    file: String,
    expect: String,
    server: String,
    doc: Value,
    text: String,
}

fn fixtures() -> Vec<Fixture> {
    yaml_files("tests/fixtures/invalid")
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).unwrap();
            let header = |key: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(&format!("# {key}: ")))
                    .unwrap_or_else(|| panic!("{}: needs a '# {key}:' line", path.display()))
                    .to_owned()
            };
            let mut docs = documents(&text);
            assert_eq!(docs.len(), 1, "{}: one object per fixture", path.display());
            Fixture {
                file: path.file_name().unwrap().to_string_lossy().into_owned(),
                expect: header("expect"),
                server: header("server"),
                doc: docs.remove(0),
                text,
            }
        })
        .collect()
}

#[test]
fn every_invalid_manifest_is_refused_by_the_operator_with_its_own_message() {
    let fixtures = fixtures();
    assert!(fixtures.len() >= 12, "only {} fixtures", fixtures.len());
    for f in &fixtures {
        let results = parse_manifests(&f.text);
        assert_eq!(results.len(), 1, "{}", f.file);
        let err = match &results[0] {
            Ok(m) => panic!("{}: {} was accepted", f.file, m.describe()),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains(&f.expect),
            "{}: message does not say what is wrong\n  got:  {err}\n  want: {}",
            f.file,
            f.expect
        );
    }
    let mut seen = BTreeMap::new();
    for f in &fixtures {
        if let Some(other) = seen.insert(f.expect.clone(), f.file.clone()) {
            panic!("{} and {other} expect the same message", f.file);
        }
    }
}

#[test]
fn every_invalid_manifest_is_refused_by_the_api_server_checks() {
    for f in fixtures() {
        let refusal =
            admit(&f.doc).expect_err(&format!("{}: the API server would accept it", f.file));
        match (f.server.as_str(), &refusal) {
            // Enforced by every Kubernetes version, including those that ignore CEL.
            ("schema", Refusal::Schema(_)) => {}
            // Enforced by 1.25+; older servers rely on the operator's validation (tested above),
            // so check the schema alone lets it through and the CEL message is the useful one.
            ("cel", Refusal::Cel(messages)) => {
                // The rule sits on the object holding the field: compare up to any list index.
                let field = f.expect.split([':', '[']).next().unwrap();
                assert!(
                    messages
                        .iter()
                        .any(|m| m.contains(field) || m.contains(&f.expect)),
                    "{}: CEL message should name {field}: {messages:?}",
                    f.file
                );
            }
            (want, got) => panic!("{}: expected a {want} refusal, got {got}", f.file),
        }
    }
}

#[test]
fn the_duration_pattern_and_the_parser_agree() {
    let schema = schema_for_kind("ModelDeployment").unwrap();
    let ttft = &schema["properties"]["spec"]["properties"]["slo"]["properties"]["ttft"];
    assert_eq!(ttft["type"], "string", "{ttft}");
    for input in [
        "500ms",
        "2s",
        "1.5s",
        "1m30s",
        "1h2m3s4ms",
        "0s",
        "-1s",
        "5",
        "s",
        "2 s",
        "5sec",
        "1..2s",
        ".5s",
        "5.s",
        "",
    ] {
        let by_schema = check_schema(ttft, &Value::from(input)).is_ok();
        let by_parser = input.parse::<HumanDuration>().is_ok();
        assert_eq!(
            by_schema, by_parser,
            "{input:?}: schema {by_schema}, parser {by_parser}"
        );
    }
}
