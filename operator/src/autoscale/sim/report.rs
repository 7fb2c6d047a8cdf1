//! What a simulation reports: the comparison table, a timeline CSV and an SVG plot.

use std::fmt::Write;

use super::{replica::Outcome, Simulation, SweepPoint};

/// One strategy's run.
#[derive(Debug, Clone)]
pub struct RunResult {
    /// Strategy name.
    pub name: &'static str,
    /// Every request's outcome.
    pub outcomes: Vec<Outcome>,
    /// GPU-hours held.
    pub gpu_hours: f64,
    /// Target changes: (time, from, to).
    pub actions: Vec<(f64, u32, u32)>,
    /// Target replicas every 10 s.
    pub targets: Vec<u32>,
    /// Ready replicas every 10 s.
    pub ready: Vec<u32>,
    /// llmo's policy decisions that changed the count, with their reasons.
    pub decisions: Vec<crate::autoscale::Decision>,
}

/// One row of the table.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// Strategy name.
    pub name: &'static str,
    /// Requests with TTFT within target, percent.
    pub ttft_attainment: f64,
    /// Requests whose mean time per output token is within the ITL target, percent.
    pub itl_attainment: f64,
    /// GPU-hours.
    pub gpu_hours: f64,
    /// Dollars at the GPUClass price.
    pub cost: f64,
    /// Target changes per hour.
    pub actions_per_hour: f64,
    /// Mean seconds from a burst's onset to the first scale-up after it.
    pub burst_to_decision: Option<f64>,
    /// Mean reaction time: over the bursts that pushed the strategy's TTFT p95 over target,
    /// seconds from the first 10 s over target to the first scale-up after the onset (0 when the
    /// scale-up came first; 300 when none came within 300 s).
    pub miss_to_decision: Option<f64>,
    /// Of those bursts, how many saw the scale-up within 10 s of the first miss, and how many
    /// there were.
    pub miss_decided_within_10s: (usize, usize),
    /// Mean seconds from a burst's onset until TTFT p95 is back within target.
    pub burst_to_restored: Option<f64>,
}

/// Scores one run.
pub fn summarize(
    run: &RunResult,
    bursts: &[f64],
    ttft: f64,
    itl: Option<f64>,
    gpu_price: f64,
    duration: f64,
) -> Summary {
    let n = run.outcomes.len().max(1) as f64;
    let ttft_ok = run.outcomes.iter().filter(|o| o.ttft <= ttft).count() as f64;
    let itl_ok = run
        .outcomes
        .iter()
        .filter(|o| itl.is_none_or(|i| o.tpot <= i))
        .count() as f64;
    let p95 = ttft_series(&run.outcomes, duration);
    let mut decision = Vec::new();
    let mut reaction = Vec::new();
    let mut restored = Vec::new();
    for &onset in bursts {
        let scale_up = run
            .actions
            .iter()
            .find(|(t, from, to)| *t >= onset && to > from && *t <= onset + 300.0)
            .map(|a| a.0);
        if let Some(t) = scale_up {
            decision.push(t - onset);
        }
        let start = (onset / 10.0) as usize;
        let window = &p95[start.min(p95.len())..(start + 60).min(p95.len())];
        let violated = window.iter().position(|v| *v > ttft);
        if let Some(first) = violated.filter(|f| *f < 30) {
            let miss = (start + first) as f64 * 10.0;
            reaction.push(scale_up.map_or(300.0, |t| (t - miss).max(0.0)));
        }
        restored.push(match violated {
            None => 0.0,
            Some(first) => window[first..]
                .iter()
                .position(|v| *v <= ttft)
                .map(|k| ((first + k) * 10) as f64)
                .unwrap_or(600.0),
        });
    }
    let mean = |v: &[f64]| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
    Summary {
        name: run.name,
        ttft_attainment: 100.0 * ttft_ok / n,
        itl_attainment: 100.0 * itl_ok / n,
        gpu_hours: run.gpu_hours,
        cost: run.gpu_hours * gpu_price,
        actions_per_hour: run.actions.len() as f64 / (duration / 3600.0),
        burst_to_decision: mean(&decision),
        miss_to_decision: mean(&reaction),
        miss_decided_within_10s: (
            reaction.iter().filter(|r| **r <= 10.0).count(),
            reaction.len(),
        ),
        burst_to_restored: mean(&restored),
    }
}

