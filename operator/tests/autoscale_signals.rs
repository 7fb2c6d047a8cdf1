//! Signals from hand-made scrapes: histogram-delta percentiles, rates, and reasons for missing
//! or stale metrics.

use llmo_operator::autoscale::{
    compute_signals, parse_metrics, status, ScrapeHistory, SignalConfig,
};

/// A scrape body with TTFT buckets (cumulative counts at 0.1, 0.5, 1, 2 s, +Inf).
fn body(ttft: [u64; 5], prompt: u64, generated: u64, waiting: u64, busy: f64) -> String {
    let bounds = ["0.1", "0.5", "1", "2", "+Inf"];
    let mut s = String::from("# TYPE llmo_time_to_first_token_seconds histogram\n");
    for (b, c) in bounds.iter().zip(ttft) {
        s += &format!("llmo_time_to_first_token_seconds_bucket{{le=\"{b}\"}} {c}\n");
    }
    s += &format!("llmo_time_to_first_token_seconds_count {}\n", ttft[4]);
    s += "llmo_time_to_first_token_seconds_sum 0\n";
    s += "llmo_inter_token_latency_seconds_bucket{le=\"0.05\"} 100\nllmo_inter_token_latency_seconds_bucket{le=\"+Inf\"} 100\n";
    s += &format!(
        "llmo_requests_waiting {waiting}\nllmo_requests_running 4\nllmo_engine_busy_ratio {busy}\n"
    );
    s += &format!(
        "llmo_prompt_tokens_total {prompt}\nllmo_generation_tokens_total {generated}\n# EOF\n"
    );
    s
}

fn cfg() -> SignalConfig {
    SignalConfig {
        window: 30.0,
        stale_after: 15.0,
    }
}

#[test]
fn p95_reads_only_the_requests_of_the_window() {
    let mut h = ScrapeHistory::default();
    // Before the window: 1,000 slow requests (all between 1 and 2 s).
    h.record(
        "a",
        0.0,
        parse_metrics(&body([0, 0, 0, 1000, 1000], 0, 0, 0, 0.5)).unwrap(),
    );
    // In the window: 100 more, 96 under 100 ms and 4 between 0.1 and 0.5 s.
    h.record(
        "a",
        30.0,
        parse_metrics(&body([96, 100, 100, 1100, 1100], 30_000, 3_000, 2, 0.5)).unwrap(),
    );
    let s = compute_signals(&h, &["a"], 30.0, &cfg()).unwrap();
    assert_eq!(s.requests, 100.0);
    // Rank 95 of 100 falls in (0, 0.1]: 0.1 * 95/96.
    let p95 = s.ttft_p95.unwrap();
    assert!((p95 - 0.1 * 95.0 / 96.0).abs() < 1e-9, "{p95}");
    assert!((s.prompt_tokens_per_second - 1000.0).abs() < 1e-9);
    assert!((s.generation_tokens_per_second - 100.0).abs() < 1e-9);
    assert_eq!(s.queue_depth, 2.0);
}

#[test]
fn pods_add_up_and_a_restarted_pod_counts_from_zero() {
    let mut h = ScrapeHistory::default();
    h.record(
        "a",
        0.0,
        parse_metrics(&body([0, 0, 0, 0, 0], 0, 0, 0, 0.2)).unwrap(),
    );
    h.record(
        "a",
        30.0,
        parse_metrics(&body([0, 0, 10, 10, 10], 3_000, 0, 1, 0.4)).unwrap(),
    );
    // Pod b restarted: its counters went down; the new values are the increase.
    h.record(
        "b",
        0.0,
        parse_metrics(&body([500, 500, 500, 500, 500], 90_000, 0, 0, 0.6)).unwrap(),
    );
    h.record(
        "b",
        30.0,
        parse_metrics(&body([10, 10, 10, 10, 10], 3_000, 0, 3, 0.8)).unwrap(),
    );
    let s = compute_signals(&h, &["a", "b"], 30.0, &cfg()).unwrap();
    assert_eq!(s.requests, 20.0);
    assert!((s.prompt_tokens_per_second - 200.0).abs() < 1e-9);
    assert!((s.utilization - 0.6).abs() < 1e-9);
    assert_eq!(s.queue_depth, 4.0);
    // Half the requests under 100 ms, half in (0.5, 1]: p95 in the upper bucket.
    let p95 = s.ttft_p95.unwrap();
    assert!(p95 > 0.5 && p95 <= 1.0, "{p95}");
}

#[test]
fn a_window_without_requests_has_no_percentile() {
    let mut h = ScrapeHistory::default();
    let same = body([5, 5, 5, 5, 5], 10, 10, 0, 0.0);
    h.record("a", 0.0, parse_metrics(&same).unwrap());
    h.record("a", 30.0, parse_metrics(&same).unwrap());
    let s = compute_signals(&h, &["a"], 30.0, &cfg()).unwrap();
    assert_eq!(s.ttft_p95, None);
    assert_eq!(s.requests, 0.0);
}

#[test]
fn stale_metrics_are_a_reason_not_a_guess() {
    let mut h = ScrapeHistory::default();
    h.record(
        "a",
        0.0,
        parse_metrics(&body([1, 1, 1, 1, 1], 0, 0, 0, 0.1)).unwrap(),
    );
    let err = compute_signals(&h, &["a"], 60.0, &cfg()).unwrap_err();
    assert_eq!(err.reason, "StaleMetrics");
    assert!(
        err.message.contains("pod a") && err.message.contains("60s old"),
        "{}",
        err.message
    );
    let (state, reason, _) = status::metrics_condition(&Err(err));
    assert_eq!((state, reason), ("False", "StaleMetrics"));
}

#[test]
fn missing_pods_and_families_are_reasons() {
    let h = ScrapeHistory::default();
    assert_eq!(
        compute_signals(&h, &[], 0.0, &cfg()).unwrap_err().reason,
        "NoReadyPods"
    );
    assert_eq!(
        compute_signals(&h, &["a"], 0.0, &cfg()).unwrap_err().reason,
        "NotScraped"
    );
    let mut h = ScrapeHistory::default();
    h.record(
        "a",
        0.0,
        parse_metrics("llmo_requests_waiting 1\nllmo_engine_busy_ratio 0.5\n").unwrap(),
    );
    let err = compute_signals(&h, &["a"], 1.0, &cfg()).unwrap_err();
    assert_eq!(err.reason, "MissingMetric");
    assert!(
        err.message.contains("llmo_time_to_first_token_seconds"),
        "{}",
        err.message
    );
}

#[test]
fn pruning_keeps_a_baseline_for_the_full_window() {
    let mut h = ScrapeHistory::default();
    for i in 0..20 {
        let t = i as f64 * 5.0;
        h.record(
            "a",
            t,
            parse_metrics(&body([i, i, i, i, i], 0, 0, 0, 0.1)).unwrap(),
        );
    }
    h.record(
        "gone",
        0.0,
        parse_metrics(&body([0; 5], 0, 0, 0, 0.1)).unwrap(),
    );
    h.prune(&["a"], 95.0, 35.0);
    assert!(h.scrapes("gone").is_none());
    let kept = h.scrapes("a").unwrap();
    assert!(kept.front().unwrap().0 <= 95.0 - 30.0);
    let s = compute_signals(&h, &["a"], 95.0, &cfg()).unwrap();
    assert_eq!(s.requests, 6.0);
}
