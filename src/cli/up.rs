//! `fleet up`: a whole local fleet in one command, for trying fleet out.
//!
//! Starts the replicas (one process each, own data directory, loopback ports) and the workers,
//! all as child processes in their own process groups (so Ctrl-C reaches only `fleet up`, which
//! then stops them in order: workers drain first, then replicas hand over and stop). Runs a
//! demo batch with a progress bar, then supervises: a replica or worker that exits (`kill -9`,
//! a crash) is reported with what the fleet still runs on and restarted after a back-off, so
//! the fleet keeps running tasks meanwhile and the replica catches up when it is back. Ctrl-C,
//! SIGTERM (`fleet down`) and SIGHUP (the terminal closed) stop everything; children also get
//! SIGTERM if `fleet up` itself dies (`PR_SET_PDEATHSIG`). One `fleet up` per data directory
//! (a lock file naming its pid); run again, it reuses the data directories.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::Args;

use super::submit::POLL_EVERY;
use crate::client::Client;
use crate::pidlock::{LockError, PidLock};
use crate::rpc::{NewTask, ReadMode, SubmitTask};
use crate::state::{RequestId, TaskFilter, TaskId, TaskState};

#[derive(Args, Debug)]
pub struct UpArgs {
    /// Number of replicas (1 gives a single-node fleet).
    #[arg(long, default_value_t = 3)]
    pub replicas: usize,
    /// Number of workers.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Port of the first replica; the others use the following ports. Their HTTP endpoints
    /// (/health) use the ports 100 above.
    #[arg(long, default_value_t = 7101)]
    pub base_port: u16,
    /// Where the replicas keep their data and every process its log.
    #[arg(long, default_value = "fleet-data")]
    pub data_dir: PathBuf,
    /// Tasks in the demo batch (0: no demo).
    #[arg(long, default_value_t = 20)]
    pub demo_tasks: usize,
}

/// `println!` that never panics: `fleet up` keeps running (and stops its children in order)
/// even when its terminal or pipe went away.
macro_rules! say {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}

#[derive(Args, Debug)]
pub struct DownArgs {
    /// The data directory of the `fleet up` to stop.
    #[arg(long, default_value = "fleet-data")]
    pub data_dir: PathBuf,
    /// How long to wait for it to stop (workers drain, replicas hand over), e.g. `60s`.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = super::submit::parse_duration_ms)]
    pub timeout: u64,
}

/// The first restart of an exited process waits this long; each further exit within
/// [`STABLE_AFTER`] of its start doubles it, up to [`RESTART_BACKOFF_MAX`].
const RESTART_BACKOFF_INITIAL: Duration = Duration::from_secs(3);
const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(60);
/// A process that ran this long before exiting starts the back-off afresh.
const STABLE_AFTER: Duration = Duration::from_secs(30);
/// How often `fleet up` looks at its children.
const SUPERVISE_EVERY: Duration = Duration::from_millis(200);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Replica,
    Worker,
}

/// One process `fleet up` runs and restarts.
struct Member {
    kind: Kind,
    name: String,
    args: Vec<String>,
    log: PathBuf,
    process: Option<tokio::process::Child>,
    started: Instant,
    /// Exits in a row, each within [`STABLE_AFTER`] of its start.
    quick_exits: u32,
    restart_at: Option<Instant>,
}

impl Member {
    fn new(kind: Kind, name: String, args: Vec<String>, log: PathBuf) -> Member {
        Member {
            kind,
            name,
            args,
            log,
            process: None,
            started: Instant::now(),
            quick_exits: 0,
            restart_at: None,
        }
    }

