//! The client's view of workflows and runs: what `fleet workflow` and `fleet run` send, and
//! how the leader turns a definition into a replicated [`WorkflowSpec`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::schedules::{pool_claim, ScheduleDef};
use super::NewTask;
use crate::error::Error;
use crate::state::runs::MAX_ACTIVE_RUNS;
use crate::state::workflows::{Graph, NodeState, TriggerRule};
use crate::state::{
    NodeSpec, OverlapPolicy, PutChange, RequestId, Run, RunId, RunStatus, ScheduleSpec, State,
    TaskId, TaskState, Workflow, WorkflowSpec,
};

/// A checked workflow definition (a workflow file), as the CLI sends it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkflowDef {
    pub name: String,
    pub max_active_runs: Option<u32>,
    pub tasks: BTreeMap<String, WorkflowTaskDef>,
    /// The file's `[schedule]` table: a run per tick.
    pub schedule: Option<ScheduleDef>,
}

/// One task of a [`WorkflowDef`]: its options (the file's `[defaults]` filled in), upstream
/// tasks and trigger rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkflowTaskDef {
    pub task: NewTask,
    pub after: Vec<String>,
    pub trigger: TriggerRule,
}

/// One change a client asks for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum WorkflowOp {
    /// Create or replace (`workflow apply`).
    Apply(Box<WorkflowDef>),
    Delete(String),
    /// Start a run; the request id makes a retried call start one run.
    Run {
        workflow: String,
        params: Vec<(String, String)>,
        request_id: RequestId,
    },
    Cancel(RunId),
    Retry {
        run: RunId,
        failed_only: bool,
    },
    /// A run for each fire time of the workflow's schedule in `from_ms..=to_ms` that has none.
    Backfill {
        workflow: String,
        from_ms: u64,
        to_ms: u64,
    },
}

/// What one [`WorkflowOp`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WorkflowOutcome {
    Saved {
        name: String,
        change: PutChange,
    },
    Deleted {
        name: String,
    },
    Started {
        run: RunId,
        duplicate: bool,
    },
    Updated {
        run: RunId,
        status: RunStatus,
    },
    /// (fire time, run) of each run created; how many fire times had a run already.
    Backfilled {
        created: Vec<(u64, RunId)>,
        existing: u32,
    },
}

/// Which runs `run list` asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunFilter {
    /// One run (`run show`).
    pub run: Option<RunId>,
    pub workflow: Option<String>,
    pub status: Option<RunStatus>,
    pub limit: usize,
    /// Only runs older than this one (for paging: the last id of the previous page).
    pub before: Option<RunId>,
}

/// One workflow as `workflow list` and `workflow show` see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkflowView {
    pub workflow: Workflow,
    /// Its schedule's trigger, pause state and next fire times (at most 3), if it has one.
    pub schedule: Option<(String, bool, Vec<u64>)>,
}

/// One task of a run as `run show` sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeView {
    pub name: String,
    pub after: Vec<String>,
    pub trigger: TriggerRule,
    pub state: NodeState,
    pub task: Option<TaskId>,
    pub task_state: Option<TaskState>,
    pub attempts: u32,
    /// The first attempt's start and the task's end.
    pub started_at_ms: Option<u64>,
    pub ended_at_ms: Option<u64>,
}

/// One run, and (for `run show`) each of its tasks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunView {
    pub id: RunId,
    pub workflow: String,
    pub version: u32,
    pub status: RunStatus,
    pub params: Vec<(String, String)>,
    pub fire_ms: Option<u64>,
    pub created_at_ms: u64,
    pub started_at_ms: Option<u64>,
    pub ended_at_ms: Option<u64>,
    pub retries: u32,
    /// Per node state counts: (state, count).
    pub counts: Vec<(NodeState, u32)>,
    /// Every task, for one run; empty in lists.
    pub nodes: Vec<NodeView>,
}

fn invalid(e: impl std::fmt::Display) -> Error {
    Error::InvalidArgument(e.to_string())
}

/// The command a workflow's schedule stands for (shown by `schedule show`; never run).
pub fn schedule_command(workflow: &str) -> Vec<String> {
    ["fleet", "workflow", "run", workflow]
        .map(String::from)
        .to_vec()
}

