//! Bad input gets a clear error naming the bad value, never a panic or a hang.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::*;

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn cli_pointed_at_nothing_fails_fast_with_the_reason() {
    let port = free_ports(1)[0];
    let addr = format!("127.0.0.1:{port}");
    let started = Instant::now();
    let out = fleet(&["submit", "--peers", &addr, "--", "true"]);
    assert!(!out.status.success());
    let err = stderr_of(&out);
    assert!(err.contains(&addr) && err.contains("unreachable"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );

    let out = fleet(&["task", "list"]);
    assert!(!out.status.success());
    assert!(
        stderr_of(&out).contains("no replica address given"),
        "{}",
        stderr_of(&out)
    );
}

#[test]
fn malformed_addresses_and_values_are_named() {
    for (args, needle) in [
        (
            vec!["submit", "--peers", "localhost", "--", "true"],
            "\"localhost\"",
        ),
        (
            vec!["submit", "--peers", "127.0.0.1:99999", "--", "true"],
            "99999",
        ),
        (
            vec!["join", "--peers", "nohost:", "--data-dir", "/tmp/x"],
            "\"nohost:\"",
        ),
        (
            vec![
                "join",
                "--listen",
                "bad",
                "--bootstrap-expect",
                "1",
                "--data-dir",
                "/tmp/x",
            ],
            "\"bad\"",
        ),
        (
            vec![
                "join",
                "--bootstrap-expect",
                "0",
                "--peers",
                "127.0.0.1:1",
                "--data-dir",
                "/tmp/x",
            ],
            "bootstrap_expect = 0",
        ),
        (
            vec![
                "join",
                "--node-id",
                "0",
                "--bootstrap-expect",
                "1",
                "--data-dir",
                "/tmp/x",
            ],
            "node.id = 0",
        ),
        (
            vec![
                "join",
                "--raft-timing-multiplier",
                "0",
                "--bootstrap-expect",
                "1",
                "--data-dir",
                "/tmp/x",
            ],
            "timing_multiplier = 0",
        ),
        (
            vec![
                "submit",
                "--queue",
                "has space",
                "--peers",
                "127.0.0.1:1",
                "--",
                "true",
            ],
            "\"has space\"",
        ),
        (vec!["submit", "--peers", "127.0.0.1:1"], "no command given"),
        (
            vec!["task", "list", "--limit", "0", "--peers", "127.0.0.1:1"],
            "--limit 0",
        ),
        (
            vec![
                "join",
                "--http-listen",
                "nope",
                "--bootstrap-expect",
                "1",
                "--data-dir",
                "/tmp/x",
            ],
            "node.http_listen: \"nope\"",
        ),
        (
            vec!["health", "--retry-for", "0s", "--peers", "127.0.0.1:1"],
            "--retry-for 0s",
        ),
        (
            vec!["down", "--timeout", "abc"],
            "\"abc\" is not a duration",
        ),
        (
            vec!["submit", "--retry-for", "5", "--", "true"],
            "\"5\" is not a duration",
        ),
        (
            vec![
                "fault",
                "stall",
                "--for",
                "soon",
                "--component",
                "scheduler",
            ],
            "\"soon\" is not a duration",
        ),
    ] {
        assert_fails_naming(&args, needle);
    }
}

#[test]
fn config_file_typos_and_bad_values_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let typo = dir.path().join("typo.toml");
    std::fs::write(&typo, "[raft]\nheartbeat_intervl_ms = 100\n").unwrap();
    let out = fleet(&[
        "--config",
        typo.to_str().unwrap(),
        "cluster",
        "status",
        "--peers",
        "127.0.0.1:1",
    ]);
    assert!(!out.status.success());
    assert!(
        stderr_of(&out).contains("heartbeat_intervl_ms"),
        "{}",
        stderr_of(&out)
    );
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[raft]\nelection_timeout_min_ms = 100\n").unwrap();
    let out = fleet(&[
        "--config",
        bad.to_str().unwrap(),
        "cluster",
        "status",
        "--peers",
        "127.0.0.1:1",
    ]);
    assert!(
        stderr_of(&out).contains("raft.election_timeout_min_ms = 100"),
        "{}",
        stderr_of(&out)
    );
    // The health section: a stall threshold shorter than three scheduler ticks, and a typo.
    for (text, needle) in [
        (
            "[health]\nstall_threshold_ms = 100\n",
            "health.stall_threshold_ms = 100 is not valid: use 500 to",
        ),
        ("[fault_injection]\nenable = true\n", "enable"),
    ] {
        let bad = dir.path().join("health.toml");
        std::fs::write(&bad, text).unwrap();
        let out = fleet(&[
            "--config",
            bad.to_str().unwrap(),
            "health",
            "--peers",
            "127.0.0.1:1",
        ]);
        assert_eq!(out.status.code(), Some(1), "{}", stderr_of(&out));
        assert!(stderr_of(&out).contains(needle), "{}", stderr_of(&out));
    }
}

