//! `fleet up`, as the README's first command: a local fleet that runs its demo batch, runs a
//! task submitted from "another terminal", stops cleanly on Ctrl-C (SIGINT), and reuses its
//! data when run again; the README's quick start replayed line by line as written; `kill -9`
//! of a replica (the fleet keeps running, `up` restarts it, it catches up); SIGHUP stops
//! everything; a second `up` on the same data and a replica's start error are told at once;
//! `fleet down`.

mod common;

use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::*;

fn run_up(dir: &std::path::Path, port: u16) -> (std::process::Child, mpsc::Receiver<String>) {
    run_up_with(dir, port, &[])
}

fn run_up_with(
    dir: &std::path::Path,
    port: u16,
    extra: &[&str],
) -> (std::process::Child, mpsc::Receiver<String>) {
    let mut child = Command::new(fleet_bin())
        .args(["up", "--base-port", &port.to_string(), "--data-dir"])
        .arg(dir)
        .args(extra)
        .env_remove("FLEET_PEERS")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start fleet up");
    let rx = stdout_lines(&mut child);
    (child, rx)
}

/// Waits for a line of `fleet up`'s output; on failure shows the output and the end of every
/// replica's and worker's log in `dir`.
fn wait_for_line(
    dir: &std::path::Path,
    rx: &mpsc::Receiver<String>,
    needle: &str,
    seen: &mut Vec<String>,
) {
    wait_until(
        &format!("fleet up to print {needle:?}"),
        Duration::from_secs(90),
        || {
            while let Ok(l) = rx.try_recv() {
                seen.push(l);
            }
            if seen.iter().any(|l| l.contains(needle)) {
                Ok(())
            } else {
                let logs: String = ["node-1", "node-2", "node-3", "worker-1", "worker-2"]
                    .iter()
                    .map(|n| {
                        let text = std::fs::read_to_string(dir.join(format!("{n}.log")))
                            .unwrap_or_default();
                        format!("\n===== {n}.log =====\n{}", tail(&text, 15))
                    })
                    .collect();
                Err(format!("{}{logs}", seen.join("\n")))
            }
        },
    );
}

/// `fleet up` on free ports (HTTP 100 above), waited for until its demo batch finished: the
/// base port, the peer list, the process, its output and the lines seen so far.
fn up_with_demo_done(
    dir: &std::path::Path,
) -> (
    u16,
    String,
    std::process::Child,
    mpsc::Receiver<String>,
    Vec<String>,
) {
    let port = free_consecutive_ports_and(3, &[100]);
    let peers = (0..3)
        .map(|i| format!("127.0.0.1:{}", port + i))
        .collect::<Vec<_>>()
        .join(",");
    let (up, rx) = run_up(dir, port);
    let mut seen = Vec::new();
    wait_for_line(dir, &rx, "demo: all 20 tasks finished", &mut seen);
    (port, peers, up, rx, seen)
}

#[test]
fn fleet_up_runs_the_demo_and_a_submitted_task_then_restarts_on_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let (port, peers, mut up, _rx, seen) = up_with_demo_done(dir.path());
    let id = fleet_json(&[
        "submit",
        "--peers",
        &peers,
        "--",
        "sh",
        "-c",
        "echo from-a-second-terminal",
    ])
    .unwrap()["id"]
        .as_u64()
        .unwrap();
    wait_for_state(&peers, id, "succeeded", Duration::from_secs(30));
    let logs = fleet(&["logs", &id.to_string(), "--peers", &peers]);
    assert!(String::from_utf8_lossy(&logs.stdout).contains("from-a-second-terminal"));
    // SAFETY: signalling our own child, as Ctrl-C would.
    unsafe { libc::kill(up.id() as i32, libc::SIGINT) };
    let status = wait_exit(&mut up, &seen);
    assert!(status.success(), "{status:?}\n{}", seen.join("\n"));
    for f in ["worker-1.log", "worker-2.log"] {
        let log = std::fs::read_to_string(dir.path().join(f)).unwrap();
        assert!(log.contains("worker stopped"), "{f}: {}", tail(&log, 20));
    }

    // Again, on the same data: the earlier tasks are still there, and the new demo batch runs.
    // With a config file this time, which the workers read too: they serve its queues.
    let config = dir.path().join("fleet.toml");
    std::fs::write(&config, "[worker]\nqueues = [\"default\", \"second\"]\n").unwrap();
    let (mut up, rx) = run_up_with(dir.path(), port, &["--config", config.to_str().unwrap()]);
    let mut seen = Vec::new();
    wait_for_line(dir.path(), &rx, "demo: all 20 tasks finished", &mut seen);
    assert_eq!(show_task(&peers, id).unwrap()["state"], "succeeded");
    let second = submit_task(&peers, &["--queue", "second"], &["true".to_string()]);
    wait_for_state(&peers, second, "succeeded", Duration::from_secs(30));
    assert!(
        seen.iter().any(|l| l.contains(&format!("({} to", id + 1))),
        "{}",
        seen.join("\n")
    );
    unsafe { libc::kill(up.id() as i32, libc::SIGINT) };
    let status = wait_exit(&mut up, &seen);
    assert!(status.success());
}

