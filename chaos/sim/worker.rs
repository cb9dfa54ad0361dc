//! A simulated worker: the same protocol as `fleet worker` (long-poll lease requests to the
//! leader it believes in, heartbeats naming every held lease, reports retried until answered,
//! adoption of leases whose grant reply was lost), with tasks that take simulated time instead
//! of processes. Every execution's start and end goes to the history, as `chaos record` writes
//! them for the real harness.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleet::error::Error;
use fleet::raft::NodeId;
use fleet::rpc::{AttemptReport, HeldLease, LeaseVerdict, LeasedTask, WorkerInfo};
use fleet::state::{AttemptOutcome, TaskId, WorkerId};
use fleet::worker::heartbeat::lapse_after;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::task::JoinHandle;

use super::net::{Endpoint, Fabric};
use super::Recorder;
use crate::history::ExecKind;

pub const SLOTS: u32 = 4;
/// A task whose environment has this (set to 1) fails its first attempt.
pub const FAIL_FIRST: &str = "SIM_FAIL_FIRST";
pub const HEARTBEAT_MS: u64 = 300;

struct Exec {
    token: u64,
    attempt: u32,
    key: String,
    timer: JoinHandle<()>,
    /// When a heartbeat last extended the lease (its send time), or the lease arrived.
    extended_at: tokio::time::Instant,
    visibility: Duration,
}

struct Inner {
    running: BTreeMap<TaskId, Exec>,
    started: BTreeSet<u64>,
    reports: Vec<AttemptReport>,
    guess: NodeId,
    rng: StdRng,
}

pub struct Worker {
    pub info: WorkerInfo,
    pub endpoint: Endpoint,
    replicas: u64,
    fabric: Arc<Fabric>,
    rec: Arc<Recorder>,
    inner: Mutex<Inner>,
    loops: Mutex<Vec<JoinHandle<()>>>,
    /// True while the worker process is frozen (SIGSTOP, a long GC pause): its own loops stand
    /// still; its tasks, separate processes, run on.
    frozen: tokio::sync::watch::Sender<bool>,
    /// `--bug worker-ignores-lapse`: no lease lapses here.
    ignores_lapse: bool,
    /// Set when the worker is told to stop: no new lease requests; leases already on their
    /// way (a request in flight, an adoption) still run.
    draining: AtomicBool,
    /// Heartbeats answered, for the drain (it ends after one sent during it was answered).
    answered: AtomicU64,
}

