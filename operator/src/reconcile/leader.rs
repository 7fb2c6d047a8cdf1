//! Leader election on a `coordination.k8s.io/v1` Lease, so several operator replicas can run and
//! exactly one reconciles.
//!
//! The rules, as client-go applies them: a replica may take the lease when it is free (no holder)
//! or expired (not renewed for `leaseDurationSeconds`); the holder renews it every `renew` period;
//! every write carries the `resourceVersion` read before it, so two candidates racing for an
//! expired lease cannot both win (the loser gets 409 Conflict). A leader that cannot renew within
//! the lease duration stops leading: the process exits so it restarts as a candidate rather than
//! risk two leaders. On a clean shutdown the leader gives the lease up, so a standby takes over at
//! once instead of after the lease expires.
//!
//! Time is compared with the API server's clock as seen through the lease's own `renewTime`,
//! written by the holder; clocks of nodes are assumed to agree within a second or two, which is
//! what client-go assumes too.

use std::time::Duration;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::{SignedDuration, Timestamp},
};
use kube::{api::PostParams, Api, Client};
use tracing::{info, warn};

use super::ReconcileError;

/// What a candidate should do with the lease it read. Pure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseAction {
    /// Nobody holds it, or the holder let it expire: write ourselves as the holder.
    Acquire,
    /// We hold it: renew it.
    Renew,
    /// Someone else holds a live lease: wait.
    Wait,
}

/// What `decide` needs to know about a lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseView {
    /// Current holder, if any.
    pub holder: Option<String>,
    /// Last renewal (or acquisition).
    pub renewed: Option<Timestamp>,
    /// How long a renewal is good for.
    pub duration: Duration,
}

impl LeaseView {
    /// Reads the fields of a Lease object.
    pub fn of(lease: &Lease) -> Self {
        let spec = lease.spec.clone().unwrap_or_default();
        Self {
            holder: spec.holder_identity.filter(|h| !h.is_empty()),
            renewed: spec.renew_time.or(spec.acquire_time).map(|t| t.0),
            duration: Duration::from_secs(
                u64::try_from(spec.lease_duration_seconds.unwrap_or(15)).unwrap_or(15),
            ),
        }
    }
}

/// Decides what `me` does with `lease` at `now`.
pub fn decide(lease: &LeaseView, me: &str, now: Timestamp) -> LeaseAction {
    match &lease.holder {
        None => LeaseAction::Acquire,
        Some(h) if h == me => LeaseAction::Renew,
        Some(_) => {
            let expired = match lease.renewed {
                None => true,
                Some(t) => {
                    let age = now.duration_since(t);
                    age >= SignedDuration::try_from(lease.duration).unwrap_or(SignedDuration::MAX)
                }
            };
            if expired {
                LeaseAction::Acquire
            } else {
                LeaseAction::Wait
            }
        }
    }
}

/// Settings of the election.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// Lease name.
    pub name: String,
    /// Lease namespace.
    pub namespace: String,
    /// This replica's identity (the pod name).
    pub identity: String,
    /// How long a renewal holds the lease.
    pub duration: Duration,
    /// How often the holder renews and a candidate retries.
    pub renew: Duration,
}

/// A lease held by this replica: renew it with [`Elector::renew`].
#[derive(Debug)]
pub struct Elector {
    api: Api<Lease>,
    config: LeaseConfig,
    /// The last version we wrote or read, for compare-and-swap.
    held: Option<Lease>,
}

impl Elector {
    /// An elector for `config`.
    pub fn new(client: Client, config: LeaseConfig) -> Self {
        Self {
            api: Api::namespaced(client, &config.namespace),
            config,
            held: None,
        }
    }

    /// Waits until this replica holds the lease.
    pub async fn acquire(&mut self) -> Result<(), ReconcileError> {
        let mut waiting_logged = None;
        loop {
            match self.try_once().await {
                Ok(true) => {
                    info!(lease = %self.config.name, identity = %self.config.identity, "became the leader");
                    return Ok(());
                }
                Ok(false) => {
                    let holder = self
                        .held
                        .as_ref()
                        .and_then(|l| LeaseView::of(l).holder)
                        .unwrap_or_default();
                    if waiting_logged.as_ref() != Some(&holder) {
                        info!(lease = %self.config.name, %holder, "standing by: another replica leads");
                        waiting_logged = Some(holder);
                    }
                }
                Err(e) => warn!(error = %e, "lease election attempt failed; retrying"),
            }
            tokio::time::sleep(self.config.renew).await;
        }
    }

    /// Renews the held lease. `Ok(false)` means it was lost (someone else holds it now).
    pub async fn renew(&mut self) -> Result<bool, ReconcileError> {
        self.try_once().await
    }

