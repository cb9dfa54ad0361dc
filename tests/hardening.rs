//! What a newcomer and a hostile tester broke (issue 13), each as it was found: a closed
//! stdout, task files with large lines, escaped task processes, connection floods on the RPC
//! and HTTP ports.

mod common;

use std::io::Write as _;
use std::os::fd::{FromRawFd as _, OwnedFd};
use std::os::unix::process::ExitStatusExt as _;
use std::process::{Command, Stdio};

use common::*;

/// Runs `fleet ARGS` with a stdout whose reader is already gone (what `| head -1` becomes after
/// its first line); returns the exit status and stderr.
fn run_with_closed_stdout(args: &[&str]) -> (std::process::ExitStatus, String) {
    let mut fds = [0; 2];
    // SAFETY: pipe(2) fills two fds that we then own.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: both fds were just created and are owned here only.
    let (reader, writer) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(reader);
    let out = Command::new(fleet_bin())
        .args(args)
        .env_remove("FLEET_PEERS")
        .stdout(Stdio::from(writer))
        .stderr(Stdio::piped())
        .output()
        .expect("run fleet");
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn every_command_ends_quietly_on_a_closed_stdout() {
    let (_c, _config, peers) = start_fleet(1, 200);
    let id = submit_task(&peers, &[], &["true".to_string()]).to_string();
    let dir = tempfile::tempdir().expect("temp dir");
    let workflow = dir.path().join("w.toml");
    std::fs::write(
        &workflow,
        "name = \"w\"\n[tasks.a]\ncommand = [\"true\"]\n[tasks.b]\ncommand = [\"true\"]\nafter = [\"a\"]\n",
    )
    .expect("write");
    let workflow = workflow.to_string_lossy().into_owned();
    let commands: Vec<Vec<&str>> = vec![
        vec!["workflow", "validate", &workflow],
        vec!["workflow", "apply", &workflow, "--peers", &peers],
        vec!["workflow", "run", "w", "--peers", &peers],
        vec!["workflow", "list", "--peers", &peers],
        vec!["workflow", "show", "w", "--peers", &peers],
        vec!["run", "list", "--peers", &peers],
        vec!["run", "show", "1", "--peers", &peers],
        vec!["task", "show", &id, "--peers", &peers],
        vec!["task", "list", "--peers", &peers],
        vec!["task", "show", &id, "--peers", &peers, "--output", "json"],
        vec!["queue", "stats", "--peers", &peers],
        vec!["cluster", "status", "--peers", &peers],
        vec!["worker", "list", "--peers", &peers],
        vec!["logs", &id, "--peers", &peers],
        vec!["config", "show", "--defaults"],
        vec!["--help"],
    ];
    for args in &commands {
        let (status, stderr) = run_with_closed_stdout(args);
        assert!(
            !stderr.contains("panicked") && !stderr.contains("Broken pipe"),
            "{args:?}: {stderr}"
        );
        // Like a Unix tool: ended by SIGPIPE (what `head` does to `cat`) or a clean exit.
        assert!(
            status.success() || status.signal() == Some(libc::SIGPIPE),
            "{args:?}: {status:?} {stderr}"
        );
    }
}

#[test]
fn a_task_file_of_large_lines_is_submitted_in_batches_cut_by_size() {
    let (c, _config, peers) = start_fleet(1, 200);
    // 600 lines of 60 kB: 36 MB, more than one 32 MiB frame, and far fewer lines than one
    // 1,000-line batch. Cut by count alone, nothing was submitted.
    let file = c.dir.path().join("big.jsonl");
    let arg = "x".repeat(60_000);
    let mut f = std::fs::File::create(&file).unwrap();
    for i in 0..600 {
        writeln!(
            f,
            r#"{{"command": ["echo", "{i}", "{arg}"], "queue": "big"}}"#
        )
        .unwrap();
    }
    drop(f);
    submit_file(&peers, &file, 600);
    let stats = fleet_json(&["queue", "stats", "--peers", &peers]).unwrap();
    assert_eq!(stats["value"]["big"]["ready"], 600, "{stats}");

    // A line over the per-task limit is named by its line number, and nothing is submitted.
    let bad = c.dir.path().join("bad.jsonl");
    let mut f = std::fs::File::create(&bad).unwrap();
    writeln!(f, r#"{{"command": ["true"], "queue": "bad"}}"#).unwrap();
    writeln!(f).unwrap();
    writeln!(
        f,
        r#"{{"command": ["echo", "{}"], "queue": "bad"}}"#,
        "y".repeat(70_000)
    )
    .unwrap();
    drop(f);
    let path = bad.to_str().unwrap().to_string();
    assert_fails_naming(
        &["submit", "--file", &path, "--peers", &peers],
        &format!("{path}:3: the task command is 70004 bytes long; at most 65536 are accepted"),
    );
    let stats = fleet_json(&["queue", "stats", "--peers", &peers]).unwrap();
    assert!(stats["value"].get("bad").is_none(), "{stats}");
}

/// Resident memory of a process, in KiB (`VmRSS` in /proc).
fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn slowloris_on_the_http_port_does_not_silence_health_probes() {
    use std::io::{Read as _, Write as _};
    let (mut c, _config, peers) = start_fleet(1, 200);
    let (_, report) = health_of(&peers);
    let http = report["http_addr"].as_str().unwrap().to_string();
    let pid = c.node(1).process.pid();
    let before = rss_kib(pid);
    // 400 connections whose request headers never finish, more than the connection limit.
    let mut slow: Vec<std::net::TcpStream> = (0..400)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(&http).unwrap();
            s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                .unwrap();
            s
        })
        .collect();
    let started = std::time::Instant::now();
    for _ in 0..20 {
        let (code, body) = http_get(&http, "/health").expect("a probe is answered under attack");
        assert_eq!(code, 200, "{body}");
    }
    let probes = started.elapsed();
    let during = rss_kib(pid);
    eprintln!(
        "20 probes under 400 slow connections took {probes:?}; RSS {before} KiB before, {during} KiB during"
    );
    // Every slow connection is closed by the server: evicted for newer ones, or at the header
    // timeout (5 s).
    let closed_by = std::time::Instant::now();
    for s in &mut slow {
        s.set_read_timeout(Some(std::time::Duration::from_secs(15)))
            .unwrap();
        let mut buf = [0u8; 256];
        // Closed by the server: an end of file, or a reset when it closed the connection
        // before reading what the client had sent. A timeout means it stayed open.
        let n = match s.read(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => 0,
            other => other.expect("the server closes a slow connection (no header timeout?)"),
        };
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(
            n == 0 || text.starts_with("HTTP/1.1 408"),
            "a slow request got {text:?}"
        );
    }
    eprintln!(
        "all slow connections closed within {:?}",
        closed_by.elapsed()
    );
    assert!(closed_by.elapsed() < std::time::Duration::from_secs(12));
}