/// The stored spec of `def` (tasks resolved with the leader's queue defaults) and its
/// schedule's spec.
pub fn resolve(
    def: &WorkflowDef,
    config: &crate::config::Config,
    now_ms: u64,
) -> Result<(WorkflowSpec, Option<ScheduleSpec>), Error> {
    let name = &def.name;
    crate::state::workflows::check_workflow_name(name).map_err(invalid)?;
    let after: BTreeMap<String, Vec<String>> = def
        .tasks
        .iter()
        .map(|(n, t)| (n.clone(), t.after.clone()))
        .collect();
    let graph = Graph::new(&after).map_err(|e| invalid(format!("workflow {name:?}: {e}")))?;
    let mut nodes = Vec::with_capacity(graph.names.len());
    for n in &graph.names {
        let t = &def.tasks[n];
        let at = |e: Error| {
            let msg = match e {
                Error::InvalidArgument(m) => m,
                other => other.to_string(),
            };
            invalid(format!("workflow {name:?}, task {n:?}: {msg}"))
        };
        if t.task.delay_ms.is_some()
            || t.task.not_before_ms.is_some()
            || t.task.idempotency_key.is_some()
            || !t.task.after.is_empty()
        {
            return Err(at(Error::InvalidArgument(
                "a workflow task takes no delay, not-before time, idempotency key or task ids \
                 to run after (it starts when its upstream tasks allow; each run is unique)"
                    .into(),
            )));
        }
        nodes.push(NodeSpec {
            task: t.task.resolve(config, now_ms).map_err(at)?,
            pool: pool_claim(&t.task).map_err(at)?,
            trigger: t.trigger,
        });
    }
    let max_active_runs = def.max_active_runs.unwrap_or(MAX_ACTIVE_RUNS.min(16));
    let spec = WorkflowSpec {
        graph,
        nodes,
        max_active_runs,
    };
    spec.validate()
        .map_err(|e| invalid(format!("workflow {name:?}: {e}")))?;
    let schedule = def
        .schedule
        .as_ref()
        .map(|s| {
            let mut s = s.clone();
            s.name = name.clone();
            s.overlap = Some(OverlapPolicy::Allow);
            s.task = NewTask::command(schedule_command(name));
            super::schedules::resolve(&s, config, now_ms)
        })
        .transpose()?;
    Ok((spec, schedule))
}

/// Views of one workflow or of all.
pub fn workflow_views(
    s: &State,
    name: Option<&str>,
    now_ms: u64,
) -> Result<Vec<WorkflowView>, Error> {
    let view = |w: &Workflow| {
        let schedule = w
            .schedule
            .and_then(|id| s.schedules().by_id(id))
            .map(|sch| {
                let next = if sch.paused {
                    Vec::new()
                } else {
                    crate::schedule::Timing::new(&sch.spec)
                        .map(|t| t.upcoming(now_ms.max(sch.fired_through_ms), 3))
                        .unwrap_or_default()
                };
                (sch.spec.trigger.to_string(), sch.paused, next)
            });
        WorkflowView {
            workflow: w.clone(),
            schedule,
        }
    };
    match name {
        Some(n) => {
            let w = s
                .workflows()
                .get(n)
                .ok_or_else(|| invalid(format!("no workflow named {n:?}")))?;
            Ok(vec![view(w)])
        }
        None => Ok(s.workflows().all().map(view).collect()),
    }
}

/// Most runs one `run list` returns.
pub const MAX_RUN_LIST: usize = 1_000;

/// The runs `filter` asks for (newest first); with `filter.run`, that run with its tasks.
pub fn run_views(s: &State, filter: &RunFilter) -> Result<Vec<RunView>, Error> {
    if let Some(id) = filter.run {
        let r = s
            .workflows()
            .run(id)
            .ok_or_else(|| invalid(format!("run {id} not found (never started, or purged)")))?;
        return Ok(vec![run_view(s, r, true)]);
    }
    let limit = filter.limit.clamp(1, MAX_RUN_LIST);
    Ok(s.workflows()
        .runs(filter.before, filter.workflow.as_deref(), filter.status)
        .take(limit)
        .map(|r| run_view(s, r, false))
        .collect())
}

fn run_view(s: &State, r: &Run, full: bool) -> RunView {
    let states = r.node_states();
    let mut counts: BTreeMap<&'static str, (NodeState, u32)> = BTreeMap::new();
    for st in &states {
        counts.entry(node_state_name(*st)).or_insert((*st, 0)).1 += 1;
    }
    let nodes = if full {
        let g = &r.spec.graph;
        (0..g.names.len())
            .map(|n| {
                let task = r.tasks[n].and_then(|id| s.task(id));
                NodeView {
                    name: g.names[n].clone(),
                    after: g.upstream[n].iter().map(|&u| g.names[u].clone()).collect(),
                    trigger: r.spec.nodes[n].trigger,
                    state: states[n],
                    task: r.tasks[n],
                    task_state: task.map(|t| t.state),
                    attempts: task.map_or(0, |t| t.attempts.len() as u32),
                    started_at_ms: task.and_then(|t| t.attempts.first().map(|a| a.started_at_ms)),
                    ended_at_ms: task.and_then(|t| t.finished_at_ms),
                }
            })
            .collect()
    } else {
        Vec::new()
    };
    RunView {
        id: r.id,
        workflow: r.workflow.clone(),
        version: r.version,
        status: r.status,
        params: r.params.clone(),
        fire_ms: r.fire_ms,
        created_at_ms: r.created_at_ms,
        started_at_ms: r.started_at_ms,
        ended_at_ms: r.ended_at_ms,
        retries: r.retries,
        counts: counts.into_values().collect(),
        nodes,
    }
}

/// A node state's name, as `run show` prints it.
pub fn node_state_name(s: NodeState) -> &'static str {
    match s {
        NodeState::Waiting => "waiting",
        NodeState::Started => "started",
        NodeState::Succeeded => "succeeded",
        NodeState::Failed => "failed",
        NodeState::UpstreamFailed => "upstream_failed",
        NodeState::Skipped => "skipped",
        NodeState::Cancelled => "cancelled",
    }
}