    fn start(&mut self, exe: &Path) -> anyhow::Result<u32> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("cannot open {}", self.log.display()))?;
        let mut cmd = tokio::process::Command::new(exe);
        cmd.args(&self.args)
            .stdout(file.try_clone()?)
            .stderr(file)
            .stdin(std::process::Stdio::null())
            // Own process group: Ctrl-C and a closed terminal reach `fleet up` only, which then
            // stops its children in order.
            .process_group(0)
            .kill_on_drop(true);
        let parent = std::process::id();
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // If `fleet up` dies without stopping its children (kill -9), they get SIGTERM
                // and stop as on Ctrl-C instead of living on with nobody to stop them. Set on
                // the main thread, which lives as long as `fleet up`.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                if libc::getppid() != parent as i32 {
                    libc::raise(libc::SIGTERM);
                }
                Ok(())
            });
        }
        let process = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", self.name))?;
        let pid = process.id().unwrap_or(0);
        self.process = Some(process);
        self.started = Instant::now();
        self.restart_at = None;
        Ok(pid)
    }

    fn running(&self) -> bool {
        self.process.is_some()
    }

    fn signal(&self, sig: i32) {
        if let Some(pid) = self.process.as_ref().and_then(|p| p.id()) {
            // SAFETY: sends a signal to our own child process.
            unsafe { libc::kill(pid as i32, sig) };
        }
    }

    /// The exit status if the process has exited since the last look.
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.process.as_mut()?.try_wait().ok()??;
        self.process = None;
        Some(status)
    }

    /// Schedules the restart after an exit and says how long it waits.
    fn schedule_restart(&mut self) -> Duration {
        if self.started.elapsed() < STABLE_AFTER {
            self.quick_exits += 1;
        } else {
            self.quick_exits = 1;
        }
        let backoff = RESTART_BACKOFF_INITIAL
            .saturating_mul(1 << (self.quick_exits - 1).min(5))
            .min(RESTART_BACKOFF_MAX);
        self.restart_at = Some(Instant::now() + backoff);
        backoff
    }

    /// Waits (bounded) for the process to exit; true when it did.
    async fn wait(&mut self, within: Duration) -> bool {
        match self.process.as_mut() {
            Some(p) => tokio::time::timeout(within, p.wait()).await.is_ok(),
            None => true,
        }
    }

    fn log_tail(&self, lines: usize) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(lines).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }
}

/// `config` is what the children read too (the same file, `config_file`, passed on as
/// `--config`, and the same `FLEET__*` environment): the cluster name and auth token come
/// from it.
pub async fn up(
    config: &crate::config::Config,
    config_file: Option<&Path>,
    args: UpArgs,
) -> anyhow::Result<()> {
    validate(&args)?;
    let exe = std::env::current_exe()?;
    // The children start in their own directory: an absolute path.
    let config_args: Vec<String> = match config_file {
        Some(f) => vec![
            "--config".into(),
            f.canonicalize()
                .with_context(|| format!("--config {}", f.display()))?
                .display()
                .to_string(),
        ],
        None => Vec::new(),
    };
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("cannot create {}", args.data_dir.display()))?;
    let dir = args.data_dir.canonicalize()?;
    // One `fleet up` per data directory: a second one says at once who runs it.
    let _lock = PidLock::acquire(&dir.join(UP_LOCK)).map_err(|e| match e {
        LockError::Held { pid, .. } => anyhow::anyhow!(
            "fleet up is already running on {} (pid {pid}); stop it with Ctrl-C in its \
             terminal, or with `fleet down --data-dir {}`",
            dir.display(),
            dir.display()
        ),
        other => other.into(),
    })?;
    // Ctrl-C, SIGTERM (`fleet down`) and SIGHUP (the terminal closed) all stop the fleet.
    let mut stop = Signals::new()?;
    let addrs: Vec<String> = (0..args.replicas)
        .map(|i| format!("127.0.0.1:{}", args.base_port as usize + i))
        .collect();
    let peers = addrs.join(",");
    let mut replicas = replica_members(&args, &addrs, &dir);
    for r in &mut replicas {
        r.args.extend(config_args.iter().cloned());
    }
    for (i, r) in replicas.iter_mut().enumerate() {
        let pid = r.start(&exe)?;
        say!(
            "{}  pid {pid}  {}  http://{}/health  log {}",
            r.name,
            addrs[i],
            http_addr(args.base_port, i),
            r.log.display()
        );
    }
    let mut client = Client::new(
        addrs.clone(),
        &config.node.cluster_name,
        Duration::from_secs(30),
    )?
    .with_auth_token(&config.node.auth_token);
    tokio::select! {
        r = wait_for_leader(&mut client, &mut replicas) => r?,
        _ = stop.recv() => {
            say!("\nstopping before the cluster was ready");
            stop_all(&mut [], &mut replicas).await;
            return Ok(());
        }
    }
    let mut workers: Vec<Member> = (1..=args.workers)
        .map(|i| {
            let a: Vec<String> = vec![
                "worker".into(),
                "--peers".into(),
                peers.clone(),
                "--name".into(),
                format!("worker-{i}"),
            ]
            .into_iter()
            .chain(config_args.iter().cloned())
            .collect();
            Member::new(
                Kind::Worker,
                format!("worker-{i}"),
                a,
                dir.join(format!("worker-{i}.log")),
            )
        })
        .collect();
    for w in &mut workers {
        let pid = w.start(&exe)?;
        say!("{}  pid {pid}  log {}", w.name, w.log.display());
    }
    let hints = Hints {
        exe: exe.clone(),
        peers: peers.clone(),
        metrics: http_addr(args.base_port, 0),
        dir: dir.clone(),
    };
    let demo_tasks = args.demo_tasks;
    tokio::spawn(async move {
        if demo_tasks > 0 {
            if let Err(e) = run_demo(&mut client, demo_tasks).await {
                say!("\ndemo batch: {e:#}");
            }
        }
        hints.print();
    });
    loop {
        tokio::select! {
            why = stop.recv() => {
                say!("\n{why}: stopping; workers drain, then replicas stop");
                break;
            }
            _ = tokio::time::sleep(SUPERVISE_EVERY) => {}
        }
        supervise(&exe, &mut replicas, &mut workers);
    }
    stop_all(&mut workers, &mut replicas).await;
    Ok(())
}