/// The pid `fleet up` printed for `name` ("replica 2  pid 1234  ...").
fn pid_of(seen: &[String], name: &str) -> i32 {
    let prefix = format!("{name}  pid ");
    seen.iter()
        .rev()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid for {name} in:\n{}", seen.join("\n")))
}

fn wait_exit(up: &mut std::process::Child, seen: &[String]) -> std::process::ExitStatus {
    wait_until("fleet up to stop", Duration::from_secs(60), || {
        match up.try_wait() {
            Ok(Some(s)) => Ok(s),
            _ => Err(seen.join("\n")),
        }
    })
}

/// The README's "In another terminal" block, with this test's ports and binary.
fn readme_quick_start(peers: &str) -> String {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let after = readme
        .split_once("In another terminal:")
        .expect("the quick start's second terminal")
        .1;
    let block = after
        .split_once("```sh\n")
        .and_then(|(_, b)| b.split_once("```"))
        .expect("a sh block")
        .0;
    assert!(block.contains("target/release/fleet") && block.contains("127.0.0.1:7101"));
    block
        .replace("127.0.0.1:7101,127.0.0.1:7102,127.0.0.1:7103", peers)
        .replace("target/release/fleet", fleet_bin())
}

#[test]
fn the_readme_quick_start_and_kill_any_one_replica_as_written() {
    let dir = tempfile::tempdir().unwrap();
    let (port, peers, mut up, rx, mut seen) = up_with_demo_done(dir.path());

    eprintln!("--- the quick start's second terminal, line by line as the README has it");
    let script = format!(
        "set -euo pipefail\nshopt -s expand_aliases\n{}",
        readme_quick_start(&peers)
    );
    let out = std::process::Command::new("bash")
        .args(["-c", &script])
        .env_remove("FLEET_PEERS")
        .output()
        .expect("bash");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{script}\n{stdout}\n{stderr}");
    for expect in [
        "21\n",                  // submit prints the task id
        "hello from worker-",    // logs 21 --follow
        "state:      succeeded", // task show 21
        "#1 worker worker-",     // ... naming its worker as worker list and FLEET_WORKER do
        "SUCCEEDED",             // queue stats has the column
        "leader:   node",        // cluster status
        "schedule tick created", // schedule create
        "next fires:",           // schedule show
        "pool db has 2 slots",   // pool set
    ] {
        assert!(
            stdout.contains(expect),
            "{expect:?} missing from:\n{stdout}"
        );
    }
    assert!(!stderr.contains("panicked"), "{stderr}");

    eprintln!("--- the README's metrics example reaches fleet up's replica 1");
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let readme_port: u16 = readme
        .split("curl -s 127.0.0.1:")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .and_then(|p| p.parse().ok())
        .expect("a curl example in the README");
    // fleet up's HTTP ports are 100 above its RPC ports, which start at 7101 by default.
    assert_eq!(
        readme_port,
        7101 + 100,
        "the README's port is fleet up's replica 1"
    );
    let (code, body) = http_get_text(&format!("127.0.0.1:{}", port + 100), "/metrics").unwrap();
    assert_eq!(code, 200);
    assert!(body.contains("fleet_"), "{body}");

    eprintln!("--- kill -9 one replica: the fleet keeps running tasks");
    let pid = pid_of(&seen, "replica 2");
    // SAFETY: the replica is a process of this test's fleet.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let id = fleet_json(&["submit", "--peers", &peers, "--", "echo", "after-the-kill"]).unwrap()
        ["id"]
        .as_u64()
        .unwrap();
    wait_for_state(&peers, id, "succeeded", Duration::from_secs(30));
    wait_for_line(
        dir.path(),
        &rx,
        "replica 2 exited (signal: 9 (SIGKILL)); the fleet runs on 2 of 3 replicas",
        &mut seen,
    );
    assert!(up.try_wait().unwrap().is_none(), "fleet up keeps running");

    eprintln!("--- fleet up restarts it, and it catches up");
    wait_for_line(dir.path(), &rx, "replica 2 restarted (pid", &mut seen);
    let new_pid = pid_of_restart(&seen, "replica 2");
    assert_ne!(new_pid, pid);
    wait_until("replica 2 to catch up", Duration::from_secs(30), || {
        let s = cluster_status(&peers)?;
        let last = s["last_log_index"].as_u64();
        let node2 = s["members"]
            .as_array()
            .and_then(|m| m.iter().find(|m| m["id"] == 2))
            .and_then(|m| m["match_index"].as_u64());
        if last.is_some() && node2 == last {
            Ok(())
        } else {
            Err(s.to_string())
        }
    });
    assert_eq!(
        fleet_json(&[
            "task",
            "show",
            &id.to_string(),
            "--stale",
            "--peers",
            &format!("127.0.0.1:{}", port + 1)
        ])
        .unwrap()["value"]["state"],
        "succeeded"
    );

    eprintln!("--- SIGHUP (the terminal closed) stops fleet up and everything it started");
    let children: Vec<i32> = ["replica 1", "replica 3", "worker-1", "worker-2"]
        .iter()
        .map(|n| pid_of(&seen, n))
        .chain([new_pid])
        .collect();
    // SAFETY: signalling our own child, as a closing terminal would.
    unsafe { libc::kill(up.id() as i32, libc::SIGHUP) };
    let status = wait_exit(&mut up, &seen);
    assert!(status.success(), "{status:?}");
    for pid in children {
        wait_dead(pid, "every child to be gone", Duration::from_secs(5));
    }
}

