//! The worker process (`fleet worker`): pulls leases, runs attempts, heartbeats, reports.
//!
//! Three independent paths, each with its own connection to the cluster:
//!
//! - the **lease loop** asks the leader for up to as many tasks as it has free slots, waiting
//!   at the leader when nothing is ready (long poll), and starts one attempt per lease
//!   ([`attempt::run`], or on a long-lived process of the queue's [`persistent`] executor);
//! - the **heartbeat thread** ([`heartbeat`]) covers every lease with one heartbeat per
//!   interval and kills attempts whose lease is gone or whose task was cancelled;
//! - the **reporter** sends ended attempts to the leader in batches, retrying through elections.
//!
//! Shutdown: the first SIGTERM (or SIGINT) drains: no new leases, running attempts may finish
//! (up to `worker.drain_timeout_ms`) and are reported. A second signal, or the drain timeout,
//! kills the remaining attempts. Either way the worker then calls `worker_leave`, which hands
//! every lease it still holds back to the cluster at once (to be retried without waiting for a
//! timeout), and exits 0.

pub mod attempt;
pub mod containment;
pub mod heartbeat;
pub mod persistent;
pub mod spawn;
pub mod stream;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

use crate::client::Client;
use crate::config::WorkerConfig;
use crate::error::Error;
use crate::rpc::{AttemptReport, LeasedTask, WorkerInfo};
use crate::state::{TaskId, WorkerId};
use attempt::KillReason;
use heartbeat::{HeartbeatMsg, Shared};

/// The longest one live-output call may take (it is retried on the next send anyway).
const STREAM_CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Most reports sent in one call.
const REPORT_BATCH: usize = 1000;
/// How long the reporter keeps retrying one batch before giving it up (the leases will have
/// expired by then and the tasks been retried).
const REPORT_GIVE_UP: Duration = Duration::from_secs(600);

/// Everything `fleet worker` needs.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    pub peers: Vec<String>,
    pub cluster_name: String,
    /// The cluster's shared secret (`node.auth_token`), empty for none.
    pub auth_token: String,
    pub name: String,
    pub config: WorkerConfig,
    /// The queues whose attempts run on persistent executors, and the command that starts
    /// one (`[queues.<q>] executor = "persistent"`).
    pub persistent: std::collections::BTreeMap<String, Vec<String>>,
}

/// Runs a worker until it is told to stop; returns after a clean drain.
/// The longest one heartbeat attempt against one replica may take.
const HEARTBEAT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);

pub async fn run(opts: WorkerOptions) -> anyhow::Result<()> {
    let id = WorkerId(rand::random_range(1..(1u64 << 53)));
    // Every line the worker logs carries its id and name; an attempt's lines also its task,
    // attempt number and fencing token.
    let span = tracing::info_span!("worker", worker = id.0, name = %opts.name);
    tracing::Instrument::instrument(run_as(opts, id), span).await
}

