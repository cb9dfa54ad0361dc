//! The worker-facing calls, served by the leader (forwarded once from other replicas).
//!
//! - `lease_tasks` hands the request to the scheduling loop and waits (long poll);
//! - `heartbeat` checks each named lease against the replicated state and extends it in the
//!   leader's soft state only: no Raft write;
//! - `report` commits how attempts ended (the state machine rejects a stale fencing token);
//! - `worker_leave` hands back every lease a departing worker still holds;
//! - `list_workers` shows the registry.
//!
//! A heartbeat is only answered by a leader that has caught up with its term's state (else a
//! lease granted just before the leader change could be fenced by mistake) and that heard from
//! a quorum within the election timeout (else a deposed leader could keep extending leases its
//! successor already gave away).

use std::time::{Duration, Instant};

use openraft::async_runtime::WatchReceiver;
use openraft::Instant as _;
use tarpc::context::Context;

use super::Replica;
use crate::error::Error;
use crate::metrics::names as m;
use crate::rpc::{
    AttemptReport, HeartbeatReply, HeldLease, LeaseVerdict, LeasedTask, WorkerInfo, WorkerStatus,
};
use crate::state::{validate_queue_name, Command, CommandOutput, TaskState, WorkerId};

/// Longest long poll a worker may ask for.
pub const MAX_POLL_WAIT_MS: u64 = 60_000;
/// Most leases one heartbeat or report call may name.
pub const MAX_LEASES_PER_CALL: usize = 10_000;
/// Longest output tail a report may carry.
pub const MAX_OUTPUT_TAIL_BYTES: usize = 1 << 20;

fn check_worker(w: &WorkerInfo) -> Result<(), Error> {
    if w.queues.is_empty() {
        return Err(Error::InvalidArgument(
            "the worker names no queue; give at least one".into(),
        ));
    }
    for q in &w.queues {
        validate_queue_name(q).map_err(|e| Error::InvalidArgument(e.to_string()))?;
    }
    if w.name.len() > 256 {
        return Err(Error::InvalidArgument(format!(
            "worker name of {} bytes is too long; at most 256",
            w.name.len()
        )));
    }
    Ok(())
}

impl Replica {
    /// True when this replica leads and its scheduling loop has caught up with the term.
    fn scheduler_ready(&self) -> Result<(), Error> {
        let m = self.raft.metrics().borrow_watched().clone();
        if m.current_leader != Some(self.id) {
            return Err(self.not_leader());
        }
        if self.health.is_stalled() {
            return Err(self.stalled_error());
        }
        if self.scheduler.ready_term() != Some(m.current_term) {
            return Err(Error::Unavailable(
                "this replica just became leader and is catching up; retry shortly".into(),
            ));
        }
        // Followers elect no one else until the lease they granted (election_timeout_max from
        // the heartbeat's sending time, which `last_quorum_acked` is) has run out; one heartbeat
        // interval of it is kept as margin.
        let limit = (self.config.raft.election_timeout_max()
            - self.config.raft.heartbeat_interval())
        .as_millis() as u64;
        let since_ack = m
            .last_quorum_acked
            .as_ref()
            .map(|t| t.elapsed().as_millis() as u64);
        match since_ack {
            Some(ms) if ms <= limit => Ok(()),
            // A single-voter cluster is its own quorum.
            _ if m.membership_config.membership().voter_ids().count() == 1 => Ok(()),
            other => Err(Error::Unavailable(format!(
                "the leader has not heard from a quorum for {} ms; it may have been deposed",
                other.map_or("ever".into(), |ms| ms.to_string())
            ))),
        }
    }

    pub(crate) async fn lease_tasks(
        &self,
        ctx: Context,
        worker: WorkerInfo,
        max: u32,
        wait_ms: u64,
        hop: u8,
    ) -> Result<Vec<LeasedTask>, Error> {
        check_worker(&worker)?;
        if max == 0 {
            return Err(Error::InvalidArgument(
                "a lease request for 0 tasks; ask for at least 1".into(),
            ));
        }
        if wait_ms > MAX_POLL_WAIT_MS {
            return Err(Error::InvalidArgument(format!(
                "wait of {wait_ms} ms is too long; at most {MAX_POLL_WAIT_MS} ms"
            )));
        }
        if !self.raft.is_leader() {
            return self
                .forward(ctx, hop, |c, ctx| async move {
                    c.lease_tasks(ctx, worker, max, wait_ms, hop + 1).await
                })
                .await;
        }
        // Answer before the caller's deadline, leaving time for the reply to travel.
        let by_ctx = ctx
            .deadline
            .checked_sub(Duration::from_millis(200))
            .unwrap_or(ctx.deadline);
        let mono = self.clock.mono_ms();
        let until_ctx = by_ctx.saturating_duration_since(Instant::now()).as_millis() as u64;
        let deadline_ms = mono + wait_ms.min(until_ctx);
        if self.health.is_stalled() {
            return Err(self.stalled_error());
        }
        // The loop answers by the deadline, unless it is stuck: then the request is released
        // when the health monitor declares the stall, when this replica stops leading, or at
        // the deadline, whichever comes first, so the worker goes elsewhere.
        let mut metrics = self.raft.metrics();
        let deposed = async {
            loop {
                if metrics.borrow_watched().current_leader != Some(self.id) {
                    return;
                }
                if metrics.changed().await.is_err() {
                    return;
                }
            }
        };
        tokio::select! {
            r = self.scheduler.lease(worker, max, deadline_ms) => r,
            _ = deposed => Err(self.not_leader()),
            _ = self.health.wait_stalled() => Err(self.stalled_error()),
            _ = tokio::time::sleep_until(self.clock.instant_at(mono + wait_ms.max(until_ctx))) => Err(Error::Unavailable(
                "the scheduling loop did not answer this lease request in time; retry".into(),
            )),
        }
    }

