//! The replicated scheduler state: a pure, deterministic state machine.
//!
//! Every replica holds one [`State`] and changes it only by applying [`Request`]s that Raft
//! committed, in log order. Given the same sequence of requests, every replica reaches the same
//! state and returns the same responses. Read [`State::apply`] first.
//!
//! **Determinism contract.** Code in this module does no IO, reads no clock, draws no random
//! numbers and never awaits. Anything that varies between replicas (the time a task was
//! submitted, later jitter for retries) is decided by the leader *before* proposing and carried
//! inside the [`Request`]. Errors returned from `apply` are deterministic: every replica reaches
//! the same one, so they are returned to the client instead of stopping the node.
//!
//! **Bounds.** The request-id table used to make retried submissions idempotent holds at most
//! [`REQUEST_DEDUP_CAPACITY`] entries; the oldest is evicted first. A client retrying a write
//! more than that many submissions later would create a duplicate; clients retry for seconds,
//! not for a hundred thousand writes.
//!
//! Caveat: the state lives in memory and is persisted through snapshots plus the Raft log (see
//! `raft::state_machine_store`). Its size is the number of retained tasks; retention and purge
//! of finished tasks arrive with the task lifecycle.

/// An enum of named values: `as_str`, `Display`, `FromStr` (the error lists the accepted
/// names) and serde by the same names.
macro_rules! named_enum {
    ($(#[$m:meta])* $name:ident, $what:literal, { $($(#[$vm:meta])* $v:ident => $s:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(rename_all = "kebab-case")]
        pub enum $name { $($(#[$vm])* $v),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$v),+];
            pub fn as_str(&self) -> &'static str {
                match self { $($name::$v => $s),+ }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                $name::ALL.iter().copied().find(|p| p.as_str() == s).ok_or_else(|| {
                    let names: Vec<&str> = $name::ALL.iter().map(|p| p.as_str()).collect();
                    format!(concat!("unknown ", $what, " {:?}; accepted: {}"), s, names.join(", "))
                })
            }
        }
    };
}

pub mod argv;
mod invariants;
pub mod pools;
pub mod runs;
pub mod schedules;
mod tally;
pub mod task;
pub mod workflows;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

pub use argv::Argv;
pub use pools::{PoolClaim, PoolView, Pools};
pub use runs::{NodeSpec, Run, RunId, RunStatus, Workflow, WorkflowSpec, Workflows};
pub use schedules::{
    CatchupPolicy, MissedTicks, OverlapPolicy, PlannedRun, PutChange, PutMode, RunKind, Schedule,
    ScheduleId, ScheduleSpec, Schedules, TickOutcome, TickPlan, TickRecord, TickResult, Trigger,
};
pub use task::{
    decoding_attempts_without_names, Attempt, AttemptOutcome, Lease, LeaseGrant, RetryPolicy,
    WorkerId,
};

/// Identifies one task for the lifetime of the cluster. Assigned by the state machine in
/// submission order, starting at 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TaskId(pub u64);

impl std::fmt::Display for TaskId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.0, f)
    }
}

/// A client-chosen id that makes a write idempotent: a retried write with the same id returns
/// the first write's result instead of applying twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RequestId(pub u128);

/// How many recent request ids the state machine remembers for idempotent retries.
pub const REQUEST_DEDUP_CAPACITY: usize = 100_000;
/// Most arguments a task command may have.
pub const MAX_COMMAND_ARGS: usize = 1024;
/// Most bytes of all a task command's arguments together.
pub const MAX_COMMAND_BYTES: usize = 64 * 1024;
/// Longest queue name.
pub const MAX_QUEUE_NAME_LEN: usize = 64;
/// The queue a task goes to when the client names none.
pub const DEFAULT_QUEUE: &str = "default";

/// Longest visibility or execution timeout, in milliseconds (one week).
pub const MAX_TIMEOUT_MS: u64 = 7 * 24 * 3600 * 1000;
/// Most environment variables a task may set.
pub const MAX_ENV_VARS: usize = 256;
/// Longest idempotency key.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 256;

/// What a client asks to run, and how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskSpec {
    /// The program and its arguments, the program first (one allocation: [`Argv`]).
    pub command: Argv,
    /// The queue the task belongs to.
    pub queue: String,
    /// Higher runs first; FIFO within one priority.
    pub priority: i32,
    /// Extra environment variables for the process.
    pub env: Vec<(String, String)>,
    pub retry: RetryPolicy,
    /// How long one attempt may run in total; `None` for no limit.
    pub execution_timeout_ms: Option<u64>,
    /// How long a lease stays valid without a heartbeat.
    pub visibility_timeout_ms: u64,
    /// Not to run before this time (ms since the epoch, leader's clock).
    pub not_before_ms: Option<u64>,
    /// A second submission with the same key, while the first task is retained, returns the
    /// first task's id.
    pub idempotency_key: Option<String>,
}

impl TaskSpec {
    /// A spec with the default policy: 3 attempts, 1 s backoff doubling to 5 min, 30 s
    /// visibility timeout, no execution timeout.
    pub fn new(command: Vec<String>, queue: impl Into<String>) -> TaskSpec {
        TaskSpec {
            command: command.into(),
            queue: queue.into(),
            priority: 0,
            env: Vec::new(),
            retry: RetryPolicy::default(),
            execution_timeout_ms: None,
            visibility_timeout_ms: 30_000,
            not_before_ms: None,
            idempotency_key: None,
        }
    }

    /// Checks the spec; the error names the bad value and what would be accepted.
    pub fn validate(&self) -> Result<(), CommandError> {
        self.retry.validate()?;
        if !(100..=MAX_TIMEOUT_MS).contains(&self.visibility_timeout_ms) {
            return Err(CommandError::Invalid(format!(
                "visibility timeout {} ms is not valid: use 100 ms to {MAX_TIMEOUT_MS} ms",
                self.visibility_timeout_ms
            )));
        }
        if let Some(t) = self.execution_timeout_ms {
            if !(1..=MAX_TIMEOUT_MS).contains(&t) {
                return Err(CommandError::Invalid(format!(
                    "execution timeout {t} ms is not valid: use 1 ms to {MAX_TIMEOUT_MS} ms"
                )));
            }
        }
        if self.env.len() > MAX_ENV_VARS {
            return Err(CommandError::Invalid(format!(
                "{} environment variables; at most {MAX_ENV_VARS} are accepted",
                self.env.len()
            )));
        }
        for (k, _) in &self.env {
            let ok = !k.is_empty()
                && !k.starts_with(|c: char| c.is_ascii_digit())
                && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !ok {
                return Err(CommandError::Invalid(format!(
                    "environment variable name {k:?} is not valid: use letters, digits and '_', \
                     not starting with a digit"
                )));
            }
            if k.starts_with("FLEET_") {
                return Err(CommandError::Invalid(format!(
                    "environment variable {k} is reserved: fleet sets FLEET_* variables itself"
                )));
            }
        }
        if let Some(key) = &self.idempotency_key {
            if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY_LEN {
                return Err(CommandError::Invalid(format!(
                    "idempotency key of {} bytes is not valid: use 1 to {MAX_IDEMPOTENCY_KEY_LEN}",
                    key.len()
                )));
            }
        }
        check_task_size(
            &self.command,
            self.env.iter().map(|(k, v)| k.len() + v.len()).sum(),
        )?;
        if self.command.program().is_empty() {
            return Err(CommandError::Invalid(
                "the task command is empty: give a program and its arguments after `--`".into(),
            ));
        }
        validate_queue_name(&self.queue)
    }
}

/// The per-task size limits: at most [`MAX_COMMAND_ARGS`] arguments, [`MAX_COMMAND_BYTES`] of
/// command and as much of environment. The client checks them too, before it sends anything,
/// so an oversized line of a task file is named by its line number.
pub fn check_task_size<'a>(
    command: impl IntoIterator<Item = &'a str>,
    env_bytes: usize,
) -> Result<(), CommandError> {
    let (args, bytes) = command
        .into_iter()
        .fold((0, 0), |(n, b), a| (n + 1, b + a.len()));
    if env_bytes > MAX_COMMAND_BYTES {
        return Err(CommandError::Invalid(format!(
            "the environment is {env_bytes} bytes long; at most {MAX_COMMAND_BYTES} are accepted"
        )));
    }
    if args > MAX_COMMAND_ARGS {
        return Err(CommandError::Invalid(format!(
            "the task command has {args} arguments; at most {MAX_COMMAND_ARGS} are accepted"
        )));
    }
    if bytes > MAX_COMMAND_BYTES {
        return Err(CommandError::Invalid(format!(
            "the task command is {bytes} bytes long; at most {MAX_COMMAND_BYTES} are accepted"
        )));
    }
    Ok(())
}

/// A queue name is 1 to 64 characters of `A-Z a-z 0-9 _ - .`.
pub fn validate_queue_name(queue: &str) -> Result<(), CommandError> {
    let ok = !queue.is_empty()
        && queue.len() <= MAX_QUEUE_NAME_LEN
        && queue
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if ok {
        Ok(())
    } else {
        Err(CommandError::Invalid(format!(
            "queue name {queue:?} is not valid: use 1 to {MAX_QUEUE_NAME_LEN} characters of \
             letters, digits, '_', '-' and '.'"
        )))
    }
}

/// Where a task is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// Waiting for a worker (ready, or delayed until `ready_at_ms`).
    Queued,
    /// Leased to a worker.
    Running,
    /// An attempt failed; waiting for its retry time.
    Failed,
    /// An attempt succeeded. Final.
    Succeeded,
    /// Every attempt failed (the dead-letter state). Final until `task retry`.
    Dead,
    /// Cancelled by a client. Final.
    Cancelled,
}

impl TaskState {
    pub const ALL: [TaskState; 6] = [
        TaskState::Queued,
        TaskState::Running,
        TaskState::Failed,
        TaskState::Succeeded,
        TaskState::Dead,
        TaskState::Cancelled,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            TaskState::Queued => "queued",
            TaskState::Running => "running",
            TaskState::Failed => "failed",
            TaskState::Succeeded => "succeeded",
            TaskState::Dead => "dead",
            TaskState::Cancelled => "cancelled",
        }
    }

    /// Succeeded, dead or cancelled.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            TaskState::Succeeded | TaskState::Dead | TaskState::Cancelled
        )
    }
}

impl std::str::FromStr for TaskState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        TaskState::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = TaskState::ALL.iter().map(|t| t.as_str()).collect();
                format!("unknown task state {s:?}; accepted: {}", names.join(", "))
            })
    }
}