/// TTFT p95 of the requests arriving in each 10 s bin (0 for an empty bin).
pub fn ttft_series(outcomes: &[Outcome], duration: f64) -> Vec<f64> {
    let bins = (duration / 10.0).ceil() as usize;
    let mut per: Vec<Vec<f64>> = vec![Vec::new(); bins.max(1)];
    for o in outcomes {
        let i = ((o.arrival / 10.0) as usize).min(per.len() - 1);
        per[i].push(o.ttft);
    }
    per.into_iter()
        .map(|mut v| {
            v.sort_by(f64::total_cmp);
            v.get(((v.len() as f64 * 0.95) as usize).min(v.len().saturating_sub(1)))
                .copied()
                .unwrap_or(0.0)
        })
        .collect()
}

/// Burst onsets: a 30 s demand at least 1.5 times the five minutes before it, at most one per
/// five minutes.
pub fn burst_onsets(demand_10: &[f64]) -> Vec<f64> {
    let mut out: Vec<f64> = Vec::new();
    for i in 30..demand_10.len().saturating_sub(3) {
        let recent = demand_10[i..i + 3].iter().sum::<f64>() / 3.0;
        let before = demand_10[i - 30..i].iter().sum::<f64>() / 30.0;
        let t = i as f64 * 10.0;
        if before > 0.0 && recent >= 1.5 * before && out.last().is_none_or(|l| t - l >= 300.0) {
            out.push(t);
        }
    }
    out
}

