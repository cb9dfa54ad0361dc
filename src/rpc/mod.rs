//! The RPC layer: one tarpc service over TCP with a bincode 2 transport.
//!
//! Every connection starts with a handshake ([`handshake`]) that names the protocol version,
//! the cluster, the caller's role and, for replica-to-replica links, the node the caller meant
//! to reach. Only then does tarpc framing start ([`codec`]): length-delimited frames of at most
//! [`MAX_FRAME_BYTES`], each a bincode value. Anything else (another cluster, another protocol
//! version, garbage bytes) is refused with a logged reason and the connection is closed.
//!
//! [`FleetService`] has two groups of calls: `raft_*` and `discover` for replicas (refused from
//! connections that did not identify as a replica) and the client calls the CLI uses. Clients
//! may call any replica; the replica forwards writes and linearizable reads to the leader
//! (`hop` counts forwards so a request is never bounced twice).
//!
//! [`peer::Peer`] is a reconnecting client: tarpc never reconnects a broken transport, so a
//! failed call drops the connection and the next call re-dials, with exponential backoff.

pub mod codec;
pub mod handshake;
pub mod peer;
pub mod schedules;
pub mod workflows;

use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::raft::{NodeId, TypeConfig};
use crate::state::{
    AttemptOutcome, QueueStats, RequestId, Task, TaskFilter, TaskId, TaskSpec, TaskState, WorkerId,
};

/// The largest frame either side accepts. Raft entries are batches of at most
/// `raft::proposer::MAX_BATCH_BYTES` and an AppendEntries carries at most 16 of them;
/// snapshots travel in chunks of [`SNAPSHOT_CHUNK_BYTES`].
pub const MAX_FRAME_BYTES: usize = 32 << 20;
/// The size of one snapshot chunk.
pub const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;

/// openraft's message types, named once for the service and its handlers.
pub type AppendReq = openraft::raft::AppendEntriesRequest<TypeConfig>;
pub type AppendResp = openraft::raft::AppendEntriesResponse<TypeConfig>;
pub type VoteReq = openraft::raft::VoteRequest<TypeConfig>;
pub type VoteResp = openraft::raft::VoteResponse<TypeConfig>;
pub type TransferReq = openraft::raft::TransferLeaderRequest<TypeConfig>;
pub type TransferResp = openraft::raft::TransferLeaderResponse<TypeConfig>;
pub type SnapshotResp = openraft::raft::SnapshotResponse<TypeConfig>;

/// Who is on the other end of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// Another scheduler replica.
    Replica,
    /// A CLI or program using the client calls.
    Client,
    /// A `fleet worker` process (it uses the client and worker calls). Distinct from
    /// [`Role::Client`] so a replica's logs, and network tools in front of it (the chaos
    /// harness's proxy), can tell workers from other callers.
    Worker,
}

/// One piece of a snapshot on its way from the leader to a follower.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotChunk {
    /// Chosen by the sender for one transfer; a chunk of another transfer restarts reception.
    pub transfer_id: u64,
    pub vote: crate::raft::Vote,
    pub meta: crate::raft::SnapshotMeta,
    pub total_len: u64,
    pub offset: u64,
    pub data: Vec<u8>,
    pub done: bool,
}

/// A replica's answer to `discover`: what cluster formation needs to know about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub node_id: NodeId,
    pub addr: String,
    pub cluster_name: String,
    pub cluster_id: Option<u128>,
    pub bootstrap_expect: Option<usize>,
    /// Whether this node has Raft state (it belongs to a cluster already).
    pub initialized: bool,
    pub leader_id: Option<NodeId>,
    pub leader_addr: Option<String>,
}

/// One task to submit. The request id makes a retried submission return the first result.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SubmitTask {
    pub request_id: RequestId,
    pub task: NewTask,
}

