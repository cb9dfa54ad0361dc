//! The leader's scheduling decisions as plain code: no await, no clock read, no randomness.
//!
//! [`SchedulerCore`] holds the leader's soft state (the [`LeaseTracker`], the
//! [`WorkerRegistry`] and the lease requests waiting for work) and decides, from inputs, what
//! the leader does:
//!
//! - a lease request arrives: [`SchedulerCore::poll`];
//! - a heartbeat arrives: [`SchedulerCore::heartbeat`] returns the verdicts and the leases to
//!   adopt, read from the state the caller passes;
//! - the replica leads a new term: [`SchedulerCore::start_term`];
//! - it stops leading: [`SchedulerCore::stop_leading`] answers every waiting request;
//! - time passes: [`SchedulerCore::tick`] returns the expiries and the purge to propose;
//! - requests wait: [`SchedulerCore::plan_grants`] picks tasks for them and
//!   [`SchedulerCore::grants_applied`] turns what the state machine granted into replies.
//!
//! Time is a [`Now`] (the monotonic reading for silence and deadlines, the wall reading for
//! what goes into the replicated state); random values (retry jitter) come from an `Rng` the
//! caller passes. The async loop (`scheduling_loop`) is a thin shell: it reads the clock,
//! proposes the commands this returns, and sends the replies. The unit tests below drive the
//! core against a real [`State`] without a runtime.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use rand::Rng;

use super::leases::{Expiry, LeaseInfo, LeaseTracker};
use super::workers::WorkerRegistry;
use crate::clock::Now;
use crate::error::Error;
use crate::rpc::{HeartbeatReply, HeldLease, LeaseVerdict, LeasedTask, WorkerInfo};
use crate::state::{Command, CommandOutput, LeaseGrant, State, TaskId, TaskState, WorkerId};

/// How often finished tasks past their retention are looked for.
pub const PURGE_EVERY_MS: u64 = 1_000;
/// Most tasks one purge command forgets (bounds one entry's apply time).
pub const PURGE_MAX: u32 = 10_000;

/// Test-only switches that re-introduce known bug classes, so that the simulator can be shown
/// to find them (`chaos sim --bug NAME`). Never set outside tests and the simulator.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Bugs {
    /// A heartbeat extends a lease whose expiry was already applied: the verdict checks the
    /// task's last attempt instead of its live lease.
    pub heartbeat_extends_expired: bool,
    /// A heartbeat extends (or offers for adoption) a lease whose expiry the leader already
    /// decided and is proposing: the worker runs on, or starts, an attempt that the expiry
    /// ends moments later (the simulator's finding of seed 90811, fixed).
    pub heartbeat_ignores_pending_expiry: bool,
}

/// What the core needs from the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoreConfig {
    pub tick_ms: u64,
    pub liveness_ms: u64,
    pub failover_grace_ms: u64,
    pub retention_ms: u64,
    pub forget_after_ms: u64,
    pub max_per_request: u32,
    /// `[queues.NAME] max_running`, for the queues that have one.
    pub queue_limits: BTreeMap<String, u32>,
    pub bugs: Bugs,
}

impl CoreConfig {
    pub fn from_config(config: &crate::config::Config) -> CoreConfig {
        let s = &config.scheduler;
        CoreConfig {
            tick_ms: s.tick_ms,
            liveness_ms: s.worker_liveness_timeout_ms,
            failover_grace_ms: s.failover_grace_ms,
            retention_ms: s.retention_ms,
            forget_after_ms: s.forget_workers_after_ms,
            max_per_request: s.max_leases_per_request,
            queue_limits: config
                .queues
                .iter()
                .filter_map(|(q, d)| d.max_running.map(|m| (q.clone(), m)))
                .collect(),
            bugs: Bugs::default(),
        }
    }
}

/// Names a waiting lease request; the shell keeps the reply channel under it.
pub type PollId = u64;

/// A lease request waiting for work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PollRequest {
    pub id: PollId,
    pub worker: WorkerInfo,
    pub max: u32,
    /// When it must be answered, on the monotonic clock (ms).
    pub deadline_ms: u64,
}

/// An answer to a waiting lease request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub poll: PollId,
    pub result: Result<Vec<LeasedTask>, Error>,
}

