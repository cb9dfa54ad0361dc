//! Write batching on the leader: many concurrent client commands share one Raft entry.
//!
//! Handlers hand a [`Command`] to the [`Proposer`] and await its result. The proposer task takes
//! the first waiting command, waits for an in-flight slot, then drains every command that queued
//! meanwhile (up to [`MAX_BATCH_COMMANDS`] / [`MAX_BATCH_BYTES`]) into one [`Request`], stamps
//! the leader's clock into it, and proposes it. While all [`MAX_BATCHES_IN_FLIGHT`] slots are
//! busy, commands accumulate, so batches grow with load: one entry, one replication round and
//! one fsync per replica serve a whole batch. A result is returned only after Raft committed
//! the entry (on a quorum of fsynced logs) and applied it.
//!
//! Bound: [`PROPOSE_QUEUE_CAPACITY`] commands wait at most; beyond that, callers wait for room.

use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use openraft::errors::{ClientWriteError, RaftError};
use openraft::impls::ProgressResponder;
use openraft::raft::ClientWriteResult;
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::error::Error;
use crate::raft::{Raft, TypeConfig};
use crate::state::{Command, CommandOutput, Request};

pub const PROPOSE_QUEUE_CAPACITY: usize = 16_384;
pub const MAX_BATCH_COMMANDS: usize = 1024;
pub const MAX_BATCH_BYTES: usize = 1 << 20;
pub const MAX_BATCHES_IN_FLIGHT: usize = 8;

struct Proposal {
    command: Command,
    bytes: usize,
    reply: oneshot::Sender<Result<CommandOutput, Error>>,
}

/// The handle handlers use to propose commands.
#[derive(Clone)]
pub struct Proposer {
    tx: mpsc::Sender<Proposal>,
}

impl Proposer {
    pub fn start(raft: Raft) -> Proposer {
        let (tx, rx) = mpsc::channel(PROPOSE_QUEUE_CAPACITY);
        tokio::spawn(run(raft, rx));
        Proposer { tx }
    }

    /// Proposes one command and waits until it is committed and applied.
    pub async fn propose(&self, command: Command) -> Result<CommandOutput, Error> {
        self.propose_many(vec![command])
            .await
            .pop()
            .expect("one result per command")
    }

    /// Proposes commands in the given order (they are applied in that order, possibly across
    /// several batches) and returns one result per command.
    pub async fn propose_many(&self, commands: Vec<Command>) -> Vec<Result<CommandOutput, Error>> {
        let shutting_down = || Error::Unavailable("the replica is shutting down".into());
        let mut waiting = Vec::with_capacity(commands.len());
        for command in commands {
            let bytes = estimate_bytes(&command);
            let (reply, rx) = oneshot::channel();
            // Sent one after another on one channel: the proposer sees them in this order.
            let sent = self
                .tx
                .send(Proposal {
                    command,
                    bytes,
                    reply,
                })
                .await;
            waiting.push(sent.ok().map(|_| rx));
        }
        let mut results = Vec::with_capacity(waiting.len());
        for rx in waiting {
            results.push(match rx {
                Some(rx) => rx.await.unwrap_or_else(|_| Err(shutting_down())),
                None => Err(shutting_down()),
            });
        }
        results
    }
}

fn spec_bytes(spec: &crate::state::TaskSpec) -> usize {
    128 + spec.queue.len()
        + spec.command.iter().map(|a| a.len() + 2).sum::<usize>()
        + spec
            .env
            .iter()
            .map(|(k, v)| k.len() + v.len() + 4)
            .sum::<usize>()
}