/// A task as a client submits it (also one line of a `fleet submit --file` file). Unset fields
/// take the cluster's defaults for the queue (`[tasks]` and `[queues.NAME]` in the leader's
/// config), resolved by the leader into a [`TaskSpec`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NewTask {
    /// The program and its arguments.
    pub command: Vec<String>,
    /// Default: `default`.
    pub queue: Option<String>,
    pub priority: Option<i32>,
    /// Extra environment variables (names may not start with `FLEET_`).
    pub env: std::collections::BTreeMap<String, String>,
    pub max_attempts: Option<u32>,
    pub backoff_initial_ms: Option<u64>,
    pub backoff_max_ms: Option<u64>,
    /// 1.0 to 10.0.
    pub backoff_multiplier: Option<f64>,
    /// Execution timeout per attempt; 0 for none.
    pub timeout_ms: Option<u64>,
    /// Lease length without a heartbeat.
    pub visibility_timeout_ms: Option<u64>,
    /// Not to run before this long after submission (leader's clock).
    pub delay_ms: Option<u64>,
    /// Not to run before this time (ms since the Unix epoch).
    pub not_before_ms: Option<u64>,
    pub idempotency_key: Option<String>,
    /// A pool whose slots the task holds while it runs.
    pub pool: Option<String>,
    /// Slots of the pool one attempt holds (default 1).
    pub pool_slots: Option<u32>,
    /// Ids of tasks that must succeed first (`fleet submit --after`); empty for none.
    pub after: Vec<u64>,
}

impl NewTask {
    /// A task running `command` with every policy from the defaults.
    pub fn command(command: Vec<String>) -> NewTask {
        NewTask {
            command,
            ..Default::default()
        }
    }

    /// The full spec, with unset fields from `config`'s defaults for the queue, at the leader's
    /// `now_ms`. The spec still has to pass [`TaskSpec::validate`].
    pub fn resolve(&self, config: &crate::config::Config, now_ms: u64) -> Result<TaskSpec, Error> {
        let queue = self
            .queue
            .clone()
            .unwrap_or_else(|| crate::state::DEFAULT_QUEUE.into());
        let d = config.task_defaults(&queue);
        if self.delay_ms.is_some() && self.not_before_ms.is_some() {
            return Err(Error::InvalidArgument(
                "both a delay and a not-before time were given: use one of them".into(),
            ));
        }
        let mut spec = TaskSpec::new(self.command.clone(), queue);
        spec.priority = self.priority.unwrap_or(d.priority);
        spec.env = self
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        spec.retry = crate::state::RetryPolicy {
            max_attempts: self.max_attempts.unwrap_or(d.max_attempts),
            backoff_initial_ms: self.backoff_initial_ms.unwrap_or(d.backoff_initial_ms),
            backoff_max_ms: self.backoff_max_ms.unwrap_or(d.backoff_max_ms),
            backoff_multiplier_permille: crate::config::multiplier_permille(
                self.backoff_multiplier.unwrap_or(d.backoff_multiplier),
            ),
        };
        spec.execution_timeout_ms =
            Some(self.timeout_ms.unwrap_or(d.execution_timeout_ms)).filter(|t| *t > 0);
        spec.visibility_timeout_ms = self
            .visibility_timeout_ms
            .unwrap_or(d.visibility_timeout_ms);
        spec.not_before_ms = match (self.delay_ms, self.not_before_ms) {
            (Some(d), _) => Some(now_ms.saturating_add(d)),
            (None, n) => n,
        };
        spec.idempotency_key = self.idempotency_key.clone();
        spec.validate()
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        Ok(spec)
    }
}

/// A worker as it describes itself in every lease request and heartbeat. The leader keeps
/// this as soft state (see `scheduler::workers`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerInfo {
    /// Drawn at random by the worker process at start; one per process lifetime.
    pub id: WorkerId,
    /// A human name (`host:pid` by default).
    pub name: String,
    pub queues: Vec<String>,
    /// Attempts it runs at once.
    pub slots: u32,
    /// Attempts running now.
    pub running: u32,
    /// True once it stopped taking work (SIGTERM).
    pub draining: bool,
}

/// A lease a worker got: what to run and the token that fences it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeasedTask {
    pub task: TaskId,
    pub attempt: u32,
    pub fencing_token: u64,
    pub spec: TaskSpec,
}

/// A lease a worker holds, as its heartbeat names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldLease {
    pub task: TaskId,
    pub fencing_token: u64,
}

/// The leader's answer about one lease in a heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LeaseVerdict {
    /// The lease is extended: keep running.
    Extended,
    /// The task was cancelled: kill the attempt and report it.
    Cancelled,
    /// The lease is gone (expired, given to another worker): kill the attempt; its report
    /// would be rejected.
    Fenced,
}

