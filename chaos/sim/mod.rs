//! `chaos sim`: the whole cluster in one process, driven by one seed.
//!
//! N replicas (openraft with fleet's own log store logic, state machine store, proposer and
//! scheduler core and loops) and M workers run as tasks of one single-threaded tokio runtime on
//! a paused clock: time only moves when every task waits, and jumps to the next timer, so a
//! minute of cluster time costs what its events cost. Everything that could differ between two
//! runs comes from the seed: the network's fate for every message ([`net`]), each disk's fsync
//! latency and what a crash loses ([`disk`]), each replica's clock skew and steps, openraft's
//! election timeouts (`fleet::raft::runtime::seed_thread`), fleet's own random draws
//! (`fleet::random::Random`), the workload and the faults. The same seed therefore replays the
//! same run event for event: [`trace::Trace`] hashes every event, and `--twice` checks that two
//! runs agree.
//!
//! After the faults, the run heals, waits for every acknowledged task to end and for the
//! replicas to converge, and judges the history with the same checker as `chaos run`
//! (`checker::check`), plus the state machine's own invariants after every applied entry and
//! the replicas' agreement. A failing seed prints the command that replays it.

pub mod disk;
pub mod net;
pub mod node;
pub mod trace;
pub mod worker;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleet::clock::Clock;
use fleet::error::Error;
use fleet::raft::NodeId;
use fleet::state::{Command, CommandOutput, RequestId, RetryPolicy, TaskSpec};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::history::{ExecEvent, ExecKind, History, Isolation, LeaderObs, Submission, TaskRecord};
use disk::Disk;
use net::{Endpoint, Fabric, Weather};
use node::{Node, SimBugs};
use trace::Trace;
use worker::Worker;

/// The wall clock at a run's start (any fixed instant: the run must not depend on the host).
const EPOCH_MS: u64 = 1_800_000_000_000;
const CLIENT: Endpoint = 900;
/// The reader's endpoint (linearizable reads, [`reader`]).
const READER: Endpoint = 901;
/// The operator's endpoint (`fleet task requeue`, [`operator`]).
const OPERATOR: Endpoint = 902;
const WORKER_ENDPOINTS: Endpoint = 1_000;

#[derive(clap::Args, Debug, Clone)]
pub struct SimArgs {
    /// Run this one seed (prints its events' hash and figures).
    #[arg(long, conflicts_with = "seeds")]
    pub seed: Option<u64>,
    /// Run this many seeds, from --base on.
    #[arg(long)]
    pub seeds: Option<u64>,
    /// The first seed of --seeds (random when not given; printed).
    #[arg(long)]
    pub base: Option<u64>,
    /// Simulated time of faults and workload per seed (then the run heals and converges).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Replicas (3 or 5).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=7))]
    pub replicas: u64,
    /// Workers.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=20))]
    pub workers: u64,
    /// Re-introduce a known bug class (test only), to show the simulator finds it:
    /// expire-ignores-token, grant-skips-recheck, heartbeat-extends-expired,
    /// worker-ignores-lapse, heartbeat-ignores-pending-expiry.
    #[arg(long = "bug", value_parser = ["expire-ignores-token", "grant-skips-recheck", "heartbeat-extends-expired", "worker-ignores-lapse", "heartbeat-ignores-pending-expiry"])]
    pub bugs: Vec<String>,
    /// Run each seed twice and require the same event trace (determinism).
    #[arg(long)]
    pub twice: bool,
    /// Print every event of the run (use with --seed).
    #[arg(long)]
    pub trace: bool,
    /// Seeds run in parallel (one thread each).
    #[arg(long, default_value_t = 2)]
    pub jobs: usize,
    /// Stop at the first failing seed.
    #[arg(long)]
    pub fail_fast: bool,
}

impl SimArgs {
    fn sim_bugs(&self) -> SimBugs {
        let mut b = SimBugs::default();
        for name in &self.bugs {
            match name.as_str() {
                "expire-ignores-token" => b.state.expire_ignores_token = true,
                "grant-skips-recheck" => b.state.grant_skips_recheck = true,
                "heartbeat-extends-expired" => b.core.heartbeat_extends_expired = true,
                "worker-ignores-lapse" => b.worker_ignores_lapse = true,
                "heartbeat-ignores-pending-expiry" => {
                    b.core.heartbeat_ignores_pending_expiry = true
                }
                _ => unreachable!("clap checked the name"),
            }
        }
        b
    }

    /// The command that replays `seed` with these options.
    pub fn replay(&self, seed: u64) -> String {
        let mut c = format!("chaos sim --seed {seed}");
        if self.duration != Duration::from_secs(60) {
            c += &format!(" --duration {}", humantime::format_duration(self.duration));
        }
        if self.replicas != 3 {
            c += &format!(" --replicas {}", self.replicas);
        }
        if self.workers != 3 {
            c += &format!(" --workers {}", self.workers);
        }
        for b in &self.bugs {
            c += &format!(" --bug {b}");
        }
        c
    }
}

/// What the run observed, as the checker takes it.
pub struct Recorder {
    trace: Arc<Trace>,
    h: Mutex<History>,
}

impl Recorder {
    fn now(&self) -> u64 {
        EPOCH_MS + self.trace.now_ms()
    }

    #[allow(clippy::too_many_arguments)]
    pub fn exec(
        &self,
        kind: ExecKind,
        task: u64,
        key: &str,
        attempt: u32,
        token: u64,
        worker: &str,
        exit: Option<i32>,
    ) {
        self.trace.event(format_args!(
            "exec {kind:?} task {task} token {token} on {worker} exit {exit:?}"
        ));
        let t_ms = self.now();
        self.h.lock().expect("history").executions.push(ExecEvent {
            kind,
            key: key.to_string(),
            task,
            attempt,
            token,
            worker: worker.to_string(),
            pid: 0,
            t_ms,
            exit,
        });
    }
}

/// Figures of one seed's run.
#[derive(Debug, Default, Clone)]
pub struct Outcome {
    pub seed: u64,
    pub hash: u64,
    pub events: u64,
    pub sim_ms: u64,
    pub wall_ms: u64,
    pub messages: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub cut: u64,
    pub crashes: u64,
    pub partitions: u64,
    pub clock_steps: u64,
    pub worker_crashes: u64,
    /// Workers stopped as by SIGTERM (drain, then leave).
    pub worker_stops: u64,
    /// Linearizable reads answered and checked against real time.
    pub reads: u64,
    /// Operator requeues sent, and those that ended the attempt they named.
    pub requeues: u64,
    pub requeued: u64,
    pub unsynced_lost: u64,
    pub submitted: u64,
    pub executions: u64,
    pub violations: Vec<String>,
}

