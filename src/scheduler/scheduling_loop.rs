//! The leader's scheduling loop.
//!
//! One task per replica; it acts only while the replica leads. Each iteration it:
//!
//! 1. on the first iteration of a term, waits until everything committed before the term is
//!    applied (a ReadIndex round), then restarts the lease tracker with the failover grace
//!    period, so no lease expires only because the leader changed;
//! 2. every `scheduler.tick_ms`: proposes [`Command::ExpireLease`] for leases not extended in
//!    time and for all leases of lost workers, and [`Command::PurgeFinished`] for finished tasks
//!    past their retention;
//! 3. answers waiting lease requests: picks ready tasks for each (priority, then FIFO), proposes
//!    one [`Command::GrantLeasesTo`] per worker (all in one Raft entry when they fit), and replies
//!    with what the state machine actually granted. Requests that got nothing wait (long poll)
//!    until work arrives or their deadline passes.
//!
//! Every decision is re-checked by the state machine when applied (a task leased meanwhile is
//! skipped; an expiry with an old fencing token is rejected), so a stale decision of a deposed
//! leader is never applied. Random jitter for retry backoff is drawn here and carried in the
//! command. The loop wakes on a lease request, on any Raft metrics change (a new entry applied,
//! a leader change) and on its tick.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::async_runtime::WatchReceiver;
use openraft::ReadPolicy;

use super::leases::LeaseInfo;
use super::Poll;
use crate::error::Error;
use crate::metrics::names as m;
use crate::rpc::LeasedTask;
use crate::server::proposer::now_ms;
use crate::server::Replica;
use crate::state::{Command, CommandOutput, LeaseGrant, TaskId, WorkerId};

/// How often finished tasks past their retention are looked for.
const PURGE_EVERY: Duration = Duration::from_secs(1);
/// Most tasks one purge command forgets (bounds one entry's apply time).
const PURGE_MAX: u32 = 10_000;