#[test]
fn two_nodes_claiming_one_id_both_stop_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let ports = free_ports(2);
    let peers = format!("127.0.0.1:{},127.0.0.1:{}", ports[0], ports[1]);
    let args = vec![
        "--peers".to_string(),
        peers,
        "--bootstrap-expect".into(),
        "2".into(),
    ];
    let mut a = TestNode::new(dir.path(), 1, ports[0], args.clone());
    let mut b = TestNode::new(&dir.path().join("b"), 1, ports[1], args);
    std::fs::create_dir_all(dir.path().join("b")).unwrap();
    a.start();
    b.start();
    for n in [&mut a, &mut b] {
        let code = n.wait_exit(Duration::from_secs(30));
        assert_eq!(code, Some(1));
        let log = n.log_text();
        assert!(log.contains("node id 1 is claimed by both"), "{log}");
    }
}

#[test]
fn disagreeing_bootstrap_expect_stops_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let ports = free_ports(3);
    let peers: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let args = |expect: &str| {
        vec![
            "--peers".to_string(),
            peers.join(","),
            "--bootstrap-expect".into(),
            expect.into(),
        ]
    };
    let mut nodes = [
        TestNode::new(dir.path(), 1, ports[0], args("3")),
        TestNode::new(dir.path(), 2, ports[1], args("3")),
        TestNode::new(dir.path(), 3, ports[2], args("2")),
    ];
    for n in nodes.iter_mut() {
        n.start();
    }
    // Every node sees the disagreement (a node that finds it stays reachable for a few seconds
    // so the others find it too) and stops with both values named; none forms a cluster.
    for n in nodes.iter_mut() {
        assert_eq!(
            n.wait_exit(Duration::from_secs(30)),
            Some(1),
            "node {}",
            n.id
        );
        let log = n.log_text();
        assert!(log.contains("--bootstrap-expect disagrees"), "{log}");
        assert!(!log.contains("initializing the cluster"), "{log}");
    }
    assert!(nodes[2].log_text().contains("has 3, this node has 2"));
    // Too few peers for the expected count is refused at start.
    let out = fleet(&[
        "join",
        "--peers",
        &peers[0],
        "--listen",
        &peers[1],
        "--bootstrap-expect",
        "3",
        "--data-dir",
        "/tmp/unused",
    ]);
    assert!(
        stderr_of(&out).contains("names only 2 node(s)"),
        "{}",
        stderr_of(&out)
    );
}