thread_local! {
    /// Panics on this thread during the current run (a task's panic is caught by tokio and
    /// would otherwise only stop that task: the state machine's invariant checks panic).
    static PANICS: std::cell::RefCell<Vec<String>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Records every panic of a simulated run in its thread's list instead of printing it.
fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            let msg = info
                .payload()
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| info.payload().downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "a panic".into());
            let at = info
                .location()
                .map(|l| format!(" at {l}"))
                .unwrap_or_default();
            PANICS.with(|p| p.borrow_mut().push(format!("[panic] {msg}{at}")));
        }))
    });
}

/// Simulated time a run may take past its `--duration` (healing, converging and judging take
/// at most about 4 minutes of it) before it is declared hung.
const HANG_AFTER: Duration = Duration::from_secs(600);

/// Runs one seed on this thread (a fresh paused runtime) and judges it.
pub fn run_seed(seed: u64, args: &SimArgs) -> Outcome {
    install_panic_hook();
    PANICS.with(|p| p.borrow_mut().clear());
    let started = std::time::Instant::now();
    fleet::raft::runtime::seed_thread(Some(seed ^ 0x5eed));
    // tokio's own randomness (select! branch order, watch notifier choice) from the seed too.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .rng_seed(tokio::runtime::RngSeed::from_bytes(&seed.to_le_bytes()))
        .build()
        .expect("a tokio runtime");
    let args2 = args.clone();
    // A run that does not end (a retry loop with nothing to retry against) is cut off in
    // simulated time, with a verdict, rather than hanging the whole batch.
    let limit = args.duration + HANG_AFTER;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        rt.block_on(async {
            match tokio::time::timeout(limit, world(seed, args2)).await {
                Ok(o) => o,
                Err(_) => Outcome {
                    seed,
                    violations: vec![format!(
                        "[hang] the run did not end within {} simulated seconds",
                        limit.as_secs()
                    )],
                    ..Default::default()
                },
            }
        })
    }));
    rt.shutdown_background();
    fleet::raft::runtime::seed_thread(None);
    let mut out = match result {
        Ok(o) => o,
        // The hook recorded the message.
        Err(_) => Outcome {
            seed,
            ..Default::default()
        },
    };
    let panics = PANICS.with(|p| std::mem::take(&mut *p.borrow_mut()));
    if !panics.is_empty() {
        // The first panic explains what followed (a stalled state machine, no convergence).
        let mut v: Vec<String> = panics.into_iter().take(3).collect();
        v.extend(std::mem::take(&mut out.violations));
        out.violations = v;
    }
    out.wall_ms = started.elapsed().as_millis() as u64;
    out
}

struct World {
    args: SimArgs,
    rng: Mutex<StdRng>,
    fabric: Arc<Fabric>,
    disks: BTreeMap<NodeId, Disk>,
    clocks: BTreeMap<NodeId, Clock>,
    rec: Arc<Recorder>,
    bugs: SimBugs,
    seed: u64,
    incarnation: Mutex<u64>,
    workers: Mutex<BTreeMap<u64, Arc<Worker>>>,
    next_worker: Mutex<u64>,
    stats: Mutex<Outcome>,
    violations: node::Violations,
    /// Every (task, fencing token) the operator asked to requeue.
    requeues: Mutex<std::collections::BTreeSet<(u64, u64)>>,
}

impl World {
    fn draw<T>(&self, f: impl FnOnce(&mut StdRng) -> T) -> T {
        f(&mut self.rng.lock().expect("world rng"))
    }

    async fn start_node(&self, id: NodeId) -> Arc<Node> {
        let inc = {
            let mut i = self.incarnation.lock().expect("inc");
            *i += 1;
            *i
        };
        let seed = self.seed.wrapping_mul(31).wrapping_add(inc);
        Node::start(
            id,
            &self.disks[&id],
            &self.fabric,
            self.clocks[&id].clone(),
            seed,
            self.bugs,
            self.violations.clone(),
        )
        .await
    }

    fn start_worker(&self) {
        let id = {
            let mut n = self.next_worker.lock().expect("next worker");
            *n += 1;
            *n
        };
        let seed = self.seed.wrapping_mul(131).wrapping_add(id);
        let w = Worker::start(
            id,
            WORKER_ENDPOINTS + id,
            self.args.replicas,
            self.fabric.clone(),
            self.rec.clone(),
            seed,
            self.bugs.worker_ignores_lapse,
        );
        self.workers.lock().expect("workers").insert(id, w);
    }

    fn stat(&self, f: impl FnOnce(&mut Outcome)) {
        f(&mut self.stats.lock().expect("stats"))
    }

    fn leader(&self) -> Option<Arc<Node>> {
        self.fabric
            .nodes()
            .into_iter()
            .filter(|n| n.leadership().1 == Some(n.id))
            .max_by_key(|n| n.leadership().0)
    }
}

