//! What the kubelet knows of a pod, and the `PodStatus` written from it.

use std::{collections::BTreeMap, net::Ipv4Addr};

use k8s_openapi::{
    api::core::v1::{
        ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
        ContainerStatus, HostIP, PodCondition, PodIP, PodStatus,
    },
    apimachinery::pkg::apis::meta::v1::Time,
    jiff::Timestamp,
};

use super::process::Exit;

/// A finished run of a container.
#[derive(Clone, Debug, PartialEq)]
pub struct Terminated {
    /// How it ended.
    pub exit: Exit,
    /// `Completed` (exit 0), `Error`, `StartError`...
    pub reason: String,
    /// For people.
    pub message: Option<String>,
    /// When it started.
    pub started_at: Option<Timestamp>,
    /// When it ended.
    pub finished_at: Timestamp,
    /// `process://<pid>`.
    pub container_id: Option<String>,
}

/// The state of a container.
#[derive(Clone, Debug, PartialEq)]
pub enum State {
    /// Not running: being created, backing off, or refused.
    Waiting {
        /// `ContainerCreating`, `CrashLoopBackOff`, `CreateContainerConfigError`...
        reason: String,
        /// For people.
        message: Option<String>,
    },
    /// Running since.
    Running {
        /// Start time.
        started_at: Timestamp,
    },
    /// Ended (and not restarting).
    Terminated(Terminated),
}

/// One container of a pod.
#[derive(Clone, Debug, PartialEq)]
pub struct ContainerRecord {
    /// Container name.
    pub name: String,
    /// Image as the pod names it.
    pub image: String,
    /// `file://<binary>` once mapped.
    pub image_id: String,
    /// Current state.
    pub state: State,
    /// The previous run, once restarted.
    pub last: Option<Terminated>,
    /// Readiness.
    pub ready: bool,
    /// Startup probe passed.
    pub started: bool,
    /// Restarts so far.
    pub restart_count: i32,
    /// `process://<pid>` of the current or last run.
    pub container_id: Option<String>,
    /// It will not run again (terminated under its restart policy).
    pub done: bool,
}

impl ContainerRecord {
    /// A container that has not started yet.
    pub fn new(name: &str, image: &str) -> Self {
        Self {
            name: name.to_owned(),
            image: image.to_owned(),
            image_id: String::new(),
            state: State::Waiting {
                reason: "ContainerCreating".to_owned(),
                message: None,
            },
            last: None,
            ready: false,
            started: false,
            restart_count: 0,
            container_id: None,
            done: false,
        }
    }

    fn to_status(&self) -> ContainerStatus {
        ContainerStatus {
            name: self.name.clone(),
            image: self.image.clone(),
            image_id: self.image_id.clone(),
            container_id: self.container_id.clone(),
            ready: self.ready,
            started: Some(self.started),
            restart_count: self.restart_count,
            state: Some(state_of(&self.state)),
            last_state: Some(
                self.last
                    .as_ref()
                    .map(|t| state_of(&State::Terminated(t.clone())))
                    .unwrap_or_default(),
            ),
            ..Default::default()
        }
    }
}

fn state_of(state: &State) -> ContainerState {
    match state {
        State::Waiting { reason, message } => ContainerState {
            waiting: Some(ContainerStateWaiting {
                reason: Some(reason.clone()),
                message: message.clone(),
            }),
            ..Default::default()
        },
        State::Running { started_at } => ContainerState {
            running: Some(ContainerStateRunning {
                started_at: Some(Time(*started_at)),
            }),
            ..Default::default()
        },
        State::Terminated(t) => ContainerState {
            terminated: Some(ContainerStateTerminated {
                exit_code: t.exit.code,
                signal: t.exit.signal,
                reason: Some(t.reason.clone()),
                message: t.message.clone(),
                started_at: t.started_at.map(Time),
                finished_at: Some(Time(t.finished_at)),
                container_id: t.container_id.clone(),
            }),
            ..Default::default()
        },
    }
}