#[test]
fn a_data_directory_from_another_cluster_is_refused() {
    // Cluster A: one node with id 3. Cluster B: three nodes with ids 1, 2, 3.
    let mut a = TestCluster::new(1, &[]);
    a.nodes[0].id = 3;
    a.nodes[0].start();
    a.wait_for_leader(&a.peers(), 1, Duration::from_secs(20));
    a.nodes[0].signal(libc::SIGTERM);
    assert_eq!(a.nodes[0].wait_exit(Duration::from_secs(20)), Some(0));

    let mut b = TestCluster::new(3, &[]);
    let peers = b.peers();
    for id in 1..=3 {
        b.node(id).start();
    }
    b.wait_for_leader(&peers, 3, Duration::from_secs(30));
    b.node(3).kill9();

    // Node 3 of B restarts on A's data directory.
    let foreign = a.nodes[0].data_dir.clone();
    std::fs::remove_dir_all(&b.node(3).data_dir).unwrap();
    std::fs::rename(&foreign, &b.node(3).data_dir).unwrap();
    b.node(3).start();
    let code = b.node(3).wait_exit(Duration::from_secs(20));
    assert_eq!(code, Some(1));
    let log = b.node(3).log_text();
    assert!(
        log.contains("belongs to another cluster") && log.contains("cluster id mismatch"),
        "{log}"
    );
    // The rest of B is unharmed.
    fleet_json(&["submit", "--peers", &peers, "--", "true"]).expect("cluster B still writable");
}

#[test]
fn garbage_and_wrong_protocol_versions_are_refused_and_logged() {
    let mut c = TestCluster::new(1, &[]);
    c.nodes[0].start();
    let peers = c.peers();
    c.wait_for_leader(&peers, 1, Duration::from_secs(20));

    // Garbage bytes: refused, logged, and the node keeps serving.
    let mut s = std::net::TcpStream::connect(&c.nodes[0].addr).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf); // the node closes the connection
                                     // A fleet frame header with protocol version 99: refused with the reason in words.
    let mut s = std::net::TcpStream::connect(&c.nodes[0].addr).unwrap();
    let mut frame = b"FLEET\0".to_vec();
    frame.extend_from_slice(&99u16.to_be_bytes());
    frame.extend_from_slice(&0u32.to_be_bytes());
    s.write_all(&frame).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply);
    assert!(
        String::from_utf8_lossy(&reply).contains("protocol version"),
        "reply: {reply:?}"
    );

    wait_until("the refusals in the log", Duration::from_secs(10), || {
        let log = c.nodes[0].log_text();
        if log.contains("refused connection: bad handshake")
            && log.contains("incompatible protocol version")
        {
            Ok(())
        } else {
            Err(tail(&log, 10))
        }
    });
    fleet_json(&["submit", "--peers", &peers, "--", "true"]).expect("still serving");
    assert!(!c.nodes[0].log_text().contains("panicked"));
}

#[test]
fn a_raft_connection_reaching_the_wrong_node_is_refused() {
    let mut c = TestCluster::new(1, &[]);
    c.nodes[0].start();
    c.wait_for_leader(&c.peers(), 1, Duration::from_secs(20));
    let addr = c.nodes[0].addr.clone();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let me = fleet::rpc::peer::LocalIdentity::new(
        fleet::rpc::Role::Replica,
        Some(7),
        "fleet".into(),
        None,
    );
    // Node 1 listens at `addr`; a peer that believes node 99 lives there must be refused.
    let err = rt
        .block_on(fleet::rpc::peer::dial(&addr, &me, Some(99)))
        .err()
        .expect("refused");
    assert!(
        err.to_string().contains("this is node 1, not node 99"),
        "{err}"
    );
    // Another cluster name is refused too.
    let other =
        fleet::rpc::peer::LocalIdentity::new(fleet::rpc::Role::Client, None, "other".into(), None);
    let err = rt
        .block_on(fleet::rpc::peer::dial(&addr, &other, None))
        .err()
        .expect("refused");
    assert!(
        err.to_string().contains("belongs to cluster \"other\""),
        "{err}"
    );
    // The node it was meant for is accepted.
    assert!(rt
        .block_on(fleet::rpc::peer::dial(&addr, &me, Some(1)))
        .is_ok());
}

