//! The run's report: figures per scenario, the verdict, `report.json` and `throughput.svg`.
//!
//! Figures per scenario, all measured from the moment the fault struck:
//! - **new leader**: when a replica first said it leads a term higher than the one before the
//!   fault (observer resolution: 100 ms plus one status call);
//! - **first lease**: when an execution first started after the fault (after the new leader
//!   was elected, when leadership moved): the first task leased and running again;
//! - **converged**: from the heal to the end of the liveness phase;
//! - **tasks/s**: zero-exit executions per second in the 5 s before the fault, during it, and
//!   in the 5 s after the heal.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use crate::checker::Violation;
use crate::history::{ExecEvent, ExecKind, History, LeaderObs, Submission};
use crate::run::{RunArgs, Shared};
use crate::scenario::Plan;

/// One scenario as it went.
#[derive(Debug, Clone, Serialize)]
pub struct ScenarioResult {
    pub plan: Plan,
    pub target: String,
    /// (node, term) leading before the fault.
    pub leader_before: Option<(u64, u64)>,
    pub fault_at_ms: u64,
    pub heal_at_ms: u64,
    pub converged_at_ms: Option<u64>,
    pub liveness_error: Option<String>,
    pub notes: Vec<String>,
}

impl ScenarioResult {
    pub fn new(plan: Plan) -> ScenarioResult {
        ScenarioResult {
            plan,
            target: String::new(),
            leader_before: None,
            fault_at_ms: 0,
            heal_at_ms: 0,
            converged_at_ms: None,
            liveness_error: None,
            notes: Vec::new(),
        }
    }
}

