//! Events about pods (`kubectl describe pod` shows them), published without waiting: a failed
//! publish is logged and otherwise ignored.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder};

/// Publishes Events about one object.
#[derive(Clone)]
pub struct Events {
    recorder: Recorder,
    reference: ObjectReference,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events")
            .field("reference", &self.reference)
            .finish_non_exhaustive()
    }
}

impl Events {
    /// Events about `reference`.
    pub fn new(recorder: Recorder, reference: ObjectReference) -> Self {
        Self {
            recorder,
            reference,
        }
    }

    /// A `Normal` event.
    pub fn normal(&self, reason: &str, note: String) {
        self.publish(EventType::Normal, reason, note);
    }

    /// A `Warning` event.
    pub fn warning(&self, reason: &str, note: String) {
        self.publish(EventType::Warning, reason, note);
    }

    fn publish(&self, type_: EventType, reason: &str, mut note: String) {
        if note.len() > 1000 {
            let mut end = 1000;
            while !note.is_char_boundary(end) {
                end -= 1;
            }
            note.truncate(end);
        }
        let event = Event {
            type_,
            reason: reason.to_owned(),
            note: Some(note),
            action: reason.to_owned(),
            secondary: None,
        };
        let recorder = self.recorder.clone();
        let reference = self.reference.clone();
        tokio::spawn(async move {
            if let Err(error) = recorder.publish(&event, &reference).await {
                tracing::debug!(%error, reason = %event.reason, "publishing an event failed");
            }
        });
    }
}
