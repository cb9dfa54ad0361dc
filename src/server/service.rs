//! The handlers of [`FleetService`]: Raft RPCs from peers, and client calls.
//!
//! Client writes, linearizable reads and membership changes must run on the leader. A handler
//! on a follower forwards the call to the leader once (`hop` goes from 0 to 1); a forwarded call
//! that again lands on a non-leader (leadership just moved) returns [`Error::NotLeader`] with the
//! leader's address, and the client retries. Forwarded calls keep the caller's deadline.

use openraft::async_runtime::WatchReceiver;
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::io::Cursor;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use openraft::{ChangeMembers, ReadPolicy};
use tarpc::context::Context;

use super::{IncomingSnapshot, Replica};
use crate::error::Error;
use crate::raft::{Node, NodeId, TypeConfig};
use crate::rpc::peer::is_transport_failure;
use crate::rpc::{
    AppendReq, AppendResp, BackupChunk, ClusterStatus, FleetService, FleetServiceClient, NodeInfo,
    ReadMode, ReadReply, Role, SnapshotChunk, SnapshotResp, SubmitTask, Submitted, TransferReq,
    TransferResp, VoteReq, VoteResp,
};
use crate::state::{Command, CommandOutput, QueueStats, Task, TaskFilter, TaskId, TaskState};

/// Most tasks one `submit` call may carry; the CLI splits larger files into batches.
pub const MAX_SUBMIT_BATCH: usize = 10_000;
/// Most tasks one `list_tasks` call returns.
pub const MAX_LIST_LIMIT: usize = 10_000;
/// A forwarded call waiting for a new leader gives up this long before the caller's deadline,
/// so its answer arrives in time.
const FORWARD_MARGIN: Duration = Duration::from_millis(100);

/// One accepted connection: the replica plus who is calling.
#[derive(Clone)]
pub struct Connection {
    pub replica: Arc<Replica>,
    pub role: Role,
    pub remote: SocketAddr,
}

impl Connection {
    fn require_replica(&self, call: &str) -> Result<(), Error> {
        if self.role == Role::Replica {
            Ok(())
        } else {
            tracing::warn!(remote = %self.remote, call, "refused a replica-only call from a client");
            Err(Error::Rejected(format!(
                "{call} is only accepted from replicas"
            )))
        }
    }
}

fn fatal(e: impl std::fmt::Display) -> Error {
    Error::Unavailable(format!("raft has stopped on this replica: {e}"))
}

impl FleetService for Connection {
    async fn raft_append(self, _: Context, req: AppendReq) -> Result<AppendResp, Error> {
        self.require_replica("raft_append")?;
        let leader = req.vote.leader_id().node_id;
        let resp = self.replica.raft.append_entries(req).await.map_err(fatal)?;
        if !matches!(resp, openraft::raft::AppendEntriesResponse::HigherVote(_)) {
            self.replica.health.note_leader_contact();
            self.replica
                .leader_loss
                .appended(leader, std::time::Instant::now());
        }
        Ok(resp)
    }

    async fn raft_vote(self, _: Context, req: VoteReq) -> Result<VoteResp, Error> {
        self.require_replica("raft_vote")?;
        self.replica.raft.vote(req).await.map_err(fatal)
    }

    async fn raft_pre_vote(self, _: Context, req: VoteReq) -> Result<VoteResp, Error> {
        self.require_replica("raft_pre_vote")?;
        self.replica.raft.pre_vote(req).await.map_err(fatal)
    }

    async fn raft_snapshot_chunk(
        self,
        _: Context,
        chunk: SnapshotChunk,
    ) -> Result<Option<SnapshotResp>, Error> {
        self.require_replica("raft_snapshot_chunk")?;
        self.replica.receive_snapshot_chunk(chunk).await
    }

    async fn raft_transfer_leader(
        self,
        _: Context,
        req: TransferReq,
    ) -> Result<TransferResp, Error> {
        self.require_replica("raft_transfer_leader")?;
        self.replica
            .raft
            .handle_transfer_leader(req)
            .await
            .map_err(fatal)
    }

    async fn discover(self, _: Context) -> NodeInfo {
        self.replica.node_info()
    }