/// The answer to a heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatReply {
    /// One verdict per lease named in the heartbeat, in order.
    pub verdicts: Vec<LeaseVerdict>,
    /// Leases the state records for this worker that the heartbeat did not name: granted, but
    /// the reply to the lease request was lost (a leader crash, a broken connection). The
    /// worker runs them (unless it already started that fencing token) instead of letting
    /// them expire.
    pub adopt: Vec<LeasedTask>,
}

/// How one attempt ended, as its worker reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptReport {
    pub task: TaskId,
    pub fencing_token: u64,
    pub outcome: AttemptOutcome,
    /// The end of the attempt's output (bounded by the worker).
    pub output_tail: String,
}

/// One worker as the leader sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerStatus {
    pub info: WorkerInfo,
    /// `active`, `draining` or `lost`.
    pub state: String,
    /// The leader's clock at its last heartbeat or lease request (ms since the epoch).
    pub last_seen_ms: u64,
    /// Leases the replicated state records for it.
    pub leases: u32,
}

/// The outcome of one submission.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Submitted {
    pub id: TaskId,
    /// True when this request id had been applied before (a retry).
    pub duplicate: bool,
}

/// How current a read must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReadMode {
    /// Confirmed with a quorum by the leader: sees every write acknowledged before it started.
    Linearizable,
    /// Served from the contacted replica's state: may miss recent writes.
    Local,
}

/// A read result with where it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadReply<T> {
    pub value: T,
    pub served_by: NodeId,
    pub applied_index: u64,
    pub linearizable: bool,
}

impl<T> ReadReply<T> {
    /// The same reply with its value wrapped in `Ok` (for reads whose local value may be a
    /// refusal).
    pub fn into_ok<E>(self) -> ReadReply<Result<T, E>> {
        ReadReply {
            value: Ok(self.value),
            served_by: self.served_by,
            applied_index: self.applied_index,
            linearizable: self.linearizable,
        }
    }
}

/// The cluster as one replica sees it (the leader's view when one is reachable).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub cluster_name: String,
    pub cluster_id: Option<String>,
    pub reported_by: NodeId,
    /// True when the reporter is the leader (match index and last contact are known only then).
    pub leader_view: bool,
    pub leader_id: Option<NodeId>,
    pub leader_addr: Option<String>,
    pub term: u64,
    pub last_log_index: Option<u64>,
    pub commit_index: Option<u64>,
    pub applied_index: Option<u64>,
    pub snapshot_index: Option<u64>,
    pub purged_index: Option<u64>,
    pub members: Vec<MemberStatus>,
}

/// One member of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberStatus {
    pub id: NodeId,
    pub addr: String,
    /// `leader`, `follower` or `learner`.
    pub role: String,
    pub voter: bool,
    /// The highest log index known to be replicated to it (leader view only).
    pub match_index: Option<u64>,
    /// Milliseconds since the leader last heard from it (leader view only).
    pub last_contact_ms: Option<u64>,
}

impl ClusterStatus {
    /// The cluster as the replica `me` sees it through its Raft metrics; complete (match
    /// index, contact) on the leader.
    pub fn of(
        raft: &crate::raft::Raft,
        me: NodeId,
        identity: &crate::rpc::peer::LocalIdentity,
    ) -> ClusterStatus {
        use openraft::async_runtime::WatchReceiver;
        use openraft::Instant as _;
        let m = raft.metrics().borrow_watched().clone();
        let membership = m.membership_config.membership();
        let voters: std::collections::BTreeSet<NodeId> = membership.voter_ids().collect();
        let leader_view = m.current_leader == Some(me);
        let members = membership
            .nodes()
            .map(|(id, node)| {
                let role = if Some(*id) == m.current_leader {
                    "leader"
                } else if voters.contains(id) {
                    "follower"
                } else {
                    "learner"
                };
                let match_index = if *id == me {
                    m.last_log_index
                } else {
                    m.replication
                        .as_ref()
                        .and_then(|r| r.get(id).cloned().flatten())
                        .map(|l| l.index())
                };
                let last_contact_ms = if *id == me && leader_view {
                    Some(0)
                } else {
                    m.heartbeat
                        .as_ref()
                        .and_then(|h| h.get(id).cloned().flatten())
                        .map(|at| at.elapsed().as_millis() as u64)
                };
                MemberStatus {
                    id: *id,
                    addr: node.addr.clone(),
                    role: role.into(),
                    voter: voters.contains(id),
                    match_index,
                    last_contact_ms,
                }
            })
            .collect();
        ClusterStatus {
            cluster_name: identity.cluster_name.clone(),
            cluster_id: identity.cluster_id().map(|c| format!("{c:032x}")),
            reported_by: me,
            leader_view,
            leader_id: m.current_leader,
            leader_addr: m
                .current_leader
                .and_then(|l| membership.get_node(&l).map(|n| n.addr.clone())),
            term: m.current_term,
            last_log_index: m.last_log_index,
            commit_index: m.local_committed.as_ref().map(|l| l.index()),
            applied_index: m.last_applied.as_ref().map(|l| l.index()),
            snapshot_index: m.snapshot.as_ref().map(|l| l.index()),
            purged_index: m.purged.as_ref().map(|l| l.index()),
            members,
        }
    }
}

