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

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

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

/// What a client asks to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskSpec {
    /// The program and its arguments; `command[0]` is the program.
    pub command: Vec<String>,
    /// The queue the task belongs to.
    pub queue: String,
}

impl TaskSpec {
    /// Checks the spec; the error names the bad value and what would be accepted.
    pub fn validate(&self) -> Result<(), CommandError> {
        if self.command.is_empty() || self.command[0].is_empty() {
            return Err(CommandError::Invalid(
                "the task command is empty: give a program and its arguments after `--`".into(),
            ));
        }
        if self.command.len() > MAX_COMMAND_ARGS {
            return Err(CommandError::Invalid(format!(
                "the task command has {} arguments; at most {MAX_COMMAND_ARGS} are accepted",
                self.command.len()
            )));
        }
        let bytes: usize = self.command.iter().map(|a| a.len()).sum();
        if bytes > MAX_COMMAND_BYTES {
            return Err(CommandError::Invalid(format!(
                "the task command is {bytes} bytes long; at most {MAX_COMMAND_BYTES} are accepted"
            )));
        }
        validate_queue_name(&self.queue)
    }
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

/// Where a task is in its lifecycle. Only `Queued` exists until workers arrive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// Accepted and waiting for a worker.
    Queued,
}

impl TaskState {
    pub fn as_str(&self) -> &'static str {
        match self {
            TaskState::Queued => "queued",
        }
    }
}

impl std::str::FromStr for TaskState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "queued" => Ok(TaskState::Queued),
            other => Err(format!("unknown task state {other:?}; accepted: queued")),
        }
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
}

/// One operation on the state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Record a new task.
    SubmitTask {
        request_id: RequestId,
        spec: TaskSpec,
    },
}

/// What one command produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandOutput {
    /// The task id, new or (for a retried request id) the one recorded the first time.
    TaskSubmitted { id: TaskId, duplicate: bool },
}

/// A deterministic rejection: every replica reaches the same one for the same command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum CommandError {
    #[error("{0}")]
    Invalid(String),
}

/// The Raft log payload: a batch of commands that share one entry (and so one fsync and one
/// replication round), plus what the leader decided for them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// The leader's wall clock when it proposed the batch, in milliseconds since the Unix
    /// epoch. The state machine uses this instead of reading a clock.
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

/// The scheduler state. Cloning it is how a snapshot is taken.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    next_task_id: u64,
    tasks: BTreeMap<TaskId, Task>,
    /// Recent request ids and the task each created, for idempotent retries.
    requests: BTreeMap<RequestId, TaskId>,
    /// The same ids in the order they arrived, to evict the oldest at the bound.
    request_order: VecDeque<RequestId>,
}

impl State {
    /// Applies one committed request at log index `index`. Never fails as a whole: each
    /// command's deterministic rejection is part of the response.
    pub fn apply(&mut self, index: u64, request: &Request) -> Response {
        let results = request
            .commands
            .iter()
            .map(|cmd| self.apply_command(index, request.proposed_at_ms, cmd))
            .collect();
        Response { results }
    }

    fn apply_command(
        &mut self,
        index: u64,
        now_ms: u64,
        cmd: &Command,
    ) -> Result<CommandOutput, CommandError> {
        match cmd {
            Command::SubmitTask { request_id, spec } => {
                if let Some(id) = self.requests.get(request_id) {
                    return Ok(CommandOutput::TaskSubmitted {
                        id: *id,
                        duplicate: true,
                    });
                }
                spec.validate()?;
                self.next_task_id += 1;
                let id = TaskId(self.next_task_id);
                let task = Task {
                    id,
                    spec: spec.clone(),
                    state: TaskState::Queued,
                    submitted_at_ms: now_ms,
                    created_index: index,
                };
                let previous = self.tasks.insert(id, task);
                assert!(previous.is_none(), "task id {id} assigned twice");
                self.remember_request(*request_id, id);
                Ok(CommandOutput::TaskSubmitted {
                    id,
                    duplicate: false,
                })
            }
        }
    }

    fn remember_request(&mut self, request_id: RequestId, id: TaskId) {
        self.requests.insert(request_id, id);
        self.request_order.push_back(request_id);
        while self.request_order.len() > REQUEST_DEDUP_CAPACITY {
            let oldest = self.request_order.pop_front().expect("non-empty");
            self.requests.remove(&oldest);
        }
    }