/// The figures of one scenario.
#[derive(Debug, Clone, Serialize)]
pub struct Figures {
    pub scenario: String,
    pub parameters: String,
    pub target: String,
    pub fault_at_s: f64,
    pub hold_ms: u64,
    pub new_leader_ms: Option<u64>,
    /// (node, term) of the new leader.
    pub new_leader: Option<(u64, u64)>,
    pub first_lease_ms: Option<u64>,
    /// From the fault to the first acknowledgement of a submission made after it.
    pub first_ack_ms: Option<u64>,
    pub converged_ms: Option<u64>,
    pub tasks_per_s_before: f64,
    pub tasks_per_s_during: f64,
    pub tasks_per_s_after: f64,
    pub liveness_error: Option<String>,
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Totals {
    pub submissions: usize,
    pub acknowledged: usize,
    pub not_acknowledged: usize,
    pub tasks_by_state: BTreeMap<String, usize>,
    pub executions: usize,
    pub executions_killed: usize,
    pub attempts_lost: usize,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub seed: u64,
    pub reproduce: String,
    pub duration_s: f64,
    pub scenarios: Vec<Figures>,
    pub totals: Totals,
    pub invariants_checked: Vec<&'static str>,
    pub violations: Vec<Violation>,
    pub liveness_failures: Vec<String>,
    pub torn_execution_lines: usize,
    /// (seconds since start, what happened)
    pub timeline: Vec<(f64, String)>,
    #[serde(skip)]
    series: Series,
}

/// Per-second counts for the plot.
#[derive(Debug, Default)]
struct Series {
    completions: Vec<u32>,
    submissions: Vec<u32>,
    faults: Vec<(f64, f64, String)>,
}

/// The length of the before and after windows.
pub const WINDOW_MS: u64 = 5_000;

fn rate(ends: &[u64], from: u64, to: u64) -> f64 {
    if to <= from {
        return 0.0;
    }
    let n = ends.iter().filter(|t| **t >= from && **t < to).count();
    n as f64 * 1000.0 / (to - from) as f64
}

/// A scenario's figures from the observations (see the module docs). Leadership changes
/// count only between the fault and the end of the liveness phase.
pub fn figures(
    r: &ScenarioResult,
    leaders: &[LeaderObs],
    execs: &[ExecEvent],
    subs: &[Submission],
    t0: u64,
) -> Figures {
    let end = r.converged_at_ms.unwrap_or(u64::MAX);
    let ends: Vec<u64> = execs
        .iter()
        .filter(|e| e.kind == ExecKind::End && e.exit == Some(0))
        .map(|e| e.t_ms)
        .collect();
    let new_leader = r.leader_before.and_then(|(_, term)| {
        leaders
            .iter()
            .filter(|o| {
                o.t_ms >= r.fault_at_ms
                    && o.t_ms <= end
                    && o.term > term
                    && o.leader == Some(o.node)
            })
            .min_by_key(|o| o.t_ms)
            .map(|o| (o.t_ms, o.node, o.term))
    });
    let lease_from = new_leader.map_or(r.fault_at_ms, |(t, _, _)| t.max(r.fault_at_ms));
    let first_lease = execs
        .iter()
        .filter(|e| e.kind == ExecKind::Start && e.t_ms >= lease_from)
        .map(|e| e.t_ms)
        .min();
    let first_ack = subs
        .iter()
        .filter(|s| s.t_ms >= r.fault_at_ms)
        .filter_map(|s| s.acked_at_ms)
        .min();
    Figures {
        scenario: r.plan.scenario.name().into(),
        parameters: r.plan.describe(),
        target: r.target.clone(),
        fault_at_s: (r.fault_at_ms.saturating_sub(t0)) as f64 / 1000.0,
        hold_ms: r.heal_at_ms.saturating_sub(r.fault_at_ms),
        new_leader_ms: new_leader.map(|(t, _, _)| t - r.fault_at_ms),
        new_leader: new_leader.map(|(_, n, t)| (n, t)),
        first_lease_ms: first_lease.map(|t| t - r.fault_at_ms),
        first_ack_ms: first_ack.map(|t| t - r.fault_at_ms),
        converged_ms: r.converged_at_ms.map(|t| t.saturating_sub(r.heal_at_ms)),
        tasks_per_s_before: rate(
            &ends,
            r.fault_at_ms.saturating_sub(WINDOW_MS),
            r.fault_at_ms,
        ),
        tasks_per_s_during: rate(&ends, r.fault_at_ms, r.heal_at_ms),
        tasks_per_s_after: rate(&ends, r.heal_at_ms, r.heal_at_ms + WINDOW_MS),
        liveness_error: r.liveness_error.clone(),
        notes: r.notes.clone(),
    }
}

impl Report {
    #[allow(clippy::too_many_arguments)]
    pub fn build(
        seed: u64,
        args: &RunArgs,
        shared: &Shared,
        h: &History,
        results: Vec<ScenarioResult>,
        violations: Vec<Violation>,
        liveness_failures: Vec<String>,
        torn: usize,
    ) -> Report {
        let t0 = shared.t0_ms;
        let now = crate::history::wall_ms();
        let mut ends: Vec<u64> = h
            .executions
            .iter()
            .filter(|e| e.kind == ExecKind::End && e.exit == Some(0))
            .map(|e| e.t_ms)
            .collect();
        ends.sort_unstable();
        let mut starts: Vec<u64> = h
            .executions
            .iter()
            .filter(|e| e.kind == ExecKind::Start)
            .map(|e| e.t_ms)
            .collect();
        starts.sort_unstable();
        let scenarios = results
            .iter()
            .map(|r| figures(r, &h.leaders, &h.executions, &h.submissions, t0))
            .collect();
        let mut totals = Totals {
            submissions: h.submissions.len(),
            acknowledged: h.submissions.iter().filter(|s| s.acked.is_some()).count(),
            ..Default::default()
        };
        totals.not_acknowledged = totals.submissions - totals.acknowledged;
        for t in &h.tasks {
            *totals.tasks_by_state.entry(t.state.clone()).or_default() += 1;
            totals.attempts_lost += t.attempts.iter().filter(|a| a.outcome == "lost").count();
        }
        totals.executions = starts.len();
        totals.executions_killed = h
            .executions
            .iter()
            .filter(|e| e.kind == ExecKind::Killed)
            .count();
        let secs = ((now.saturating_sub(t0)) / 1000 + 1) as usize;
        let mut series = Series {
            completions: vec![0; secs],
            submissions: vec![0; secs],
            faults: results
                .iter()
                .map(|r| {
                    (
                        r.fault_at_ms.saturating_sub(t0) as f64 / 1000.0,
                        r.heal_at_ms.saturating_sub(t0) as f64 / 1000.0,
                        r.plan.scenario.name().to_string(),
                    )
                })
                .collect(),
        };
        for t in &ends {
            if let Some(b) = series
                .completions
                .get_mut((t.saturating_sub(t0) / 1000) as usize)
            {
                *b += 1;
            }
        }
        for s in h.submissions.iter().filter(|s| s.acked.is_some()) {
            if let Some(b) = series
                .submissions
                .get_mut((s.t_ms.saturating_sub(t0) / 1000) as usize)
            {
                *b += 1;
            }
        }
        let failing: Vec<String> = results
            .iter()
            .filter(|r| r.liveness_error.is_some())
            .map(|r| r.plan.scenario.name().to_string())
            .collect();
        Report {
            seed,
            reproduce: args.reproduce(
                seed,
                &if failing.is_empty() {
                    args.scenario.clone()
                } else {
                    failing.join(",")
                },
            ),
            duration_s: (now.saturating_sub(t0)) as f64 / 1000.0,
            scenarios,
            totals,
            invariants_checked: vec![
                "lost",
                "double-success",
                "stale-success",
                "token-run-twice",
                "overlap",
                "leader-per-term",
                "tick-exactly-once",
                "pool-over",
                "workflow",
            ],
            violations,
            liveness_failures,
            torn_execution_lines: torn,
            timeline: shared
                .timeline
                .lock()
                .expect("timeline")
                .iter()
                .map(|(t, w)| ((t.saturating_sub(t0)) as f64 / 1000.0, w.clone()))
                .collect(),
            series,
        }
    }

