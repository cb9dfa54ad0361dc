//! The leader's scheduling loop: the async shell around [`SchedulerCore`].
//!
//! One task per replica; it acts only while the replica leads. Each iteration it reads the
//! clock and the leadership, then lets the core decide and carries the decisions out:
//!
//! 1. on the first iteration of a term, waits until everything committed before the term is
//!    applied (a ReadIndex round), then [`SchedulerCore::start_term`] (the failover grace);
//! 2. when the tick is due: proposes the expiries and the purge [`SchedulerCore::tick`]
//!    returns, and hands the outcome back ([`SchedulerCore::expiries_applied`]);
//! 3. while lease requests wait: proposes the grants of [`SchedulerCore::plan_grants`] (all in
//!    one Raft entry when they fit) and sends the replies of
//!    [`SchedulerCore::grants_applied`]. Requests that got nothing wait (long poll) until work
//!    arrives or their deadline passes.
//!
//! Every decision is re-checked by the state machine when applied (a task leased meanwhile is
//! skipped; an expiry with an old fencing token is rejected), so a stale decision of a deposed
//! leader is never applied. The loop wakes on a lease request, on any Raft metrics change (a new
//! entry applied, a leader change), on its tick and on the shutdown signal. Metrics and logs are
//! written here, never in the core.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use openraft::async_runtime::WatchReceiver;
use openraft::ReadPolicy;
use tokio::sync::oneshot;

use super::core::{GrantOutcome, PollId, Reply};
use super::{Poll, Scheduler};
use crate::clock::{Clock, Now};
use crate::error::Error;
use crate::health::fault::Stall;
use crate::metrics::names as m;
use crate::raft::proposer::Proposer;
use crate::raft::state_machine_store::StateMachineStore;
use crate::raft::{NodeId, Raft};
use crate::random::Random;
use crate::rpc::LeasedTask;
use crate::shutdown::Shutdown;
use crate::state::{CommandOutput, TaskState};

/// What the scheduling loop needs from its replica, and nothing more.
#[derive(Clone)]
pub struct LoopContext {
    pub node: NodeId,
    pub raft: Raft,
    pub sm: StateMachineStore,
    pub proposer: Proposer,
    pub scheduler: Arc<Scheduler>,
    pub clock: Clock,
    pub random: Random,
    /// The scheduler-stall fault (tests only): the loop hangs in it, alive but idle.
    pub stall: Arc<Stall>,
    pub shutdown: Shutdown,
}

type Senders = BTreeMap<PollId, oneshot::Sender<Result<Vec<LeasedTask>, Error>>>;

/// Runs the loop until the replica shuts down.
pub async fn run(cx: LoopContext) {
    let Some(mut inbox) = cx.scheduler.take_inbox() else {
        return;
    };
    let mut metrics = cx.raft.metrics();
    let mut senders: Senders = BTreeMap::new();
    let mut shutdown = cx.shutdown.clone();
    loop {
        let wake = cx.scheduler.core().next_wake_ms();
        tokio::select! {
            biased;
            _ = shutdown.wait() => return,
            p = inbox.recv() => match p {
                Some(p) => {
                    accept(&cx, &mut senders, p);
                    while let Ok(p) = inbox.try_recv() {
                        accept(&cx, &mut senders, p);
                    }
                }
                None => return,
            },
            r = metrics.changed() => if r.is_err() { return },
            _ = tokio::time::sleep_until(cx.clock.instant_at(wake)) => {}
        }
        // Fault injection (tests only): a stalled loop hangs here, alive but making no progress.
        cx.stall.wait().await;
        iteration(&cx, &mut senders).await;
    }
}

fn accept(cx: &LoopContext, senders: &mut Senders, p: Poll) {
    senders.insert(p.request.id, p.reply);
    cx.scheduler.core().poll(p.request, cx.clock.now());
}

fn send(senders: &mut Senders, replies: Vec<Reply>) {
    for r in replies {
        if let Some(tx) = senders.remove(&r.poll) {
            let _ = tx.send(r.result);
        }
    }
}

