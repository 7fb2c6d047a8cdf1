//! Reads the serving metrics the autoscaler needs out of Prometheus text exposition.
//!
//! Only the handful of families named in the design are kept; everything else a pod exposes is
//! skipped, so a newer serving binary with more metrics never breaks the operator.

use super::{histogram::Histogram, AutoscaleError};

/// Metric family names, as llmo-serve exposes them.
pub mod names {
    /// Histogram of time to first token, seconds.
    pub const TTFT: &str = "llmo_time_to_first_token_seconds";
    /// Histogram of time between output tokens, seconds.
    pub const ITL: &str = "llmo_inter_token_latency_seconds";
    /// Gauge: sequences in the running batch.
    pub const RUNNING: &str = "llmo_requests_running";
    /// Gauge: sequences waiting for admission.
    pub const WAITING: &str = "llmo_requests_waiting";
    /// Gauge: fraction of KV-cache blocks in use.
    pub const KV_USAGE: &str = "llmo_kv_cache_usage_ratio";
    /// Gauge: fraction of recent wall time the engine spent computing.
    pub const BUSY: &str = "llmo_engine_busy_ratio";
    /// Counter: prompt tokens admitted.
    pub const PROMPT_TOKENS: &str = "llmo_prompt_tokens_total";
    /// Counter: tokens generated.
    pub const GENERATION_TOKENS: &str = "llmo_generation_tokens_total";
}

/// What one scrape of one serving pod says. A field is `None` when the pod did not expose it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PodMetrics {
    /// Time to first token since the pod started.
    pub ttft: Option<Histogram>,
    /// Inter-token latency since the pod started.
    pub itl: Option<Histogram>,
    /// Sequences in the running batch now.
    pub running: Option<f64>,
    /// Sequences waiting now.
    pub waiting: Option<f64>,
    /// KV-cache usage now.
    pub kv_usage: Option<f64>,
    /// Engine busy fraction over the pod's own recent window.
    pub busy: Option<f64>,
    /// Prompt tokens since start.
    pub prompt_tokens: Option<f64>,
    /// Generated tokens since start.
    pub generation_tokens: Option<f64>,
}

/// Parses a `/metrics` body. Malformed lines of families the autoscaler reads are errors (a
/// silently half-read histogram would skew the percentile); other families are not examined.
pub fn parse_metrics(text: &str) -> Result<PodMetrics, AutoscaleError> {
    let mut m = PodMetrics::default();
    let mut ttft = Partial::default();
    let mut itl = Partial::default();
    for (index, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name_end = line
            .find(|c: char| c == '{' || c.is_whitespace())
            .unwrap_or(line.len());
        let name = &line[..name_end];
        let (family, target) = if let Some(suffix) = name.strip_prefix(names::TTFT) {
            (suffix, Some(&mut ttft))
        } else if let Some(suffix) = name.strip_prefix(names::ITL) {
            (suffix, Some(&mut itl))
        } else {
            (name, None)
        };
        let gauge = match name {
            names::RUNNING => Some(&mut m.running),
            names::WAITING => Some(&mut m.waiting),
            names::KV_USAGE => Some(&mut m.kv_usage),
            names::BUSY => Some(&mut m.busy),
            names::PROMPT_TOKENS => Some(&mut m.prompt_tokens),
            names::GENERATION_TOKENS => Some(&mut m.generation_tokens),
            _ => None,
        };
        if target.is_none() && gauge.is_none() {
            continue;
        }
        let bad = |message: &str| AutoscaleError::Exposition {
            line: index + 1,
            message: format!("{message}: {raw:?}"),
        };
        let (labels, value) = split_sample(&line[name_end..]).map_err(bad)?;
        if let Some(slot) = gauge {
            *slot = Some(value);
            continue;
        }
        let Some(partial) = target else { continue };
        match family {
            "_bucket" => {
                let le = label(labels, "le").ok_or_else(|| bad("a bucket without `le`"))?;
                let bound = parse_number(&le).ok_or_else(|| bad("an unreadable `le`"))?;
                partial.buckets.push((bound, value));
            }
            "_sum" => partial.sum = Some(value),
            "_count" => partial.count = Some(value),
            _ => {}
        }
    }
    m.ttft = ttft.finish();
    m.itl = itl.finish();
    Ok(m)
}