#[tarpc::service]
pub trait FleetService {
    // --- replica-to-replica calls (refused unless the handshake said Role::Replica) ---
    async fn raft_append(req: AppendReq) -> Result<AppendResp, Error>;
    async fn raft_vote(req: VoteReq) -> Result<VoteResp, Error>;
    async fn raft_pre_vote(req: VoteReq) -> Result<VoteResp, Error>;
    async fn raft_snapshot_chunk(chunk: SnapshotChunk) -> Result<Option<SnapshotResp>, Error>;
    async fn raft_transfer_leader(req: TransferReq) -> Result<TransferResp, Error>;
    async fn discover() -> NodeInfo;

    // --- client calls (any replica; forwarded to the leader where needed) ---
    async fn submit(
        tasks: Vec<SubmitTask>,
        hop: u8,
    ) -> Result<Vec<Result<Submitted, Error>>, Error>;
    async fn get_task(
        id: TaskId,
        mode: ReadMode,
        hop: u8,
    ) -> Result<ReadReply<Option<Task>>, Error>;
    async fn list_tasks(
        filter: TaskFilter,
        mode: ReadMode,
        hop: u8,
    ) -> Result<ReadReply<Vec<Task>>, Error>;
    async fn cluster_status(hop: u8) -> Result<ClusterStatus, Error>;
    /// Cancels a task; returns its state afterwards.
    async fn cancel_task(id: TaskId, hop: u8) -> Result<TaskState, Error>;
    /// Re-queues a dead or failed task; returns its state afterwards.
    async fn retry_task(id: TaskId, hop: u8) -> Result<TaskState, Error>;
    /// Per-queue counts.
    async fn queue_stats(
        mode: ReadMode,
        hop: u8,
    ) -> Result<ReadReply<std::collections::BTreeMap<String, QueueStats>>, Error>;
    /// Adds a node: as a learner, waits for it to catch up, then makes it a voter.
    async fn add_member(node_id: NodeId, addr: String, hop: u8) -> Result<(), Error>;
    /// Removes a node from the membership.
    async fn remove_member(node_id: NodeId, hop: u8) -> Result<(), Error>;
    /// Asks the contacted node to leave the cluster and stop (a leader hands off first).
    async fn leave() -> Result<(), Error>;

    // --- worker calls (served by the leader; forwarded once from elsewhere) ---
    /// Leases up to `max` ready tasks from the worker's queues; when none is ready, waits up
    /// to `wait_ms` for one (long poll), then returns what it has (possibly nothing).
    async fn lease_tasks(
        worker: WorkerInfo,
        max: u32,
        wait_ms: u64,
        hop: u8,
    ) -> Result<Vec<LeasedTask>, Error>;
    /// One heartbeat covering every lease the worker holds.
    async fn heartbeat(
        worker: WorkerInfo,
        leases: Vec<HeldLease>,
        hop: u8,
    ) -> Result<HeartbeatReply, Error>;
    /// Reports ended attempts; per report the task's state afterwards, or why it was refused
    /// (`StaleToken` when the lease was lost).
    async fn report(
        worker: WorkerId,
        reports: Vec<AttemptReport>,
        hop: u8,
    ) -> Result<Vec<Result<TaskState, Error>>, Error>;
    /// The worker is leaving: every lease it still holds is handed back at once (expired, to be
    /// retried). Returns how many.
    async fn worker_leave(worker: WorkerId, hop: u8) -> Result<u32, Error>;
    /// Workers the leader knows of.
    async fn list_workers(hop: u8) -> Result<Vec<WorkerStatus>, Error>;