    async fn submit(
        self,
        ctx: Context,
        tasks: Vec<SubmitTask>,
        hop: u8,
    ) -> Result<Vec<Result<Submitted, Error>>, Error> {
        self.replica.submit(ctx, tasks, hop).await
    }

    async fn get_task(
        self,
        ctx: Context,
        id: TaskId,
        mode: ReadMode,
        hop: u8,
    ) -> Result<ReadReply<Option<Task>>, Error> {
        let r = self.replica.clone();
        r.read(
            ctx,
            mode,
            hop,
            move |s| s.task(id).cloned(),
            move |c, ctx| async move { c.get_task(ctx, id, mode, hop + 1).await },
        )
        .await
    }

    async fn list_tasks(
        self,
        ctx: Context,
        mut filter: TaskFilter,
        mode: ReadMode,
        hop: u8,
    ) -> Result<ReadReply<Vec<Task>>, Error> {
        if filter.limit == 0 || filter.limit > MAX_LIST_LIMIT {
            filter.limit = MAX_LIST_LIMIT;
        }
        let r = self.replica.clone();
        let f2 = filter.clone();
        r.read(
            ctx,
            mode,
            hop,
            move |s| s.tasks(&filter),
            move |c, ctx| async move { c.list_tasks(ctx, f2, mode, hop + 1).await },
        )
        .await
    }

    async fn cluster_status(self, ctx: Context, hop: u8) -> Result<ClusterStatus, Error> {
        let r = &self.replica;
        if r.raft.is_leader() || hop > 0 {
            return Ok(r.local_status());
        }
        match r
            .forward(
                ctx,
                hop,
                |c, ctx| async move { c.cluster_status(ctx, 1).await },
            )
            .await
        {
            Ok(status) => Ok(status),
            // No leader reachable: say what this replica sees, marked as a local view.
            Err(_) => Ok(r.local_status()),
        }
    }

    async fn cancel_task(self, ctx: Context, id: TaskId, hop: u8) -> Result<TaskState, Error> {
        let forward =
            move |c: FleetServiceClient, ctx| async move { c.cancel_task(ctx, id, hop + 1).await };
        self.replica
            .task_command(ctx, hop, Command::Cancel { task: id }, forward)
            .await
    }

    async fn retry_task(self, ctx: Context, id: TaskId, hop: u8) -> Result<TaskState, Error> {
        let forward =
            move |c: FleetServiceClient, ctx| async move { c.retry_task(ctx, id, hop + 1).await };
        self.replica
            .task_command(ctx, hop, Command::Retry { task: id }, forward)
            .await
    }

    async fn queue_stats(
        self,
        ctx: Context,
        mode: ReadMode,
        hop: u8,
    ) -> Result<ReadReply<BTreeMap<String, QueueStats>>, Error> {
        let r = self.replica.clone();
        r.read(
            ctx,
            mode,
            hop,
            |s| s.queue_stats(),
            move |c, ctx| async move { c.queue_stats(ctx, mode, hop + 1).await },
        )
        .await
    }

    async fn add_member(
        self,
        ctx: Context,
        node_id: NodeId,
        addr: String,
        hop: u8,
    ) -> Result<(), Error> {
        self.replica.add_member(ctx, node_id, addr, hop).await
    }

    async fn remove_member(self, ctx: Context, node_id: NodeId, hop: u8) -> Result<(), Error> {
        self.replica.remove_member(ctx, node_id, hop).await
    }

    async fn lease_tasks(
        self,
        ctx: Context,
        worker: crate::rpc::WorkerInfo,
        max: u32,
        wait_ms: u64,
        hop: u8,
    ) -> Result<Vec<crate::rpc::LeasedTask>, Error> {
        self.replica
            .lease_tasks(ctx, worker, max, wait_ms, hop)
            .await
    }

    async fn heartbeat(
        self,
        ctx: Context,
        worker: crate::rpc::WorkerInfo,
        leases: Vec<crate::rpc::HeldLease>,
        hop: u8,
    ) -> Result<crate::rpc::HeartbeatReply, Error> {
        self.replica.heartbeat(ctx, worker, leases, hop).await
    }