impl Reply {
    fn empty(poll: PollId) -> Reply {
        Reply {
            poll,
            result: Ok(Vec::new()),
        }
    }
}

/// What a due tick decided: expiries and a purge to propose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TickWork {
    pub expiries: Vec<Expiry>,
    /// One [`Command::ExpireLease`] per expiry, in the same order.
    pub expire: Vec<Command>,
    pub purge: Option<Command>,
}

/// The grants decided for the waiting requests, to be proposed in one batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantPlan {
    /// One [`Command::GrantLeasesTo`] per request that got tasks picked.
    pub commands: Vec<Command>,
    /// The requests taken out to answer: each with the index of its command, if it has one.
    polls: Vec<(PollRequest, Option<usize>)>,
}

/// What the core did with one applied grant: the requests to answer.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GrantOutcome {
    pub replies: Vec<Reply>,
    /// The leases granted, by the request they answer (for the shell's metrics and for
    /// [`SchedulerCore::undelivered`]).
    pub granted: Vec<(PollId, WorkerId, Vec<LeaseGrant>)>,
}

/// The leader's soft scheduling state and its decisions.
#[derive(Debug)]
pub struct SchedulerCore {
    cfg: CoreConfig,
    tracker: LeaseTracker,
    workers: WorkerRegistry,
    polls: VecDeque<PollRequest>,
    /// The term this core has started (None: not leading).
    term: Option<u64>,
    /// Fencing tokens of the leases whose expiry [`SchedulerCore::tick`] decided and the shell
    /// is proposing, until [`SchedulerCore::expiries_applied`]: a heartbeat in that window
    /// neither extends nor offers them (the expiry is about to end them).
    expiring: BTreeSet<u64>,
    next_tick_ms: u64,
    next_purge_ms: u64,
}

impl SchedulerCore {
    pub fn new(cfg: CoreConfig) -> SchedulerCore {
        SchedulerCore {
            cfg,
            tracker: LeaseTracker::default(),
            workers: WorkerRegistry::default(),
            polls: VecDeque::new(),
            term: None,
            expiring: BTreeSet::new(),
            next_tick_ms: 0,
            next_purge_ms: 0,
        }
    }

    pub fn config(&self) -> &CoreConfig {
        &self.cfg
    }

    /// The term the core decides in, if leading.
    pub fn term(&self) -> Option<u64> {
        self.term
    }

    pub fn workers(&self) -> &WorkerRegistry {
        &self.workers
    }

    pub fn tracker(&self) -> &LeaseTracker {
        &self.tracker
    }

    /// Requests waiting for work.
    pub fn waiting(&self) -> usize {
        self.polls.len()
    }

    /// The next time the core has something to decide without a new input (monotonic ms): its
    /// tick or the earliest request deadline.
    pub fn next_wake_ms(&self) -> u64 {
        self.polls
            .iter()
            .map(|p| p.deadline_ms)
            .fold(self.next_tick_ms, u64::min)
    }

    /// A lease request arrives (the worker is heard from).
    pub fn poll(&mut self, request: PollRequest, now: Now) {
        self.workers.seen(&request.worker, now.mono_ms);
        self.polls.push_back(request);
    }

    /// Drops the requests whose caller hung up (`open` says which are still wanted).
    pub fn retain_polls(&mut self, open: impl Fn(PollId) -> bool) {
        self.polls.retain(|p| open(p.id));
    }

    /// The replica does not lead (any more): every waiting request is answered with `error`
    /// (the caller retries at the leader). Returns the replies and whether the core was leading.
    pub fn stop_leading(&mut self, now: Now, error: &Error) -> (Vec<Reply>, bool) {
        let was = self.term.take().is_some();
        self.expiring.clear();
        self.next_tick_ms = now.mono_ms + self.cfg.tick_ms;
        let replies = self
            .polls
            .drain(..)
            .map(|p| Reply {
                poll: p.id,
                result: Err(error.clone()),
            })
            .collect();
        (replies, was)
    }

    /// The replica leads `term` and everything committed before it is applied (`state`): the
    /// tracker restarts with the failover grace period, so no lease expires only because the
    /// leader changed, and the registry forgets (workers are heard again within a heartbeat).
    pub fn start_term(&mut self, term: u64, now: Now, state: &State) {
        self.tracker
            .start_term(now.mono_ms, self.cfg.failover_grace_ms);
        self.workers.clear();
        self.expiring.clear();
        self.sync(now, state);
        self.term = Some(term);
    }