/// One task as the state machine records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    pub id: TaskId,
    pub spec: TaskSpec,
    pub state: TaskState,
    /// When the leader accepted the submission (milliseconds since the Unix epoch, leader's
    /// clock, stamped into the request before it was proposed).
    pub submitted_at_ms: u64,
    /// The Raft log index of the entry that created the task.
    pub created_index: u64,
    /// When the task becomes visible to workers (queued or failed tasks).
    pub ready_at_ms: u64,
    /// Every attempt so far, in order.
    pub attempts: Vec<Attempt>,
    /// The current lease while running.
    pub lease: Option<Lease>,
    /// Attempts made before the last manual `retry` (they do not count against the budget).
    pub attempts_before_retry: u32,
    /// When the task reached a final state.
    pub finished_at_ms: Option<u64>,
    /// Order of arrival in the ready queue (FIFO within a priority).
    seq: u64,
}

impl Task {
    /// Attempts counted against `retry.max_attempts`.
    pub fn attempts_used(&self) -> u32 {
        self.attempts.len() as u32 - self.attempts_before_retry
    }

    /// When the task's last attempt was ended by `fleet task requeue` ([`REQUEUE_REASON`]):
    /// until when (wall ms) the leader holds the task back. The worker may still run that
    /// attempt until its next heartbeat is answered "fenced", or, cut off, until the lease
    /// lapses on its side within one visibility timeout; granting the task before then could
    /// run it twice at once. A leader's policy, not a replicated rule: the state records only
    /// the attempt's end.
    pub fn requeue_hold_until_ms(&self) -> Option<u64> {
        let a = self.attempts.last()?;
        match &a.outcome {
            Some(AttemptOutcome::Lost { reason }) if reason == REQUEUE_REASON => Some(
                a.ended_at_ms?
                    .saturating_add(self.spec.visibility_timeout_ms),
            ),
            _ => None,
        }
    }
}

/// The outcome reason of an attempt ended by `fleet task requeue` (a [`Command::ExpireLease`]
/// proposed for an operator, with the fencing token of the attempt the operator saw).
pub const REQUEUE_REASON: &str = "requeued by an operator";

/// One operation on the state. Decisions that need a clock or randomness were made by the
/// leader and are carried here; the state machine re-checks each one against the current state
/// so a stale decision is rejected, never applied twice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Record a new task.
    SubmitTask {
        request_id: RequestId,
        spec: TaskSpec,
    },
    /// Lease the given ready tasks to a worker (chosen by the leader with
    /// [`State::pick_ready`]); tasks no longer ready are skipped.
    GrantLeases {
        worker: WorkerId,
        tasks: Vec<TaskId>,
    },
    /// A worker reports how an attempt ended. `retry_jitter_permille` was drawn by the leader.
    Complete {
        task: TaskId,
        fencing_token: u64,
        outcome: AttemptOutcome,
        output_tail: String,
        retry_jitter_permille: u32,
    },
    /// The leader decided a lease is lost (no heartbeat in time, or its worker is lost).
    ExpireLease {
        task: TaskId,
        fencing_token: u64,
        reason: String,
        retry_jitter_permille: u32,
    },
    /// Cancel a task; a running attempt is killed by its worker at the next heartbeat.
    Cancel { task: TaskId },
    /// Re-queue a dead or failed task with a fresh attempt budget.
    Retry { task: TaskId },
    /// Forget finished tasks that reached a final state at or before `finished_before_ms`
    /// (at most `max` of them), and their idempotency keys.
    PurgeFinished { finished_before_ms: u64, max: u32 },
    /// [`Command::GrantLeases`] with the worker's name, recorded in each attempt so that
    /// `task show`, `logs`, `worker list` and the task's `FLEET_WORKER` name a worker the same
    /// way. Appended last: entries written before it still decode (the leader now proposes only
    /// this one).
    GrantLeasesTo {
        worker: WorkerId,
        worker_name: String,
        tasks: Vec<TaskId>,
    },
    /// Create or change a schedule (see [`PutMode`]); `paused` set changes its pause state.
    PutSchedule {
        name: String,
        spec: ScheduleSpec,
        paused: Option<bool>,
        mode: PutMode,
    },
    /// Pause or resume a schedule.
    PauseSchedule { name: String, paused: bool },
    /// Delete a schedule (its unfinished runs go on).
    DeleteSchedule { name: String },
    /// The leader's tick plans; each applies only if its schedule's watermark is the one the
    /// plan started from (see `state::schedules`).
    FireTicks { plans: Vec<TickPlan> },
    /// One run of a schedule now; `key` (the client's request id) names the run, so a retried
    /// trigger makes one run.
    TriggerSchedule { name: String, key: u128 },
    /// A run for each of these past fire times that has none retained.
    Backfill { name: String, fires: Vec<u64> },
    /// Create a pool or change its size.
    SetPool { name: String, slots: u32 },
    /// Delete a pool nothing uses.
    DeletePool { name: String },
    /// [`Command::SubmitTask`] for a task that holds slots of a pool while it runs.
    SubmitPooled {
        request_id: RequestId,
        spec: TaskSpec,
        pool: PoolClaim,
    },
    /// Create or replace a workflow; `schedule` creates, replaces or (None) removes its
    /// schedule.
    PutWorkflow {
        name: String,
        spec: WorkflowSpec,
        schedule: Option<ScheduleSpec>,
    },
    /// Delete a workflow (its runs in progress go on; queued ones are cancelled).
    DeleteWorkflow { name: String },
    /// Start a run; `request_id` makes a retried start one run.
    StartRun {
        workflow: String,
        request_id: RequestId,
        params: Vec<(String, String)>,
    },
    /// Cancel a run's unfinished tasks.
    CancelRun { run: RunId },
    /// Run a finished run's failed tasks (and, unless `failed_only`, its skipped and
    /// cancelled ones) again, with everything downstream of them.
    RetryRun { run: RunId, failed_only: bool },
    /// A task held until every task of `after` has succeeded (`fleet submit --after`).
    SubmitAfter {
        request_id: RequestId,
        spec: TaskSpec,
        pool: Option<PoolClaim>,
        after: Vec<TaskId>,
    },
    /// A run of a scheduled workflow for each of these past fire times that has none retained.
    BackfillWorkflow { name: String, fires: Vec<u64> },
}

impl Command {
    /// An expiry of `task`'s lease with `fencing_token`, with retry jitter drawn by the caller
    /// (the leader).
    pub fn expire(
        task: TaskId,
        fencing_token: u64,
        reason: String,
        jitter_permille: u32,
    ) -> Command {
        Command::ExpireLease {
            task,
            fencing_token,
            reason,
            retry_jitter_permille: jitter_permille,
        }
    }
}

/// What one command produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandOutput {
    /// The task id, new or (for a retried request id or a known idempotency key) the existing one.
    TaskSubmitted {
        id: TaskId,
        duplicate: bool,
    },
    /// The leases granted (possibly fewer than asked for).
    LeasesGranted {
        grants: Vec<LeaseGrant>,
    },
    /// The task's state after the command.
    TaskUpdated {
        id: TaskId,
        state: TaskState,
    },
    /// How many finished tasks were forgotten.
    Purged {
        count: u32,
    },
    ScheduleSaved {
        id: ScheduleId,
        change: PutChange,
    },
    ScheduleDeleted {
        id: ScheduleId,
    },
    /// One outcome per plan, in order.
    TicksFired {
        outcomes: Vec<TickOutcome>,
    },
    /// Runs created (fire time, task), and how many fire times had a run already.
    ScheduleRuns {
        created: Vec<(u64, TaskId)>,
        existing: u32,
    },
    PoolSet {
        name: String,
        slots: u32,
    },
    PoolDeleted {
        name: String,
    },
    WorkflowSaved {
        name: String,
        change: PutChange,
    },
    WorkflowDeleted {
        name: String,
    },
    /// The run started (or queued), or the one the request id made before (`duplicate`).
    RunStarted {
        run: RunId,
        duplicate: bool,
    },
    /// A run's state after the command.
    RunUpdated {
        run: RunId,
        status: RunStatus,
    },
    /// Runs created by a backfill (fire time, run), and how many fire times had one already.
    WorkflowRuns {
        created: Vec<(u64, RunId)>,
        existing: u32,
    },
}

/// A deterministic rejection: every replica reaches the same one for the same command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum CommandError {
    #[error("{0}")]
    Invalid(String),
    #[error("task {0} not found")]
    NotFound(TaskId),
    /// A call with an old fencing token: the caller's lease was lost and given to someone else.
    #[error("stale fencing token {given} for task {task} (current: {})", .current.map(|c| c.to_string()).unwrap_or_else(|| "none".into()))]
    StaleToken {
        task: TaskId,
        given: u64,
        current: Option<u64>,
    },
    #[error("task {id} is {}; {action} needs {expected}", .state.as_str())]
    WrongState {
        id: TaskId,
        state: TaskState,
        action: String,
        expected: String,
    },
}

/// The Raft log payload: a batch of commands that share one entry (and so one fsync and one
/// replication round), plus what the leader decided for them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// The leader's wall clock when it proposed the batch, in milliseconds since the Unix
    /// epoch. The state machine uses this instead of reading a clock (never going backwards:
    /// see [`State::clock_ms`]).
    pub proposed_at_ms: u64,
    pub commands: Vec<Command>,
}

impl std::fmt::Display for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Request({} commands)", self.commands.len())
    }
}

/// The state machine's answer to one [`Request`]: one result per command, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Response {
    pub results: Vec<Result<CommandOutput, CommandError>>,
}

/// Whether a report equals the one already recorded for an attempt (a cancelled attempt
/// records `Cancelled` whatever the worker reported, unless it succeeded).
fn report_repeats(recorded: Option<&AttemptOutcome>, reported: &AttemptOutcome) -> bool {
    match recorded {
        Some(AttemptOutcome::Lost { .. }) | None => false,
        Some(AttemptOutcome::Cancelled) => !reported.is_success(),
        Some(r) => r == reported,
    }
}

/// A filter for listing tasks.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskFilter {
    pub state: Option<TaskState>,
    pub queue: Option<String>,
    /// Only tasks with an id greater than this (for paging).
    pub after: Option<TaskId>,
    /// At most this many tasks.
    pub limit: usize,
}

/// Per-queue counts for `fleet queue stats`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueStats {
    pub ready: u64,
    pub delayed: u64,
    pub running: u64,
    pub failed: u64,
    pub dead: u64,
    /// Finished tasks still kept (until `scheduler.retention_ms`).
    #[serde(default)]
    pub succeeded: u64,
    #[serde(default)]
    pub cancelled: u64,
    /// When the oldest ready task became ready (ms since the epoch).
    pub oldest_ready_since_ms: Option<u64>,
}