async fn world(seed: u64, args: SimArgs) -> Outcome {
    let trace = Arc::new(Trace::new(args.trace));
    let rec = Arc::new(Recorder {
        trace: trace.clone(),
        h: Mutex::new(History {
            seed,
            ..Default::default()
        }),
    });
    let mut rng = StdRng::seed_from_u64(seed);
    let n = args.replicas;
    let disks = (1..=n).map(|id| (id, Disk::new(rng.random()))).collect();
    let clocks = (1..=n)
        .map(|id| (id, Clock::simulated(EPOCH_MS, rng.random_range(-200..=200))))
        .collect();
    let fabric = Fabric::new(rng.random(), trace.clone());
    let w = Arc::new(World {
        bugs: args.sim_bugs(),
        args: args.clone(),
        rng: Mutex::new(rng),
        fabric,
        disks,
        clocks,
        rec: rec.clone(),
        seed,
        incarnation: Mutex::new(0),
        workers: Mutex::new(BTreeMap::new()),
        next_worker: Mutex::new(0),
        stats: Mutex::new(Outcome {
            seed,
            ..Default::default()
        }),
        violations: Default::default(),
        requeues: Default::default(),
    });
    for id in 1..=n {
        w.start_node(id).await;
    }
    let first = w.fabric.node(1).expect("node 1 is up");
    first
        .raft
        .initialize(node::members(n))
        .await
        .expect("a fresh cluster initializes");
    setup_schedules(&w).await;
    setup_workflows(&w).await;
    for _ in 0..args.workers {
        w.start_worker();
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let client = tokio::spawn(client(w.clone(), stop_rx.clone()));
    let runs = tokio::spawn(start_runs(w.clone(), stop_rx.clone()));
    let observer = tokio::spawn(observe(w.clone(), stop_rx.clone()));
    let reads = tokio::spawn(reader(w.clone(), stop_rx.clone()));
    let ops = tokio::spawn(operator(w.clone(), stop_rx));
    faults(&w, args.duration).await;
    let _ = stop_tx.send(true);
    let _ = client.await;
    let _ = runs.await;
    let _ = reads.await;
    let _ = ops.await;
    heal(&w).await;
    let converged = pause_schedules(&w).await && settle(&w).await;
    observer.abort();
    let mut violations = finish(&w, converged).await;
    violations.extend(
        w.violations
            .lock()
            .expect("violations")
            .iter()
            .take(5)
            .cloned(),
    );
    for n in w.fabric.nodes() {
        n.crash().await;
    }
    for wk in w.workers.lock().expect("workers").values() {
        wk.crash();
    }
    let mut out = w.stats.lock().expect("stats").clone();
    let h = rec.h.lock().expect("history");
    violations.extend(crate::checker::check(&h).into_iter().map(|v| v.to_string()));
    let net = w.fabric.stats();
    let (hash, events) = trace.hash();
    out.hash = hash;
    out.events = events;
    out.sim_ms = trace.now_ms();
    out.messages = net.messages;
    out.lost = net.lost;
    out.duplicated = net.duplicated;
    out.cut = net.cut;
    out.submitted = h.submissions.len() as u64;
    out.executions = h
        .executions
        .iter()
        .filter(|e| e.kind == ExecKind::Start)
        .count() as u64;
    out.unsynced_lost += 0;
    out.violations = violations;
    out
}

/// The pool a fifth of the short tasks and one schedule use.
const POOL: &str = "chaos-pool";
const POOL_SLOTS: u32 = 2;

/// The schedules: name, cron (with seconds) or interval, catch-up policy, pooled. Their runs
/// are judged by the tick-exactly-once and pool-over invariants, as in `chaos run --schedules`.
const SCHEDULES: [(&str, Option<&str>, u64, &str, bool); 4] = [
    ("every-1s", None, 1_000, "all", false),
    ("every-1s-none", None, 1_000, "none", false),
    ("cron-2s-latest", Some("*/2 * * * * *"), 0, "latest", false),
    ("pooled-3s", None, 3_000, "all", true),
];

fn task_spec(pooled: bool) -> TaskSpec {
    let mut spec = TaskSpec::new(vec!["sim".into()], "default");
    spec.visibility_timeout_ms = 3_000;
    spec.retry = RetryPolicy {
        max_attempts: 6,
        backoff_initial_ms: 100,
        backoff_max_ms: 1_000,
        backoff_multiplier_permille: 2_000,
    };
    if pooled {
        spec.env.push(("CHAOS_POOL".into(), POOL.into()));
    }
    spec
}

/// Creates the pool and the schedules (through the network, retried until applied).
async fn setup_schedules(w: &Arc<World>) {
    use fleet::state::{CatchupPolicy, OverlapPolicy, PoolClaim, PutMode, ScheduleSpec, Trigger};
    let mut commands = vec![Command::SetPool {
        name: POOL.into(),
        slots: POOL_SLOTS,
    }];
    for (name, cron, every_ms, catchup, pooled) in SCHEDULES {
        let trigger = match cron {
            Some(expr) => Trigger::Cron {
                expr: expr.into(),
                timezone: "UTC".into(),
            },
            None => Trigger::Every {
                every_ms,
                anchor_ms: EPOCH_MS,
            },
        };
        commands.push(Command::PutSchedule {
            name: name.into(),
            spec: ScheduleSpec {
                trigger,
                start_at_ms: None,
                end_at_ms: None,
                catchup: catchup.parse::<CatchupPolicy>().expect("a policy"),
                catchup_window_ms: 3_600_000,
                overlap: OverlapPolicy::Allow,
                jitter_ms: 0,
                task: task_spec(pooled),
                pool: pooled.then(|| PoolClaim {
                    pool: POOL.into(),
                    slots: 1,
                }),
            },
            paused: None,
            mode: PutMode::CreateOrReplace,
        });
    }
    let mut guess = 1;
    for c in commands {
        while let Err(e) = propose(w, &mut guess, c.clone()).await {
            w.rec.trace.event(format_args!("setup retried: {e}"));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// The workflows: a diamond `a -> (b, c) -> d -> e (all_done)` whose `b` fails its first
/// attempt, and a fan-out `root -> f0..f9 -> join`; a run of one of them starts every 2 s.
fn workflow_defs() -> Vec<fleet::rpc::workflows::WorkflowDef> {
    use fleet::rpc::workflows::{WorkflowDef, WorkflowTaskDef};
    use fleet::state::workflows::TriggerRule::{AllDone, AllSuccess};
    let node = |after: &[&str], trigger, fail_first: bool| WorkflowTaskDef {
        task: fleet::rpc::NewTask {
            command: vec!["sim".into()],
            max_attempts: Some(5),
            backoff_initial_ms: Some(100),
            backoff_max_ms: Some(1_000),
            visibility_timeout_ms: Some(3_000),
            env: if fail_first {
                [(worker::FAIL_FIRST.to_string(), "1".to_string())].into()
            } else {
                Default::default()
            },
            ..Default::default()
        },
        after: after.iter().map(|s| s.to_string()).collect(),
        trigger,
    };
    let mut diamond = BTreeMap::new();
    diamond.insert("a".to_string(), node(&[], AllSuccess, false));
    diamond.insert("b".to_string(), node(&["a"], AllSuccess, true));
    diamond.insert("c".to_string(), node(&["a"], AllSuccess, false));
    diamond.insert("d".to_string(), node(&["b", "c"], AllSuccess, false));
    diamond.insert("e".to_string(), node(&["d"], AllDone, false));
    let mut fanout = BTreeMap::new();
    fanout.insert("root".to_string(), node(&[], AllSuccess, false));
    let leaves: Vec<String> = (0..10).map(|i| format!("f{i}")).collect();
    for l in &leaves {
        fanout.insert(l.clone(), node(&["root"], AllSuccess, false));
    }
    let refs: Vec<&str> = leaves.iter().map(String::as_str).collect();
    fanout.insert("join".to_string(), node(&refs, AllSuccess, false));
    [("sim-diamond", diamond), ("sim-fanout", fanout)]
        .into_iter()
        .map(|(name, tasks)| WorkflowDef {
            name: name.into(),
            max_active_runs: Some(50),
            tasks,
            schedule: None,
        })
        .collect()
}

/// Stores the workflows, resolved as the leader resolves `fleet workflow apply`.
async fn setup_workflows(w: &Arc<World>) {
    let mut guess = 1;
    for def in workflow_defs() {
        let (spec, schedule) = fleet::rpc::workflows::resolve(&def, &node::config(), EPOCH_MS)
            .expect("the simulator's workflows are valid");
        let c = Command::PutWorkflow {
            name: def.name.clone(),
            spec,
            schedule,
        };
        while propose(w, &mut guess, c.clone()).await.is_err() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Starts a run every 2 s (the workflows in turn), each with its own request id, retried
/// through failures; records the acknowledged ones.
async fn start_runs(w: Arc<World>, stop: tokio::sync::watch::Receiver<bool>) {
    let names: Vec<String> = workflow_defs().into_iter().map(|d| d.name).collect();
    let mut guess: NodeId = 1;
    let mut n = 0u128;
    while !*stop.borrow() {
        tokio::time::sleep(Duration::from_secs(2)).await;
        n += 1;
        let c = Command::StartRun {
            workflow: names[n as usize % names.len()].clone(),
            request_id: RequestId(1 << 64 | n),
            params: Vec::new(),
        };
        for _ in 0..5 {
            if let Ok(CommandOutput::RunStarted { run, .. }) =
                propose(&w, &mut guess, c.clone()).await
            {
                w.rec.trace.event(format_args!("run {} started", run.0));
                w.rec.h.lock().expect("history").runs_started.push(run.0);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Every run with its tasks, as the checker takes them.
fn run_records(s: &fleet::state::State) -> Vec<crate::history::RunRecord> {
    use crate::history::{NodeRecord, RunRecord};
    let mut ids = Vec::new();
    loop {
        let page = fleet::rpc::workflows::RunFilter {
            limit: fleet::rpc::workflows::MAX_RUN_LIST,
            before: ids.last().copied(),
            ..Default::default()
        };
        let got: Vec<_> = fleet::rpc::workflows::run_views(s, &page)
            .unwrap_or_default()
            .into_iter()
            .map(|r| r.id)
            .collect();
        if got.is_empty() {
            break;
        }
        ids.extend(got);
    }
    ids.into_iter()
        .filter_map(|id| {
            let f = fleet::rpc::workflows::RunFilter {
                run: Some(id),
                ..Default::default()
            };
            fleet::rpc::workflows::run_views(s, &f).ok()?.pop()
        })
        .map(|v| RunRecord {
            id: v.id.0,
            workflow: v.workflow,
            status: v.status.as_str().to_string(),
            nodes: v
                .nodes
                .into_iter()
                .map(|n| NodeRecord {
                    name: n.name,
                    after: n.after,
                    trigger: n.trigger.as_str().to_string(),
                    state: fleet::rpc::workflows::node_state_name(n.state).to_string(),
                    task: n.task.map(|t| t.0),
                })
                .collect(),
        })
        .collect()
}

/// Pauses the schedules, so their watermarks stop before they are read back. False when the
/// healed cluster did not commit the pauses within 120 s (a run that broke its replicas, such
/// as a state invariant's panic, must end with a verdict rather than retry forever).
async fn pause_schedules(w: &Arc<World>) -> bool {
    let mut guess = 1;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    for (name, ..) in SCHEDULES {
        let c = Command::PauseSchedule {
            name: name.into(),
            paused: true,
        };
        while propose(w, &mut guess, c.clone()).await.is_err() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    true
}

/// The workload: tasks of four kinds submitted to the leader the client believes in, retried
/// with the same request id until acknowledged or given up; some are cancelled later.
async fn client(w: Arc<World>, stop: tokio::sync::watch::Receiver<bool>) {
    let mut guess: NodeId = 1;
    let mut n = 0u64;
    while !*stop.borrow() {
        let pause = w.draw(|r| r.random_range(50..250));
        tokio::time::sleep(Duration::from_millis(pause)).await;
        n += 1;
        let (kind, cancel_after) = w.draw(|r| match r.random_range(0..100) {
            0..55 => ("short", None),
            55..80 => ("long", None),
            80..92 => ("flaky", None),
            _ => ("cancel", Some(r.random_range(0..1_500u64))),
        });
        let key = format!("{kind}-{n}");
        // A fifth of the short tasks hold a slot of the pool.
        let pooled = kind == "short" && w.draw(|r| r.random_range(0..5)) == 0;
        let mut spec = task_spec(pooled);
        spec.idempotency_key = Some(key.clone());
        // Visibility timeouts from 1.5 s to 4 s: short ones make a lossy link outlast them.
        spec.visibility_timeout_ms = w.draw(|r| r.random_range(1_500..=4_000));
        let t_ms = w.rec.now();
        let request_id = RequestId(u128::from(n));
        let command = if pooled {
            Command::SubmitPooled {
                request_id,
                spec,
                pool: fleet::state::PoolClaim {
                    pool: POOL.into(),
                    slots: 1,
                },
            }
        } else {
            Command::SubmitTask { request_id, spec }
        };
        let mut acked = None;
        let mut error = None;
        for _ in 0..8 {
            match propose(&w, &mut guess, command.clone()).await {
                Ok(CommandOutput::TaskSubmitted { id, .. }) => {
                    acked = Some(id.0);
                    break;
                }
                Ok(other) => {
                    error = Some(format!("{other:?}"));
                    break;
                }
                Err(e) => {
                    error = Some(e);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        w.rec.trace.event(format_args!("submit {key} -> {acked:?}"));
        let acked_at_ms = acked.map(|_| w.rec.now());
        w.rec
            .h
            .lock()
            .expect("history")
            .submissions
            .push(Submission {
                key,
                kind: kind.into(),
                t_ms,
                acked,
                acked_at_ms,
                error: if acked.is_some() { None } else { error },
            });
        if let (Some(id), Some(after)) = (acked, cancel_after) {
            let w2 = w.clone();
            let start = guess;
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(after)).await;
                let mut g = start;
                for _ in 0..5 {
                    let c = Command::Cancel {
                        task: fleet::state::TaskId(id),
                    };
                    if propose(&w2, &mut g, c).await.is_ok() {
                        break;
                    }
                }
            });
        }
    }
}

/// One client command through the network to the guessed leader.
async fn propose(w: &Arc<World>, guess: &mut NodeId, c: Command) -> Result<CommandOutput, String> {
    let r = w
        .fabric
        .call(
            "propose",
            CLIENT,
            *guess,
            Duration::from_secs(3),
            c,
            |n, c| async move { n.propose(c).await },
        )
        .await;
    match r {
        Ok(Ok(out)) => Ok(out),
        Ok(Err(e)) => {
            *guess = match &e {
                Error::NotLeader {
                    leader_id: Some(l), ..
                } => *l,
                _ => *guess % w.args.replicas + 1,
            };
            Err(e.to_string())
        }
        Err(f) => {
            *guess = *guess % w.args.replicas + 1;
            Err(f.to_string())
        }
    }
}

/// A second client: linearizable reads of the tasks (ReadIndex at the leader), judged against
/// real time. A read must show every task whose submission was acknowledged before the read
/// was sent, and no task may look younger to a read than it did to a read answered before this
/// one was sent (a final state stays final, attempts never disappear). Its own random source,
/// so the workload's and the faults' draws stay as they are.
async fn reader(w: Arc<World>, stop: tokio::sync::watch::Receiver<bool>) {
    let mut rng = StdRng::seed_from_u64(w.seed ^ 0x7ead);
    let mut guess: NodeId = 1;
    // task -> (final state or "", attempts, when the read that saw it was answered)
    let mut seen: BTreeMap<u64, (&'static str, usize, u64)> = BTreeMap::new();
    let mut found = 0;
    while !*stop.borrow() && found < 3 {
        tokio::time::sleep(Duration::from_millis(rng.random_range(100..400))).await;
        let sent_ms = w.rec.now();
        let acked: Vec<(u64, u64)> = {
            let h = w.rec.h.lock().expect("history");
            h.submissions
                .iter()
                .filter_map(|s| match (s.acked, s.acked_at_ms) {
                    (Some(id), Some(at)) if at < sent_ms => Some((id, at)),
                    _ => None,
                })
                .collect()
        };
        let ids: Vec<u64> = acked.iter().map(|(id, _)| *id).collect();
        let r = w
            .fabric
            .call(
                "read",
                READER,
                guess,
                Duration::from_secs(2),
                ids,
                |n, ids| async move {
                    n.read(move |s| {
                        ids.iter()
                            .map(|id| {
                                s.task(fleet::state::TaskId(*id)).map(|t| {
                                    let fin = if t.state.is_final() {
                                        t.state.as_str()
                                    } else {
                                        ""
                                    };
                                    (fin, t.attempts.len())
                                })
                            })
                            .collect::<Vec<_>>()
                    })
                    .await
                    .map(|v| (v, n.id))
                },
            )
            .await;
        let (view, by) = match r {
            Ok(Ok(v)) => v,
            _ => {
                guess = guess % w.args.replicas + 1;
                continue;
            }
        };
        let answered_ms = w.rec.now();
        w.stat(|s| s.reads += 1);
        let mut wrong = Vec::new();
        for ((id, acked_at), now) in acked.iter().zip(view) {
            let Some((fin, attempts)) = now else {
                wrong.push(format!(
                    "[linearizable] a read sent at {sent_ms} ms and answered by replica {by} \
                     does not show task {id}, whose submission was acknowledged at {acked_at} ms"
                ));
                continue;
            };
            if let Some((was, was_attempts, at)) = seen.get(id) {
                if *at < sent_ms && ((!was.is_empty() && *was != fin) || attempts < *was_attempts) {
                    wrong.push(format!(
                        "[linearizable] task {id}: a read answered at {at} ms saw it {:?} with \
                         {was_attempts} attempts; a later read (sent at {sent_ms} ms, replica \
                         {by}) sees {:?} with {attempts}",
                        was, fin
                    ));
                }
            }
            seen.insert(*id, (fin, attempts, answered_ms));
        }
        found += wrong.len();
        w.violations.lock().expect("violations").extend(wrong);
    }
}

/// A third client: an operator running `fleet task requeue`. Every 1-3 s they read the running
/// attempts (linearizable), pick one, take up to a second to type the command, and requeue it
/// by the fencing token they saw; a call that fails is retried as the CLI retries, and one time
/// in three they run the same command again a little later (it did not seem to take). By then
/// the attempt may have ended and the task run again under a newer token: the requeue must
/// then change nothing. Every (task, token) named is recorded, and [`requeued_unnamed`] judges
/// that a requeue ended only attempts someone named. Its own random source.
async fn operator(w: Arc<World>, stop: tokio::sync::watch::Receiver<bool>) {
    let mut rng = StdRng::seed_from_u64(w.seed ^ 0x0e7a);
    let mut guess: NodeId = 1;
    while !*stop.borrow() {
        tokio::time::sleep(Duration::from_millis(rng.random_range(1_000..3_000))).await;
        let r = w
            .fabric
            .call(
                "read-running",
                OPERATOR,
                guess,
                Duration::from_secs(2),
                (),
                |n, ()| async move {
                    n.read(|s| {
                        s.leases()
                            .map(|(t, l)| (t.id.0, l.fencing_token))
                            .collect::<Vec<_>>()
                    })
                    .await
                },
            )
            .await;
        let running = match r {
            Ok(Ok(v)) => v,
            _ => {
                guess = guess % w.args.replicas + 1;
                continue;
            }
        };
        if running.is_empty() {
            continue;
        }
        let (task, token) = running[rng.random_range(0..running.len())];
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..1_000))).await;
        requeue(&w, &mut guess, &mut rng, task, token).await;
        if rng.random_range(0..3) == 0 {
            tokio::time::sleep(Duration::from_millis(rng.random_range(300..2_000))).await;
            requeue(&w, &mut guess, &mut rng, task, token).await;
        }
    }
}

/// One `fleet task requeue --token` through the network, retried on retryable errors.
async fn requeue(w: &Arc<World>, guess: &mut NodeId, rng: &mut StdRng, task: u64, token: u64) {
    w.requeues.lock().expect("requeues").insert((task, token));
    w.stat(|s| s.requeues += 1);
    for _ in 0..4 {
        let r = w
            .fabric
            .call(
                "requeue",
                OPERATOR,
                *guess,
                Duration::from_secs(3),
                (task, token),
                |n, (task, token)| async move {
                    n.requeue(fleet::state::TaskId(task), token).await
                },
            )
            .await;
        match r {
            Ok(Ok(state)) => {
                w.rec.trace.event(format_args!(
                    "requeue task {task} token {token} -> {}",
                    state.as_str()
                ));
                w.stat(|s| s.requeued += 1);
                return;
            }
            Ok(Err(Error::StaleToken(_))) => {
                w.rec
                    .trace
                    .event(format_args!("requeue task {task} token {token} -> stale"));
                return;
            }
            Ok(Err(e)) if e.is_retryable() => {
                *guess = match &e {
                    Error::NotLeader {
                        leader_id: Some(l), ..
                    } => *l,
                    _ => *guess % w.args.replicas + 1,
                };
            }
            Ok(Err(_)) => return,
            Err(_) => *guess = *guess % w.args.replicas + 1,
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(100..300))).await;
    }
}

/// What each replica says about leadership, every 100 ms.
async fn observe(w: Arc<World>, stop: tokio::sync::watch::Receiver<bool>) {
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let t_ms = w.rec.now();
        let obs: Vec<LeaderObs> = w
            .fabric
            .nodes()
            .iter()
            .map(|n| {
                let (term, leader) = n.leadership();
                LeaderObs {
                    t_ms,
                    node: n.id,
                    term,
                    leader,
                }
            })
            .collect();
        w.rec.h.lock().expect("history").leaders.extend(obs);
        let _ = &stop;
    }
}

/// The fault schedule: calm, a fault for a while, heal; until `duration` has passed.
async fn faults(w: &Arc<World>, duration: Duration) {
    let end = tokio::time::Instant::now() + duration;
    while tokio::time::Instant::now() < end {
        let calm = w.draw(|r| r.random_range(500..3_000));
        tokio::time::sleep(Duration::from_millis(calm)).await;
        let (fault, hold) = w.draw(|r| (r.random_range(0..10u8), r.random_range(500..5_000u64)));
        let n = w.args.replicas;
        let victim: NodeId = match (w.draw(|r| r.random_bool(0.5)), w.leader()) {
            (true, Some(l)) => l.id,
            _ => w.draw(|r| r.random_range(1..=n)),
        };
        w.rec
            .trace
            .event(format_args!("fault {fault} on {victim} for {hold} ms"));
        let hold = Duration::from_millis(hold);
        match fault {
            0 | 1 => crash_replica(w, victim, hold).await,
            2 => isolate_replica(w, victim, hold, true).await,
            3 => isolate_replica(w, victim, hold, false).await,
            4 => bad_weather(w, hold).await,
            5 => clock_step(w, victim, hold).await,
            6 => worker_dies(w, hold).await,
            8 => worker_frozen(w, hold).await,
            9 => worker_stops(w, hold).await,
            _ => worker_cut_off(w, hold).await,
        }
    }
}

/// Crashes a replica (the leader half the time; its unsynced writes may be lost) and restarts
/// it from its disk after `hold`.
async fn crash_replica(w: &Arc<World>, victim: NodeId, hold: Duration) {
    let Some(node) = w.fabric.node(victim) else {
        return;
    };
    w.fabric.down(victim);
    node.crash().await;
    let lost = w.disks[&victim].crash() as u64;
    w.stat(|s| {
        s.crashes += 1;
        s.unsynced_lost += lost;
    });
    tokio::time::sleep(hold).await;
    w.start_node(victim).await;
}

/// Cuts a replica from the others: both ways, or only what it sends (it hears them but cannot
/// reach them).
async fn isolate_replica(w: &Arc<World>, victim: NodeId, hold: Duration, both_ways: bool) {
    for other in (1..=w.args.replicas).filter(|o| *o != victim) {
        w.fabric.cut(victim, other);
        if both_ways {
            w.fabric.cut(other, victim);
        }
    }
    w.stat(|s| s.partitions += 1);
    tokio::time::sleep(hold).await;
    w.fabric.heal();
}

/// A lossy, duplicating network with slow messages, for `hold`.
async fn bad_weather(w: &Arc<World>, hold: Duration) {
    let weather = w.draw(|r| Weather {
        loss: r.random_range(0.02..0.6),
        duplicate: r.random_range(0.0..0.2),
        slow: r.random_range(0.0..0.2),
    });
    w.fabric.set_weather(weather);
    tokio::time::sleep(hold).await;
    w.fabric.set_weather(Weather::CALM);
}

/// A clock step on one replica (NTP jumping, `date -s`), then back.
async fn clock_step(w: &Arc<World>, victim: NodeId, hold: Duration) {
    let step =
        w.draw(|r| r.random_range(5_000..60_000i64) * if r.random_bool(0.5) { 1 } else { -1 });
    w.clocks[&victim].step(step);
    w.stat(|s| s.clock_steps += 1);
    tokio::time::sleep(hold).await;
    w.clocks[&victim].step(0);
}

/// One of the workers, drawn from the run's sequence.
fn some_worker(w: &Arc<World>) -> Arc<Worker> {
    let all: Vec<Arc<Worker>> = w
        .workers
        .lock()
        .expect("workers")
        .values()
        .cloned()
        .collect();
    all[w.draw(|r| r.random_range(0..all.len()))].clone()
}

/// A worker's machine dies (its tasks with it); a new worker takes its place.
async fn worker_dies(w: &Arc<World>, hold: Duration) {
    let id = some_worker(w).info.id.0;
    if let Some(wk) = w.workers.lock().expect("workers").remove(&id) {
        wk.crash();
    }
    w.stat(|s| s.worker_crashes += 1);
    tokio::time::sleep(hold.min(Duration::from_secs(2))).await;
    w.start_worker();
}

/// A worker stopped as by SIGTERM (a deploy): it drains for up to a third of `hold` (0.2-1.7 s,
/// so long tasks often do not end in time and are killed), leaves, and a new worker takes its
/// place.
async fn worker_stops(w: &Arc<World>, hold: Duration) {
    let id = some_worker(w).info.id.0;
    let Some(wk) = w.workers.lock().expect("workers").remove(&id) else {
        return;
    };
    let left = wk.stop_gracefully(hold / 3).await;
    w.rec
        .trace
        .event(format_args!("worker {id} stopped, handed back: {left:?}"));
    w.stat(|s| s.worker_stops += 1);
    w.start_worker();
}

/// A worker process frozen (SIGSTOP, a long pause) past its leases' visibility timeouts; its
/// tasks run on.
async fn worker_frozen(w: &Arc<World>, hold: Duration) {
    let wk = some_worker(w);
    let from_ms = w.rec.now();
    wk.freeze(true);
    tokio::time::sleep(hold + Duration::from_secs(2)).await;
    wk.freeze(false);
    isolated(w, &wk, from_ms);
}

/// A worker cut off from every replica (it keeps running its tasks).
async fn worker_cut_off(w: &Arc<World>, hold: Duration) {
    let wk = some_worker(w);
    let from_ms = w.rec.now();
    for r in 1..=w.args.replicas {
        w.fabric.cut(wk.endpoint, r);
        w.fabric.cut(r, wk.endpoint);
    }
    w.stat(|s| s.partitions += 1);
    tokio::time::sleep(hold).await;
    w.fabric.heal();
    isolated(w, &wk, from_ms);
}

/// Records that `wk` could not hear the cluster from `from_ms` until now (the checker's
/// exception for such workers' executions).
fn isolated(w: &Arc<World>, wk: &Worker, from_ms: u64) {
    w.rec.h.lock().expect("history").isolations.push(Isolation {
        workers: vec![wk.info.name.clone()],
        from_ms,
        to_ms: w.rec.now(),
    });
}

/// Ends every fault: the network heals, the weather calms, clocks are right, every replica runs.
async fn heal(w: &Arc<World>) {
    w.fabric.heal();
    w.fabric.set_weather(Weather::CALM);
    for c in w.clocks.values() {
        c.step(0);
    }
    for id in 1..=w.args.replicas {
        if w.fabric.node(id).is_none() {
            w.start_node(id).await;
        }
    }
    w.rec.trace.event(format_args!("healed"));
}

/// Waits (at most two simulated minutes) until every acknowledged task ended and every replica
/// applied the same entries; whether it got there.
async fn settle(w: &Arc<World>) -> bool {
    let acked: Vec<u64> = w
        .rec
        .h
        .lock()
        .expect("history")
        .submissions
        .iter()
        .filter_map(|s| s.acked)
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let Some(leader) = w.leader() else { continue };
        let runs: Vec<u64> = w.rec.h.lock().expect("history").runs_started.clone();
        let done = leader
            .read(|s| {
                acked.iter().all(|id| {
                    s.task(fleet::state::TaskId(*id))
                        .is_none_or(|t| t.state.is_final())
                }) && runs.iter().all(|id| {
                    s.workflows()
                        .run(fleet::state::RunId(*id))
                        .is_none_or(|r| r.status.is_final())
                })
            })
            .await;
        if done != Ok(true) {
            continue;
        }
        let applied: Vec<(u64, Vec<u8>)> = {
            let mut v = Vec::new();
            for n in w.fabric.nodes() {
                v.push(n.applied().await);
            }
            v
        };
        if applied.windows(2).all(|p| p[0] == p[1]) {
            return true;
        }
    }
    false
}

/// The final records for the checker, and the convergence verdict.
async fn finish(w: &Arc<World>, converged: bool) -> Vec<String> {
    let mut out = Vec::new();
    if !converged {
        out.push(
            "[converge] the healed replicas did not commit, end every acknowledged task and agree \
             on the state within 120 s after healing"
                .to_string(),
        );
    }
    let Some(leader) = w.leader() else {
        out.push("[converge] no leader after healing".into());
        return out;
    };
    let read = leader
        .read(|s| {
            (
                s.all_tasks().map(TaskRecord::from_task).collect::<Vec<_>>(),
                s.schedules().all().cloned().collect::<Vec<_>>(),
                s.pools()
                    .sizes()
                    .map(|(n, p)| (n.clone(), p.slots))
                    .collect::<BTreeMap<_, _>>(),
                run_records(s),
                handed_back_by_others(s),
                requeue_ended(s),
            )
        })
        .await;
    match read {
        Ok((tasks, schedules, pools, runs, wrong, requeued)) => {
            out.extend(wrong);
            out.extend(requeued_unnamed(w, &requeued));
            let mut h = w.rec.h.lock().expect("history");
            h.tasks = tasks;
            h.schedules = schedules;
            h.pools = pools;
            h.runs = runs;
        }
        Err(e) => out.push(format!("[converge] final read failed: {e}")),
    }
    out
}

/// The simulator's assertion on hand-backs: a leaving worker's hand-back ends only that
/// worker's leases. An attempt lost as "handed back by worker N" ran on worker N.
fn handed_back_by_others(s: &fleet::state::State) -> Vec<String> {
    s.all_tasks()
        .flat_map(|t| t.attempts.iter().map(move |a| (t.id, a)))
        .filter_map(|(task, a)| {
            let Some(fleet::state::AttemptOutcome::Lost { reason }) = &a.outcome else {
                return None;
            };
            let by: u64 = reason
                .strip_prefix("handed back by worker ")?
                .split(' ')
                .next()?
                .parse()
                .ok()?;
            (by != a.worker.0).then(|| {
                format!(
                    "[hand-back-of-another] task {task}: the attempt with fencing token {} ran \
                     on worker {} but was ended as {reason:?}",
                    a.fencing_token, a.worker.0
                )
            })
        })
        .take(5)
        .collect()
}

/// The attempts a requeue ended: (task, fencing token).
fn requeue_ended(s: &fleet::state::State) -> Vec<(u64, u64)> {
    s.all_tasks()
        .flat_map(|t| t.attempts.iter().map(move |a| (t.id.0, a)))
        .filter(|(_, a)| {
            matches!(&a.outcome, Some(fleet::state::AttemptOutcome::Lost { reason })
                if reason == fleet::state::REQUEUE_REASON)
        })
        .map(|(task, a)| (task, a.fencing_token))
        .collect()
}

/// The simulator's assertion on requeues: `fleet task requeue` ends only the attempt the
/// operator named by its fencing token, never a later attempt of the same task.
fn requeued_unnamed(w: &World, ended: &[(u64, u64)]) -> Vec<String> {
    let named = w.requeues.lock().expect("requeues");
    ended
        .iter()
        .filter(|e| !named.contains(e))
        .take(5)
        .map(|(task, token)| {
            let asked: Vec<u64> = named
                .iter()
                .filter(|(t, _)| t == task)
                .map(|(_, k)| *k)
                .collect();
            format!(
                "[requeue-of-another] task {task}: the attempt with fencing token {token} was \
                 ended by a requeue, but the operator named only tokens {asked:?} of this task"
            )
        })
        .collect()
}

/// `chaos sim`: one seed, or many in parallel; exit 0 when every seed passed.
pub fn main(args: SimArgs) -> std::process::ExitCode {
    match args.seed {
        Some(seed) => main_one(seed, &args),
        None => main_many(&args),
    }
}

/// One seed, its figures and violations (and, with --twice, the determinism verdict).
fn main_one(seed: u64, args: &SimArgs) -> std::process::ExitCode {
    use std::process::ExitCode;
    {
        let o = run_seed(seed, args);
        print_one(&o);
        let mut ok = o.violations.is_empty();
        if args.twice {
            let again = run_seed(seed, args);
            if again.hash != o.hash || again.events != o.events {
                println!(
                    "NOT DETERMINISTIC: second run hash {:016x} ({} events) != {:016x} ({} events)",
                    again.hash, again.events, o.hash, o.events
                );
                ok = false;
            } else {
                println!("deterministic: a second run gave the same trace");
            }
        }
        if !ok {
            println!("replay: {}", args.replay(seed));
        }
        if ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        }
    }
}

/// Many seeds on `--jobs` threads; failures are printed with their replay command as they
/// come, the figures at the end.
fn main_many(args: &SimArgs) -> std::process::ExitCode {
    use std::process::ExitCode;
    let count = args.seeds.unwrap_or(100);
    let base = args
        .base
        .unwrap_or_else(|| u64::from(rand::random::<u32>()));
    println!(
        "chaos sim: {count} seeds from {base} ({} of simulated faults each, {} jobs{})",
        humantime::format_duration(args.duration),
        args.jobs,
        if args.bugs.is_empty() {
            String::new()
        } else {
            format!(", bugs: {}", args.bugs.join(", "))
        }
    );
    let started = std::time::Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let results = Arc::new(Mutex::new(Vec::new()));
    std::thread::scope(|scope| {
        for _ in 0..args.jobs.max(1) {
            let (next, failed, results, args) =
                (next.clone(), failed.clone(), results.clone(), args);
            scope.spawn(move || loop {
                if args.fail_fast && failed.load(std::sync::atomic::Ordering::Relaxed) {
                    return;
                }
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= count {
                    return;
                }
                let seed = base + i;
                let mut o = run_seed(seed, args);
                if args.twice && o.violations.is_empty() {
                    let again = run_seed(seed, args);
                    if (again.hash, again.events) != (o.hash, o.events) {
                        o.violations.push(format!(
                            "[determinism] a second run gave another trace ({:016x} vs {:016x})",
                            again.hash, o.hash
                        ));
                    }
                }
                if !o.violations.is_empty() {
                    failed.store(true, std::sync::atomic::Ordering::Relaxed);
                    println!("seed {seed}: FAILED: {}", o.violations[0]);
                    println!("  replay: {}", args.replay(seed));
                }
                results.lock().expect("results").push(o);
            });
        }
    });
    let results = results.lock().expect("results");
    print_summary(&results, started.elapsed());
    let failures: Vec<&Outcome> = results
        .iter()
        .filter(|o| !o.violations.is_empty())
        .collect();
    if failures.is_empty() {
        println!("PASS: {} seeds", results.len());
        ExitCode::SUCCESS
    } else {
        println!("FAIL: {} of {} seeds", failures.len(), results.len());
        for o in failures.iter().take(10) {
            println!("  {}", args.replay(o.seed));
        }
        ExitCode::from(1)
    }
}

fn print_one(o: &Outcome) {
    println!(
        "seed {}: trace {:016x} ({} events), {:.1} s simulated in {:.2} s ({:.0}x)",
        o.seed,
        o.hash,
        o.events,
        o.sim_ms as f64 / 1000.0,
        o.wall_ms as f64 / 1000.0,
        o.sim_ms as f64 / o.wall_ms.max(1) as f64
    );
    println!(
        "  messages {} (lost {}, duplicated {}, cut {}), replica crashes {} ({} unsynced writes \
         lost), partitions {}, clock steps {}, worker crashes {}, worker stops {}, tasks {}, \
         executions {}, reads checked {}, requeues {} ({} ended an attempt)",
        o.messages,
        o.lost,
        o.duplicated,
        o.cut,
        o.crashes,
        o.unsynced_lost,
        o.partitions,
        o.clock_steps,
        o.worker_crashes,
        o.worker_stops,
        o.submitted,
        o.executions,
        o.reads,
        o.requeues,
        o.requeued
    );
    if o.violations.is_empty() {
        println!("  invariants: OK");
    } else {
        for v in &o.violations {
            println!("  {v}");
        }
        println!("  invariants: {} VIOLATED", o.violations.len());
    }
}

fn print_summary(results: &[Outcome], took: Duration) {
    let n = results.len().max(1) as f64;
    let sum = |f: fn(&Outcome) -> u64| results.iter().map(f).sum::<u64>() as f64;
    println!(
        "{} seeds in {:.1} s: {:.0} seeds/min; {:.0} simulated s per wall s per job; per seed: \
         {:.0} messages ({:.0} lost, {:.0} duplicated, {:.0} cut), {:.1} replica crashes, {:.1} \
         partitions, {:.1} clock steps, {:.1} worker crashes, {:.1} worker stops, {:.0} tasks, \
         {:.0} executions, {:.0} reads checked, {:.1} requeues ({:.1} ended an attempt)",
        results.len(),
        took.as_secs_f64(),
        results.len() as f64 / took.as_secs_f64() * 60.0,
        sum(|o| o.sim_ms) / sum(|o| o.wall_ms).max(1.0),
        sum(|o| o.messages) / n,
        sum(|o| o.lost) / n,
        sum(|o| o.duplicated) / n,
        sum(|o| o.cut) / n,
        sum(|o| o.crashes) / n,
        sum(|o| o.partitions) / n,
        sum(|o| o.clock_steps) / n,
        sum(|o| o.worker_crashes) / n,
        sum(|o| o.worker_stops) / n,
        sum(|o| o.submitted) / n,
        sum(|o| o.executions) / n,
        sum(|o| o.reads) / n,
        sum(|o| o.requeues) / n,
        sum(|o| o.requeued) / n,
    );
}