    // --- schedules and pools (writes on the leader; forwarded once from elsewhere) ---
    /// Applies the changes in order; one outcome (or the reason it was refused) per change.
    async fn schedule_ops(
        ops: Vec<schedules::ScheduleOp>,
        hop: u8,
    ) -> Result<Vec<Result<schedules::OpOutcome, Error>>, Error>;
    /// One schedule (`name`) or every one (without history).
    async fn get_schedules(
        name: Option<String>,
        mode: ReadMode,
        hop: u8,
    ) -> Result<ReadReply<Vec<schedules::ScheduleView>>, Error>;
    /// Every pool with its use.
    async fn list_pools(
        mode: ReadMode,
        hop: u8,
    ) -> Result<ReadReply<Vec<crate::state::PoolView>>, Error>;

    // --- workflows and runs (writes on the leader; forwarded once from elsewhere) ---
    /// Applies the changes in order; one outcome (or the reason it was refused) per change.
    async fn workflow_ops(
        ops: Vec<workflows::WorkflowOp>,
        hop: u8,
    ) -> Result<Vec<Result<workflows::WorkflowOutcome, Error>>, Error>;
    /// One workflow (`name`) or every one.
    async fn get_workflows(
        name: Option<String>,
        mode: ReadMode,
        hop: u8,
    ) -> Result<ReadReply<Vec<workflows::WorkflowView>>, Error>;
    /// Runs, newest first, or one run with its tasks.
    async fn get_runs(
        filter: workflows::RunFilter,
        mode: ReadMode,
        hop: u8,
    ) -> Result<ReadReply<Vec<workflows::RunView>>, Error>;

    // --- health (answered by the contacted replica itself, never forwarded) ---
    /// The replica's report on itself, with its view of the cluster when `cluster`.
    async fn health(cluster: bool) -> crate::health::report::HealthReport;
    /// Stalls a component of the contacted replica, or clears every stall (tests and chaos
    /// only: refused unless `[fault_injection] enabled = true` there).
    async fn inject_fault(
        req: crate::health::fault::FaultRequest,
    ) -> Result<crate::health::fault::FaultState, Error>;

    // --- backups (protocol 7; served by the leader, not forwarded: a follower answers
    // NotLeader with the leader's address. Appended last: earlier messages keep their numbers) ---
    /// A piece of a backup (`fleet cluster snapshot save`). `session` 0 starts one: the leader
    /// confirms its leadership (ReadIndex), encodes its state as of that point into a snapshot
    /// file, keeps it for [`BACKUP_IDLE`], and answers the first piece; later calls name the
    /// session and the offset.
    async fn backup_chunk(session: u64, offset: u64, hop: u8) -> Result<BackupChunk, Error>;

    // --- live output of running attempts (protocol 8; soft state, `server::live_output`.
    // Answered by the contacted replica: no leader needed, so following survives elections) ---
    /// New output of running attempts, from the worker that holds their leases. Answers, per
    /// chunk, the end offset the replica now holds (0: send from your oldest byte), or why the
    /// chunk was refused (a stale fencing token: the attempt was given to another worker).
    async fn append_output(
        worker: WorkerId,
        chunks: Vec<OutputChunk>,
    ) -> Result<Vec<Result<u64, Error>>, Error>;
    /// An attempt's live output from `offset`. With `hop` 0 the replica also asks the others
    /// (with `hop` 1) and answers with the buffer that reaches furthest; `None` when no replica
    /// holds any (the attempt has not printed yet, or ended and its buffers were dropped: its
    /// kept tail is in the task's record).
    async fn read_output(
        task: TaskId,
        fencing_token: u64,
        offset: u64,
        hop: u8,
    ) -> Result<Option<OutputRead>, Error>;

