//! `chaos run`: one run from its seed to its verdict.
//!
//! 1. Draw every plan from the seed and print them (with the seed) first.
//! 2. Start the fleet: proxies, replicas, workers; wait for a leader and active workers.
//! 3. Start the observer (each replica's view of leadership every 100 ms) and the workload
//!    (submissions at `--rate` per second, cancels), which keep running through every fault.
//! 4. For each plan: inject the fault, hold it (the safety phase), heal it, then require
//!    convergence within [`CONVERGE_TIMEOUT`] (the liveness phase): one leader every running
//!    replica agrees on, every replica caught up with the leader's commit index, every running
//!    worker active, and tasks completing again.
//! 5. Stop submitting; wait until every acknowledged task is final; require every replica to
//!    hold the same tasks; read the final records; judge the history ([`crate::checker`]).
//! 6. Write `history.json`, `report.json` and `throughput.svg`, print the timeline summary and
//!    the verdict, and on failure the command that reruns the same seed.
//!
//! The harness waits on conditions with deadlines; the only sleeps are the fault's hold (the
//! point of a scenario), polling intervals and the workload's pacing.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use fleet::client::Client;
use fleet::health::fault::{Component, FaultRequest};
use fleet::rpc::{NewTask, ReadMode, SubmitTask};
use fleet::state::{RequestId, TaskFilter, TaskId};
use rand::{Rng, SeedableRng};

use crate::cluster::{Cluster, VISIBILITY_TIMEOUT_MS};
use crate::history::{wall_ms, History, Isolation, LeaderObs, Submission, TaskRecord};
use crate::proxy::{Endpoint, Rules};
use crate::report::{Report, ScenarioResult};
use crate::scenario::{Planner, Scenario};

/// How long the cluster may take to converge after a fault is healed.
pub const CONVERGE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the acknowledged tasks may take to reach final states after the last fault.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(180);
/// Submissions in flight at once (each waits at most its client deadline).
pub const MAX_INFLIGHT_SUBMISSIONS: usize = 64;
/// How often the observer asks each replica about leadership.
pub const OBSERVE_INTERVAL: Duration = Duration::from_millis(100);

#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// Scenarios to run: all, or a comma-separated list (see chaos --help).
    #[arg(long, default_value = "all")]
    pub scenario: String,
    /// The seed for every fault parameter and the workload; random when not given (and
    /// printed first either way).
    #[arg(long)]
    pub seed: Option<u64>,
    /// The base length of each fault (each plan holds 1x to 1.5x of it, more where the
    /// scenario needs leases to expire).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "4s")]
    pub hold: Duration,
    /// Keep running random scenarios of the list (by seed) until this much time has passed
    /// (a soak, e.g. 1h). Without it, each listed scenario runs once.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// Scheduler replicas: 3 or 5.
    #[arg(long, default_value_t = 3)]
    pub replicas: usize,
    /// Worker processes.
    #[arg(long, default_value_t = 3)]
    pub workers: usize,
    /// Slots per worker.
    #[arg(long, default_value_t = 4)]
    pub concurrency: u32,
    /// Submissions per second during the whole run.
    #[arg(long, default_value_t = 8.0)]
    pub rate: f64,
    /// Where data directories, logs, the history, the report and the plot go (emptied first).
    #[arg(long, default_value = "chaos-out")]
    pub out: PathBuf,
    /// The fleet binary. Default: `fleet` next to this program.
    #[arg(long)]
    pub fleet: Option<PathBuf>,
    /// Also run schedules through the faults (three every second with catch-up all, one every
    /// second with none, a cron every 2 s with latest, one every 3 s in a pool) and a 2-slot
    /// pool that a fifth of the short tasks use; adds the tick-exactly-once and pool-over
    /// invariants. On by itself with `--scenario schedules`.
    #[arg(long)]
    pub schedules: bool,
    /// Also run workflows through the faults (a diamond every second, a fan-out of 50 every
    /// 6 s); adds the workflow invariant.
    #[arg(long)]
    pub workflows: bool,
    /// The latency scenario's added one-way latency, instead of one drawn from the seed
    /// (20-150 ms), e.g. `50ms`.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub latency: Option<Duration>,
}

impl RunArgs {
    /// Whether the schedule workload runs.
    pub fn with_schedules(&self) -> bool {
        self.schedules || self.scenario == "schedules"
    }

    fn validate(&self) -> anyhow::Result<Vec<Scenario>> {
        let scenarios = Scenario::parse_list(&self.scenario).map_err(anyhow::Error::msg)?;
        if self.replicas != 3 && self.replicas != 5 {
            bail!("--replicas {} is not valid: use 3 or 5", self.replicas);
        }
        if !(1..=16).contains(&self.workers) {
            bail!("--workers {} is not valid: use 1 to 16", self.workers);
        }
        if !(1..=64).contains(&self.concurrency) {
            bail!(
                "--concurrency {} is not valid: use 1 to 64",
                self.concurrency
            );
        }
        if !(self.rate > 0.0 && self.rate <= 200.0) {
            bail!(
                "--rate {} is not valid: use more than 0 and at most 200",
                self.rate
            );
        }
        if let Some(l) = self.latency {
            if l.is_zero() || l > Duration::from_secs(5) {
                bail!(
                    "--latency {} is not valid: use 1ms to 5s",
                    humantime::format_duration(l)
                );
            }
        }
        if self.hold < Duration::from_millis(500) || self.hold > Duration::from_secs(600) {
            bail!(
                "--hold {} is not valid: use 500ms to 10m",
                humantime::format_duration(self.hold)
            );
        }
        Ok(scenarios)
    }

    /// The command line that reruns this run (same seed, same parameters).
    pub fn reproduce(&self, seed: u64, scenario: &str) -> String {
        let mut s = format!(
            "chaos run --seed {seed} --scenario {scenario} --hold {} --replicas {} --workers {} \
             --concurrency {} --rate {}",
            humantime::format_duration(self.hold),
            self.replicas,
            self.workers,
            self.concurrency,
            self.rate
        );
        if let Some(d) = self.duration {
            s.push_str(&format!(" --duration {}", humantime::format_duration(d)));
        }
        if self.with_schedules() {
            s.push_str(" --schedules");
        }
        if self.workflows {
            s.push_str(" --workflows");
        }
        if let Some(l) = self.latency {
            s.push_str(&format!(" --latency {}", humantime::format_duration(l)));
        }
        s
    }
}

/// What every part of a run shares: the clock origin, the timeline and the observations.
pub struct Shared {
    pub t0_ms: u64,
    pub timeline: Mutex<Vec<(u64, String)>>,
    pub leaders: Mutex<Vec<LeaderObs>>,
    pub submissions: Mutex<Vec<Submission>>,
    /// Workers frozen or cut off, and when (for the overlap invariant).
    pub isolations: Mutex<Vec<Isolation>>,
    /// Replicas the observer polls: id -> real address.
    pub observed: Mutex<BTreeMap<u64, String>>,
    /// Where clients connect (the members' proxies).
    pub fronts: Mutex<Vec<String>>,
    pub exec_log: PathBuf,
    /// Workflow runs the workload started (with `--workflows`).
    pub runs_started: Mutex<Vec<u64>>,
}

