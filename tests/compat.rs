//! Data written by an earlier fleet: a replica's data directory from before attempts carried
//! their worker's name (state format 1, `tests/fixtures/data-format-1.tar.gz`: a one-node
//! cluster that ran three tasks and a failing one on worker `golden-worker`) is opened by this
//! fleet with every task and attempt intact, and new attempts record the worker's name.

mod common;

use std::time::Duration;

use common::*;

/// Unpacks the format-1 data directory fixture (node 1's) into `dir`.
///
/// The fixture's tasks finished when it was written (2026-12-02), and a leader purges finished
/// tasks past `scheduler.retention_ms` (24 hours by default) as soon as it starts, so the nodes
/// of these tests run with [`KEEP_FIXTURE`]: the longest retention fleet accepts.
fn untar_format_1(dir: &std::path::Path) {
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/data-format-1.tar.gz"
    );
    let untar = std::process::Command::new("tar")
        .args(["xzf", fixture, "-C"])
        .arg(dir)
        .status()
        .unwrap();
    assert!(untar.success());
}

/// Config for the fixture's node: the test timings, and the longest retention (365 days) so the
/// fixture's finished tasks are not purged for their age.
const KEEP_FIXTURE: &str = "[scheduler]\nretention_ms = 31536000000\n";

/// Node 1 of the fixture, on a free port, with a config that keeps the fixture's tasks.
fn fixture_node(dir: &std::path::Path) -> (TestNode, std::path::PathBuf) {
    let config = test_config(dir, "");
    let text = std::fs::read_to_string(&config).unwrap();
    let text = text.replacen("[scheduler]\n", KEEP_FIXTURE, 1);
    std::fs::write(&config, text).unwrap();
    let port = free_ports(1)[0];
    let args = vec!["--config".to_string(), config.display().to_string()];
    (TestNode::new(dir, 1, port, args), config)
}

#[test]
fn a_data_directory_of_state_format_1_opens_with_its_tasks_and_new_attempts_get_names() {
    let dir = tempfile::tempdir().unwrap();
    untar_format_1(dir.path());
    let (mut node, config) = fixture_node(dir.path());
    node.start();
    let peers = node.addr.clone();
    let t = wait_for_state(&peers, 1, "succeeded", Duration::from_secs(20));
    let a = &t["attempts"][0];
    assert_eq!(a["outcome"], "succeeded", "{t}");
    assert_eq!(a["worker_name"], "", "format 1 had no names: {t}");
    assert_eq!(a["output_tail"], "golden 1\n", "{t}");
    let shown = String::from_utf8_lossy(&fleet(&["task", "show", "1", "--peers", &peers]).stdout)
        .into_owned();
    assert!(shown.contains("#1 worker id "), "{shown}");
    assert_eq!(show_task(&peers, 4).unwrap()["state"], "dead");

    // New work on the old data: the attempt records the worker by the name it goes by.
    let _w = TestWorker::start(dir.path(), "renamed", &peers, &config, &[]);
    let id = submit_task(
        &peers,
        &[],
        &["sh".into(), "-c".into(), "echo $FLEET_WORKER".into()],
    );
    let t = wait_for_state(&peers, id, "succeeded", Duration::from_secs(20));
    assert_eq!(t["attempts"][0]["worker_name"], "renamed", "{t}");
    assert_eq!(t["attempts"][0]["output_tail"], "renamed\n", "{t}");
    let shown = String::from_utf8_lossy(
        &fleet(&["task", "show", &id.to_string(), "--peers", &peers]).stdout,
    )
    .into_owned();
    assert!(shown.contains("#1 worker renamed token"), "{shown}");
    let logs =
        String::from_utf8_lossy(&fleet(&["logs", &id.to_string(), "--peers", &peers]).stdout)
            .into_owned();
    assert!(logs.contains("(worker renamed, fencing token"), "{logs}");
}

/// Every file under `dir` with its bytes.
fn files_under(dir: &std::path::Path) -> std::collections::BTreeMap<std::path::PathBuf, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.insert(p.clone(), Vec::new());
                stack.push(p);
            } else {
                out.insert(p.clone(), std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

#[test]
fn a_data_directory_of_a_newer_format_is_refused_and_left_byte_for_byte_untouched() {
    let dir = tempfile::tempdir().unwrap();
    untar_format_1(dir.path());
    let (mut node, _config) = fixture_node(dir.path());
    let format_file = node.data_dir.join("FORMAT");
    assert!(
        !format_file.exists(),
        "the fixture predates the FORMAT file"
    );
    // An old directory opens and is stamped with this build's format.
    node.start();
    wait_for_state(&node.addr.clone(), 1, "succeeded", Duration::from_secs(20));
    node.process.signal(libc::SIGTERM);
    assert_eq!(node.process.wait_exit(Duration::from_secs(30)), Some(0));
    let stamped = std::fs::read_to_string(&format_file).unwrap();
    assert!(stamped.contains("format 1\n"), "{stamped}");

    // A newer fleet's directory: refused by name, and nothing in it changes.
    std::fs::write(
        &format_file,
        "fleet data directory\nformat 99\nwritten by fleet 9.0.0\n",
    )
    .unwrap();
    let before = files_under(&node.data_dir);
    node.start();
    let code = node.process.wait_exit(Duration::from_secs(30));
    assert!(matches!(code, Some(c) if c != 0), "exit {code:?}");
    let log = node.log_text();
    assert!(
        log.contains("is format 99, written by a newer fleet")
            && log.contains("reads data directory formats up to 1")
            && log.contains("Nothing in the directory was changed"),
        "{log}"
    );
    assert!(
        files_under(&node.data_dir) == before,
        "the refused data directory changed"
    );
}