impl Worker {
    pub fn start(
        id: u64,
        endpoint: Endpoint,
        replicas: u64,
        fabric: Arc<Fabric>,
        rec: Arc<Recorder>,
        seed: u64,
        ignores_lapse: bool,
    ) -> Arc<Worker> {
        let w = Arc::new(Worker {
            info: WorkerInfo {
                id: WorkerId(id),
                name: format!("w{id}"),
                queues: vec!["default".into()],
                slots: SLOTS,
                running: 0,
                draining: false,
            },
            endpoint,
            replicas,
            fabric,
            rec,
            inner: Mutex::new(Inner {
                running: BTreeMap::new(),
                started: BTreeSet::new(),
                reports: Vec::new(),
                guess: 1,
                rng: StdRng::seed_from_u64(seed),
            }),
            loops: Mutex::new(Vec::new()),
            frozen: tokio::sync::watch::Sender::new(false),
            ignores_lapse,
            draining: AtomicBool::new(false),
            answered: AtomicU64::new(0),
        });
        let loops = vec![
            tokio::spawn(w.clone().lease_loop()),
            tokio::spawn(w.clone().heartbeat_loop()),
            tokio::spawn(w.clone().report_loop()),
        ];
        *w.loops.lock().expect("loops") = loops;
        w
    }

    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        f(&mut self.inner.lock().expect("worker lock"))
    }

    /// The worker's machine dies: its loops stop and its running tasks with it.
    pub fn crash(&self) {
        for l in self.loops.lock().expect("loops").drain(..) {
            l.abort();
        }
        let running: Vec<(TaskId, Exec)> =
            self.with(|i| std::mem::take(&mut i.running).into_iter().collect());
        for (task, e) in running {
            e.timer.abort();
            self.record(ExecKind::Killed, task, &e.key, e.attempt, e.token, None);
        }
    }

    /// Stops as `fleet worker` does on SIGTERM: no new leases; running attempts get up to
    /// `drain` to end (and leases on their way run too), the rest are killed unreported; the
    /// reports are flushed; then the worker leaves, so the leader hands back what it still
    /// holds, and its loops stop. Returns how many leases were handed back (`None`: no
    /// replica answered the leave).
    pub async fn stop_gracefully(self: &Arc<Self>, drain: Duration) -> Option<u32> {
        self.draining.store(true, Ordering::Release);
        let answered_before = self.answered.load(Ordering::Acquire);
        let deadline = tokio::time::Instant::now() + drain;
        let heard_by = tokio::time::Instant::now() + Duration::from_millis(HEARTBEAT_MS * 3);
        while tokio::time::Instant::now() < deadline {
            let now = tokio::time::Instant::now();
            let heard =
                self.answered.load(Ordering::Acquire) >= answered_before + 2 || now >= heard_by;
            if heard && self.running() == 0 {
                break;
            }
            // The drain's pace, as the real worker's: re-check every 50 ms.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let left: Vec<(TaskId, Exec)> =
            self.with(|i| std::mem::take(&mut i.running).into_iter().collect());
        for (task, e) in left {
            e.timer.abort();
            self.record(ExecKind::Killed, task, &e.key, e.attempt, e.token, None);
        }
        let flush_by = tokio::time::Instant::now() + Duration::from_secs(10);
        while self.with(|i| !i.reports.is_empty()) && tokio::time::Instant::now() < flush_by {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let left = self.leave().await;
        self.crash();
        left
    }

    /// Tells the cluster this worker leaves, retried for up to 10 s as `fleet worker`'s client.
    async fn leave(&self) -> Option<u32> {
        let give_up = tokio::time::Instant::now() + Duration::from_secs(10);
        while tokio::time::Instant::now() < give_up {
            let target = self.with(|i| i.guess);
            let r = self
                .fabric
                .call(
                    "leave",
                    self.endpoint,
                    target,
                    Duration::from_millis(2_000),
                    self.info.id,
                    |n, id| async move { n.leave(id).await },
                )
                .await;
            match r {
                Ok(Ok(n)) => return Some(n),
                Ok(Err(e)) => self.retarget(Some(&e)),
                Err(_) => self.retarget(None),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    }

    fn info_now(&self) -> WorkerInfo {
        let mut info = self.info.clone();
        info.draining = self.draining.load(Ordering::Acquire);
        info
    }

    pub fn freeze(&self, frozen: bool) {
        self.frozen.send_replace(frozen);
    }

    /// Waits while the worker is frozen.
    async fn thaw(&self) {
        let mut rx = self.frozen.subscribe();
        let _ = rx.wait_for(|f| !*f).await;
    }

    pub fn running(&self) -> usize {
        self.with(|i| i.running.len())
    }

    fn record(
        &self,
        kind: ExecKind,
        task: TaskId,
        key: &str,
        attempt: u32,
        token: u64,
        exit: Option<i32>,
    ) {
        self.rec
            .exec(kind, task.0, key, attempt, token, &self.info.name, exit);
    }

    /// Follows a not-leader hint, or tries the next replica.
    fn retarget(&self, e: Option<&Error>) {
        self.with(|i| {
            i.guess = match e {
                Some(Error::NotLeader {
                    leader_id: Some(l), ..
                }) => *l,
                _ => i.guess % self.replicas + 1,
            }
        })
    }

    async fn lease_loop(self: Arc<Self>) {
        loop {
            self.thaw().await;
            if self.draining.load(Ordering::Acquire) {
                return;
            }
            let free = SLOTS.saturating_sub(self.running() as u32);
            if free == 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            let target = self.with(|i| i.guess);
            let info = self.info_now();
            let r = self
                .fabric
                .call(
                    "lease",
                    self.endpoint,
                    target,
                    Duration::from_millis(2_000),
                    (info, free),
                    |n, (info, free)| async move { n.lease(info, free, 1_000).await },
                )
                .await;
            match r {
                Ok(Ok(leased)) => {
                    for l in leased {
                        self.run(l);
                    }
                }
                Ok(Err(e)) => {
                    self.retarget(Some(&e));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(_) => {
                    self.retarget(None);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// Starts an execution of a leased task (once per fencing token).
    fn run(self: &Arc<Self>, l: LeasedTask) {
        let key = l.spec.idempotency_key.clone().unwrap_or_default();
        let kind = key.split('-').next().unwrap_or("short").to_string();
        let (ms, exit) = self.with(|i| {
            let ms = match kind.as_str() {
                "long" => i.rng.random_range(1_500..4_000),
                "flaky" => 100,
                _ => i.rng.random_range(50..500),
            };
            let fail_first =
                kind == "flaky" || l.spec.env.iter().any(|(k, v)| k == FAIL_FIRST && v == "1");
            let exit = if fail_first && l.attempt == 1 { 1 } else { 0 };
            (ms, exit)
        });
        if !self.with(|i| i.started.insert(l.fencing_token)) {
            return;
        }
        self.record(
            ExecKind::Start,
            l.task,
            &key,
            l.attempt,
            l.fencing_token,
            None,
        );
        let me = self.clone();
        let (task, token, attempt, k) = (l.task, l.fencing_token, l.attempt, key.clone());
        let timer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            me.with(|i| i.running.remove(&task));
            me.record(ExecKind::End, task, &k, attempt, token, Some(exit));
            let outcome = if exit == 0 {
                AttemptOutcome::Succeeded
            } else {
                AttemptOutcome::Failed {
                    exit_code: Some(exit),
                    signal: None,
                    error: None,
                }
            };
            me.with(|i| {
                i.reports.push(AttemptReport {
                    task,
                    fencing_token: token,
                    outcome,
                    output_tail: String::new(),
                })
            });
        });
        self.with(|i| {
            i.running.insert(
                l.task,
                Exec {
                    token: l.fencing_token,
                    attempt: l.attempt,
                    key,
                    timer,
                    extended_at: tokio::time::Instant::now(),
                    visibility: Duration::from_millis(l.spec.visibility_timeout_ms),
                },
            )
        });
    }

    /// Kills the execution of `task` under `token` and reports it as the real worker does.
    fn kill(&self, task: TaskId, token: u64, outcome: AttemptOutcome) {
        let e = self.with(|i| match i.running.get(&task) {
            Some(e) if e.token == token => i.running.remove(&task),
            _ => None,
        });
        if let Some(e) = e {
            e.timer.abort();
            self.record(ExecKind::Killed, task, &e.key, e.attempt, e.token, None);
            self.with(|i| {
                i.reports.push(AttemptReport {
                    task,
                    fencing_token: token,
                    outcome,
                    output_tail: String::new(),
                })
            });
        }
    }

    /// Kills the executions whose lease lapsed: unextended for 80% of the visibility timeout
    /// (`fleet::worker::heartbeat::lapse_after`).
    fn kill_lapsed(&self) {
        if self.ignores_lapse {
            return;
        }
        let now = tokio::time::Instant::now();
        let lapsed: Vec<(TaskId, u64)> = self.with(|i| {
            i.running
                .iter()
                .filter(|(_, e)| now >= e.extended_at + lapse_after(e.visibility))
                .map(|(t, e)| (*t, e.token))
                .collect()
        });
        for (task, token) in lapsed {
            self.kill(task, token, AttemptOutcome::failed("lease lapsed"));
        }
    }

    /// How long the next heartbeat may wait for its answer: not past the first lapse.
    fn until_lapse(&self) -> Duration {
        if self.ignores_lapse {
            return Duration::from_millis(1_000);
        }
        let now = tokio::time::Instant::now();
        self.with(|i| {
            i.running
                .values()
                .map(|e| (e.extended_at + lapse_after(e.visibility)).saturating_duration_since(now))
                .min()
        })
        .unwrap_or(Duration::MAX)
        .clamp(Duration::from_millis(10), Duration::from_millis(1_000))
    }

    async fn heartbeat_loop(self: Arc<Self>) {
        loop {
            tokio::time::sleep(Duration::from_millis(HEARTBEAT_MS)).await;
            self.thaw().await;
            let held: Vec<HeldLease> = self.with(|i| {
                i.running
                    .iter()
                    .map(|(t, e)| HeldLease {
                        task: *t,
                        fencing_token: e.token,
                    })
                    .collect()
            });
            let target = self.with(|i| i.guess);
            let mut info = self.info_now();
            info.running = held.len() as u32;
            let sent_at = tokio::time::Instant::now();
            let r = self
                .fabric
                .call(
                    "heartbeat",
                    self.endpoint,
                    target,
                    self.until_lapse(),
                    (info, held.clone()),
                    |n, (info, held)| async move { n.heartbeat(info, held).await },
                )
                .await;
            match r {
                Ok(Ok(reply)) => {
                    self.answered.fetch_add(1, Ordering::AcqRel);
                    for (h, v) in held.iter().zip(&reply.verdicts) {
                        match v {
                            LeaseVerdict::Extended => self.with(|i| {
                                if let Some(e) = i.running.get_mut(&h.task) {
                                    if e.token == h.fencing_token {
                                        e.extended_at = e.extended_at.max(sent_at);
                                    }
                                }
                            }),
                            LeaseVerdict::Cancelled => {
                                self.kill(h.task, h.fencing_token, AttemptOutcome::Cancelled)
                            }
                            LeaseVerdict::Fenced => {
                                self.kill(h.task, h.fencing_token, AttemptOutcome::failed("fenced"))
                            }
                        }
                    }
                    for a in reply.adopt {
                        self.run(a);
                    }
                }
                Ok(Err(e)) => self.retarget(Some(&e)),
                Err(_) => self.retarget(None),
            }
            self.kill_lapsed();
        }
    }

    async fn report_loop(self: Arc<Self>) {
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            self.thaw().await;
            let reports = self.with(|i| i.reports.clone());
            if reports.is_empty() {
                continue;
            }
            let target = self.with(|i| i.guess);
            let r = self
                .fabric
                .call(
                    "report",
                    self.endpoint,
                    target,
                    Duration::from_millis(2_000),
                    reports.clone(),
                    |n, reports| async move { n.report(reports).await },
                )
                .await;
            match r {
                Ok(Ok(_)) => self.with(|i| {
                    i.reports.retain(|x| {
                        !reports
                            .iter()
                            .any(|y| y.task == x.task && y.fencing_token == x.fencing_token)
                    })
                }),
                Ok(Err(e)) => self.retarget(Some(&e)),
                Err(_) => self.retarget(None),
            }
        }
    }
}