fn validate(args: &UpArgs) -> anyhow::Result<()> {
    if !(1..=9).contains(&args.replicas) {
        bail!("--replicas {} is not valid: use 1 to 9", args.replicas);
    }
    if args.workers > 64 {
        bail!("--workers {} is not valid: use 0 to 64", args.workers);
    }
    if args.demo_tasks > 10_000 {
        bail!(
            "--demo-tasks {} is not valid: use 0 to 10000",
            args.demo_tasks
        );
    }
    if args.base_port as usize + HTTP_PORT_OFFSET + args.replicas > 65_535 {
        bail!(
            "--base-port {} leaves no room for {} replicas and their HTTP ports (100 above)",
            args.base_port,
            args.replicas
        );
    }
    Ok(())
}

fn replica_members(args: &UpArgs, addrs: &[String], dir: &Path) -> Vec<Member> {
    let peers = addrs.join(",");
    addrs
        .iter()
        .enumerate()
        .map(|(i, addr)| {
            let id = i + 1;
            let a: Vec<String> = vec![
                "join".into(),
                "--node-id".into(),
                id.to_string(),
                "--listen".into(),
                addr.clone(),
                "--http-listen".into(),
                http_addr(args.base_port, i),
                "--peers".into(),
                peers.clone(),
                "--bootstrap-expect".into(),
                args.replicas.to_string(),
                "--data-dir".into(),
                dir.join(format!("node-{id}")).display().to_string(),
            ];
            Member::new(
                Kind::Replica,
                format!("replica {id}"),
                a,
                dir.join(format!("node-{id}.log")),
            )
        })
        .collect()
}

