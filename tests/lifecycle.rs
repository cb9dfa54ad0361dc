//! The task lifecycle end to end with real replicas and real workers: exactly-once runs of
//! 1,000 tasks, execution timeouts with backoff into the dead-letter state and back, cancel and
//! requeue of a running attempt, and a draining worker.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;

#[test]
fn a_thousand_tasks_each_run_exactly_once() {
    let (c, config, peers) = start_fleet(3, 5000);
    let dir = c.dir.path().to_path_buf();
    let _w1 = TestWorker::start(&dir, "w1", &peers, &config, &["--concurrency", "8"]);
    let _w2 = TestWorker::start(&dir, "w2", &peers, &config, &["--concurrency", "8"]);
    let marks = dir.join("marks");
    let file = command_file(&dir, "tasks.jsonl", 1000, |_| {
        marker_command(&marks, "true")
    });
    let started = Instant::now();
    submit_file(&peers, &file, 1000);
    wait_until("1000 tasks to succeed", Duration::from_secs(180), || {
        let n = task_ids_in(&peers, "succeeded")?.len();
        if n == 1000 {
            Ok(())
        } else {
            Err(format!("{n} succeeded\n{}", c.logs()))
        }
    });
    eprintln!("1000 tasks ran in {:.1}s", started.elapsed().as_secs_f64());
    let marks = read_marks(&marks);
    assert_eq!(marks.len(), 1000, "each task ran exactly once");
    let mut per_task: BTreeMap<u64, usize> = BTreeMap::new();
    for m in &marks {
        *per_task.entry(m.task).or_default() += 1;
        assert_eq!(m.attempt, 1, "{m:?}");
    }
    assert_eq!(per_task.len(), 1000);
    assert!(per_task.values().all(|n| *n == 1));
    for w in ["w1", "w2"] {
        assert!(marks.iter().any(|m| m.worker == w), "{w} ran nothing");
    }
    let t = show_task(&peers, 1).unwrap();
    assert_eq!(t["attempts"].as_array().unwrap().len(), 1, "{t}");
    assert_eq!(t["attempts"][0]["outcome"], "succeeded", "{t}");

    let workers = fleet_json(&["worker", "list", "--peers", &peers]).unwrap();
    let states: Vec<&str> = workers
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, vec!["active", "active"], "{workers}");

    // An idempotency key makes a second submission return the first task.
    let [a, b] = [(); 2].map(|_| {
        fleet_json(&[
            "submit",
            "--idempotency-key",
            "k1",
            "--peers",
            &peers,
            "--",
            "true",
        ])
        .unwrap()
    });
    assert_eq!(a["id"], b["id"]);
    assert_eq!(b["duplicate"], true);
}

