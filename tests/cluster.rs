//! End to end: three real `fleet join` processes form one cluster, replicate, fail over after
//! `kill -9` of the leader, catch a restarted node up, and survive all three being killed at
//! once. Reproduce a run's start order with `FLEET_TEST_SEED=N` (printed at the start).

mod common;

use std::time::{Duration, Instant};

use common::*;
use rand::seq::SliceRandom;
use rand::Rng;

#[test]
fn three_nodes_form_replicate_fail_over_and_restart() {
    let mut rng = seeded_rng("three_nodes_form_replicate_fail_over_and_restart");
    let mut c = TestCluster::new(3, &[]);
    let peers = c.peers();

    tracing_line("--- start the three nodes in a shuffled order, with delays between them");
    let mut order = vec![1u64, 2, 3];
    order.shuffle(&mut rng);
    for id in &order {
        c.node(*id).start();
        // Staggered starts: formation must cope with peers that appear late. This is the
        // scenario, not synchronization.
        std::thread::sleep(Duration::from_millis(rng.random_range(0..1500)));
    }
    let status = c.wait_for_leader(&peers, 3, Duration::from_secs(30));
    let cluster_id = status["cluster_id"].as_str().unwrap().to_string();
    let leader = status["leader_id"].as_u64().unwrap();
    let follower = [1u64, 2, 3].into_iter().find(|&id| id != leader).unwrap();
    eprintln!("order {order:?}: leader {leader}, submitting through follower {follower}");

    tracing_line("--- 200 tasks submitted through a follower are visible on all three");
    let file = task_file(c.dir.path(), "first", 200);
    let out = fleet_json(&[
        "submit",
        "--peers",
        &c.addr(follower),
        "--file",
        file.to_str().unwrap(),
    ])
    .unwrap_or_else(|e| panic!("submit failed: {e}\n{}", c.logs()));
    let ids: Vec<u64> = out
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids.len(), 200);
    let expected: Vec<u64> = (1..=200).collect();
    assert_eq!(ids, expected, "ids are assigned in submission order");
    for id in 1..=3 {
        wait_for_tasks(&c.addr(id), &expected, Duration::from_secs(10));
    }

    tracing_line("--- kill -9 the leader: a new leader is elected, nothing is lost, writes work");
    let killed_at = Instant::now();
    c.node(leader).kill9();
    let survivors: String = [1u64, 2, 3]
        .iter()
        .filter(|&&id| id != leader)
        .map(|&id| c.addr(id))
        .collect::<Vec<_>>()
        .join(",");
    let new_status = wait_until("a new leader", Duration::from_secs(20), || {
        let s = fleet_json(&[
            "cluster",
            "status",
            "--peers",
            &survivors,
            "--retry-for",
            "1000ms",
        ])?;
        match s["leader_id"].as_u64() {
            Some(l) if l != leader && s["leader_view"] == true => Ok(s),
            _ => Err(s.to_string()),
        }
    });
    let failover = killed_at.elapsed();
    eprintln!(
        "new leader {} elected {} ms after kill -9",
        new_status["leader_id"],
        failover.as_millis()
    );
    // The survivors noticed the death by the closed connection, not by an election timeout
    // (src/raft/leader_loss.rs): each says so in its log.
    for id in [1u64, 2, 3].into_iter().filter(|&id| id != leader) {
        let log = c.node(id).log_text();
        assert!(
            log.contains("the leader's connection closed: standing for election"),
            "node {id}: {log}"
        );
    }
    let list = fleet_json(&["task", "list", "--limit", "10000", "--peers", &survivors]).unwrap();
    assert_eq!(list["linearizable"], true);
    assert_eq!(
        list["value"].as_array().unwrap().len(),
        200,
        "all tasks survive the leader's death"
    );
    let one = fleet_json(&[
        "submit",
        "--peers",
        &survivors,
        "--",
        "echo",
        "after-failover",
    ])
    .unwrap_or_else(|e| panic!("write after failover: {e}\n{}", c.logs()));
    assert_eq!(one["id"], 201);

    tracing_line("--- the killed node restarts with the same flags and catches up");
    c.node(leader).start();
    let expected: Vec<u64> = (1..=201).collect();
    wait_for_tasks(&c.addr(leader), &expected, Duration::from_secs(20));
    c.wait_for_leader(&peers, 3, Duration::from_secs(20));

    tracing_line("--- kill -9 all three at once, restart: every acknowledged task is there");
    for id in 1..=3 {
        c.node(id).kill9();
    }
    for id in 1..=3 {
        c.node(id).start();
    }
    let after = c.wait_for_leader(&peers, 3, Duration::from_secs(30));
    assert_eq!(
        after["cluster_id"].as_str().unwrap(),
        cluster_id,
        "no re-bootstrap: same cluster"
    );
    assert!(after["term"].as_u64().unwrap() > status["term"].as_u64().unwrap());
    let list = fleet_json(&["task", "list", "--limit", "10000", "--peers", &peers]).unwrap();
    let got: Vec<u64> = list["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_u64().unwrap())
        .collect();
    assert_eq!(
        got, expected,
        "every acknowledged task survives a whole-cluster crash"
    );
    let t = fleet_json(&["task", "show", "201", "--peers", &peers]).unwrap();
    assert_eq!(
        t["value"]["spec"]["command"],
        serde_json::json!(["echo", "after-failover"])
    );
    for id in 1..=3 {
        assert!(
            !c.node(id).log_text().contains("initializing the cluster"),
            "node {id} re-initialized after restart"
        );
    }
}

fn tracing_line(phase: &str) {
    eprintln!("{phase}");
}