    fn stalled_error(&self) -> Error {
        Error::Unavailable(format!(
            "the scheduling loop on node {} is stalled; leadership is moving to a healthy \
             replica; retry",
            self.id
        ))
    }

    pub(crate) async fn heartbeat(
        &self,
        ctx: Context,
        worker: WorkerInfo,
        leases: Vec<HeldLease>,
        hop: u8,
    ) -> Result<HeartbeatReply, Error> {
        check_worker(&worker)?;
        if leases.len() > MAX_LEASES_PER_CALL {
            return Err(Error::InvalidArgument(format!(
                "{} leases in one heartbeat; at most {MAX_LEASES_PER_CALL}",
                leases.len()
            )));
        }
        if !self.raft.is_leader() {
            return self
                .forward(ctx, hop, |c, ctx| async move {
                    c.heartbeat(ctx, worker, leases, hop + 1).await
                })
                .await;
        }
        self.scheduler_ready()?;
        let id = worker.id;
        let now = self.clock.now();
        let reply = self
            .sm
            .read(|s| self.scheduler.core().heartbeat(now, s, &worker, &leases))
            .await;
        for a in &reply.adopt {
            tracing::info!(
                worker = id.0,
                task = %a.task,
                fencing_token = a.fencing_token,
                "the worker's heartbeat did not name a lease it holds: asking it to adopt it"
            );
        }
        let verdicts = &reply.verdicts;
        let fenced = verdicts
            .iter()
            .filter(|v| **v == LeaseVerdict::Fenced)
            .count() as u64;
        metrics::counter!(m::LEASE_EXTENDED).increment(verdicts.len() as u64 - fenced);
        if fenced > 0 {
            metrics::counter!(m::LEASE_FENCED, "call" => "heartbeat").increment(fenced);
        }
        for (l, v) in leases.iter().zip(verdicts) {
            if *v == LeaseVerdict::Fenced {
                tracing::warn!(
                    worker = id.0,
                    task = %l.task,
                    fencing_token = l.fencing_token,
                    "heartbeat for a lease that is gone: the worker must stop the attempt"
                );
            }
        }
        Ok(reply)
    }

    pub(crate) async fn report(
        &self,
        ctx: Context,
        worker: WorkerId,
        reports: Vec<AttemptReport>,
        hop: u8,
    ) -> Result<Vec<Result<TaskState, Error>>, Error> {
        if reports.len() > MAX_LEASES_PER_CALL {
            return Err(Error::InvalidArgument(format!(
                "{} reports in one call; at most {MAX_LEASES_PER_CALL}",
                reports.len()
            )));
        }
        if let Some(r) = reports
            .iter()
            .find(|r| r.output_tail.len() > MAX_OUTPUT_TAIL_BYTES)
        {
            return Err(Error::InvalidArgument(format!(
                "output tail of {} bytes for task {}; at most {MAX_OUTPUT_TAIL_BYTES}",
                r.output_tail.len(),
                r.task
            )));
        }
        if !self.raft.is_leader() {
            return self
                .forward(ctx, hop, |c, ctx| async move {
                    c.report(ctx, worker, reports, hop + 1).await
                })
                .await;
        }
        let commands = reports
            .iter()
            .map(|r| Command::Complete {
                task: r.task,
                fencing_token: r.fencing_token,
                outcome: r.outcome.clone(),
                output_tail: r.output_tail.clone(),
                retry_jitter_permille: self.random.range(0..=1000),
            })
            .collect();
        let outputs = self.proposer.propose_many(commands).await;
        if let Some(Err(e)) = outputs
            .iter()
            .find(|r| matches!(r, Err(e) if e.is_retryable()))
        {
            return Err(e.clone());
        }
        self.record_reports(&reports, &outputs).await;
        let results = reports
            .iter()
            .zip(outputs)
            .map(|(r, out)| match out {
                Ok(CommandOutput::TaskUpdated { state, .. }) => {
                    tracing::debug!(worker = worker.0, task = %r.task, state = state.as_str(), "attempt reported");
                    Ok(state)
                }
                Ok(other) => Err(Error::Internal(format!(
                    "unexpected output for a report: {other:?}"
                ))),
                Err(e) => {
                    tracing::warn!(worker = worker.0, task = %r.task, fencing_token = r.fencing_token, error = %e, "report rejected");
                    Err(e)
                }
            })
            .collect();
        crate::scheduler::scheduling_loop::sync_tracker(&self.sm, &self.scheduler, &self.clock)
            .await;
        Ok(results)
    }

