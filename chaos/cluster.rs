//! The fleet under test: real `fleet join` and `fleet worker` processes, each replica behind
//! its proxy, each with its own data directory and log file under the run's output folder.
//!
//! Signals are real: `kill` is SIGKILL, `stop`/`cont` are SIGSTOP/SIGCONT, `terminate` is
//! SIGTERM (a replica hands over leadership, a worker drains). Dropping the [`Cluster`] kills
//! every process it started (SIGCONT first, in case one is stopped).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::proxy::Net;

/// Where one replica listens and what it advertises.
pub struct Replica {
    pub id: u64,
    /// Its own listener (only the harness's observer dials it directly).
    pub real: String,
    /// Its proxy, which it advertises: what every other process dials.
    pub front: String,
    pub data_dir: PathBuf,
    pub join_peers: String,
    pub bootstrap_expect: Option<usize>,
    pub process: Option<Child>,
    pub starts: u32,
    pub stopped: bool,
    /// False once it left the cluster (membership scenario).
    pub member: bool,
}

pub struct Worker {
    pub name: String,
    pub process: Option<Child>,
    pub starts: u32,
    pub stopped: bool,
    /// Attempt process groups frozen with the worker (stop-worker).
    pub frozen_groups: Vec<i32>,
}

pub struct Cluster {
    pub dir: PathBuf,
    pub fleet: PathBuf,
    pub config: PathBuf,
    pub net: Net,
    pub replicas: BTreeMap<u64, Replica>,
    pub workers: Vec<Worker>,
    pub worker_concurrency: u32,
}

/// Timing for the run's processes: short enough that a fault's effects show within seconds,
/// the same file for every process (as an operator's would be).
pub const CONFIG: &str = "\
# Written by the chaos harness for every process of the run.
[scheduler]
worker_liveness_timeout_ms = 3000
failover_grace_ms = 3000

[worker]
heartbeat_interval_ms = 300
kill_grace_ms = 1000
poll_wait_ms = 5000
drain_timeout_ms = 20000

[fault_injection]
enabled = true
";

/// The visibility timeout of the workload's tasks.
pub const VISIBILITY_TIMEOUT_MS: u64 = 3000;

fn signal(pid: i32, sig: i32) {
    // SAFETY: signals a process (or group) this harness started.
    unsafe {
        libc::kill(pid, sig);
    }
}

impl Cluster {
    /// Prepares `replicas` replicas (proxies started, processes not yet) in `dir`.
    pub async fn new(
        dir: &Path,
        fleet: PathBuf,
        replicas: usize,
        worker_concurrency: u32,
    ) -> anyhow::Result<Cluster> {
        std::fs::create_dir_all(dir.join("logs"))?;
        let config = dir.join("fleet.toml");
        std::fs::write(&config, CONFIG)?;
        let mut c = Cluster {
            dir: dir.to_path_buf(),
            fleet,
            config,
            net: Net::new(),
            replicas: BTreeMap::new(),
            workers: Vec::new(),
            worker_concurrency,
        };
        for id in 1..=replicas as u64 {
            c.add_replica(id, None, Some(replicas)).await?;
        }
        let fronts = c.fronts().join(",");
        for r in c.replicas.values_mut() {
            r.join_peers = fronts.clone();
        }
        Ok(c)
    }

    /// Registers replica `id` with its proxy; `peers` overrides the join peer list (a node
    /// joining a running cluster).
    pub async fn add_replica(
        &mut self,
        id: u64,
        peers: Option<String>,
        bootstrap_expect: Option<usize>,
    ) -> anyhow::Result<()> {
        let real = format!("127.0.0.1:{}", crate::ports::free_ports(1)[0]);
        let front = self.net.front(id, real.clone()).await?;
        self.replicas.insert(
            id,
            Replica {
                id,
                real,
                front,
                data_dir: self.dir.join(format!("node-{id}")),
                join_peers: peers.unwrap_or_default(),
                bootstrap_expect,
                process: None,
                starts: 0,
                stopped: false,
                member: true,
            },
        );
        Ok(())
    }

    /// The proxy addresses of the current members (what workers and clients dial).
    pub fn fronts(&self) -> Vec<String> {
        self.replicas
            .values()
            .filter(|r| r.member)
            .map(|r| r.front.clone())
            .collect()
    }

    /// Running (not stopped) member ids and their real addresses.
    pub fn running(&self) -> Vec<(u64, String)> {
        self.replicas
            .values()
            .filter(|r| r.member && r.process.is_some() && !r.stopped)
            .map(|r| (r.id, r.real.clone()))
            .collect()
    }

