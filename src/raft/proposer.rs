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

use std::sync::Arc;

use openraft::errors::{ClientWriteError, RaftError};
use openraft::impls::ProgressResponder;
use openraft::raft::ClientWriteResult;
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::clock::Clock;
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
    /// Starts the proposer task; `clock` stamps each entry with the leader's wall time.
    pub fn start(raft: Raft, clock: Clock) -> Proposer {
        let (tx, rx) = mpsc::channel(PROPOSE_QUEUE_CAPACITY);
        tokio::spawn(run(raft, clock, rx));
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

async fn run(raft: Raft, clock: Clock, mut rx: mpsc::Receiver<Proposal>) {
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
            proposed_at_ms: clock.wall_ms(),
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
