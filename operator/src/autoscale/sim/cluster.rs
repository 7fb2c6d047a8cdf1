//! The simulated replicas of one deployment: creation with a cold start, draining, routing and
//! the GPU time they hold.

use super::{
    latency::LatencyModel,
    replica::{EngineLimits, Outcome, Replica},
    trace::Request,
};
use crate::autoscale::PodMetrics;

/// llmo-serve's busy-ratio window, seconds.
const BUSY_WINDOW: f64 = 10.0;

/// Replicas of one deployment under one scaling strategy.
#[derive(Debug)]
pub struct Cluster {
    replicas: Vec<Replica>,
    busy_marks: Vec<std::collections::VecDeque<(f64, f64)>>,
    next_id: u32,
    cold_start: f64,
    max: u32,
    gpus_per_replica: f64,
    /// GPU-seconds held so far (starting, serving and draining replicas).
    pub gpu_seconds: f64,
    last_account: f64,
    /// Requests finished (or cut off at the end).
    pub outcomes: Vec<Outcome>,
    /// Replicas asked for.
    pub target: u32,
    /// Target changes: (time, from, to).
    pub actions: Vec<(f64, u32, u32)>,
    /// Requests that arrived while no replica was ready.
    pending: std::collections::VecDeque<Request>,
    /// Every 5 s: (time, mean busy of ready replicas, waiting plus running across them).
    pub samples: Vec<(f64, f64, f64)>,
}

impl Cluster {
    /// `initial` ready replicas at time 0.
    pub fn new(initial: u32, cold_start: f64, max: u32, gpus_per_replica: u32) -> Self {
        let mut c = Self {
            replicas: Vec::new(),
            busy_marks: Vec::new(),
            next_id: 0,
            cold_start,
            max,
            gpus_per_replica: f64::from(gpus_per_replica),
            gpu_seconds: 0.0,
            last_account: 0.0,
            outcomes: Vec::new(),
            target: initial,
            actions: Vec::new(),
            pending: Default::default(),
            samples: Vec::new(),
        };
        for _ in 0..initial {
            c.create(0.0, 0.0);
        }
        c
    }

    fn create(&mut self, now: f64, delay: f64) {
        let name = format!("replica-{}", self.next_id);
        self.next_id += 1;
        self.replicas.push(Replica::new(name, now, now + delay));
        self.busy_marks.push(Default::default());
    }

    /// Asks for `n` replicas: creates them (ready after the cold start) or drains the surplus,
    /// cancelling replicas still starting first.
    pub fn set_target(&mut self, n: u32, now: f64) {
        let n = n.clamp(1, self.max);
        if n != self.target {
            self.actions.push((now, self.target, n));
        }
        self.target = n;
        let live = self.replicas.iter().filter(|r| !r.draining).count() as u32;
        for _ in live..n {
            self.create(now, self.cold_start);
        }
        let mut surplus = live.saturating_sub(n);
        while surplus > 0 {
            // Newest starting replica first, then the ready one with least work.
            let pick = self
                .replicas
                .iter()
                .enumerate()
                .filter(|(_, r)| !r.draining)
                .min_by(|(_, a), (_, b)| {
                    let a_key = (
                        a.ready_at <= now,
                        a.outstanding(),
                        std::cmp::Reverse(a.created as i64),
                    );
                    let b_key = (
                        b.ready_at <= now,
                        b.outstanding(),
                        std::cmp::Reverse(b.created as i64),
                    );
                    a_key.cmp(&b_key)
                })
                .map(|(i, _)| i);
            let Some(i) = pick else { break };
            self.replicas[i].draining = true;
            surplus -= 1;
        }
    }

    /// Runs every replica up to `now`, accounts GPU time and removes drained replicas.
    pub fn advance(&mut self, now: f64, model: &LatencyModel, limits: EngineLimits) {
        let alive = self.replicas.len() as f64;
        self.gpu_seconds += alive * self.gpus_per_replica * (now - self.last_account).max(0.0);
        self.last_account = now;
        for r in &mut self.replicas {
            if now >= r.ready_at {
                r.advance(now, model, limits, &mut self.outcomes);
            }
        }
        let mut i = 0;
        while i < self.replicas.len() {
            let r = &self.replicas[i];
            if r.draining && (r.outstanding() == 0 || now < r.ready_at) {
                self.replicas.swap_remove(i);
                self.busy_marks.swap_remove(i);
            } else {
                i += 1;
            }
        }
        if !self.pending.is_empty() && self.replicas.iter().any(|r| r.routable(now)) {
            for req in std::mem::take(&mut self.pending) {
                self.route(req, now);
            }
        }
    }

    /// Sends a request to the ready replica with the fewest outstanding requests (a
    /// least-request balancer), or holds it until one is ready.
    pub fn route(&mut self, req: Request, now: f64) {
        let best = self
            .replicas
            .iter_mut()
            .filter(|r| r.routable(now))
            .min_by_key(|r| r.outstanding());
        match best {
            Some(r) => r.enqueue(req),
            None => self.pending.push_back(req),
        }
    }

    /// Records each replica's busy time (call every second) and, every 5 s, a fleet sample.
    pub fn sample(&mut self, now: f64) {
        for (r, marks) in self.replicas.iter().zip(&mut self.busy_marks) {
            marks.push_back((now, r.busy_total()));
            while marks.len() > 1 && marks[0].0 < now - BUSY_WINDOW {
                marks.pop_front();
            }
        }
        if (now as u64).is_multiple_of(5) {
            let ready: Vec<usize> = (0..self.replicas.len())
                .filter(|i| self.replicas[*i].routable(now))
                .collect();
            let busy =
                ready.iter().map(|i| self.busy(*i, now)).sum::<f64>() / ready.len().max(1) as f64;
            let queue = ready
                .iter()
                .map(|i| self.replicas[*i].outstanding() as f64)
                .sum();
            self.samples.push((now, busy, queue));
        }
    }

    fn busy(&self, i: usize, now: f64) -> f64 {
        let marks = &self.busy_marks[i];
        match (marks.front(), marks.back()) {
            (Some(a), Some(b)) if b.0 > a.0 => ((b.1 - a.1) / (now - a.0)).clamp(0.0, 1.0),
            _ => 0.0,
        }
    }

    /// Scrapes of the ready replicas, as `/metrics` would return them.
    pub fn scrape(&self, now: f64) -> Vec<(String, PodMetrics)> {
        (0..self.replicas.len())
            .filter(|i| self.replicas[*i].routable(now))
            .map(|i| {
                (
                    self.replicas[i].name.clone(),
                    self.replicas[i].scrape(self.busy(i, now)),
                )
            })
            .collect()
    }

    /// Ready replicas.
    pub fn ready(&self, now: f64) -> u32 {
        self.replicas.iter().filter(|r| r.routable(now)).count() as u32
    }

    /// Ages of replicas still starting.
    pub fn starting_ages(&self, now: f64) -> Vec<f64> {
        self.replicas
            .iter()
            .filter(|r| !r.draining && now < r.ready_at)
            .map(|r| now - r.created)
            .collect()
    }

    /// Ends the run: requests still in flight become outcomes measured up to `now`.
    pub fn finish(&mut self, now: f64) {
        for r in &self.replicas {
            self.outcomes.extend(r.unfinished(now));
        }
        for req in &self.pending {
            self.outcomes.push(Outcome {
                arrival: req.arrival,
                ttft: now - req.arrival,
                tpot: 0.0,
            });
        }
    }
}