    // --- requeue (protocol 9; a task command: on the leader, forwarded once from elsewhere) ---
    /// Ends the attempt that holds `fencing_token` as lost ([`REQUEUE_REASON`]) and retries the
    /// task by its retry policy, as a lease expiry does; returns the task's state afterwards.
    /// The token names the attempt the caller saw: when that attempt has ended meanwhile (and
    /// perhaps the task runs again under a newer token) nothing changes and the call fails with
    /// a stale-token error, so an operator never ends an attempt they did not see.
    async fn requeue_task(id: TaskId, fencing_token: u64, hop: u8) -> Result<TaskState, Error>;
}

/// The protocol version that added `append_output` and `read_output`.
pub const LIVE_OUTPUT_PROTOCOL: u16 = 8;
/// The protocol version that added `requeue_task`.
pub const REQUEUE_PROTOCOL: u16 = 9;
pub use crate::state::REQUEUE_REASON;

/// The largest output chunk a worker may send.
pub const MAX_CHUNK_BYTES: usize = 256 << 10;
/// Most output chunks (attempts) in one `append_output` call.
pub const MAX_CHUNKS_PER_CALL: usize = 256;

/// New output of one running attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputChunk {
    pub task: TaskId,
    pub fencing_token: u64,
    /// Where `data` starts in the attempt's output (bytes since the attempt started).
    pub offset: u64,
    /// The oldest offset the worker still holds (its tail, `worker.output_tail_bytes`).
    pub tail_start: u64,
    pub data: Vec<u8>,
    /// `data` ends the attempt's output.
    pub last: bool,
}

/// A piece of an attempt's live output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputRead {
    /// The oldest offset the answering buffer holds.
    pub start: u64,
    /// Where `data` starts: the offset asked for, or `start` if that is later (the bytes in
    /// between were dropped: `from - offset` of them).
    pub from: u64,
    /// The end of the output received so far.
    pub end: u64,
    pub data: Vec<u8>,
    /// The worker sent the attempt's last byte: nothing follows `end`.
    pub complete: bool,
}

/// How long a leader keeps a backup nobody asks the next piece of.
pub const BACKUP_IDLE: std::time::Duration = std::time::Duration::from_secs(60);
/// The most bytes of a backup in one reply (well under [`MAX_FRAME_BYTES`]).
pub const BACKUP_CHUNK_BYTES: usize = 8 << 20;

/// One piece of a backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupChunk {
    pub session: u64,
    /// The whole backup's size.
    pub total: u64,
    pub offset: u64,
    pub data: Vec<u8>,
}

/// A tarpc context whose deadline is `timeout` from now.
pub fn context_with_timeout(timeout: std::time::Duration) -> tarpc::context::Context {
    let mut ctx = tarpc::context::current();
    ctx.deadline = std::time::Instant::now() + timeout;
    ctx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_tasks_take_queue_defaults_then_their_own_values() {
        let mut config = crate::config::Config::default();
        config.tasks.max_attempts = 5;
        config.queues.insert(
            "reports".into(),
            crate::config::QueueDefaults {
                priority: Some(7),
                execution_timeout_ms: Some(60_000),
                ..Default::default()
            },
        );
        let mut t = NewTask::command(vec!["true".into()]);
        t.queue = Some("reports".into());
        let s = t.resolve(&config, 1_000).unwrap();
        assert_eq!(s.priority, 7);
        assert_eq!(s.retry.max_attempts, 5);
        assert_eq!(s.execution_timeout_ms, Some(60_000));
        t.priority = Some(-1);
        t.timeout_ms = Some(0);
        t.delay_ms = Some(500);
        let s = t.resolve(&config, 1_000).unwrap();
        assert_eq!(s.priority, -1);
        assert_eq!(s.execution_timeout_ms, None, "0 means no timeout");
        assert_eq!(s.not_before_ms, Some(1_500));
        t.not_before_ms = Some(9);
        assert!(
            t.resolve(&config, 1_000).is_err(),
            "delay and not-before together"
        );
        let mut bad = NewTask::command(vec!["true".into()]);
        bad.backoff_multiplier = Some(0.5);
        let e = bad.resolve(&config, 0).unwrap_err().to_string();
        assert!(e.contains("backoff multiplier 0.500"), "{e}");
    }
}