async fn run_as(opts: WorkerOptions, id: WorkerId) -> anyhow::Result<()> {
    let cfg = opts.config.clone();
    let info = WorkerInfo {
        id,
        name: opts.name.clone(),
        queues: cfg.queues.clone(),
        slots: cfg.concurrency,
        running: 0,
        draining: false,
    };
    let poll_timeout = Duration::from_millis(cfg.poll_wait_ms) + Duration::from_secs(15);
    let poll_client = cluster_client(&opts, poll_timeout)?;
    let hb_interval = Duration::from_millis(cfg.heartbeat_interval_ms);
    // One attempt per replica is bounded, so a frozen leader costs one second, not the whole
    // heartbeat deadline: the next attempt goes to another replica (and on to the new leader).
    let hb_client = cluster_client(&opts, (hb_interval * 3).max(Duration::from_secs(2)))?
        .with_attempt_timeout(HEARTBEAT_ATTEMPT_TIMEOUT);
    let report_client = cluster_client(&opts, Duration::from_secs(30))?;
    let stream_client = cluster_client(&opts, STREAM_CALL_TIMEOUT)?
        .with_attempt_timeout(HEARTBEAT_ATTEMPT_TIMEOUT)
        .with_min_protocol(crate::rpc::LIVE_OUTPUT_PROTOCOL);

    // Before any attempt: how the processes an attempt starts are kept track of.
    let containment = Arc::new(containment::Containment::setup(&cfg.containment)?);
    let shared = Arc::new(Shared::default());
    let (hb_tx, hb_rx) = std::sync::mpsc::channel();
    let (adopt_tx, adopt_rx) = mpsc::unbounded_channel();
    let hb_thread = heartbeat::spawn(
        hb_client,
        info.clone(),
        shared.clone(),
        hb_interval,
        hb_rx,
        adopt_tx,
    )?;
    let (report_tx, report_rx) = mpsc::unbounded_channel();
    let reporter = tokio::spawn(report_loop(report_client, id, report_rx));
    let streams = stream::Streams::default();
    let stream_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let streamer = tokio::spawn(stream::run(
        stream_client,
        id,
        streams.clone(),
        cfg.output_stream_bytes_per_sec,
        stream_stop.clone(),
    ));

    tracing::info!(
        worker = id.0,
        name = %opts.name,
        queues = ?cfg.queues,
        persistent = ?opts.persistent.keys().collect::<Vec<_>>(),
        concurrency = cfg.concurrency,
        containment = containment.name(),
        "worker started"
    );
    let executors = Arc::new(persistent::Executors::new(opts.persistent.clone()));
    let (alive_tx, alive_rx) = watch::channel(0usize);
    let launcher = Launcher {
        ctx: Arc::new(AttemptContext {
            name: opts.name.clone(),
            cfg: cfg.clone(),
            containment: containment.clone(),
            executors: executors.clone(),
            hb_tx: hb_tx.clone(),
            report_tx,
            streams,
            running: Arc::default(),
            shared: shared.clone(),
        }),
        alive: Arc::new(alive_tx),
        seen: SeenTokens::default(),
    };
    let notifier = crate::health::systemd::Notifier::from_env();
    notifier.ready(&format!(
        "worker {} taking tasks from {}",
        opts.name,
        cfg.queues.join(",")
    ));
    let watched = shared.clone();
    let slots_total = cfg.concurrency;
    notifier
        .clone()
        .spawn(move || systemd_status(&watched, slots_total));
    let mut leasing = Leasing {
        client: poll_client,
        info,
        shared: shared.clone(),
        slots: Arc::new(Semaphore::new(cfg.concurrency as usize)),
        launcher,
        adopt_rx,
        signals: StopSignals::new()?,
        poll_wait_ms: cfg.poll_wait_ms,
        stop_now: false,
    };
    leasing.run().await;

    shared.draining.store(true, Ordering::Release);
    notifier.stopping("draining: no new tasks; waiting for running attempts");
    drain(&cfg, &shared, &mut leasing, alive_rx).await;
    // Every attempt has ended; its report (if any) is queued. Flush the reports, and stop the
    // idle persistent executors meanwhile.
    drop(leasing);
    executors
        .shutdown(&persistent::AttemptEnv {
            containment: &containment,
            worker_name: &opts.name,
            kill_grace: Duration::from_millis(cfg.kill_grace_ms),
        })
        .await;
    let _ = reporter.await;
    stream_stop.store(true, Ordering::Release);
    // The last output of the last attempts, if the cluster takes it soon; reports are out.
    let _ = tokio::time::timeout(STREAM_CALL_TIMEOUT * 2, streamer).await;
    leave(&opts, id).await?;
    shared.stop.store(true, Ordering::Release);
    drop(hb_tx);
    let _ = tokio::task::spawn_blocking(move || hb_thread.join()).await;
    tracing::info!("worker stopped");
    Ok(())
}

/// A client of the cluster in the worker role, giving up on one call after `timeout`.
fn cluster_client(opts: &WorkerOptions, timeout: Duration) -> anyhow::Result<Client> {
    Ok(
        Client::new(opts.peers.clone(), &opts.cluster_name, timeout)?
            .with_role(crate::rpc::Role::Worker)
            .with_auth_token(&opts.auth_token),
    )
}

/// The worker's line in `systemctl status`, and the progress counter the watchdog checks.
fn systemd_status(shared: &Shared, slots_total: u32) -> (u64, String) {
    let beats = shared.beats.load(Ordering::Relaxed);
    let failures = shared.failures.load(Ordering::Relaxed);
    let state = if shared.draining.load(Ordering::Relaxed) {
        "draining"
    } else {
        "active"
    };
    let link = if failures == 0 {
        "heartbeats ok".to_string()
    } else {
        format!("{failures} heartbeats failed in a row")
    };
    (
        beats,
        format!(
            "{state}, running {} of {slots_total} attempts, {link}",
            shared.running.load(Ordering::Relaxed)
        ),
    )
}

/// SIGTERM or SIGINT, whichever comes first.
struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn new() -> std::io::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

