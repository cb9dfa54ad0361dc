//! Task commands that work without workers, end to end through a follower: queue stats,
//! cancel, retry's refusal for a task that is not dead or failed, and clear errors.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn cancel_retry_and_queue_stats_through_a_follower() {
    let mut c = TestCluster::new(3, &[]);
    let peers = c.peers();
    for id in 1..=3 {
        c.node(id).start();
    }
    let status = c.wait_for_leader(&peers, 3, Duration::from_secs(30));
    let leader = status["leader_id"].as_u64().unwrap();
    let follower = c.addr([1u64, 2, 3].into_iter().find(|&id| id != leader).unwrap());

    for (queue, cmd) in [("default", "a"), ("default", "b"), ("reports", "c")] {
        fleet_json(&[
            "submit", "--peers", &follower, "--queue", queue, "--", "echo", cmd,
        ])
        .unwrap();
    }
    let stats = fleet_json(&["queue", "stats", "--peers", &follower]).unwrap();
    assert_eq!(stats["value"]["default"]["ready"], 2, "{stats}");
    assert_eq!(stats["value"]["reports"]["ready"], 1, "{stats}");
    assert!(stats["value"]["default"]["oldest_ready_since_ms"].is_u64());

    let out = fleet_json(&["task", "cancel", "1", "--peers", &follower]).unwrap();
    assert_eq!(out["state"], "cancelled");
    let t = fleet_json(&["task", "show", "1", "--peers", &follower]).unwrap();
    assert_eq!(t["value"]["state"], "cancelled");
    let cancelled =
        fleet_json(&["task", "list", "--state", "cancelled", "--peers", &peers]).unwrap();
    assert_eq!(cancelled["value"].as_array().unwrap().len(), 1);
    let stats = fleet_json(&["queue", "stats", "--peers", &peers]).unwrap();
    assert_eq!(stats["value"]["default"]["ready"], 1);

    for (args, needle) in [
        (
            vec!["task", "cancel", "1"],
            "task 1 is cancelled; cancel needs a queued, running or failed task",
        ),
        (
            vec!["task", "retry", "2"],
            "task 2 is queued; retry needs a dead or failed task",
        ),
        // Said once: "error: task 99 not found", not "not found: task 99 not found".
        (vec!["task", "cancel", "99"], "error: task 99 not found"),
        (vec!["task", "retry", "99"], "error: task 99 not found"),
        (
            vec!["task", "requeue", "99", "--token", "1"],
            "error: task 99 not found",
        ),
        (vec!["task", "requeue", "99"], "error: task 99 not found"),
        (
            vec!["task", "list", "--state", "sleeping"],
            "unknown task state \"sleeping\"",
        ),
    ] {
        let mut all = args.clone();
        all.extend(["--peers", &follower]);
        let out = fleet(&all);
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}
