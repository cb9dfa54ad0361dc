//! The health module end to end: real replicas and workers on loopback, a steady stream of
//! tasks, and a leader that hangs, by fault injection (its scheduling loop or its fsyncs stall
//! while the process lives) or by SIGSTOP (the whole process freezes).

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;

const FAULTS_ON: &str = "[fault_injection]\nenabled = true\n";
/// The stated bound for a stalled leader to be replaced, with the defaults: stall threshold
/// (3 s) + check interval (0.25 s) + two maximum election timeouts (2 s). See
/// docs/operations.md.
const STALL_FAILOVER_BOUND: Duration = Duration::from_millis(5250);
/// What the test's own polling (a CLI process per look) may add to a measured time.
const POLL_SLACK: Duration = Duration::from_secs(1);

/// Submits a marker task every 100 ms until stopped; the ids acknowledged.
struct Stream {
    stop: Arc<AtomicBool>,
    ids: Arc<Mutex<Vec<u64>>>,
    thread: Option<JoinHandle<()>>,
}

impl Stream {
    fn start(peers: &str, marks: &Path) -> Stream {
        let stop = Arc::new(AtomicBool::new(false));
        let ids = Arc::new(Mutex::new(Vec::new()));
        let (s, i, peers) = (stop.clone(), ids.clone(), peers.to_string());
        let cmd = marker_command(marks, "true");
        let thread = std::thread::spawn(move || {
            let mut next = Instant::now();
            while !s.load(Ordering::Acquire) {
                let id = submit_task(&peers, &[], &cmd);
                i.lock().unwrap().push(id);
                // Pacing of the workload (one task per 100 ms), not synchronization.
                next += Duration::from_millis(100);
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
        });
        Stream {
            stop,
            ids,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Vec<u64> {
        self.stop.store(true, Ordering::Release);
        self.thread.take().unwrap().join().expect("submitter");
        self.ids.lock().unwrap().clone()
    }
}

/// Every acknowledged task succeeded, exactly once, with one attempt.
fn assert_all_ran_once(peers: &str, ids: &[u64], marks: &Path) {
    wait_until(
        "every submitted task to succeed",
        Duration::from_secs(60),
        || {
            let done = task_ids_in(peers, "succeeded")?;
            let missing: Vec<_> = ids.iter().filter(|i| !done.contains(i)).collect();
            if missing.is_empty() {
                Ok(())
            } else {
                Err(format!("{} not succeeded yet: {missing:?}", missing.len()))
            }
        },
    );
    let mut runs: BTreeMap<u64, usize> = BTreeMap::new();
    for m in read_marks(marks) {
        *runs.entry(m.task).or_default() += 1;
    }
    for id in ids {
        assert_eq!(
            runs.get(id),
            Some(&1),
            "task {id} ran {:?} times",
            runs.get(id)
        );
        let t = show_task(peers, *id).unwrap();
        assert_eq!(t["attempts"].as_array().map(Vec::len), Some(1), "{t}");
    }
}

/// Waits until the replicas at `others` name a leader other than `old`.
fn wait_for_another_leader(others: &str, old: u64) -> u64 {
    wait_until(
        "another leader",
        Duration::from_secs(20),
        || match leader_of(others) {
            Ok(l) if l != old => Ok(l),
            other => Err(format!("{other:?}")),
        },
    )
}

/// Waits until `more` tasks ran (marker lines) beyond what had run when called.
fn wait_for_more_runs(marks: &Path, more: usize, what: &str, timeout: Duration) {
    let before = read_marks(marks).len();
    wait_until(what, timeout, || {
        let n = read_marks(marks).len();
        (n >= before + more)
            .then_some(())
            .ok_or(format!("{n} ran, {before} before"))
    });
}

/// Exit code of `fleet health --cluster --peers PEERS`.
fn cluster_check(peers: &str) -> i32 {
    let out = fleet(&["health", "--cluster", "--peers", peers]);
    eprintln!(
        "fleet health --cluster --peers {peers}: {:?}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out.status.code().unwrap_or(-1)
}

#[test]
fn a_stalled_leader_loop_is_detected_replaced_and_rejoins_as_a_follower() {
    let (c, config, peers) = start_fleet_with(3, 2000, FAULTS_ON);
    let dir = c.dir.path();
    let marks = dir.join("marks");
    let _w1 = TestWorker::start(dir, "w1", &peers, &config, &[]);
    let _w2 = TestWorker::start(dir, "w2", &peers, &config, &[]);
    let stream = Stream::start(&peers, &marks);
    wait_for_more_runs(&marks, 10, "the stream to flow", Duration::from_secs(30));
    assert_eq!(cluster_check(&peers), 0, "healthy before the fault");

    let old = leader_of(&peers).unwrap();
    let old_addr = c.addr(old);
    let others = c.peers_except(old);
    let stall = Duration::from_secs(12);
    let t0 = Instant::now();
    inject_stall(&old_addr, "scheduler", "12s");

    // Another replica leads within the stated bound.
    let new = wait_for_another_leader(&others, old);
    let failover = t0.elapsed();
    eprintln!("stalled leader {old} replaced by {new} after {failover:?}");
    assert!(
        failover <= STALL_FAILOVER_BOUND + POLL_SLACK,
        "failover took {failover:?}"
    );

    // Tasks keep completing while the old leader is still stalled.
    wait_for_more_runs(
        &marks,
        10,
        "tasks to keep completing",
        Duration::from_secs(10),
    );

    // The stalled replica says so, over HTTP and through `fleet health`.
    let (code, report) = health_of(&old_addr);
    assert_eq!(code, 1, "{report}");
    let http = report["http_addr"].as_str().unwrap().to_string();
    let (status, body) = http_get(&http, "/health").unwrap();
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["status"], "unhealthy");
    assert_eq!(body["scheduler"]["state"], "stalled", "{body}");
    let reason = body["reasons"][0].as_str().unwrap();
    assert!(
        reason.contains("scheduling loop has made no progress"),
        "{reason}"
    );
    assert!(
        body["scheduler"]["mitigation"]
            .as_str()
            .unwrap()
            .contains(&format!("handed leadership to node {new}")),
        "{body}"
    );
    assert_eq!(body["raft"]["role"], "follower", "{body}");
    assert_eq!(body["raft"]["elections_enabled"], false, "{body}");
    // The cluster check fails while the stall lasts, asked of any replica. Its view settles
    // within a peer poll interval: the new leader schedules, the old one is stalled.
    assert_eq!(cluster_check(&others), 1);
    assert_eq!(cluster_check(&old_addr), 1);
    let body = wait_until("the cluster view to settle", Duration::from_secs(5), || {
        let (status, body) = http_get(&http, "/health/cluster")?;
        let c = &body["cluster"];
        if status == 503 && c["status"] == "degraded" && c["leader_id"] == new {
            Ok(body)
        } else {
            Err(format!("{status} {c}"))
        }
    });
    let reasons = body["cluster"]["reasons"].to_string();
    assert!(
        reasons.contains(&format!("node {old} is unhealthy")),
        "{reasons}"
    );
    assert!(
        t0.elapsed() < stall,
        "the checks ran while the stall lasted"
    );

    // After the stall: a healthy follower, elections on again, the cluster healthy.
    let report = wait_until(
        "the old leader to be healthy",
        Duration::from_secs(30),
        || {
            let (code, r) = health_of(&old_addr);
            if code == 0 {
                Ok(r)
            } else {
                Err(r.to_string())
            }
        },
    );
    assert_eq!(report["raft"]["role"], "follower", "{report}");
    assert_eq!(report["raft"]["leader_id"], new, "{report}");
    assert_eq!(report["raft"]["elections_enabled"], true, "{report}");
    wait_until(
        "the cluster to be healthy",
        Duration::from_secs(30),
        || match cluster_check(&peers) {
            0 => Ok(()),
            c => Err(format!("exit {c}")),
        },
    );

    let ids = stream.finish();
    assert!(ids.len() >= 100, "only {} submitted", ids.len());
    assert_all_ran_once(&peers, &ids, &marks);
    let log = c.nodes.iter().find(|n| n.id == old).unwrap().log_text();
    assert!(
        log.contains("made no progress past the stall threshold"),
        "{log}"
    );
    assert!(log.contains("leadership handed over"), "{log}");
}

#[test]
fn a_frozen_leader_is_replaced_and_steps_down_on_waking() {
    let (mut c, config, peers) = start_fleet(3, 2000);
    let dir = c.dir.path().to_path_buf();
    let marks = dir.join("marks");
    let _w1 = TestWorker::start(&dir, "w1", &peers, &config, &[]);
    let _w2 = TestWorker::start(&dir, "w2", &peers, &config, &[]);
    let stream = Stream::start(&peers, &marks);
    wait_for_more_runs(&marks, 10, "the stream to flow", Duration::from_secs(30));
    let old = leader_of(&peers).unwrap();
    let old_addr = c.addr(old);
    let (_, before) = health_of(&old_addr);
    let old_term = before["raft"]["term"].as_u64().unwrap();
    let others = c.peers_except(old);

    let t0 = Instant::now();
    c.node(old).signal(libc::SIGSTOP);
    let new = wait_for_another_leader(&others, old);
    eprintln!(
        "frozen leader {old} replaced by {new} after {:?}",
        t0.elapsed()
    );
    // Ordinary Raft election: within two election timeouts (1 s max each) and the polling.
    assert!(t0.elapsed() <= Duration::from_secs(2) + POLL_SLACK * 2);
    // Work goes on without it, and the cluster check reports the frozen member.
    wait_for_more_runs(
        &marks,
        10,
        "tasks to keep completing",
        Duration::from_secs(15),
    );
    // A member is unreachable once it has not answered for three peer polls: with a failover
    // of about half a second that is later than the runs above.
    wait_until(
        "the cluster check to report the frozen member",
        Duration::from_secs(15),
        || {
            let out = fleet(&[
                "health",
                "--cluster",
                "--peers",
                &others,
                "--output",
                "json",
            ]);
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            if out.status.code() == Some(1) && v["status"] == "degraded" {
                Ok(())
            } else {
                Err(format!("{out:?}"))
            }
        },
    );
    let (code, _) = health_of(&old_addr);
    assert_eq!(code, 2, "a frozen replica is unreachable");

    // On waking it steps down: a follower of the new leader, in the new term.
    c.node(old).signal(libc::SIGCONT);
    let report = wait_until("the old leader to follow", Duration::from_secs(30), || {
        let (code, r) = health_of(&old_addr);
        if code == 0 && r["raft"]["role"] == "follower" {
            Ok(r)
        } else {
            Err(r.to_string())
        }
    });
    assert!(
        report["raft"]["term"].as_u64().unwrap() > old_term,
        "{report}"
    );
    assert_eq!(report["raft"]["leader_id"], new, "{report}");

    let ids = stream.finish();
    assert_all_ran_once(&peers, &ids, &marks);
}

#[test]
fn a_storage_stall_is_reported_as_such() {
    let (c, _config, peers) = start_fleet_with(3, 2000, FAULTS_ON);
    let leader = leader_of(&peers).unwrap();
    let follower = c.nodes.iter().find(|n| n.id != leader).unwrap();
    inject_stall(&follower.addr, "storage", "20s");
    // A write makes the follower fsync; the other two still form a quorum.
    let marks = c.dir.path().join("marks");
    let id = submit_task(&peers, &[], &marker_command(&marks, "true"));
    let report = wait_until("the storage stall to show", Duration::from_secs(20), || {
        let (code, r) = health_of(&follower.addr);
        if code == 1 && r["storage"]["healthy"] == false {
            Ok(r)
        } else {
            Err(r.to_string())
        }
    });
    let reason = report["storage"]["reason"].as_str().unwrap();
    assert!(reason.contains("fsync has not completed"), "{report}");
    assert!(report["storage"]["fsync_in_flight_ms"].as_u64().unwrap() > 3000);
    assert!(
        report["reasons"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r.as_str().unwrap().contains("fsync")),
        "{report}"
    );
    assert!(report["fault_injection"]["storage_stall_left_ms"].is_u64());
    let http = report["http_addr"].as_str().unwrap();
    let (status, body) = http_get(http, "/health").unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(show_task(&peers, id).is_ok(), "the cluster still serves");

    // Cleared: the fsync completes and the replica is healthy again.
    let out = fleet(&["fault", "clear", "--peers", &follower.addr]);
    assert!(out.status.success(), "{out:?}");
    wait_until("the follower to recover", Duration::from_secs(20), || {
        let (code, r) = health_of(&follower.addr);
        (code == 0).then_some(()).ok_or(r.to_string())
    });
}

#[test]
fn fault_injection_is_refused_unless_enabled_and_checks_its_arguments() {
    let (c, _config, peers) = start_fleet(1, 2000);
    let addr = &c.nodes[0].addr;
    assert_fails_naming(
        &[
            "fault",
            "stall",
            "--component",
            "scheduler",
            "--for",
            "5s",
            "--peers",
            addr,
        ],
        "[fault_injection] enabled = true",
    );
    assert_fails_naming(
        &[
            "fault",
            "stall",
            "--component",
            "disk",
            "--for",
            "5s",
            "--peers",
            addr,
        ],
        "disk",
    );
    assert_fails_naming(
        &[
            "fault",
            "stall",
            "--component",
            "storage",
            "--for",
            "2h",
            "--peers",
            addr,
        ],
        "use 1ms to 1h",
    );
    assert_fails_naming(
        &[
            "fault",
            "clear",
            "--peers",
            &peers.replace(addr, &format!("{addr},{addr}")),
        ],
        "exactly one address",
    );
    // The replica was not stalled, and a healthy one-replica cluster says so.
    let (code, report) = health_of(addr);
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["fault_injection"]["enabled"], false);
    assert_eq!(report["scheduler"]["state"], "leading");
    assert_eq!(cluster_check(addr), 0);
    // An address where nothing listens is unreachable: exit 2.
    let nobody = format!("127.0.0.1:{}", free_ports(1)[0]);
    let out = fleet(&["health", "--peers", &nobody]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let out = fleet(&["health", "--cluster", "--peers", &nobody]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}
