//! Request traces: the Azure LLM inference traces (2023), rate-scaled, and a synthetic diurnal
//! day that keeps the trace's minute-to-minute burstiness and its prompt and output lengths.

use std::path::Path;

use super::{rng::Rng, SimError};

/// One request: when it arrives and how many tokens go in and come out.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Request {
    /// Arrival, seconds from the start of the run.
    pub arrival: f64,
    /// Prompt tokens.
    pub prompt: u32,
    /// Output tokens (at least one).
    pub output: u32,
}

/// Reads `TIMESTAMP,ContextTokens,GeneratedTokens` rows; arrivals become seconds from the first.
pub fn load_azure(path: &Path) -> Result<Vec<Request>, SimError> {
    let text = std::fs::read_to_string(path).map_err(|e| SimError::Io {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate().skip(1) {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |m: &str| SimError::Csv {
            path: path.to_owned(),
            line: i + 1,
            message: m.to_owned(),
        };
        let f: Vec<&str> = line.split(',').collect();
        if f.len() != 3 {
            return Err(bad("expected TIMESTAMP,ContextTokens,GeneratedTokens"));
        }
        let t = parse_timestamp(f[0])
            .ok_or_else(|| bad("timestamp is not `YYYY-MM-DD hh:mm:ss.fff`"))?;
        let prompt: u32 = f[1]
            .trim()
            .parse()
            .map_err(|_| bad("ContextTokens is not a count"))?;
        let output: u32 = f[2]
            .trim()
            .parse()
            .map_err(|_| bad("GeneratedTokens is not a count"))?;
        out.push(Request {
            arrival: t,
            prompt: prompt.max(1),
            output: output.max(1),
        });
    }
    if out.is_empty() {
        return Err(SimError::Csv {
            path: path.to_owned(),
            line: 0,
            message: "the trace has no requests".into(),
        });
    }
    out.sort_by(|a, b| a.arrival.total_cmp(&b.arrival));
    let t0 = out[0].arrival;
    for r in &mut out {
        r.arrival -= t0;
    }
    Ok(out)
}

/// Seconds since the start of the month: enough to order and difference a trace of a few days.
fn parse_timestamp(s: &str) -> Option<f64> {
    let (date, time) = s.trim().split_once(' ')?;
    let day: f64 = date.rsplit('-').next()?.parse().ok()?;
    let mut parts = time.split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let sec: f64 = parts.next()?.parse().ok()?;
    Some(day * 86400.0 + h * 3600.0 + m * 60.0 + sec)
}

/// Scales the request rate by `factor`, keeping the time axis: each request is kept (factor < 1)
/// or copied (factor > 1) at random, copies shifted by up to a second so they do not coincide.
pub fn rate_scale(trace: &[Request], factor: f64, rng: &mut Rng) -> Vec<Request> {
    let mut out = Vec::with_capacity((trace.len() as f64 * factor) as usize + 1);
    for r in trace {
        let whole = factor.floor() as u32;
        let copies = whole + u32::from(rng.uniform() < factor - f64::from(whole));
        for k in 0..copies {
            let shift = if k == 0 { 0.0 } else { rng.uniform() };
            out.push(Request {
                arrival: r.arrival + shift,
                ..*r
            });
        }
    }
    out.sort_by(|a, b| a.arrival.total_cmp(&b.arrival));
    out
}

/// A synthetic day of `duration` seconds: a Poisson process whose rate follows a diurnal curve
/// (trough at 04:00 at a quarter of the peak at 16:00) times the source trace's own per-minute
/// rate pattern, tiled, so real bursts stay in. Prompt and output lengths are drawn from the
/// trace. The mean rate equals `factor` times the trace's.
pub fn diurnal(trace: &[Request], duration: f64, factor: f64, rng: &mut Rng) -> Vec<Request> {
    let span = trace.last().map(|r| r.arrival).unwrap_or(0.0).max(60.0);
    let minutes = (span / 60.0).ceil() as usize;
    let mut per_minute = vec![0.0f64; minutes];
    for r in trace {
        per_minute[((r.arrival / 60.0) as usize).min(minutes - 1)] += 1.0;
    }
    let mean_rate = trace.len() as f64 / span;
    let shape = |t: f64| {
        let day = (t / 86400.0) * std::f64::consts::TAU;
        // 0.25 at 04:00, 1.0 at 16:00; mean 0.625.
        0.625 - 0.375 * (day - std::f64::consts::TAU * 4.0 / 24.0).cos()
    };
    let mut out = Vec::new();
    let mut t = 0.0;
    while t < duration {
        let minute = ((t % span) / 60.0) as usize % minutes;
        let pattern = per_minute[minute] / 60.0 / mean_rate;
        let rate = (mean_rate * factor * pattern * shape(t) / 0.625).max(1e-6);
        // Thinning-free: draw the next gap at the current rate, capped at the minute boundary.
        let gap = -rng.uniform_open().ln() / rate;
        let boundary = (t / 60.0).floor() * 60.0 + 60.0;
        if t + gap > boundary {
            t = boundary;
            continue;
        }
        t += gap;
        let sample = trace[rng.below(trace.len())];
        out.push(Request {
            arrival: t,
            ..sample
        });
    }
    out
}

/// Tokens in and out per second in bins of `bin` seconds, for the baselines that provision from
/// the demand itself (static peak, oracle) and for burst detection.
pub fn demand_bins(trace: &[Request], bin: f64, duration: f64) -> Vec<f64> {
    let n = (duration / bin).ceil().max(1.0) as usize;
    let mut bins = vec![0.0; n];
    for r in trace {
        let i = ((r.arrival / bin) as usize).min(n - 1);
        bins[i] += f64::from(r.prompt + r.output) / bin;
    }
    bins
}