/// The comparison table, Markdown.
pub fn table(sim: &Simulation) -> String {
    let mut s = String::new();
    let f = &sim.fit;
    let _ = writeln!(s, "latency model ({}): fixed {:.1} ms/step (+{:.1} ms with prefill), compute efficiency {:.2}, bandwidth efficiency {:.2}, {:.2} ms per decoding sequence; fit over {} rows ({} outliers left out): prefill MAPE {:.1}%, decode MAPE {:.1}%, max {:.1}%",
        f.class, f.costs.fixed * 1e3, f.costs.prefill_fixed * 1e3, f.costs.compute_efficiency, f.costs.bandwidth_efficiency, f.costs.per_sequence * 1e3, f.rows, f.excluded, f.prefill_mape * 100.0, f.decode_mape * 100.0, f.max_error * 100.0);
    let requests = sim.runs.first().map(|r| r.outcomes.len()).unwrap_or(0);
    let _ = writeln!(s, "replica capacity within the SLO: {:.0} tokens/s; {requests} requests over {:.1} h; {} bursts\n", sim.capacity, sim.duration / 3600.0, sim.bursts.len());
    let _ = writeln!(s, "| strategy | TTFT SLO % | ITL SLO % | GPU-hours | cost $ | scale actions/h | burst → decision s | SLO miss → decision s | burst → SLO restored s |");
    let _ = writeln!(
        s,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    let opt = |v: Option<f64>| v.map(|x| format!("{x:.0}")).unwrap_or_else(|| "-".into());
    for r in &sim.summaries {
        let _ = writeln!(
            s,
            "| {} | {:.2} | {:.2} | {:.1} | {:.0} | {:.1} | {} | {} | {} |",
            r.name,
            r.ttft_attainment,
            r.itl_attainment,
            r.gpu_hours,
            r.cost,
            r.actions_per_hour,
            opt(r.burst_to_decision),
            match r.miss_decided_within_10s {
                (_, 0) => "-".to_string(),
                (k, n) => format!("{} ({k}/{n} ≤ 10 s)", opt(r.miss_to_decision)),
            },
            opt(r.burst_to_restored)
        );
    }
    s
}

/// Every 10 s: demand, and each strategy's target, ready replicas and TTFT p95.
pub fn timeline_csv(sim: &Simulation) -> String {
    let mut s = String::from("t_s,demand_tokens_per_s");
    for r in &sim.runs {
        let _ = write!(s, ",{0}_target,{0}_ready,{0}_ttft_p95_s", r.name);
    }
    s.push('\n');
    let series: Vec<Vec<f64>> = sim
        .runs
        .iter()
        .map(|r| ttft_series(&r.outcomes, sim.duration))
        .collect();
    for (i, d) in sim.demand_10.iter().enumerate() {
        let _ = write!(s, "{},{d:.1}", (i + 1) * 10);
        for (r, p) in sim.runs.iter().zip(&series) {
            let _ = write!(
                s,
                ",{},{},{:.3}",
                r.targets.get(i).copied().unwrap_or(0),
                r.ready.get(i).copied().unwrap_or(0),
                p.get(i).copied().unwrap_or(0.0)
            );
        }
        s.push('\n');
    }
    s
}

const COLORS: [&str; 7] = [
    "#888888", "#d62728", "#ff7f0e", "#9467bd", "#1f77b4", "#2ca02c", "#17becf",
];

/// Three stacked panels: demand, replicas per strategy, TTFT p95 (log scale) per strategy.
pub fn svg(sim: &Simulation) -> String {
    let (w, panel, left, top) = (1000.0, 200.0, 70.0, 30.0);
    let plot_w = w - left - 20.0;
    let n = sim.demand_10.len().max(2);
    let x = |i: usize| left + plot_w * i as f64 / (n - 1) as f64;
    let mut s = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n", top + 3.0 * (panel + 40.0) + 30.0);
    let polyline =
        |s: &mut String, ys: &[f64], y0: f64, lo: f64, hi: f64, color: &str, log: bool| {
            let map = |v: f64| {
                let (v, lo, hi) = if log {
                    (v.max(lo).ln(), lo.ln(), hi.ln())
                } else {
                    (v, lo, hi)
                };
                y0 + panel - panel * ((v - lo) / (hi - lo)).clamp(0.0, 1.0)
            };
            // At most 720 points a line: each keeps the highest value of its stretch, so peaks
            // survive and a day-long plot stays small.
            let stride = ys.len().div_ceil(720).max(1);
            let pts: Vec<String> = ys
                .chunks(stride)
                .enumerate()
                .map(|(k, chunk)| {
                    let v = chunk.iter().copied().fold(f64::MIN, f64::max);
                    format!("{:.1},{:.1}", x(k * stride), map(v))
                })
                .collect();
            let _ = writeln!(
                s,
                "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.2\" points=\"{}\"/>",
                pts.join(" ")
            );
        };
    let frame = |s: &mut String, y0: f64, title: &str, lo: &str, hi: &str| {
        let _ = writeln!(s, "<rect x=\"{left}\" y=\"{y0}\" width=\"{plot_w}\" height=\"{panel}\" fill=\"none\" stroke=\"#333\"/><text x=\"{left}\" y=\"{}\">{title}</text><text x=\"{}\" y=\"{}\" text-anchor=\"end\">{hi}</text><text x=\"{}\" y=\"{}\" text-anchor=\"end\">{lo}</text>", y0 - 6.0, left - 4.0, y0 + 10.0, left - 4.0, y0 + panel);
    };
    // Demand.
    let y0 = top;
    let dmax = sim.demand_10.iter().copied().fold(1.0, f64::max);
    frame(
        &mut s,
        y0,
        "demand (tokens/s in + out, 10 s bins)",
        "0",
        &format!("{dmax:.0}"),
    );
    polyline(&mut s, &sim.demand_10, y0, 0.0, dmax, "#333333", false);
    // Replicas.
    let y1 = top + panel + 40.0;
    let rmax = sim
        .runs
        .iter()
        .flat_map(|r| r.targets.iter())
        .copied()
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    frame(&mut s, y1, "replicas (target)", "0", &format!("{rmax:.0}"));
    for (r, c) in sim.runs.iter().map(|r| (r, strategy_color(r.name))) {
        let ys: Vec<f64> = r.targets.iter().map(|v| f64::from(*v)).collect();
        polyline(&mut s, &ys, y1, 0.0, rmax, c, false);
    }
    // TTFT p95.
    let y2 = top + 2.0 * (panel + 40.0);
    frame(&mut s, y2, "TTFT p95 per 10 s (log scale)", "10ms", "100s");
    for (r, c) in sim.runs.iter().map(|r| (r, strategy_color(r.name))) {
        polyline(
            &mut s,
            &ttft_series(&r.outcomes, sim.duration),
            y2,
            0.01,
            100.0,
            c,
            true,
        );
    }
    // Legend and time axis.
    let ly = y2 + panel + 36.0;
    for (i, (r, c)) in sim
        .runs
        .iter()
        .map(|r| (r, strategy_color(r.name)))
        .enumerate()
    {
        let lx = left + i as f64 * (plot_w / sim.runs.len().max(1) as f64).min(150.0);
        let _ = writeln!(s, "<rect x=\"{lx}\" y=\"{}\" width=\"12\" height=\"12\" fill=\"{c}\"/><text x=\"{}\" y=\"{ly}\">{}</text>", ly - 10.0, lx + 16.0, r.name);
    }
    let _ = writeln!(
        s,
        "<text x=\"{left}\" y=\"{0}\">0 h</text><text x=\"{1}\" y=\"{0}\" text-anchor=\"end\">{2:.1} h</text>",
        y2 + panel + 14.0,
        left + plot_w,
        sim.duration / 3600.0
    );
    s.push_str("</svg>\n");
    s
}

/// The sweep's points, then the comparison at equal attainment: for each strategy, the cheapest
/// setting whose TTFT and ITL attainment are at least `reference`'s (llmo's policy at its
/// default setting).
pub fn sweep_table(points: &[SweepPoint], reference: &Summary) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| strategy | setting | TTFT SLO % | ITL SLO % | GPU-hours | scale actions/h |"
    );
    let _ = writeln!(s, "| --- | --- | ---: | ---: | ---: | ---: |");
    for p in points {
        let r = &p.summary;
        let _ = writeln!(
            s,
            "| {} | {} | {:.2} | {:.2} | {:.1} | {:.1} |",
            r.name, p.setting, r.ttft_attainment, r.itl_attainment, r.gpu_hours, r.actions_per_hour
        );
    }
    let _ = writeln!(
        s,
        "\nAt equal or better attainment than {} at its default setting (TTFT {:.2} %, ITL {:.2} %, {:.1} GPU-hours):\n",
        reference.name, reference.ttft_attainment, reference.itl_attainment, reference.gpu_hours
    );
    let _ = writeln!(
        s,
        "| strategy | cheapest setting that attains it | GPU-hours | {} uses |",
        reference.name
    );
    let _ = writeln!(s, "| --- | --- | ---: | ---: |");
    for (name, best) in cheapest_at(points, reference) {
        match best {
            Cheapest::Attains(p) => {
                let saving = 1.0 - reference.gpu_hours / p.summary.gpu_hours.max(1e-9);
                let _ = writeln!(
                    s,
                    "| {name} | {} ({:.2} %) | {:.1} | {} |",
                    p.setting,
                    p.summary.ttft_attainment,
                    p.summary.gpu_hours,
                    relative(saving)
                );
            }
            Cheapest::Never(p) => {
                let _ = writeln!(
                    s,
                    "| {name} | none; best {:.2} % ({}) at {:.1} GPU-hours | - | - |",
                    p.summary.ttft_attainment, p.setting, p.summary.gpu_hours
                );
            }
        }
    }
    s
}

