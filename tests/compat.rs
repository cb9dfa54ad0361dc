//! Data written by an earlier fleet: a replica's data directory from before attempts carried
//! their worker's name (state format 1, `tests/fixtures/data-format-1.tar.gz`: a one-node
//! cluster that ran three tasks and a failing one on worker `golden-worker`) is opened by this
//! fleet with every task and attempt intact, and new attempts record the worker's name.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn a_data_directory_of_state_format_1_opens_with_its_tasks_and_new_attempts_get_names() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/data-format-1.tar.gz"
    );
    let untar = std::process::Command::new("tar")
        .args(["xzf", fixture, "-C"])
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(untar.success());
    let port = free_ports(1)[0];
    let mut node = TestNode::new(dir.path(), 1, port, vec![]);
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
    let config = test_config(dir.path(), "");
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