    async fn report(
        self,
        ctx: Context,
        worker: crate::state::WorkerId,
        reports: Vec<crate::rpc::AttemptReport>,
        hop: u8,
    ) -> Result<Vec<Result<TaskState, Error>>, Error> {
        self.replica.report(ctx, worker, reports, hop).await
    }

    async fn worker_leave(
        self,
        ctx: Context,
        worker: crate::state::WorkerId,
        hop: u8,
    ) -> Result<u32, Error> {
        self.replica.worker_leave(ctx, worker, hop).await
    }

    async fn list_workers(
        self,
        ctx: Context,
        hop: u8,
    ) -> Result<Vec<crate::rpc::WorkerStatus>, Error> {
        self.replica.list_workers(ctx, hop).await
    }

    async fn schedule_ops(
        self,
        ctx: Context,
        ops: Vec<crate::rpc::schedules::ScheduleOp>,
        hop: u8,
    ) -> Result<Vec<Result<crate::rpc::schedules::OpOutcome, Error>>, Error> {
        self.replica.schedule_ops(ctx, ops, hop).await
    }

    async fn get_schedules(
        self,
        ctx: Context,
        name: Option<String>,
        mode: ReadMode,
        hop: u8,
    ) -> Result<ReadReply<Vec<crate::rpc::schedules::ScheduleView>>, Error> {
        let n2 = name.clone();
        let now = self.replica.clock.wall_ms();
        flatten(
            self.replica
                .clone()
                .read(
                    ctx,
                    mode,
                    hop,
                    move |s| super::schedule_calls::schedule_views(s, name.as_deref(), now),
                    move |c, ctx| async move {
                        c.get_schedules(ctx, n2, mode, hop + 1)
                            .await
                            .map(|r| r.map(ReadReply::into_ok))
                    },
                )
                .await?,
        )
    }

    async fn list_pools(
        self,
        ctx: Context,
        mode: ReadMode,
        hop: u8,
    ) -> Result<ReadReply<Vec<crate::state::PoolView>>, Error> {
        let r = self.replica.clone();
        r.read(
            ctx,
            mode,
            hop,
            super::schedule_calls::pools,
            move |c, ctx| async move { c.list_pools(ctx, mode, hop + 1).await },
        )
        .await
    }

    async fn workflow_ops(
        self,
        ctx: Context,
        ops: Vec<crate::rpc::workflows::WorkflowOp>,
        hop: u8,
    ) -> Result<Vec<Result<crate::rpc::workflows::WorkflowOutcome, Error>>, Error> {
        self.replica.workflow_ops(ctx, ops, hop).await
    }

    async fn get_workflows(
        self,
        ctx: Context,
        name: Option<String>,
        mode: ReadMode,
        hop: u8,
    ) -> Result<ReadReply<Vec<crate::rpc::workflows::WorkflowView>>, Error> {
        let n2 = name.clone();
        let now = self.replica.clock.wall_ms();
        flatten(
            self.replica
                .clone()
                .read(
                    ctx,
                    mode,
                    hop,
                    move |s| crate::rpc::workflows::workflow_views(s, name.as_deref(), now),
                    move |c, ctx| async move {
                        c.get_workflows(ctx, n2, mode, hop + 1)
                            .await
                            .map(|r| r.map(ReadReply::into_ok))
                    },
                )
                .await?,
        )
    }

    async fn get_runs(
        self,
        ctx: Context,
        filter: crate::rpc::workflows::RunFilter,
        mode: ReadMode,
        hop: u8,
    ) -> Result<ReadReply<Vec<crate::rpc::workflows::RunView>>, Error> {
        let f2 = filter.clone();
        flatten(
            self.replica
                .clone()
                .read(
                    ctx,
                    mode,
                    hop,
                    move |s| crate::rpc::workflows::run_views(s, &filter),
                    move |c, ctx| async move {
                        c.get_runs(ctx, f2, mode, hop + 1)
                            .await
                            .map(|r| r.map(ReadReply::into_ok))
                    },
                )
                .await?,
        )
    }

    async fn leave(self, ctx: Context) -> Result<(), Error> {
        self.replica.clone().leave(ctx).await
    }

