//! Backup and restore, as docs/operations.md describes them: `fleet cluster snapshot save`
//! from a running 3-replica cluster under a task stream, `fleet join --restore` into a fresh
//! cluster that then grows to three replicas, and every task, attempt, schedule, pool and
//! workflow compared; a corrupt or too-new backup is refused.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use fleet::server::backup::read_backup;

fn save(peers: &str, file: &std::path::Path) -> serde_json::Value {
    fleet_json(&[
        "cluster",
        "snapshot",
        "save",
        file.to_str().unwrap(),
        "--peers",
        peers,
    ])
    .unwrap()
}

#[test]
fn a_backup_under_load_restores_into_a_new_cluster_with_everything_intact() {
    let (c, config, peers) = start_fleet(3, 1000);
    let dir = c.dir.path().to_path_buf();
    let _w = TestWorker::start(&dir, "w1", &peers, &config, &[]);
    // Some of everything: a pool, an hourly schedule (it does not fire during the test), a
    // workflow with a finished run, tasks that succeed, fail for good, and run long.
    fleet_json(&["pool", "set", "db", "--slots", "2", "--peers", &peers]).unwrap();
    fleet_json(&[
        "schedule",
        "create",
        "hourly",
        "--cron",
        "0 * * * *",
        "--peers",
        &peers,
        "--",
        "true",
    ])
    .unwrap();
    let wf = dir.join("wf.toml");
    std::fs::write(
        &wf,
        "name = \"wf\"\n[tasks.a]\ncommand = [\"true\"]\n[tasks.b]\ncommand = [\"true\"]\n\
         after = [\"a\"]\n",
    )
    .unwrap();
    fleet_json(&["workflow", "apply", wf.to_str().unwrap(), "--peers", &peers]).unwrap();
    fleet_json(&["workflow", "run", "wf", "--wait", "--peers", &peers]).unwrap();
    let ok = submit_task(&peers, &[], &["true".into()]);
    let bad = submit_task(&peers, &["--max-attempts", "1"], &["false".into()]);
    let long = submit_task(&peers, &[], &["sleep".into(), "600".into()]);
    wait_for_state(&peers, ok, "succeeded", Duration::from_secs(30));
    wait_for_state(&peers, bad, "dead", Duration::from_secs(30));
    wait_for_state(&peers, long, "running", Duration::from_secs(30));

    // The load: a client submitting all along the save.
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (stop, peers) = (stop.clone(), peers.clone());
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                submit_task(&peers, &["--pool", "db"], &["true".into()]);
                n += 1;
            }
            n
        })
    };
    wait_until("the load to run", Duration::from_secs(30), || {
        let n = task_ids_in(&peers, "succeeded")?.len();
        if n >= 10 {
            Ok(())
        } else {
            Err(format!("{n} succeeded"))
        }
    });
    let file = dir.join("backup.snap");
    let saved = save(&peers, &file);
    stop.store(true, Ordering::Relaxed);
    let submitted = load.join().unwrap();
    assert!(submitted > 5, "{submitted} submissions during the load");
    let backup = read_backup(&file).unwrap();
    assert_eq!(saved["tasks"], backup.state.all_tasks().count());
    assert!(saved["schedules"] == 1 && saved["pools"] == 1 && saved["workflows"] == 1);

    // Restore into a fresh node: a new cluster, its own id.
    let ports = free_ports(3);
    let restored_dir = tempfile::tempdir().unwrap();
    let rconfig = test_config(restored_dir.path(), "");
    let mut first = TestNode::new(
        restored_dir.path(),
        11,
        ports[0],
        vec![
            "--config".into(),
            rconfig.display().to_string(),
            "--restore".into(),
            file.display().to_string(),
        ],
    );
    first.start();
    let rpeers = first.addr.clone();
    let status = wait_until("the restored node to lead", Duration::from_secs(30), || {
        cluster_status(&rpeers).and_then(|s| {
            if s["leader_id"] == 11 {
                Ok(s)
            } else {
                Err(s.to_string())
            }
        })
    });
    let old = cluster_status(&peers).unwrap();
    assert_ne!(status["cluster_id"], old["cluster_id"], "a new cluster id");

    // Everything is there: the restored cluster's own backup holds the same state.
    let again = restored_dir.path().join("again.snap");
    save(&rpeers, &again);
    let restored = read_backup(&again).unwrap();
    let tasks =
        |s: &fleet::state::State| -> Vec<fleet::state::Task> { s.all_tasks().cloned().collect() };
    assert_eq!(
        tasks(&restored.state),
        tasks(&backup.state),
        "tasks and attempts"
    );
    assert_eq!(
        restored.state.schedules(),
        backup.state.schedules(),
        "schedules"
    );
    assert_eq!(restored.state.pools(), backup.state.pools(), "pools");
    assert_eq!(
        restored.state.workflows(),
        backup.state.workflows(),
        "workflows and runs"
    );
    assert_eq!(restored.state, backup.state, "the whole state");

    // It grows back to three replicas and serves.
    let others = join_new_nodes(restored_dir.path(), 12, &ports[1..3], &rconfig, &rpeers);
    let all = format!("{},{},{}", rpeers, others[0].addr, others[1].addr);
    wait_for_voters(&rpeers, 3, Duration::from_secs(60));
    let _w2 = TestWorker::start(restored_dir.path(), "w2", &all, &rconfig, &[]);
    let id = submit_task(&all, &[], &["true".into()]);
    wait_for_state(&all, id, "succeeded", Duration::from_secs(30));
    // The queued tasks of the backup run on the new cluster's worker too.
    let queued: Vec<u64> = backup
        .state
        .all_tasks()
        .filter(|t| t.state == fleet::state::TaskState::Queued)
        .map(|t| t.id.0)
        .collect();
    for q in queued {
        wait_for_state(&all, q, "succeeded", Duration::from_secs(60));
    }
}