/// Runs the loop until the replica stops.
pub async fn run(replica: Arc<Replica>) {
    let sched = &replica.scheduler;
    let Some(mut inbox) = sched.take_inbox() else {
        return;
    };
    let cfg = replica.config.scheduler.clone();
    let tick = Duration::from_millis(cfg.tick_ms);
    let mut metrics = replica.raft.metrics();
    let mut pending: VecDeque<Poll> = VecDeque::new();
    let mut led_term: Option<u64> = None;
    let mut next_tick = Instant::now();
    let mut next_purge = Instant::now();
    loop {
        let wake = pending
            .iter()
            .map(|p| p.deadline)
            .min()
            .map_or(next_tick, |d| d.min(next_tick));
        tokio::select! {
            p = inbox.recv() => match p {
                Some(p) => {
                    pending.push_back(p);
                    while let Ok(p) = inbox.try_recv() {
                        pending.push_back(p);
                    }
                }
                None => return,
            },
            r = metrics.changed() => if r.is_err() { return },
            _ = tokio::time::sleep_until(wake.into()) => {}
        }
        // Fault injection (tests only): a stalled loop hangs here, alive but making no progress.
        replica.health.faults.scheduler.wait().await;
        let iteration_started = Instant::now();
        let (leading, term) = {
            let m = metrics.borrow_watched();
            (
                m.current_leader == Some(replica.id) && m.state.is_leader(),
                m.current_term,
            )
        };
        if !leading {
            if led_term.take().is_some() {
                sched.ready_term.store(0, Ordering::Release);
                tracing::info!(term, "no longer the leader: scheduling stopped here");
            }
            for p in pending.drain(..) {
                let _ = p.reply.send(Err(replica.not_leader()));
            }
            // Not leading: wake for leader changes (metrics) or the next tick, never spin.
            next_tick = Instant::now() + tick;
            record_iteration(&replica);
            continue;
        }
        // A new term, or the health monitor cleared the ready term (this loop stalled): catch
        // up and restart the tracker with the failover grace, as after any leader change.
        if led_term != Some(term) || sched.ready_term() != Some(term) {
            sched.ready_term.store(0, Ordering::Release);
            // Everything committed in earlier terms must be applied before deciding anything.
            if let Err(e) = replica
                .raft
                .ensure_linearizable(ReadPolicy::ReadIndex)
                .await
            {
                tracing::debug!(error = %e, "leader not confirmed yet; scheduling waits");
                next_tick = Instant::now() + tick;
                continue;
            }
            sched
                .tracker
                .lock()
                .expect("tracker lock")
                .start_term(super::mono_ms(), cfg.failover_grace_ms);
            sched.workers.lock().expect("workers lock").clear();
            sync_tracker(&replica).await;
            led_term = Some(term);
            sched.ready_since_ms.store(now_ms(), Ordering::Release);
            sched.ready_term.store(term, Ordering::Release);
            let leases = replica.sm.read(|s| s.leases().count()).await;
            tracing::info!(
                term,
                leases,
                grace_ms = cfg.failover_grace_ms,
                "leading: scheduling, existing leases honoured with a grace period"
            );
        }
        let now = Instant::now();
        // Only iterations that did work are timed: most wake-ups (an entry applied) only look.
        let working = now >= next_tick || !pending.is_empty();
        if now >= next_tick {
            next_tick = now + tick;
            let silenced = expire_leases(&replica, cfg.worker_liveness_timeout_ms).await;
            // A worker that just lost a lease for silence is frozen or gone: its open lease
            // requests are answered empty now, not with the task it just lost.
            if !silenced.is_empty() {
                let (drop, keep): (Vec<Poll>, Vec<Poll>) = pending
                    .drain(..)
                    .partition(|p| silenced.contains(&p.worker.id));
                pending.extend(keep);
                for p in drop {
                    let _ = p.reply.send(Ok(Vec::new()));
                }
            }
            if now >= next_purge {
                next_purge = now + PURGE_EVERY;
                purge(&replica, cfg.retention_ms).await;
            }
            sched
                .workers
                .lock()
                .expect("workers lock")
                .forget_silent(super::mono_ms(), cfg.forget_workers_after_ms);
            sched
                .tracker
                .lock()
                .expect("tracker lock")
                .forget_silenced(super::mono_ms(), cfg.forget_workers_after_ms);
        }
        if !pending.is_empty() {
            grant(&replica, &mut pending, cfg.max_leases_per_request).await;
        }
        record_iteration(&replica);
        if working {
            metrics::histogram!(m::SCHEDULER_LOOP_DURATION).record(iteration_started.elapsed());
        }
    }
}

fn record_iteration(replica: &Replica) {
    replica.scheduler.record_iteration(now_ms());
}

/// Brings the tracker in line with the leases in the state.
pub(crate) async fn sync_tracker(replica: &Replica) {
    let infos: Vec<LeaseInfo> = replica
        .sm
        .read(|s| {
            s.leases()
                .map(|(t, l)| LeaseInfo {
                    task: t.id,
                    worker: l.worker,
                    fencing_token: l.fencing_token,
                    seen_at_ms: super::mono_ms(),
                    visibility_timeout_ms: t.spec.visibility_timeout_ms,
                })
                .collect()
        })
        .await;
    replica
        .scheduler
        .tracker
        .lock()
        .expect("tracker lock")
        .sync(infos);
}