#[test]
fn task_and_worker_options_are_named() {
    let mut c = TestCluster::new(1, &[]);
    let peers = c.peers();
    c.node(1).start();
    c.wait_for_leader(&peers, 1, Duration::from_secs(30));
    let p = peers.as_str();
    for (args, needle) in [
        (
            vec!["submit", "--peers", p, "--timeout", "10", "--", "true"],
            "\"10\" is not a duration",
        ),
        (
            vec!["submit", "--peers", p, "--env", "NOVALUE", "--", "true"],
            "\"NOVALUE\" is not KEY=VALUE",
        ),
        (
            vec![
                "submit",
                "--peers",
                p,
                "--not-before",
                "tomorrow",
                "--",
                "true",
            ],
            "RFC 3339",
        ),
        (
            vec!["submit", "--peers", p, "--max-attempts", "0", "--", "true"],
            "max attempts 0 is not valid: use 1 to 1000",
        ),
        (
            vec![
                "submit",
                "--peers",
                p,
                "--visibility-timeout",
                "10ms",
                "--",
                "true",
            ],
            "visibility timeout 10 ms is not valid",
        ),
        (
            vec!["submit", "--peers", p, "--env", "FLEET_X=1", "--", "true"],
            "FLEET_X is reserved",
        ),
        (
            vec![
                "submit",
                "--peers",
                p,
                "--backoff-multiplier",
                "20",
                "--",
                "true",
            ],
            "backoff multiplier 20.000 is not valid",
        ),
        (
            vec!["submit", "--peers", p, "--queue", "no spaces", "--", "true"],
            "queue name \"no spaces\" is not valid",
        ),
        (
            vec!["worker", "--peers", p, "--concurrency", "0"],
            "worker.concurrency = 0 is not valid: use 1 to 4096",
        ),
        (
            vec!["worker", "--peers", p, "--queues", "a,b c"],
            "queue name \"b c\" is not valid",
        ),
        (
            vec!["logs", "--peers", p, "424242"],
            "task 424242 not found",
        ),
    ] {
        assert_fails_naming(&args, needle);
    }
    // Nothing was created by the rejected submissions.
    let listed = fleet_json(&["task", "list", "--peers", p]).unwrap();
    assert_eq!(listed["value"].as_array().unwrap().len(), 0, "{listed}");
}

