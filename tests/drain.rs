//! A worker stopped while its lease request waits at the leader, as docs/tasks.md ("Drain")
//! promises: the request is not abandoned, so a task granted at that moment runs on the
//! draining worker (or stays queued for the next), and no attempt is spent handing it back.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn a_task_granted_as_the_worker_stops_runs_there_and_no_attempt_is_handed_back() {
    let (c, config, peers) = start_fleet(3, 1000);
    let dir = c.dir.path().to_path_buf();
    let marks = dir.join("marks");
    let mut ids = Vec::new();
    for round in 0..8 {
        let mut w = TestWorker::start(&dir, &format!("w{round}"), &peers, &config, &[]);
        // Idle: its lease request waits at the leader.
        wait_until("the worker to be active", Duration::from_secs(30), || {
            let list = fleet_json(&["worker", "list", "--peers", &peers])?;
            let active = list.as_array().is_some_and(|ws| {
                ws.iter()
                    .any(|x| x["info"]["name"] == format!("w{round}") && x["state"] == "active")
            });
            if active && read_marks(&marks).len() == ids.len() {
                Ok(())
            } else {
                Err(list.to_string())
            }
        });
        // The grant races the stop: it is being committed as the signal lands.
        ids.push(submit_task(&peers, &[], &marker_command(&marks, "true")));
        w.signal(libc::SIGTERM);
        assert_eq!(
            w.wait_exit(Duration::from_secs(30)),
            Some(0),
            "the worker drains"
        );
    }
    // Whatever was left queued runs on one more worker.
    let _last = TestWorker::start(&dir, "last", &peers, &config, &[]);
    for id in &ids {
        let t = wait_for_state(&peers, *id, "succeeded", Duration::from_secs(30));
        let attempts = t["attempts"].as_array().unwrap();
        assert_eq!(
            attempts.len(),
            1,
            "task {id}: one attempt, none handed back: {t}"
        );
    }
    let ran_on_stopping: Vec<String> = read_marks(&marks)
        .into_iter()
        .filter(|m| m.worker != "last")
        .map(|m| format!("task {} on {}", m.task, m.worker))
        .collect();
    eprintln!("granted to a draining worker and run there: {ran_on_stopping:?}");
}