/// Most candidates [`State::pick_ready`] considers: a bound on the leader's work per grant.
pub const MAX_PICK_SCAN: usize = 100_000;

/// A ready-queue key: higher priority first, then arrival order.
type ReadyKey = (Reverse<i32>, u64, TaskId);

/// The scheduler state. Cloning it is how a snapshot is taken.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// The latest leader clock reading applied; never decreases (a new leader's clock may be
    /// behind the old one's).
    clock_ms: u64,
    next_task_id: u64,
    next_fencing_token: u64,
    next_seq: u64,
    /// Boxed: a B-tree node holds 11 entries and sequential ids leave nodes about half full,
    /// so unboxed tasks would cost their size again in empty slots.
    tasks: BTreeMap<TaskId, Box<Task>>,
    /// Ready tasks per queue, in the order workers get them.
    ready: BTreeMap<String, BTreeSet<ReadyKey>>,
    /// Queued or failed tasks that become ready at a later time.
    waiting: BTreeSet<(u64, TaskId)>,
    /// Recent request ids and the task each created, for idempotent retries.
    requests: BTreeMap<RequestId, TaskId>,
    /// The same ids in the order they arrived, to evict the oldest at the bound.
    request_order: VecDeque<RequestId>,
    /// Idempotency keys of retained tasks.
    idempotency_keys: BTreeMap<String, TaskId>,
    /// Final tasks by the time they finished, for retention.
    finished: BTreeSet<(u64, TaskId)>,
    /// Tasks that hold a lease (running, or cancelled with the attempt still running).
    leased: BTreeSet<TaskId>,
    /// Schedules and their runs. Encoded after the fields above (state format 3), so states
    /// written before schedules existed still decode (see `raft::state_machine_store`).
    #[serde(skip)]
    pub(crate) schedules: Schedules,
    /// Pools and the tasks' claims on them (format 3, like `schedules`).
    #[serde(skip)]
    pub(crate) pools: Pools,
    /// Workflows, their runs and `--after` dependencies (format 4, after the pools).
    #[serde(skip)]
    pub(crate) workflows: Workflows,
    /// Per-queue counts (derived: rebuilt after decoding, see [`State::rebuild_tally`]).
    #[serde(skip)]
    tally: tally::Tally,
    /// Test-only bug switches (never encoded; always off outside the simulator).
    #[serde(skip)]
    bugs: Bugs,
}

/// Test-only switches that re-introduce known bug classes into the state machine, so the
/// simulator can be shown to find them (`chaos sim --bug NAME`). Off everywhere else.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Bugs {
    /// An expiry ends whatever lease the task holds, without checking its fencing token.
    pub expire_ignores_token: bool,
    /// A grant is applied without re-checking that the task is still ready.
    pub grant_skips_recheck: bool,
}

impl State {
    /// Turns the test-only bug switches on or off (the simulator's `--bug`).
    pub fn set_bugs(&mut self, bugs: Bugs) {
        self.bugs = bugs;
    }

    /// Applies one committed request at log index `index`. Never fails as a whole: each
    /// command's deterministic rejection is part of the response.
    pub fn apply(&mut self, index: u64, request: &Request) -> Response {
        self.advance_clock(request.proposed_at_ms);
        self.set_applying_index(index);
        let results = request
            .commands
            .iter()
            .map(|cmd| self.apply_command(index, cmd))
            .collect();
        // O(state), so in unit tests and debug builds (the binary the end-to-end tests run):
        // after every apply while at most 1,000 tasks are retained, then more rarely as the
        // state grows (every 64th entry per thousand tasks), so the cost per apply stays flat.
        #[cfg(any(test, debug_assertions))]
        if index % (64 * (self.tasks.len() as u64 / 1_000)).max(1) == 0 {
            if let Err(e) = self.check_invariants() {
                panic!("state invariant broken by entry {index} ({request}): {e}");
            }
        }
        Response { results }
    }

    /// The state's notion of now: the greatest leader clock reading applied so far.
    pub fn clock_ms(&self) -> u64 {
        self.clock_ms
    }

    fn advance_clock(&mut self, now_ms: u64) {
        self.clock_ms = self.clock_ms.max(now_ms);
        // Promote waiting tasks whose time has come.
        while let Some(&(at, id)) = self.waiting.first() {
            if at > self.clock_ms {
                break;
            }
            self.waiting.pop_first();
            self.make_ready(id);
        }
    }

    fn apply_command(&mut self, index: u64, cmd: &Command) -> Result<CommandOutput, CommandError> {
        let now = self.clock_ms;
        match cmd {
            Command::SubmitTask { request_id, spec } => self.submit(index, *request_id, spec),
            Command::GrantLeases { worker, tasks } => {
                let grants = tasks
                    .iter()
                    .filter_map(|id| self.grant(*worker, "", *id))
                    .collect();
                Ok(CommandOutput::LeasesGranted { grants })
            }
            Command::GrantLeasesTo {
                worker,
                worker_name,
                tasks,
            } => {
                let grants = tasks
                    .iter()
                    .filter_map(|id| self.grant(*worker, worker_name, *id))
                    .collect();
                Ok(CommandOutput::LeasesGranted { grants })
            }
            Command::Complete {
                task,
                fencing_token,
                outcome,
                output_tail,
                retry_jitter_permille,
            } => self.end_attempt(
                *task,
                *fencing_token,
                outcome.clone(),
                output_tail,
                *retry_jitter_permille,
            ),
            Command::ExpireLease {
                task,
                fencing_token,
                reason,
                retry_jitter_permille,
            } => {
                // The bug class kept for the simulator: an expiry that ends the current lease
                // whatever its token.
                let token = match self.tasks.get(task).and_then(|t| t.lease.as_ref()) {
                    Some(l) if self.bugs.expire_ignores_token => l.fencing_token,
                    _ => *fencing_token,
                };
                self.end_attempt(
                    *task,
                    token,
                    AttemptOutcome::Lost {
                        reason: reason.clone(),
                    },
                    "",
                    *retry_jitter_permille,
                )
            }
            Command::Cancel { task } => self.cancel(*task),
            Command::Retry { task } => {
                self.check_not_run_task(*task)?;
                let t = self
                    .tasks
                    .get_mut(task)
                    .ok_or(CommandError::NotFound(*task))?;
                if !matches!(t.state, TaskState::Dead | TaskState::Failed) {
                    return Err(CommandError::WrongState {
                        id: *task,
                        state: t.state,
                        action: "retry".into(),
                        expected: "a dead or failed task".into(),
                    });
                }
                let was_dead = t.state == TaskState::Dead;
                t.attempts_before_retry = t.attempts.len() as u32;
                if was_dead {
                    let finished_at = t.finished_at_ms.take().expect("dead tasks have finished");
                    self.finished.remove(&(finished_at, *task));
                } else {
                    self.unindex(*task);
                }
                let t = self.tasks.get_mut(task).expect("exists");
                let from = t.state;
                t.state = TaskState::Queued;
                t.ready_at_ms = now;
                let q = t.spec.queue.clone();
                self.tally.moved(&q, Some(from), Some(TaskState::Queued));
                self.make_ready(*task);
                self.run_reopened(*task);
                Ok(CommandOutput::TaskUpdated {
                    id: *task,
                    state: TaskState::Queued,
                })
            }
            Command::PurgeFinished {
                finished_before_ms,
                max,
            } => {
                // A cancelled task whose attempt still runs keeps its record until the attempt
                // ends, so the worker's report is not mistaken for a stranger's. It is skipped,
                // not waited for: tasks that finished after it are purged meanwhile. The skipped
                // entries are bounded by the running attempts.
                let purgeable: Vec<(u64, TaskId)> = self
                    .finished
                    .iter()
                    .take_while(|(at, _)| *at <= *finished_before_ms)
                    .filter(|(_, id)| self.tasks[id].lease.is_none())
                    .take(*max as usize)
                    .copied()
                    .collect();
                let count = purgeable.len() as u32;
                for (at, id) in purgeable {
                    self.finished.remove(&(at, id));
                    let t = self.tasks.remove(&id).expect("finished tasks exist");
                    self.tally.moved(&t.spec.queue, Some(t.state), None);
                    self.forget_run(id);
                    self.forget_claim(id);
                    self.forget_node(id);
                    if let Some(k) = &t.spec.idempotency_key {
                        if self.idempotency_keys.get(k) == Some(&id) {
                            self.idempotency_keys.remove(k);
                        }
                    }
                }
                self.purge_runs(*finished_before_ms, *max);
                Ok(CommandOutput::Purged { count })
            }
            Command::PutSchedule {
                name,
                spec,
                paused,
                mode,
            } => {
                self.check_not_workflow_schedule(name)?;
                self.put_schedule(name, spec, *paused, *mode)
            }
            Command::PauseSchedule { name, paused } => self.set_schedule_paused(name, *paused),
            Command::DeleteSchedule { name } => {
                self.check_not_workflow_schedule(name)?;
                self.delete_schedule(name)
            }
            Command::FireTicks { plans } => Ok(self.fire_ticks(index, plans)),
            Command::TriggerSchedule { name, key } => {
                self.check_not_workflow_schedule(name)?;
                self.trigger_schedule(index, name, *key)
            }
            Command::Backfill { name, fires } => {
                self.check_not_workflow_schedule(name)?;
                self.backfill(index, name, fires)
            }
            Command::SetPool { name, slots } => self.set_pool(name, *slots),
            Command::DeletePool { name } => self.delete_pool(name),
            Command::SubmitPooled {
                request_id,
                spec,
                pool,
            } => {
                if !self.requests.contains_key(request_id) {
                    self.check_claim(pool)?;
                }
                let out = self.submit(index, *request_id, spec)?;
                if let CommandOutput::TaskSubmitted {
                    id,
                    duplicate: false,
                } = out
                {
                    self.add_claim(id, pool.clone());
                }
                Ok(out)
            }
            Command::PutWorkflow {
                name,
                spec,
                schedule,
            } => self.put_workflow(name, spec, schedule.as_ref()),
            Command::DeleteWorkflow { name } => self.delete_workflow(name),
            Command::StartRun {
                workflow,
                request_id,
                params,
            } => {
                let key = runs::request_key(*request_id);
                let (run, duplicate) = self.start_run(workflow, key, params, None)?;
                Ok(CommandOutput::RunStarted { run, duplicate })
            }
            Command::CancelRun { run } => self.cancel_run(*run),
            Command::RetryRun { run, failed_only } => self.retry_run(*run, *failed_only),
            Command::SubmitAfter {
                request_id,
                spec,
                pool,
                after,
            } => self.submit_after(index, *request_id, spec, pool.as_ref(), after),
            Command::BackfillWorkflow { name, fires } => self.backfill_workflow(name, fires),
        }
    }

