//! Quorum-loss recovery as docs/operations.md describes it: two of three replicas destroyed
//! (killed, their data directories deleted); `fleet recover` refuses while a quorum is
//! reachable and without `--accept-data-loss`, then turns the survivor into a one-node
//! cluster with every acknowledged task, which grows back to three replicas and serves.

mod common;

use std::time::Duration;

use common::*;

fn recover(node: &TestNode, config: &std::path::Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "recover",
        "--node-id",
        "1",
        "--listen",
        &node.addr,
        "--data-dir",
        node.data_dir.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    fleet(&args)
}

/// Every entry under `dir` is owned by `uid`.
fn assert_owned_by(dir: &std::path::Path, uid: u32) {
    use std::os::unix::fs::MetadataExt;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let m = std::fs::symlink_metadata(&path).unwrap();
        assert_eq!(
            m.uid(),
            uid,
            "{} is owned by uid {}",
            path.display(),
            m.uid()
        );
        if m.is_dir() {
            assert_owned_by(&path, uid);
        }
    }
}

#[test]
fn a_survivor_recovers_as_a_one_node_cluster_grows_back_and_serves() {
    let (mut c, config, peers) = start_fleet(3, 1000);
    let dir = c.dir.path().to_path_buf();
    let mut w = TestWorker::start(&dir, "w1", &peers, &config, &[]);
    let ids: Vec<u64> = (0..5)
        .map(|i| submit_task(&peers, &[], &["echo".into(), i.to_string()]))
        .collect();
    for id in &ids {
        wait_for_state(&peers, *id, "succeeded", Duration::from_secs(30));
    }
    w.signal(libc::SIGTERM);
    w.wait_exit(Duration::from_secs(30));
    // Queued when the majority is lost: acknowledged, so it must survive.
    let queued = submit_task(&peers, &[], &["echo".into(), "after".into()]);
    // Node 1 holds everything acknowledged: a write is acknowledged once on a quorum, and
    // with node 1 caught up (its applied index at the leader's) it is among them.
    wait_until(
        "node 1 to hold the queued task",
        Duration::from_secs(30),
        || {
            local_task_ids(&c.nodes[0].addr).and_then(|t| {
                if t.contains(&queued) {
                    Ok(())
                } else {
                    Err(format!("{t:?}"))
                }
            })
        },
    );
    c.nodes[0].signal(libc::SIGTERM);
    assert_eq!(c.nodes[0].wait_exit(Duration::from_secs(30)), Some(0));

    // The other two still form a quorum: refused.
    let out = recover(&c.nodes[0], &config, &["--accept-data-loss"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("the cluster is not lost"),
        "{err}"
    );

    // Destroy nodes 2 and 3 for good.
    for n in &mut c.nodes[1..] {
        n.kill9();
        std::fs::remove_dir_all(&n.data_dir).unwrap();
    }
    // Without --accept-data-loss: what it would do, and nothing changes.
    let out = recover(&c.nodes[0], &config, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("WARNING")
            && err.contains("is LOST")
            && err.contains("nothing was changed"),
        "{err}"
    );
    // On a packaged replica the directory is the `fleet` user's and the operator runs
    // `fleet recover` as root: the files it writes must stay the directory owner's. As root,
    // this test gives the directory to another user (65534, nobody) to check that.
    let as_root = unsafe { libc::geteuid() } == 0;
    if as_root {
        std::os::unix::fs::chown(&c.nodes[0].data_dir, Some(65534), Some(65534)).unwrap();
    }
    let out = recover(&c.nodes[0], &config, &["--accept-data-loss"]);
    if as_root {
        assert_owned_by(&c.nodes[0].data_dir, 65534);
    } else {
        eprintln!("not root: the ownership of recovered files is not checked");
    }
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("recovered: node 1 is a one-node cluster"),
        "{text}"
    );

    // It starts with its old flags (its old peers are gone) and leads alone.
    let survivor = c.nodes[0].addr.clone();
    c.nodes[0].start();
    wait_until("the survivor to lead", Duration::from_secs(30), || {
        cluster_status(&survivor).and_then(|s| {
            if s["leader_id"] == 1 {
                Ok(())
            } else {
                Err(s.to_string())
            }
        })
    });
    for id in ids.iter().chain([&queued]) {
        assert!(show_task(&survivor, *id).is_ok(), "task {id} lost");
    }

    // Grows back to three with fresh replicas, and serves.
    let ports = free_ports(2);
    let fresh = join_new_nodes(&dir, 4, &ports, &config, &survivor);
    wait_for_voters(&survivor, 3, Duration::from_secs(60));
    let all = format!("{survivor},{},{}", fresh[0].addr, fresh[1].addr);
    let _w2 = TestWorker::start(&dir, "w2", &all, &config, &[]);
    wait_for_state(&all, queued, "succeeded", Duration::from_secs(30));
    let id = submit_task(&all, &[], &["true".into()]);
    wait_for_state(&all, id, "succeeded", Duration::from_secs(30));
}