    /// Brings the tracker in line with the state's leases (after anything changed them).
    pub fn sync(&mut self, now: Now, state: &State) {
        self.tracker.sync(state.leases().map(|(t, l)| LeaseInfo {
            task: t.id,
            worker: l.worker,
            fencing_token: l.fencing_token,
            seen_at_ms: now.mono_ms,
            visibility_timeout_ms: t.spec.visibility_timeout_ms,
        }));
    }

    /// Whether the tick is due at `now`.
    pub fn tick_due(&self, now: Now) -> bool {
        now.mono_ms >= self.next_tick_ms
    }

    /// The periodic work, when due: leases to expire (unseen for their visibility timeout, or
    /// their worker unheard for the liveness timeout; none during the grace period) and a purge
    /// of finished tasks past retention. Also forgets long-silent workers. `None` when not due.
    pub fn tick(&mut self, now: Now, state: &State, rng: &mut impl Rng) -> Option<TickWork> {
        if !self.tick_due(now) {
            return None;
        }
        self.next_tick_ms = now.mono_ms + self.cfg.tick_ms;
        self.sync(now, state);
        let expiries = self.tracker.expired(now.mono_ms, self.cfg.liveness_ms);
        self.expiring
            .extend(expiries.iter().map(|e| e.fencing_token));
        let expire = expiries
            .iter()
            .map(|e| {
                Command::expire(
                    e.task,
                    e.fencing_token,
                    e.reason.clone(),
                    rng.random_range(0..=1000),
                )
            })
            .collect();
        let mut purge = None;
        if now.mono_ms >= self.next_purge_ms {
            self.next_purge_ms = now.mono_ms + PURGE_EVERY_MS;
            let cutoff = now.wall_ms.saturating_sub(self.cfg.retention_ms);
            if state.oldest_finished_ms().is_some_and(|t| t <= cutoff) {
                purge = Some(Command::PurgeFinished {
                    finished_before_ms: cutoff,
                    max: PURGE_MAX,
                });
            }
        }
        self.workers
            .forget_silent(now.mono_ms, self.cfg.forget_after_ms);
        self.tracker
            .forget_silenced(now.mono_ms, self.cfg.forget_after_ms);
        Some(TickWork {
            expiries,
            expire,
            purge,
        })
    }

    /// The expiries were proposed with these `outputs` and `state` is after them. Workers
    /// that lost a lease for silence are silenced (no new lease until they heartbeat: they are
    /// frozen or gone) and their waiting requests are answered empty now. Returns those replies
    /// and the silenced workers.
    pub fn expiries_applied(
        &mut self,
        now: Now,
        state: &State,
        expiries: &[Expiry],
        outputs: &[Result<CommandOutput, Error>],
    ) -> (Vec<Reply>, BTreeSet<WorkerId>) {
        for e in expiries {
            self.expiring.remove(&e.fencing_token);
        }
        let silenced: BTreeSet<WorkerId> = expiries
            .iter()
            .zip(outputs)
            .filter(|(_, o)| matches!(o, Ok(CommandOutput::TaskUpdated { .. })))
            .map(|(e, _)| e.worker)
            .collect();
        for w in &silenced {
            self.tracker.silence(*w, now.mono_ms);
        }
        self.sync(now, state);
        let mut replies = Vec::new();
        self.polls.retain(|p| {
            let drop = silenced.contains(&p.worker.id);
            if drop {
                replies.push(Reply::empty(p.id));
            }
            !drop
        });
        (replies, silenced)
    }

