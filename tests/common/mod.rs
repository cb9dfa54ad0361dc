//! Test harness: real `fleet` processes on loopback, driven through the real CLI.
//!
//! Nothing here sleeps to synchronize: [`wait_until`] polls a condition until a deadline and
//! fails with the last observation. Randomized choices come from one seed, printed at the start
//! and settable with `FLEET_TEST_SEED`.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use serde_json::Value;

pub fn fleet_bin() -> &'static str {
    env!("CARGO_BIN_EXE_fleet")
}

/// A seeded RNG; the seed is printed so a failure can be rerun with `FLEET_TEST_SEED=N`.
pub fn seeded_rng(test: &str) -> rand::rngs::StdRng {
    let seed: u64 = std::env::var("FLEET_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    eprintln!("{test}: seed={seed} (rerun with FLEET_TEST_SEED={seed})");
    rand::rngs::StdRng::seed_from_u64(seed)
}

#[path = "../../chaos/ports.rs"]
mod ports;
#[allow(unused_imports)] // each test binary uses some of them
pub use ports::{
    free_consecutive_ports, free_consecutive_ports_and, free_ports, listen_port_range,
};

/// Polls `check` until it returns `Ok`, or fails after `timeout` with the last error.
pub fn wait_until<T>(what: &str, timeout: Duration, check: impl FnMut() -> Result<T, String>) -> T {
    try_wait_until(what, timeout, check).unwrap_or_else(|e| panic!("{e}"))
}

/// [`wait_until`] that returns the timeout as an error, for a caller that adds to it.
pub fn try_wait_until<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<T, String>,
) -> Result<T, String> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(20);
    loop {
        match check() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => {
                return Err(format!(
                    "timed out after {timeout:?} waiting for {what}; last observation: {e}"
                ));
            }
            Err(_) => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(200));
            }
        }
    }
}

/// Runs the CLI and returns its output.
pub fn fleet(args: &[&str]) -> Output {
    Command::new(fleet_bin())
        .args(args)
        .env_remove("FLEET_PEERS")
        .env("RUST_LOG", "warn")
        .output()
        .expect("run fleet")
}

/// Runs the CLI with `--output json` and parses stdout, or returns stderr as the error.
pub fn fleet_json(args: &[&str]) -> Result<Value, String> {
    // Options go before a `--`: what follows it is the task's command.
    let split = args.iter().position(|a| *a == "--").unwrap_or(args.len());
    let mut all: Vec<&str> = args[..split].to_vec();
    all.extend(["--output", "json"]);
    all.extend(&args[split..]);
    let out = fleet(&all);
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("bad json: {e}: {}", String::from_utf8_lossy(&out.stdout)))
}

pub struct TestNode {
    pub id: u64,
    pub addr: String,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    pub args: Vec<String>,
    pub process: Proc,
    /// The `fleet` binary it runs ([`fleet_bin`] unless set: an upgrade test runs others).
    pub bin: PathBuf,
    starts: u32,
}

/// A child process the test owns: killed (SIGCONT first, in case it was stopped, then
/// SIGKILL) when dropped.
pub struct Proc {
    what: String,
    child: Option<Child>,
}

impl Proc {
    pub fn new(what: &str, child: Option<Child>) -> Proc {
        Proc {
            what: what.into(),
            child,
        }
    }

    /// The exit code once the process has exited (reaping it); `None` while it runs.
    pub fn exit_code(&mut self) -> Option<Option<i32>> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        Some(status.code())
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    /// SIGKILL, and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: signalling our own child process.
            unsafe { libc::kill(c.id() as i32, sig) };
        }
    }

    /// Waits for the process to exit on its own; its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let child = self.child.as_mut()?;
        let code = wait_until(&format!("{} to exit", self.what), timeout, || {
            match child.try_wait() {
                Ok(Some(status)) => Ok(status.code()),
                Ok(None) => Err("still running".into()),
                Err(e) => Err(e.to_string()),
            }
        });
        self.child = None;
        code
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.signal(libc::SIGCONT);
        self.kill9();
    }
}

impl TestNode {
    pub fn new(dir: &Path, id: u64, port: u16, args: Vec<String>) -> TestNode {
        TestNode {
            id,
            addr: format!("127.0.0.1:{port}"),
            data_dir: dir.join(format!("node-{id}")),
            log: dir.join(format!("node-{id}")),
            args,
            process: Proc::new(&format!("node {id}"), None),
            bin: PathBuf::from(fleet_bin()),
            starts: 0,
        }
    }