#[test]
fn timeouts_back_off_into_dead_and_retry_brings_the_task_back_and_cancel_kills() {
    let (c, config, peers) = start_fleet(3, 5000);
    let dir = c.dir.path().to_path_buf();
    let _w = TestWorker::start(&dir, "w1", &peers, &config, &["--concurrency", "2"]);
    let marks = dir.join("marks");
    let cmd = marker_command(&marks, "exec sleep 600");
    let opts = [
        "--timeout",
        "1s",
        "--max-attempts",
        "3",
        "--backoff-initial",
        "1s",
        "--backoff-multiplier",
        "2",
    ];
    let id = submit_task(&peers, &opts, &cmd);
    let task = wait_for_state(&peers, id, "dead", Duration::from_secs(60));
    let attempts = task["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 3, "{task}");
    for a in attempts {
        assert_eq!(a["outcome"], "timed_out", "{task}");
        let ran = a["ended_at_ms"].as_u64().unwrap() - a["started_at_ms"].as_u64().unwrap();
        assert!((900..5000).contains(&ran), "attempt ran {ran} ms: {task}");
    }
    // Backoff: 1 s then 2 s, each jittered down to no less than half.
    for (i, base) in [(1usize, 1000u64), (2, 2000)] {
        let gap = attempts[i]["started_at_ms"].as_u64().unwrap()
            - attempts[i - 1]["ended_at_ms"].as_u64().unwrap();
        assert!(
            gap >= base / 2 && gap <= base + 1500,
            "gap {gap} ms before attempt {}: {task}",
            i + 1
        );
    }
    // Every timed-out process was killed.
    for m in read_marks(&marks) {
        wait_dead(
            m.pid,
            "a timed-out attempt's process to be gone",
            Duration::from_secs(10),
        );
    }
    let out = fleet_json(&["task", "retry", &id.to_string(), "--peers", &peers]).unwrap();
    assert_eq!(out["state"], "queued");
    wait_until("a fourth attempt", Duration::from_secs(20), || {
        let t = show_task(&peers, id)?;
        if t["attempts"].as_array().unwrap().len() == 4 {
            Ok(())
        } else {
            Err(t.to_string())
        }
    });

    // Cancel: the running attempt is killed at the worker's next heartbeat.
    let marks2 = dir.join("marks2");
    let cmd = marker_command(&marks2, "exec sleep 600");
    let id2 = submit_task(&peers, &[], &cmd);
    let m = wait_until("the long task to start", Duration::from_secs(20), || {
        read_marks(&marks2)
            .first()
            .cloned()
            .ok_or_else(|| "no mark".to_string())
    });
    fleet_json(&["task", "cancel", &id2.to_string(), "--peers", &peers]).unwrap();
    wait_dead(
        m.pid,
        "the cancelled attempt's process to be killed",
        Duration::from_secs(10),
    );
    let t = wait_until(
        "the attempt to be recorded as cancelled",
        Duration::from_secs(10),
        || {
            let t = show_task(&peers, id2)?;
            if t["attempts"][0]["outcome"] == "cancelled" {
                Ok(t)
            } else {
                Err(t.to_string())
            }
        },
    );
    assert_eq!(t["state"], "cancelled");
    assert!(t["lease"].is_null(), "{t}");
}

#[test]
fn sigterm_drains_and_a_second_signal_hands_leases_back() {
    let (c, config, peers) = start_fleet(3, 5000);
    let dir = c.dir.path().to_path_buf();
    let mut w = TestWorker::start(&dir, "w1", &peers, &config, &["--concurrency", "2"]);
    let marks = dir.join("marks");
    let mut ids = Vec::new();
    for _ in 0..2 {
        let cmd = marker_command(&marks, "sleep 2");
        ids.push(submit_task(&peers, &[], &cmd));
    }
    wait_until("both tasks to start", Duration::from_secs(20), || {
        let n = read_marks(&marks).len();
        if n == 2 {
            Ok(())
        } else {
            Err(format!("{n} started"))
        }
    });
    w.signal(libc::SIGTERM);
    wait_until(
        "the worker to show as draining",
        Duration::from_secs(10),
        || {
            let l = fleet_json(&["worker", "list", "--peers", &peers])?;
            if l[0]["state"] == "draining" {
                Ok(())
            } else {
                Err(l.to_string())
            }
        },
    );
    // A task submitted while it drains is not taken by it.
    let late = fleet_json(&["submit", "--peers", &peers, "--", "true"]).unwrap()["id"]
        .as_u64()
        .unwrap();
    assert_eq!(
        w.wait_exit(Duration::from_secs(30)),
        Some(0),
        "{}",
        w.log_text()
    );
    for id in &ids {
        let t = show_task(&peers, *id).unwrap();
        assert_eq!(t["state"], "succeeded", "{t}");
        assert_eq!(t["attempts"].as_array().unwrap().len(), 1, "{t}");
    }
    assert_eq!(show_task(&peers, late).unwrap()["state"], "queued");
    let stats = fleet_json(&["queue", "stats", "--peers", &peers]).unwrap();
    assert_eq!(
        stats["value"]["default"]["running"], 0,
        "no lease left behind: {stats}"
    );

    // A second SIGTERM stops the attempt and hands its lease back at once.
    let mut w2 = TestWorker::start(&dir, "w2", &peers, &config, &["--concurrency", "1"]);
    let marks2 = dir.join("marks2");
    let cmd = marker_command(&marks2, "exec sleep 600");
    let long = submit_task(&peers, &["--priority", "9"], &cmd);
    let m = wait_until("the long task to start", Duration::from_secs(20), || {
        read_marks(&marks2)
            .first()
            .cloned()
            .ok_or_else(|| "no mark".to_string())
    });
    assert_eq!(m.task, long, "priority 9 runs before the queued task");
    w2.signal(libc::SIGTERM);
    wait_until("the worker to drain", Duration::from_secs(10), || {
        if w2.log_text().contains("draining") {
            Ok(())
        } else {
            Err("not yet".into())
        }
    });
    w2.signal(libc::SIGTERM);
    assert_eq!(
        w2.wait_exit(Duration::from_secs(20)),
        Some(0),
        "{}",
        w2.log_text()
    );
    assert!(!alive(m.pid), "the attempt's process was stopped");
    let t = show_task(&peers, long).unwrap();
    assert_ne!(t["state"], "running", "{t}");
    let reason = t["attempts"][0]["outcome"]["lost"]["reason"]
        .as_str()
        .unwrap_or_default();
    assert!(reason.contains("handed back"), "{t}");
}

#[test]
fn requeue_kills_the_attempt_it_names_and_runs_the_task_again_after_the_visibility_timeout() {
    let (c, config, peers) = start_fleet(3, 5200);
    let dir = c.dir.path().to_path_buf();
    let _w = TestWorker::start(&dir, "w1", &peers, &config, &["--concurrency", "2"]);
    let marks = dir.join("marks");
    let cmd = marker_command(&marks, "exec sleep 600");
    let opts = [
        "--visibility-timeout",
        "4s",
        "--max-attempts",
        "3",
        "--backoff-initial",
        "100ms",
    ];
    let id = submit_task(&peers, &opts, &cmd);
    let first = wait_until("attempt 1 to start", Duration::from_secs(20), || {
        read_marks(&marks)
            .first()
            .cloned()
            .ok_or_else(|| "no mark".to_string())
    });
    let ids = id.to_string();

    // Without --token: the running attempt is read, then requeued by its token.
    let out = fleet_json(&["task", "requeue", &ids, "--peers", &peers]).unwrap();
    assert_eq!(out["fencing_token"].as_u64(), Some(first.token), "{out}");
    assert_eq!(out["state"], "failed", "{out}");
    wait_dead(
        first.pid,
        "the requeued attempt's process to be killed (fenced at the next heartbeat)",
        Duration::from_secs(10),
    );
    let second = wait_until("attempt 2 to start", Duration::from_secs(30), || {
        read_marks(&marks)
            .get(1)
            .cloned()
            .ok_or_else(|| "one mark".to_string())
    });
    assert!(second.token > first.token);
    let t = show_task(&peers, id).unwrap();
    let a = &t["attempts"];
    assert_eq!(
        a[0]["outcome"]["lost"]["reason"], "requeued by an operator",
        "{t}"
    );
    // The task was held back for the visibility timeout (4 s), not its 100 ms backoff: the
    // old attempt could still have been running until then.
    let gap = a[1]["started_at_ms"].as_u64().unwrap() - a[0]["ended_at_ms"].as_u64().unwrap();
    assert!(
        gap >= 4_000,
        "attempt 2 started {gap} ms after the requeue: {t}"
    );

    // The same command again (typed twice, or retried after a lost answer): it names an
    // attempt a requeue already ended, so it succeeds without touching the running one.
    let again = fleet_json(&[
        "task",
        "requeue",
        &ids,
        "--token",
        &first.token.to_string(),
        "--peers",
        &peers,
    ])
    .unwrap();
    assert_eq!(again["state"], "running", "{again}");
    assert!(alive(second.pid), "the running attempt was not touched");
    let t = show_task(&peers, id).unwrap();
    assert!(t["attempts"][1]["outcome"].is_null(), "{t}");
    assert_eq!(
        t["lease"]["fencing_token"].as_u64(),
        Some(second.token),
        "{t}"
    );

    // An attempt that ended otherwise is left alone, and the error says so; a task with no
    // running attempt has nothing to requeue.
    let done = submit_task(&peers, &[], &["true".to_string()]);
    let t = wait_for_state(&peers, done, "succeeded", Duration::from_secs(20));
    let token = t["attempts"][0]["fencing_token"]
        .as_u64()
        .unwrap()
        .to_string();
    let d = done.to_string();
    let err =
        fleet_json(&["task", "requeue", &d, "--token", &token, "--peers", &peers]).unwrap_err();
    assert!(
        err.contains(&format!(
            "the attempt with fencing token {token} already ended (succeeded)"
        )) && err.contains("nothing was changed"),
        "{err}"
    );
    let err = fleet_json(&["task", "requeue", &d, "--peers", &peers]).unwrap_err();
    assert!(
        err.contains(&format!(
            "task {done} is succeeded and has no running attempt"
        )),
        "{err}"
    );
    assert_eq!(show_task(&peers, done).unwrap()["state"], "succeeded");
}