/// The lease loop: one long poll for as many tasks as there are free slots, one attempt per
/// lease, until the first stop signal.
struct Leasing {
    client: Client,
    info: WorkerInfo,
    shared: Arc<Shared>,
    slots: Arc<Semaphore>,
    launcher: Launcher,
    /// Leases the heartbeat thread learned of that this worker never started (a lost reply).
    adopt_rx: mpsc::UnboundedReceiver<LeasedTask>,
    signals: StopSignals,
    poll_wait_ms: u64,
    /// A second stop signal came while the first was handled: stop attempts without draining.
    stop_now: bool,
}

/// How one lease request ended.
enum Polled {
    Stop,
    /// The heartbeat path moved to another replica: this poll may be stuck at a deposed leader.
    LinkChanged,
    Reply(anyhow::Result<Vec<LeasedTask>>),
}

impl Leasing {
    async fn run(&mut self) {
        let mut poll_pause = Duration::from_millis(100);
        loop {
            let first = tokio::select! {
                _ = self.signals.recv() => return,
                Some(a) = self.adopt_rx.recv() => {
                    self.adopt(a);
                    continue;
                }
                p = self.slots.clone().acquire_owned() => p.expect("semaphore open"),
            };
            let free = 1 + self.slots.available_permits() as u32;
            let leases = match self.poll(free).await {
                Polled::Stop => return,
                Polled::LinkChanged => {
                    let to = self.shared.leader_addr();
                    tracing::info!(leader = ?to, "the leader link changed: renewing the lease request");
                    self.client.reconnect(to);
                    continue;
                }
                Polled::Reply(Ok(l)) => {
                    poll_pause = Duration::from_millis(100);
                    l
                }
                Polled::Reply(Err(e)) => {
                    tracing::warn!(error = %e, "lease request failed; retrying");
                    drop(first);
                    // A retry pause after a failure, not synchronization.
                    tokio::time::sleep(poll_pause).await;
                    poll_pause = (poll_pause * 2).min(Duration::from_secs(2));
                    continue;
                }
            };
            let mut first = Some(first);
            for lease in leases {
                // Adopted leases may have taken the slots this request was for: then the
                // attempt runs over capacity rather than wait (its lease is already running
                // down).
                let permit = first
                    .take()
                    .or_else(|| self.slots.clone().try_acquire_owned().ok());
                self.launcher.launch(lease, permit);
            }
        }
    }

    /// Starts an adopted lease, in a free slot if there is one.
    fn adopt(&mut self, lease: LeasedTask) {
        let permit = self.slots.clone().try_acquire_owned().ok();
        self.launcher.launch(lease, permit);
    }

    /// One long poll for up to `free` leases, starting adopted leases while it waits.
    ///
    /// A stop signal during the poll does not drop it: the leader may be granting leases for
    /// it right now, and a dropped reply would leave them to be handed back (another attempt
    /// spent). The worker says it is draining (its next heartbeat tells the leader, which then
    /// answers the poll at once), and leases the poll still brings run within the drain. A
    /// second signal stops waiting.
    async fn poll(&mut self, free: u32) -> Polled {
        let mut me = self.info.clone();
        me.running = self.shared.running.load(Ordering::Relaxed);
        let wait_ms = self.poll_wait_ms;
        let shared = self.shared.clone();
        let epoch = shared.link_epoch.load(Ordering::Acquire);
        let poll = self.client.call(|c, ctx| {
            let me = me.clone();
            async move { c.lease_tasks(ctx, me, free, wait_ms, 0).await }
        });
        tokio::pin!(poll);
        let mut stopping = false;
        loop {
            let changed = shared.link_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if !stopping && shared.link_epoch.load(Ordering::Acquire) != epoch {
                return Polled::LinkChanged;
            }
            tokio::select! {
                r = &mut poll => {
                    if !stopping {
                        return Polled::Reply(r);
                    }
                    for lease in r.unwrap_or_default() {
                        let permit = self.slots.clone().try_acquire_owned().ok();
                        self.launcher.launch(lease, permit);
                    }
                    return Polled::Stop;
                }
                _ = changed, if !stopping => {}
                _ = self.signals.recv() => {
                    if stopping {
                        self.stop_now = true;
                        return Polled::Stop;
                    }
                    stopping = true;
                    shared.draining.store(true, Ordering::Release);
                    tracing::info!("stopping: waiting for the lease request in flight (the leader answers a draining worker at once)");
                }
                Some(a) = self.adopt_rx.recv() => {
                    let permit = self.slots.clone().try_acquire_owned().ok();
                    self.launcher.launch(a, permit);
                }
            }
        }
    }
}