fn estimate_bytes(c: &Command) -> usize {
    match c {
        Command::SubmitTask { spec, .. } => spec_bytes(spec),
        Command::SubmitPooled { spec, pool, .. } => spec_bytes(spec) + pool.pool.len() + 8,
        Command::PutSchedule { name, spec, .. } => 128 + name.len() + spec_bytes(&spec.task),
        Command::FireTicks { plans } => plans
            .iter()
            .map(|p| {
                32 + 24 * p.runs.len() + p.missed.iter().map(|m| 32 + m.reason.len()).sum::<usize>()
            })
            .sum(),
        Command::Backfill { name, fires } => 32 + name.len() + 9 * fires.len(),
        Command::PauseSchedule { name, .. }
        | Command::DeleteSchedule { name }
        | Command::TriggerSchedule { name, .. }
        | Command::SetPool { name, .. }
        | Command::DeletePool { name } => 48 + name.len(),
        Command::Complete { output_tail, .. } => 128 + output_tail.len(),
        Command::GrantLeases { tasks, .. } => 32 + 10 * tasks.len(),
        Command::GrantLeasesTo {
            worker_name, tasks, ..
        } => 32 + worker_name.len() + 10 * tasks.len(),
        Command::ExpireLease { reason, .. } => 64 + reason.len(),
        Command::Cancel { .. } | Command::Retry { .. } | Command::PurgeFinished { .. } => 32,
        Command::PutWorkflow { name, spec, .. } => {
            128 + name.len()
                + spec
                    .graph
                    .names
                    .iter()
                    .zip(&spec.nodes)
                    .map(|(n, t)| 16 + 2 * n.len() + spec_bytes(&t.task))
                    .sum::<usize>()
        }
        Command::DeleteWorkflow { name } => 48 + name.len(),
        Command::StartRun {
            workflow, params, ..
        } => {
            64 + workflow.len()
                + params
                    .iter()
                    .map(|(k, v)| k.len() + v.len() + 4)
                    .sum::<usize>()
        }
        Command::CancelRun { .. } | Command::RetryRun { .. } => 32,
        Command::SubmitAfter { spec, after, .. } => spec_bytes(spec) + 64 + 10 * after.len(),
        Command::BackfillWorkflow { name, fires } => 32 + name.len() + 9 * fires.len(),
    }
}

async fn run(raft: Raft, mut rx: mpsc::Receiver<Proposal>) {
    let slots = Arc::new(Semaphore::new(MAX_BATCHES_IN_FLIGHT));
    while let Some(first) = rx.recv().await {
        let permit = slots
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore never closed");
        let mut bytes = first.bytes;
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH_COMMANDS && bytes < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok(p) => {
                    bytes += p.bytes;
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        let (commands, replies): (Vec<_>, Vec<_>) =
            batch.into_iter().map(|p| (p.command, p.reply)).unzip();
        let request = Request {
            proposed_at_ms: now_ms(),
            commands,
        };
        // Handing the entry to Raft happens here, in order, so batches are appended in the
        // order their commands arrived; only waiting for the outcome runs concurrently.
        let (responder, outcome) =
            ProgressResponder::<TypeConfig, ClientWriteResult<TypeConfig>>::complete_only();
        if let Err(fatal) = raft.client_write_ff(request, Some(responder)).await {
            let err = write_error(RaftError::Fatal(fatal));
            for reply in replies {
                let _ = reply.send(Err(err.clone()));
            }
            continue;
        }
        tokio::spawn(async move {
            let _permit = permit;
            match outcome.await {
                Ok(Ok(resp)) => {
                    let results = resp.data.results;
                    assert_eq!(results.len(), replies.len(), "one result per command");
                    for (reply, r) in replies.into_iter().zip(results) {
                        let _ = reply.send(r.map_err(Error::from));
                    }
                }
                Ok(Err(e)) => {
                    let err = write_error(RaftError::APIError(e));
                    for reply in replies {
                        let _ = reply.send(Err(err.clone()));
                    }
                }
                Err(_) => {
                    let err = Error::Unavailable("raft dropped the write (shutting down)".into());
                    for reply in replies {
                        let _ = reply.send(Err(err.clone()));
                    }
                }
            }
        });
    }
}

/// Maps openraft's write error to fleet's.
pub fn write_error(e: RaftError<TypeConfig, ClientWriteError<TypeConfig>>) -> Error {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f))
        | RaftError::APIError(ClientWriteError::LogEntryDiscarded(f)) => Error::NotLeader {
            leader_id: f.leader_id,
            leader_addr: f.leader_node.map(|n| n.addr),
        },
        RaftError::APIError(other) => Error::Unavailable(other.to_string()),
        RaftError::Fatal(f) => Error::Unavailable(format!("raft has stopped on this replica: {f}")),
    }
}

