//! Watches the pods bound to the kubelet's nodes (one watch per node, `spec.nodeName=<node>`)
//! and keeps one worker per pod (by UID) informed.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use futures::{stream, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::{
    runtime::{watcher, WatchStreamExt},
    Api,
};
use tokio::{sync::watch, task::JoinSet};

use super::{
    worker::{run_pod, Control, PodUpdate},
    Shared,
};

struct Worker {
    node: String,
    tx: watch::Sender<PodUpdate>,
}

/// Runs pods until `shutdown` turns true, then stops every pod's processes and returns.
pub async fn run(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let streams = shared.nodes.keys().map(|node| {
        let api: Api<Pod> = Api::all(shared.client.clone());
        let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
        let node = node.clone();
        watcher(api, config)
            .default_backoff()
            .map(move |event| (node.clone(), event))
            .boxed()
    });
    let mut events = stream::select_all(streams);
    let mut workers: HashMap<String, Worker> = HashMap::new();
    let mut tasks: JoinSet<String> = JoinSet::new();
    // UIDs seen during a (re)list, per node; whatever was not seen is gone.
    let mut listing: HashMap<String, HashSet<String>> = HashMap::new();

    let start = |pod: Pod,
                 node: &str,
                 workers: &mut HashMap<String, Worker>,
                 tasks: &mut JoinSet<String>| {
        let Some(uid) = pod.metadata.uid.clone() else {
            return;
        };
        let update = PodUpdate {
            pod: Arc::new(pod),
            control: Control::Run,
        };
        match workers.get(&uid) {
            Some(worker) => {
                worker.tx.send_replace(update);
            }
            None => {
                let (tx, rx) = watch::channel(update);
                let shared = shared.clone();
                let task_uid = uid.clone();
                tasks.spawn(async move {
                    run_pod(shared, rx).await;
                    task_uid
                });
                workers.insert(
                    uid,
                    Worker {
                        node: node.to_owned(),
                        tx,
                    },
                );
            }
        }
    };
    let gone = |worker: &Worker| {
        worker.tx.send_modify(|u| u.control = Control::Gone);
    };

    loop {
        tokio::select! {
            changed = shutdown.changed() => {
                if changed.is_err() || *shutdown.borrow() {
                    break;
                }
            }
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                match done {
                    Ok(uid) => { workers.remove(&uid); }
                    Err(error) => tracing::error!(%error, "a pod worker failed"),
                }
            }
            Some((node, event)) = events.next() => match event {
                Ok(watcher::Event::Apply(pod)) => start(pod, &node, &mut workers, &mut tasks),
                Ok(watcher::Event::Delete(pod)) => {
                    if let Some(worker) = pod.metadata.uid.as_ref().and_then(|uid| workers.get(uid)) {
                        gone(worker);
                    }
                }
                Ok(watcher::Event::Init) => {
                    listing.insert(node, HashSet::new());
                }
                Ok(watcher::Event::InitApply(pod)) => {
                    if let (Some(seen), Some(uid)) = (listing.get_mut(&node), pod.metadata.uid.clone()) {
                        seen.insert(uid);
                    }
                    start(pod, &node, &mut workers, &mut tasks);
                }
                Ok(watcher::Event::InitDone) => {
                    let seen = listing.remove(&node).unwrap_or_default();
                    for (uid, worker) in &workers {
                        if worker.node == node && !seen.contains(uid) {
                            gone(worker);
                        }
                    }
                }
                Err(error) => tracing::warn!(%node, %error, "pod watch failed; retrying"),
            },
        }
    }

    tracing::info!(pods = workers.len(), "stopping every pod");
    for worker in workers.values() {
        worker.tx.send_modify(|u| u.control = Control::Shutdown);
    }
    // Workers bound their own wait by the shutdown grace period; this is a backstop.
    let backstop = shared.config.shutdown_grace + Duration::from_secs(10);
    let drained = tokio::time::timeout(backstop, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!("some pods did not stop in time; their processes die with the kubelet");
    }
}