/// "25 % fewer" or "5 % more".
fn relative(saving: f64) -> String {
    if saving >= 0.0 {
        format!("{:.0} % fewer", saving * 100.0)
    } else {
        format!("{:.0} % more", -saving * 100.0)
    }
}

/// A strategy's best showing in a sweep against a reference attainment.
#[derive(Debug, Clone, Copy)]
pub enum Cheapest<'a> {
    /// The cheapest setting at equal or better attainment.
    Attains(&'a SweepPoint),
    /// No setting attains it: the one with the highest TTFT attainment.
    Never(&'a SweepPoint),
}

/// For each strategy of the sweep, in order of appearance, its cheapest setting at equal or
/// better TTFT and ITL attainment than `reference`.
pub fn cheapest_at<'a>(
    points: &'a [SweepPoint],
    reference: &Summary,
) -> Vec<(&'static str, Cheapest<'a>)> {
    let mut names: Vec<&'static str> = Vec::new();
    for p in points {
        if !names.contains(&p.summary.name) {
            names.push(p.summary.name);
        }
    }
    names
        .into_iter()
        .filter_map(|name| {
            let mine: Vec<&SweepPoint> = points.iter().filter(|p| p.summary.name == name).collect();
            let attains = mine
                .iter()
                .filter(|p| {
                    p.summary.ttft_attainment >= reference.ttft_attainment - 1e-9
                        && p.summary.itl_attainment >= reference.itl_attainment - 1e-9
                })
                .min_by(|a, b| a.summary.gpu_hours.total_cmp(&b.summary.gpu_hours));
            let best = match attains {
                Some(p) => Cheapest::Attains(p),
                None => Cheapest::Never(mine.iter().copied().max_by(|a, b| {
                    a.summary
                        .ttft_attainment
                        .total_cmp(&b.summary.ttft_attainment)
                })?),
            };
            Some((name, best))
        })
        .collect()
}