/// The replica's clock in ms since the Unix epoch: the one place a replica reads wall time
/// (through [`slew_us`]), plus the injected offset of a clock fault (see `health::fault`).
///
/// It follows the wall clock exactly while the two agree within [`CLOCK_STEP_TOLERANCE_US`].
/// A larger step (NTP jumping, `date -s`, a wrong clock at boot) is not followed at once: the
/// clock moves toward it at most 10% faster or slower than the monotonic clock, and never goes
/// back. Why: the leader stamps this clock into the replicated state, whose clock never goes
/// back, and retry times are computed from it. Followed at once, a one-minute step forward
/// that was then corrected held every retry for that minute (found by the chaos harness's
/// clock-step scenario). Lease expiry does not use this clock at all
/// (`scheduler::mono_ms`).
pub fn now_ms() -> u64 {
    static CLOCK: Mutex<Option<(u64, std::time::Instant)>> = Mutex::new(None);
    let wall_us = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
        .saturating_add_signed(crate::health::fault::clock_offset_ms().saturating_mul(1000));
    let mut clock = CLOCK.lock().expect("clock lock");
    let now = std::time::Instant::now();
    let us = match *clock {
        None => wall_us,
        Some((last_us, at)) => slew_us(last_us, (now - at).as_micros() as u64, wall_us),
    };
    *clock = Some((us, now));
    us / 1000
}

/// Wall-clock differences up to this are followed at once.
pub const CLOCK_STEP_TOLERANCE_US: u64 = 1_000_000;

/// The next clock reading: `last_us` advanced by `elapsed_us` (monotonic), moved toward
/// `wall_us` as [`now_ms`] describes. Pure, for tests.
pub fn slew_us(last_us: u64, elapsed_us: u64, wall_us: u64) -> u64 {
    let projected = last_us + elapsed_us;
    let next = if wall_us.abs_diff(projected) <= CLOCK_STEP_TOLERANCE_US {
        wall_us
    } else if wall_us > projected {
        projected + elapsed_us / 10
    } else {
        projected - elapsed_us / 10
    };
    next.max(last_us)
}

#[cfg(test)]
mod clock_tests {
    use super::*;

    #[test]
    fn the_clock_follows_small_differences_and_slews_toward_steps() {
        const S: u64 = 1_000_000;
        // In step with the wall clock: followed exactly, small corrections too.
        assert_eq!(slew_us(100 * S, S, 101 * S), 101 * S);
        assert_eq!(slew_us(100 * S, S, 101 * S + S / 2), 101 * S + S / 2);
        // A minute forward: 10% faster than real time, not the minute.
        assert_eq!(slew_us(100 * S, S, 161 * S), 101 * S + S / 10);
        // A minute back: 10% slower, never backwards.
        assert_eq!(slew_us(100 * S, S, 41 * S), 101 * S - S / 10);
        assert_eq!(slew_us(100 * S, 0, 41 * S), 100 * S);
        // A small step back is followed, but the clock holds still rather than go back.
        assert_eq!(slew_us(100 * S, 0, 100 * S - S / 2), 100 * S);
        // Slewing converges: a minute ahead is absorbed within ten minutes.
        let (mut clock, mut wall) = (160 * S, 100 * S);
        for _ in 0..700 {
            clock = slew_us(clock, S, wall + S);
            wall += S;
        }
        assert_eq!(clock, wall, "caught up with the wall clock");
    }
}
