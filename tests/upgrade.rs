//! A rolling upgrade from the previous release to this build, then a rollback, under a task
//! stream, as docs/operations.md ("Versions and upgrades") prescribes: one node at a time,
//! followers first, then the workers (each drained with SIGTERM), the leader last (SIGTERM
//! makes it hand leadership over before it exits); each replica caught up before the next.
//!
//! The previous release (tests/previous_release/COMMIT) is built once per machine by
//! tests/previous_release/build.sh into a cache outside the checkout; `.ci/run` builds it
//! before the tests, so CI's timing does not include it. `FLEET_PREVIOUS_BIN` names another
//! binary instead.
//!
//! Checked at the end: every submission got a task id (a failed `fleet submit` is retried with
//! the same idempotency key, and every key got one task), every task succeeded, each ran
//! exactly once (one execution mark per task, its first attempt: a lease that expired would
//! have made a second attempt), and nothing waited for a visibility timeout.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

/// The previous release's `fleet` binary, built (once per machine) if needed.
fn previous_release() -> PathBuf {
    if let Some(p) = std::env::var_os("FLEET_PREVIOUS_BIN") {
        return PathBuf::from(p);
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/previous_release/build.sh");
    let out = Command::new(&script)
        .stderr(Stdio::inherit())
        .output()
        .expect("run tests/previous_release/build.sh");
    assert!(
        out.status.success(),
        "building the previous release failed (its output is above)"
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

fn version(bin: &Path) -> String {
    let out = Command::new(bin).arg("--version").output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// One submission: its idempotency key, the task id it got, and the failed tries before.
struct Submitted {
    key: String,
    id: u64,
    failed_tries: Vec<String>,
}

/// A thread submitting tasks one after another until stopped.
struct TaskStream {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<Vec<Submitted>>,
    marks: PathBuf,
}

impl TaskStream {
    fn start(peers: String, marks: PathBuf) -> TaskStream {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let command = marker_command(&marks, "sleep 0.2");
        let handle = std::thread::spawn(move || {
            let mut done = Vec::new();
            while !flag.load(Ordering::Acquire) {
                done.push(submit_until_accepted(&peers, done.len(), &command));
                // Paces the stream (about 20 submissions a second); not synchronization.
                std::thread::sleep(Duration::from_millis(20));
            }
            done
        });
        TaskStream {
            stop,
            handle,
            marks,
        }
    }

    /// Waits until `n` more tasks have run than when called: the fleet is serving.
    fn wait_progress(&self, n: usize, what: &str) {
        let from = read_marks(&self.marks).len();
        wait_until(
            &format!("{n} more tasks to run after {what}"),
            Duration::from_secs(60),
            || {
                let now = read_marks(&self.marks).len();
                if now >= from + n {
                    Ok(())
                } else {
                    Err(format!("{} ran since", now - from))
                }
            },
        );
    }

    fn stop(self) -> Vec<Submitted> {
        self.stop.store(true, Ordering::Release);
        self.handle.join().expect("the submitting thread")
    }
}

/// Submits task number `i` until the cluster acknowledges it, with the same idempotency key
/// on every try (so a retry after an unclear failure cannot create a second task).
fn submit_until_accepted(peers: &str, i: usize, command: &[String]) -> Submitted {
    let key = format!("upgrade-{i}");
    let mut failed_tries = Vec::new();
    loop {
        let mut args = vec![
            "submit",
            "--peers",
            peers,
            "--idempotency-key",
            &key,
            "--retry-for",
            "30s",
            "--",
        ];
        args.extend(command.iter().map(String::as_str));
        match fleet_json(&args) {
            Ok(v) => {
                return Submitted {
                    key,
                    id: v["id"].as_u64().expect("a task id"),
                    failed_tries,
                }
            }
            Err(e) => {
                assert!(
                    failed_tries.len() < 5,
                    "{key}: failed 5 times: {failed_tries:?}"
                );
                failed_tries.push(e);
            }
        }
    }
}

/// The highest match index the leader reports, and `id`'s.
fn match_indexes(peers: &str, id: u64) -> Result<(u64, u64), String> {
    let s = cluster_status(peers)?;
    if s["leader_view"] != true {
        return Err(format!("no leader view: {s}"));
    }
    let members = s["members"].as_array().ok_or("no members")?;
    let highest = members
        .iter()
        .filter_map(|m| m["match_index"].as_u64())
        .max()
        .ok_or("no match index")?;
    let node = members
        .iter()
        .find(|m| m["id"] == id)
        .and_then(|m| m["match_index"].as_u64())
        .ok_or(format!("node {id} has no match index: {s}"))?;
    Ok((highest, node))
}

/// Stops node `id` with SIGTERM (a leader hands leadership over first), restarts it on `bin`
/// with the same data directory, and waits until it has caught up with the leader.
fn replace_node(c: &mut TestCluster, id: u64, bin: &Path) {
    let node = c.node(id);
    node.signal(libc::SIGTERM);
    assert_eq!(
        node.wait_exit(Duration::from_secs(60)),
        Some(0),
        "node {id} stops cleanly:\n{}",
        tail(&node.log_text(), 30)
    );
    node.bin = bin.to_path_buf();
    node.start();
    let peers = c.peers();
    let (target, _) = wait_until("a leader's view", Duration::from_secs(60), || {
        match_indexes(&peers, id)
    });
    wait_until(
        &format!("node {id} to catch up to index {target}"),
        Duration::from_secs(60),
        || match match_indexes(&peers, id)? {
            (_, m) if m >= target => Ok(()),
            (_, m) => Err(format!("at {m}")),
        },
    );
    wait_for_voters(&peers, 3, Duration::from_secs(30));
}

/// Moves every replica and worker to `bin`, one at a time: followers, workers, leader.
fn roll(
    c: &mut TestCluster,
    workers: &mut [TestWorker],
    bin: &Path,
    label: &str,
    config: &Path,
    stream: &TaskStream,
) {
    let peers = c.peers();
    let dir = c.dir.path().to_path_buf();
    let leader = wait_until("a leader", Duration::from_secs(30), || leader_of(&peers));
    let followers: Vec<u64> = c
        .nodes
        .iter()
        .map(|n| n.id)
        .filter(|&id| id != leader)
        .collect();
    for &id in &followers {
        replace_node(c, id, bin);
        eprintln!("{label}: follower {id} replaced");
        stream.wait_progress(5, &format!("follower {id} moved to {label}"));
    }
    if label == "upgrade" {
        // The leader still runs the previous release: a call it lacks (`task requeue`,
        // protocol 9) is refused by the upgraded follower, naming the leader's version, and
        // not sent to it.
        let follower = c.node(followers[0]).addr.clone();
        let err = fleet_json(&["task", "requeue", "1", "--token", "1", "--peers", &follower])
            .unwrap_err();
        assert!(
            err.contains(&format!("the leader (node {leader} at"))
                && err.contains("speaks protocol 6, which lacks this call (protocol 9 added it)"),
            "{err}"
        );
    }
    for (i, w) in workers.iter_mut().enumerate() {
        w.signal(libc::SIGTERM);
        assert_eq!(
            w.wait_exit(Duration::from_secs(60)),
            Some(0),
            "worker drains"
        );
        let name = format!("w{}-{label}", i + 1);
        *w = TestWorker::start_bin(bin, &dir, &name, &peers, config, &[]);
        eprintln!("{label}: worker {name} started");
        stream.wait_progress(5, &format!("worker {name} started"));
    }
    replace_node(c, leader, bin);
    let now = wait_until("a leader", Duration::from_secs(30), || leader_of(&peers));
    eprintln!("{label}: leader {leader} replaced; node {now} leads");
    assert_ne!(now, leader, "the stopped leader handed leadership over");
    stream.wait_progress(5, &format!("the leader moved to {label}"));
}

/// A task that ran on a later attempt: each earlier attempt must have been handed back
/// unstarted by a draining worker of the previous release (whose drain drops a lease request
/// in flight; this build's waits for it), never lost to an expired lease. Returns the task.
fn check_handed_back_by_old_worker(peers: &str, id: u64) -> u64 {
    let t = show_task(peers, id).unwrap();
    let attempts = t["attempts"].as_array().unwrap();
    for a in &attempts[..attempts.len() - 1] {
        let text = a.to_string();
        assert!(
            text.contains("handed back by worker")
                && a["worker_name"].as_str().unwrap_or("").ends_with("-old"),
            "task {id}: an attempt ended otherwise than handed back by a previous-release worker \
             (a lease expired?): {a}"
        );
    }
    id
}

#[test]
fn a_cluster_is_upgraded_one_node_at_a_time_and_rolled_back_under_a_task_stream() {
    let old = previous_release();
    let new = PathBuf::from(fleet_bin());
    let (old_version, new_version) = (version(&old), version(&new));
    eprintln!("previous release: {old_version}; this build: {new_version}");
    assert_ne!(old_version, new_version, "two different builds");

    let mut c = TestCluster::new(3, &[]);
    let config = test_config_with_grace(c.dir.path(), 5000, "");
    for node in &mut c.nodes {
        node.args
            .extend(["--config".to_string(), config.display().to_string()]);
        node.bin = old.clone();
        node.start();
    }
    let peers = c.peers();
    c.wait_for_leader(&peers, 3, Duration::from_secs(60));
    let dir = c.dir.path().to_path_buf();
    let marks = dir.join("marks");
    let mut workers: Vec<TestWorker> = (1..=2)
        .map(|i| TestWorker::start_bin(&old, &dir, &format!("w{i}-old"), &peers, &config, &[]))
        .collect();
    let stream = TaskStream::start(peers.clone(), marks.clone());
    stream.wait_progress(20, "the start");

    let started = Instant::now();
    roll(&mut c, &mut workers, &new, "upgrade", &config, &stream);
    eprintln!("upgraded in {:?}", started.elapsed());
    let started = Instant::now();
    roll(&mut c, &mut workers, &old, "rollback", &config, &stream);
    eprintln!("rolled back in {:?}", started.elapsed());
    let submitted = stream.stop();

    // Every acknowledged task runs to success, exactly once, on its first attempt.
    let ids: Vec<u64> = submitted.iter().map(|s| s.id).collect();
    let mut distinct = ids.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), ids.len(), "one task per idempotency key");
    wait_until("every task to succeed", Duration::from_secs(120), || {
        let done = task_ids_in(&peers, "succeeded")?;
        let missing: Vec<&u64> = ids.iter().filter(|id| !done.contains(id)).collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{} not succeeded: {:?}",
                missing.len(),
                &missing[..missing.len().min(10)]
            ))
        }
    });
    let runs = read_marks(&marks);
    let mut handed_back = Vec::new();
    for id in &ids {
        let of: Vec<&Mark> = runs.iter().filter(|m| m.task == *id).collect();
        assert_eq!(of.len(), 1, "task {id} ran once: {of:?}");
        if of[0].attempt != 1 {
            handed_back.push(check_handed_back_by_old_worker(&peers, *id));
        }
    }
    let retried: Vec<(&str, &Vec<String>)> = submitted
        .iter()
        .filter(|s| !s.failed_tries.is_empty())
        .map(|s| (s.key.as_str(), &s.failed_tries))
        .collect();
    eprintln!(
        "{} tasks submitted and run once each; {} submissions needed a second try: {retried:?}; \
         {} leases handed back unstarted by draining previous-release workers: {handed_back:?}",
        ids.len(),
        retried.len(),
        handed_back.len()
    );
}
