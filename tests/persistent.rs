//! Persistent executors end to end (docs/tasks.md, "Persistent executors"): real replicas, real
//! workers, and long-lived Python processes fed one attempt at a time over stdin
//! (tests/fixtures/persistent_handler.py; docs/examples/persistent_handler.py for the
//! documented example). Exactly-once with fencing, a hung process killed by the execution
//! timeout and replaced, a crashed one replaced, output per attempt, and a worker `kill -9`
//! losing nothing.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

/// python3 runs the handlers: installed by `.ci/install-tools` when missing; without it (and
/// without root to install it) the tests say so and skip, except in CI.
fn python() -> bool {
    static INSTALL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _once = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    let have = || {
        std::process::Command::new("python3")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !have() {
        let tools = Path::new(env!("CARGO_MANIFEST_DIR")).join(".ci/install-tools");
        let status = std::process::Command::new(tools).status();
        eprintln!(".ci/install-tools: {status:?}");
    }
    if have() {
        return true;
    }
    let msg = "python3 is missing and .ci/install-tools could not install it (needs root)";
    assert!(std::env::var("CI").map_or(true, |v| v != "true"), "{msg}");
    eprintln!("SKIPPED: {msg}");
    false
}

fn handler() -> String {
    format!(
        "{}/tests/fixtures/persistent_handler.py",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// A cluster whose `default` queue runs on the persistent executor `handler`.
fn persistent_fleet(grace_ms: u64, handler: &str) -> (TestCluster, PathBuf, String) {
    start_fleet_with(
        3,
        grace_ms,
        &format!(
            "[queues.default]\nexecutor = \"persistent\"\nexecutor_command = [\"python3\", \"{handler}\"]\n"
        ),
    )
}

/// The handler's arguments for a task doing `action` and marking `marks`.
fn args(action: &str, marks: &Path) -> Vec<String> {
    vec![action.to_string(), marks.display().to_string()]
}

fn outcome(t: &serde_json::Value, i: usize) -> serde_json::Value {
    t["attempts"][i]["outcome"].clone()
}

fn output(t: &serde_json::Value, i: usize) -> String {
    t["attempts"][i]["output_tail"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// How long an executor process may take to die after its attempt ended.
const DEATH: Duration = Duration::from_secs(15);

#[test]
fn three_hundred_tasks_run_exactly_once_on_a_few_reused_processes() {
    if !python() {
        return;
    }
    let (c, config, peers) = persistent_fleet(5000, &handler());
    let dir = c.dir.path().to_path_buf();
    let _a = TestWorker::start(&dir, "a", &peers, &config, &["--concurrency", "4"]);
    let _b = TestWorker::start(&dir, "b", &peers, &config, &["--concurrency", "4"]);
    let marks = dir.join("marks");
    let file = command_file(&dir, "tasks.jsonl", 300, |_| args("ok", &marks));
    submit_file(&peers, &file, 300);
    wait_until("300 tasks to succeed", Duration::from_secs(120), || {
        let n = task_ids_in(&peers, "succeeded")?.len();
        if n == 300 {
            Ok(())
        } else {
            Err(format!("{n} succeeded\n{}", c.logs()))
        }
    });
    let m = read_marks(&marks);
    assert_eq!(m.len(), 300, "each task ran exactly once");
    let mut per_task: BTreeMap<u64, usize> = BTreeMap::new();
    for mark in &m {
        *per_task.entry(mark.task).or_default() += 1;
        assert_eq!(mark.attempt, 1, "{mark:?}");
    }
    assert_eq!(per_task.len(), 300);
    let tokens: BTreeSet<u64> = m.iter().map(|m| m.token).collect();
    assert_eq!(tokens.len(), 300, "one fencing token per attempt");
    // At most one process per slot of each worker: the processes were reused.
    let pids: BTreeSet<i32> = m.iter().map(|m| m.pid).collect();
    eprintln!("300 tasks ran on {} executor processes", pids.len());
    assert!(pids.len() <= 8, "{} processes for 8 slots", pids.len());
    // Each attempt's output is its own: the line it wrote, and no other task's.
    let t = show_task(&peers, m[150].task).unwrap();
    let out = output(&t, 0);
    let own = format!("output of task {} attempt 1", m[150].task);
    assert!(out.contains(&own), "{out:?}");
    assert_eq!(out.matches("output of task").count(), 1, "{out:?}");
}

#[test]
fn a_hung_process_is_killed_by_the_timeout_and_a_crashed_one_replaced() {
    if !python() {
        return;
    }
    let (c, config, peers) = persistent_fleet(5000, &handler());
    let dir = c.dir.path().to_path_buf();
    let _a = TestWorker::start(&dir, "a", &peers, &config, &["--concurrency", "1"]);
    let marks = dir.join("marks");
    let retry = ["--timeout", "2s", "--backoff-initial", "100ms"];
    let hung = submit_task(&peers, &retry, &args("hang-first", &marks));
    let t = wait_for_state(&peers, hung, "succeeded", Duration::from_secs(30));
    assert_eq!(outcome(&t, 0), "timed_out", "{t}");
    assert_eq!(outcome(&t, 1), "succeeded", "{t}");
    let m = read_marks(&marks);
    assert_eq!(m.len(), 2, "{m:?}");
    assert_ne!(m[0].pid, m[1].pid, "attempt 2 ran on a new process");
    wait_dead(m[0].pid, "the hung process to be gone", DEATH);
    // Output per attempt: attempt 1's output is attempt 1's (the process's start line too:
    // what a process writes before its first result belongs to its first attempt).
    assert!(output(&t, 0).contains("attempt 1"), "{t}");
    assert!(output(&t, 0).contains("starting"), "{t}");
    assert!(!output(&t, 0).contains("attempt 2"), "{t}");
    assert!(output(&t, 1).contains("attempt 2"), "{t}");
    assert!(!output(&t, 1).contains("attempt 1"), "{t}");

    let crash = submit_task(&peers, &retry, &args("crash-first", &marks));
    let t = wait_for_state(&peers, crash, "succeeded", Duration::from_secs(30));
    let failed = &t["attempts"][0]["outcome"]["failed"];
    assert_eq!(failed["exit_code"], 3, "{t}");
    assert!(
        failed["error"]
            .as_str()
            .unwrap_or_default()
            .contains("persistent executor exited"),
        "{t}"
    );
    assert_eq!(outcome(&t, 1), "succeeded", "{t}");
    let m = read_marks(&marks);
    assert_eq!(m.len(), 4, "{m:?}");
    assert_ne!(m[2].pid, m[3].pid, "attempt 2 ran on a new process");
    wait_dead(m[2].pid, "the crashed process to be reaped", DEATH);

    // A reported failure keeps the process: the next attempt runs on the same one.
    let fail = submit_task(&peers, &["--max-attempts", "1"], &args("fail", &marks));
    let t = wait_for_state(&peers, fail, "dead", Duration::from_secs(30));
    assert_eq!(
        t["attempts"][0]["outcome"]["failed"]["error"], "asked to fail",
        "{t}"
    );
    let ok = submit_task(&peers, &[], &args("ok", &marks));
    wait_for_state(&peers, ok, "succeeded", Duration::from_secs(30));
    let m = read_marks(&marks);
    assert_eq!(m[4].pid, m[5].pid, "{m:?}");
    assert_eq!(m[3].pid, m[4].pid, "{m:?}");

    // A process that dies while idle (killed, out of memory) costs no attempt: the next task
    // runs at its first attempt on a new process.
    // SAFETY: kills the test's own executor process.
    unsafe { libc::kill(m[5].pid, libc::SIGKILL) };
    let next = submit_task(&peers, &["--max-attempts", "1"], &args("ok", &marks));
    let t = wait_for_state(&peers, next, "succeeded", Duration::from_secs(30));
    assert_eq!(t["attempts"].as_array().unwrap().len(), 1, "{t}");
    let m = read_marks(&marks);
    assert_ne!(m[6].pid, m[5].pid, "{m:?}");
}

#[test]
fn a_frozen_workers_late_result_is_fenced_and_its_process_killed() {
    if !python() {
        return;
    }
    // A short failover grace: the leader was just elected, and no lease expires in its grace.
    let (c, config, peers) = persistent_fleet(200, &handler());
    let dir = c.dir.path().to_path_buf();
    let marks = dir.join("marks");
    let (_a, _b, id, _, first) =
        fenced_while_frozen(&dir, &peers, &config, &marks, &args("hang-first", &marks));
    wait_dead(
        first.pid,
        "the fenced attempt's executor process to be killed",
        DEATH,
    );
    let t = show_task(&peers, id).unwrap();
    let successes = t["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["outcome"] == "succeeded")
        .count();
    assert_eq!(successes, 1, "{t}");
    let m = read_marks(&marks);
    assert_eq!(m.len(), 2, "{m:?}");
    assert_eq!((m[1].worker.as_str(), m[1].attempt), ("b", 2), "{m:?}");
    assert!(m[1].token > m[0].token, "{m:?}");
}

#[test]
fn a_killed_worker_loses_nothing_and_its_processes_die_with_it() {
    if !python() {
        return;
    }
    let (c, config, peers) = persistent_fleet(5000, &handler());
    let dir = c.dir.path().to_path_buf();
    let mut a = TestWorker::start(&dir, "a", &peers, &config, &["--concurrency", "4"]);
    let marks = dir.join("marks");
    let file = command_file(&dir, "tasks.jsonl", 60, |_| args("sleep:0.2", &marks));
    submit_file(&peers, &file, 60);
    let before = wait_until("a to run some tasks", Duration::from_secs(30), || {
        let m = read_marks(&marks);
        if m.len() >= 8 {
            Ok(m)
        } else {
            Err(format!("{} marks", m.len()))
        }
    });
    a.kill9();
    let _b = TestWorker::start(&dir, "b", &peers, &config, &["--concurrency", "4"]);
    for pid in before.iter().map(|m| m.pid).collect::<BTreeSet<_>>() {
        wait_dead(
            pid,
            "the killed worker's executor processes to die with it",
            DEATH,
        );
    }
    wait_until("all 60 tasks to succeed", Duration::from_secs(60), || {
        let n = task_ids_in(&peers, "succeeded")?.len();
        if n == 60 {
            Ok(())
        } else {
            Err(format!("{n} succeeded"))
        }
    });
    let m = read_marks(&marks);
    let tasks: BTreeSet<u64> = m.iter().map(|m| m.task).collect();
    assert_eq!(tasks.len(), 60, "every task ran");
    assert!(m.iter().any(|m| m.worker == "b"), "b took over");
}

#[test]
fn the_documented_example_handler_runs_tasks() {
    if !python() {
        return;
    }
    let example = format!(
        "{}/docs/examples/persistent_handler.py",
        env!("CARGO_MANIFEST_DIR")
    );
    // docs/tasks.md shows this very file.
    let docs =
        std::fs::read_to_string(format!("{}/docs/tasks.md", env!("CARGO_MANIFEST_DIR"))).unwrap();
    let code = std::fs::read_to_string(&example).unwrap();
    assert!(
        docs.contains(&format!("```python\n{code}```")),
        "docs/tasks.md does not show docs/examples/persistent_handler.py as it is"
    );
    let (c, config, peers) = persistent_fleet(5000, &example);
    let dir = c.dir.path().to_path_buf();
    let _a = TestWorker::start(&dir, "a", &peers, &config, &["--concurrency", "1"]);
    let ok = submit_task(&peers, &[], &["sleep".to_string(), "0.1".to_string()]);
    let bad = submit_task(
        &peers,
        &["--max-attempts", "1"],
        &["fail".to_string(), "no".to_string(), "input".to_string()],
    );
    let t = wait_for_state(&peers, ok, "succeeded", Duration::from_secs(30));
    assert!(output(&t, 0).contains("handled ['sleep', '0.1']"), "{t}");
    let t = wait_for_state(&peers, bad, "dead", Duration::from_secs(30));
    assert_eq!(
        t["attempts"][0]["outcome"]["failed"]["error"], "no input",
        "{t}"
    );
}