/// `fleet workflow validate FILE`, as a user runs it: a good file prints its layers; a cycle,
/// an unknown upstream, an unknown key and a missing file fail with the file and the fault
/// named.
#[test]
fn workflow_files_are_checked_with_the_fault_named() {
    let dir = tempfile::tempdir().expect("temp dir");
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).expect("write");
        p.to_string_lossy().into_owned()
    };
    let etl = "name = \"etl\"\n[defaults]\nqueue = \"default\"\n\
               [tasks.extract]\ncommand = [\"sh\", \"-c\", \"extract.sh\"]\n\
               [tasks.transform]\ncommand = [\"sh\", \"-c\", \"transform.sh\"]\nafter = [\"extract\"]\n\
               [tasks.load]\ncommand = [\"sh\", \"-c\", \"load.sh\"]\nafter = [\"transform\"]\n\
               trigger = \"all_success\"\n";
    let good = write("etl.toml", etl);
    let out = fleet(&["workflow", "validate", &good]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("workflow etl: 3 tasks, 2 edges, 3 layers")
            && text.contains("layer 3:\n  load  after transform"),
        "{text}"
    );

    let cycle = write(
        "cycle.toml",
        &etl.replace("extract.sh\"]\n", "extract.sh\"]\nafter = [\"load\"]\n"),
    );
    let unknown = write(
        "unknown.toml",
        &etl.replace("[\"transform\"]", "[\"transfrom\"]"),
    );
    let typo = write("typo.toml", &etl.replace("trigger =", "triger ="));
    let missing = dir.path().join("none.toml").to_string_lossy().into_owned();
    for (file, needle) in [
        (&cycle, "cycle: extract -> transform -> load -> extract"),
        (&unknown, "\"load\" runs after \"transfrom\""),
        (&typo, "triger"),
        (&missing, "cannot read workflow file"),
    ] {
        // `apply` checks the file as `validate` does, before it contacts any replica.
        for cmd in ["validate", "apply"] {
            let mut args = vec!["workflow", cmd, file.as_str()];
            if cmd == "apply" {
                args.extend(["--peers", "127.0.0.1:1"]);
            }
            let out = fleet(&args);
            assert!(!out.status.success(), "{file} was accepted by {cmd}");
            let err = stderr_of(&out);
            assert!(
                err.contains(file.as_str()) && err.contains(needle),
                "{cmd} {file}: {err}"
            );
        }
    }
    // The [schedule] table: a timing is required, and its keys are checked.
    for (schedule, needle) in [
        ("[schedule]\ntimezone = \"UTC\"\n", "needs either cron"),
        ("[schedule]\nevery = \"soon\"\n", "[schedule] every"),
        (
            "[schedule]\nevery = \"1h\"\noverlap = \"skip\"\n",
            "overlap",
        ),
        (
            "[schedule]\ncron = \"0 * * * *\"\nstart_at = \"tomorrow\"\n",
            "[schedule] start_at",
        ),
    ] {
        let file = write("sched.toml", &format!("{etl}{schedule}"));
        let out = fleet(&["workflow", "validate", &file]);
        let err = stderr_of(&out);
        assert!(
            !out.status.success() && err.contains(needle),
            "{schedule}: {err}"
        );
    }
    // Arguments of the run commands, named before anything is sent.
    for (args, needle) in [
        (
            &["workflow", "run", "etl", "--param", "DAY"][..],
            "is not a parameter: use K=V",
        ),
        (
            &["workflow", "run", "etl", "--param", "a-b=1"],
            "parameter name \"a-b\"",
        ),
        (
            &["run", "list", "--limit", "0"],
            "--limit 0 is not valid: use 1 to 1000",
        ),
        (
            &["run", "list", "--state", "done"],
            "unknown run state \"done\"",
        ),
        (&["run", "show", "x"], "invalid value 'x'"),
        (
            &["submit", "--after", "7,x", "--", "true"],
            "\"x\" is not a task id",
        ),
        (
            &["submit", "--after", "0", "--", "true"],
            "\"0\" is not a task id",
        ),
    ] {
        let mut a = args.to_vec();
        a.extend(["--peers", "127.0.0.1:1"]);
        let out = fleet(&a);
        let err = stderr_of(&out);
        assert!(
            !out.status.success() && err.contains(needle),
            "{args:?}: {err}"
        );
    }
}

/// docs/operations.md (Ports): a listen port held by the local end of an outgoing connection
/// (which is how a port in the kernel's ephemeral range gets taken) stops the replica at once,
/// naming the address, rather than leaving it running deaf.
#[test]
fn a_listen_port_held_by_an_outgoing_connection_is_named_and_the_replica_exits() {
    let target = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let outgoing = std::net::TcpStream::connect(target.local_addr().unwrap()).unwrap();
    let held = outgoing.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let out = std::process::Command::new(fleet_bin())
        .args(["join", "--node-id", "1", "--listen", &held])
        .args(["--http-listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("node-1"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr_of(&out));
    let err = stderr_of(&out);
    assert!(
        err.contains(&format!("cannot listen on {held}")) && err.contains("in use"),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    drop(outgoing);
}

/// The tests' own ports come from below the ephemeral range, for the reason above, and are
/// never handed out twice to the tests of one binary, which run in parallel.
#[test]
fn test_ports_are_below_the_ephemeral_range_and_never_handed_out_twice() {
    let range = listen_port_range();
    let mut ports = free_ports(50);
    let base = free_consecutive_ports_and(3, &[100]);
    ports.extend([base, base + 1, base + 2, base + 100, base + 101, base + 102]);
    assert!(
        ports.iter().all(|p| range.contains(p)),
        "{ports:?} not in {range:?}"
    );
    let n = ports.len();
    ports.sort();
    ports.dedup();
    assert_eq!(ports.len(), n, "a port was handed out twice");
}