    /// Picks ready tasks for the waiting requests. Requests from draining workers are answered
    /// empty; requests from silenced workers wait (or are answered empty at their deadline);
    /// the others are taken out with a [`Command::GrantLeasesTo`] if anything was picked for
    /// them. One picker serves all, so together they respect pools and queue limits. Returns
    /// the plan and the replies due now.
    pub fn plan_grants(&mut self, now: Now, state: &State) -> (GrantPlan, Vec<Reply>) {
        let mut replies = Vec::new();
        let mut taken = Vec::new();
        let mut keep = VecDeque::new();
        for p in self.polls.drain(..) {
            if self.workers.is_draining(p.worker.id) {
                replies.push(Reply::empty(p.id));
            } else if !self.tracker.may_grant(p.worker.id) {
                if now.mono_ms >= p.deadline_ms {
                    replies.push(Reply::empty(p.id));
                } else {
                    keep.push_back(p);
                }
            } else {
                taken.push(p);
            }
        }
        self.polls = keep;
        let mut picker = state.picker(&self.cfg.queue_limits);
        let mut commands = Vec::new();
        let polls = taken
            .into_iter()
            .map(|p| {
                let max = p.max.min(self.cfg.max_per_request) as usize;
                let ids = picker.pick(&p.worker.queues, max, now.wall_ms);
                if ids.is_empty() {
                    return (p, None);
                }
                commands.push(Command::GrantLeasesTo {
                    worker: p.worker.id,
                    worker_name: p.worker.name.clone(),
                    tasks: ids,
                });
                (p, Some(commands.len() - 1))
            })
            .collect();
        (GrantPlan { commands, polls }, replies)
    }

    /// The plan's commands were proposed with these `outputs` (one per command) and `state`
    /// is after them. A request answered with leases gets them (with each task's spec from
    /// the state); one whose every pick was taken meanwhile, or that got nothing, waits again
    /// unless its deadline passed; an error is passed on.
    pub fn grants_applied(
        &mut self,
        now: Now,
        state: &State,
        plan: GrantPlan,
        outputs: Vec<Result<CommandOutput, Error>>,
    ) -> GrantOutcome {
        let mut outputs: Vec<Option<Result<CommandOutput, Error>>> =
            outputs.into_iter().map(Some).collect();
        let mut out = GrantOutcome::default();
        for (p, command) in plan.polls {
            let answer = command.and_then(|i| outputs.get_mut(i).and_then(Option::take));
            match answer {
                Some(Ok(CommandOutput::LeasesGranted { grants })) if !grants.is_empty() => {
                    let leased = grants
                        .iter()
                        .filter_map(|g| {
                            let t = state.task(g.task)?;
                            Some(LeasedTask {
                                task: g.task,
                                attempt: g.attempt,
                                fencing_token: g.fencing_token,
                                spec: t.spec.clone(),
                            })
                        })
                        .collect();
                    out.replies.push(Reply {
                        poll: p.id,
                        result: Ok(leased),
                    });
                    out.granted.push((p.id, p.worker.id, grants));
                }
                Some(Ok(CommandOutput::LeasesGranted { .. })) | None => {
                    if now.mono_ms >= p.deadline_ms {
                        out.replies.push(Reply::empty(p.id));
                    } else {
                        self.polls.push_back(p);
                    }
                }
                Some(Ok(other)) => out.replies.push(Reply {
                    poll: p.id,
                    result: Err(Error::Internal(format!(
                        "unexpected output for a lease grant: {other:?}"
                    ))),
                }),
                Some(Err(e)) => out.replies.push(Reply {
                    poll: p.id,
                    result: Err(e),
                }),
            }
        }
        if !out.granted.is_empty() {
            self.sync(now, state);
        }
        out
    }

    /// A worker hung up before its granted leases reached it. A live worker adopts them from
    /// its next heartbeat reply without spending an attempt, and a dead one loses them at the
    /// liveness timeout; only a draining worker, which adopts nothing, has them expired at
    /// once. Returns the expiries to propose (empty unless draining).
    pub fn undelivered(
        &self,
        worker: WorkerId,
        grants: &[LeaseGrant],
        rng: &mut impl Rng,
    ) -> Vec<Command> {
        if !self.workers.is_draining(worker) {
            return Vec::new();
        }
        grants
            .iter()
            .map(|g| {
                Command::expire(
                    g.task,
                    g.fencing_token,
                    "the draining worker hung up before it received the lease".into(),
                    rng.random_range(0..=1000),
                )
            })
            .collect()
    }