    async fn health(self, _: Context, cluster: bool) -> crate::health::report::HealthReport {
        self.replica.health_cx.health_report(cluster).await
    }

    async fn inject_fault(
        self,
        _: Context,
        req: crate::health::fault::FaultRequest,
    ) -> Result<crate::health::fault::FaultState, Error> {
        tracing::warn!(remote = %self.remote, ?req, "fault injection requested");
        self.replica
            .health
            .faults
            .apply(self.replica.id, &req)
            .map_err(Error::Rejected)
    }

    async fn backup_chunk(
        self,
        ctx: Context,
        session: u64,
        offset: u64,
        hop: u8,
    ) -> Result<BackupChunk, Error> {
        self.replica.backup_chunk(ctx, session, offset, hop).await
    }

    async fn append_output(
        self,
        _: Context,
        worker: crate::state::WorkerId,
        chunks: Vec<crate::rpc::OutputChunk>,
    ) -> Result<Vec<Result<u64, Error>>, Error> {
        self.replica.append_output(worker, chunks).await
    }

    async fn read_output(
        self,
        ctx: Context,
        task: TaskId,
        fencing_token: u64,
        offset: u64,
        hop: u8,
    ) -> Result<Option<crate::rpc::OutputRead>, Error> {
        self.replica
            .read_output(ctx, task, fencing_token, offset, hop)
            .await
    }

    async fn requeue_task(
        self,
        ctx: Context,
        id: TaskId,
        fencing_token: u64,
        hop: u8,
    ) -> Result<TaskState, Error> {
        self.replica.requeue_task(ctx, id, fencing_token, hop).await
    }
}

impl Replica {
    pub fn node_info(&self) -> NodeInfo {
        let m = self.raft.metrics().borrow_watched().clone();
        let leader_addr = m.current_leader.and_then(|l| {
            m.membership_config
                .membership()
                .get_node(&l)
                .map(|n| n.addr.clone())
        });
        NodeInfo {
            node_id: self.id,
            addr: self.addr.clone(),
            cluster_name: self.identity.cluster_name.clone(),
            cluster_id: self.identity.cluster_id(),
            bootstrap_expect: self.config.node.bootstrap_expect,
            initialized: self.log.has_raft_state().unwrap_or(false)
                || m.membership_config
                    .membership()
                    .voter_ids()
                    .next()
                    .is_some(),
            leader_id: m.current_leader,
            leader_addr,
        }
    }

    pub(crate) fn not_leader(&self) -> Error {
        crate::raft::not_leader_of(&self.raft)
    }

    /// The leader to forward a call to. While there is none, or the one this replica follows
    /// is suspected dead (its connection closed, see `raft::leader_loss`) or is `except` (it
    /// could not be dialled), waits for the next one: at most three election timeouts and
    /// never past the caller's deadline. The caller then reaches the new leader as soon as it
    /// is elected, instead of polling through the election.
    async fn leader_to_forward_to(
        &self,
        deadline: std::time::Instant,
        except: Option<NodeId>,
    ) -> Option<(NodeId, String)> {
        let until = (std::time::Instant::now() + self.config.raft.election_timeout_max() * 3)
            .min(deadline.checked_sub(FORWARD_MARGIN).unwrap_or(deadline));
        let mut metrics = self.raft.metrics();
        loop {
            let found = {
                let m = metrics.borrow_watched();
                m.current_leader
                    .filter(|&l| Some(l) != except && !self.leader_loss.is_suspected(l))
                    .and_then(|l| {
                        let node = m.membership_config.membership().get_node(&l)?;
                        Some((l, node.addr.clone()))
                    })
            };
            if found.is_some() {
                return found;
            }
            match tokio::time::timeout_at(until.into(), metrics.changed()).await {
                Ok(Ok(())) => continue,
                _ => return None,
            }
        }
    }

    /// Calls the leader with `f`, once. Fails with `NotLeader` if this call was already
    /// forwarded or no leader is known.
    pub(crate) async fn forward<T, F, Fut>(&self, ctx: Context, hop: u8, f: F) -> Result<T, Error>
    where
        F: FnOnce(FleetServiceClient, Context) -> Fut,
        Fut: Future<Output = Result<Result<T, Error>, tarpc::client::RpcError>>,
    {
        self.forward_needing(ctx, hop, 0, f).await
    }