/// Waits for running attempts to end, up to `worker.drain_timeout_ms` or a second signal;
/// then stops the rest (their leases are handed back by [`leave`]). Leases the leader says
/// this worker holds but never received (a grant whose reply was lost just before the stop)
/// run within the drain too: the drain ends only after a heartbeat sent after it began was
/// answered (bounded by a few heartbeat intervals, for a worker cut off from the cluster).
async fn drain(
    cfg: &WorkerConfig,
    shared: &Shared,
    leasing: &mut Leasing,
    mut alive_rx: watch::Receiver<usize>,
) {
    tracing::info!(
        running = shared.running.load(Ordering::Relaxed),
        drain_timeout_ms = cfg.drain_timeout_ms,
        "draining: no new leases; waiting for running attempts (signal again to stop them now)"
    );
    let answered_before = shared.answered.load(Ordering::Acquire);
    let heard_by = Instant::now() + Duration::from_millis(cfg.heartbeat_interval_ms * 3);
    let deadline = Instant::now() + Duration::from_millis(cfg.drain_timeout_ms);
    let mut drained = false;
    while !leasing.stop_now && Instant::now() < deadline {
        // One more answered heartbeat (two: one may have been in flight when the drain began).
        let heard = shared.answered.load(Ordering::Acquire) >= answered_before + 2
            || Instant::now() >= heard_by;
        if heard && *alive_rx.borrow() == 0 {
            drained = true;
            break;
        }
        tokio::select! {
            _ = alive_rx.changed() => {}
            Some(a) = leasing.adopt_rx.recv() => leasing.adopt(a),
            _ = leasing.signals.recv() => leasing.stop_now = true,
            // Re-checks the heartbeat count; the drain's own pace, not synchronization.
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
    if drained {
        return;
    }
    let victims: Vec<_> = leasing
        .launcher
        .ctx
        .running
        .lock()
        .expect("running lock")
        .values()
        .cloned()
        .collect();
    tracing::warn!(
        attempts = victims.len(),
        "stopping running attempts; their leases are handed back"
    );
    for k in victims {
        let _ = k.send(KillReason::Shutdown);
    }
    let _ = alive_rx.wait_for(|n| *n == 0).await;
}

/// Hands back anything still leased to this worker (killed attempts, a lease whose grant
/// reply was lost).
async fn leave(opts: &WorkerOptions, id: WorkerId) -> anyhow::Result<()> {
    let mut leave_client = cluster_client(opts, Duration::from_secs(10))?;
    match leave_client
        .call(|c, ctx| async move { c.worker_leave(ctx, id, 0).await })
        .await
    {
        Ok(n) => tracing::info!(handed_back = n, "left the cluster"),
        Err(e) => tracing::warn!(
            error = %e,
            "could not tell the cluster this worker left; its leases expire after the liveness timeout"
        ),
    }
    Ok(())
}

/// Fencing tokens this worker has started (bounded): a lease that arrives twice (a lease
/// reply and an adoption) runs once.
#[derive(Default)]
struct SeenTokens {
    set: HashSet<u64>,
    order: VecDeque<u64>,
}

/// Fencing tokens remembered.
const SEEN_TOKENS: usize = 100_000;

impl SeenTokens {
    /// True the first time a token is seen.
    fn first_time(&mut self, token: u64) -> bool {
        if !self.set.insert(token) {
            return false;
        }
        self.order.push_back(token);
        if self.order.len() > SEEN_TOKENS {
            let old = self.order.pop_front().expect("non-empty");
            self.set.remove(&old);
        }
        true
    }
}

/// Starts attempts.
struct Launcher {
    ctx: Arc<AttemptContext>,
    /// Attempts alive (started, not yet ended).
    alive: Arc<watch::Sender<usize>>,
    seen: SeenTokens,
}

impl Launcher {
    fn launch(&mut self, lease: LeasedTask, permit: Option<OwnedSemaphorePermit>) {
        if !self.seen.first_time(lease.fencing_token) {
            tracing::debug!(task = %lease.task, fencing_token = lease.fencing_token, "lease already started here");
            return;
        }
        let (kill_tx, kill_rx) = mpsc::unbounded_channel();
        let ctx = self.ctx.clone();
        ctx.running
            .lock()
            .expect("running lock")
            .insert(lease.task, kill_tx.clone());
        let _ = ctx.hb_tx.send(HeartbeatMsg::Add {
            task: lease.task,
            fencing_token: lease.fencing_token,
            kill: kill_tx,
            received_at: std::time::Instant::now(),
            visibility: std::time::Duration::from_millis(lease.spec.visibility_timeout_ms),
        });
        ctx.shared.running.fetch_add(1, Ordering::Relaxed);
        self.alive.send_modify(|n| *n += 1);
        let alive = self.alive.clone();
        let span = tracing::info_span!(
            "attempt",
            task = %lease.task,
            attempt = lease.attempt,
            fencing_token = lease.fencing_token
        );
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                ctx.run(lease, kill_rx).await;
                drop(permit);
                alive.send_modify(|n| *n -= 1);
            },
            span,
        ));
    }
}