/// The pid of `name`'s latest restart ("replica 2 restarted (pid 1234); ...").
fn pid_of_restart(seen: &[String], name: &str) -> i32 {
    let prefix = format!("{name} restarted (pid ");
    seen.iter()
        .rev()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|rest| rest.split(')').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no restart of {name} in:\n{}", seen.join("\n")))
}

#[test]
fn a_second_up_names_the_first_a_start_error_is_printed_and_down_stops_it() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_consecutive_ports_and(3, &[100]);
    let (mut up, rx) = run_up_with(dir.path(), port, &["--demo-tasks", "0", "--workers", "1"]);
    let mut seen = Vec::new();
    wait_for_line(dir.path(), &rx, "Ctrl-C (or `fleet down", &mut seen);

    eprintln!("--- a second fleet up on the same data says at once who runs it");
    let started = std::time::Instant::now();
    let other_port = free_consecutive_ports_and(3, &[100]);
    let second = fleet(&[
        "up",
        "--base-port",
        &other_port.to_string(),
        "--data-dir",
        dir.path().to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success());
    assert!(
        err.contains("fleet up is already running on")
            && err.contains(&format!("(pid {})", up.id())),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(5), "at once");

    eprintln!("--- fleet down stops it: workers drain, replicas stop, nothing is left");
    let children: Vec<i32> = ["replica 1", "replica 2", "replica 3", "worker-1"]
        .iter()
        .map(|n| pid_of(&seen, n))
        .collect();
    let down = fleet(&["down", "--data-dir", dir.path().to_str().unwrap()]);
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    assert!(String::from_utf8_lossy(&down.stdout).contains("stopped"));
    let status = wait_exit(&mut up, &seen);
    assert!(status.success(), "{status:?}");
    for pid in children {
        assert!(!alive(pid), "pid {pid} outlived fleet down");
    }

    eprintln!(
        "--- a replica that cannot start (its data directory in use) is told, not only logged"
    );
    let squatter_port = free_ports(1)[0];
    let mut squatter = Proc::new(
        "squatter",
        Some(
            std::process::Command::new(fleet_bin())
                .args([
                    "join",
                    "--node-id",
                    "2",
                    "--listen",
                    &format!("127.0.0.1:{squatter_port}"),
                    "--http-listen",
                    "",
                    "--data-dir",
                ])
                .arg(dir.path().join("node-2"))
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        ),
    );
    wait_until(
        "the squatter to hold node-2",
        Duration::from_secs(20),
        || match std::fs::read_to_string(dir.path().join("node-2/fleet.pid")) {
            Ok(p) if p.trim() == squatter.pid().to_string() => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    let again = fleet(&[
        "up",
        "--base-port",
        &port.to_string(),
        "--data-dir",
        dir.path().to_str().unwrap(),
    ]);
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&again.stdout),
        String::from_utf8_lossy(&again.stderr)
    );
    assert!(!again.status.success(), "{out}");
    assert!(
        out.contains("replica 2 exited at start")
            && out.contains(&format!("is in use by pid {}", squatter.pid())),
        "{out}"
    );
    squatter.kill9();
}