impl Shared {
    /// Prints a timeline line and records it.
    pub fn say(&self, what: impl Into<String>) {
        let what = what.into();
        let t = wall_ms();
        println!("[{:>7.1}s] {what}", (t - self.t0_ms) as f64 / 1000.0);
        self.timeline.lock().expect("timeline").push((t, what));
    }

    /// Records that `workers` could not hear the cluster from `from_ms` until now.
    fn isolated(&self, workers: Vec<String>, from_ms: u64) {
        let iso = Isolation {
            workers,
            from_ms,
            to_ms: wall_ms(),
        };
        self.isolations.lock().expect("isolations").push(iso);
    }

    pub(crate) fn fronts(&self) -> Vec<String> {
        self.fronts.lock().expect("fronts").clone()
    }
}

pub(crate) fn client(peers: Vec<String>, timeout: Duration) -> anyhow::Result<Client> {
    Ok(Client::new(peers, "fleet", timeout)?.with_attempt_timeout(Duration::from_secs(1)))
}

/// One replica's local view, asked directly (no forwarding), within `timeout`.
async fn status_of(addr: &str, timeout: Duration) -> anyhow::Result<fleet::rpc::ClusterStatus> {
    let mut c = Client::new(vec![addr.to_string()], "fleet", timeout)?;
    c.call(|cl, ctx| async move { cl.cluster_status(ctx, 1).await })
        .await
}

/// The replica that says it leads, in the highest term any running replica reports.
async fn current_leader(cluster: &Cluster) -> Option<(u64, u64)> {
    let mut best: Option<(u64, u64)> = None;
    for (id, addr) in cluster.running() {
        if let Ok(s) = status_of(&addr, Duration::from_millis(500)).await {
            if s.leader_view && s.leader_id == Some(id) && best.is_none_or(|(_, t)| s.term > t) {
                best = Some((id, s.term));
            }
        }
    }
    best
}

/// Waits on `check` until it returns `Ok` or `timeout` passes (then the last observation).
pub(crate) async fn wait_for<T, F, Fut>(timeout: Duration, mut check: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match check().await {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

pub async fn run(args: RunArgs) -> anyhow::Result<bool> {
    let scenarios = args.validate()?;
    let seed = args.seed.unwrap_or_else(|| rand::rng().random());
    let fleet_bin = match &args.fleet {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("fleet"),
    };
    anyhow::ensure!(
        fleet_bin.exists(),
        "the fleet binary {} does not exist: build it (cargo build --release) or pass --fleet PATH",
        fleet_bin.display()
    );
    let lease_expiry = Duration::from_millis(VISIBILITY_TIMEOUT_MS);
    let mut planner = Planner::new(seed, scenarios.clone(), args.hold, lease_expiry)
        .with_latency(args.latency.map(|l| l.as_millis() as u64));
    let mut plans = Vec::new();
    if args.duration.is_none() {
        plans = (0..scenarios.len()).map(|_| planner.next_plan()).collect();
    }

    print_header(&args, seed, &plans);

    if args.out.exists() {
        std::fs::remove_dir_all(&args.out)
            .with_context(|| format!("emptying {}", args.out.display()))?;
    }
    std::fs::create_dir_all(&args.out)?;
    let out = std::fs::canonicalize(&args.out)?;
    let shared = Arc::new(Shared {
        t0_ms: wall_ms(),
        timeline: Mutex::default(),
        leaders: Mutex::default(),
        submissions: Mutex::default(),
        isolations: Mutex::default(),
        observed: Mutex::default(),
        fronts: Mutex::default(),
        exec_log: out.join("executions.jsonl"),
        runs_started: Mutex::default(),
    });

    let mut cluster = start_fleet(&args, &out, fleet_bin, &shared).await?;

    let workloads = Workloads::start(&args, seed, &shared).await?;
    let results = run_plans(&args, &mut cluster, &shared, &mut planner, &plans).await;

    // After a tail, so the last scenario has an "after" window too.
    tokio::time::sleep(Duration::from_millis(crate::report::WINDOW_MS)).await;
    workloads.stop().await;
    let ok = judge(&args, seed, &cluster, &shared, &out, results).await?;
    drop(cluster);
    Ok(ok)
}

/// Drains the fleet, checks the history and writes the report; true if the run passed.
async fn judge(
    args: &RunArgs,
    seed: u64,
    cluster: &Cluster,
    shared: &Arc<Shared>,
    out: &std::path::Path,
    results: Vec<ScenarioResult>,
) -> anyhow::Result<bool> {
    let (schedules, pools) = if args.with_schedules() {
        finish_schedules(shared).await?
    } else {
        Default::default()
    };
    shared.say("workload stopped; waiting for every acknowledged task to finish");
    let runs = if args.workflows {
        crate::workflows::finish(shared).await
    } else {
        Ok(Vec::new())
    };
    let drain = drain(shared).await;
    let tasks = match &drain {
        Ok(t) => t.clone(),
        Err(e) => {
            shared.say(format!("drain incomplete: {e}"));
            read_all_tasks(shared).await.unwrap_or_default()
        }
    };
    let agree = replicas_agree(cluster, shared).await;
    if let Err(e) = &agree {
        shared.say(format!("replicas disagree: {e}"));
    } else {
        shared.say("every replica holds the same tasks");
    }
    let (executions, torn) = crate::history::read_exec_log(&shared.exec_log);
    let run_records = match &runs {
        Ok(r) => r.clone(),
        Err(_) => crate::workflows::read_runs(shared)
            .await
            .unwrap_or_default(),
    };
    let history = History {
        seed,
        submissions: shared.submissions.lock().expect("subs").clone(),
        executions,
        tasks,
        leaders: shared.leaders.lock().expect("leaders").clone(),
        schedules,
        pools,
        isolations: shared.isolations.lock().expect("isolations").clone(),
        runs_started: shared.runs_started.lock().expect("runs").clone(),
        runs: run_records,
    };
    std::fs::write(
        out.join("history.json"),
        serde_json::to_vec(&history).expect("serializable"),
    )?;
    let violations = crate::checker::check(&history);
    let mut liveness: Vec<String> = results
        .iter()
        .filter_map(|r| {
            r.liveness_error
                .as_ref()
                .map(|e| format!("after {}: {e}", r.plan.scenario.name()))
        })
        .collect();
    if let Err(e) = drain {
        liveness.push(format!("drain: {e}"));
    }
    if let Err(e) = runs {
        liveness.push(format!("workflow runs: {e}"));
    }
    if let Err(e) = agree {
        liveness.push(format!("convergence: {e}"));
    }
    let report = Report::build(
        seed, args, shared, &history, results, violations, liveness, torn,
    );
    report.write(out)?;
    report.print(out);
    let ok = report.ok();
    if !ok {
        let failing = report.failing_scenarios();
        println!(
            "reproduce with: {}",
            args.reproduce(
                seed,
                &if failing.is_empty() {
                    args.scenario.clone()
                } else {
                    failing.join(",")
                }
            )
        );
        println!(
            "  (the seed fixes every fault and the workload; process timing is real, so a rare \
             interleaving may need a few reruns)"
        );
    }
    Ok(ok)
}

/// The task stream, and the schedules and workflow runs when the run has them.
struct Workloads {
    stop: Arc<AtomicBool>,
    tasks: tokio::task::JoinHandle<()>,
    runs: Option<tokio::task::JoinHandle<()>>,
}

impl Workloads {
    /// Starts the task stream and waits until tasks complete; then the schedules and the
    /// workflow runs.
    async fn start(args: &RunArgs, seed: u64, shared: &Arc<Shared>) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let pooled = args.with_schedules();
        let workload = tokio::spawn(workload(
            shared.clone(),
            seed,
            args.rate,
            pooled,
            stop.clone(),
        ));
        let warmup_until = wall_ms() + 3000;
        wait_for(Duration::from_secs(30), || async {
            if wall_ms() >= warmup_until && completions_since(shared, warmup_until - 3000) > 0 {
                Ok(())
            } else {
                Err("no task completed during the warm-up".to_string())
            }
        })
        .await
        .map_err(anyhow::Error::msg)?;
        shared.say("warm-up done: tasks complete");
        if args.with_schedules() {
            setup_schedules(shared).await?;
            shared.say(format!(
                "{} schedules firing, pool {CHAOS_POOL} of {CHAOS_POOL_SLOTS} slots",
                SCHEDULES.len()
            ));
        }
        let runs_workload = if args.workflows {
            crate::workflows::setup(shared).await?;
            shared.say("workflows applied: a diamond every second, a fan-out of 50 every 6 s");
            Some(tokio::spawn(crate::workflows::workload(
                shared.clone(),
                seed,
                stop.clone(),
            )))
        } else {
            None
        };
        Ok(Self {
            stop,
            tasks: workload,
            runs: runs_workload,
        })
    }

    async fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.tasks.await;
        if let Some(w) = self.runs {
            let _ = w.await;
        }
    }
}