/// Waits (bounded) for the first leader. A replica that exits meanwhile (a port taken, its data
/// directory in use, a bad config) will never vote: that is an error at once, with its log's
/// last lines, instead of a wait for an election that cannot happen.
async fn wait_for_leader(client: &mut Client, replicas: &mut [Member]) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let status = client
            .call(|c, ctx| async move { c.cluster_status(ctx, 0).await })
            .await;
        // After the status call too: a majority can elect a leader (in about half a second)
        // before the look at the children that preceded it could see one that failed to start.
        for r in replicas.iter_mut() {
            if let Some(status) = r.exited() {
                bail!(
                    "{} exited at start ({status}); the end of {}:\n{}",
                    r.name,
                    r.log.display(),
                    r.log_tail(5)
                );
            }
        }
        match status {
            Ok(s) if s.leader_id.is_some() => {
                say!(
                    "cluster ready in {:.1}s: leader is node {}",
                    started.elapsed().as_secs_f64(),
                    s.leader_id.unwrap_or(0)
                );
                return Ok(());
            }
            Ok(_) if started.elapsed() > Duration::from_secs(20) => {
                say!("cluster started; the leader election is still under way");
                return Ok(());
            }
            Err(e) if started.elapsed() > Duration::from_secs(20) => {
                say!("cluster did not answer yet: {e}");
                return Ok(());
            }
            _ => {}
        }
        // Pacing the status reads.
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// One look at the children: reports exits, schedules and performs restarts.
fn supervise(exe: &Path, replicas: &mut [Member], workers: &mut [Member]) {
    let total = replicas.len();
    for i in 0..total {
        if let Some(status) = replicas[i].exited() {
            let wait = replicas[i].schedule_restart();
            let up = replicas.iter().filter(|r| r.running()).count();
            let quorum = total / 2 + 1;
            let state = if up >= quorum {
                format!("the fleet runs on {up} of {total} replicas")
            } else {
                format!("{up} of {total} replicas run: no quorum, so tasks wait until {quorum} run")
            };
            report_exit(&replicas[i], status, &state, wait);
        }
    }
    for w in workers.iter_mut() {
        if let Some(status) = w.exited() {
            let wait = w.schedule_restart();
            report_exit(w, status, "its running tasks are retried elsewhere", wait);
        }
    }
    for m in replicas.iter_mut().chain(workers.iter_mut()) {
        if m.restart_at.is_some_and(|t| Instant::now() >= t) {
            match m.start(exe) {
                Ok(pid) if m.kind == Kind::Replica => say!(
                    "{} restarted (pid {pid}); it catches up from its data directory and the leader",
                    m.name
                ),
                Ok(pid) => say!("{} restarted (pid {pid})", m.name),
                Err(e) => {
                    let wait = m.schedule_restart();
                    say!("{} could not be restarted: {e:#}; next try in {wait:?}", m.name);
                }
            }
        }
    }
}

fn report_exit(m: &Member, status: std::process::ExitStatus, state: &str, wait: Duration) {
    say!(
        "\n{} exited ({status}); {state}. fleet up restarts it in {}s (log {})",
        m.name,
        wait.as_secs(),
        m.log.display()
    );
    // An exit on its own (not a signal) is an error worth reading here, not only in the log.
    if status.code().is_some_and(|c| c != 0) {
        say!("the end of its log:\n{}", m.log_tail(5));
    }
}

/// Workers drain first (a second SIGTERM hands their leases back), then replicas stop (a
/// leader hands over first).
async fn stop_all(workers: &mut [Member], replicas: &mut [Member]) {
    for w in workers.iter() {
        w.signal(libc::SIGTERM);
    }
    for w in workers.iter_mut() {
        if !w.wait(Duration::from_secs(10)).await {
            w.signal(libc::SIGTERM);
            w.wait(Duration::from_secs(10)).await;
        }
    }
    for r in replicas.iter() {
        r.signal(libc::SIGTERM);
    }
    for r in replicas.iter_mut() {
        r.wait(Duration::from_secs(10)).await;
    }
}

/// The signals that stop `fleet up`.
struct Signals {
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            hup: signal(SignalKind::hangup())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Waits for one and names it.
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "interrupted",
            _ = self.term.recv() => "SIGTERM",
            _ = self.hup.recv() => "SIGHUP (the terminal closed)",
        }
    }
}

/// What to try next, printed after the demo batch.
struct Hints {
    exe: PathBuf,
    peers: String,
    metrics: String,
    dir: PathBuf,
}

impl Hints {
    fn print(&self) {
        say!();
        say!("try, in another terminal:");
        say!("  export FLEET_PEERS={}", self.peers);
        say!(
            "  alias fleet={}   # or install it: cargo install --path .",
            self.exe.display()
        );
        say!("  fleet submit -- echo hello        # prints the task id");
        say!("  fleet task show ID; fleet logs ID");
        say!("  fleet task list; fleet queue stats; fleet worker list; fleet cluster status");
        say!("  fleet health; fleet health --cluster");
        say!(
            "  curl -s http://{}/metrics | grep ^fleet_   # Prometheus metrics (docs/metrics.md)",
            self.metrics
        );
        say!();
        say!("kill -9 a replica (pids above): the fleet keeps running, and fleet up restarts it.");
        say!(
            "Ctrl-C (or `fleet down --data-dir {}`) stops the fleet; data stays in {}.",
            self.dir.display(),
            self.dir.display()
        );
    }
}

