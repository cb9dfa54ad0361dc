//! Membership changes on a running cluster, watched through `fleet cluster status --output
//! json`: a fourth node joins (and, because the log behind the snapshot was purged, is caught up
//! by a snapshot), a node is removed, and the leader leaves gracefully after handing off.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

fn member_ids(status: &Value) -> Vec<u64> {
    let mut ids: Vec<u64> = status["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_u64().unwrap())
        .collect();
    ids.sort();
    ids
}

#[test]
fn join_remove_leave_and_snapshot_catch_up() {
    let dir = tempfile::tempdir().unwrap();
    // Small snapshots and no log kept behind them, so a new node cannot catch up from the log.
    let config = dir.path().join("fleet.toml");
    std::fs::write(
        &config,
        "[raft]\nsnapshot_every_entries = 20\nkeep_log_entries_after_snapshot = 0\n",
    )
    .unwrap();
    let cfg = config.to_str().unwrap();
    let mut c = TestCluster::new(3, &["--config", cfg]);
    let peers = c.peers();
    for id in 1..=3 {
        c.node(id).start();
    }
    c.wait_for_leader(&peers, 3, Duration::from_secs(30));

    eprintln!("--- 45 writes, one entry each: snapshots are built and the log is purged");
    for i in 0..45 {
        let out = fleet_json(&["submit", "--peers", &peers, "--", "echo", &i.to_string()])
            .unwrap_or_else(|e| panic!("submit {i}: {e}\n{}", c.logs()));
        assert_eq!(out["id"], i + 1);
    }
    wait_until(
        "a purged log on the leader",
        Duration::from_secs(20),
        || {
            let s = fleet_json(&["cluster", "status", "--peers", &peers])?;
            match s["purged_index"].as_u64() {
                Some(p) if p >= 20 => Ok(()),
                _ => Err(s.to_string()),
            }
        },
    );

    eprintln!("--- a fourth node joins through one member and is caught up by snapshot");
    let port = free_ports(1)[0];
    let mut n4 = TestNode::new(
        c.dir.path(),
        4,
        port,
        vec!["--peers".into(), c.addr(1), "--config".into(), cfg.into()],
    );
    n4.start();
    let s = wait_until("four voters", Duration::from_secs(30), || {
        let s = fleet_json(&["cluster", "status", "--peers", &peers])?;
        let voters = s["members"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["voter"] == true)
            .count();
        if voters == 4 && s["leader_view"] == true {
            Ok(s)
        } else {
            Err(s.to_string())
        }
    });
    assert_eq!(member_ids(&s), vec![1, 2, 3, 4]);
    let n4_member = s["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == 4)
        .unwrap()
        .clone();
    assert_eq!(
        n4_member["addr"],
        n4.addr.as_str(),
        "the advertised address is in the membership"
    );
    let expected: Vec<u64> = (1..=45).collect();
    wait_for_tasks(&n4.addr, &expected, Duration::from_secs(20));
    let local = fleet_json(&["cluster", "status", "--local", "--peers", &n4.addr]).unwrap();
    assert_eq!(local["reported_by"], 4);
    assert!(
        local["snapshot_index"].as_u64().is_some(),
        "node 4 installed a snapshot: {local}"
    );
    assert!(
        n4.log_text().contains("installed a snapshot"),
        "node 4 log:\n{}",
        tail(&n4.log_text(), 30)
    );

    eprintln!("--- node 2 is removed");
    let out = fleet_json(&["cluster", "remove", "2", "--peers", &peers]).unwrap();
    assert_eq!(out["removed"], 2);
    let all_peers = format!("{peers},{}", n4.addr);
    let s = wait_until(
        "node 2 gone from the membership",
        Duration::from_secs(10),
        || {
            let s = fleet_json(&["cluster", "status", "--peers", &all_peers])?;
            if member_ids(&s) == vec![1, 3, 4] {
                Ok(s)
            } else {
                Err(s.to_string())
            }
        },
    );
    let err = fleet(&["cluster", "remove", "2", "--peers", &all_peers]);
    assert!(!err.status.success());
    assert!(String::from_utf8_lossy(&err.stderr).contains("node 2 is not a member"));
    // The operator stops the removed node; the others no longer send it anything.
    c.node(2).signal(libc::SIGTERM);
    assert_eq!(c.node(2).wait_exit(Duration::from_secs(20)), Some(0));

    eprintln!("--- the leader leaves gracefully: it hands off leadership first, then stops");
    let leader = s["leader_id"].as_u64().unwrap();
    let leader_addr = if leader == 4 {
        n4.addr.clone()
    } else {
        c.addr(leader)
    };
    let out = fleet_json(&["cluster", "leave", "--peers", &leader_addr]).unwrap();
    assert_eq!(out["left"], leader_addr.as_str());
    let code = if leader == 4 {
        n4.wait_exit(Duration::from_secs(20))
    } else {
        c.node(leader).wait_exit(Duration::from_secs(20))
    };
    assert_eq!(code, Some(0), "a node that left exits cleanly");
    let remaining: Vec<u64> = [1u64, 3, 4].into_iter().filter(|&i| i != leader).collect();
    let s = wait_until(
        "a new leader without the node that left",
        Duration::from_secs(20),
        || {
            let s = fleet_json(&["cluster", "status", "--peers", &all_peers])?;
            if member_ids(&s) == remaining && s["leader_view"] == true {
                Ok(s)
            } else {
                Err(s.to_string())
            }
        },
    );
    assert_ne!(s["leader_id"].as_u64(), Some(leader));
    let out = fleet_json(&["submit", "--peers", &all_peers, "--", "echo", "after-leave"]).unwrap();
    assert_eq!(out["id"], 46);
}