/// The seed and every fault parameter, first.
fn print_header(args: &RunArgs, seed: u64, plans: &[crate::scenario::Plan]) {
    println!("chaos: seed={seed}");
    println!(
        "chaos: replicas={} workers={}x{} rate={}/s hold={} scenarios={} duration={}",
        args.replicas,
        args.workers,
        args.concurrency,
        args.rate,
        humantime::format_duration(args.hold),
        args.scenario,
        args.duration
            .map_or("one round".to_string(), |d| humantime::format_duration(d)
                .to_string())
    );
    for (i, p) in plans.iter().enumerate() {
        println!("chaos: plan {:>2}: {}", i + 1, p.describe());
    }
    if args.duration.is_some() {
        println!("chaos: soak: plans are drawn from the seed as the run goes");
    }
}

/// Starts the replicas and workers and waits until they are up.
async fn start_fleet(
    args: &RunArgs,
    out: &std::path::Path,
    fleet_bin: std::path::PathBuf,
    shared: &Arc<Shared>,
) -> anyhow::Result<Cluster> {
    let mut cluster = Cluster::new(out, fleet_bin, args.replicas, args.concurrency).await?;
    *shared.fronts.lock().expect("fronts") = cluster.fronts();
    let ids: Vec<u64> = cluster.replicas.keys().copied().collect();
    for id in &ids {
        cluster.start_replica(*id)?;
        shared
            .observed
            .lock()
            .expect("observed")
            .insert(*id, cluster.replicas[id].real.clone());
    }
    tokio::spawn(observer(shared.clone()));
    let (leader, term) = wait_for(Duration::from_secs(60), || async {
        current_leader(&cluster)
            .await
            .ok_or("no leader yet".to_string())
    })
    .await
    .map_err(|e| anyhow::anyhow!("the cluster did not elect a leader: {e}"))?;
    shared.say(format!("cluster up: leader node {leader}, term {term}"));
    for _ in 0..args.workers {
        cluster.add_worker()?;
    }
    converge(&cluster, shared, 0, Duration::from_secs(60))
        .await
        .map_err(|e| anyhow::anyhow!("the fleet did not come up: {e}"))?;
    shared.say(format!("{} workers active", args.workers));
    Ok(cluster)
}

/// Runs the plans one after another (or draws them until `--duration` is up); stops at the
/// first liveness failure.
async fn run_plans(
    args: &RunArgs,
    cluster: &mut Cluster,
    shared: &Arc<Shared>,
    planner: &mut Planner,
    plans: &[crate::scenario::Plan],
) -> Vec<ScenarioResult> {
    let started = Instant::now();
    let mut results: Vec<ScenarioResult> = Vec::new();
    let mut i = 0;
    loop {
        let plan = if let Some(d) = args.duration {
            if started.elapsed() >= d {
                break;
            }
            let p = planner.next_plan();
            println!("chaos: plan {:>2}: {}", i + 1, p.describe());
            p
        } else if i < plans.len() {
            plans[i].clone()
        } else {
            break;
        };
        i += 1;
        let r = run_plan(cluster, shared, plan).await;
        let failed = r.liveness_error.is_some();
        results.push(r);
        if failed {
            shared.say("liveness failed: stopping the run here");
            break;
        }
    }
    results
}

