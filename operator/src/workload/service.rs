//! The Services of a ModelDeployment: one headless Service per group for rank discovery, and one
//! ClusterIP Service as the endpoint clients use.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::{Service, ServicePort, ServiceSpec},
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};
use kube::{Resource, ResourceExt};

use super::{
    pod::GroupSpec, DIST_PORT, HTTP_PORT, LABEL_DEPLOYMENT, LABEL_GROUP, LABEL_RANK, LABEL_SERVING,
};
use crate::api::ModelDeployment;

/// Headless Service of a group. Not-ready addresses are published: ranks must find each other
/// before any of them is ready.
pub fn build_group_service(group: &GroupSpec<'_>) -> Service {
    let md = group.deployment;
    Service {
        metadata: ObjectMeta {
            name: Some(group.name()),
            namespace: md.namespace(),
            labels: Some(group.labels()),
            owner_references: md.controller_owner_ref(&()).map(|o| vec![o]),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            publish_not_ready_addresses: Some(true),
            selector: Some(BTreeMap::from([(LABEL_GROUP.to_owned(), group.name())])),
            ports: Some(vec![ServicePort {
                name: Some("dist".into()),
                port: DIST_PORT,
                target_port: Some(IntOrString::String("dist".into())),
                // Server-side apply keys port lists by port and protocol: it must be explicit.
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        status: None,
    }
}

/// The endpoint: port 80 to the HTTP port of every ready first-stage pod of the deployment.
pub fn build_endpoint_service(md: &ModelDeployment) -> Service {
    let labels = BTreeMap::from([
        (LABEL_DEPLOYMENT.to_owned(), md.name_any()),
        ("app.kubernetes.io/name".to_owned(), "llmo-serve".to_owned()),
        (
            "app.kubernetes.io/managed-by".to_owned(),
            "llmo-operator".to_owned(),
        ),
    ]);
    Service {
        metadata: ObjectMeta {
            name: Some(md.name_any()),
            namespace: md.namespace(),
            labels: Some(labels),
            owner_references: md.controller_owner_ref(&()).map(|o| vec![o]),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            selector: Some(BTreeMap::from([
                (LABEL_DEPLOYMENT.to_owned(), md.name_any()),
                (LABEL_RANK.to_owned(), "0".to_owned()),
                (LABEL_SERVING.to_owned(), "true".to_owned()),
            ])),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                target_port: Some(IntOrString::Int(HTTP_PORT)),
                // Server-side apply keys port lists by port and protocol: it must be explicit.
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        status: None,
    }
}