#[test]
fn a_flood_of_idle_client_connections_locks_out_neither_clients_nor_workers() {
    let (mut c, config, peers) = start_fleet(3, 200);
    let leader = leader_of(&peers).unwrap();
    let addr = c.addr(leader);
    let pid = c.node(leader).process.pid();
    let before = rss_kib(pid);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let me =
        fleet::rpc::peer::LocalIdentity::new(fleet::rpc::Role::Client, None, "fleet".into(), None);
    // 1,100 connections that complete the handshake as clients, then sit idle. Before the
    // bounds per role, these took every slot and new callers timed out in the handshake.
    let mut flood = Vec::new();
    let mut refused = 0;
    for _ in 0..1100 {
        match rt.block_on(fleet::rpc::peer::dial(&addr, &me, None)) {
            Ok(client) => flood.push(client),
            Err(_) => refused += 1,
        }
    }
    let during = rss_kib(pid);
    eprintln!(
        "flood: {} connections held, {refused} refused; leader RSS {before} KiB before, {during} KiB during",
        flood.len()
    );
    // A new client is served at once: it takes the place of an idle flooding connection.
    let started = std::time::Instant::now();
    let status = fleet_json(&["cluster", "status", "--peers", &addr, "--retry-for", "10s"])
        .expect("a new client is served");
    assert_eq!(status["leader_id"], leader, "{status}");
    eprintln!("a new client was served in {:?}", started.elapsed());
    assert!(started.elapsed() < std::time::Duration::from_secs(3));
    // The cluster's own traffic: a worker gets a lease and reports, replicas replicate.
    let dir = c.dir.path().to_path_buf();
    let _w = TestWorker::start(&dir, "w", &addr, &config, &[]);
    let id = submit_task(&addr, &[], &["true".to_string()]);
    wait_for_state(&addr, id, "succeeded", std::time::Duration::from_secs(20));
    let after = rss_kib(pid);
    eprintln!("leader RSS after the flood was served: {after} KiB");
    drop(flood);
}