    pub fn ok(&self) -> bool {
        self.violations.is_empty() && self.liveness_failures.is_empty()
    }

    pub fn failing_scenarios(&self) -> Vec<String> {
        self.scenarios
            .iter()
            .filter(|f| f.liveness_error.is_some())
            .map(|f| f.scenario.clone())
            .collect()
    }

    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::write(
            dir.join("report.json"),
            serde_json::to_vec_pretty(self).expect("serializable"),
        )?;
        std::fs::write(dir.join("throughput.svg"), self.svg())
    }

    pub fn print(&self, dir: &Path) {
        let ms =
            |v: Option<u64>| v.map_or("-".to_string(), |v| format!("{:.2}s", v as f64 / 1000.0));
        println!();
        println!("== summary (seed {})", self.seed);
        println!(
            "{:<18} {:<20} {:>6} {:>10} {:>11} {:>9}  {:>22}",
            "scenario",
            "target",
            "hold",
            "new leader",
            "first lease",
            "converged",
            "tasks/s before/during/after"
        );
        for f in &self.scenarios {
            println!(
                "{:<18} {:<20} {:>6} {:>10} {:>11} {:>9}  {:>7.1} /{:>6.1} /{:>6.1}{}",
                f.scenario,
                f.target,
                format!("{:.1}s", f.hold_ms as f64 / 1000.0),
                ms(f.new_leader_ms),
                ms(f.first_lease_ms),
                ms(f.converged_ms),
                f.tasks_per_s_before,
                f.tasks_per_s_during,
                f.tasks_per_s_after,
                if f.liveness_error.is_some() {
                    "  LIVENESS FAILED"
                } else {
                    ""
                }
            );
        }
        let t = &self.totals;
        println!(
            "submissions: {} ({} acknowledged, {} not); tasks: {:?}; executions: {} ({} killed); \
             attempts whose lease was lost: {}",
            t.submissions,
            t.acknowledged,
            t.not_acknowledged,
            t.tasks_by_state,
            t.executions,
            t.executions_killed,
            t.attempts_lost
        );
        if self.torn_execution_lines > 0 {
            println!(
                "execution log: {} torn lines skipped (a writer killed mid-line)",
                self.torn_execution_lines
            );
        }
        if self.violations.is_empty() {
            println!("invariants: OK ({})", self.invariants_checked.join(", "));
        } else {
            println!("invariants: {} VIOLATED", self.violations.len());
            for v in self.violations.iter().take(50) {
                println!("  {v}");
            }
        }
        for l in &self.liveness_failures {
            println!("liveness: FAILED {l}");
        }
        println!(
            "report: {}  plot: {}  history: {}",
            dir.join("report.json").display(),
            dir.join("throughput.svg").display(),
            dir.join("history.json").display()
        );
        println!("verdict: {}", if self.ok() { "PASS" } else { "FAIL" });
    }