    fn cancel(&mut self, task: TaskId) -> Result<CommandOutput, CommandError> {
        let now = self.clock_ms;
        let t = self.tasks.get(&task).ok_or(CommandError::NotFound(task))?;
        match t.state {
            TaskState::Queued | TaskState::Failed => {
                self.unindex(task);
                self.finish(task, TaskState::Cancelled);
            }
            // The lease stays until the worker reports or the lease is lost; the attempt then
            // ends as cancelled.
            TaskState::Running => {
                let t = self.tasks.get_mut(&task).expect("exists");
                t.state = TaskState::Cancelled;
                t.finished_at_ms = Some(now);
                let q = t.spec.queue.clone();
                self.tally
                    .moved(&q, Some(TaskState::Running), Some(TaskState::Cancelled));
                self.finished.insert((now, task));
                self.run_ended(task);
                self.node_ended(task, TaskState::Cancelled);
            }
            state => {
                return Err(CommandError::WrongState {
                    id: task,
                    state,
                    action: "cancel".into(),
                    expected: "a queued, running or failed task".into(),
                })
            }
        }
        Ok(CommandOutput::TaskUpdated {
            id: task,
            state: TaskState::Cancelled,
        })
    }

    fn submit(
        &mut self,
        index: u64,
        request_id: RequestId,
        spec: &TaskSpec,
    ) -> Result<CommandOutput, CommandError> {
        if let Some(id) = self.requests.get(&request_id) {
            return Ok(CommandOutput::TaskSubmitted {
                id: *id,
                duplicate: true,
            });
        }
        spec.validate()?;
        if let Some(key) = &spec.idempotency_key {
            if let Some(id) = self.idempotency_keys.get(key) {
                let id = *id;
                self.remember_request(request_id, id);
                return Ok(CommandOutput::TaskSubmitted {
                    id,
                    duplicate: true,
                });
            }
        }
        let id = self.insert_task(index, spec.clone());
        self.remember_request(request_id, id);
        Ok(CommandOutput::TaskSubmitted {
            id,
            duplicate: false,
        })
    }

    /// Records a new task (checked already) and queues it.
    fn insert_task(&mut self, index: u64, spec: TaskSpec) -> TaskId {
        self.insert_held_task(index, spec, true)
    }

    /// A task held for its upstream tasks (`--after`) becomes ready (or waits for its
    /// not-before time).
    fn release_held(&mut self, id: TaskId) {
        let now = self.clock_ms;
        let t = self.tasks.get_mut(&id).expect("held tasks exist");
        t.ready_at_ms = t.ready_at_ms.max(now);
        self.schedule(id);
    }

    /// Records a new task (checked already); queues it now, or (`queue_now` false: held for
    /// upstream tasks) later, by [`State::release_held`].
    fn insert_held_task(&mut self, index: u64, spec: TaskSpec, queue_now: bool) -> TaskId {
        let now = self.clock_ms;
        self.next_task_id += 1;
        let id = TaskId(self.next_task_id);
        let ready_at_ms = spec.not_before_ms.unwrap_or(now).max(now);
        let key = spec.idempotency_key.clone();
        let task = Task {
            id,
            spec,
            state: TaskState::Queued,
            submitted_at_ms: now,
            created_index: index,
            ready_at_ms,
            attempts: Vec::new(),
            lease: None,
            attempts_before_retry: 0,
            finished_at_ms: None,
            seq: 0,
        };
        self.tally
            .moved(&task.spec.queue, None, Some(TaskState::Queued));
        let previous = self.tasks.insert(id, Box::new(task));
        assert!(previous.is_none(), "task id {id} assigned twice");
        if let Some(key) = key {
            self.idempotency_keys.insert(key, id);
        }
        if queue_now {
            self.schedule(id);
        }
        id
    }

    /// Puts a queued or failed task in the ready queue or the waiting set by its ready time.
    fn schedule(&mut self, id: TaskId) {
        let at = self.tasks[&id].ready_at_ms;
        if at <= self.clock_ms {
            self.make_ready(id);
        } else {
            self.waiting.insert((at, id));
        }
    }

    fn make_ready(&mut self, id: TaskId) {
        self.next_seq += 1;
        let seq = self.next_seq;
        let t = self.tasks.get_mut(&id).expect("scheduled tasks exist");
        t.seq = seq;
        self.ready.entry(t.spec.queue.clone()).or_default().insert((
            Reverse(t.spec.priority),
            seq,
            id,
        ));
        self.tally
            .ready(&t.spec.queue, t.state, t.ready_at_ms, true);
    }

    /// Removes a queued or failed task from whichever index holds it.
    fn unindex(&mut self, id: TaskId) {
        let t = &self.tasks[&id];
        self.waiting.remove(&(t.ready_at_ms, id));
        if let Some(q) = self.ready.get_mut(&t.spec.queue) {
            if q.remove(&(Reverse(t.spec.priority), t.seq, id)) {
                self.tally
                    .ready(&t.spec.queue, t.state, t.ready_at_ms, false);
            }
            if q.is_empty() {
                self.ready.remove(&t.spec.queue);
            }
        }
    }

    fn is_ready(&self, id: TaskId) -> bool {
        let t = &self.tasks[&id];
        self.ready
            .get(&t.spec.queue)
            .is_some_and(|q| q.contains(&(Reverse(t.spec.priority), t.seq, id)))
    }

    fn grant(&mut self, worker: WorkerId, worker_name: &str, id: TaskId) -> Option<LeaseGrant> {
        if !self.tasks.contains_key(&id) {
            return None; // purged: a stale decision
        }
        // The bug class kept for the simulator: a grant that skips this re-check.
        if !self.is_ready(id) && !self.bugs.grant_skips_recheck {
            return None; // leased meanwhile or cancelled: a stale decision
        }
        if !self.pool_admits(id) {
            return None; // its pool is full: no leader may put more slots in use
        }
        self.unindex(id);
        self.hold_slots(id);
        self.next_fencing_token += 1;
        let token = self.next_fencing_token;
        let now = self.clock_ms;
        let t = self.tasks.get_mut(&id).expect("checked");
        let attempt = t.attempts.len() as u32 + 1;
        t.attempts.push(Attempt {
            number: attempt,
            worker,
            fencing_token: token,
            started_at_ms: now,
            ended_at_ms: None,
            outcome: None,
            output_tail: String::new(),
            worker_name: worker_name.to_string(),
        });
        t.lease = Some(Lease {
            worker,
            fencing_token: token,
            attempt,
            granted_at_ms: now,
        });
        let from = t.state;
        t.state = TaskState::Running;
        let q = t.spec.queue.clone();
        self.tally.moved(&q, Some(from), Some(TaskState::Running));
        self.leased.insert(id);
        Some(LeaseGrant {
            task: id,
            attempt,
            fencing_token: token,
            granted_at_ms: now,
        })
    }

    /// Ends the current attempt (completion or expiry) if `token` is the current lease's.
    fn end_attempt(
        &mut self,
        id: TaskId,
        token: u64,
        outcome: AttemptOutcome,
        output_tail: &str,
        jitter_permille: u32,
    ) -> Result<CommandOutput, CommandError> {
        let now = self.clock_ms;
        let t = self.tasks.get_mut(&id).ok_or(CommandError::NotFound(id))?;
        let current = t.lease.as_ref().map(|l| l.fencing_token);
        if current != Some(token) {
            // A worker retrying a report that was applied already (its reply was lost) gets
            // the same answer again instead of a stale-token error.
            let repeated = t.attempts.last().is_some_and(|a| {
                a.fencing_token == token
                    && report_repeats(a.outcome.as_ref(), &outcome)
                    && a.output_tail == output_tail
            });
            if repeated {
                return Ok(CommandOutput::TaskUpdated { id, state: t.state });
            }
            return Err(task::stale_token(id, token, current));
        }
        let lease = t.lease.take().expect("checked");
        self.leased.remove(&id);
        self.release_slots(id);
        let t = self.tasks.get_mut(&id).expect("exists");
        let attempt = t.attempts.last_mut().expect("a lease has an attempt");
        assert_eq!(
            attempt.fencing_token, lease.fencing_token,
            "the lease is the last attempt's"
        );
        let cancelled = t.state == TaskState::Cancelled;
        attempt.ended_at_ms = Some(now);
        attempt.output_tail = output_tail.to_string();
        attempt.outcome = Some(if cancelled && !outcome.is_success() {
            AttemptOutcome::Cancelled
        } else {
            outcome.clone()
        });
        if cancelled {
            // Already final (and in `finished`) since the cancel.
            return Ok(CommandOutput::TaskUpdated {
                id,
                state: TaskState::Cancelled,
            });
        }
        if outcome.is_success() {
            self.finish(id, TaskState::Succeeded);
            return Ok(CommandOutput::TaskUpdated {
                id,
                state: TaskState::Succeeded,
            });
        }
        let t = self.tasks.get_mut(&id).expect("exists");
        let used = t.attempts_used();
        if used >= t.spec.retry.max_attempts {
            self.finish(id, TaskState::Dead);
            return Ok(CommandOutput::TaskUpdated {
                id,
                state: TaskState::Dead,
            });
        }
        t.state = TaskState::Failed;
        t.ready_at_ms = now + t.spec.retry.delay_ms(used + 1, jitter_permille);
        let q = t.spec.queue.clone();
        self.tally
            .moved(&q, Some(TaskState::Running), Some(TaskState::Failed));
        self.schedule(id);
        Ok(CommandOutput::TaskUpdated {
            id,
            state: TaskState::Failed,
        })
    }

    fn finish(&mut self, id: TaskId, state: TaskState) {
        let now = self.clock_ms;
        let t = self.tasks.get_mut(&id).expect("exists");
        let from = t.state;
        t.state = state;
        t.finished_at_ms = Some(now);
        let q = t.spec.queue.clone();
        self.tally.moved(&q, Some(from), Some(state));
        self.finished.insert((now, id));
        self.run_ended(id);
        self.node_ended(id, state);
    }

    fn remember_request(&mut self, request_id: RequestId, id: TaskId) {
        self.requests.insert(request_id, id);
        self.request_order.push_back(request_id);
        while self.request_order.len() > REQUEST_DEDUP_CAPACITY {
            let oldest = self.request_order.pop_front().expect("non-empty");
            self.requests.remove(&oldest);
        }
    }