    /// [`Self::forward`] a call that the leader must speak protocol `needs` or later to know:
    /// a leader still running an older fleet (a rolling upgrade) is not sent it, and the caller
    /// is told so.
    pub(crate) async fn forward_needing<T, F, Fut>(
        &self,
        ctx: Context,
        hop: u8,
        needs: u16,
        f: F,
    ) -> Result<T, Error>
    where
        F: FnOnce(FleetServiceClient, Context) -> Fut,
        Fut: Future<Output = Result<Result<T, Error>, tarpc::client::RpcError>>,
    {
        if hop > 0 {
            return Err(self.not_leader());
        }
        let Some((mut leader, mut addr)) = self.leader_to_forward_to(ctx.deadline, None).await
        else {
            return Err(self.not_leader());
        };
        let mut peer = self.pool.get(Some(leader), &addr);
        let (client, protocol) = match peer.connected().await {
            Ok(c) => c,
            // The leader died before this replica noticed: forward to the next one.
            Err(first) => {
                let Some(next) = self.leader_to_forward_to(ctx.deadline, Some(leader)).await else {
                    return Err(Error::Unavailable(format!(
                        "cannot reach the leader (node {leader} at {addr}): {first}"
                    )));
                };
                (leader, addr) = next;
                peer = self.pool.get(Some(leader), &addr);
                peer.connected().await.map_err(|e| {
                    Error::Unavailable(format!(
                        "cannot reach the leader (node {leader} at {addr}): {e}"
                    ))
                })?
            }
        };
        if leader == self.id {
            return Err(self.not_leader());
        }
        if protocol < needs {
            // Not retryable: retrying cannot help until the leader is upgraded.
            return Err(Error::Rejected(format!(
                "the leader (node {leader} at {addr}) speaks protocol {protocol}, which lacks \
                 this call (protocol {needs} added it): finish upgrading the cluster first"
            )));
        }
        let mut fwd = tarpc::context::current();
        fwd.deadline = ctx.deadline;
        // If leadership moves while the call waits (the leader froze or stepped down), answer
        // "not leader" with the new leader at once instead of waiting out the caller's deadline;
        // the client retries there (writes carry request ids, so a retry is never applied twice).
        let mut metrics = self.raft.metrics();
        let moved = async {
            loop {
                let now = metrics.borrow_watched().current_leader;
                if now.is_some() && now != Some(leader) {
                    return;
                }
                if metrics.changed().await.is_err() {
                    return;
                }
            }
        };
        let result = tokio::select! {
            r = f(client, fwd) => r,
            _ = moved => return Err(self.not_leader()),
        };
        match result {
            Ok(r) => r,
            Err(e) => {
                if is_transport_failure(&e) {
                    peer.reset().await;
                    // The leader died during the call: name the next one as soon as it is
                    // known, so the caller retries there at once.
                    if self
                        .leader_to_forward_to(ctx.deadline, Some(leader))
                        .await
                        .is_some()
                    {
                        return Err(self.not_leader());
                    }
                }
                Err(Error::Unavailable(format!(
                    "forwarding to the leader (node {leader} at {addr}) failed: {e}"
                )))
            }
        }
    }

