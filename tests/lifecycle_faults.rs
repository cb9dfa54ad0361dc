//! Faults during the task lifecycle, with real processes: a worker killed with SIGKILL, a
//! worker frozen with SIGSTOP past its visibility timeout, and the leader killed with SIGKILL
//! in the middle of 2,000 tasks.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;

/// SIGKILL to every process an attempt left behind (what a machine crash does to them).
fn kill_attempts(marks: &[Mark]) {
    for m in marks {
        // SAFETY: the test kills the process groups its own tasks created.
        unsafe { libc::killpg(m.pid, libc::SIGKILL) };
    }
}

#[test]
fn a_killed_workers_tasks_run_elsewhere_after_the_liveness_timeout() {
    let (c, config, peers) = start_fleet(3, 5000);
    let dir = c.dir.path().to_path_buf();
    let mut a = TestWorker::start(&dir, "a", &peers, &config, &["--concurrency", "2"]);
    let marks = dir.join("marks");
    let cmd = marker_command(&marks, "if [ $FLEET_ATTEMPT = 1 ]; then exec sleep 600; fi");
    let ids: Vec<u64> = (0..2)
        .map(|_| submit_task(&peers, &["--visibility-timeout", "60s"], &cmd))
        .collect();
    let first = wait_until("both tasks to start on a", Duration::from_secs(20), || {
        let m = read_marks(&marks);
        if m.len() == 2 {
            Ok(m)
        } else {
            Err(format!("{m:?}"))
        }
    });
    let _b = TestWorker::start(&dir, "b", &peers, &config, &["--concurrency", "2"]);
    a.kill9();
    kill_attempts(&first);
    let killed = Instant::now();
    for id in &ids {
        wait_for_state(&peers, *id, "succeeded", Duration::from_secs(30));
    }
    let took = killed.elapsed();
    eprintln!("tasks of the killed worker finished elsewhere {took:?} after the kill");
    assert!(
        took < Duration::from_secs(30),
        "well before the 60 s visibility timeout"
    );
    for id in &ids {
        let t = show_task(&peers, *id).unwrap();
        let reason = t["attempts"][0]["outcome"]["lost"]["reason"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(reason.contains("lost: no heartbeat"), "{t}");
        assert_eq!(t["attempts"][1]["outcome"], "succeeded", "{t}");
    }
    let m = read_marks(&marks);
    assert_eq!(m.len(), 4, "{m:?}");
    assert!(m[2..].iter().all(|m| m.worker == "b" && m.attempt == 2));
}

#[test]
fn a_frozen_worker_is_fenced_after_its_visibility_timeout() {
    // A short failover grace: the leader was just elected, and no lease expires in its grace.
    let (c, config, peers) = start_fleet(3, 200);
    let dir = c.dir.path().to_path_buf();
    // The visibility timeout (2 s) is shorter than the worker liveness timeout (3 s).
    let marks = dir.join("marks");
    let cmd = marker_command(&marks, "if [ $FLEET_ATTEMPT = 1 ]; then exec sleep 600; fi");
    let (a, _b, id, _, first) = fenced_while_frozen(&dir, &peers, &config, &marks, &cmd);
    wait_dead(
        first.pid,
        "the stale attempt's process to be killed",
        Duration::from_secs(15),
    );
    wait_until(
        "the stale report to be rejected",
        Duration::from_secs(15),
        || {
            let log = a.log_text();
            if log.contains("report rejected") {
                Ok(())
            } else {
                Err(tail(&log, 10))
            }
        },
    );
    let t = show_task(&peers, id).unwrap();
    let successes = t["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["outcome"] == "succeeded")
        .count();
    assert_eq!(successes, 1, "{t}");
    assert_eq!(t["attempts"].as_array().unwrap().len(), 2, "{t}");
}

#[test]
fn a_frozen_worker_does_not_get_its_own_lost_task_back() {
    let (c, config, peers) = start_fleet(3, 200);
    let dir = c.dir.path().to_path_buf();
    // Two slots: while one attempt runs, the worker's lease request for the other slot waits
    // at the leader, and stays open while the worker is frozen.
    let a = TestWorker::start(&dir, "a", &peers, &config, &["--concurrency", "2"]);
    let marks = dir.join("marks");
    let cmd = marker_command(&marks, "if [ $FLEET_ATTEMPT = 1 ]; then exec sleep 600; fi");
    let id = submit_task(
        &peers,
        &["--visibility-timeout", "2s", "--backoff-initial", "100ms"],
        &cmd,
    );
    wait_until("the task to start on a", Duration::from_secs(20), || {
        read_marks(&marks)
            .first()
            .cloned()
            .ok_or_else(|| "no mark".to_string())
    });
    a.signal(libc::SIGSTOP);
    eprintln!("--- the lease is lost for silence; the retry must not go to the frozen worker");
    wait_until("attempt 1 to be lost", Duration::from_secs(20), || {
        let t = show_task(&peers, id)?;
        match t["attempts"][0]["outcome"]["lost"]["reason"].as_str() {
            Some(r) => Ok(r.to_string()),
            None => Err(t.to_string()),
        }
    });
    // Only now does another worker start: had the retry gone to the frozen worker's open
    // request, it would be lost again there (a third attempt), not run here as the second.
    let _b = TestWorker::start(&dir, "b", &peers, &config, &["--concurrency", "1"]);
    let t = wait_for_state(&peers, id, "succeeded", Duration::from_secs(30));
    assert_eq!(
        t["attempts"].as_array().unwrap().len(),
        2,
        "one lost attempt, then one success on b: {t}"
    );
    let m = read_marks(&marks);
    assert_eq!(m.last().map(|m| m.worker.as_str()), Some("b"), "{m:?}");
    a.signal(libc::SIGCONT);
}

#[test]
fn killing_the_leader_during_2000_tasks_loses_nothing_and_expires_nothing() {
    let (mut c, config, peers) = start_fleet(3, 5000);
    let status = c.wait_for_leader(&peers, 3, Duration::from_secs(30));
    let dir = c.dir.path().to_path_buf();
    let _w1 = TestWorker::start(&dir, "w1", &peers, &config, &["--concurrency", "8"]);
    let _w2 = TestWorker::start(&dir, "w2", &peers, &config, &["--concurrency", "8"]);
    let marks = dir.join("marks");
    let file = command_file(&dir, "tasks.jsonl", 2000, |_| {
        marker_command(&marks, "sleep 0.05")
    });
    submit_file(&peers, &file, 2000);
    wait_until("400 tasks to have run", Duration::from_secs(120), || {
        let n = read_marks(&marks).len();
        if n >= 400 {
            Ok(())
        } else {
            Err(format!("{n}"))
        }
    });
    let leader = status["leader_id"].as_u64().unwrap();
    c.node(leader).kill9();
    eprintln!("killed leader node {leader}");
    let survivors: Vec<String> = [1u64, 2, 3]
        .into_iter()
        .filter(|id| *id != leader)
        .map(|id| c.addr(id))
        .collect();
    let survivors = survivors.join(",");
    wait_until(
        "all 2000 tasks to succeed",
        Duration::from_secs(240),
        || {
            let n = task_ids_in(&survivors, "succeeded")?.len();
            if n == 2000 {
                Ok(())
            } else {
                Err(format!("{n} succeeded\n{}", c.logs()))
            }
        },
    );
    let tasks = fleet_json(&["task", "list", "--limit", "10000", "--peers", &survivors]).unwrap();
    let tasks = tasks["value"].as_array().unwrap();
    assert_eq!(tasks.len(), 2000);
    for t in tasks {
        let attempts = t["attempts"].as_array().unwrap();
        assert_eq!(
            attempts.len(),
            1,
            "no attempt lost or expired while its worker was healthy: {t}"
        );
        assert_eq!(attempts[0]["outcome"], "succeeded", "{t}");
    }
    let mut per_task: BTreeMap<u64, usize> = BTreeMap::new();
    for m in read_marks(&marks) {
        *per_task.entry(m.task).or_default() += 1;
    }
    assert_eq!(per_task.len(), 2000);
    let twice: Vec<_> = per_task.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "tasks that ran more than once: {twice:?}");
}