/// Everything the kubelet reports of one pod.
#[derive(Clone, Debug, PartialEq)]
pub struct PodState {
    /// The node's address.
    pub host_ip: Ipv4Addr,
    /// The pod's address, once given.
    pub pod_ip: Option<Ipv4Addr>,
    /// When the kubelet took the pod.
    pub start_time: Timestamp,
    /// A pod-level failure (`reason`, `message`): the pod is Failed.
    pub failure: Option<(String, String)>,
    /// Init containers have all succeeded.
    pub init_done: bool,
    /// Init containers.
    pub init_containers: Vec<ContainerRecord>,
    /// Containers.
    pub containers: Vec<ContainerRecord>,
    transitions: BTreeMap<&'static str, (bool, Timestamp)>,
}

impl PodState {
    /// A pod just taken.
    pub fn new(
        host_ip: Ipv4Addr,
        init_containers: Vec<ContainerRecord>,
        containers: Vec<ContainerRecord>,
    ) -> Self {
        Self {
            host_ip,
            pod_ip: None,
            start_time: Timestamp::now(),
            failure: None,
            init_done: init_containers.is_empty(),
            init_containers,
            containers,
            transitions: BTreeMap::new(),
        }
    }

    /// The pod phase, following the kubelet's rules.
    pub fn phase(&self) -> &'static str {
        if self.failure.is_some() {
            return "Failed";
        }
        let init_failed = self
            .init_containers
            .iter()
            .any(|c| c.done && matches!(&c.state, State::Terminated(t) if t.exit.code != 0));
        if init_failed {
            return "Failed";
        }
        if !self.init_done {
            return "Pending";
        }
        let (mut fresh, mut running, mut failed, mut restarting) = (0, 0, 0, 0);
        for c in &self.containers {
            match &c.state {
                State::Running { .. } => running += 1,
                State::Waiting { .. } if c.last.is_none() && c.restart_count == 0 => fresh += 1,
                State::Waiting { .. } => restarting += 1,
                State::Terminated(_) if !c.done => restarting += 1,
                State::Terminated(t) => {
                    if t.exit.code != 0 {
                        failed += 1;
                    }
                }
            }
        }
        if fresh > 0 {
            "Pending"
        } else if running > 0 || restarting > 0 {
            "Running"
        } else if failed > 0 {
            "Failed"
        } else {
            "Succeeded"
        }
    }

    /// Whether no container will run again.
    pub fn is_terminal(&self) -> bool {
        matches!(self.phase(), "Failed" | "Succeeded")
    }

    fn condition(
        &mut self,
        type_: &'static str,
        status: bool,
        reason: Option<&str>,
        message: Option<String>,
    ) -> PodCondition {
        let now = Timestamp::now();
        let since = match self.transitions.get(type_) {
            Some((was, since)) if *was == status => *since,
            _ => {
                self.transitions.insert(type_, (status, now));
                now
            }
        };
        PodCondition {
            type_: type_.to_owned(),
            status: if status { "True" } else { "False" }.to_owned(),
            last_transition_time: Some(Time(since)),
            reason: (!status).then(|| reason.map(str::to_owned)).flatten(),
            message: (!status).then_some(message).flatten(),
            ..Default::default()
        }
    }

    /// The status to write.
    pub fn to_status(&mut self) -> PodStatus {
        let phase = self.phase();
        let unready: Vec<&str> = self
            .containers
            .iter()
            .filter(|c| !c.ready)
            .map(|c| c.name.as_str())
            .collect();
        let all_ready = unready.is_empty() && phase == "Running";
        let unready_message = (!unready.is_empty())
            .then(|| format!("containers with unready status: [{}]", unready.join(" ")));
        let not_ready_reason = if phase == "Succeeded" || phase == "Failed" {
            "PodCompleted"
        } else {
            "ContainersNotReady"
        };
        let uninitialized: Vec<&str> = self
            .init_containers
            .iter()
            .filter(|c| !c.done)
            .map(|c| c.name.as_str())
            .collect();
        let init_message = (!self.init_done).then(|| {
            format!(
                "containers with incomplete status: [{}]",
                uninitialized.join(" ")
            )
        });
        let init_done = self.init_done;
        let conditions = vec![
            self.condition(
                "Initialized",
                init_done,
                Some("ContainersNotInitialized"),
                init_message,
            ),
            self.condition(
                "Ready",
                all_ready,
                Some(not_ready_reason),
                unready_message.clone(),
            ),
            self.condition(
                "ContainersReady",
                all_ready,
                Some(not_ready_reason),
                unready_message,
            ),
            self.condition("PodScheduled", true, None, None),
        ];
        let ip = |a: Ipv4Addr| a.to_string();
        PodStatus {
            phase: Some(phase.to_owned()),
            reason: self.failure.as_ref().map(|(r, _)| r.clone()),
            message: self.failure.as_ref().map(|(_, m)| m.clone()),
            host_ip: Some(ip(self.host_ip)),
            host_ips: Some(vec![HostIP {
                ip: ip(self.host_ip),
            }]),
            pod_ip: self.pod_ip.map(ip),
            pod_ips: self.pod_ip.map(|a| vec![PodIP { ip: ip(a) }]),
            start_time: Some(Time(self.start_time)),
            conditions: Some(conditions),
            qos_class: Some("BestEffort".to_owned()),
            init_container_statuses: (!self.init_containers.is_empty()).then(|| {
                self.init_containers
                    .iter()
                    .map(ContainerRecord::to_status)
                    .collect()
            }),
            container_statuses: Some(
                self.containers
                    .iter()
                    .map(ContainerRecord::to_status)
                    .collect(),
            ),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn terminated(code: i32) -> Terminated {
        Terminated {
            exit: Exit { code, signal: None },
            reason: if code == 0 { "Completed" } else { "Error" }.into(),
            message: None,
            started_at: None,
            finished_at: Timestamp::now(),
            container_id: None,
        }
    }

    #[test]
    fn phases_follow_the_containers() {
        let mut s = PodState::new(
            Ipv4Addr::LOCALHOST,
            vec![],
            vec![
                ContainerRecord::new("a", "i"),
                ContainerRecord::new("b", "i"),
            ],
        );
        assert_eq!(s.phase(), "Pending");
        s.containers[0].state = State::Running {
            started_at: Timestamp::now(),
        };
        assert_eq!(s.phase(), "Pending");
        s.containers[1].state = State::Running {
            started_at: Timestamp::now(),
        };
        assert_eq!(s.phase(), "Running");
        // Restarting after a crash is still Running.
        s.containers[0].state = State::Waiting {
            reason: "CrashLoopBackOff".into(),
            message: None,
        };
        s.containers[0].last = Some(terminated(1));
        s.containers[0].restart_count = 1;
        assert_eq!(s.phase(), "Running");
        for c in &mut s.containers {
            c.state = State::Terminated(terminated(0));
            c.done = true;
        }
        assert_eq!(s.phase(), "Succeeded");
        s.containers[1].state = State::Terminated(terminated(2));
        assert_eq!(s.phase(), "Failed");
        let status = s.to_status();
        let ready = status
            .conditions
            .unwrap()
            .into_iter()
            .find(|c| c.type_ == "Ready")
            .unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_deref()),
            ("False", Some("PodCompleted"))
        );
    }

    #[test]
    fn ready_needs_every_container_ready() {
        let mut s = PodState::new(
            Ipv4Addr::LOCALHOST,
            vec![],
            vec![ContainerRecord::new("a", "i")],
        );
        s.containers[0].state = State::Running {
            started_at: Timestamp::now(),
        };
        let cond = |s: &mut PodState| {
            s.to_status()
                .conditions
                .unwrap()
                .into_iter()
                .find(|c| c.type_ == "Ready")
                .unwrap()
        };
        let first = cond(&mut s);
        assert_eq!(first.status, "False");
        assert_eq!(
            first.message.as_deref(),
            Some("containers with unready status: [a]")
        );
        s.containers[0].ready = true;
        assert_eq!(cond(&mut s).status, "True");
    }
}