    /// The ready tasks a worker serving `queues` would get next if leases were granted at
    /// `now_ms`, at most `max`: higher priority first, FIFO within a priority, across the
    /// queues. Waiting tasks whose time has come by `now_ms` count too, in the order their
    /// promotion will give them. Tasks whose pool is full are passed over. Read-only: the
    /// leader proposes the result as [`Command::GrantLeasesTo`] in a request stamped `now_ms`.
    pub fn pick_ready(&self, queues: &[String], max: usize, now_ms: u64) -> Vec<TaskId> {
        self.picker(&BTreeMap::new()).pick(queues, max, now_ms)
    }

    /// Whether the leader holds `id` back at `now_ms` ([`Task::requeue_hold_until_ms`]).
    fn held(&self, id: TaskId, now_ms: u64) -> bool {
        self.tasks[&id]
            .requeue_hold_until_ms()
            .is_some_and(|until| now_ms.max(self.clock_ms) < until)
    }

    /// A [`Picker`] for several lease requests at once, with per-queue limits on running
    /// tasks (`[queues.NAME] max_running` in the leader's config).
    pub fn picker<'a>(&'a self, queue_limits: &'a BTreeMap<String, u32>) -> Picker<'a> {
        let mut queue_running = BTreeMap::new();
        if !queue_limits.is_empty() {
            for (t, _) in self.leases() {
                if t.state == TaskState::Running && queue_limits.contains_key(&t.spec.queue) {
                    *queue_running.entry(t.spec.queue.clone()).or_insert(0u32) += 1;
                }
            }
        }
        Picker {
            state: self,
            budget: Budget {
                taken: BTreeSet::new(),
                pool_used: self
                    .pools
                    .sizes()
                    .map(|(n, p)| (n.clone(), p.used))
                    .collect(),
                queue_running,
            },
            queue_limits,
        }
    }

    /// Tasks holding a lease, with their leases (for the leader's lease tracking).    /// Tasks holding a lease, with their leases (for the leader's lease tracking).
    pub fn leases(&self) -> impl Iterator<Item = (&Task, &Lease)> {
        self.leased.iter().map(|id| {
            let t: &Task = &self.tasks[id];
            (t, t.lease.as_ref().expect("leased tasks hold a lease"))
        })
    }

    /// When the earliest retained final task finished, if any.
    pub fn oldest_finished_ms(&self) -> Option<u64> {
        self.finished.first().map(|(at, _)| *at)
    }

    /// Every retained task, by id.
    pub fn all_tasks(&self) -> impl Iterator<Item = &Task> {
        self.tasks.values().map(|t| &**t)
    }

    pub fn task(&self, id: TaskId) -> Option<&Task> {
        self.tasks.get(&id).map(|t| &**t)
    }

    pub fn tasks(&self, filter: &TaskFilter) -> Vec<Task> {
        let start = filter.after.map(|a| a.0.saturating_add(1)).unwrap_or(0);
        self.tasks
            .range(TaskId(start)..)
            .map(|(_, t)| &**t)
            .filter(|t| filter.state.is_none_or(|s| t.state == s))
            .filter(|t| filter.queue.as_ref().is_none_or(|q| &t.spec.queue == q))
            .take(filter.limit)
            .cloned()
            .collect()
    }

    pub fn task_count(&self) -> usize {
        self.tasks.len()
    }

    /// Counts per queue, from the tally kept as tasks move: O(queues).
    pub fn queue_stats(&self) -> BTreeMap<String, QueueStats> {
        use tally::index;
        self.tally
            .queues
            .iter()
            .map(|(q, t)| {
                let ready = self.ready.get(q).map_or(0, |r| r.len() as u64);
                let n = |s: TaskState| t.by_state[index(s)];
                let stats = QueueStats {
                    ready,
                    delayed: n(TaskState::Queued) - (ready - t.ready_failed),
                    running: n(TaskState::Running),
                    failed: n(TaskState::Failed) - t.ready_failed,
                    dead: n(TaskState::Dead),
                    succeeded: n(TaskState::Succeeded),
                    cancelled: n(TaskState::Cancelled),
                    oldest_ready_since_ms: t.ready_since.keys().next().copied(),
                };
                (q.clone(), stats)
            })
            .collect()
    }

    /// Rebuilds the derived per-queue counts from the tasks and the ready index (after
    /// decoding a state: they are not encoded).
    pub fn rebuild_tally(&mut self) {
        let mut tally = tally::Tally::default();
        for t in self.tasks.values() {
            tally.moved(&t.spec.queue, None, Some(t.state));
        }
        for keys in self.ready.values() {
            for (_, _, id) in keys {
                let t = &self.tasks[id];
                tally.ready(&t.spec.queue, t.state, t.ready_at_ms, true);
            }
        }
        self.tally = tally;
    }

    /// Counts per queue by a scan of the retained tasks: what the tally must always equal.
    #[cfg(test)]
    pub fn queue_stats_scan(&self) -> BTreeMap<String, QueueStats> {
        let mut out: BTreeMap<String, QueueStats> = BTreeMap::new();
        for t in self.tasks.values() {
            let s = out.entry(t.spec.queue.clone()).or_default();
            let ready_now = matches!(t.state, TaskState::Queued | TaskState::Failed)
                && t.ready_at_ms <= self.clock_ms;
            match t.state {
                TaskState::Queued | TaskState::Failed if ready_now => {
                    s.ready += 1;
                    s.oldest_ready_since_ms = Some(
                        s.oldest_ready_since_ms
                            .map_or(t.ready_at_ms, |o| o.min(t.ready_at_ms)),
                    );
                }
                TaskState::Queued => s.delayed += 1,
                TaskState::Failed => s.failed += 1,
                TaskState::Running => s.running += 1,
                TaskState::Dead => s.dead += 1,
                TaskState::Succeeded => s.succeeded += 1,
                TaskState::Cancelled => s.cancelled += 1,
            }
        }
        out
    }
}

/// Picks tasks for several lease requests against one state, so that together they respect
/// the pools and the per-queue limits (each pick counts against the ones after it).
pub struct Picker<'a> {
    state: &'a State,
    budget: Budget,
    queue_limits: &'a BTreeMap<String, u32>,
}

#[derive(Clone)]
struct Budget {
    taken: BTreeSet<TaskId>,
    pool_used: BTreeMap<String, u32>,
    queue_running: BTreeMap<String, u32>,
}

impl Picker<'_> {
    /// Whether `id` may be picked with `budget`; if so, counts it.
    fn take(&self, budget: &mut Budget, id: TaskId) -> bool {
        if budget.taken.contains(&id) {
            return false;
        }
        let t = &self.state.tasks[&id];
        let queue_full = self.queue_limits.get(&t.spec.queue).is_some_and(|max| {
            budget
                .queue_running
                .get(&t.spec.queue)
                .copied()
                .unwrap_or(0)
                >= *max
        });
        if queue_full {
            return false;
        }
        let pools = &self.state.pools;
        if !pools.fits(id, |p| budget.pool_used.get(p).copied().unwrap_or(0)) {
            return false;
        }
        if let Some(c) = pools.claim(id) {
            *budget.pool_used.entry(c.pool.clone()).or_default() += c.slots;
        }
        if self.queue_limits.contains_key(&t.spec.queue) {
            *budget
                .queue_running
                .entry(t.spec.queue.clone())
                .or_default() += 1;
        }
        budget.taken.insert(id);
        true
    }

    /// The next at most `max` tasks for a worker serving `queues` (see [`State::pick_ready`]).
    pub fn pick(&mut self, queues: &[String], max: usize, now_ms: u64) -> Vec<TaskId> {
        let s = self.state;
        let mut candidates: Vec<ReadyKey> = Vec::new();
        // Per queue, the first `max` tasks that would fit if only that queue were picked from.
        for q in queues {
            let Some(set) = s.ready.get(q) else { continue };
            let mut trial = self.budget.clone();
            let mut found = 0;
            for key in set.iter().take(MAX_PICK_SCAN) {
                if found >= max {
                    break;
                }
                if !s.held(key.2, now_ms) && self.take(&mut trial, key.2) {
                    candidates.push(*key);
                    found += 1;
                }
            }
        }
        // Promotion assigns sequence numbers after every ready task, in waiting order.
        let mut seq = s.next_seq;
        let mut trial = self.budget.clone();
        for &(_, id) in s
            .waiting
            .iter()
            .take_while(|(at, _)| *at <= now_ms.max(s.clock_ms))
            .take(MAX_PICK_SCAN)
        {
            seq += 1;
            let t = &s.tasks[&id];
            if queues.contains(&t.spec.queue) && !s.held(id, now_ms) && self.take(&mut trial, id) {
                candidates.push((Reverse(t.spec.priority), seq, id));
            }
        }
        candidates.sort_unstable();
        let mut budget = std::mem::replace(
            &mut self.budget,
            Budget {
                taken: BTreeSet::new(),
                pool_used: BTreeMap::new(),
                queue_running: BTreeMap::new(),
            },
        );
        let mut out = Vec::new();
        for k in candidates {
            if out.len() >= max {
                break;
            }
            if self.take(&mut budget, k.2) {
                out.push(k.2);
            }
        }
        self.budget = budget;
        out
    }
}

/// What the state tests of several modules share.
#[cfg(test)]
pub(crate) mod testing {
    /// A worker's report for `task` under `token`: success or a failed exit, at random.
    pub fn random_report(
        rng: &mut impl rand::Rng,
        task: super::TaskId,
        token: u64,
    ) -> super::Command {
        super::Command::Complete {
            task,
            fencing_token: token,
            outcome: if rng.random_bool(0.5) {
                super::AttemptOutcome::Succeeded
            } else {
                super::AttemptOutcome::Failed {
                    exit_code: Some(1),
                    signal: None,
                    error: None,
                }
            },
            output_tail: String::new(),
            retry_jitter_permille: 0,
        }
    }

    use super::*;

    /// A state machine driven with an explicit leader clock, one command per entry.
    #[derive(Default)]
    pub struct Applier {
        pub state: State,
        pub index: u64,
    }