/// One iteration: leadership, term start, tick, grants.
async fn iteration(cx: &LoopContext, senders: &mut Senders) {
    let started = std::time::Instant::now();
    let (leading, term) = {
        let m = cx.raft.metrics().borrow_watched().clone();
        (
            m.current_leader == Some(cx.node) && m.state.is_leader(),
            m.current_term,
        )
    };
    let sched = &cx.scheduler;
    if !leading {
        let error = crate::raft::not_leader_of(&cx.raft);
        let (replies, was) = sched.core().stop_leading(cx.clock.now(), &error);
        send(senders, replies);
        if was {
            sched.ready_term.store(0, Ordering::Release);
            tracing::info!(term, "no longer the leader: scheduling stopped here");
        }
        sched.record_iteration(cx.clock.wall_ms());
        return;
    }
    // A new term, or the health monitor cleared the ready term (this loop stalled): catch up
    // and restart the tracker with the failover grace, as after any leader change.
    let started_term = sched.core().term();
    if (started_term != Some(term) || sched.ready_term() != Some(term))
        && !start_term(cx, term).await
    {
        return;
    }
    let now = cx.clock.now();
    // Only iterations that did work are timed: most wake-ups (an entry applied) only look.
    let working = {
        let core = sched.core();
        core.tick_due(now) || core.waiting() > 0
    };
    tick(cx, senders, now).await;
    senders.retain(|_, tx| !tx.is_closed());
    sched.core().retain_polls(|id| senders.contains_key(&id));
    if sched.core().waiting() > 0 {
        grant(cx, senders).await;
    }
    sched.record_iteration(cx.clock.wall_ms());
    if working {
        metrics::histogram!(m::SCHEDULER_LOOP_DURATION).record(started.elapsed());
    }
}

/// Catches up with the term (ReadIndex) and starts it in the core; false while the leadership
/// is not confirmed yet.
async fn start_term(cx: &LoopContext, term: u64) -> bool {
    let sched = &cx.scheduler;
    sched.ready_term.store(0, Ordering::Release);
    // Everything committed in earlier terms must be applied before deciding anything.
    if let Err(e) = cx.raft.ensure_linearizable(ReadPolicy::ReadIndex).await {
        tracing::debug!(error = %e, "leader not confirmed yet; scheduling waits");
        return false;
    }
    let now = cx.clock.now();
    let leases = cx
        .sm
        .read(|s| {
            sched.core().start_term(term, now, s);
            s.leases().count()
        })
        .await;
    sched.ready_since_ms.store(now.wall_ms, Ordering::Release);
    sched.ready_term.store(term, Ordering::Release);
    tracing::info!(
        term,
        leases,
        grace_ms = sched.core().config().failover_grace_ms,
        "leading: scheduling, existing leases honoured with a grace period"
    );
    true
}

/// The periodic work when due: expiries, then the purge.
async fn tick(cx: &LoopContext, senders: &mut Senders, now: Now) {
    let sched = &cx.scheduler;
    let work = cx
        .sm
        .read(|s| cx.random.with(|rng| sched.core().tick(now, s, rng)))
        .await;
    let Some(work) = work else { return };
    if !work.expire.is_empty() {
        let outputs = cx.proposer.propose_many(work.expire).await;
        let now = cx.clock.now();
        let replies = cx
            .sm
            .read(|s| {
                count_dead(s, &work.expiries, &outputs);
                sched
                    .core()
                    .expiries_applied(now, s, &work.expiries, &outputs)
                    .0
            })
            .await;
        // A worker that just lost a lease for silence is frozen or gone: its open lease
        // requests are answered empty now, not with the task it just lost.
        send(senders, replies);
        for (e, out) in work.expiries.iter().zip(outputs) {
            match out {
                Ok(CommandOutput::TaskUpdated { state, .. }) => {
                    metrics::counter!(m::LEASE_EXPIRED, "cause" => e.cause).increment(1);
                    tracing::warn!(
                        task = %e.task,
                        fencing_token = e.fencing_token,
                        reason = %e.reason,
                        state = state.as_str(),
                        "lease expired"
                    )
                }
                Ok(_) => {}
                Err(err) => tracing::debug!(task = %e.task, error = %err, "expiry not applied"),
            }
        }
    }
    if let Some(purge) = work.purge {
        match cx.proposer.propose(purge).await {
            Ok(CommandOutput::Purged { count }) if count > 0 => {
                tracing::info!(count, "purged finished tasks past retention")
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "purge not applied"),
        }
    }
}

