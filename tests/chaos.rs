//! The chaos harness, as CI runs it: every scenario once, briefly, against the built `fleet`
//! binary (real processes, real signals, the harness's proxy in front of every replica), and
//! the harness's own command line.
//!
//! The run's seed is random and printed; rerun it with `FLEET_CHAOS_SEED=N cargo test --test
//! chaos`. Its report, history and plot stay in `target/tmp/chaos-all/` for inspection.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::Rng;

fn chaos() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_chaos"));
    c.env_remove("FLEET_PEERS").env("RUST_LOG", "warn");
    c
}

/// The scenario names, as `chaos list` prints them.
fn scenario_names() -> Vec<String> {
    let out = chaos().arg("list").output().expect("run chaos list");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("  ") && !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

#[test]
fn every_scenario_passes_a_short_run_and_writes_its_report_and_plot() {
    let seed: u64 = std::env::var("FLEET_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    eprintln!("chaos: seed={seed} (rerun with FLEET_CHAOS_SEED={seed} cargo test --test chaos)");
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("chaos-all");
    let log = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("chaos-all.log");
    let mut child = chaos()
        .args([
            "run",
            "--scenario",
            "all",
            "--hold",
            "2s",
            "--schedules",
            "--workflows",
        ])
        .args(["--seed", &seed.to_string()])
        .arg("--out")
        .arg(&out)
        .arg("--fleet")
        .arg(env!("CARGO_BIN_EXE_fleet"))
        .stdout(std::fs::File::create(&log).expect("log file"))
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start chaos");
    // A bound on the whole run, so a hang fails the test instead of CI's clock.
    let deadline = Instant::now() + Duration::from_secs(15 * 60);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!(
                "the chaos run took more than 15 minutes; its output: {}",
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    // The whole output in the test log: the seed, the plans, the timeline, the table.
    println!("{text}");
    assert!(
        status.success(),
        "chaos run failed ({status}); output above and in {}",
        log.display()
    );
    assert!(
        text.starts_with(&format!("chaos: seed={seed}\n")),
        "the seed comes first"
    );
    assert!(text.contains("verdict: PASS"), "{text}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).expect("report.json"))
            .expect("report is JSON");
    let ran: Vec<&str> = report["scenarios"]
        .as_array()
        .expect("scenarios")
        .iter()
        .map(|s| s["scenario"].as_str().unwrap())
        .collect();
    assert_eq!(ran, scenario_names(), "every scenario ran, in order");
    assert_eq!(report["seed"], seed);
    assert!(report["violations"].as_array().unwrap().is_empty());
    assert!(
        report["totals"]["acknowledged"].as_u64().unwrap() > 100,
        "{report}"
    );
    for s in report["scenarios"].as_array().unwrap() {
        assert!(s["converged_ms"].is_u64(), "{s}");
    }
    // A leader that nobody can reach (its incoming connections cut, its outgoing ones
    // working) does not stay leader: leadership moves and submissions are acknowledged again
    // while the cut still holds.
    let cut = report["scenarios"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["scenario"] == "inbound-cut")
        .expect("inbound-cut ran");
    let hold = cut["hold_ms"].as_u64().unwrap();
    let first_ack = cut["first_ack_ms"].as_u64().unwrap_or(u64::MAX);
    assert!(
        cut["new_leader_ms"].as_u64().is_some_and(|t| t < hold),
        "{cut}"
    );
    assert!(first_ack < hold, "{cut}");
    eprintln!(
        "inbound-cut: first acknowledged submission {first_ack} ms after the cut (held {hold} ms)"
    );
    let svg = std::fs::read_to_string(out.join("throughput.svg")).expect("throughput.svg");
    assert!(svg.starts_with("<svg") && svg.contains("polyline"), "{svg}");
    for name in ["kill-leader", "partition-workers", "clock-step"] {
        assert!(svg.contains(name), "the plot marks {name}");
    }
    let history: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("history.json")).expect("history.json"))
            .expect("history is JSON");
    // The saved history is judged the same way again.
    let again = chaos()
        .args(["check", "--history"])
        .arg(out.join("history.json"))
        .output()
        .unwrap();
    assert!(again.status.success(), "{again:?}");
    assert!(history["executions"].as_array().unwrap().len() > 100);
    // With --schedules: schedules fired through every fault, a pool was used, and the two
    // invariants about them were judged.
    let checked = report["invariants_checked"].as_array().unwrap();
    for inv in ["tick-exactly-once", "pool-over"] {
        assert!(checked.iter().any(|c| c == inv), "{inv} was checked");
    }
    let runs = history["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["run_of"].is_array())
        .count();
    let pooled = history["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["pool"].is_string())
        .count();
    assert!(
        runs > 100 && pooled > 10,
        "{runs} runs, {pooled} pooled tasks"
    );
    assert_eq!(history["schedules"].as_array().unwrap().len(), 6);
    // With --workflows: runs of the diamond and the fan-out started through every fault, all
    // ended, and the workflow invariant judged them.
    assert!(checked.iter().any(|c| c == "workflow"));
    let started = history["runs_started"].as_array().unwrap().len();
    let ended: Vec<&serde_json::Value> = history["runs"].as_array().unwrap().iter().collect();
    assert!(started > 50, "{started} workflow runs started");
    assert!(ended.len() >= started);
    let fanouts = ended
        .iter()
        .filter(|r| r["workflow"] == "chaos-fanout")
        .count();
    assert!(fanouts > 5, "{fanouts} fan-out runs");
}

#[test]
fn help_lists_every_scenario() {
    let out = chaos().arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    let names = scenario_names();
    assert_eq!(names.len(), 16, "{names:?}");
    for n in &names {
        assert!(help.contains(n.as_str()), "--help names {n}: {help}");
    }
    let run_help = chaos().args(["run", "--help"]).output().unwrap();
    let run_help = String::from_utf8_lossy(&run_help.stdout);
    for flag in ["--scenario", "--seed", "--duration", "--hold", "--replicas"] {
        assert!(run_help.contains(flag), "{run_help}");
    }
}

#[test]
fn a_history_with_violations_fails_the_check_and_names_them() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("history.json");
    // Task 1 acknowledged but missing (lost); task 2 succeeded twice, once with a stale token
    // while the newer lease's execution ran (overlap).
    let history = serde_json::json!({
        "seed": 9,
        "submissions": [
            {"key": "k1", "kind": "short", "t_ms": 0, "acked": 1, "error": null},
            {"key": "k2", "kind": "short", "t_ms": 0, "acked": 2, "error": null}
        ],
        "executions": [
            {"ev": "start", "key": "k2", "task": 2, "attempt": 1, "token": 5, "worker": "a", "pid": 1, "t_ms": 100},
            {"ev": "start", "key": "k2", "task": 2, "attempt": 2, "token": 6, "worker": "b", "pid": 2, "t_ms": 200},
            {"ev": "end", "key": "k2", "task": 2, "attempt": 1, "token": 5, "worker": "a", "pid": 1, "t_ms": 300, "exit": 0},
            {"ev": "end", "key": "k2", "task": 2, "attempt": 2, "token": 6, "worker": "b", "pid": 2, "t_ms": 400, "exit": 0}
        ],
        "tasks": [
            {"id": 2, "state": "succeeded", "key": "k2", "attempts": [
                {"number": 1, "token": 5, "worker": 1, "started_at_ms": 100, "ended_at_ms": 300, "outcome": "succeeded"},
                {"number": 2, "token": 6, "worker": 2, "started_at_ms": 200, "ended_at_ms": 400, "outcome": "succeeded"}
            ]}
        ],
        "leaders": []
    });
    std::fs::write(&path, history.to_string()).unwrap();
    let out = chaos()
        .args(["check", "--history"])
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    for invariant in ["[lost]", "[double-success]", "[stale-success]", "[overlap]"] {
        assert!(text.contains(invariant), "{invariant} in {text}");
    }
}

#[test]
fn bad_arguments_are_refused_with_what_is_accepted() {
    let cases: [(&[&str], &str); 4] = [
        (
            &["--scenario", "kill-everything"],
            "unknown scenario \"kill-everything\"",
        ),
        (
            &["--replicas", "4"],
            "--replicas 4 is not valid: use 3 or 5",
        ),
        (&["--rate", "0"], "--rate 0 is not valid"),
        (&["--hold", "1ms"], "--hold"),
    ];
    for (args, want) in cases {
        let out = chaos()
            .arg("run")
            .args(args)
            .args(["--out", "/nonexistent/never-created"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
    let out = chaos()
        .args(["check", "--history", "/nonexistent.json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent.json"));
}