    async fn submit(
        &self,
        ctx: Context,
        tasks: Vec<SubmitTask>,
        hop: u8,
    ) -> Result<Vec<Result<Submitted, Error>>, Error> {
        if tasks.len() > MAX_SUBMIT_BATCH {
            return Err(Error::InvalidArgument(format!(
                "{} tasks in one call; at most {MAX_SUBMIT_BATCH} are accepted",
                tasks.len()
            )));
        }
        if !self.raft.is_leader() {
            return self
                .forward(ctx, hop, |c, ctx| async move {
                    c.submit(ctx, tasks, hop + 1).await
                })
                .await;
        }
        // Invalid specs are answered here; the valid ones are proposed in their given order.
        let mut results: Vec<Option<Result<Submitted, Error>>> = Vec::with_capacity(tasks.len());
        let mut commands = Vec::new();
        let now = self.clock.wall_ms();
        let mut queues = Vec::new();
        for t in tasks {
            let resolved = t
                .task
                .resolve(&self.config, now)
                .and_then(|spec| Ok((spec, crate::rpc::schedules::pool_claim(&t.task)?)));
            match resolved {
                Ok((spec, pool)) => {
                    results.push(None);
                    queues.push(spec.queue.clone());
                    commands.push(match pool {
                        _ if !t.task.after.is_empty() => Command::SubmitAfter {
                            request_id: t.request_id,
                            spec,
                            pool,
                            after: t.task.after.iter().map(|id| TaskId(*id)).collect(),
                        },
                        None => Command::SubmitTask {
                            request_id: t.request_id,
                            spec,
                        },
                        Some(pool) => Command::SubmitPooled {
                            request_id: t.request_id,
                            spec,
                            pool,
                        },
                    });
                }
                Err(e) => results.push(Some(Err(e))),
            }
        }
        let outputs = self.proposer.propose_many(commands).await;
        // A retryable failure (leadership moved mid-call) fails the whole call so the client
        // retries it; request ids make the retry return the tasks already created instead of
        // creating them twice.
        if let Some(Err(e)) = outputs
            .iter()
            .find(|r| matches!(r, Err(e) if e.is_retryable()))
        {
            return Err(e.clone());
        }
        for (queue, out) in queues.into_iter().zip(&outputs) {
            if let Ok(CommandOutput::TaskSubmitted {
                duplicate: false, ..
            }) = out
            {
                metrics::counter!(crate::metrics::names::TASKS_SUBMITTED, "queue" => queue)
                    .increment(1);
            }
        }
        let mut outputs = outputs.into_iter();
        Ok(results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| {
                    let out = outputs.next().expect("one output per proposed command")?;
                    match out {
                        CommandOutput::TaskSubmitted { id, duplicate } => {
                            Ok(Submitted { id, duplicate })
                        }
                        other => Err(Error::Internal(format!(
                            "unexpected output for a submit: {other:?}"
                        ))),
                    }
                })
            })
            .collect())
    }

    /// Proposes a command that changes one task (on the leader; forwarded from elsewhere) and
    /// returns the task's state afterwards.
    async fn task_command<F, Fut>(
        &self,
        ctx: Context,
        hop: u8,
        command: Command,
        forward: F,
    ) -> Result<TaskState, Error>
    where
        F: FnOnce(FleetServiceClient, Context) -> Fut,
        Fut: Future<Output = Result<Result<TaskState, Error>, tarpc::client::RpcError>>,
    {
        if !self.raft.is_leader() {
            return self.forward(ctx, hop, forward).await;
        }
        match self.proposer.propose(command).await? {
            CommandOutput::TaskUpdated { state, .. } => Ok(state),
            other => Err(Error::Internal(format!("unexpected output: {other:?}"))),
        }
    }

    /// `requeue_task` (see [`FleetService::requeue_task`]): on the leader, an expiry of the
    /// attempt the caller named by its fencing token; the state machine refuses it if that
    /// attempt is no longer the live lease.
    async fn requeue_task(
        &self,
        ctx: Context,
        id: TaskId,
        fencing_token: u64,
        hop: u8,
    ) -> Result<TaskState, Error> {
        if !self.raft.is_leader() {
            let forward = move |c: FleetServiceClient, ctx| async move {
                c.requeue_task(ctx, id, fencing_token, hop + 1).await
            };
            return self
                .forward_needing(ctx, hop, crate::rpc::REQUEUE_PROTOCOL, forward)
                .await;
        }
        let command = self
            .random
            .with(|r| crate::scheduler::core::requeue(id, fencing_token, r));
        let output = self.proposer.propose(command).await;
        // The leader's lease tracker forgets the lease now, so the worker's next heartbeat is
        // answered "fenced" and it kills the attempt.
        crate::scheduler::scheduling_loop::sync_tracker(&self.sm, &self.scheduler, &self.clock)
            .await;
        match output? {
            CommandOutput::TaskUpdated { state, .. } => {
                metrics::counter!(crate::metrics::names::LEASE_EXPIRED, "cause" => "requeued")
                    .increment(1);
                tracing::warn!(
                    task = %id,
                    fencing_token,
                    state = state.as_str(),
                    "attempt requeued by an operator"
                );
                Ok(state)
            }
            other => Err(Error::Internal(format!("unexpected output: {other:?}"))),
        }
    }

    /// Serves a read: locally, or confirmed by the leader (forwarding when not the leader).
    async fn read<T, L, F, Fut>(
        &self,
        ctx: Context,
        mode: ReadMode,
        hop: u8,
        local: L,
        remote: F,
    ) -> Result<ReadReply<T>, Error>
    where
        L: FnOnce(&crate::state::State) -> T,
        F: FnOnce(FleetServiceClient, Context) -> Fut,
        Fut: Future<Output = Result<Result<ReadReply<T>, Error>, tarpc::client::RpcError>>,
    {
        let linearizable = match mode {
            ReadMode::Local => false,
            ReadMode::Linearizable if self.raft.is_leader() => {
                self.raft
                    .ensure_linearizable(ReadPolicy::ReadIndex)
                    .await
                    .map_err(|e| match e.forward_to_leader() {
                        Some(_) => self.not_leader(),
                        None => Error::Unavailable(format!("cannot confirm leadership: {e}")),
                    })?;
                true
            }
            ReadMode::Linearizable => return self.forward(ctx, hop, remote).await,
        };
        let value = self.sm.read(local).await;
        Ok(ReadReply {
            value,
            served_by: self.id,
            applied_index: self.sm.applied_index().await,
            linearizable,
        })
    }

    /// The cluster as this replica sees it; complete (match index, contact) on the leader.
    pub fn local_status(&self) -> ClusterStatus {
        ClusterStatus::of(&self.raft, self.id, &self.identity)
    }

    async fn add_member(
        &self,
        ctx: Context,
        node_id: NodeId,
        addr: String,
        hop: u8,
    ) -> Result<(), Error> {
        crate::config::parse_addr("addr", &addr)
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        if node_id == 0 {
            return Err(Error::InvalidArgument(
                "node id 0 is not valid: node ids start at 1".into(),
            ));
        }
        if !self.raft.is_leader() {
            return self
                .forward(ctx, hop, |c, ctx| async move {
                    c.add_member(ctx, node_id, addr, hop + 1).await
                })
                .await;
        }
        let m = self.raft.metrics().borrow_watched().clone();
        let membership = m.membership_config.membership().clone();
        for (id, node) in membership.nodes() {
            if *id == node_id && node.addr != addr {
                return Err(Error::InvalidArgument(format!(
                    "node id {node_id} is already a member at {}; another node cannot claim it \
                     (give the new node another --node-id, or remove node {node_id} first)",
                    node.addr
                )));
            }
            if *id != node_id && node.addr == addr {
                return Err(Error::InvalidArgument(format!(
                    "address {addr} already belongs to node {id}; remove node {id} first \
                     (fleet cluster remove {id})"
                )));
            }
        }
        if membership.voter_ids().any(|v| v == node_id) {
            return Ok(());
        }
        tracing::info!(node_id, %addr, "adding a node: learner first, voter once caught up");
        self.raft
            .add_learner(node_id, Node { addr: addr.clone() }, true)
            .await
            .map_err(proposer_error)?;
        self.raft
            .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([node_id])), false)
            .await
            .map_err(proposer_error)?;
        tracing::info!(node_id, %addr, "node is now a voter");
        Ok(())
    }

    async fn remove_member(&self, ctx: Context, node_id: NodeId, hop: u8) -> Result<(), Error> {
        if !self.raft.is_leader() {
            return self
                .forward(ctx, hop, |c, ctx| async move {
                    c.remove_member(ctx, node_id, hop + 1).await
                })
                .await;
        }
        let m = self.raft.metrics().borrow_watched().clone();
        let membership = m.membership_config.membership().clone();
        if membership.get_node(&node_id).is_none() {
            let members: Vec<String> = membership.nodes().map(|(id, _)| id.to_string()).collect();
            return Err(Error::NotFound(format!(
                "node {node_id} is not a member; members are {}",
                members.join(", ")
            )));
        }
        let change = if membership.voter_ids().any(|v| v == node_id) {
            ChangeMembers::RemoveVoters(BTreeSet::from([node_id]))
        } else {
            ChangeMembers::RemoveNodes(BTreeSet::from([node_id]))
        };
        tracing::info!(node_id, "removing a node");
        self.raft
            .change_membership(change, false)
            .await
            .map_err(proposer_error)?;
        Ok(())
    }

    async fn leave(self: Arc<Self>, ctx: Context) -> Result<(), Error> {
        if self.raft.is_leader() {
            let wait = self.config.raft.election_timeout_max() * 3;
            if !self.hand_over_leadership(wait, &Default::default()).await {
                return Err(Error::Unavailable(
                    "could not hand over leadership before leaving; try again".into(),
                ));
            }
        }
        let mut removed = Err(self.not_leader());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while tokio::time::Instant::now() < deadline {
            removed = self.remove_member(ctx, self.id, 0).await;
            match &removed {
                Err(e) if e.is_retryable() => {
                    // Wait for the new leader to be known, bounded by the deadline.
                    let mut rx = self.raft.metrics();
                    let _ = tokio::time::timeout(Duration::from_millis(500), rx.changed()).await;
                }
                _ => break,
            }
        }
        removed?;
        tracing::info!("left the cluster; stopping");
        let _ = self.stop.send(Some(String::new()));
        Ok(())
    }

    async fn receive_snapshot_chunk(
        &self,
        chunk: SnapshotChunk,
    ) -> Result<Option<SnapshotResp>, Error> {
        let max = self.config.raft.max_snapshot_bytes;
        if chunk.total_len > max {
            return Err(Error::InvalidArgument(format!(
                "snapshot of {} bytes exceeds raft.max_snapshot_bytes = {max}",
                chunk.total_len
            )));
        }
        let mut incoming = self.incoming_snapshot.lock().await;
        if chunk.offset == 0 {
            *incoming = Some(IncomingSnapshot {
                transfer_id: chunk.transfer_id,
                buf: Vec::with_capacity(chunk.total_len as usize),
            });
        }
        let Some(inc) = incoming.as_mut() else {
            return Err(Error::InvalidArgument(
                "snapshot chunk without a start; resend from offset 0".into(),
            ));
        };
        if inc.transfer_id != chunk.transfer_id || inc.buf.len() as u64 != chunk.offset {
            *incoming = None;
            return Err(Error::InvalidArgument(
                "snapshot chunk out of order; resend from offset 0".into(),
            ));
        }
        if inc.buf.len() as u64 + chunk.data.len() as u64 > chunk.total_len {
            *incoming = None;
            return Err(Error::InvalidArgument(
                "snapshot chunk beyond the announced length".into(),
            ));
        }
        inc.buf.extend_from_slice(&chunk.data);
        if !chunk.done {
            return Ok(None);
        }
        let inc = incoming.take().expect("checked above");
        if inc.buf.len() as u64 != chunk.total_len {
            return Err(Error::InvalidArgument(
                "snapshot shorter than announced".into(),
            ));
        }
        let snapshot = openraft::type_config::alias::SnapshotOf::<TypeConfig, Cursor<Vec<u8>>> {
            meta: chunk.meta,
            snapshot: Cursor::new(inc.buf),
        };
        let resp = self
            .raft
            .install_full_snapshot(chunk.vote, snapshot)
            .await
            .map_err(fatal)?;
        Ok(Some(resp))
    }
}

/// Maps membership-change errors: a NotLeader stays retryable, the rest are explained.
fn proposer_error(
    e: openraft::errors::RaftError<TypeConfig, openraft::errors::ClientWriteError<TypeConfig>>,
) -> Error {
    crate::raft::proposer::write_error(e)
}

/// A read whose value may itself be a refusal, as the caller sees it.
fn flatten<T>(reply: ReadReply<Result<T, Error>>) -> Result<ReadReply<T>, Error> {
    Ok(ReadReply {
        value: reply.value?,
        served_by: reply.served_by,
        applied_index: reply.applied_index,
        linearizable: reply.linearizable,
    })
}
