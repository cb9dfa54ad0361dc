//! `fleet up`, as the README's first command: a local fleet that runs its demo batch, runs a
//! task submitted from "another terminal", stops cleanly on Ctrl-C (SIGINT), and reuses its
//! data when run again.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::*;

fn run_up(dir: &std::path::Path, port: u16) -> (std::process::Child, mpsc::Receiver<String>) {
    let mut child = Command::new(fleet_bin())
        .args(["up", "--base-port", &port.to_string(), "--data-dir"])
        .arg(dir)
        .env_remove("FLEET_PEERS")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start fleet up");
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).split(b'\n').map_while(Result::ok) {
            let _ = tx.send(String::from_utf8_lossy(&line).into_owned());
        }
    });
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

#[test]
fn fleet_up_runs_the_demo_and_a_submitted_task_then_restarts_on_its_data() {
    let dir = tempfile::tempdir().unwrap();
    // fleet up's replicas listen on PORT..PORT+2 and serve HTTP 100 above.
    let port = free_consecutive_ports_and(3, &[100]);
    let peers = (0..3)
        .map(|i| format!("127.0.0.1:{}", port + i))
        .collect::<Vec<_>>()
        .join(",");
    let (mut up, rx) = run_up(dir.path(), port);
    let mut seen = Vec::new();
    wait_for_line(dir.path(), &rx, "demo: all 20 tasks finished", &mut seen);
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
    let status = wait_until("fleet up to stop", Duration::from_secs(60), || {
        match up.try_wait() {
            Ok(Some(s)) => Ok(s),
            _ => Err("running".into()),
        }
    });
    assert!(status.success(), "{status:?}\n{}", seen.join("\n"));
    for f in ["worker-1.log", "worker-2.log"] {
        let log = std::fs::read_to_string(dir.path().join(f)).unwrap();
        assert!(log.contains("worker stopped"), "{f}: {}", tail(&log, 20));
    }

    // Again, on the same data: the earlier tasks are still there, and the new demo batch runs.
    let (mut up, rx) = run_up(dir.path(), port);
    let mut seen = Vec::new();
    wait_for_line(dir.path(), &rx, "demo: all 20 tasks finished", &mut seen);
    assert_eq!(show_task(&peers, id).unwrap()["state"], "succeeded");
    assert!(
        seen.iter().any(|l| l.contains(&format!("({} to", id + 1))),
        "{}",
        seen.join("\n")
    );
    unsafe { libc::kill(up.id() as i32, libc::SIGINT) };
    let status = wait_until("fleet up to stop", Duration::from_secs(60), || {
        match up.try_wait() {
            Ok(Some(s)) => Ok(s),
            _ => Err("running".into()),
        }
    });
    assert!(status.success());
}