/// `fleet down`: stops the `fleet up` running on a data directory (as Ctrl-C would) and waits
/// until it has stopped.
pub async fn down(args: DownArgs) -> anyhow::Result<()> {
    let lock = args.data_dir.join(UP_LOCK);
    let Some(pid) = PidLock::holder(&lock) else {
        say!("no fleet up is running on {}", args.data_dir.display());
        return Ok(());
    };
    // SAFETY: sends SIGTERM to the process that holds the lock.
    if unsafe { libc::kill(pid as i32, libc::SIGTERM) } != 0 {
        bail!(
            "cannot signal fleet up (pid {pid}): {}",
            std::io::Error::last_os_error()
        );
    }
    say!("stopping fleet up (pid {pid}): workers drain, then replicas stop");
    let deadline = Instant::now() + Duration::from_millis(args.timeout);
    while PidLock::holder(&lock).is_some() {
        if Instant::now() >= deadline {
            bail!(
                "fleet up (pid {pid}) is still stopping after {} ms",
                args.timeout
            );
        }
        // Pacing the checks of the lock.
        tokio::time::sleep(POLL_EVERY).await;
    }
    say!("stopped");
    Ok(())
}

/// The lock file of `fleet up` in its data directory.
const UP_LOCK: &str = "up.pid";

/// Submits `n` small real tasks and shows their progress until all are final.
async fn run_demo(client: &mut Client, n: usize) -> anyhow::Result<()> {
    let batch: Vec<SubmitTask> = (0..n)
        .map(|i| SubmitTask {
            request_id: RequestId(rand::random()),
            task: NewTask::command(vec![
                "sh".into(),
                "-c".into(),
                format!(
                    "sleep 0.{}; echo \"demo task $FLEET_TASK_ID (attempt $FLEET_ATTEMPT) ran on $FLEET_WORKER\"",
                    1 + i % 9
                ),
            ]),
        })
        .collect();
    let submitted = client
        .call(|c, ctx| {
            let b = batch.clone();
            async move { c.submit(ctx, b, 0).await }
        })
        .await?;
    let ids: Vec<TaskId> = submitted
        .into_iter()
        .map(|r| r.map(|s| s.id))
        .collect::<Result<_, _>>()?;
    let first = ids.iter().min().copied().unwrap_or(TaskId(1));
    say!(
        "\ndemo: submitted {} tasks ({} to {}); running them on the workers",
        ids.len(),
        first,
        ids.iter().max().copied().unwrap_or(first)
    );
    let started = Instant::now();
    loop {
        let filter = TaskFilter {
            after: Some(TaskId(first.0 - 1)),
            limit: ids.len(),
            ..Default::default()
        };
        let tasks = client
            .call(|c, ctx| {
                let f = filter.clone();
                async move { c.list_tasks(ctx, f, ReadMode::Linearizable, 0).await }
            })
            .await?
            .value;
        let count = |s: TaskState| tasks.iter().filter(|t| t.state == s).count();
        let done = tasks.iter().filter(|t| t.state.is_final()).count();
        let width = 30;
        let filled = done * width / ids.len().max(1);
        let mut out = std::io::stdout();
        let _ = write!(
            out,
            "\r[{}{}] {done}/{} done: {} succeeded, {} running, {} queued, {} failed or dead  ",
            "#".repeat(filled),
            "-".repeat(width - filled),
            ids.len(),
            count(TaskState::Succeeded),
            count(TaskState::Running),
            count(TaskState::Queued),
            count(TaskState::Failed) + count(TaskState::Dead),
        );
        let _ = out.flush();
        if done >= ids.len() {
            say!(
                "\ndemo: all {} tasks finished in {:.1}s; see one with `fleet logs {}`",
                ids.len(),
                started.elapsed().as_secs_f64(),
                first
            );
            return Ok(());
        }
        // Pacing the progress display.
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// The HTTP ports of `fleet up`'s replicas are this far above their RPC ports.
const HTTP_PORT_OFFSET: usize = 100;

fn http_addr(base_port: u16, i: usize) -> String {
    format!("127.0.0.1:{}", base_port as usize + HTTP_PORT_OFFSET + i)
}