/// GPU-hours against the share of requests over the TTFT target, one line per strategy through
/// its settings: the lower left is better.
pub fn sweep_svg(points: &[SweepPoint], reference: &Summary) -> String {
    let (w, h, left, top, bottom) = (760.0, 480.0, 70.0, 30.0, 70.0);
    let (plot_w, plot_h) = (w - left - 20.0, h - top - bottom);
    let hours = points.iter().map(|p| p.summary.gpu_hours);
    let lo = hours.clone().fold(f64::MAX, f64::min) * 0.9;
    // Keep the interesting part readable: up to three times llmo's GPU-hours.
    let hi = hours
        .fold(0.0, f64::max)
        .min(3.0 * reference.gpu_hours)
        .max(lo * 1.5);
    let miss = |p: &Summary| (100.0 - p.ttft_attainment).max(0.01);
    let (mlo, mhi) = (0.01f64.ln(), 100.0f64.ln());
    let x = |v: f64| left + plot_w * ((v - lo) / (hi - lo)).clamp(0.0, 1.0);
    let y = |v: f64| top + plot_h * ((v.ln() - mlo) / (mhi - mlo)).clamp(0.0, 1.0);
    let mut s = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n");
    let _ = writeln!(s, "<rect x=\"{left}\" y=\"{top}\" width=\"{plot_w}\" height=\"{plot_h}\" fill=\"none\" stroke=\"#333\"/><text x=\"{left}\" y=\"{}\">requests over the TTFT target (log scale, fewer is higher) against GPU-hours</text>", top - 10.0);
    for m in [0.01, 0.1, 1.0, 10.0, 100.0] {
        let (right, ym, label_x) = (left + plot_w, y(m), left - 4.0);
        let _ = writeln!(s, "<line x1=\"{left}\" x2=\"{right}\" y1=\"{ym:.1}\" y2=\"{ym:.1}\" stroke=\"#ddd\"/><text x=\"{label_x}\" y=\"{:.1}\" text-anchor=\"end\">{m}%</text>", ym + 4.0);
    }
    let _ = writeln!(
        s,
        "<line x1=\"{left}\" x2=\"{}\" y1=\"{1:.1}\" y2=\"{1:.1}\" stroke=\"#1f77b4\" stroke-dasharray=\"4 3\"/>",
        left + plot_w,
        y(miss(reference))
    );
    let _ = writeln!(s, "<text x=\"{left}\" y=\"{0}\">{lo:.0}</text><text x=\"{1}\" y=\"{0}\" text-anchor=\"end\">{hi:.0} GPU-hours</text>", top + plot_h + 16.0, left + plot_w);
    let mut names: Vec<&'static str> = Vec::new();
    for p in points {
        if !names.contains(&p.summary.name) {
            names.push(p.summary.name);
        }
    }
    for (i, name) in names.iter().enumerate() {
        let color = strategy_color(name);
        let pts: Vec<(f64, f64)> = points
            .iter()
            .filter(|p| p.summary.name == *name)
            .map(|p| (x(p.summary.gpu_hours), y(miss(&p.summary))))
            .collect();
        let line: Vec<String> = pts.iter().map(|(a, b)| format!("{a:.1},{b:.1}")).collect();
        let _ = writeln!(
            s,
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\" points=\"{}\"/>",
            line.join(" ")
        );
        for (a, b) in pts {
            let _ = writeln!(
                s,
                "<circle cx=\"{a:.1}\" cy=\"{b:.1}\" r=\"3\" fill=\"{color}\"/>"
            );
        }
        let lx = left + (i % 6) as f64 * 115.0;
        let ly = top + plot_h + 40.0;
        let _ = writeln!(s, "<rect x=\"{lx}\" y=\"{}\" width=\"12\" height=\"12\" fill=\"{color}\"/><text x=\"{}\" y=\"{ly}\">{name}</text>", ly - 10.0, lx + 16.0);
    }
    let _ = writeln!(
        s,
        "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"7\" fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"2\"/>",
        x(reference.gpu_hours),
        y(miss(reference))
    );
    s.push_str("</svg>\n");
    s
}

