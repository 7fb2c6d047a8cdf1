//! Reading llmo manifests from YAML, with errors that name the document, the object and the field.
//!
//! Used by `llmo-operator validate`, by `plan -f` and by the tests of `examples/`.

use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;

use super::{
    validate_gpu_class, validate_model_deployment, GPUClass, GPUNode, ModelDeployment,
    ValidationErrors,
};

/// One llmo object read from a manifest.
#[derive(Debug, Clone)]
pub enum Manifest {
    /// A ModelDeployment.
    ModelDeployment(Box<ModelDeployment>),
    /// A GPUClass.
    GpuClass(Box<GPUClass>),
    /// A GPUNode.
    GpuNode(Box<GPUNode>),
}

impl Manifest {
    /// `Kind/name`, for messages.
    pub fn describe(&self) -> String {
        match self {
            Self::ModelDeployment(o) => format!("ModelDeployment/{}", o.name_any()),
            Self::GpuClass(o) => format!("GPUClass/{}", o.name_any()),
            Self::GpuNode(o) => format!("GPUNode/{}", o.name_any()),
        }
    }
}

/// Why a manifest document was refused.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// Not YAML.
    #[error("document {doc}: not valid YAML: {source}")]
    Yaml {
        /// 1-based document index.
        doc: usize,
        /// The parser's error.
        source: serde_yaml::Error,
    },
    /// apiVersion/kind are missing or not llmo's.
    #[error("document {doc}: {api_version}/{kind} is not an llmo resource; expected apiVersion llmo.dev/v1alpha1 with kind ModelDeployment, GPUClass or GPUNode")]
    UnknownKind {
        /// 1-based document index.
        doc: usize,
        /// apiVersion found.
        api_version: String,
        /// kind found.
        kind: String,
    },
    /// A field has the wrong shape (unknown enum value, wrong type, missing required field).
    #[error("document {doc} ({kind}/{name}): {path}: {message}")]
    Field {
        /// 1-based document index.
        doc: usize,
        /// Kind of the object.
        kind: String,
        /// metadata.name, or `?`.
        name: String,
        /// Path of the field, e.g. `spec.quantization`.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// The object is well-formed but breaks a rule.
    #[error("document {doc} ({kind}/{name}): {errors}")]
    Invalid {
        /// 1-based document index.
        doc: usize,
        /// Kind of the object.
        kind: String,
        /// metadata.name.
        name: String,
        /// Every rule broken.
        errors: ValidationErrors,
    },
}

/// Parses every document of a multi-document YAML file and validates each llmo object.
/// Empty documents are skipped. One result per non-empty document.
pub fn parse_manifests(yaml: &str) -> Vec<Result<Manifest, ManifestError>> {
    let mut results = Vec::new();
    for (i, document) in serde_yaml::Deserializer::from_str(yaml).enumerate() {
        let doc = i + 1;
        let value = match serde::Deserialize::deserialize(document) {
            Ok(serde_json::Value::Null) => continue,
            Ok(v) => v,
            Err(source) => {
                results.push(Err(ManifestError::Yaml { doc, source }));
                continue;
            }
        };
        results.push(parse_one(doc, value));
    }
    results
}

fn parse_one(doc: usize, value: serde_json::Value) -> Result<Manifest, ManifestError> {
    let field = |v: &serde_json::Value, key: &str| {
        v.get(key)
            .and_then(|s| s.as_str())
            .unwrap_or("<missing>")
            .to_owned()
    };
    let api_version = field(&value, "apiVersion");
    let kind = field(&value, "kind");
    if api_version != ModelDeployment::api_version(&()) {
        return Err(ManifestError::UnknownKind {
            doc,
            api_version,
            kind,
        });
    }
    let name = value
        .pointer("/metadata/name")
        .and_then(|n| n.as_str())
        .unwrap_or("?")
        .to_owned();
    let invalid = |errors| ManifestError::Invalid {
        doc,
        kind: kind.clone(),
        name: name.clone(),
        errors,
    };
    match kind.as_str() {
        "ModelDeployment" => {
            let md: ModelDeployment = typed(doc, &kind, &name, value)?;
            validate_model_deployment(&md).map_err(invalid)?;
            Ok(Manifest::ModelDeployment(Box::new(md)))
        }
        "GPUClass" => {
            let class: GPUClass = typed(doc, &kind, &name, value)?;
            validate_gpu_class(&class).map_err(invalid)?;
            Ok(Manifest::GpuClass(Box::new(class)))
        }
        "GPUNode" => Ok(Manifest::GpuNode(Box::new(typed(
            doc, &kind, &name, value,
        )?))),
        _ => Err(ManifestError::UnknownKind {
            doc,
            api_version,
            kind,
        }),
    }
}

fn typed<T: DeserializeOwned>(
    doc: usize,
    kind: &str,
    name: &str,
    value: serde_json::Value,
) -> Result<T, ManifestError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        ManifestError::Field {
            doc,
            kind: kind.to_owned(),
            name: name.to_owned(),
            path: if path == "." {
                "(root)".to_owned()
            } else {
                path
            },
            message: e.into_inner().to_string(),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_several_documents_and_skips_empty_ones() {
        let yaml = r#"
---
apiVersion: llmo.dev/v1alpha1
kind: ModelDeployment
metadata: {name: a}
spec: {model: {uri: "hf://o/r"}, gpu: {class: cpu}}
---
---
apiVersion: llmo.dev/v1alpha1
kind: GPUClass
metadata: {name: cpu}
spec: {device: cpu, memory: 16Gi, memoryBandwidthGBps: 15, tflops: {fp32: 1}}
"#;
        let out: Vec<_> = parse_manifests(yaml)
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].describe(), "ModelDeployment/a");
        assert_eq!(out[1].describe(), "GPUClass/cpu");
    }

    #[test]
    fn field_errors_carry_the_path() {
        let yaml = r#"
apiVersion: llmo.dev/v1alpha1
kind: ModelDeployment
metadata: {name: a}
spec: {model: {uri: "hf://o/r"}, gpu: {class: cpu}, quantization: int3}
"#;
        let err = parse_manifests(yaml).remove(0).unwrap_err().to_string();
        assert!(err.contains("ModelDeployment/a"), "{err}");
        assert!(
            err.contains("spec.quantization: unknown variant `int3`"),
            "{err}"
        );
    }

    #[test]
    fn foreign_kinds_are_named() {
        let err = parse_manifests("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n")
            .remove(0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("v1/Pod is not an llmo resource"), "{err}");
    }
}