    /// A heartbeat from `worker` naming `leases`, checked against `state`: each lease the
    /// state still holds under the named token for this worker is extended (or reported
    /// cancelled); any other is fenced. Leases the state records for the worker that the
    /// heartbeat did not name are returned to adopt (their grant's reply was lost).
    pub fn heartbeat(
        &mut self,
        now: Now,
        state: &State,
        worker: &WorkerInfo,
        leases: &[HeldLease],
    ) -> HeartbeatReply {
        let id = worker.id;
        let named: BTreeSet<u64> = leases.iter().map(|l| l.fencing_token).collect();
        let adopt: Vec<LeasedTask> = state
            .leases()
            .filter(|(_, l)| l.worker == id && !named.contains(&l.fencing_token))
            .filter(|(_, l)| !self.expiry_pending(l.fencing_token))
            .map(|(t, l)| LeasedTask {
                task: t.id,
                attempt: l.attempt,
                fencing_token: l.fencing_token,
                spec: t.spec.clone(),
            })
            .collect();
        let verdicts: Vec<LeaseVerdict> =
            leases.iter().map(|l| self.verdict(state, id, l)).collect();
        let extended: Vec<(TaskId, u64)> = leases
            .iter()
            .zip(&verdicts)
            .filter(|(_, v)| **v != LeaseVerdict::Fenced)
            .map(|(l, _)| (l.task, l.fencing_token))
            .chain(adopt.iter().map(|a| (a.task, a.fencing_token)))
            .collect();
        self.tracker.heartbeat(id, &extended, now.mono_ms);
        self.workers.seen(worker, now.mono_ms);
        HeartbeatReply { verdicts, adopt }
    }

    /// Whether this lease's expiry was decided and is being proposed (see `expiring`).
    fn expiry_pending(&self, fencing_token: u64) -> bool {
        !self.cfg.bugs.heartbeat_ignores_pending_expiry && self.expiring.contains(&fencing_token)
    }

    fn verdict(&self, state: &State, worker: WorkerId, held: &HeldLease) -> LeaseVerdict {
        let Some(t) = state.task(held.task) else {
            return LeaseVerdict::Fenced;
        };
        // Its expiry is on its way to the log: the worker must stop, not run on until its next
        // heartbeat (should the expiry not commit, the killed attempt's report ends it).
        if self.expiry_pending(held.fencing_token) {
            return LeaseVerdict::Fenced;
        }
        let holds = t
            .lease
            .as_ref()
            .is_some_and(|x| x.fencing_token == held.fencing_token && x.worker == worker);
        // The bug class kept for the simulator: trusting the task's last attempt instead of its
        // live lease extends a lease whose expiry was already applied.
        let holds = holds
            || (self.cfg.bugs.heartbeat_extends_expired
                && t.attempts
                    .last()
                    .is_some_and(|a| a.fencing_token == held.fencing_token && a.worker == worker));
        match (holds, t.state) {
            (false, _) => LeaseVerdict::Fenced,
            (true, TaskState::Cancelled) => LeaseVerdict::Cancelled,
            (true, _) => LeaseVerdict::Extended,
        }
    }

    /// A worker said it is leaving (its leases were handed back).
    pub fn worker_left(&mut self, worker: WorkerId, now: Now, state: &State) {
        self.workers.remove(worker);
        self.sync(now, state);
    }
}

/// A worker is leaving: an expiry for every lease `state` holds for it, under that lease's
/// fencing token (killed attempts, a lease whose grant reply was lost). `state` must be the
/// state of a leader that caught up with its term: on a lagging one, a lease granted to the
/// worker in an earlier term would be missed, and an expiry proposed for a lease that already
/// ended reaches the log behind whatever ended it (it is refused then, by its token).
pub fn hand_back(state: &State, worker: WorkerId, rng: &mut impl Rng) -> Vec<Command> {
    state
        .leases()
        .filter(|(_, l)| l.worker == worker)
        .map(|(t, l)| {
            Command::expire(
                t.id,
                l.fencing_token,
                format!("handed back by worker {} on shutdown", worker.0),
                rng.random_range(0..=1000),
            )
        })
        .collect()
}

/// `fleet task requeue`: an expiry of the attempt the operator named by its fencing token. The
/// token is the operator's, read seconds ago or sent twice, so this is the one expiry that is
/// routinely stale when applied: the state machine refuses it then, by its token. The leader
/// holds the task back afterwards ([`crate::state::Task::requeue_hold_until_ms`]).
pub fn requeue(task: TaskId, fencing_token: u64, rng: &mut impl Rng) -> Command {
    Command::expire(
        task,
        fencing_token,
        crate::state::REQUEUE_REASON.into(),
        rng.random_range(0..=1000),
    )
}

#[cfg(test)]
mod tests;