/// Whether `pid` runs (a zombie, killed but not yet reaped by whoever inherited it, does not).
fn running(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rfind(')')
            .and_then(|i| stat[i + 2..].split_whitespace().next())
            .is_some_and(|state| state != "Z"),
        Err(_) => false,
    }
}

/// A task that starts `setsid sleep 600 &` (a process outside its process group), writes that
/// process's pid to `file`, then runs `then`.
fn escaping_task(file: &std::path::Path, then: &str) -> Vec<String> {
    vec![
        "sh".into(),
        "-c".into(),
        format!("setsid sleep 600 & echo $! > {}; {then}", file.display()),
    ]
}

fn escaped_pid(file: &std::path::Path) -> i32 {
    wait_until(
        "the escaped pid",
        std::time::Duration::from_secs(20),
        || {
            std::fs::read_to_string(file)
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .ok_or_else(|| "no pid yet".to_string())
        },
    )
}

fn escaped_processes_end_with_their_attempt(containment: &str) {
    let (c, _config, peers) = start_fleet_with(1, 200, &format!("containment = \"{containment}\""));
    let dir = c.dir.path().to_path_buf();
    let config = dir.join("fleet.toml");
    let w = TestWorker::start(&dir, "w", &peers, &config, &[]);
    wait_until(
        "the worker to start",
        std::time::Duration::from_secs(20),
        || {
            let log = w.log_text();
            if log.contains(&format!("containment=\"{containment}\""))
                || log.contains(&format!("containment={containment}"))
            {
                Ok(())
            } else {
                Err(tail(&log, 10))
            }
        },
    );
    // The task ends soon; the process it left outside its group must end too. (The short
    // pause lets `setsid` leave the group before the task ends: otherwise the group kill at
    // the end of the attempt could catch it still inside, and this would not test escaping.)
    let f1 = dir.join("escaped-1");
    let id = submit_task(&peers, &[], &escaping_task(&f1, "sleep 0.3"));
    wait_for_state(&peers, id, "succeeded", std::time::Duration::from_secs(20));
    let pid = escaped_pid(&f1);
    wait_until(
        "the escaped process to end",
        std::time::Duration::from_secs(10),
        || {
            if running(pid) {
                Err(format!("pid {pid} still runs"))
            } else {
                Ok(())
            }
        },
    );
    // The task times out; both its own process and the escaped one end.
    let f2 = dir.join("escaped-2");
    let id = submit_task(
        &peers,
        &["--timeout", "1s", "--max-attempts", "1"],
        &escaping_task(&f2, "exec sleep 600"),
    );
    let pid = escaped_pid(&f2);
    wait_for_state(&peers, id, "dead", std::time::Duration::from_secs(20));
    wait_gone(pid, "the timed-out attempt's escaped process to end");
}

fn wait_gone(pid: i32, what: &str) {
    wait_until(what, std::time::Duration::from_secs(10), || {
        if running(pid) {
            Err(format!("pid {pid} still runs"))
        } else {
            Ok(())
        }
    });
}

#[test]
fn processes_that_escape_the_process_group_end_with_the_attempt_subreaper() {
    escaped_processes_end_with_their_attempt("subreaper");
}

#[test]
fn processes_that_escape_the_process_group_end_with_the_attempt_cgroup() {
    // Needs a writable cgroup v2 tree (root here; systemd's Delegate=yes in production).
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: creating cgroups needs root (or a delegated cgroup tree)");
        return;
    }
    escaped_processes_end_with_their_attempt("cgroup");
}
