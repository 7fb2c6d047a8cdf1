//! Cumulative Prometheus histograms and the quantile of the requests observed between two scrapes.
//!
//! A serving pod's histogram counts every request since the process started, so a percentile of
//! the raw buckets describes the pod's whole life, not the last minute. The autoscaler needs the
//! recent tail, so it subtracts an older scrape from a newer one bucket by bucket and reads the
//! quantile of the difference, the way PromQL's `histogram_quantile(rate(..[w]))` does.

/// One cumulative histogram as exposed: `(upper bound, count of observations ≤ bound)` in
/// ascending order of bound, the last bound usually `+Inf`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Histogram {
    /// Upper bounds and cumulative counts, ascending.
    pub buckets: Vec<(f64, f64)>,
    /// Sum of all observations.
    pub sum: f64,
    /// Number of observations.
    pub count: f64,
}

impl Histogram {
    /// An empty histogram with these finite upper bounds plus `+Inf`.
    pub fn with_bounds(bounds: &[f64]) -> Self {
        let mut buckets: Vec<(f64, f64)> = bounds.iter().map(|b| (*b, 0.0)).collect();
        buckets.push((f64::INFINITY, 0.0));
        Self {
            buckets,
            sum: 0.0,
            count: 0.0,
        }
    }

    /// Records `n` observations of `value` (used by the fleet simulator, which exposes the same
    /// histograms the serving binary does).
    pub fn observe_n(&mut self, value: f64, n: f64) {
        for (bound, count) in &mut self.buckets {
            if value <= *bound {
                *count += n;
            }
        }
        self.sum += value * n;
        self.count += n;
    }

    /// Observations made between `older` and `self`. A pod that restarted in between has lower
    /// counts than before; its whole current histogram is then the delta, as Prometheus treats
    /// counter resets. Returns `None` when the bucket layouts differ (a different binary).
    pub fn delta_since(&self, older: &Histogram) -> Option<Histogram> {
        if self.buckets.len() != older.buckets.len()
            || self
                .buckets
                .iter()
                .zip(&older.buckets)
                .any(|(a, b)| !same_bound(a.0, b.0))
        {
            return None;
        }
        if self.count < older.count {
            return Some(self.clone());
        }
        Some(Histogram {
            buckets: self
                .buckets
                .iter()
                .zip(&older.buckets)
                .map(|(a, b)| (a.0, (a.1 - b.1).max(0.0)))
                .collect(),
            sum: self.sum - older.sum,
            count: self.count - older.count,
        })
    }

    /// Adds another histogram with the same bounds (pods of one deployment share a binary).
    /// Returns false, leaving `self` unchanged, when the bounds differ.
    pub fn merge(&mut self, other: &Histogram) -> bool {
        if self.buckets.is_empty() {
            *self = other.clone();
            return true;
        }
        if self.buckets.len() != other.buckets.len()
            || self
                .buckets
                .iter()
                .zip(&other.buckets)
                .any(|(a, b)| !same_bound(a.0, b.0))
        {
            return false;
        }
        for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
            a.1 += b.1;
        }
        self.sum += other.sum;
        self.count += other.count;
        true
    }

    /// The `q` quantile (0 < q < 1) by linear interpolation inside the bucket that holds it, as
    /// PromQL's `histogram_quantile` does. A quantile in the `+Inf` bucket reads as the largest
    /// finite bound: the true value is at least that. `None` when nothing was observed.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.buckets.last().map(|b| b.1).unwrap_or(0.0);
        if total <= 0.0 {
            return None;
        }
        let rank = q * total;
        let mut lower_bound = 0.0;
        let mut lower_count = 0.0;
        for &(bound, count) in &self.buckets {
            if count >= rank {
                if bound.is_infinite() {
                    return Some(lower_bound);
                }
                let in_bucket = count - lower_count;
                if in_bucket <= 0.0 {
                    return Some(bound);
                }
                return Some(
                    lower_bound + (bound - lower_bound) * (rank - lower_count) / in_bucket,
                );
            }
            lower_bound = bound;
            lower_count = count;
        }
        Some(lower_bound)
    }
}

fn same_bound(a: f64, b: f64) -> bool {
    a == b || (a - b).abs() <= 1e-9 * a.abs().max(b.abs())
}

/// The bucket bounds llmo-serve uses for time to first token: 5 ms doubling 14 times.
pub fn ttft_bounds() -> Vec<f64> {
    exponential(0.005, 2.0, 14)
}

/// The bucket bounds llmo-serve uses for inter-token latency: 1 ms doubling 14 times.
pub fn itl_bounds() -> Vec<f64> {
    exponential(0.001, 2.0, 14)
}

fn exponential(start: f64, factor: f64, n: usize) -> Vec<f64> {
    std::iter::successors(Some(start), |b| Some(b * factor))
        .take(n)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantile_interpolates_inside_the_bucket() {
        let mut h = Histogram::with_bounds(&[0.1, 0.2, 0.4]);
        h.observe_n(0.05, 50.0);
        h.observe_n(0.15, 50.0);
        // Rank 95 of 100 falls 45/50 of the way through (0.1, 0.2].
        let p95 = h.quantile(0.95).unwrap();
        assert!((p95 - 0.19).abs() < 1e-9, "{p95}");
    }

    #[test]
    fn delta_forgets_old_observations() {
        let mut old = Histogram::with_bounds(&[0.1, 1.0]);
        old.observe_n(0.9, 1000.0);
        let mut new = old.clone();
        new.observe_n(0.05, 100.0);
        let d = new.delta_since(&old).unwrap();
        assert_eq!(d.count, 100.0);
        assert!(d.quantile(0.95).unwrap() <= 0.1);
    }

    #[test]
    fn restart_counts_the_new_process_only() {
        let mut old = Histogram::with_bounds(&[0.1]);
        old.observe_n(0.05, 500.0);
        let mut new = Histogram::with_bounds(&[0.1]);
        new.observe_n(0.05, 7.0);
        assert_eq!(new.delta_since(&old).unwrap().count, 7.0);
    }
}