#[derive(Default)]
struct Partial {
    buckets: Vec<(f64, f64)>,
    sum: Option<f64>,
    count: Option<f64>,
}

impl Partial {
    fn finish(mut self) -> Option<Histogram> {
        if self.buckets.is_empty() {
            return None;
        }
        self.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        let last = self.buckets.last().map(|b| b.1).unwrap_or(0.0);
        Some(Histogram {
            buckets: self.buckets,
            sum: self.sum.unwrap_or(0.0),
            count: self.count.unwrap_or(last),
        })
    }
}

/// Splits `{labels} value [timestamp]` (labels optional) into the label text and the value.
fn split_sample(rest: &str) -> Result<(&str, f64), &'static str> {
    let rest = rest.trim_start();
    let (labels, tail) = if let Some(inner) = rest.strip_prefix('{') {
        let mut in_quotes = false;
        let mut escaped = false;
        let mut close = None;
        for (i, c) in inner.char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => in_quotes = !in_quotes,
                '}' if !in_quotes => {
                    close = Some(i);
                    break;
                }
                _ => {}
            }
        }
        let close = close.ok_or("an unclosed label set")?;
        (&inner[..close], &inner[close + 1..])
    } else {
        ("", rest)
    };
    let value = tail
        .split_whitespace()
        .next()
        .and_then(parse_number)
        .ok_or("a sample without a readable value")?;
    Ok((labels, value))
}

fn parse_number(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => s.parse().ok(),
    }
}

/// The value of label `key` in `a="x",b="y"`, unescaped.
fn label(labels: &str, key: &str) -> Option<String> {
    let mut rest = labels;
    while !rest.is_empty() {
        let eq = rest.find('=')?;
        let name = rest[..eq].trim().trim_start_matches(',').trim();
        let after = rest[eq + 1..].trim_start().strip_prefix('"')?;
        let mut value = String::new();
        let mut escaped = false;
        let mut end = None;
        for (i, c) in after.char_indices() {
            if escaped {
                value.push(match c {
                    'n' => '\n',
                    other => other,
                });
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                end = Some(i);
                break;
            } else {
                value.push(c);
            }
        }
        let end = end?;
        if name == key {
            return Some(value);
        }
        rest = after[end + 1..].trim_start().trim_start_matches(',');
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"# HELP llmo_time_to_first_token_seconds Time from arrival to the first generated token.
# TYPE llmo_time_to_first_token_seconds histogram
llmo_time_to_first_token_seconds_sum 3.5
llmo_time_to_first_token_seconds_count 10
llmo_time_to_first_token_seconds_bucket{le="0.1"} 4
llmo_time_to_first_token_seconds_bucket{le="0.5"} 9
llmo_time_to_first_token_seconds_bucket{le="+Inf"} 10
# TYPE llmo_requests_waiting gauge
llmo_requests_waiting 3
llmo_engine_busy_ratio 0.75
llmo_prompt_tokens_total 1200
llmo_requests_total{outcome="ok"} 10
llmo_unrelated{path="/a}b"} 1
# EOF
"#;

    #[test]
    fn reads_the_families_the_autoscaler_uses() {
        let m = parse_metrics(SAMPLE).unwrap();
        let h = m.ttft.unwrap();
        assert_eq!(h.buckets.len(), 3);
        assert_eq!(h.count, 10.0);
        assert_eq!(m.waiting, Some(3.0));
        assert_eq!(m.busy, Some(0.75));
        assert_eq!(m.prompt_tokens, Some(1200.0));
        assert!(m.itl.is_none());
    }

    #[test]
    fn a_broken_bucket_line_is_an_error_with_its_line_number() {
        let err = parse_metrics("llmo_time_to_first_token_seconds_bucket{le=\"x\"} 1\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 1"), "{err}");
    }
}