    impl Applier {
        pub fn one(
            &mut self,
            now_ms: u64,
            command: Command,
        ) -> Result<CommandOutput, CommandError> {
            self.index += 1;
            self.state
                .apply(
                    self.index,
                    &Request {
                        proposed_at_ms: now_ms,
                        commands: vec![command],
                    },
                )
                .results
                .pop()
                .expect("one result per command")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W1: WorkerId = WorkerId(1);
    const W2: WorkerId = WorkerId(2);

    /// How long one `queue_stats` scan takes with many retained tasks (the metrics sampler runs
    /// one per interval on the leader, under the state machine's read lock). Run with
    /// `cargo test --release --lib -- --ignored queue_stats_cost --nocapture`.
    #[test]
    #[ignore]
    fn queue_stats_cost() {
        let mut sm = Sm::new();
        let n = 1_000_000u128;
        for batch in 0..(n / 1000) {
            let cmds = (0..1000)
                .map(|i| {
                    let mut sp = spec(&["true"]);
                    sp.queue = format!("q{}", (batch * 1000 + i) % 8);
                    Command::SubmitTask {
                        request_id: RequestId(batch * 1000 + i + 1),
                        spec: sp,
                    }
                })
                .collect();
            sm.at(1_000, cmds);
        }
        let started = std::time::Instant::now();
        let stats = sm.state.queue_stats();
        let took = started.elapsed();
        assert_eq!(stats.values().map(|s| s.ready).sum::<u64>(), n as u64);
        eprintln!("queue_stats over {n} tasks in 8 queues: {took:?}");
        let started = std::time::Instant::now();
        assert_eq!(sm.state.queue_stats_scan(), stats);
        eprintln!("the same by a scan of the tasks: {:?}", started.elapsed());
    }

    /// What a queued task of a typical size costs in memory (resident anonymous bytes, from
    /// /proc/self/statm) and in a snapshot:
    /// `cargo test --release --lib -- --ignored state_memory_per_queued_task --nocapture`.
    #[test]
    #[ignore]
    fn state_memory_per_queued_task() {
        fn resident() -> u64 {
            let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
            let f: Vec<u64> = statm
                .split_whitespace()
                .map(|v| v.parse().unwrap())
                .collect();
            (f[1] - f[2]) * 4096
        }
        let n = 200_000u128;
        let mut sm = Sm::new();
        let before = resident();
        let mut submitted = 0usize;
        for batch in 0..(n / 1000) {
            let cmds = (0..1000)
                .map(|i| {
                    let p = (batch * 1000 + i).to_string();
                    let args = [
                        "python3",
                        "/srv/etl/load_partition.py",
                        "--date",
                        "2026-12-01",
                        "--partition",
                        &p,
                    ];
                    submitted += args.iter().map(|a| a.len()).sum::<usize>() + "parked".len();
                    let mut sp = spec(&args);
                    sp.queue = "parked".into();
                    Command::SubmitTask {
                        request_id: RequestId(batch * 1000 + i + 1),
                        spec: sp,
                    }
                })
                .collect();
            sm.at(1_000, cmds);
        }
        let after = resident();
        let encoded = bincode::serde::encode_to_vec(&sm.state, bincode::config::standard())
            .unwrap()
            .len();
        eprintln!(
            "size_of Task {} TaskSpec {} Attempt {} Lease {}",
            std::mem::size_of::<Task>(),
            std::mem::size_of::<TaskSpec>(),
            std::mem::size_of::<Attempt>(),
            std::mem::size_of::<Lease>()
        );
        eprintln!(
            "{n} queued tasks: {} resident bytes per task; {} snapshot bytes per task; {} bytes \
             of command and queue per task",
            (after - before) / n as u64,
            encoded / n as usize,
            submitted / n as usize
        );
    }

    /// The per-queue tally always equals a scan of the tasks, through random operations and
    /// snapshot round trips. Seeded: FLEET_TEST_SEED=N reruns one sequence.
    #[test]
    fn random_operations_keep_the_tally_and_replay_identically() {
        use rand::{Rng, SeedableRng};
        let seed: u64 = std::env::var("FLEET_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(rand::random);
        eprintln!("seed {seed} (rerun with FLEET_TEST_SEED={seed})");
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut sm = Sm::new();
        let mut now = 1_000u64;
        let mut rid = 0u128;
        // Every entry applied, with its output, and a snapshot taken midway: replaying the log
        // from scratch, or from the snapshot, must give the same outputs and the same state.
        let mut log: Vec<(u64, Command, Result<CommandOutput, CommandError>)> = Vec::new();
        let mut midway: Option<(usize, Vec<u8>)> = None;
        for step in 0..3_000 {
            now += rng.random_range(0..50);
            let ids: Vec<TaskId> = sm.state.tasks.keys().copied().collect();
            let pick = |rng: &mut rand::rngs::StdRng| ids[rng.random_range(0..ids.len())];
            let cmd = match rng.random_range(0..10) {
                0..=2 => {
                    rid += 1;
                    let mut sp = spec(&["true"]);
                    sp.queue = format!("q{}", rng.random_range(0..3));
                    sp.priority = rng.random_range(-1..=1);
                    sp.retry.max_attempts = rng.random_range(1..=3);
                    sp.retry.backoff_initial_ms = rng.random_range(0..100);
                    if rng.random_bool(0.2) {
                        sp.not_before_ms = Some(now + rng.random_range(0..300));
                    }
                    Command::SubmitTask {
                        request_id: RequestId(rid),
                        spec: sp,
                    }
                }
                3 | 4 if !ids.is_empty() => Command::GrantLeases {
                    worker: task::WorkerId(1),
                    tasks: (0..3).map(|_| pick(&mut rng)).collect(),
                },
                5 | 6 if !ids.is_empty() => {
                    let id = pick(&mut rng);
                    let token = sm.state.tasks[&id]
                        .lease
                        .as_ref()
                        .map_or(0, |l| l.fencing_token);
                    if rng.random_bool(0.8) {
                        testing::random_report(&mut rng, id, token)
                    } else {
                        Command::ExpireLease {
                            task: id,
                            fencing_token: token,
                            reason: "test".into(),
                            retry_jitter_permille: 0,
                        }
                    }
                }
                7 if !ids.is_empty() => Command::Cancel {
                    task: pick(&mut rng),
                },
                8 if !ids.is_empty() => Command::Retry {
                    task: pick(&mut rng),
                },
                _ => Command::PurgeFinished {
                    finished_before_ms: now.saturating_sub(200),
                    max: 10,
                },
            };
            let out = sm.one(now, cmd.clone());
            log.push((now, cmd, out));
            assert_eq!(
                sm.state.queue_stats(),
                sm.state.queue_stats_scan(),
                "seed {seed}, step {step}"
            );
            if step % 500 == 0 {
                let bytes = crate::raft::state_machine_store::encode_state(&sm.state).unwrap();
                let back = crate::raft::state_machine_store::decode_state("test", &bytes).unwrap();
                assert_eq!(back, sm.state, "seed {seed}, step {step}: round trip");
                if step == 1_500 {
                    midway = Some((log.len(), bytes));
                }
            }
        }
        let mut replay = Sm::new();
        for (i, (at, cmd, out)) in log.iter().enumerate() {
            assert_eq!(
                &replay.one(*at, cmd.clone()),
                out,
                "seed {seed}: replayed entry {i}"
            );
        }
        assert_eq!(replay.state, sm.state, "seed {seed}: a replay of the log");
        let (from, bytes) = midway.expect("a snapshot midway");
        let mut restored = Sm {
            state: crate::raft::state_machine_store::decode_state("test", &bytes).unwrap(),
            index: from as u64,
        };
        for (at, cmd, out) in &log[from..] {
            assert_eq!(
                &restored.one(*at, cmd.clone()),
                out,
                "seed {seed}: after the snapshot"
            );
        }
        assert_eq!(
            restored.state, sm.state,
            "seed {seed}: snapshot plus the rest of the log"
        );
    }

    fn spec(cmd: &[&str]) -> TaskSpec {
        TaskSpec::new(cmd.iter().map(|s| s.to_string()).collect(), DEFAULT_QUEUE)
    }

    fn submit(rid: u128, cmd: &[&str]) -> Command {
        Command::SubmitTask {
            request_id: RequestId(rid),
            spec: spec(cmd),
        }
    }

    /// A state machine driven with an explicit leader clock.
    struct Sm {
        state: State,
        index: u64,
    }

    impl Sm {
        fn new() -> Sm {
            Sm {
                state: State::default(),
                index: 0,
            }
        }
        fn at(
            &mut self,
            now_ms: u64,
            commands: Vec<Command>,
        ) -> Vec<Result<CommandOutput, CommandError>> {
            self.index += 1;
            self.state
                .apply(
                    self.index,
                    &Request {
                        proposed_at_ms: now_ms,
                        commands,
                    },
                )
                .results
        }
        fn one(&mut self, now_ms: u64, command: Command) -> Result<CommandOutput, CommandError> {
            self.at(now_ms, vec![command]).pop().unwrap()
        }
        fn submit_spec(&mut self, now_ms: u64, rid: u128, spec: TaskSpec) -> TaskId {
            match self.one(
                now_ms,
                Command::SubmitTask {
                    request_id: RequestId(rid),
                    spec,
                },
            ) {
                Ok(CommandOutput::TaskSubmitted { id, .. }) => id,
                other => panic!("{other:?}"),
            }
        }
        fn grant(&mut self, now_ms: u64, worker: WorkerId, max: usize) -> Vec<LeaseGrant> {
            let picks = self
                .state
                .pick_ready(&[DEFAULT_QUEUE.to_string()], max, now_ms);
            match self.one(
                now_ms,
                Command::GrantLeases {
                    worker,
                    tasks: picks,
                },
            ) {
                Ok(CommandOutput::LeasesGranted { grants }) => grants,
                other => panic!("{other:?}"),
            }
        }
        fn complete(
            &mut self,
            now_ms: u64,
            g: &LeaseGrant,
            outcome: AttemptOutcome,
        ) -> Result<CommandOutput, CommandError> {
            self.one(
                now_ms,
                Command::Complete {
                    task: g.task,
                    fencing_token: g.fencing_token,
                    outcome,
                    output_tail: "out".into(),
                    retry_jitter_permille: 500,
                },
            )
        }
        fn task(&self, id: TaskId) -> &Task {
            self.state.task(id).unwrap()
        }
    }

    fn failed() -> AttemptOutcome {
        AttemptOutcome::Failed {
            exit_code: Some(1),
            signal: None,
            error: None,
        }
    }

    #[test]
    fn submit_assigns_sequential_ids_and_stamps_leader_time() {
        let mut sm = Sm::new();
        let r = sm.at(
            1_000,
            vec![submit(1, &["echo", "a"]), submit(2, &["echo", "b"])],
        );
        assert_eq!(
            r,
            vec![
                Ok(CommandOutput::TaskSubmitted {
                    id: TaskId(1),
                    duplicate: false
                }),
                Ok(CommandOutput::TaskSubmitted {
                    id: TaskId(2),
                    duplicate: false
                }),
            ]
        );
        let t = sm.task(TaskId(2));
        assert_eq!(
            (t.submitted_at_ms, t.created_index, t.state),
            (1_000, 1, TaskState::Queued)
        );
    }

    #[test]
    fn retried_request_id_returns_first_result() {
        let mut sm = Sm::new();
        sm.one(1, submit(9, &["true"])).unwrap();
        let r = sm.one(2, submit(9, &["true"]));
        assert_eq!(
            r,
            Ok(CommandOutput::TaskSubmitted {
                id: TaskId(1),
                duplicate: true
            })
        );
        assert_eq!(sm.state.task_count(), 1);
    }

    #[test]
    fn invalid_commands_are_rejected_without_consuming_ids() {
        let mut sm = Sm::new();
        let r = sm.at(1, vec![submit(1, &[]), submit(2, &["ok"])]);
        assert!(matches!(r[0], Err(CommandError::Invalid(_))));
        assert_eq!(
            r[1],
            Ok(CommandOutput::TaskSubmitted {
                id: TaskId(1),
                duplicate: false
            })
        );
        let mut bad = spec(&["x"]);
        bad.queue = "no spaces".into();
        let Err(CommandError::Invalid(msg)) = sm.one(
            2,
            Command::SubmitTask {
                request_id: RequestId(3),
                spec: bad,
            },
        ) else {
            panic!()
        };
        assert!(msg.contains("\"no spaces\""), "{msg}");
        let mut bad = spec(&["x"]);
        bad.env = vec![("FLEET_TASK_ID".into(), "1".into())];
        let r = sm.one(
            3,
            Command::SubmitTask {
                request_id: RequestId(4),
                spec: bad,
            },
        );
        assert!(r.unwrap_err().to_string().contains("reserved"));
    }

    #[test]
    fn request_dedup_table_is_bounded() {
        let mut s = State::default();
        for i in 0..(REQUEST_DEDUP_CAPACITY as u128 + 10) {
            s.apply(
                1,
                &Request {
                    proposed_at_ms: 1,
                    commands: vec![submit(i, &["true"])],
                },
            );
        }
        assert_eq!(s.requests.len(), REQUEST_DEDUP_CAPACITY);
        assert_eq!(s.request_order.len(), REQUEST_DEDUP_CAPACITY);
        assert!(!s.requests.contains_key(&RequestId(0)));
    }

    #[test]
    fn grant_leases_a_task_to_one_worker_with_growing_fencing_tokens() {
        let mut sm = Sm::new();
        sm.one(10, submit(1, &["true"])).unwrap();
        sm.one(10, submit(2, &["true"])).unwrap();
        let g1 = sm.grant(20, W1, 1);
        assert_eq!(g1.len(), 1);
        assert_eq!(
            (g1[0].task, g1[0].attempt, g1[0].granted_at_ms),
            (TaskId(1), 1, 20)
        );
        // The same decision applied again (a stale or duplicated grant) grants nothing.
        let again = sm.one(
            21,
            Command::GrantLeases {
                worker: W2,
                tasks: vec![TaskId(1)],
            },
        );
        assert_eq!(again, Ok(CommandOutput::LeasesGranted { grants: vec![] }));
        let g2 = sm.grant(22, W2, 5);
        assert_eq!(g2.len(), 1);
        assert!(g2[0].fencing_token > g1[0].fencing_token);
        let t = sm.task(TaskId(1));
        assert_eq!(t.state, TaskState::Running);
        assert_eq!(t.lease.as_ref().unwrap().worker, W1);
        assert!(sm
            .state
            .pick_ready(&[DEFAULT_QUEUE.into()], 10, 22)
            .is_empty());
    }

    /// The simulator's bug switches change what they say (and nothing when off).
    #[test]
    fn the_bug_switches_reintroduce_their_bugs() {
        let expire = |token| Command::ExpireLease {
            task: TaskId(1),
            fencing_token: token,
            reason: "stale".into(),
            retry_jitter_permille: 0,
        };
        for bug in [false, true] {
            let mut sm = Sm::new();
            sm.state.set_bugs(Bugs {
                expire_ignores_token: bug,
                grant_skips_recheck: bug,
            });
            sm.one(1_000, submit(1, &["true"])).unwrap();
            let token = sm.grant(1_000, W1, 1)[0].fencing_token;
            // A stale expiry: rejected, unless the bug ends the live lease with it.
            assert_eq!(sm.one(1_001, expire(token + 7)).is_ok(), bug);
            // A grant of a task that is not ready: skipped, unless the bug grants it again.
            let granted = sm.one(
                1_002,
                Command::GrantLeases {
                    worker: W2,
                    tasks: vec![TaskId(1)],
                },
            );
            let again = matches!(granted, Ok(CommandOutput::LeasesGranted { grants }) if !grants.is_empty());
            assert_eq!(again, bug, "{bug}");
        }
    }

    #[test]
    fn success_is_final_and_a_second_completion_is_rejected() {
        let mut sm = Sm::new();
        let id = sm.submit_spec(1, 1, spec(&["true"]));
        let g = sm.grant(2, W1, 1).remove(0);
        assert_eq!(sm.state.leases().count(), 1);
        assert_eq!(
            sm.complete(3, &g, AttemptOutcome::Succeeded),
            Ok(CommandOutput::TaskUpdated {
                id,
                state: TaskState::Succeeded
            })
        );
        let t = sm.task(id);
        assert_eq!(t.finished_at_ms, Some(3));
        assert_eq!(t.attempts[0].outcome, Some(AttemptOutcome::Succeeded));
        assert_eq!(t.attempts[0].output_tail, "out");
        assert_eq!(
            sm.state.leases().count(),
            0,
            "the lease index follows the lease"
        );
        // A worker retrying the same report (its reply was lost) gets the same answer...
        let again = sm.complete(4, &g, AttemptOutcome::Succeeded);
        assert_eq!(
            again,
            Ok(CommandOutput::TaskUpdated {
                id,
                state: TaskState::Succeeded
            })
        );
        assert_eq!(sm.task(id).attempts.len(), 1);
        // ...but a different report for the ended attempt is a stale one.
        let other = sm.complete(4, &g, failed());
        assert_eq!(
            other,
            Err(CommandError::StaleToken {
                task: id,
                given: g.fencing_token,
                current: None
            })
        );
    }

    #[test]
    fn a_requeue_holds_the_task_back_and_a_stale_one_changes_nothing() {
        let mut sm = Sm::new();
        let mut s = spec(&["true"]);
        s.retry.backoff_initial_ms = 100;
        s.visibility_timeout_ms = 5_000;
        let id = sm.submit_spec(1, 1, s);
        let first = sm.grant(10, W1, 1).remove(0);
        let requeue = |token| Command::expire(id, token, REQUEUE_REASON.into(), 1000);
        assert_eq!(
            sm.one(1_000, requeue(first.fencing_token)),
            Ok(CommandOutput::TaskUpdated {
                id,
                state: TaskState::Failed
            })
        );
        assert_eq!(sm.task(id).requeue_hold_until_ms(), Some(6_000));
        // The backoff (100 ms) has passed, but the old attempt may still run until the
        // worker's next heartbeat or its lease's lapse: the leader does not pick the task.
        assert!(sm
            .state
            .pick_ready(&[DEFAULT_QUEUE.into()], 10, 5_999)
            .is_empty());
        assert!(sm.grant(5_999, W2, 1).is_empty());
        let second = sm.grant(6_000, W2, 1).remove(0);
        assert_eq!(second.attempt, 2);
        // The first attempt's token again (a stale or repeated requeue): refused, and the
        // running attempt keeps its lease.
        assert_eq!(
            sm.one(7_000, requeue(first.fencing_token)),
            Err(CommandError::StaleToken {
                task: id,
                given: first.fencing_token,
                current: Some(second.fencing_token)
            })
        );
        assert_eq!(
            sm.task(id).lease.as_ref().map(|l| l.fencing_token),
            Some(second.fencing_token)
        );
        assert_eq!(sm.task(id).requeue_hold_until_ms(), None);
    }

    #[test]
    fn expiry_makes_the_task_visible_again_and_fences_the_old_worker() {
        let mut sm = Sm::new();
        let mut s = spec(&["true"]);
        s.retry.backoff_initial_ms = 100;
        let id = sm.submit_spec(1, 1, s);
        let old = sm.grant(10, W1, 1).remove(0);
        let r = sm.one(
            40_000,
            Command::ExpireLease {
                task: id,
                fencing_token: old.fencing_token,
                reason: "no heartbeat".into(),
                retry_jitter_permille: 1000,
            },
        );
        assert_eq!(
            r,
            Ok(CommandOutput::TaskUpdated {
                id,
                state: TaskState::Failed
            })
        );
        assert_eq!(
            sm.task(id).attempts[0].outcome,
            Some(AttemptOutcome::Lost {
                reason: "no heartbeat".into()
            })
        );
        // Not ready before the backoff (100 ms, jitter 1000 => the full delay).
        assert!(sm.grant(40_099, W2, 1).is_empty());
        let new = sm.grant(40_100, W2, 1).remove(0);
        assert_eq!(new.attempt, 2);
        // The stale worker's late completion is rejected with the current token named.
        let late = sm.complete(40_200, &old, AttemptOutcome::Succeeded);
        assert_eq!(
            late,
            Err(CommandError::StaleToken {
                task: id,
                given: old.fencing_token,
                current: Some(new.fencing_token)
            })
        );
        assert_eq!(
            sm.complete(40_300, &new, AttemptOutcome::Succeeded)
                .unwrap(),
            CommandOutput::TaskUpdated {
                id,
                state: TaskState::Succeeded
            }
        );
        let successes = sm
            .task(id)
            .attempts
            .iter()
            .filter(|a| a.outcome == Some(AttemptOutcome::Succeeded))
            .count();
        assert_eq!(successes, 1);
    }

    #[test]
    fn failures_back_off_with_jitter_then_go_dead_and_retry_revives() {
        let mut sm = Sm::new();
        let mut s = spec(&["false"]);
        s.retry = RetryPolicy {
            max_attempts: 3,
            backoff_initial_ms: 1_000,
            backoff_max_ms: 10_000,
            backoff_multiplier_permille: 2_000,
        };
        let id = sm.submit_spec(0, 1, s);
        let mut now = 0;
        for attempt in 1..=3u32 {
            let g = sm
                .grant(now, W1, 1)
                .pop()
                .unwrap_or_else(|| panic!("attempt {attempt} not granted at {now}"));
            assert_eq!(g.attempt, attempt);
            let r = sm.complete(now + 5, &g, failed()).unwrap();
            if attempt < 3 {
                assert_eq!(
                    r,
                    CommandOutput::TaskUpdated {
                        id,
                        state: TaskState::Failed
                    }
                );
                // Jitter 500 per mille: 3/4 of the base delay (1 s, then 2 s).
                let expected = [750, 1_500][attempt as usize - 1];
                assert_eq!(sm.task(id).ready_at_ms, now + 5 + expected);
                now = sm.task(id).ready_at_ms;
            } else {
                assert_eq!(
                    r,
                    CommandOutput::TaskUpdated {
                        id,
                        state: TaskState::Dead
                    }
                );
            }
        }
        assert!(
            sm.grant(now + 1_000_000, W1, 1).is_empty(),
            "dead tasks are not leased"
        );
        assert_eq!(
            sm.one(now + 1_000_001, Command::Retry { task: id }),
            Ok(CommandOutput::TaskUpdated {
                id,
                state: TaskState::Queued
            })
        );
        let g = sm.grant(now + 1_000_002, W1, 1).remove(0);
        assert_eq!(g.attempt, 4, "attempt numbers keep counting");
        assert_eq!(sm.task(id).attempts_used(), 1, "a fresh budget after retry");
        let r = sm.one(now + 1_000_003, Command::Retry { task: id });
        assert!(matches!(
            r,
            Err(CommandError::WrongState {
                state: TaskState::Running,
                ..
            })
        ));
    }

    #[test]
    fn execution_timeout_counts_as_a_failed_attempt() {
        let mut sm = Sm::new();
        let mut s = spec(&["sleep", "600"]);
        s.retry.max_attempts = 1;
        let id = sm.submit_spec(0, 1, s);
        let g = sm.grant(1, W1, 1).remove(0);
        assert_eq!(
            sm.complete(2, &g, AttemptOutcome::TimedOut).unwrap(),
            CommandOutput::TaskUpdated {
                id,
                state: TaskState::Dead
            }
        );
        assert_eq!(
            sm.task(id).attempts[0].outcome,
            Some(AttemptOutcome::TimedOut)
        );
    }

    #[test]
    fn cancel_queued_running_and_finished_tasks() {
        let mut sm = Sm::new();
        let a = sm.submit_spec(0, 1, spec(&["a"]));
        let b = sm.submit_spec(0, 2, spec(&["b"]));
        assert_eq!(
            sm.one(1, Command::Cancel { task: a }),
            Ok(CommandOutput::TaskUpdated {
                id: a,
                state: TaskState::Cancelled
            })
        );
        let g = sm.grant(2, W1, 5);
        assert_eq!(g.len(), 1, "a cancelled task is not leased");
        assert_eq!(g[0].task, b);
        sm.one(3, Command::Cancel { task: b }).unwrap();
        assert_eq!(sm.task(b).state, TaskState::Cancelled);
        assert!(
            sm.task(b).lease.is_some(),
            "the worker learns at its next heartbeat"
        );
        // The worker's report ends the attempt as cancelled; the task stays cancelled.
        sm.complete(4, &g[0], failed()).unwrap();
        assert_eq!(sm.task(b).state, TaskState::Cancelled);
        assert_eq!(
            sm.task(b).attempts[0].outcome,
            Some(AttemptOutcome::Cancelled)
        );
        let r = sm.one(5, Command::Cancel { task: b });
        assert!(matches!(
            r,
            Err(CommandError::WrongState {
                state: TaskState::Cancelled,
                ..
            })
        ));
        assert_eq!(
            sm.one(5, Command::Cancel { task: TaskId(99) }),
            Err(CommandError::NotFound(TaskId(99)))
        );
    }

    #[test]
    fn priority_first_then_fifo_across_queues() {
        let mut sm = Sm::new();
        let mut ids = Vec::new();
        for (i, (prio, queue)) in [(0, "a"), (5, "b"), (0, "b"), (5, "a"), (-1, "a")]
            .iter()
            .enumerate()
        {
            let mut s = spec(&["true"]);
            s.priority = *prio;
            s.queue = queue.to_string();
            ids.push(sm.submit_spec(i as u64, i as u128, s));
        }
        let order = sm.state.pick_ready(&["a".into(), "b".into()], 10, 5);
        assert_eq!(order, vec![ids[1], ids[3], ids[0], ids[2], ids[4]]);
        assert_eq!(
            sm.state.pick_ready(&["a".into()], 2, 5),
            vec![ids[3], ids[0]]
        );
        assert!(sm.state.pick_ready(&["none".into()], 2, 5).is_empty());
    }

    #[test]
    fn delayed_tasks_wait_for_their_time_and_the_clock_never_goes_back() {
        let mut sm = Sm::new();
        let mut s = spec(&["true"]);
        s.not_before_ms = Some(5_000);
        let id = sm.submit_spec(1_000, 1, s);
        assert_eq!(sm.state.queue_stats()[DEFAULT_QUEUE].delayed, 1);
        assert!(sm.grant(4_999, W1, 1).is_empty());
        // A new leader whose clock is behind does not move time backwards.
        sm.at(4_000, vec![]);
        assert_eq!(sm.state.clock_ms(), 4_999);
        assert_eq!(sm.grant(5_000, W1, 1)[0].task, id);
    }

    #[test]
    fn idempotency_key_returns_the_first_task_while_it_is_retained() {
        let mut sm = Sm::new();
        let mut s = spec(&["true"]);
        s.idempotency_key = Some("nightly-2026-11-21".into());
        let first = sm.submit_spec(0, 1, s.clone());
        let r = sm.one(
            1,
            Command::SubmitTask {
                request_id: RequestId(2),
                spec: s.clone(),
            },
        );
        assert_eq!(
            r,
            Ok(CommandOutput::TaskSubmitted {
                id: first,
                duplicate: true
            })
        );
        let g = sm.grant(2, W1, 1).remove(0);
        sm.complete(3, &g, AttemptOutcome::Succeeded).unwrap();
        assert_eq!(
            sm.one(
                10,
                Command::PurgeFinished {
                    finished_before_ms: 3,
                    max: 100
                }
            ),
            Ok(CommandOutput::Purged { count: 1 })
        );
        let again = sm.submit_spec(11, 3, s);
        assert_ne!(again, first, "after retention the key is free again");
    }

    #[test]
    fn retention_purges_only_old_final_tasks_in_bounded_batches() {
        let mut sm = Sm::new();
        for i in 0..5u64 {
            let id = sm.submit_spec(i, i as u128, spec(&["true"]));
            let g = sm.grant(i, W1, 1).remove(0);
            assert_eq!(g.task, id);
            sm.complete(i, &g, AttemptOutcome::Succeeded).unwrap();
        }
        let running = sm.submit_spec(10, 100, spec(&["sleep"]));
        sm.grant(10, W1, 1);
        assert_eq!(
            sm.one(
                20,
                Command::PurgeFinished {
                    finished_before_ms: 2,
                    max: 2
                }
            ),
            Ok(CommandOutput::Purged { count: 2 })
        );
        assert_eq!(
            sm.one(
                20,
                Command::PurgeFinished {
                    finished_before_ms: 2,
                    max: 10
                }
            ),
            Ok(CommandOutput::Purged { count: 1 })
        );
        assert_eq!(
            sm.one(
                20,
                Command::PurgeFinished {
                    finished_before_ms: 100,
                    max: 10
                }
            ),
            Ok(CommandOutput::Purged { count: 2 })
        );
        assert_eq!(sm.state.task_count(), 1);
        assert_eq!(sm.task(running).state, TaskState::Running);
    }

    #[test]
    fn retention_skips_a_cancelled_task_whose_attempt_still_runs() {
        let mut sm = Sm::new();
        // Cancelled at 1 while its attempt runs: finished first, but not purgeable yet.
        let held = sm.submit_spec(0, 1, spec(&["sleep"]));
        let g = sm.grant(0, W1, 1).remove(0);
        sm.one(1, Command::Cancel { task: held }).unwrap();
        let mut later = Vec::new();
        for i in 2..6u64 {
            let id = sm.submit_spec(i, u128::from(i), spec(&["true"]));
            sm.one(i, Command::Cancel { task: id }).unwrap();
            later.push(id);
        }
        assert_eq!(
            sm.one(
                10,
                Command::PurgeFinished {
                    finished_before_ms: 10,
                    max: 3
                }
            ),
            Ok(CommandOutput::Purged { count: 3 }),
            "tasks that finished after the held one are purged"
        );
        assert_eq!(sm.state.task_count(), 2);
        assert_eq!(sm.task(held).state, TaskState::Cancelled);
        // Its attempt ends: now it goes too.
        sm.complete(11, &g, failed()).unwrap();
        assert_eq!(
            sm.one(
                12,
                Command::PurgeFinished {
                    finished_before_ms: 12,
                    max: 10
                }
            ),
            Ok(CommandOutput::Purged { count: 2 })
        );
        assert_eq!(sm.state.task_count(), 0);
    }

    #[test]
    fn list_filters_and_pages() {
        let mut sm = Sm::new();
        for i in 0..10 {
            sm.one(1, submit(i, &["true"])).unwrap();
        }
        let page = sm.state.tasks(&TaskFilter {
            after: Some(TaskId(3)),
            limit: 4,
            ..Default::default()
        });
        let ids: Vec<u64> = page.iter().map(|t| t.id.0).collect();
        assert_eq!(ids, vec![4, 5, 6, 7]);
        let none = sm.state.tasks(&TaskFilter {
            queue: Some("other".into()),
            limit: 100,
            ..Default::default()
        });
        assert!(none.is_empty());
        let running = sm.state.tasks(&TaskFilter {
            state: Some(TaskState::Running),
            limit: 100,
            ..Default::default()
        });
        assert!(running.is_empty());
    }

    #[test]
    fn same_requests_give_same_state_on_every_replica() {
        let mut reqs: Vec<Request> = Vec::new();
        for i in 0..50u64 {
            let mut commands = vec![
                submit(i as u128 % 20, &["echo", "x"]),
                submit(1000 + i as u128, &[]),
            ];
            commands.push(Command::GrantLeases {
                worker: W1,
                tasks: vec![TaskId(i / 2 + 1)],
            });
            commands.push(Command::Complete {
                task: TaskId(i / 3 + 1),
                fencing_token: i / 2,
                outcome: failed(),
                output_tail: String::new(),
                retry_jitter_permille: (i * 37 % 1000) as u32,
            });
            reqs.push(Request {
                proposed_at_ms: i * 100,
                commands,
            });
        }
        let mut a = State::default();
        let mut b = State::default();
        let ra: Vec<_> = reqs
            .iter()
            .enumerate()
            .map(|(i, r)| a.apply(i as u64, r))
            .collect();
        let rb: Vec<_> = reqs
            .iter()
            .enumerate()
            .map(|(i, r)| b.apply(i as u64, r))
            .collect();
        assert_eq!(ra, rb);
        assert_eq!(a, b);
    }
}