/// What every attempt's task needs (shared).
struct AttemptContext {
    name: String,
    cfg: WorkerConfig,
    containment: Arc<containment::Containment>,
    executors: Arc<persistent::Executors>,
    hb_tx: std::sync::mpsc::Sender<HeartbeatMsg>,
    report_tx: mpsc::UnboundedSender<AttemptReport>,
    streams: stream::Streams,
    running: Arc<Mutex<HashMap<TaskId, mpsc::UnboundedSender<KillReason>>>>,
    shared: Arc<Shared>,
}

impl AttemptContext {
    async fn run(&self, lease: LeasedTask, kill_rx: mpsc::UnboundedReceiver<KillReason>) {
        let started = Instant::now();
        let persistent = self.executors.serves(&lease.spec.queue);
        tracing::info!(
            task = %lease.task,
            attempt = lease.attempt,
            fencing_token = lease.fencing_token,
            command = ?lease.spec.command,
            executor = if persistent { "persistent" } else { "oneshot" },
            "attempt started"
        );
        let kill_grace = Duration::from_millis(self.cfg.kill_grace_ms);
        let tail = attempt::Tail::new(self.cfg.output_tail_bytes);
        self.streams.open(
            lease.task,
            lease.fencing_token,
            tail.clone(),
            self.cfg.output_stream_bytes_per_sec,
        );
        let ended = if persistent {
            let env = persistent::AttemptEnv {
                containment: &self.containment,
                worker_name: &self.name,
                kill_grace,
            };
            self.executors.run(&lease, &env, tail, kill_rx).await
        } else {
            attempt::run(
                &lease,
                &self.containment,
                &self.name,
                tail,
                kill_grace,
                kill_rx,
            )
            .await
        };
        self.streams.end(lease.task, lease.fencing_token);
        tracing::info!(
            task = %lease.task,
            attempt = lease.attempt,
            pid = ?ended.pid,
            outcome = ?ended.outcome,
            ms = started.elapsed().as_millis() as u64,
            "attempt ended"
        );
        if let Some(outcome) = ended.outcome {
            let _ = self.report_tx.send(AttemptReport {
                task: lease.task,
                fencing_token: lease.fencing_token,
                outcome,
                output_tail: ended.output_tail,
            });
        }
        let _ = self.hb_tx.send(HeartbeatMsg::Remove { task: lease.task });
        self.running
            .lock()
            .expect("running lock")
            .remove(&lease.task);
        self.shared.running.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Sends ended attempts to the leader in batches until the channel closes and is empty.
async fn report_loop(
    mut client: Client,
    worker: WorkerId,
    mut rx: mpsc::UnboundedReceiver<AttemptReport>,
) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < REPORT_BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let started = Instant::now();
        let mut pause = Duration::from_millis(100);
        loop {
            let result = client
                .call(|c, ctx| {
                    let b = batch.clone();
                    async move { c.report(ctx, worker, b, 0).await }
                })
                .await;
            match result {
                Ok(results) => {
                    for (r, res) in batch.iter().zip(results) {
                        match res {
                            Ok(state) => {
                                tracing::debug!(task = %r.task, state = state.as_str(), "reported")
                            }
                            Err(Error::StaleToken(_)) => tracing::warn!(
                                task = %r.task,
                                fencing_token = r.fencing_token,
                                "report rejected: the lease was lost and the task given to another attempt"
                            ),
                            Err(e) => tracing::warn!(task = %r.task, error = %e, "report rejected"),
                        }
                    }
                    break;
                }
                Err(e) if started.elapsed() < REPORT_GIVE_UP => {
                    tracing::warn!(error = %e, reports = batch.len(), "report failed; retrying");
                    // A retry pause after a failure, not synchronization.
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
                Err(e) => {
                    tracing::error!(error = %e, reports = batch.len(), "gave up reporting; the leases expire and the tasks are retried");
                    break;
                }
            }
        }
    }
}