    /// Starts `fleet join` with this node's flags; each start logs to its own file.
    pub fn start(&mut self) {
        assert!(
            !self.process.is_running(),
            "node {} already running",
            self.id
        );
        self.starts += 1;
        let log_path = self.data_dir.with_extension(format!("{}.log", self.starts));
        let log = std::fs::File::create(&log_path).expect("log file");
        let child = Command::new(&self.bin)
            .arg("join")
            .args(["--node-id", &self.id.to_string(), "--listen", &self.addr])
            .args(["--http-listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(&self.args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start fleet join");
        self.log = log_path;
        self.process = Proc::new(&format!("node {}", self.id), Some(child));
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A set of nodes sharing one peer list.
pub struct TestCluster {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<TestNode>,
}

impl TestCluster {
    /// Prepares (does not start) `n` nodes that bootstrap together, with extra `join` flags.
    pub fn new(n: usize, extra: &[&str]) -> TestCluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let ports = free_ports(n);
        let peers: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let mut args = vec![
            "--peers".to_string(),
            peers.join(","),
            "--bootstrap-expect".into(),
            n.to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let nodes = (0..n)
            .map(|i| TestNode::new(dir.path(), i as u64 + 1, ports[i], args.clone()))
            .collect();
        TestCluster { dir, nodes }
    }

    pub fn peers(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.addr.clone())
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn node(&mut self, id: u64) -> &mut TestNode {
        self.nodes.iter_mut().find(|n| n.id == id).expect("node")
    }

    /// The addresses of every node but `id`, as a peer list.
    pub fn peers_except(&self, id: u64) -> String {
        self.nodes
            .iter()
            .filter(|n| n.id != id)
            .map(|n| n.addr.clone())
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn addr(&self, id: u64) -> String {
        self.nodes
            .iter()
            .find(|n| n.id == id)
            .expect("node")
            .addr
            .clone()
    }

    /// Waits until the cluster reports a leader and `voters` voters; returns the status.
    /// On a timeout it fails with every node's log, which says why (a node that could not
    /// bind its port, a node that never heard from the others).
    pub fn wait_for_leader(&self, peers: &str, voters: usize, timeout: Duration) -> Value {
        try_wait_until("a leader and all voters", timeout, || {
            let s = cluster_status(peers)?;
            let n = s["members"]
                .as_array()
                .map(|m| m.iter().filter(|m| m["voter"] == true).count())
                .unwrap_or(0);
            if s["leader_id"].is_u64() && s["leader_view"] == true && n == voters {
                Ok(s)
            } else {
                Err(format!("{s}"))
            }
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", self.logs()))
    }

    /// All logs, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for n in &self.nodes {
            out.push_str(&format!(
                "===== node {} ({}) =====\n{}\n",
                n.id,
                n.log.display(),
                tail(&n.log_text(), 40)
            ));
        }
        out
    }
}

pub fn tail(s: &str, lines: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

/// The ids `fleet task list ARGS --limit 10000` returns.
fn listed_ids(args: &[&str]) -> Result<Vec<u64>, String> {
    let mut all = vec!["task", "list", "--limit", "10000"];
    all.extend(args);
    let r = fleet_json(&all)?;
    Ok(r["value"]
        .as_array()
        .ok_or("no value")?
        .iter()
        .map(|t| t["id"].as_u64().unwrap())
        .collect())
}

/// The task ids a replica holds locally (a stale read from exactly that replica).
pub fn local_task_ids(addr: &str) -> Result<Vec<u64>, String> {
    listed_ids(&["--stale", "--peers", addr, "--retry-for", "2000ms"])
}

/// A JSON-lines file of `n` tasks.
pub fn task_file(dir: &Path, name: &str, n: usize) -> PathBuf {
    let path = dir.join(name);
    let lines: Vec<String> = (0..n)
        .map(|i| format!("{{\"command\": [\"echo\", \"{name}-{i}\"]}}"))
        .collect();
    std::fs::write(&path, lines.join("\n")).expect("write task file");
    path
}

/// Waits until the replica at `addr` holds exactly the tasks `expected` (a local read there).
pub fn wait_for_tasks(addr: &str, expected: &[u64], timeout: Duration) {
    wait_until(
        &format!(
            "tasks {}..={} on {addr}",
            expected.first().unwrap_or(&0),
            expected.last().unwrap_or(&0)
        ),
        timeout,
        || {
            let got = local_task_ids(addr)?;
            if got == expected {
                Ok(())
            } else {
                Err(format!("{} tasks", got.len()))
            }
        },
    );
}

/// A config file with scheduler and worker timing short enough for tests; every process of a
/// test reads the same file, as an operator's would.
pub fn test_config(dir: &Path, extra: &str) -> PathBuf {
    test_config_with_grace(dir, 5000, extra)
}

/// [`test_config`] with another `scheduler.failover_grace_ms`.
pub fn test_config_with_grace(dir: &Path, grace_ms: u64, extra: &str) -> PathBuf {
    let path = dir.join("fleet.toml");
    let text = format!(
        "[scheduler]\nworker_liveness_timeout_ms = 3000\nfailover_grace_ms = {grace_ms}\n\n\
         [worker]\nheartbeat_interval_ms = 300\nkill_grace_ms = 1000\npoll_wait_ms = 5000\n\
         drain_timeout_ms = 30000\n{extra}\n"
    );
    std::fs::write(&path, text).expect("write config");
    path
}

/// Nodes and workers are processes: `kill9`, `signal` and `wait_exit` come from [`Proc`].
macro_rules! is_a_process {
    ($($t:ty),*) => {$(
        impl std::ops::Deref for $t {
            type Target = Proc;
            fn deref(&self) -> &Proc {
                &self.process
            }
        }
        impl std::ops::DerefMut for $t {
            fn deref_mut(&mut self) -> &mut Proc {
                &mut self.process
            }
        }
    )*};
}
is_a_process!(TestNode, TestWorker);

/// A `fleet worker` process.
pub struct TestWorker {
    pub name: String,
    pub log: PathBuf,
    pub process: Proc,
}

impl TestWorker {
    pub fn start(dir: &Path, name: &str, peers: &str, config: &Path, extra: &[&str]) -> TestWorker {
        Self::start_bin(Path::new(fleet_bin()), dir, name, peers, config, extra)
    }

    /// [`TestWorker::start`] running the `fleet` binary at `bin`.
    pub fn start_bin(
        bin: &Path,
        dir: &Path,
        name: &str,
        peers: &str,
        config: &Path,
        extra: &[&str],
    ) -> TestWorker {
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("worker log");
        let child = Command::new(bin)
            .args(["worker", "--peers", peers, "--name", name])
            .arg("--config")
            .arg(config)
            .args(extra)
            .env("RUST_LOG", "info")
            .env_remove("FLEET_PEERS")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("start fleet worker");
        TestWorker {
            name: name.into(),
            log,
            process: Proc::new(&format!("worker {name}"), Some(child)),
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A cluster of `n` replicas reading one test config (with `grace_ms` of failover grace),
/// started, with a leader elected. Returns the cluster, the config path and the peer list.
pub fn start_fleet(n: usize, grace_ms: u64) -> (TestCluster, PathBuf, String) {
    start_fleet_with(n, grace_ms, "")
}

/// [`start_fleet`] with `extra` appended to the config file (more TOML sections).
pub fn start_fleet_with(n: usize, grace_ms: u64, extra: &str) -> (TestCluster, PathBuf, String) {
    let mut c = TestCluster::new(n, &[]);
    let config = test_config_with_grace(c.dir.path(), grace_ms, extra);
    for node in &mut c.nodes {
        node.args
            .extend(["--config".to_string(), config.display().to_string()]);
        node.start();
    }
    let peers = c.peers();
    c.wait_for_leader(&peers, n, Duration::from_secs(30));
    (c, config, peers)
}

/// Waits until task `id` is in `state`; the task.
pub fn wait_for_state(peers: &str, id: u64, state: &str, timeout: Duration) -> Value {
    wait_until(&format!("task {id} to be {state}"), timeout, || {
        let t = show_task(peers, id)?;
        if t["state"] == state {
            Ok(t)
        } else {
            Err(t.to_string())
        }
    })
}

/// Submits one task with `opts` running `cmd`; its id.
pub fn submit_task(peers: &str, opts: &[&str], cmd: &[String]) -> u64 {
    let mut args = vec!["submit", "--peers", peers];
    args.extend(opts);
    args.push("--");
    args.extend(cmd.iter().map(String::as_str));
    fleet_json(&args).unwrap()["id"].as_u64().unwrap()
}

/// Submits every task of a `submit --file` file; checks that `n` were accepted.
pub fn submit_file(peers: &str, file: &Path, n: usize) {
    let out = fleet_json(&["submit", "--file", file.to_str().unwrap(), "--peers", peers]).unwrap();
    assert_eq!(out.as_array().unwrap().len(), n, "{out}");
}

/// Runs `fleet ARGS` expecting a failure whose message contains `needle`, without a panic.
pub fn assert_fails_naming(args: &[&str], needle: &str) {
    let out = fleet(args);
    assert!(!out.status.success(), "{args:?} succeeded");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(needle),
        "{args:?}: expected {needle:?} in: {err}"
    );
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
}

/// A task command that appends `TASK ATTEMPT TOKEN WORKER PID` to `file`, then runs `then`
/// (shell code; may use $FLEET_ATTEMPT).
pub fn marker_command(file: &Path, then: &str) -> Vec<String> {
    vec![
        "sh".into(),
        "-c".into(),
        format!(
            "echo \"$FLEET_TASK_ID $FLEET_ATTEMPT $FLEET_FENCING_TOKEN $FLEET_WORKER $$\" >> {}; {then}",
            file.display()
        ),
    ]
}

/// One line of a marker file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mark {
    pub task: u64,
    pub attempt: u32,
    pub token: u64,
    pub worker: String,
    pub pid: i32,
}

pub fn read_marks(file: &Path) -> Vec<Mark> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() != 5 {
                return None;
            }
            Some(Mark {
                task: f[0].parse().ok()?,
                attempt: f[1].parse().ok()?,
                token: f[2].parse().ok()?,
                worker: f[3].to_string(),
                pid: f[4].parse().ok()?,
            })
        })
        .collect()
}

/// `fleet task show ID` (linearizable), the task object.
pub fn show_task(peers: &str, id: u64) -> Result<Value, String> {
    let r = fleet_json(&["task", "show", &id.to_string(), "--peers", peers])?;
    Ok(r["value"].clone())
}

/// Ids of tasks in `state` (linearizable).
pub fn task_ids_in(peers: &str, state: &str) -> Result<Vec<u64>, String> {
    listed_ids(&["--state", state, "--peers", peers])
}

/// Whether a process exists.
pub fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    unsafe { libc::kill(pid, 0) == 0 }
}

/// Waits until process `pid` is gone (`what` names the wait in the failure).
pub fn wait_dead(pid: i32, what: &str, timeout: Duration) {
    wait_until(what, timeout, || {
        if alive(pid) {
            Err(format!("pid {pid} still runs"))
        } else {
            Ok(())
        }
    });
}

/// Writes `n` tasks running `command(i)` as a `submit --file` file.
pub fn command_file(
    dir: &Path,
    name: &str,
    n: usize,
    command: impl Fn(usize) -> Vec<String>,
) -> PathBuf {
    let path = dir.join(name);
    let lines: Vec<String> = (0..n)
        .map(|i| serde_json::json!({ "command": command(i) }).to_string())
        .collect();
    std::fs::write(&path, lines.join("\n")).expect("write task file");
    path
}

/// `GET path` from an HTTP endpoint, over a plain socket: the status code and the JSON body.
pub fn http_get(addr: &str, path: &str) -> Result<(u16, Value), String> {
    let (code, body) = http_get_text(addr, path)?;
    let json = serde_json::from_str(&body).map_err(|e| format!("bad json ({e}): {body}"))?;
    Ok((code, json))
}

/// `GET path` from an HTTP endpoint, over a plain socket: the status code and the body.
/// HTTP/1.0, so the server sends the body plainly (no chunked encoding) and closes.
pub fn http_get_text(addr: &str, path: &str) -> Result<(u16, String), String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).map_err(|e| format!("{addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(|e| e.to_string())?;
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no status line in {text:?}"))?;
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Ok((code, body.to_string()))
}

/// `fleet health --peers ADDR --output json` for one replica: its exit code and its report.
pub fn health_of(addr: &str) -> (i32, Value) {
    let out = fleet(&["health", "--peers", addr, "--output", "json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (
        out.status.code().unwrap_or(-1),
        v["replicas"][0]["report"].clone(),
    )
}

/// `fleet cluster status` (the leader's view when one is reachable), waiting at most 2 s.
pub fn cluster_status(peers: &str) -> Result<Value, String> {
    fleet_json(&[
        "cluster",
        "status",
        "--peers",
        peers,
        "--retry-for",
        "2000ms",
    ])
}

/// The leader as the replicas at `peers` see it (the leader's own view).
pub fn leader_of(peers: &str) -> Result<u64, String> {
    let s = cluster_status(peers)?;
    match (s["leader_view"].as_bool(), s["leader_id"].as_u64()) {
        (Some(true), Some(l)) => Ok(l),
        _ => Err(s.to_string()),
    }
}

/// `fleet fault stall --component COMPONENT --for DURATION --peers ADDR`; fails the test if
/// the replica refuses.
pub fn inject_stall(addr: &str, component: &str, duration: &str) {
    let out = fleet(&[
        "fault",
        "stall",
        "--component",
        component,
        "--for",
        duration,
        "--peers",
        addr,
    ]);
    assert!(out.status.success(), "fault stall refused: {out:?}");
}

/// A task fenced because its worker froze: worker `a` (1 slot) starts `cmd` (which must hang
/// on attempt 1 and mark `marks`, see [`marker_command`]), is frozen with SIGSTOP, the lease
/// expires (2 s visibility timeout), worker `b` runs the retry to success, and `a` is resumed.
/// Returns both workers, the task id, the task as it ended and attempt 1's mark.
pub fn fenced_while_frozen(
    dir: &Path,
    peers: &str,
    config: &Path,
    marks: &Path,
    cmd: &[String],
) -> (TestWorker, TestWorker, u64, Value, Mark) {
    let a = TestWorker::start(dir, "a", peers, config, &["--concurrency", "1"]);
    let id = submit_task(
        peers,
        &["--visibility-timeout", "2s", "--backoff-initial", "200ms"],
        cmd,
    );
    let first = wait_until("the task to start on a", Duration::from_secs(20), || {
        read_marks(marks)
            .first()
            .cloned()
            .ok_or_else(|| "no mark".to_string())
    });
    a.signal(libc::SIGSTOP);
    let b = TestWorker::start(dir, "b", peers, config, &["--concurrency", "1"]);
    let t = wait_for_state(peers, id, "succeeded", Duration::from_secs(30));
    let reason = t["attempts"][0]["outcome"]["lost"]["reason"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(reason.contains("visibility timeout"), "{t}");
    assert!(
        alive(first.pid),
        "the frozen worker's attempt still runs (only the worker was stopped)"
    );
    a.signal(libc::SIGCONT);
    (a, b, id, t, first)
}

/// A time (ms since the epoch) as RFC 3339 in UTC, whole seconds, by `date` (not by fleet's own
/// code, which the tests check).
pub fn rfc3339(ms: u64) -> String {
    let out = Command::new("date")
        .args([
            "-u",
            "-d",
            &format!("@{}", ms / 1000),
            "+%Y-%m-%dT%H:%M:%SZ",
        ])
        .output()
        .expect("date");
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .trim()
        .to_string()
}

/// Waits until the cluster at `peers` has `n` voters; its status.
pub fn wait_for_voters(peers: &str, n: usize, timeout: Duration) -> Value {
    wait_until(&format!("{n} voters"), timeout, || {
        let s = cluster_status(peers)?;
        let voters = s["members"]
            .as_array()
            .map_or(0, |m| m.iter().filter(|m| m["voter"] == true).count());
        if voters == n {
            Ok(s)
        } else {
            Err(s.to_string())
        }
    })
}

/// Starts `ports.len()` new replicas (ids from `first_id`, data under `dir`) that join the
/// cluster at `peers` with `config`; returns them started.
pub fn join_new_nodes(
    dir: &Path,
    first_id: u64,
    ports: &[u16],
    config: &Path,
    peers: &str,
) -> Vec<TestNode> {
    let mut nodes: Vec<TestNode> = ports
        .iter()
        .enumerate()
        .map(|(i, p)| {
            TestNode::new(
                dir,
                first_id + i as u64,
                *p,
                vec![
                    "--config".into(),
                    config.display().to_string(),
                    "--peers".into(),
                    peers.to_string(),
                ],
            )
        })
        .collect();
    for n in &mut nodes {
        n.start();
    }
    nodes
}

/// The lines `child` writes to its (piped) standard output, as they come.
pub fn stdout_lines(child: &mut Child) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let out = child.stdout.take().expect("stdout piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out)
            .split(b'\n')
            .map_while(Result::ok)
        {
            if tx
                .send(String::from_utf8_lossy(&line).into_owned())
                .is_err()
            {
                return;
            }
        }
    });
    rx
}