/// Proposes the due expiries; returns the workers that lost a lease for silence (now
/// silenced in the tracker until they heartbeat again).
async fn expire_leases(replica: &Replica, liveness_ms: u64) -> HashSet<WorkerId> {
    sync_tracker(replica).await;
    let expiries = replica
        .scheduler
        .tracker
        .lock()
        .expect("tracker lock")
        .expired(super::mono_ms(), liveness_ms);
    if expiries.is_empty() {
        return HashSet::new();
    }
    let commands = expiries
        .iter()
        .map(|e| {
            Command::expire(
                e.task,
                e.fencing_token,
                e.reason.clone(),
                rand::random_range(0..=1000),
            )
        })
        .collect();
    let outputs = replica.proposer.propose_many(commands).await;
    let dead: Vec<TaskId> = expiries
        .iter()
        .zip(&outputs)
        .filter(|(_, o)| {
            matches!(o, Ok(CommandOutput::TaskUpdated { state, .. }) if *state == crate::state::TaskState::Dead)
        })
        .map(|(e, _)| e.task)
        .collect();
    if !dead.is_empty() {
        replica
            .sm
            .read(|s| {
                for id in &dead {
                    if let Some(t) = s.task(*id) {
                        metrics::counter!(m::TASKS_DEAD, "queue" => t.spec.queue.clone())
                            .increment(1);
                    }
                }
            })
            .await;
    }
    let mut silenced = HashSet::new();
    for (e, out) in expiries.iter().zip(outputs) {
        match out {
            Ok(CommandOutput::TaskUpdated { state, .. }) => {
                silenced.insert(e.worker);
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
    {
        let mut tracker = replica.scheduler.tracker.lock().expect("tracker lock");
        for w in &silenced {
            tracker.silence(*w, super::mono_ms());
        }
    }
    sync_tracker(replica).await;
    silenced
}

async fn purge(replica: &Replica, retention_ms: u64) {
    let cutoff = now_ms().saturating_sub(retention_ms);
    let due = replica
        .sm
        .read(|s| s.oldest_finished_ms().is_some_and(|t| t <= cutoff))
        .await;
    if !due {
        return;
    }
    match replica
        .proposer
        .propose(Command::PurgeFinished {
            finished_before_ms: cutoff,
            max: PURGE_MAX,
        })
        .await
    {
        Ok(CommandOutput::Purged { count }) if count > 0 => {
            tracing::info!(count, retention_ms, "purged finished tasks past retention")
        }
        Ok(_) => {}
        Err(e) => tracing::debug!(error = %e, "purge not applied"),
    }
}

/// Answers the waiting lease requests that can get work now; the rest keep waiting.
async fn grant(replica: &Replica, pending: &mut VecDeque<Poll>, max_per_request: u32) {
    let mut polls: Vec<Poll> = pending.drain(..).collect();
    // A worker that hung up gets nothing (a lease granted to it would only wait for expiry),
    // and neither does one whose latest heartbeat says it is draining.
    polls.retain(|p| !p.reply.is_closed());
    // Nor one that lost a lease for silence and has not heartbeated since (frozen, or its
    // heartbeats cannot get through): its request waits until it heartbeats or times out.
    {
        let tracker = replica.scheduler.tracker.lock().expect("tracker lock");
        let (keep, wait): (Vec<Poll>, Vec<Poll>) = polls
            .into_iter()
            .partition(|p| tracker.may_grant(p.worker.id));
        polls = keep;
        let now = Instant::now();
        for p in wait {
            if now >= p.deadline {
                let _ = p.reply.send(Ok(Vec::new()));
            } else {
                pending.push_back(p);
            }
        }
    }
    {
        let registry = replica.scheduler.workers.lock().expect("workers lock");
        let (keep, draining): (Vec<Poll>, Vec<Poll>) = polls
            .into_iter()
            .partition(|p| !registry.is_draining(p.worker.id));
        polls = keep;
        for p in draining {
            let _ = p.reply.send(Ok(Vec::new()));
        }
    }
    let now = now_ms();
    let limits: std::collections::BTreeMap<String, u32> = replica
        .config
        .queues
        .iter()
        .filter_map(|(q, d)| d.max_running.map(|m| (q.clone(), m)))
        .collect();
    let limits = &limits;
    let picks: Vec<Vec<TaskId>> = replica
        .sm
        .read(|s| {
            // One picker for every request: together they respect the pools and the queues'
            // `max_running`.
            let mut picker = s.picker(limits);
            polls
                .iter()
                .map(|p| picker.pick(&p.worker.queues, p.max.min(max_per_request) as usize, now))
                .collect()
        })
        .await;
    let mut commands = Vec::new();
    let mut asked = Vec::new();
    for (i, (p, ids)) in polls.iter().zip(picks).enumerate() {
        if !ids.is_empty() {
            commands.push(Command::GrantLeasesTo {
                worker: p.worker.id,
                worker_name: p.worker.name.clone(),
                tasks: ids,
            });
            asked.push(i);
        }
    }
    let mut answers: Vec<Option<Result<Vec<LeaseGrant>, Error>>> = vec![None; polls.len()];
    if !commands.is_empty() {
        let outputs = replica.proposer.propose_many(commands).await;
        for (i, out) in asked.into_iter().zip(outputs) {
            answers[i] = match out {
                // Everything picked was taken meanwhile: keep waiting.
                Ok(CommandOutput::LeasesGranted { grants }) if grants.is_empty() => None,
                Ok(CommandOutput::LeasesGranted { grants }) => Some(Ok(grants)),
                Ok(other) => Some(Err(Error::Internal(format!(
                    "unexpected output for a lease grant: {other:?}"
                )))),
                Err(e) => Some(Err(e)),
            };
        }
    }
    let granted: Vec<TaskId> = answers
        .iter()
        .flatten()
        .flatten()
        .flatten()
        .map(|g| g.task)
        .collect();
    let mut specs = if granted.is_empty() {
        Default::default()
    } else {
        let granted_at = now_ms();
        replica
            .sm
            .read(|s| {
                granted
                    .iter()
                    .filter_map(|id| {
                        let t = s.task(*id)?;
                        let queue = t.spec.queue.clone();
                        metrics::counter!(m::LEASE_GRANTED, "queue" => queue.clone()).increment(1);
                        metrics::histogram!(m::TASK_QUEUED_DURATION, "queue" => queue).record(
                            crate::metrics::seconds_between_ms(t.ready_at_ms, granted_at),
                        );
                        if let (Some((sch, fire)), 1) = (s.schedules().run_of(*id), t.attempts.len()) {
                            metrics::histogram!(m::SCHEDULE_TICK_LATENESS, "schedule" => sch.name.clone())
                                .record(crate::metrics::seconds_between_ms(fire, granted_at));
                        }
                        Some((*id, t.spec.clone()))
                    })
                    .collect::<std::collections::HashMap<_, _>>()
            })
            .await
    };
    let mut abandoned = Vec::new();
    let deadline_now = Instant::now();
    for (p, answer) in polls.into_iter().zip(answers) {
        match answer {
            Some(Ok(grants)) => {
                let leased: Vec<LeasedTask> = grants
                    .iter()
                    .filter_map(|g| {
                        specs.remove(&g.task).map(|spec| LeasedTask {
                            task: g.task,
                            attempt: g.attempt,
                            fencing_token: g.fencing_token,
                            spec,
                        })
                    })
                    .collect();
                tracing::debug!(
                    worker = p.worker.id.0,
                    count = leased.len(),
                    "leases granted"
                );
                if p.reply.send(Ok(leased)).is_err() {
                    // The worker hung up while the grant was being committed (it renewed its
                    // request after a leader change, or it died). A live worker adopts these
                    // leases from its next heartbeat reply, without spending an attempt; a dead
                    // one loses them at the liveness timeout. Only a draining worker, which will
                    // not adopt anything, gets them expired at once.
                    let draining = replica
                        .scheduler
                        .workers
                        .lock()
                        .expect("workers lock")
                        .is_draining(p.worker.id);
                    if draining {
                        abandoned.extend(grants);
                    } else {
                        tracing::info!(
                            worker = p.worker.id.0,
                            count = grants.len(),
                            "a worker hung up before receiving its leases; it adopts them at its \
                             next heartbeat"
                        );
                    }
                }
            }
            Some(Err(e)) => {
                let _ = p.reply.send(Err(e));
            }
            None if deadline_now >= p.deadline => {
                let _ = p.reply.send(Ok(Vec::new()));
            }
            None => pending.push_back(p),
        }
    }
    if !granted.is_empty() {
        sync_tracker(replica).await;
    }
    if !abandoned.is_empty() {
        // A draining worker hung up while its leases were being committed: hand them back now.
        let commands = abandoned
            .iter()
            .map(|g| {
                Command::expire(
                    g.task,
                    g.fencing_token,
                    "the draining worker hung up before it received the lease".into(),
                    rand::random_range(0..=1000),
                )
            })
            .collect();
        let outputs = replica.proposer.propose_many(commands).await;
        let handed = outputs.iter().filter(|o| o.is_ok()).count();
        metrics::counter!(m::LEASE_EXPIRED, "cause" => "handed_back").increment(handed as u64);
    }
}