fn count_dead(
    s: &crate::state::State,
    expiries: &[super::leases::Expiry],
    outputs: &[Result<CommandOutput, Error>],
) {
    for (e, o) in expiries.iter().zip(outputs) {
        if matches!(
            o,
            Ok(CommandOutput::TaskUpdated {
                state: TaskState::Dead,
                ..
            })
        ) {
            if let Some(t) = s.task(e.task) {
                metrics::counter!(m::TASKS_DEAD, "queue" => t.spec.queue.clone()).increment(1);
            }
        }
    }
}

/// Answers the waiting lease requests that can get work now; the rest keep waiting.
async fn grant(cx: &LoopContext, senders: &mut Senders) {
    let sched = &cx.scheduler;
    let now = cx.clock.now();
    let (plan, replies) = cx.sm.read(|s| sched.core().plan_grants(now, s)).await;
    send(senders, replies);
    let outputs = if plan.commands.is_empty() {
        Vec::new()
    } else {
        cx.proposer.propose_many(plan.commands.clone()).await
    };
    let now = cx.clock.now();
    let outcome = cx
        .sm
        .read(|s| {
            let outcome = sched.core().grants_applied(now, s, plan, outputs);
            record_grants(s, &outcome, now.wall_ms);
            outcome
        })
        .await;
    let mut abandoned = Vec::new();
    let mut granted: BTreeMap<PollId, _> = outcome
        .granted
        .into_iter()
        .map(|(poll, worker, grants)| (poll, (worker, grants)))
        .collect();
    for r in outcome.replies {
        let Some(tx) = senders.remove(&r.poll) else {
            continue;
        };
        if tx.send(r.result).is_err() {
            // The worker hung up while the grant was being committed (it renewed its request
            // after a leader change, or it died).
            if let Some((worker, grants)) = granted.remove(&r.poll) {
                let expire = cx
                    .random
                    .with(|rng| sched.core().undelivered(worker, &grants, rng));
                if expire.is_empty() {
                    tracing::info!(
                        worker = worker.0,
                        count = grants.len(),
                        "a worker hung up before receiving its leases; it adopts them at its \
                         next heartbeat"
                    );
                }
                abandoned.extend(expire);
            }
        }
    }
    if !abandoned.is_empty() {
        // A draining worker hung up while its leases were being committed: hand them back now.
        let outputs = cx.proposer.propose_many(abandoned).await;
        let handed = outputs.iter().filter(|o| o.is_ok()).count();
        metrics::counter!(m::LEASE_EXPIRED, "cause" => "handed_back").increment(handed as u64);
        let now = cx.clock.now();
        cx.sm.read(|s| sched.core().sync(now, s)).await;
    }
}

/// Metrics of granted leases: counts, time queued, schedule lateness.
fn record_grants(s: &crate::state::State, outcome: &GrantOutcome, granted_at: u64) {
    for (_, worker, grants) in &outcome.granted {
        tracing::debug!(worker = worker.0, count = grants.len(), "leases granted");
        for g in grants {
            let Some(t) = s.task(g.task) else { continue };
            let queue = t.spec.queue.clone();
            metrics::counter!(m::LEASE_GRANTED, "queue" => queue.clone()).increment(1);
            metrics::histogram!(m::TASK_QUEUED_DURATION, "queue" => queue).record(
                crate::metrics::seconds_between_ms(t.ready_at_ms, granted_at),
            );
            if let (Some((sch, fire)), 1) = (s.schedules().run_of(g.task), t.attempts.len()) {
                metrics::histogram!(m::SCHEDULE_TICK_LATENESS, "schedule" => sch.name.clone())
                    .record(crate::metrics::seconds_between_ms(fire, granted_at));
            }
        }
    }
}

/// Brings the core's lease tracker in line with the state (after a report or a hand-back).
pub async fn sync_tracker(sm: &StateMachineStore, scheduler: &Scheduler, clock: &Clock) {
    let now = clock.now();
    sm.read(|s| scheduler.core().sync(now, s)).await;
}