    pub fn task(&self, id: TaskId) -> Option<&Task> {
        self.tasks.get(&id)
    }

    pub fn tasks(&self, filter: &TaskFilter) -> Vec<Task> {
        let start = filter.after.map(|a| a.0.saturating_add(1)).unwrap_or(0);
        self.tasks
            .range(TaskId(start)..)
            .map(|(_, t)| t)
            .filter(|t| filter.state.is_none_or(|s| t.state == s))
            .filter(|t| filter.queue.as_ref().is_none_or(|q| &t.spec.queue == q))
            .take(filter.limit)
            .cloned()
            .collect()
    }

    pub fn task_count(&self) -> usize {
        self.tasks.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn submit(rid: u128, cmd: &[&str]) -> Command {
        Command::SubmitTask {
            request_id: RequestId(rid),
            spec: TaskSpec {
                command: cmd.iter().map(|s| s.to_string()).collect(),
                queue: DEFAULT_QUEUE.into(),
            },
        }
    }

    fn req(commands: Vec<Command>) -> Request {
        Request {
            proposed_at_ms: 1_000,
            commands,
        }
    }

    #[test]
    fn submit_assigns_sequential_ids_and_stamps_leader_time() {
        let mut s = State::default();
        let r = s.apply(
            7,
            &req(vec![submit(1, &["echo", "a"]), submit(2, &["echo", "b"])]),
        );
        assert_eq!(
            r.results,
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
        let t = s.task(TaskId(2)).unwrap();
        assert_eq!(t.submitted_at_ms, 1_000);
        assert_eq!(t.created_index, 7);
        assert_eq!(t.state, TaskState::Queued);
    }

    #[test]
    fn retried_request_id_returns_first_result() {
        let mut s = State::default();
        s.apply(1, &req(vec![submit(9, &["true"])]));
        let r = s.apply(2, &req(vec![submit(9, &["true"])]));
        assert_eq!(
            r.results,
            vec![Ok(CommandOutput::TaskSubmitted {
                id: TaskId(1),
                duplicate: true
            })]
        );
        assert_eq!(s.task_count(), 1);
    }

    #[test]
    fn invalid_commands_are_rejected_without_consuming_ids() {
        let mut s = State::default();
        let r = s.apply(1, &req(vec![submit(1, &[]), submit(2, &["ok"])]));
        assert!(matches!(r.results[0], Err(CommandError::Invalid(_))));
        assert_eq!(
            r.results[1],
            Ok(CommandOutput::TaskSubmitted {
                id: TaskId(1),
                duplicate: false
            })
        );
        let bad_queue = Command::SubmitTask {
            request_id: RequestId(3),
            spec: TaskSpec {
                command: vec!["x".into()],
                queue: "no spaces".into(),
            },
        };
        let r = s.apply(2, &req(vec![bad_queue]));
        let Err(CommandError::Invalid(msg)) = &r.results[0] else {
            panic!("{r:?}")
        };
        assert!(msg.contains("\"no spaces\""), "{msg}");
    }

    #[test]
    fn request_dedup_table_is_bounded() {
        let mut s = State::default();
        for i in 0..(REQUEST_DEDUP_CAPACITY as u128 + 10) {
            s.apply(1, &req(vec![submit(i, &["true"])]));
        }
        assert_eq!(s.requests.len(), REQUEST_DEDUP_CAPACITY);
        assert_eq!(s.request_order.len(), REQUEST_DEDUP_CAPACITY);
        assert!(!s.requests.contains_key(&RequestId(0)));
    }

    #[test]
    fn list_filters_and_pages() {
        let mut s = State::default();
        for i in 0..10 {
            s.apply(1, &req(vec![submit(i, &["true"])]));
        }
        let page = s.tasks(&TaskFilter {
            after: Some(TaskId(3)),
            limit: 4,
            ..Default::default()
        });
        let ids: Vec<u64> = page.iter().map(|t| t.id.0).collect();
        assert_eq!(ids, vec![4, 5, 6, 7]);
        let none = s.tasks(&TaskFilter {
            queue: Some("other".into()),
            limit: 100,
            ..Default::default()
        });
        assert!(none.is_empty());
    }

    #[test]
    fn same_requests_give_same_state_on_every_replica() {
        let reqs: Vec<Request> = (0..50)
            .map(|i| req(vec![submit(i % 20, &["echo", "x"]), submit(1000 + i, &[])]))
            .collect();
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