/// The same colour for a strategy in every plot.
fn strategy_color(name: &str) -> &'static str {
    match name {
        "static-peak" => COLORS[0],
        "hpa-gpu-util" => COLORS[1],
        "keda-queue" => COLORS[2],
        "planner-180s" => COLORS[3],
        "llmo-slo" => COLORS[4],
        "oracle" => COLORS[5],
        _ => COLORS[6],
    }
}

/// llmo's scaling decisions with their figures and reasons.
pub fn decisions_csv(sim: &Simulation) -> String {
    let mut s = String::from("t_s,from,to,kind,ttft_p95_s,utilization,queue_depth,load_tokens_per_s,capacity_tokens_per_s,reason\n");
    for d in sim.runs.iter().flat_map(|r| &r.decisions) {
        let _ = writeln!(
            s,
            "{},{},{},{:?},{},{:.3},{},{:.0},{},\"{}\"",
            d.at,
            d.from,
            d.to,
            d.kind,
            d.ttft_p95.map(|v| format!("{v:.3}")).unwrap_or_default(),
            d.utilization,
            d.queue_depth,
            d.load,
            d.capacity.map(|v| format!("{v:.0}")).unwrap_or_default(),
            d.reason.replace('"', "'")
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(arrival: f64, ttft: f64) -> Outcome {
        Outcome {
            arrival,
            ttft,
            tpot: 0.01,
        }
    }

    fn run(actions: Vec<(f64, u32, u32)>, outcomes: Vec<Outcome>) -> RunResult {
        RunResult {
            name: "s",
            outcomes,
            gpu_hours: 1.0,
            actions,
            targets: Vec::new(),
            ready: Vec::new(),
            decisions: Vec::new(),
        }
    }

    fn point(name: &'static str, setting: &str, ttft: f64, itl: f64, hours: f64) -> SweepPoint {
        let mut summary = summarize(&run(vec![], vec![]), &[], 1.0, None, 1.0, 3600.0);
        summary.name = name;
        summary.ttft_attainment = ttft;
        summary.itl_attainment = itl;
        summary.gpu_hours = hours;
        SweepPoint {
            setting: setting.into(),
            summary,
        }
    }

    #[test]
    fn the_cheapest_setting_at_equal_attainment_is_chosen_per_strategy() {
        let points = vec![
            point("a", "tight", 99.9, 100.0, 300.0),
            point("a", "middle", 99.5, 100.0, 200.0),
            point("a", "loose", 97.0, 100.0, 100.0),
            // Cheaper and on TTFT good enough, but misses the ITL of the reference.
            point("b", "fast", 99.6, 99.0, 150.0),
            point("b", "slow", 99.7, 100.0, 400.0),
            point("c", "one", 95.0, 100.0, 50.0),
            point("c", "two", 98.0, 100.0, 80.0),
        ];
        let reference = point("ref", "-", 99.5, 100.0, 150.0).summary;
        let rows = cheapest_at(&points, &reference);
        let picked: Vec<(&str, &str, bool)> = rows
            .iter()
            .map(|(n, c)| match c {
                Cheapest::Attains(p) => (*n, p.setting.as_str(), true),
                Cheapest::Never(p) => (*n, p.setting.as_str(), false),
            })
            .collect();
        assert_eq!(
            picked,
            [
                ("a", "middle", true),
                ("b", "slow", true),
                ("c", "two", false)
            ]
        );
        let table = sweep_table(&points, &reference);
        assert!(
            table.contains("| a | middle (99.50 %) | 200.0 | 25 % fewer |"),
            "{table}"
        );
        assert!(
            table.contains("| b | slow (99.70 %) | 400.0 | 62 % fewer |"),
            "{table}"
        );
        assert!(
            table.contains("| c | none; best 98.00 % (two) at 80.0 GPU-hours | - | - |"),
            "{table}"
        );
    }

    #[test]
    fn burst_measures_count_from_onset_and_from_the_first_miss() {
        // Burst at 100 s; TTFT over the 1 s target in the bins from 130 s to 160 s.
        let outcomes: Vec<Outcome> = (0..60)
            .map(|i| {
                let t = i as f64 * 10.0 + 1.0;
                outcome(
                    t,
                    if (130.0..170.0).contains(&t) {
                        3.0
                    } else {
                        0.5
                    },
                )
            })
            .collect();
        let summary = |actions| {
            summarize(
                &run(actions, outcomes.clone()),
                &[100.0],
                1.0,
                None,
                1.0,
                600.0,
            )
        };

        let late = summary(vec![(50.0, 2, 3), (145.0, 3, 2), (155.0, 2, 4)]);
        assert_eq!(
            late.burst_to_decision,
            Some(55.0),
            "the scale-up at 155 s; 50 s was before the burst and 145 s a scale-down"
        );
        assert_eq!(
            late.miss_to_decision,
            Some(25.0),
            "first miss in the bin starting at 130 s"
        );
        assert_eq!(late.miss_decided_within_10s, (0, 1));
        assert_eq!(
            late.burst_to_restored,
            Some(70.0),
            "from onset bin 10 to bin 17"
        );

        let early = summary(vec![(110.0, 2, 3)]);
        assert_eq!(
            (early.burst_to_decision, early.miss_to_decision),
            (Some(10.0), Some(0.0))
        );
        assert_eq!(early.miss_decided_within_10s, (1, 1));

        let never = summary(vec![]);
        assert_eq!(
            (never.burst_to_decision, never.miss_to_decision),
            (None, Some(300.0))
        );

        let calm: Vec<Outcome> = (0..60)
            .map(|i| outcome(i as f64 * 10.0 + 1.0, 0.5))
            .collect();
        let absorbed = summarize(&run(vec![], calm), &[100.0], 1.0, None, 1.0, 600.0);
        assert_eq!(
            (absorbed.miss_to_decision, absorbed.burst_to_restored),
            (None, Some(0.0))
        );
        assert_eq!(absorbed.miss_decided_within_10s, (0, 0));
    }
}