    /// Throughput over time (zero-exit executions and acknowledged submissions per second),
    /// with each fault's window shaded and named.
    fn svg(&self) -> String {
        let (w, h) = (1200.0, 420.0);
        let (left, right, top, bottom) = (60.0, 20.0, 40.0, 50.0);
        let s = &self.series;
        let n = s.completions.len().max(2);
        let peak = s
            .completions
            .iter()
            .chain(&s.submissions)
            .copied()
            .max()
            .unwrap_or(1)
            .max(1) as f64;
        // Round grid lines: 4 steps of 1, 2, 5, 10, 20, 50...
        let tick = [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0]
            .into_iter()
            .find(|t| t * 4.0 >= peak)
            .unwrap_or(1000.0);
        let ymax = tick * 4.0 * 1.15;
        let x = |sec: f64| left + (w - left - right) * sec / (n - 1) as f64;
        let y = |v: f64| top + (h - top - bottom) * (1.0 - v / ymax);
        let mut o = String::new();
        o.push_str(&format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" \
             font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
        ));
        o.push_str(&format!(
            "<text x=\"{left}\" y=\"20\" font-size=\"14\">fleet chaos run, seed {}: tasks completed per second, faults shaded</text>\n",
            self.seed
        ));
        for (i, (from, to, name)) in s.faults.iter().enumerate() {
            let (x0, x1) = (x(*from), x(*to).max(x(*from) + 2.0));
            o.push_str(&format!(
                "<rect x=\"{x0:.1}\" y=\"{top}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"#f4a6a6\" fill-opacity=\"0.5\"/>\n",
                x1 - x0,
                h - top - bottom
            ));
            let ty = top + 12.0 + (i % 3) as f64 * 12.0;
            o.push_str(&format!(
                "<text x=\"{:.1}\" y=\"{ty:.1}\" fill=\"#a01010\">{}</text>\n",
                x0 + 2.0,
                xml_escape(name)
            ));
        }
        // Axes and grid.
        let base = h - bottom;
        o.push_str(&format!(
            "<line x1=\"{left}\" y1=\"{base}\" x2=\"{}\" y2=\"{base}\" stroke=\"black\"/>\n\
             <line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{base}\" stroke=\"black\"/>\n",
            w - right
        ));
        for k in 0..=4 {
            let v = tick * k as f64;
            o.push_str(&format!(
                "<line x1=\"{left}\" y1=\"{0:.1}\" x2=\"{1}\" y2=\"{0:.1}\" stroke=\"#ddd\"/>\
                 <text x=\"{2}\" y=\"{3:.1}\" text-anchor=\"end\">{v:.0}</text>\n",
                y(v),
                w - right,
                left - 6.0,
                y(v) + 4.0
            ));
        }
        let step = ((n as f64 / 12.0).ceil() as usize).max(1);
        for sec in (0..n).step_by(step) {
            o.push_str(&format!(
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{sec}s</text>\n",
                x(sec as f64),
                base + 16.0
            ));
        }
        o.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">time since start (s)</text>\n\
             <text x=\"16\" y=\"{:.1}\" transform=\"rotate(-90 16 {:.1})\" text-anchor=\"middle\">per second</text>\n",
            (left + w - right) / 2.0,
            h - 12.0,
            (top + base) / 2.0,
            (top + base) / 2.0
        ));
        let line = |v: &[u32], color: &str, width: f64| {
            let pts: Vec<String> = v
                .iter()
                .enumerate()
                .map(|(i, c)| format!("{:.1},{:.1}", x(i as f64), y(*c as f64)))
                .collect();
            format!(
                "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"{width}\" points=\"{}\"/>\n",
                pts.join(" ")
            )
        };
        o.push_str(&line(&s.submissions, "#999999", 1.0));
        o.push_str(&line(&s.completions, "#1f5fbf", 2.0));
        o.push_str(&format!(
            "<text x=\"{0:.1}\" y=\"{top}\" text-anchor=\"end\" fill=\"#1f5fbf\">completed (exit 0)</text>\
             <text x=\"{0:.1}\" y=\"{1:.1}\" text-anchor=\"end\" fill=\"#999999\">submitted (acknowledged)</text>\n",
            w - right,
            top + 12.0
        ));
        o.push_str("</svg>\n");
        o
    }
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Median and worst of each figure per scenario over several runs (`chaos summarize`), as a
/// Markdown table.
pub fn summarize(paths: &[std::path::PathBuf]) -> Result<String, String> {
    let mut by: BTreeMap<String, Vec<serde_json::Value>> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    let mut seeds = Vec::new();
    for p in paths {
        let file = if p.is_dir() {
            p.join("report.json")
        } else {
            p.clone()
        };
        let v: serde_json::Value = std::fs::read(&file)
            .map_err(|e| format!("{}: {e}", file.display()))
            .and_then(|b| {
                serde_json::from_slice(&b).map_err(|e| format!("{}: {e}", file.display()))
            })?;
        seeds.push(v["seed"].to_string());
        for s in v["scenarios"]
            .as_array()
            .ok_or(format!("{}: no scenarios", file.display()))?
        {
            let name = s["scenario"].as_str().unwrap_or("?").to_string();
            if !order.contains(&name) {
                order.push(name.clone());
            }
            by.entry(name).or_default().push(s.clone());
        }
    }
    let stat = |runs: &[serde_json::Value], key: &str| -> String {
        let mut v: Vec<u64> = runs.iter().filter_map(|r| r[key].as_u64()).collect();
        if v.is_empty() {
            return "-".into();
        }
        v.sort_unstable();
        let med = v[(v.len() - 1) / 2];
        format!(
            "{:.2} / {:.2}",
            med as f64 / 1000.0,
            *v.last().expect("non-empty") as f64 / 1000.0
        )
    };
    let mut out = format!(
        "{} runs (seeds {}); seconds, median / worst\n\n| scenario | runs | new leader | first lease | converged after heal | tasks/s during (median) |\n|---|---|---|---|---|---|\n",
        paths.len(),
        seeds.join(", ")
    );
    for name in order {
        let runs = &by[&name];
        let mut during: Vec<f64> = runs
            .iter()
            .filter_map(|r| r["tasks_per_s_during"].as_f64())
            .collect();
        during.sort_by(|a, b| a.total_cmp(b));
        out.push_str(&format!(
            "| {name} | {} | {} | {} | {} | {:.1} |\n",
            runs.len(),
            stat(runs, "new_leader_ms"),
            stat(runs, "first_lease_ms"),
            stat(runs, "converged_ms"),
            during
                .get((during.len().max(1) - 1) / 2)
                .copied()
                .unwrap_or(0.0)
        ));
    }
    Ok(out)
}
