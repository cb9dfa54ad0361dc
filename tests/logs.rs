//! Live task output, as docs/tasks.md ("Output") promises it: `fleet logs ID --follow` shows
//! each line within a second of its being printed, keeps doing so when the leader (which both
//! the worker and the follower are connected to) is killed with SIGKILL, and the kept tail is
//! still there after the worker that ran the task is killed too. A task printing faster than
//! the stream's rate shows gaps live while its kept tail (1 MiB) is whole.

mod common;

use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// `peers` with `first` at the front: the worker and the follower connect there first.
fn peers_starting_with(c: &TestCluster, first: u64) -> String {
    let mut p = vec![c.addr(first)];
    p.extend(
        c.nodes
            .iter()
            .filter(|n| n.id != first)
            .map(|n| n.addr.clone()),
    );
    p.join(",")
}

/// `fleet logs ID --follow` as a child; every stdout line with the time it arrived.
fn follow(peers: &str, id: u64) -> (std::process::Child, mpsc::Receiver<(u64, String)>) {
    let mut child = Command::new(fleet_bin())
        .args(["logs", &id.to_string(), "--follow", "--peers", peers])
        .env_remove("FLEET_PEERS")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start fleet logs");
    let lines = stdout_lines(&mut child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in lines {
            if tx.send((now_ms(), line)).is_err() {
                return;
            }
        }
    });
    (child, rx)
}

#[test]
fn follow_shows_lines_within_a_second_across_a_leader_kill_and_the_tail_outlives_the_worker() {
    let (mut c, config, peers) = start_fleet(3, 2000);
    let dir = c.dir.path().to_path_buf();
    let leader = wait_until("a leader", Duration::from_secs(30), || leader_of(&peers));
    let via_leader = peers_starting_with(&c, leader);
    let mut w = TestWorker::start(&dir, "w1", &via_leader, &config, &[]);
    let lines = 60;
    let script =
        format!("for i in $(seq 1 {lines}); do echo \"line $i $(date +%s%3N)\"; sleep 0.1; done");
    let id = submit_task(&peers, &[], &["sh".into(), "-c".into(), script]);
    let (mut logs, rx) = follow(&via_leader, id);

    let mut got: Vec<(u64, u64, u64)> = Vec::new(); // (line, printed at, arrived at)
    let mut other = Vec::new();
    let mut killed_at = None;
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while let Ok((at, line)) = rx.recv_timeout(deadline - std::time::Instant::now()) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields[..] {
            ["line", n, printed] => {
                got.push((n.parse().unwrap(), printed.parse().unwrap(), at));
                if got.len() == 15 {
                    c.node(leader).kill9();
                    killed_at = Some(now_ms());
                    eprintln!("killed leader {leader} after line 15");
                }
            }
            _ => other.push(line),
        }
        if got.len() == lines as usize && other.iter().any(|l| l.starts_with("task ")) {
            break;
        }
    }
    let status = logs.wait().unwrap();
    assert!(
        status.success(),
        "fleet logs --follow: {status}; other lines: {other:?}"
    );
    assert!(killed_at.is_some(), "the leader was killed mid-task");
    let numbers: Vec<u64> = got.iter().map(|g| g.0).collect();
    assert_eq!(
        numbers,
        (1..=lines).collect::<Vec<_>>(),
        "every line once, in order; other lines: {other:?}"
    );
    let delays: Vec<i64> = got.iter().map(|g| g.2 as i64 - g.1 as i64).collect();
    let worst = delays.iter().max().unwrap();
    let after_kill: Vec<i64> = delays[15..20].to_vec();
    eprintln!("delays (ms): worst {worst}; the five lines after the kill: {after_kill:?}; all: {delays:?}");
    assert!(
        *worst < 1000,
        "a line arrived {worst} ms after it was printed: {delays:?}"
    );
    assert!(other[0].starts_with("=== attempt 1 "), "{other:?}");
    assert!(
        other.iter().any(|l| l == "=== attempt 1: succeeded"),
        "{other:?}"
    );
    assert_eq!(other.last().unwrap(), &format!("task {id} is succeeded"));

    // The worker's machine dies: the kept tail is in the replicated record.
    w.kill9();
    let survivors = c.peers_except(leader);
    let shown = fleet(&["logs", &id.to_string(), "--peers", &survivors]);
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.status.success(), "{text}");
    for n in [1, lines] {
        assert!(
            text.lines().any(|l| l.starts_with(&format!("line {n} "))),
            "line {n} in the kept tail:\n{text}"
        );
    }
}