#[test]
fn a_corrupt_or_too_new_backup_is_refused_by_name() {
    let (c, _config, peers) = start_fleet(1, 1000);
    submit_task(&peers, &[], &["true".into()]);
    let file = c.dir.path().join("b.snap");
    save(&peers, &file);
    let bytes = std::fs::read(&file).unwrap();

    let mut corrupt = bytes.clone();
    let last = corrupt.len() - 1;
    corrupt[last] ^= 0xff;
    let bad = c.dir.path().join("corrupt.snap");
    std::fs::write(&bad, &corrupt).unwrap();
    assert_fails_naming(
        &["cluster", "snapshot", "inspect", bad.to_str().unwrap()],
        "checksum mismatch (corrupt)",
    );
    let empty_dir = c.dir.path().join("never-created");
    let port = free_ports(1)[0].to_string();
    let listen = format!("127.0.0.1:{port}");
    let join = |f: &std::path::Path| {
        fleet(&[
            "join",
            "--node-id",
            "9",
            "--listen",
            &listen,
            "--data-dir",
            empty_dir.to_str().unwrap(),
            "--restore",
            f.to_str().unwrap(),
        ])
    };
    let out = join(&bad);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("checksum mismatch"),
        "{err}"
    );
    assert!(!empty_dir.exists(), "a refused restore creates nothing");

    let mut newer = bytes.clone();
    newer[8..12].copy_from_slice(&99u32.to_le_bytes());
    let new = c.dir.path().join("newer.snap");
    std::fs::write(&new, &newer).unwrap();
    let out = join(&new);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("format 99 is not understood"),
        "{err}"
    );
    let truncated = c.dir.path().join("truncated.snap");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    assert_fails_naming(
        &[
            "cluster",
            "snapshot",
            "inspect",
            truncated.to_str().unwrap(),
        ],
        "truncated",
    );
}