/// Polls every observed replica's view of leadership (one loop per replica, so a frozen one
/// does not slow the others).
async fn observer(shared: Arc<Shared>) {
    let mut running: BTreeMap<u64, tokio::task::JoinHandle<()>> = BTreeMap::new();
    loop {
        let want = shared.observed.lock().expect("observed").clone();
        running.retain(|id, h| {
            let keep = want.contains_key(id) && !h.is_finished();
            if !keep {
                h.abort();
            }
            keep
        });
        for (id, addr) in want {
            running.entry(id).or_insert_with(|| {
                let shared = shared.clone();
                tokio::spawn(async move {
                    loop {
                        if let Ok(s) = status_of(&addr, Duration::from_millis(400)).await {
                            shared.leaders.lock().expect("leaders").push(LeaderObs {
                                t_ms: wall_ms(),
                                node: s.reported_by,
                                term: s.term,
                                leader: s.leader_id,
                            });
                        }
                        tokio::time::sleep(OBSERVE_INTERVAL).await;
                    }
                })
            });
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The workload's kinds: (name, weight).
const KINDS: [(&str, u32); 5] = [
    ("short", 60),
    ("long", 15),
    ("flaky", 10),
    ("timeout", 8),
    ("cancel", 7),
];

/// Submits tasks at `rate` per second until `stop`, each recorded as acknowledged or not; a
/// `cancel` task is cancelled a little after it was acknowledged.
/// The pool of the schedule workload.
const CHAOS_POOL: &str = "chaos-pool";
const CHAOS_POOL_SLOTS: u32 = 2;
/// The schedule workload: name, cron expression or interval (ms), catch-up policy, pooled,
/// work per run (ms).
type ScheduleLoad = (
    &'static str,
    Option<&'static str>,
    u64,
    &'static str,
    bool,
    u64,
);
const SCHEDULES: [ScheduleLoad; 6] = [
    ("every-1s-a", None, 1_000, "all", false, 50),
    ("every-1s-b", None, 1_000, "all", false, 50),
    ("every-1s-c", None, 1_000, "all", false, 50),
    ("every-1s-none", None, 1_000, "none", false, 50),
    (
        "cron-2s-latest",
        Some("*/2 * * * * *"),
        0,
        "latest",
        false,
        50,
    ),
    ("pooled-3s", None, 3_000, "all", true, 1_500),
];

/// `chaos record` as a task's command.
pub(crate) fn record_command(
    shared: &Shared,
    key: &str,
    work_ms: u64,
    fail_attempts: u32,
) -> Vec<String> {
    let exe = std::env::current_exe().expect("own path");
    vec![
        exe.display().to_string(),
        "record".into(),
        "--log".into(),
        shared.exec_log.display().to_string(),
        "--key".into(),
        key.to_string(),
        "--work-ms".into(),
        work_ms.to_string(),
        "--fail-attempts".into(),
        fail_attempts.to_string(),
    ]
}

fn pool_env() -> BTreeMap<String, String> {
    [("CHAOS_POOL".to_string(), CHAOS_POOL.to_string())].into()
}

async fn schedule_ops(
    shared: &Shared,
    ops: Vec<fleet::rpc::schedules::ScheduleOp>,
) -> anyhow::Result<()> {
    let mut c = client(shared.fronts(), Duration::from_secs(30))?;
    let results = c
        .call(|cl, ctx| {
            let ops = ops.clone();
            async move { cl.schedule_ops(ctx, ops, 0).await }
        })
        .await?;
    for r in results {
        r?;
    }
    Ok(())
}

/// Creates the pool and the schedules of the schedule workload.
async fn setup_schedules(shared: &Shared) -> anyhow::Result<()> {
    use fleet::rpc::schedules::{ScheduleDef, ScheduleOp};
    let mut ops = vec![ScheduleOp::SetPool {
        name: CHAOS_POOL.into(),
        slots: CHAOS_POOL_SLOTS,
    }];
    for (name, cron, every_ms, catchup, pooled, work_ms) in SCHEDULES {
        ops.push(ScheduleOp::Create(ScheduleDef {
            name: name.into(),
            cron: cron.map(str::to_string),
            every_ms: (every_ms > 0).then_some(every_ms),
            catchup: Some(catchup.parse().map_err(anyhow::Error::msg)?),
            task: NewTask {
                command: record_command(shared, &format!("sched-{name}"), work_ms, 0),
                max_attempts: Some(5),
                backoff_initial_ms: Some(200),
                backoff_max_ms: Some(1_000),
                visibility_timeout_ms: Some(VISIBILITY_TIMEOUT_MS),
                env: if pooled { pool_env() } else { BTreeMap::new() },
                pool: pooled.then(|| CHAOS_POOL.to_string()),
                ..Default::default()
            },
            ..Default::default()
        }));
    }
    schedule_ops(shared, ops).await
}

/// Pauses the schedules (their watermarks stop) and reads them and the pools back.
async fn finish_schedules(
    shared: &Shared,
) -> anyhow::Result<(Vec<fleet::state::Schedule>, BTreeMap<String, u32>)> {
    use fleet::rpc::schedules::ScheduleOp;
    let ops = SCHEDULES
        .iter()
        .map(|s| ScheduleOp::Pause(s.0.to_string()))
        .collect();
    schedule_ops(shared, ops).await?;
    let mut c = client(shared.fronts(), Duration::from_secs(30))?;
    let views = c
        .call(|cl, ctx| async move { cl.get_schedules(ctx, None, ReadMode::Linearizable, 0).await })
        .await?
        .value;
    let pools = c
        .call(|cl, ctx| async move { cl.list_pools(ctx, ReadMode::Linearizable, 0).await })
        .await?
        .value;
    shared.say(format!(
        "schedules paused: {} ticks fired, {} missed",
        views.iter().map(|v| v.schedule.counts.fired).sum::<u64>(),
        views.iter().map(|v| v.schedule.counts.missed).sum::<u64>()
    ));
    Ok((
        views.into_iter().map(|v| v.schedule).collect(),
        pools.into_iter().map(|p| (p.name, p.slots)).collect(),
    ))
}

async fn workload(shared: Arc<Shared>, seed: u64, rate: f64, pooled: bool, stop: Arc<AtomicBool>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed_f7a5);
    let limit = Arc::new(tokio::sync::Semaphore::new(MAX_INFLIGHT_SUBMISSIONS));
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let total: u32 = KINDS.iter().map(|k| k.1).sum();
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
        tick.tick().await;
        n += 1;
        let mut roll = rng.random_range(0..total);
        let kind = KINDS
            .iter()
            .find(|(_, w)| {
                let hit = roll < *w;
                roll = roll.saturating_sub(*w);
                hit
            })
            .map_or("short", |k| k.0);
        let key = format!("chaos-{seed}-{n}");
        let (work_ms, fail_attempts, timeout_ms, max_attempts) = match kind {
            "long" => (rng.random_range(2_000..=4_000), 0, 0, 5),
            "flaky" => (rng.random_range(50..=300), 1, 0, 5),
            "timeout" => (8_000, 0, 800, 2),
            "cancel" => (30_000, 0, 0, 5),
            _ => (rng.random_range(50..=400), 0, 0, 5),
        };
        // With the schedule workload, a fifth of the short tasks hold a slot of the pool. Drawn
        // only then, so runs without it draw the same workload as before.
        let in_pool = pooled && kind == "short" && rng.random_range(0..5) == 0;
        let task = NewTask {
            command: record_command(&shared, &key, work_ms, fail_attempts),
            env: if in_pool { pool_env() } else { BTreeMap::new() },
            pool: in_pool.then(|| CHAOS_POOL.to_string()),
            max_attempts: Some(max_attempts),
            backoff_initial_ms: Some(200),
            backoff_max_ms: Some(1_000),
            timeout_ms: Some(timeout_ms),
            visibility_timeout_ms: Some(VISIBILITY_TIMEOUT_MS),
            idempotency_key: Some(key.clone()),
            ..Default::default()
        };
        let request_id = RequestId(rng.random());
        let cancel_after = Duration::from_millis(rng.random_range(300..=1_500));
        let permit = limit.clone().acquire_owned().await.expect("semaphore");
        let shared = shared.clone();
        let kind = kind.to_string();
        tokio::spawn(async move {
            let _permit = permit;
            let t_ms = wall_ms();
            let sub = SubmitTask { request_id, task };
            let result = async {
                let mut c = client(shared.fronts(), Duration::from_secs(8))?;
                let mut r = c
                    .call(|cl, ctx| {
                        let s = sub.clone();
                        async move { cl.submit(ctx, vec![s], 0).await }
                    })
                    .await?;
                anyhow::Ok(r.pop().context("empty reply")??.id)
            }
            .await;
            let (acked, error) = match result {
                Ok(id) => (Some(id.0), None),
                Err(e) => (None, Some(format!("{e:#}"))),
            };
            shared.submissions.lock().expect("subs").push(Submission {
                key,
                kind: kind.clone(),
                t_ms,
                acked,
                acked_at_ms: acked.map(|_| wall_ms()),
                error,
            });
            drop(_permit);
            if let (Some(id), "cancel") = (acked, kind.as_str()) {
                tokio::time::sleep(cancel_after).await;
                // One call: the client retries through elections until its deadline. A cancel
                // that fails leaves a 30 s task that simply succeeds; both are final states.
                if let Ok(mut c) = client(shared.fronts(), Duration::from_secs(10)) {
                    let _ = c
                        .call(|cl, ctx| async move { cl.cancel_task(ctx, TaskId(id), 0).await })
                        .await;
                }
            }
        });
    }
    // Every submission in flight is recorded before the workload ends.
    let _ = limit
        .acquire_many(MAX_INFLIGHT_SUBMISSIONS as u32)
        .await
        .expect("semaphore");
}

/// Completed executions (zero exit) since `t_ms`.
fn completions_since(shared: &Shared, t_ms: u64) -> usize {
    let (events, _) = crate::history::read_exec_log(&shared.exec_log);
    events
        .iter()
        .filter(|e| e.t_ms >= t_ms && e.exit == Some(0))
        .count()
}

/// The liveness phase: one leader every running replica agrees on, every running replica
/// caught up with the leader's commit index, every running worker active, and a task completed
/// after `since_ms`. Returns when all hold, or the last observation after `timeout`.
async fn converge(
    cluster: &Cluster,
    shared: &Shared,
    since_ms: u64,
    timeout: Duration,
) -> Result<(), String> {
    wait_for(timeout, || async {
        let running = cluster.running();
        let mut statuses = Vec::new();
        for (id, addr) in &running {
            let s = status_of(addr, Duration::from_millis(800))
                .await
                .map_err(|e| format!("node {id} does not answer: {e}"))?;
            statuses.push((*id, s));
        }
        let leader = statuses
            .iter()
            .find(|(id, s)| s.leader_view && s.leader_id == Some(*id))
            .map(|(_, s)| s.clone())
            .ok_or("no replica leads")?;
        let commit = leader.commit_index.unwrap_or(0);
        for (id, s) in &statuses {
            if s.leader_id != leader.leader_id || s.term != leader.term {
                return Err(format!(
                    "node {id} sees leader {:?} in term {}, node {:?} leads term {}",
                    s.leader_id, s.term, leader.leader_id, leader.term
                ));
            }
            if s.applied_index.unwrap_or(0) < commit {
                return Err(format!(
                    "node {id} applied {:?}, the leader committed {commit}",
                    s.applied_index
                ));
            }
        }
        let leader_addr = &running
            .iter()
            .find(|(id, _)| Some(*id) == leader.leader_id)
            .expect("the leader runs")
            .1;
        let mut c = Client::new(vec![leader_addr.clone()], "fleet", Duration::from_secs(2))
            .map_err(|e| e.to_string())?;
        let workers = c
            .call(|cl, ctx| async move { cl.list_workers(ctx, 0).await })
            .await
            .map_err(|e| format!("worker list: {e}"))?;
        let active = workers.iter().filter(|w| w.state == "active").count();
        let want = cluster.running_workers();
        if active < want {
            return Err(format!("{active} of {want} workers active"));
        }
        if since_ms > 0 && completions_since(shared, since_ms) == 0 {
            return Err("no task has completed since the fault was healed".into());
        }
        Ok(())
    })
    .await
}

/// Runs one plan: fault, hold, heal, converge.
async fn run_plan(
    cluster: &mut Cluster,
    shared: &Arc<Shared>,
    plan: crate::scenario::Plan,
) -> ScenarioResult {
    let mut r = ScenarioResult::new(plan.clone());
    // Start from a converged fleet, so each scenario's figures are its own.
    if let Err(e) = converge(cluster, shared, 0, CONVERGE_TIMEOUT).await {
        r.liveness_error = Some(format!("not converged before the fault: {e}"));
        return r;
    }
    let before = current_leader(cluster).await;
    r.leader_before = before;
    let (leader, _) = before.unwrap_or((0, 0));
    let ids: Vec<u64> = cluster.running().iter().map(|(id, _)| *id).collect();
    let t = Targets {
        leader,
        followers: ids.iter().copied().filter(|id| *id != leader).collect(),
        ids,
        pick: plan.pick,
        widx: (plan.pick % cluster.workers.len() as u64) as usize,
        hold: Duration::from_millis(plan.hold_ms),
        name: plan.scenario.name(),
        plan: plan.clone(),
    };
    let name = t.name;
    r.fault_at_ms = wall_ms();
    let outcome = match plan.scenario {
        Scenario::KillLeader | Scenario::KillFollower => {
            kill_replica(cluster, shared, &mut r, &t).await
        }
        Scenario::KillMajority => kill_majority(cluster, shared, &mut r, &t).await,
        Scenario::KillWorker => kill_worker(cluster, shared, &mut r, &t).await,
        Scenario::StopLeader => stop_leader(cluster, shared, &mut r, &t).await,
        Scenario::StopWorker => stop_worker(cluster, shared, &mut r, &t).await,
        Scenario::StallLoop | Scenario::StallFsync => stall(cluster, shared, &mut r, &t).await,
        Scenario::PartitionLeader | Scenario::OneWayLoss => {
            cut_leader(cluster, shared, &mut r, &t).await
        }
        Scenario::PartitionWorkers => partition_workers(cluster, shared, &mut r, &t).await,
        Scenario::Latency => latency(cluster, shared, &mut r, &t).await,
        Scenario::RollingRestart => rolling_restart(cluster, shared, &mut r, &t).await,
        Scenario::Membership => membership(cluster, shared, &mut r, &t).await,
        Scenario::InboundCut => inbound_cut(cluster, shared, &mut r, &t).await,
        Scenario::ClockStep => clock_step(cluster, shared, &mut r, &t).await,
    };
    if r.heal_at_ms == 0 {
        r.heal_at_ms = wall_ms();
    }
    if let Err(e) = outcome {
        shared.say(format!("{name}: the fault could not be carried out: {e:#}"));
        r.liveness_error = Some(format!("{e:#}"));
        cluster.net.heal();
        return r;
    }
    match converge(cluster, shared, r.heal_at_ms, CONVERGE_TIMEOUT).await {
        Ok(()) => {
            r.converged_at_ms = Some(wall_ms());
            say_recovery(shared, &r);
        }
        Err(e) => {
            shared.say(format!("NOT converged within {CONVERGE_TIMEOUT:?}: {e}"));
            r.liveness_error = Some(format!("not converged within {CONVERGE_TIMEOUT:?}: {e}"));
        }
    }
    r
}

/// Prints how the fleet recovered from a plan's fault.
fn say_recovery(shared: &Shared, r: &ScenarioResult) {
    let (events, _) = crate::history::read_exec_log(&shared.exec_log);
    let leaders = shared.leaders.lock().expect("leaders").clone();
    let subs = shared.submissions.lock().expect("subs").clone();
    let f = crate::report::figures(r, &leaders, &events, &subs, shared.t0_ms);
    let s = |v: Option<u64>| v.map_or("-".into(), |v| format!("{:.2}s", v as f64 / 1000.0));
    shared.say(format!(
        "recovered: new leader {}, first lease {}, first acknowledged submission {}, \
         converged {} after the heal; tasks/s {:.1} before, {:.1} during",
        match (f.new_leader_ms, f.new_leader) {
            (Some(ms), Some((n, t))) =>
                format!("node {n} term {t} after {:.2}s", ms as f64 / 1000.0),
            _ => "- (unchanged)".into(),
        },
        s(f.first_lease_ms),
        s(f.first_ack_ms),
        s(f.converged_ms),
        f.tasks_per_s_before,
        f.tasks_per_s_during
    ));
}

/// Who a plan's fault hits, fixed when the plan starts.
struct Targets {
    leader: u64,
    /// The running replicas, and those of them that do not lead.
    ids: Vec<u64>,
    followers: Vec<u64>,
    /// The plan's draw, to pick a replica from a list.
    pick: u64,
    /// The worker a worker fault hits.
    widx: usize,
    hold: Duration,
    name: &'static str,
    plan: crate::scenario::Plan,
}

impl Targets {
    fn pick(&self, v: &[u64]) -> u64 {
        v[(self.pick % v.len().max(1) as u64) as usize]
    }
}

/// SIGKILL the leader or a follower; restart it after the hold.
async fn kill_replica(
    cluster: &mut Cluster,
    shared: &Arc<Shared>,
    r: &mut ScenarioResult,
    t: &Targets,
) -> anyhow::Result<()> {
    let plan = &t.plan;
    let leader = t.leader;
    let followers = &t.followers;
    let hold = t.hold;
    let name = t.name;
    let pick = |v: &[u64]| t.pick(v);
    let target = if plan.scenario == Scenario::KillLeader {
        leader
    } else {
        pick(followers)
    };
    r.target = format!("node {target}");
    shared.say(format!("FAULT {name}: SIGKILL node {target}"));
    cluster.kill_replica(target);
    hold_fault(r, hold).await;
    cluster.start_replica(target)?;
    shared.say(format!("HEAL {name}: node {target} restarted"));
    Ok(())
}

/// SIGKILL a majority of the replicas; restart them after the hold.
async fn kill_majority(
    cluster: &mut Cluster,
    shared: &Arc<Shared>,
    r: &mut ScenarioResult,
    t: &Targets,
) -> anyhow::Result<()> {
    let plan = &t.plan;
    let ids = &t.ids;
    let hold = t.hold;
    let name = t.name;
    let n = ids.len();
    let start = (plan.pick % n as u64) as usize;
    let victims: Vec<u64> = (0..n / 2 + 1).map(|k| ids[(start + k) % n]).collect();
    r.target = format!("nodes {victims:?}");
    shared.say(format!("FAULT {name}: SIGKILL nodes {victims:?}"));
    for v in &victims {
        cluster.kill_replica(*v);
    }
    hold_fault(r, hold).await;
    for v in &victims {
        cluster.start_replica(*v)?;
    }
    shared.say(format!("HEAL {name}: nodes {victims:?} restarted"));
    Ok(())
}

/// SIGKILL a worker; restart it after the hold.
async fn kill_worker(
    cluster: &mut Cluster,
    shared: &Arc<Shared>,
    r: &mut ScenarioResult,
    t: &Targets,
) -> anyhow::Result<()> {
    let widx = t.widx;
    let hold = t.hold;
    let name = t.name;
    let w = cluster.workers[widx].name.clone();
    r.target = format!("worker {w}");
    shared.say(format!("FAULT {name}: SIGKILL worker {w}"));
    cluster.kill_worker(widx);
    hold_fault(r, hold).await;
    cluster.start_worker(widx)?;
    shared.say(format!("HEAL {name}: worker {w} restarted"));
    Ok(())
}

/// SIGSTOP the leader; SIGCONT it after the hold.
async fn stop_leader(
    cluster: &mut Cluster,
    shared: &Arc<Shared>,
    r: &mut ScenarioResult,
    t: &Targets,
) -> anyhow::Result<()> {
    let leader = t.leader;
    let hold = t.hold;
    let name = t.name;
    r.target = format!("node {leader}");
    shared.say(format!("FAULT {name}: SIGSTOP node {leader}"));
    cluster.stop_replica(leader);
    hold_fault(r, hold).await;
    cluster.cont_replica(leader);
    shared.say(format!("HEAL {name}: SIGCONT node {leader}"));
    Ok(())
}

/// SIGSTOP a worker and its attempts; SIGCONT them after the hold.
async fn stop_worker(
    cluster: &mut Cluster,
    shared: &Arc<Shared>,
    r: &mut ScenarioResult,
    t: &Targets,
) -> anyhow::Result<()> {
    let widx = t.widx;
    let hold = t.hold;
    let name = t.name;
    let w = cluster.workers[widx].name.clone();
    r.target = format!("worker {w}");
    let from_ms = wall_ms();
    cluster.stop_worker(widx);
    shared.say(format!(
        "FAULT {name}: SIGSTOP worker {w} and its {} attempts",
        cluster.workers[widx].frozen_groups.len()
    ));
    hold_fault(r, hold).await;
    cluster.cont_worker(widx);
    shared.isolated(vec![w.clone()], from_ms);
    shared.say(format!("HEAL {name}: SIGCONT worker {w}"));
    Ok(())
}

/// Stall the leader's scheduling loop or a replica's fsyncs for the hold.
async fn stall(
    cluster: &mut Cluster,
    shared: &Arc<Shared>,
    r: &mut ScenarioResult,
    t: &Targets,
) -> anyhow::Result<()> {
    let plan = &t.plan;
    let leader = t.leader;
    let ids = &t.ids;
    let hold = t.hold;
    let name = t.name;
    let pick = |v: &[u64]| t.pick(v);
    let (target, component) = if plan.scenario == Scenario::StallLoop {
        (leader, Component::Scheduler)
    } else {
        (pick(ids), Component::Storage)
    };
    r.target = format!("node {target}");
    let addr = cluster.replicas[&target].real.clone();
    shared.say(format!("FAULT {name}: stall {component} on node {target}"));
    inject(
        &addr,
        FaultRequest::Stall {
            component,
            duration_ms: plan.hold_ms,
        },
    )
    .await?;
    hold_fault(r, hold).await;
    inject(&addr, FaultRequest::Clear).await?;
    shared.say(format!("HEAL {name}: stall cleared on node {target}"));
    Ok(())
}

/// Cut the leader off (both ways, or only what it sends) from the followers and workers.
async fn cut_leader(
    cluster: &mut Cluster,
    shared: &Arc<Shared>,
    r: &mut ScenarioResult,
    t: &Targets,
) -> anyhow::Result<()> {
    let plan = &t.plan;
    let leader = t.leader;
    let followers = &t.followers;
    let hold = t.hold;
    let name = t.name;
    let mut rules = Rules::default();
    let l = Endpoint::Replica(leader);
    for f in followers {
        if plan.scenario == Scenario::PartitionLeader {
            rules.cut(l, Endpoint::Replica(*f));
        } else {
            rules.block(l, Endpoint::Replica(*f));
        }
    }
    if plan.scenario == Scenario::PartitionLeader {
        rules.cut(l, Endpoint::Worker);
    } else {
        rules.block(l, Endpoint::Worker);
    }
    r.target = format!("node {leader}");
    shared.say(format!(
        "FAULT {name}: {} node {leader} (leader)",
        if plan.scenario == Scenario::PartitionLeader {
            "cut off"
        } else {
            "drop everything sent by"
        }
    ));
    hold_network(cluster, r, hold, rules).await;
    shared.say(format!("HEAL {name}: network healed"));
    Ok(())
}

/// Cut every worker off from every replica.
async fn partition_workers(
    cluster: &mut Cluster,
    shared: &Arc<Shared>,
    r: &mut ScenarioResult,
    t: &Targets,
) -> anyhow::Result<()> {
    let hold = t.hold;
    let name = t.name;
    let mut rules = Rules::default();
    for id in cluster.replicas.keys() {
        rules.cut(Endpoint::Worker, Endpoint::Replica(*id));
    }
    r.target = "all workers".into();
    shared.say(format!("FAULT {name}: workers cut off from every replica"));
    let from_ms = wall_ms();
    hold_network(cluster, r, hold, rules).await;
    shared.isolated(
        cluster.workers.iter().map(|w| w.name.clone()).collect(),
        from_ms,
    );
    shared.say(format!("HEAL {name}: network healed"));
    Ok(())
}

/// Add latency to every link, each way.
async fn latency(
    cluster: &mut Cluster,
    shared: &Arc<Shared>,
    r: &mut ScenarioResult,
    t: &Targets,
) -> anyhow::Result<()> {
    let plan = &t.plan;
    let hold = t.hold;
    let name = t.name;
    let mut rules = Rules::default();
    let all: Vec<u64> = cluster.replicas.keys().copied().collect();
    for a in &all {
        for b in &all {
            if a != b {
                rules.delay(
                    Endpoint::Replica(*a),
                    Endpoint::Replica(*b),
                    plan.latency_ms,
                );
            }
        }
        rules.delay(Endpoint::Worker, Endpoint::Replica(*a), plan.latency_ms);
        rules.delay(Endpoint::Replica(*a), Endpoint::Worker, plan.latency_ms);
    }
    r.target = "every link".into();
    shared.say(format!(
        "FAULT {name}: {} ms added to every replica and worker link, each way",
        plan.latency_ms
    ));
    hold_network(cluster, r, hold, rules).await;
    shared.say(format!("HEAL {name}: latency removed"));
    Ok(())
}

/// SIGTERM and restart each replica in turn, the leader last.
async fn rolling_restart(
    cluster: &mut Cluster,
    shared: &Arc<Shared>,
    r: &mut ScenarioResult,
    t: &Targets,
) -> anyhow::Result<()> {
    let leader = t.leader;
    let followers = &t.followers;
    let name = t.name;
    let mut order = followers.clone();
    order.push(leader);
    r.target = format!("nodes {order:?}");
    shared.say(format!("FAULT {name}: restarting nodes {order:?} in turn"));
    for id in order {
        let clean = cluster.terminate_replica(id, Duration::from_secs(20)).await;
        shared.say(format!(
            "  node {id} {}",
            if clean {
                "stopped on SIGTERM"
            } else {
                "did not stop within 20 s of SIGTERM: SIGKILLed"
            }
        ));
        if !clean {
            r.notes.push(format!("node {id} ignored SIGTERM for 20 s"));
        }
        cluster.start_replica(id)?;
        converge(cluster, shared, 0, CONVERGE_TIMEOUT)
            .await
            .map_err(|e| anyhow::anyhow!("after restarting node {id}: {e}"))?;
        shared.say(format!("  node {id} back and caught up"));
    }
    r.heal_at_ms = wall_ms();
    shared.say(format!("HEAL {name}: every replica restarted"));
    Ok(())
}

/// A new node joins; then a follower leaves with `fleet cluster leave`.
async fn membership(
    cluster: &mut Cluster,
    shared: &Arc<Shared>,
    r: &mut ScenarioResult,
    t: &Targets,
) -> anyhow::Result<()> {
    let leader = t.leader;
    let followers = &t.followers;
    let name = t.name;
    let pick = |v: &[u64]| t.pick(v);
    let new_id = cluster.replicas.keys().max().copied().unwrap_or(0) + 1;
    let peers = cluster.fronts().join(",");
    cluster.add_replica(new_id, Some(peers), None).await?;
    let real = cluster.replicas[&new_id].real.clone();
    cluster.start_replica(new_id)?;
    shared
        .observed
        .lock()
        .expect("observed")
        .insert(new_id, real);
    shared.say(format!("FAULT {name}: node {new_id} joins"));
    let leader_addr = cluster.replicas[&leader].real.clone();
    wait_for(Duration::from_secs(60), || async {
        let s = status_of(&leader_addr, Duration::from_secs(1))
            .await
            .map_err(|e| e.to_string())?;
        if s.members.iter().any(|m| m.id == new_id && m.voter) {
            Ok(())
        } else {
            Err(format!("node {new_id} is not a voter yet"))
        }
    })
    .await
    .map_err(|e| anyhow::anyhow!("node {new_id} did not become a voter: {e}"))?;
    *shared.fronts.lock().expect("fronts") = cluster.fronts();
    shared.say(format!("  node {new_id} is a voter"));
    let leaving = pick(followers);
    let addr = cluster.replicas[&leaving].real.clone();
    shared.say(format!("  node {leaving} leaves (fleet cluster leave)"));
    let mut c = Client::new(vec![addr], "fleet", Duration::from_secs(20))?;
    c.call(|cl, ctx| async move { cl.leave(ctx).await }).await?;
    if !cluster
        .wait_replica_exit(leaving, Duration::from_secs(30))
        .await
    {
        bail!("node {leaving} did not stop after leaving");
    }
    cluster.replicas.get_mut(&leaving).expect("replica").member = false;
    shared.observed.lock().expect("observed").remove(&leaving);
    *shared.fronts.lock().expect("fronts") = cluster.fronts();
    r.target = format!("+node {new_id}, -node {leaving}");
    r.heal_at_ms = wall_ms();
    shared.say(format!("HEAL {name}: node {leaving} left and stopped"));
    Ok(())
}

/// Cut every connection to the leader; its own outgoing connections work.
async fn inbound_cut(
    cluster: &mut Cluster,
    shared: &Arc<Shared>,
    r: &mut ScenarioResult,
    t: &Targets,
) -> anyhow::Result<()> {
    let leader = t.leader;
    let hold = t.hold;
    let name = t.name;
    // Raft still works (the leader's appends go out, the answers come back on its
    // own connections); nobody can open a connection to it.
    let mut rules = Rules::default();
    rules.cut_inbound(leader);
    r.target = format!("node {leader}");
    shared.say(format!(
        "FAULT {name}: every connection to node {leader} (leader) is cut; its own \
         outgoing connections work"
    ));
    hold_network(cluster, r, hold, rules).await;
    shared.say(format!("HEAL {name}: node {leader} is reachable again"));
    Ok(())
}

/// Step the leader's clock for the hold.
async fn clock_step(
    cluster: &mut Cluster,
    shared: &Arc<Shared>,
    r: &mut ScenarioResult,
    t: &Targets,
) -> anyhow::Result<()> {
    let plan = &t.plan;
    let leader = t.leader;
    let hold = t.hold;
    let name = t.name;
    // The leader: its clock times grants, heartbeats and expiries.
    let target = leader;
    let addr = cluster.replicas[&target].real.clone();
    r.target = format!("node {target}");
    shared.say(format!(
        "FAULT {name}: node {target}'s clock stepped {:+} ms",
        plan.clock_offset_ms
    ));
    inject(
        &addr,
        FaultRequest::ClockOffset {
            offset_ms: plan.clock_offset_ms,
        },
    )
    .await?;
    hold_fault(r, hold).await;
    inject(&addr, FaultRequest::ClockOffset { offset_ms: 0 }).await?;
    shared.say(format!("HEAL {name}: node {target}'s clock restored"));
    Ok(())
}

/// A network fault: `rules` hold for the plan's hold, then the network heals.
async fn hold_network(cluster: &Cluster, r: &mut ScenarioResult, hold: Duration, rules: Rules) {
    cluster.net.set(rules);
    hold_fault(r, hold).await;
    cluster.net.heal();
}

/// The safety phase: the fault holds (this sleep is the scenario, not synchronization), then
/// the heal time is stamped.
async fn hold_fault(r: &mut ScenarioResult, hold: Duration) {
    tokio::time::sleep(hold).await;
    r.heal_at_ms = wall_ms();
}

/// Sends a fault request to one replica directly.
async fn inject(addr: &str, req: FaultRequest) -> anyhow::Result<()> {
    let mut c = Client::new(vec![addr.to_string()], "fleet", Duration::from_secs(5))?;
    c.call(|cl, ctx| {
        let req = req.clone();
        async move { cl.inject_fault(ctx, req).await }
    })
    .await?;
    Ok(())
}

/// Every task, read linearizably through the leader, page by page.
async fn read_all_tasks(shared: &Shared) -> anyhow::Result<Vec<TaskRecord>> {
    let mut c = client(shared.fronts(), Duration::from_secs(10))?;
    list_tasks(&mut c, ReadMode::Linearizable).await
}

async fn list_tasks(c: &mut Client, mode: ReadMode) -> anyhow::Result<Vec<TaskRecord>> {
    let mut out = Vec::new();
    let mut after = None;
    loop {
        let filter = TaskFilter {
            state: None,
            queue: None,
            after,
            limit: 5_000,
        };
        let page = c
            .call(|cl, ctx| {
                let f = filter.clone();
                async move { cl.list_tasks(ctx, f, mode, 0).await }
            })
            .await?
            .value;
        let Some(last) = page.last() else { break };
        after = Some(last.id);
        out.extend(page.iter().map(TaskRecord::from_task));
    }
    Ok(out)
}

/// Waits until every acknowledged submission's task is final; returns every task.
async fn drain(shared: &Shared) -> Result<Vec<TaskRecord>, String> {
    let acked: Vec<u64> = shared
        .submissions
        .lock()
        .expect("subs")
        .iter()
        .filter_map(|s| s.acked)
        .collect();
    let last_report = std::cell::Cell::new(Instant::now());
    wait_for(DRAIN_TIMEOUT, || async {
        let tasks = read_all_tasks(shared).await.map_err(|e| e.to_string())?;
        let by_id: BTreeMap<u64, &TaskRecord> = tasks.iter().map(|t| (t.id, t)).collect();
        let open: Vec<u64> = acked
            .iter()
            .copied()
            .filter(|id| by_id.get(id).is_none_or(|t| !t.is_final()))
            .collect();
        if open.is_empty() {
            return Ok(tasks);
        }
        if last_report.get().elapsed() > Duration::from_secs(10) {
            last_report.set(Instant::now());
            shared.say(format!("  {} acknowledged tasks not final yet", open.len()));
        }
        Err(format!(
            "{} acknowledged tasks are not final, e.g. {:?}",
            open.len(),
            &open[..open.len().min(5)]
        ))
    })
    .await
}

/// Every running replica holds exactly the leader's tasks (local reads, once caught up).
async fn replicas_agree(cluster: &Cluster, shared: &Shared) -> Result<(), String> {
    converge(cluster, shared, 0, CONVERGE_TIMEOUT).await?;
    wait_for(Duration::from_secs(30), || async {
        let mut reference: Option<(u64, Vec<TaskRecord>)> = None;
        for (id, addr) in cluster.running() {
            let mut c = Client::new(vec![addr], "fleet", Duration::from_secs(10))
                .map_err(|e| e.to_string())?;
            let tasks = list_tasks(&mut c, ReadMode::Local)
                .await
                .map_err(|e| format!("node {id}: {e}"))?;
            match &reference {
                None => reference = Some((id, tasks)),
                Some((rid, rt)) if *rt != tasks => {
                    let diff = rt
                        .iter()
                        .zip(&tasks)
                        .find(|(a, b)| a != b)
                        .map(|(a, b)| format!("first difference: {a:?} vs {b:?}"))
                        .unwrap_or_else(|| format!("{} vs {} tasks", rt.len(), tasks.len()));
                    return Err(format!("node {id} differs from node {rid}: {diff}"));
                }
                Some(_) => {}
            }
        }
        Ok(())
    })
    .await
}