    /// Metrics of committed reports: outcomes, run time, dead tasks, fenced reports.
    async fn record_reports(
        &self,
        reports: &[AttemptReport],
        outputs: &[Result<CommandOutput, Error>],
    ) {
        let fenced = outputs
            .iter()
            .filter(|o| matches!(o, Err(Error::StaleToken(_))))
            .count() as u64;
        if fenced > 0 {
            metrics::counter!(m::LEASE_FENCED, "call" => "report").increment(fenced);
        }
        let done: Vec<(&AttemptReport, TaskState)> = reports
            .iter()
            .zip(outputs)
            .filter_map(|(r, o)| match o {
                Ok(CommandOutput::TaskUpdated { state, .. }) => Some((r, *state)),
                _ => None,
            })
            .collect();
        if done.is_empty() {
            return;
        }
        self.sm
            .read(|s| {
                for (r, state) in &done {
                    let Some(t) = s.task(r.task) else { continue };
                    let queue = t.spec.queue.clone();
                    let name = match r.outcome {
                        crate::state::AttemptOutcome::Succeeded => m::ATTEMPTS_SUCCEEDED,
                        crate::state::AttemptOutcome::Failed { .. } => m::ATTEMPTS_FAILED,
                        crate::state::AttemptOutcome::TimedOut => m::ATTEMPTS_TIMED_OUT,
                        _ => "",
                    };
                    if !name.is_empty() {
                        metrics::counter!(name, "queue" => queue.clone()).increment(1);
                    }
                    if *state == TaskState::Dead {
                        metrics::counter!(m::TASKS_DEAD, "queue" => queue.clone()).increment(1);
                    }
                    if let Some(a) = t
                        .attempts
                        .iter()
                        .find(|a| a.fencing_token == r.fencing_token)
                    {
                        if let Some(end) = a.ended_at_ms {
                            metrics::histogram!(m::TASK_DURATION, "queue" => queue)
                                .record(crate::metrics::seconds_between_ms(a.started_at_ms, end));
                        }
                    }
                }
            })
            .await;
    }

    pub(crate) async fn worker_leave(
        &self,
        ctx: Context,
        worker: WorkerId,
        hop: u8,
    ) -> Result<u32, Error> {
        if !self.raft.is_leader() {
            return self
                .forward(ctx, hop, |c, ctx| async move {
                    c.worker_leave(ctx, worker, hop + 1).await
                })
                .await;
        }
        // The leases are read from the applied state, so a new leader must have caught up
        // with its term first (the error is retryable; the worker's client retries).
        self.scheduler_ready()?;
        let commands = self
            .sm
            .read(|s| {
                self.random
                    .with(|r| crate::scheduler::core::hand_back(s, worker, r))
            })
            .await;
        let outputs = self.proposer.propose_many(commands).await;
        if let Some(Err(e)) = outputs.iter().find(|r| r.is_err()) {
            if e.is_retryable() {
                return Err(e.clone());
            }
        }
        let handed = outputs.iter().filter(|r| r.is_ok()).count() as u32;
        metrics::counter!(m::LEASE_EXPIRED, "cause" => "handed_back").increment(u64::from(handed));
        tracing::info!(worker = worker.0, handed_back = handed, "worker left");
        let now = self.clock.now();
        self.sm
            .read(|s| self.scheduler.core().worker_left(worker, now, s))
            .await;
        Ok(handed)
    }

    pub(crate) async fn list_workers(
        &self,
        ctx: Context,
        hop: u8,
    ) -> Result<Vec<WorkerStatus>, Error> {
        if !self.raft.is_leader() {
            return self
                .forward(ctx, hop, |c, ctx| async move {
                    c.list_workers(ctx, hop + 1).await
                })
                .await;
        }
        let counts: std::collections::BTreeMap<WorkerId, u32> = self
            .sm
            .read(|s| {
                let mut m = std::collections::BTreeMap::new();
                for (_, l) in s.leases() {
                    *m.entry(l.worker).or_insert(0) += 1;
                }
                m
            })
            .await;
        let list = self.scheduler.core().workers().list(
            self.clock.mono_ms(),
            self.config.scheduler.worker_liveness_timeout_ms,
        );
        Ok(list
            .into_iter()
            .map(|(r, state)| WorkerStatus {
                leases: counts.get(&r.info.id).copied().unwrap_or(0),
                info: r.info,
                state: state.as_str().into(),
                last_seen_ms: self.clock.mono_to_wall_ms(r.last_seen_ms),
            })
            .collect())
    }
}
