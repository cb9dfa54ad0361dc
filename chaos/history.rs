//! What a run observed: the history the checker judges.
//!
//! - [`Submission`]s: every task the workload tried to submit, acknowledged (with its id) or
//!   not (with the error). Only acknowledged ones are promised to the user.
//! - [`ExecEvent`]s: every execution's start and end, as `chaos record` wrote them.
//! - [`TaskRecord`]s: every task's final record as the cluster reports it (linearizable read
//!   after the run): state and attempts with their fencing tokens and outcomes.
//! - [`LeaderObs`]: what each replica said about leadership, polled every 100 ms.
//! - with `--schedules`: every schedule's record at the end (spec, watermark, tick counts) and
//!   the pools' sizes.
//!
//! `history.json` in the run's output folder holds all of it; `chaos check --history FILE`
//! judges a saved history again.

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch (this machine's real clock, never the injected offset).
pub fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct History {
    pub seed: u64,
    pub submissions: Vec<Submission>,
    pub executions: Vec<ExecEvent>,
    pub tasks: Vec<TaskRecord>,
    pub leaders: Vec<LeaderObs>,
    /// The schedules as the cluster reported them at the end (paused first, so their
    /// watermarks no longer move).
    #[serde(default)]
    pub schedules: Vec<fleet::state::Schedule>,
    /// Pool name -> slots.
    #[serde(default)]
    pub pools: std::collections::BTreeMap<String, u32>,
    /// When workers could not hear the cluster (frozen, or cut off from every replica): an
    /// attempt of such a worker may run on, and even end, after its lease moved on, until
    /// the worker's first heartbeat after the heal tells it so.
    #[serde(default)]
    pub isolations: Vec<Isolation>,
    /// With `--workflows`: the runs the workload started (acknowledged), and every run with
    /// its tasks as the cluster reported them at the end.
    #[serde(default)]
    pub runs_started: Vec<u64>,
    #[serde(default)]
    pub runs: Vec<RunRecord>,
}

/// One workflow run as the cluster reported it at the end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRecord {
    pub id: u64,
    pub workflow: String,
    /// queued, running, succeeded, failed or cancelled.
    pub status: String,
    pub nodes: Vec<NodeRecord>,
}

impl RunRecord {
    pub fn is_final(&self) -> bool {
        matches!(self.status.as_str(), "succeeded" | "failed" | "cancelled")
    }
}

/// One task of a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub name: String,
    pub after: Vec<String>,
    /// Its trigger rule (all_success, all_done, ...).
    pub trigger: String,
    /// waiting, started, succeeded, failed, upstream_failed, skipped or cancelled.
    pub state: String,
    /// Its task, when its trigger rule let it start.
    pub task: Option<u64>,
}

/// Workers that could not hear the cluster from `from_ms` until `to_ms` (the heal).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Isolation {
    /// The workers' names (as in the execution log).
    pub workers: Vec<String>,
    pub from_ms: u64,
    pub to_ms: u64,
}

/// One submission attempt by the workload.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Submission {
    /// Unique per run; also the task's idempotency key.
    pub key: String,
    /// The workload kind (short, long, flaky, timeout, cancel).
    pub kind: String,
    pub t_ms: u64,
    /// The task id, when the cluster acknowledged the submission.
    pub acked: Option<u64>,
    /// When the acknowledgement arrived.
    #[serde(default)]
    pub acked_at_ms: Option<u64>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExecKind {
    Start,
    /// Ran to its end; `exit` says how.
    End,
    /// Stopped by SIGTERM (the worker's kill).
    Killed,
}

/// One line of the execution log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecEvent {
    #[serde(rename = "ev")]
    pub kind: ExecKind,
    pub key: String,
    pub task: u64,
    pub attempt: u32,
    pub token: u64,
    pub worker: String,
    pub pid: u32,
    pub t_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit: Option<i32>,
}

/// One task as the cluster reported it at the end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRecord {
    pub id: u64,
    /// queued, running, failed, succeeded, dead or cancelled.
    pub state: String,
    pub key: Option<String>,
    pub attempts: Vec<AttemptRecord>,
    /// A run's schedule and fire time (RFC 3339), from its `FLEET_SCHEDULE` and
    /// `FLEET_FIRE_TIME`.
    #[serde(default)]
    pub run_of: Option<(String, String)>,
    /// The pool the task holds slots of (from the workload's `CHAOS_POOL` variable; one slot).
    #[serde(default)]
    pub pool: Option<String>,
    /// The run and task name of a workflow run's task (`FLEET_RUN_ID`, `FLEET_TASK_NAME`).
    #[serde(default)]
    pub run_node: Option<(u64, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptRecord {
    pub number: u32,
    pub token: u64,
    pub worker: u64,
    pub started_at_ms: u64,
    pub ended_at_ms: Option<u64>,
    /// succeeded, failed, timed_out, lost, cancelled, or none while running.
    pub outcome: String,
}

/// One replica's answer about leadership.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderObs {
    pub t_ms: u64,
    pub node: u64,
    pub term: u64,
    pub leader: Option<u64>,
}

impl TaskRecord {
    pub fn from_task(t: &fleet::state::Task) -> TaskRecord {
        use fleet::state::AttemptOutcome as O;
        let state = serde_json::to_value(t.state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_else(|| format!("{:?}", t.state).to_lowercase());
        let env = |k: &str| {
            t.spec
                .env
                .iter()
                .find(|(name, _)| name == k)
                .map(|(_, v)| v.clone())
        };
        TaskRecord {
            id: t.id.0,
            state,
            key: t.spec.idempotency_key.clone(),
            run_of: env("FLEET_SCHEDULE").zip(env("FLEET_FIRE_TIME")),
            pool: env("CHAOS_POOL"),
            run_node: env("FLEET_RUN_ID")
                .and_then(|r| r.parse().ok())
                .zip(env("FLEET_TASK_NAME")),
            attempts: t
                .attempts
                .iter()
                .map(|a| AttemptRecord {
                    number: a.number,
                    token: a.fencing_token,
                    worker: a.worker.0,
                    started_at_ms: a.started_at_ms,
                    ended_at_ms: a.ended_at_ms,
                    outcome: match &a.outcome {
                        None => "none",
                        Some(O::Succeeded) => "succeeded",
                        Some(O::Failed { .. }) => "failed",
                        Some(O::TimedOut) => "timed_out",
                        Some(O::Lost { .. }) => "lost",
                        Some(O::Cancelled) => "cancelled",
                    }
                    .to_string(),
                })
                .collect(),
        }
    }

    pub fn is_final(&self) -> bool {
        matches!(self.state.as_str(), "succeeded" | "dead" | "cancelled")
    }
}

/// Reads the execution log; a torn last line (a writer killed mid-write) is skipped and counted.
pub fn read_exec_log(path: &std::path::Path) -> (Vec<ExecEvent>, usize) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut bad = 0;
    let events = text
        .lines()
        .filter_map(|l| match serde_json::from_str(l) {
            Ok(e) => Some(e),
            Err(_) => {
                bad += 1;
                None
            }
        })
        .collect();
    (events, bad)
}
