//! Playing the kubelet by hand in tests without one: set a pod's phase and Ready condition.

use crate::cluster::ControlPlane;

impl ControlPlane {
    /// Names of the pods of ModelDeployment `deployment` (default namespace), sorted.
    pub fn pods_of(&self, deployment: &str) -> Vec<String> {
        self.pods_matching(&format!("llmo.dev/deployment={deployment}"))
    }

    /// Names of the pods of `deployment` that take traffic: not draining.
    pub fn serving_pods_of(&self, deployment: &str) -> Vec<String> {
        self.pods_matching(&format!(
            "llmo.dev/deployment={deployment},llmo.dev/serving=true"
        ))
    }

    /// Names of the pods (default namespace) that match a label selector, sorted.
    pub fn pods_matching(&self, selector: &str) -> Vec<String> {
        let text = self.ok(&[
            "get",
            "pods",
            "-l",
            selector,
            "-o",
            "jsonpath={.items[*].metadata.name}",
        ]);
        let mut names: Vec<String> = text.split_whitespace().map(str::to_owned).collect();
        names.sort();
        names
    }

    /// Sets a pod's phase, and its Ready condition (true when running).
    pub fn set_pod_phase(&self, pod: &str, phase: &str) {
        let ready = if phase == "Running" { "True" } else { "False" };
        let patch = format!(
            r#"{{"status":{{"phase":"{phase}","conditions":[{{"type":"Ready","status":"{ready}"}}]}}}}"#
        );
        self.ok(&[
            "patch",
            "pod",
            pod,
            "--subresource=status",
            "--type",
            "merge",
            "-p",
            &patch,
        ]);
    }

    /// Marks a pod running and ready.
    pub fn mark_pod_ready(&self, pod: &str) {
        self.set_pod_phase(pod, "Running");
    }
}