#[test]
fn a_chatty_task_is_rate_limited_live_and_its_kept_tail_is_the_last_mib() {
    let (c, config, peers) = start_fleet(3, 2000);
    let dir = c.dir.path().to_path_buf();
    let _w = TestWorker::start(&dir, "w1", &peers, &config, &[]);
    // 4 MB in well under a second, 16 times the default stream rate (256 KiB/s); then a last
    // line after a pause.
    let script = "yes 0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz \
                  | head -c 4000000; sleep 1; echo the-end";
    let id = submit_task(&peers, &[], &["sh".into(), "-c".into(), script.into()]);
    let (mut logs, rx) = follow(&peers, id);
    let mut lines = Vec::new();
    while let Ok((_, line)) = rx.recv_timeout(Duration::from_secs(60)) {
        lines.push(line);
    }
    assert!(logs.wait().unwrap().success());
    let gaps: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("bytes of output not streamed]"))
        .collect();
    let streamed: usize = lines.iter().filter(|l| l.starts_with("0123")).count() * 75;
    eprintln!("live: {streamed} bytes of 4000000 shown, gaps: {gaps:?}");
    assert!(
        !gaps.is_empty(),
        "the live view skips what exceeds the rate"
    );
    assert!(streamed < 4_000_000, "{streamed}");
    assert!(
        lines.iter().any(|l| l.ends_with("the-end")),
        "the last line arrives"
    );
    let t = show_task(&peers, id).unwrap();
    assert_eq!(t["state"], "succeeded");
    let tail = t["attempts"][0]["output_tail"].as_str().unwrap();
    assert_eq!(tail.len(), 1 << 20, "the kept tail is the last MiB");
    assert!(tail.ends_with("the-end\n"));
}

#[test]
fn logs_shows_a_running_attempt_so_far_and_what_a_lost_worker_streamed() {
    let (c, config, peers) = start_fleet(3, 1000);
    let dir = c.dir.path().to_path_buf();
    let mut w = TestWorker::start(&dir, "w1", &peers, &config, &[]);
    let script = "i=0; while true; do i=$((i+1)); echo \"tick $i\"; sleep 0.1; done";
    let id = submit_task(
        &peers,
        &["--max-attempts", "1"],
        &["sh".into(), "-c".into(), script.into()],
    );
    let logs = || {
        String::from_utf8_lossy(&fleet(&["logs", &id.to_string(), "--peers", &peers]).stdout)
            .to_string()
    };
    // Without --follow: the running attempt's output so far.
    let so_far = wait_until(
        "the running attempt's output",
        Duration::from_secs(30),
        || {
            let text = logs();
            if text.lines().any(|l| l == "tick 5") {
                Ok(text)
            } else {
                Err(text)
            }
        },
    );
    assert!(so_far.contains("=== attempt 1 (worker w1"), "{so_far}");
    assert!(
        so_far.contains(&format!("task {id} is running")),
        "{so_far}"
    );

    // The worker dies without reporting: no kept tail, but what it streamed is shown, saying
    // it is not kept.
    w.kill9();
    wait_for_state(&peers, id, "dead", Duration::from_secs(60));
    let text = logs();
    assert!(
        text.contains("=== output streamed live before attempt 1 ended without a report"),
        "{text}"
    );
    assert!(text.lines().any(|l| l == "tick 5"), "{text}");
}