    /// One round: read, decide, write. `Ok(true)` when we hold the lease afterwards.
    async fn try_once(&mut self) -> Result<bool, ReconcileError> {
        let name = &self.config.name;
        let now = Timestamp::now();
        let current = self
            .api
            .get_opt(name)
            .await
            .map_err(|e| ReconcileError::kube(format!("reading lease {name}"), e))?;
        let Some(current) = current else {
            let lease = self.lease_object(None, now, 0);
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(l) => {
                    self.held = Some(l);
                    Ok(true)
                }
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(ReconcileError::kube(format!("creating lease {name}"), e)),
            };
        };
        let view = LeaseView::of(&current);
        let action = decide(&view, &self.config.identity, now);
        let transitions = current
            .spec
            .as_ref()
            .and_then(|s| s.lease_transitions)
            .unwrap_or(0);
        let acquired = current
            .spec
            .as_ref()
            .and_then(|s| s.acquire_time.clone())
            .map(|t| t.0);
        let updated = match action {
            LeaseAction::Wait => {
                self.held = Some(current);
                return Ok(false);
            }
            LeaseAction::Renew => {
                self.lease_object(Some(&current), acquired.unwrap_or(now), transitions)
            }
            LeaseAction::Acquire => self.lease_object(Some(&current), now, transitions + 1),
        };
        match self
            .api
            .replace(name, &PostParams::default(), &updated)
            .await
        {
            Ok(l) => {
                self.held = Some(l);
                Ok(true)
            }
            // Someone wrote in between: they won this round.
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(ReconcileError::kube(format!("writing lease {name}"), e)),
        }
    }

    /// Gives the lease up so a standby can take it at once.
    pub async fn release(&mut self) {
        let Some(held) = self.held.take() else {
            return;
        };
        if LeaseView::of(&held).holder.as_deref() != Some(self.config.identity.as_str()) {
            return;
        }
        let mut lease = held;
        if let Some(spec) = lease.spec.as_mut() {
            spec.holder_identity = None;
            spec.lease_duration_seconds = Some(1);
            spec.renew_time = Some(MicroTime(Timestamp::now()));
        }
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => info!(lease = %self.config.name, "released the lease"),
            Err(e) => warn!(error = %e, "could not release the lease; it expires on its own"),
        }
    }

    fn lease_object(
        &self,
        current: Option<&Lease>,
        acquired: Timestamp,
        transitions: i32,
    ) -> Lease {
        let now = Timestamp::now();
        let metadata = match current {
            Some(c) => c.metadata.clone(),
            None => ObjectMeta {
                name: Some(self.config.name.clone()),
                namespace: Some(self.config.namespace.clone()),
                ..Default::default()
            },
        };
        Lease {
            metadata,
            spec: Some(LeaseSpec {
                holder_identity: Some(self.config.identity.clone()),
                lease_duration_seconds: Some(
                    i32::try_from(self.config.duration.as_secs()).unwrap_or(15),
                ),
                acquire_time: Some(MicroTime(acquired)),
                renew_time: Some(MicroTime(now)),
                lease_transitions: Some(transitions),
                ..Default::default()
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(holder: Option<&str>, renewed_ago_s: Option<i64>, now: Timestamp) -> LeaseView {
        LeaseView {
            holder: holder.map(str::to_owned),
            renewed: renewed_ago_s.map(|s| now - SignedDuration::from_secs(s)),
            duration: Duration::from_secs(15),
        }
    }

    #[test]
    fn free_lease_is_acquired() {
        let now = Timestamp::now();
        assert_eq!(
            decide(&view(None, None, now), "a", now),
            LeaseAction::Acquire
        );
        assert_eq!(
            decide(&view(None, Some(1), now), "a", now),
            LeaseAction::Acquire
        );
    }

    #[test]
    fn own_lease_is_renewed_even_when_late() {
        let now = Timestamp::now();
        assert_eq!(
            decide(&view(Some("a"), Some(3), now), "a", now),
            LeaseAction::Renew
        );
        assert_eq!(
            decide(&view(Some("a"), Some(60), now), "a", now),
            LeaseAction::Renew
        );
    }

    #[test]
    fn live_lease_of_another_waits_and_expired_one_is_taken() {
        let now = Timestamp::now();
        assert_eq!(
            decide(&view(Some("b"), Some(14), now), "a", now),
            LeaseAction::Wait
        );
        assert_eq!(
            decide(&view(Some("b"), Some(15), now), "a", now),
            LeaseAction::Acquire
        );
        assert_eq!(
            decide(&view(Some("b"), None, now), "a", now),
            LeaseAction::Acquire
        );
        // A renewal from the future (clock skew) is live, not expired.
        assert_eq!(
            decide(&view(Some("b"), Some(-5), now), "a", now),
            LeaseAction::Wait
        );
    }

    #[test]
    fn view_reads_lease_fields() {
        let t = Timestamp::now();
        let lease = Lease {
            metadata: ObjectMeta::default(),
            spec: Some(LeaseSpec {
                holder_identity: Some(String::new()),
                lease_duration_seconds: Some(7),
                acquire_time: Some(MicroTime(t)),
                ..Default::default()
            }),
        };
        let v = LeaseView::of(&lease);
        assert_eq!(v.holder, None, "an empty holder is no holder");
        assert_eq!(v.renewed, Some(t));
        assert_eq!(v.duration, Duration::from_secs(7));
    }
}