    pub fn start_replica(&mut self, id: u64) -> anyhow::Result<()> {
        let r = self.replicas.get_mut(&id).context("no such replica")?;
        anyhow::ensure!(r.process.is_none(), "replica {id} already runs");
        r.starts += 1;
        let log = self.dir.join(format!("logs/node-{id}.{}.log", r.starts));
        let mut cmd = Command::new(&self.fleet);
        cmd.arg("join")
            .args(["--node-id", &id.to_string()])
            .args(["--listen", &r.real, "--advertise", &r.front])
            .args(["--http-listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(&r.data_dir)
            .arg("--config")
            .arg(&self.config)
            .args(["--peers", &r.join_peers]);
        if let Some(n) = r.bootstrap_expect {
            cmd.args(["--bootstrap-expect", &n.to_string()]);
        }
        r.process = Some(spawn_logged(&mut cmd, &log)?);
        r.stopped = false;
        Ok(())
    }

    pub fn pid_of_replica(&self, id: u64) -> Option<i32> {
        self.replicas
            .get(&id)?
            .process
            .as_ref()
            .map(|c| c.id() as i32)
    }

    /// SIGKILL, and reap.
    pub fn kill_replica(&mut self, id: u64) {
        if let Some(r) = self.replicas.get_mut(&id) {
            if let Some(mut c) = r.process.take() {
                signal(c.id() as i32, libc::SIGCONT);
                let _ = c.kill();
                let _ = c.wait();
            }
            r.stopped = false;
        }
    }

    pub fn stop_replica(&mut self, id: u64) {
        if let Some(pid) = self.pid_of_replica(id) {
            signal(pid, libc::SIGSTOP);
            self.replicas.get_mut(&id).expect("replica").stopped = true;
        }
    }

    pub fn cont_replica(&mut self, id: u64) {
        if let Some(pid) = self.pid_of_replica(id) {
            signal(pid, libc::SIGCONT);
            self.replicas.get_mut(&id).expect("replica").stopped = false;
        }
    }

    /// SIGTERM, then waits up to `timeout` for the process to exit (SIGKILL after that).
    /// Returns whether it exited by itself.
    pub async fn terminate_replica(&mut self, id: u64, timeout: Duration) -> bool {
        let Some(r) = self.replicas.get_mut(&id) else {
            return true;
        };
        let Some(c) = r.process.as_mut() else {
            return true;
        };
        signal(c.id() as i32, libc::SIGTERM);
        let clean = wait_exit(c, timeout).await;
        if !clean {
            let _ = c.kill();
            let _ = c.wait();
        }
        r.process = None;
        clean
    }

    /// Waits for a replica that was asked to leave to exit by itself.
    pub async fn wait_replica_exit(&mut self, id: u64, timeout: Duration) -> bool {
        let Some(c) = self.replicas.get_mut(&id).and_then(|r| r.process.as_mut()) else {
            return true;
        };
        let clean = wait_exit(c, timeout).await;
        if clean {
            self.replicas.get_mut(&id).expect("replica").process = None;
        }
        clean
    }

    pub fn start_worker(&mut self, index: usize) -> anyhow::Result<()> {
        let peers = self.fronts().join(",");
        let w = &mut self.workers[index];
        anyhow::ensure!(w.process.is_none(), "worker {} already runs", w.name);
        w.starts += 1;
        let log = self.dir.join(format!("logs/{}.{}.log", w.name, w.starts));
        let mut cmd = Command::new(&self.fleet);
        cmd.args(["worker", "--peers", &peers, "--name", &w.name])
            .args(["--concurrency", &self.worker_concurrency.to_string()])
            .arg("--config")
            .arg(&self.config);
        w.process = Some(spawn_logged(&mut cmd, &log)?);
        w.stopped = false;
        Ok(())
    }

    pub fn add_worker(&mut self) -> anyhow::Result<usize> {
        let name = format!("w{}", self.workers.len() + 1);
        self.workers.push(Worker {
            name,
            process: None,
            starts: 0,
            stopped: false,
            frozen_groups: Vec::new(),
        });
        let i = self.workers.len() - 1;
        self.start_worker(i)?;
        Ok(i)
    }

    /// SIGKILL; its attempts die with it (the worker sets PR_SET_PDEATHSIG on them).
    pub fn kill_worker(&mut self, index: usize) {
        let w = &mut self.workers[index];
        if let Some(mut c) = w.process.take() {
            signal(c.id() as i32, libc::SIGCONT);
            let _ = c.kill();
            let _ = c.wait();
        }
        for g in w.frozen_groups.drain(..) {
            signal(-g, libc::SIGCONT);
        }
        w.stopped = false;
    }

    /// SIGSTOP to the worker and to each of its attempts' process groups: the whole machine
    /// pauses (a VM or container freeze), so no attempt finishes unobserved meanwhile.
    pub fn stop_worker(&mut self, index: usize) {
        let w = &mut self.workers[index];
        let Some(c) = &w.process else { return };
        let pid = c.id() as i32;
        signal(pid, libc::SIGSTOP);
        w.frozen_groups = children_of(pid);
        for g in &w.frozen_groups {
            // Each attempt leads its own process group.
            signal(-g, libc::SIGSTOP);
        }
        w.stopped = true;
    }

    /// SIGCONT to the worker first, then its attempts.
    pub fn cont_worker(&mut self, index: usize) {
        let w = &mut self.workers[index];
        if let Some(c) = &w.process {
            signal(c.id() as i32, libc::SIGCONT);
        }
        for g in w.frozen_groups.drain(..) {
            signal(-g, libc::SIGCONT);
        }
        w.stopped = false;
    }

    pub fn running_workers(&self) -> usize {
        self.workers.iter().filter(|w| w.process.is_some()).count()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for r in self.replicas.values_mut() {
            if let Some(mut c) = r.process.take() {
                signal(c.id() as i32, libc::SIGCONT);
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        for i in 0..self.workers.len() {
            self.kill_worker(i);
        }
    }
}

/// Starts a fleet process with its stderr (its log, at info level) in `log`.
fn spawn_logged(cmd: &mut Command, log: &Path) -> anyhow::Result<Child> {
    cmd.env("RUST_LOG", "info")
        .env_remove("FLEET_PEERS")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log)?)
        .spawn()
        .with_context(|| format!("starting {:?}", cmd.get_program()))
}

/// Polls the child until it exits or `timeout` passes.
async fn wait_exit(c: &mut Child, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(_)) = c.try_wait() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The direct children of `pid` (every thread's), from /proc.
fn children_of(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
            out.extend(s.split_whitespace().filter_map(|p| p.parse::<i32>().ok()));
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}
