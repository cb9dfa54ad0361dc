//! Workflows and their runs in the replicated state, and tasks that wait for other tasks
//! (`fleet submit --after`).
//!
//! A stored [`Workflow`] is a checked graph ([`Graph`]) with one task spec and trigger rule
//! per node. A [`Run`] copies the definition it started from (a later `workflow apply` or
//! `workflow delete` does not change a run in progress) and keeps its [`RunProgress`]. Only
//! ready nodes have tasks: the state machine creates a node's task when its trigger rule is
//! met, in the same apply as the upstream task's end ([`State::finish`] calls
//! [`State::node_ended`]), so readiness is decided once, in log order, on every replica, and
//! survives any failover. The cost of a task's end is O(its downstream edges).
//!
//! Runs beyond a workflow's `max_active_runs` wait in its queue and start, oldest first, as
//! earlier runs end. Finished runs are forgotten with the finished tasks (`PurgeFinished`,
//! after `scheduler.retention_ms`).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

use super::schedules::{rfc3339, ScheduleId};
use super::workflows::{Graph, NodeState, RunProgress, RunState, TaskEnd, TriggerRule};
use super::{
    CommandError, CommandOutput, PoolClaim, PutChange, RequestId, State, TaskId, TaskSpec,
    TaskState,
};

/// Identifies one run for the lifetime of the cluster (assigned in order, from 1).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct RunId(pub u64);

impl std::fmt::Display for RunId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.0, f)
    }
}

/// Most runs of one workflow at a time that `max_active_runs` may allow.
pub const MAX_ACTIVE_RUNS: u32 = 10_000;
/// Most workflows a cluster holds.
pub const MAX_WORKFLOWS: usize = 10_000;
/// Most parameters of one run.
pub const MAX_RUN_PARAMS: usize = 64;
/// Longest parameter value.
pub const MAX_PARAM_VALUE: usize = 4096;
/// Most runs waiting behind `max_active_runs` per workflow.
pub const MAX_QUEUED_RUNS: usize = 10_000;
/// Most tasks one `submit --after` may wait for.
pub const MAX_AFTER: usize = 1_000;

/// One task of a workflow definition, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSpec {
    pub task: TaskSpec,
    pub pool: Option<PoolClaim>,
    pub trigger: TriggerRule,
}

/// A workflow definition as stored: the graph and, per node (in the graph's order), its task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkflowSpec {
    pub graph: Graph,
    pub nodes: Vec<NodeSpec>,
    pub max_active_runs: u32,
}

impl WorkflowSpec {
    /// Checks what the state machine can check: one node per task, every spec valid.
    pub fn validate(&self) -> Result<(), CommandError> {
        let invalid = |m: String| Err(CommandError::Invalid(m));
        if self.nodes.len() != self.graph.names.len() {
            return invalid(format!(
                "{} task specs for {} tasks",
                self.nodes.len(),
                self.graph.names.len()
            ));
        }
        if !(1..=MAX_ACTIVE_RUNS).contains(&self.max_active_runs) {
            return invalid(format!(
                "max_active_runs = {} is not valid: use 1 to {}",
                self.max_active_runs, MAX_ACTIVE_RUNS
            ));
        }
        for (name, n) in self.graph.names.iter().zip(&self.nodes) {
            n.task
                .validate()
                .map_err(|e| CommandError::Invalid(format!("task {name:?}: {e}")))?;
        }
        Ok(())
    }

    fn rules(&self) -> Vec<TriggerRule> {
        self.nodes.iter().map(|n| n.trigger).collect()
    }
}

/// Runs of one workflow counted since it was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunCounts {
    pub started: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub cancelled: u64,
}

/// One stored workflow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workflow {
    pub name: String,
    pub spec: WorkflowSpec,
    /// Grows with every change of the definition; a run records the version it started from.
    pub version: u32,
    /// The schedule that starts its runs (same name as the workflow), if any.
    pub schedule: Option<ScheduleId>,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    /// Runs started and not finished.
    pub active: BTreeSet<RunId>,
    /// Runs waiting for a free place under `max_active_runs`, oldest first.
    pub queued: VecDeque<RunId>,
    pub counts: RunCounts,
}

named_enum!(
    /// Where a run stands.
    RunStatus, "run state", {
        /// Waiting behind `max_active_runs`.
        Queued => "queued",
        Running => "running",
        Succeeded => "succeeded",
        Failed => "failed",
        Cancelled => "cancelled",
    }
);

impl RunStatus {
    pub fn is_final(self) -> bool {
        matches!(
            self,
            RunStatus::Succeeded | RunStatus::Failed | RunStatus::Cancelled
        )
    }
}

/// One run of a workflow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Run {
    pub id: RunId,
    pub workflow: String,
    /// The workflow's version it started from, and that definition.
    pub version: u32,
    pub spec: WorkflowSpec,
    /// What made it unique: the client's request id, or the schedule's tick.
    pub key: String,
    pub params: Vec<(String, String)>,
    /// The tick it runs for, for a scheduled run.
    pub fire_ms: Option<u64>,
    pub status: RunStatus,
    /// `None` while queued.
    pub progress: Option<RunProgress>,
    /// Per node, its current task (created when the node became ready).
    pub tasks: Vec<Option<TaskId>>,
    /// Tasks of nodes that a `run retry` reset, with their node: their history.
    pub earlier: Vec<(u32, TaskId)>,
    pub created_at_ms: u64,
    pub started_at_ms: Option<u64>,
    pub ended_at_ms: Option<u64>,
    /// `run retry` calls applied.
    pub retries: u32,
}

impl Run {
    /// The state of each node: its progress, or waiting for a queued run.
    pub fn node_states(&self) -> Vec<NodeState> {
        match &self.progress {
            Some(p) => p.nodes.clone(),
            None if self.status == RunStatus::Cancelled => {
                vec![NodeState::Cancelled; self.spec.nodes.len()]
            }
            None => vec![NodeState::Waiting; self.spec.nodes.len()],
        }
    }
}

/// Tasks submitted with `--after`, waiting for other tasks to succeed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AfterDeps {
    /// A held task and how many of its upstream tasks have not succeeded yet.
    pub waiting: BTreeMap<TaskId, u32>,
    /// An upstream task and the held tasks waiting for it.
    pub dependents: BTreeMap<TaskId, Vec<TaskId>>,
    /// A task cancelled because an upstream task did not succeed: that task and its state.
    pub upstream_failed: BTreeMap<TaskId, (TaskId, TaskState)>,
    /// Each task's upstream list, while it is retained (for `task show`).
    pub upstream: BTreeMap<TaskId, Vec<TaskId>>,
}

/// The workflows, their runs and the `--after` dependencies (part of [`State`], encoded after
/// the pools: state format 4).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workflows {
    next_run: u64,
    defs: BTreeMap<String, Workflow>,
    runs: BTreeMap<RunId, Run>,
    /// Run keys of retained runs (a retried `workflow run`, a tick applied twice: one run).
    keys: BTreeMap<String, RunId>,
    /// The run and node of every retained task of a run.
    node_of: BTreeMap<TaskId, (RunId, u32)>,
    /// Schedules that start workflow runs, and their workflow.
    schedule_owner: BTreeMap<ScheduleId, String>,
    /// Finished runs by the time they ended, for retention.
    ended: BTreeSet<(u64, RunId)>,
    pub after: AfterDeps,
}

impl Workflows {
    /// How many workflows are defined.
    pub fn len(&self) -> usize {
        self.defs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.defs.is_empty()
    }

    /// How many runs are retained.
    pub fn run_count(&self) -> usize {
        self.runs.len()
    }

    pub fn get(&self, name: &str) -> Option<&Workflow> {
        self.defs.get(name)
    }

    pub fn all(&self) -> impl Iterator<Item = &Workflow> {
        self.defs.values()
    }

    pub fn run(&self, id: RunId) -> Option<&Run> {
        self.runs.get(&id)
    }

    /// Retained runs from the newest (older than `before`, for paging), optionally of one
    /// workflow and in one state.
    pub fn runs<'a>(
        &'a self,
        before: Option<RunId>,
        workflow: Option<&'a str>,
        status: Option<RunStatus>,
    ) -> impl Iterator<Item = &'a Run> + 'a {
        self.runs
            .range(..before.unwrap_or(RunId(u64::MAX)))
            .rev()
            .map(|(_, r)| r)
            .filter(move |r| workflow.is_none_or(|w| r.workflow == w))
            .filter(move |r| status.is_none_or(|s| r.status == s))
    }

    /// The run and node name of a task of a run.
    pub fn node_of(&self, task: TaskId) -> Option<(&Run, &str)> {
        let (run, node) = self.node_of.get(&task)?;
        let r = self.runs.get(run)?;
        Some((r, r.spec.graph.names[*node as usize].as_str()))
    }

    /// Runs that ended after `cursor` (end time, run), oldest first.
    pub fn ended_after(&self, cursor: (u64, RunId)) -> impl Iterator<Item = (u64, &Run)> {
        use std::ops::Bound::Excluded;
        self.ended
            .range((Excluded(cursor), std::ops::Bound::Unbounded))
            .filter_map(|(at, id)| Some((*at, self.runs.get(id)?)))
    }

    /// The last run end recorded, as a cursor for [`Workflows::ended_after`].
    pub fn last_ended(&self) -> (u64, RunId) {
        self.ended.last().copied().unwrap_or((0, RunId(0)))
    }

    /// The workflow whose schedule this is.
    pub fn owner_of(&self, schedule: ScheduleId) -> Option<&str> {
        self.schedule_owner.get(&schedule).map(String::as_str)
    }

    pub(super) fn using_pool(&self, pool: &str) -> Option<String> {
        let uses = |s: &WorkflowSpec| {
            s.nodes
                .iter()
                .any(|n| n.pool.as_ref().is_some_and(|c| c.pool == pool))
        };
        if let Some(w) = self.defs.values().find(|w| uses(&w.spec)) {
            return Some(format!("workflow {:?}", w.name));
        }
        self.runs
            .values()
            .find(|r| !r.status.is_final() && uses(&r.spec))
            .map(|r| format!("run {} of workflow {:?}", r.id, r.workflow))
    }
}

impl Workflows {
    /// The maps agree with the runs, and the runs' nodes with their tasks (`task_state` of a
    /// retained task; purged tasks are not judged). Part of [`State::check_invariants`].
    pub(super) fn check(
        &self,
        task_state: impl Fn(TaskId) -> Option<TaskState>,
    ) -> Result<(), String> {
        for (id, r) in &self.runs {
            let progress = r.progress.as_ref().map(|p| p.state);
            let consistent = match r.status {
                RunStatus::Queued => progress.is_none(),
                RunStatus::Running => progress == Some(RunState::Running),
                RunStatus::Succeeded => progress == Some(RunState::Succeeded),
                RunStatus::Failed => progress == Some(RunState::Failed),
                RunStatus::Cancelled => matches!(progress, None | Some(RunState::Cancelled)),
            };
            if !consistent || r.status.is_final() != r.ended_at_ms.is_some() {
                return Err(format!(
                    "run {id} is {} with progress {progress:?}",
                    r.status.as_str()
                ));
            }
            if self.keys.get(&r.key) != Some(id) {
                return Err(format!("run {id}'s key {:?} does not name it", r.key));
            }
            let nodes = r.node_states();
            for (n, task) in r.tasks.iter().enumerate() {
                let Some(t) = task else { continue };
                if self
                    .node_of
                    .get(t)
                    .is_some_and(|&(run, node)| (run, node) != (*id, n as u32))
                {
                    return Err(format!("task {t} of run {id} is mapped to another node"));
                }
                let Some(state) = task_state(*t) else {
                    continue;
                };
                let agrees = match nodes[n] {
                    NodeState::Started => !state.is_final() || state == TaskState::Cancelled,
                    NodeState::Succeeded => state == TaskState::Succeeded,
                    NodeState::Failed => state == TaskState::Dead,
                    NodeState::Cancelled => state.is_final() || state == TaskState::Running,
                    other => {
                        return Err(format!("run {id} node {n} is {other:?} but has task {t}"))
                    }
                };
                if !agrees {
                    return Err(format!(
                        "run {id} node {n} is {:?} but its task {t} is {}",
                        nodes[n],
                        state.as_str()
                    ));
                }
            }
        }
        for (t, (run, node)) in &self.node_of {
            let r = self
                .runs
                .get(run)
                .ok_or_else(|| format!("task {t} is mapped to missing run {run}"))?;
            let current = r.tasks.get(*node as usize) == Some(&Some(*t));
            if !current && !r.earlier.contains(&(*node, *t)) {
                return Err(format!(
                    "task {t} is mapped to run {run} node {node}, which has another"
                ));
            }
        }
        for w in self.defs.values() {
            for run in &w.active {
                if self
                    .runs
                    .get(run)
                    .is_none_or(|r| r.status != RunStatus::Running)
                {
                    return Err(format!(
                        "workflow {:?}: active run {run} is not running",
                        w.name
                    ));
                }
            }
            for run in &w.queued {
                if self
                    .runs
                    .get(run)
                    .is_none_or(|r| r.status != RunStatus::Queued)
                {
                    return Err(format!(
                        "workflow {:?}: queued run {run} is not queued",
                        w.name
                    ));
                }
            }
            if w.active.len() < w.spec.max_active_runs as usize && !w.queued.is_empty() {
                return Err(format!("workflow {:?} queues runs below its limit", w.name));
            }
        }
        for &(at, id) in &self.ended {
            if self.runs.get(&id).is_none_or(|r| r.ended_at_ms != Some(at)) {
                return Err(format!("run {id} is in `ended` under a stale key"));
            }
        }
        for (t, left) in &self.after.waiting {
            if *left == 0 || task_state(*t) != Some(TaskState::Queued) {
                return Err(format!(
                    "held task {t} waits for {left} tasks, or is not queued"
                ));
            }
        }
        Ok(())
    }
}

/// A run's key for a client's `workflow run` request.
pub fn request_key(request_id: RequestId) -> String {
    format!("request-{:032x}", request_id.0)
}

fn check_params(params: &[(String, String)]) -> Result<(), CommandError> {
    if params.len() > MAX_RUN_PARAMS {
        return Err(CommandError::Invalid(format!(
            "{} parameters; at most {MAX_RUN_PARAMS} are accepted",
            params.len()
        )));
    }
    let mut seen = BTreeSet::new();
    for (k, v) in params {
        let ok = !k.is_empty()
            && k.len() <= 64
            && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !ok {
            return Err(CommandError::Invalid(format!(
                "parameter name {k:?} is not valid: use 1 to 64 letters, digits and '_'"
            )));
        }
        if !seen.insert(k) {
            return Err(CommandError::Invalid(format!(
                "parameter {k:?} is given twice"
            )));
        }
        if v.len() > MAX_PARAM_VALUE {
            return Err(CommandError::Invalid(format!(
                "parameter {k:?} is {} bytes long; at most {MAX_PARAM_VALUE} are accepted",
                v.len()
            )));
        }
    }
    Ok(())
}

impl State {
    pub fn workflows(&self) -> &Workflows {
        &self.workflows
    }

    /// `workflow apply`: creates or replaces a workflow, and creates, replaces or deletes its
    /// schedule (named like the workflow).
    pub(super) fn put_workflow(
        &mut self,
        name: &str,
        spec: &WorkflowSpec,
        schedule: Option<&super::ScheduleSpec>,
    ) -> Result<CommandOutput, CommandError> {
        super::workflows::check_workflow_name(name)?;
        spec.validate()?;
        for n in &spec.nodes {
            if let Some(c) = &n.pool {
                self.check_claim(c)?;
            }
        }
        let existing = self.workflows.defs.get(name);
        if existing.is_none() && self.workflows.defs.len() >= MAX_WORKFLOWS {
            return Err(CommandError::Invalid(format!(
                "the cluster has {MAX_WORKFLOWS} workflows already; delete one first"
            )));
        }
        let own_schedule = existing.and_then(|w| w.schedule);
        if let Some(sid) = self.schedules.get(name).map(|s| s.id) {
            if Some(sid) != own_schedule && schedule.is_some() {
                return Err(CommandError::Invalid(format!(
                    "a schedule named {name:?} exists already: a workflow's schedule takes the \
                     workflow's name; rename or delete that schedule first"
                )));
            }
        }
        let now = self.clock_ms;
        let schedule_changed = match (schedule, own_schedule) {
            (Some(s), _) => {
                let out = self.put_schedule(name, s, None, super::PutMode::CreateOrReplace)?;
                let CommandOutput::ScheduleSaved { id, change } = out else {
                    unreachable!("put_schedule saves a schedule")
                };
                self.workflows.schedule_owner.insert(id, name.to_string());
                change != PutChange::Unchanged
            }
            (None, Some(sid)) => {
                self.workflows.schedule_owner.remove(&sid);
                let _ = self.delete_schedule(name);
                true
            }
            (None, None) => false,
        };
        let schedule_id = schedule.and_then(|_| self.schedules.get(name).map(|s| s.id));
        let change = match self.workflows.defs.get_mut(name) {
            Some(w) if w.spec == *spec && !schedule_changed => PutChange::Unchanged,
            Some(w) => {
                if w.spec != *spec {
                    w.version += 1;
                }
                w.spec = spec.clone();
                w.schedule = schedule_id;
                w.updated_at_ms = now;
                PutChange::Updated
            }
            None => {
                self.workflows.defs.insert(
                    name.to_string(),
                    Workflow {
                        name: name.to_string(),
                        spec: spec.clone(),
                        version: 1,
                        schedule: schedule_id,
                        created_at_ms: now,
                        updated_at_ms: now,
                        active: BTreeSet::new(),
                        queued: VecDeque::new(),
                        counts: RunCounts::default(),
                    },
                );
                PutChange::Created
            }
        };
        // A larger max_active_runs may let queued runs start.
        self.admit_runs(name);
        Ok(CommandOutput::WorkflowSaved {
            name: name.to_string(),
            change,
        })
    }

    /// `workflow delete`: the definition and its schedule go; runs in progress go on (each
    /// holds its own copy of the definition), queued ones are cancelled.
    pub(super) fn delete_workflow(&mut self, name: &str) -> Result<CommandOutput, CommandError> {
        let w = self
            .workflows
            .defs
            .remove(name)
            .ok_or_else(|| CommandError::Invalid(format!("no workflow named {name:?}")))?;
        if let Some(sid) = w.schedule {
            self.workflows.schedule_owner.remove(&sid);
            let _ = self.delete_schedule(name);
        }
        for run in w.queued {
            self.end_run(run, RunStatus::Cancelled);
        }
        Ok(CommandOutput::WorkflowDeleted {
            name: name.to_string(),
        })
    }

    /// Refuses a schedule command aimed at a workflow's schedule (its workflow owns it).
    pub(super) fn check_not_workflow_schedule(&self, name: &str) -> Result<(), CommandError> {
        // (A workflow's schedule is changed by `workflow apply` and backfilled by `workflow
        // backfill`.)
        let owner = self
            .schedules
            .get(name)
            .and_then(|s| self.workflows.owner_of(s.id));
        match owner {
            Some(w) => Err(CommandError::Invalid(format!(
                "schedule {name:?} belongs to workflow {w:?}: change it with `fleet workflow \
                 apply`, run it with `fleet workflow run {w}`, backfill it with `fleet workflow \
                 backfill {w}` (pause and resume work as for any schedule)"
            ))),
            None => Ok(()),
        }
    }

    /// Starts a run of `workflow` (queued behind `max_active_runs`), or finds the run `key`
    /// made before. Returns the run and whether it existed.
    pub(super) fn start_run(
        &mut self,
        workflow: &str,
        key: String,
        params: &[(String, String)],
        fire_ms: Option<u64>,
    ) -> Result<(RunId, bool), CommandError> {
        if let Some(&run) = self.workflows.keys.get(&key) {
            return Ok((run, true));
        }
        check_params(params)?;
        let now = self.clock_ms;
        let w = self
            .workflows
            .defs
            .get_mut(workflow)
            .ok_or_else(|| CommandError::Invalid(format!("no workflow named {workflow:?}")))?;
        if w.queued.len() >= MAX_QUEUED_RUNS {
            return Err(CommandError::Invalid(format!(
                "workflow {workflow:?} has {MAX_QUEUED_RUNS} runs waiting already (max_active_runs \
                 = {}); wait for them or cancel some",
                w.spec.max_active_runs
            )));
        }
        self.workflows.next_run += 1;
        let id = RunId(self.workflows.next_run);
        w.queued.push_back(id);
        let run = Run {
            id,
            workflow: workflow.to_string(),
            version: w.version,
            spec: w.spec.clone(),
            key: key.clone(),
            params: params.to_vec(),
            fire_ms,
            status: RunStatus::Queued,
            progress: None,
            tasks: vec![None; w.spec.nodes.len()],
            earlier: Vec::new(),
            created_at_ms: now,
            started_at_ms: None,
            ended_at_ms: None,
            retries: 0,
        };
        self.workflows.runs.insert(id, run);
        self.workflows.keys.insert(key, id);
        self.admit_runs(workflow);
        Ok((id, false))
    }

    /// Starts queued runs of `workflow` while it has room under `max_active_runs`.
    fn admit_runs(&mut self, workflow: &str) {
        loop {
            let Some(w) = self.workflows.defs.get_mut(workflow) else {
                return;
            };
            if w.active.len() >= w.spec.max_active_runs as usize {
                return;
            }
            let Some(run) = w.queued.pop_front() else {
                return;
            };
            w.active.insert(run);
            w.counts.started += 1;
            self.begin_run(run);
        }
    }

    /// A queued run starts: its first tasks are created.
    fn begin_run(&mut self, id: RunId) {
        let now = self.clock_ms;
        let r = self.workflows.runs.get_mut(&id).expect("queued runs exist");
        let (progress, start) = RunProgress::start(&r.spec.graph, &r.spec.rules());
        r.progress = Some(progress);
        r.status = RunStatus::Running;
        r.started_at_ms = Some(now);
        self.create_node_tasks(id, &start);
        self.check_run_end(id);
    }

    /// Creates the tasks of `nodes` of run `id` (their trigger rules were met).
    fn create_node_tasks(&mut self, id: RunId, nodes: &[usize]) {
        let index = self.schedules.applying_index();
        for &node in nodes {
            let r = &self.workflows.runs[&id];
            let n = &r.spec.nodes[node];
            let mut spec = n.task.clone();
            spec.env.push(("FLEET_RUN_ID".into(), id.to_string()));
            spec.env.push(("FLEET_WORKFLOW".into(), r.workflow.clone()));
            spec.env
                .push(("FLEET_TASK_NAME".into(), r.spec.graph.names[node].clone()));
            for (k, v) in &r.params {
                spec.env.push((format!("FLEET_PARAM_{k}"), v.clone()));
            }
            if let Some(fire) = r.fire_ms {
                spec.env.push(("FLEET_FIRE_TIME".into(), rfc3339(fire)));
            }
            // A pool deleted since the workflow was applied cannot be deleted while a run
            // needs it (see `Workflows::using_pool`), so the claim is valid here.
            let claim = n.pool.clone();
            let task = self.insert_task(index, spec);
            if let Some(c) = claim {
                self.add_claim(task, c);
            }
            self.workflows.node_of.insert(task, (id, node as u32));
            let r = self.workflows.runs.get_mut(&id).expect("exists");
            r.tasks[node] = Some(task);
        }
    }

    /// A task reached a final state (or was cancelled while its attempt runs): if it is a
    /// node of a run, the run decides its downstream nodes; if tasks wait for it (`--after`),
    /// they are released or cancelled.
    pub(super) fn node_ended(&mut self, task: TaskId, state: TaskState) {
        self.release_dependents(task, state);
        let Some(&(id, node)) = self.workflows.node_of.get(&task) else {
            return;
        };
        let Some(r) = self.workflows.runs.get_mut(&id) else {
            return;
        };
        if r.tasks[node as usize] != Some(task) {
            return; // a task of an earlier try
        }
        let end = match state {
            TaskState::Succeeded => TaskEnd::Succeeded,
            TaskState::Dead => TaskEnd::Failed,
            _ => TaskEnd::Cancelled,
        };
        let Some(progress) = r.progress.as_mut() else {
            return;
        };
        let rules = r.spec.rules();
        let start = progress.task_ended(&r.spec.graph, &rules, node as usize, end);
        self.create_node_tasks(id, &start);
        self.check_run_end(id);
    }

    /// Ends the run if its progress says it ended.
    fn check_run_end(&mut self, id: RunId) {
        let r = &self.workflows.runs[&id];
        let status = match r.progress.as_ref().map(|p| p.state) {
            Some(RunState::Succeeded) => RunStatus::Succeeded,
            Some(RunState::Failed) => RunStatus::Failed,
            Some(RunState::Cancelled) => RunStatus::Cancelled,
            _ => return,
        };
        if r.status == RunStatus::Running {
            self.end_run(id, status);
        }
    }

    /// Records a run's end and lets a queued run of its workflow start.
    fn end_run(&mut self, id: RunId, status: RunStatus) {
        let now = self.clock_ms;
        let r = self.workflows.runs.get_mut(&id).expect("exists");
        r.status = status;
        r.ended_at_ms = Some(now);
        let workflow = r.workflow.clone();
        self.workflows.ended.insert((now, id));
        if let Some(w) = self.workflows.defs.get_mut(&workflow) {
            w.active.remove(&id);
            w.queued.retain(|q| *q != id);
            match status {
                RunStatus::Succeeded => w.counts.succeeded += 1,
                RunStatus::Failed => w.counts.failed += 1,
                RunStatus::Cancelled => w.counts.cancelled += 1,
                _ => {}
            }
        }
        self.admit_runs(&workflow);
    }

    /// `run cancel`: every task not final is cancelled (running attempts are killed at their
    /// worker's next heartbeat), queued runs never start.
    pub(super) fn cancel_run(&mut self, id: RunId) -> Result<CommandOutput, CommandError> {
        let r = self
            .workflows
            .runs
            .get_mut(&id)
            .ok_or_else(|| CommandError::Invalid(format!("run {id} not found")))?;
        match r.status {
            RunStatus::Queued => self.end_run(id, RunStatus::Cancelled),
            RunStatus::Running => {
                let progress = r.progress.as_mut().expect("running runs have progress");
                let started = progress.cancel(&r.spec.graph);
                let tasks: Vec<TaskId> = started.iter().filter_map(|&n| r.tasks[n]).collect();
                for t in tasks {
                    // Already final tasks refuse; the run counts them as cancelled anyway.
                    let _ = self.cancel(t);
                }
                // Ends the run once, whether or not a task's cancel ended it already.
                self.check_run_end(id);
            }
            s => {
                return Err(CommandError::Invalid(format!(
                    "run {id} is {} already; only a queued or running run can be cancelled",
                    s.as_str()
                )))
            }
        }
        Ok(CommandOutput::RunUpdated {
            run: id,
            status: RunStatus::Cancelled,
        })
    }

    /// `run retry`: the failed and upstream-failed nodes (and, unless `failed_only`, the
    /// skipped and cancelled ones) run again with everything downstream of them; succeeded
    /// nodes keep their results. The run counts as active again (beyond `max_active_runs`
    /// if need be: an operator's retry is not queued).
    pub(super) fn retry_run(
        &mut self,
        id: RunId,
        failed_only: bool,
    ) -> Result<CommandOutput, CommandError> {
        let r = self
            .workflows
            .runs
            .get_mut(&id)
            .ok_or_else(|| CommandError::Invalid(format!("run {id} not found")))?;
        let Some(progress) = r.progress.as_mut() else {
            return Err(CommandError::Invalid(format!(
                "run {id} is {}: it never started, so there is nothing to retry",
                r.status.as_str()
            )));
        };
        if r.status == RunStatus::Succeeded {
            return Err(CommandError::Invalid(format!(
                "run {id} succeeded: there is nothing to retry"
            )));
        }
        let rules = r.spec.rules();
        let before = progress.nodes.clone();
        let Some(start) = progress.retry(&r.spec.graph, &rules, failed_only) else {
            return Err(CommandError::Invalid(format!(
                "run {id} is still running: wait for it to end, or cancel it first"
            )));
        };
        for (node, (old, new)) in before.iter().zip(&progress.nodes).enumerate() {
            // A reset node's state changed (decided again from Waiting, never to the same
            // final state, as retry resets only nodes that did not succeed).
            if old != new {
                if let Some(t) = r.tasks[node].take() {
                    r.earlier.push((node as u32, t));
                }
            }
        }
        r.status = RunStatus::Running;
        if let Some(at) = r.ended_at_ms.take() {
            self.workflows.ended.remove(&(at, id));
        }
        let r = self.workflows.runs.get_mut(&id).expect("exists");
        r.retries += 1;
        let workflow = r.workflow.clone();
        if let Some(w) = self.workflows.defs.get_mut(&workflow) {
            w.active.insert(id);
        }
        self.create_node_tasks(id, &start);
        self.check_run_end(id);
        Ok(CommandOutput::RunUpdated {
            run: id,
            status: self.workflows.runs[&id].status,
        })
    }

    /// `submit --after`: the task is recorded now and held until every task of `after` has
    /// succeeded; if one of them ends otherwise, the held task is cancelled.
    pub(super) fn submit_after(
        &mut self,
        index: u64,
        request_id: RequestId,
        spec: &TaskSpec,
        pool: Option<&PoolClaim>,
        after: &[TaskId],
    ) -> Result<CommandOutput, CommandError> {
        if let Some(id) = self.requests.get(&request_id) {
            return Ok(CommandOutput::TaskSubmitted {
                id: *id,
                duplicate: true,
            });
        }
        spec.validate()?;
        if spec.idempotency_key.is_some() {
            return Err(CommandError::Invalid(
                "a task submitted with --after takes no idempotency key".into(),
            ));
        }
        if after.is_empty() || after.len() > MAX_AFTER {
            return Err(CommandError::Invalid(format!(
                "--after names {} tasks: name 1 to {MAX_AFTER}",
                after.len()
            )));
        }
        if let Some(c) = pool {
            self.check_claim(c)?;
        }
        let mut pending = 0u32;
        let mut unique: Vec<TaskId> = after.to_vec();
        unique.sort_unstable();
        unique.dedup();
        for up in &unique {
            let t = self.tasks.get(up).ok_or_else(|| {
                CommandError::Invalid(format!(
                    "--after: task {up} not found (it never existed, or it finished and was \
                     purged)"
                ))
            })?;
            match t.state {
                TaskState::Succeeded => {}
                TaskState::Dead | TaskState::Cancelled => {
                    return Err(CommandError::Invalid(format!(
                        "--after: task {up} is {} and will not succeed; retry it first",
                        t.state.as_str()
                    )))
                }
                _ => pending += 1,
            }
        }
        // The task (and `task show`) can see what it waited for, e.g. to read their output.
        let mut spec = spec.clone();
        let ids: Vec<String> = unique.iter().map(|t| t.to_string()).collect();
        spec.env.push(("FLEET_AFTER".into(), ids.join(",")));
        let id = self.insert_held_task(index, spec, pending == 0);
        self.remember_request(request_id, id);
        if let Some(c) = pool {
            self.add_claim(id, c.clone());
        }
        let deps = &mut self.workflows.after;
        deps.upstream.insert(id, unique.clone());
        if pending > 0 {
            deps.waiting.insert(id, pending);
            for up in unique {
                if !self.tasks[&up].state.is_final() {
                    deps.dependents.entry(up).or_default().push(id);
                }
            }
        }
        Ok(CommandOutput::TaskSubmitted {
            id,
            duplicate: false,
        })
    }

    /// Releases or cancels the tasks held for `task`, which reached `state`.
    fn release_dependents(&mut self, task: TaskId, state: TaskState) {
        // A held task that ended itself (cancelled) no longer waits.
        self.workflows.after.waiting.remove(&task);
        let Some(held) = self.workflows.after.dependents.remove(&task) else {
            return;
        };
        for h in held {
            let Some(left) = self.workflows.after.waiting.get_mut(&h) else {
                continue; // cancelled meanwhile
            };
            if state == TaskState::Succeeded {
                *left -= 1;
                if *left == 0 {
                    self.workflows.after.waiting.remove(&h);
                    self.release_held(h);
                }
            } else {
                self.workflows.after.waiting.remove(&h);
                self.workflows
                    .after
                    .upstream_failed
                    .insert(h, (task, state));
                let _ = self.cancel(h);
            }
        }
    }

    /// Whether a queued task is held for upstream tasks (`--after`).
    pub fn is_held(&self, task: TaskId) -> bool {
        self.workflows.after.waiting.contains_key(&task)
    }

    /// A retained task was purged: forget what the workflows knew of it.
    pub(super) fn forget_node(&mut self, task: TaskId) {
        self.workflows.node_of.remove(&task);
        let deps = &mut self.workflows.after;
        deps.upstream.remove(&task);
        deps.upstream_failed.remove(&task);
    }

    /// Forgets at most `max` runs that ended at or before `ended_before_ms`.
    pub(super) fn purge_runs(&mut self, ended_before_ms: u64, max: u32) {
        let old: Vec<(u64, RunId)> = self
            .workflows
            .ended
            .iter()
            .take_while(|(at, _)| *at <= ended_before_ms)
            .take(max as usize)
            .copied()
            .collect();
        for (at, id) in old {
            self.workflows.ended.remove(&(at, id));
            if let Some(r) = self.workflows.runs.remove(&id) {
                self.workflows.keys.remove(&r.key);
                for t in r
                    .tasks
                    .iter()
                    .flatten()
                    .chain(r.earlier.iter().map(|e| &e.1))
                {
                    self.workflows.node_of.remove(t);
                }
            }
        }
    }

    /// `task retry` on a task of a run is refused: the run decides what runs next.
    pub(super) fn check_not_run_task(&self, task: TaskId) -> Result<(), CommandError> {
        match self.workflows.node_of(task) {
            Some((r, node)) => Err(CommandError::Invalid(format!(
                "task {task} is task {node:?} of run {} (workflow {:?}): retry the run with \
                 `fleet run retry {}`",
                r.id, r.workflow, r.id
            ))),
            None => Ok(()),
        }
    }

    /// `workflow backfill`: a run for each given past fire time of the workflow's schedule
    /// that has none retained (a tick's run, scheduled or backfilled, has the same key), each
    /// queued behind `max_active_runs` like any run.
    pub(super) fn backfill_workflow(
        &mut self,
        name: &str,
        fires: &[u64],
    ) -> Result<CommandOutput, CommandError> {
        let w = self
            .workflows
            .defs
            .get(name)
            .ok_or_else(|| CommandError::Invalid(format!("no workflow named {name:?}")))?;
        let sid = w.schedule.ok_or_else(|| {
            CommandError::Invalid(format!(
                "workflow {name:?} has no schedule: a backfill runs its schedule's past ticks \
                 (add a [schedule] table, or start runs with `fleet workflow run`)"
            ))
        })?;
        if fires.len() > super::schedules::MAX_BACKFILL {
            return Err(CommandError::Invalid(format!(
                "a backfill of {} ticks; at most {} at once",
                fires.len(),
                super::schedules::MAX_BACKFILL
            )));
        }
        let now = self.clock_ms;
        let mut created = Vec::new();
        let mut existing = 0;
        for &fire in fires {
            let key = super::schedules::run_id(name, fire, super::RunKind::Backfill, None);
            if self.workflows.keys.contains_key(&key) {
                existing += 1;
                continue;
            }
            let run = self.tick_workflow(name, key, fire)?;
            created.push((fire, run));
            self.schedules.record_workflow_run(sid, fire, run, now);
        }
        Ok(CommandOutput::WorkflowRuns { created, existing })
    }

    /// The run a schedule's tick starts, for a workflow's schedule.
    pub(super) fn tick_workflow(
        &mut self,
        workflow: &str,
        key: String,
        fire_ms: u64,
    ) -> Result<RunId, CommandError> {
        self.start_run(workflow, key, &[], Some(fire_ms))
            .map(|(id, _)| id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::testing::Applier;
    use crate::state::workflows::Graph;
    use crate::state::{AttemptOutcome, Command, WorkerId};

    /// A workflow of `edges` (task -> upstream) whose tasks run `true` with one attempt.
    fn spec(edges: &[(&str, &[&str])], max_active_runs: u32) -> WorkflowSpec {
        let after: BTreeMap<String, Vec<String>> = edges
            .iter()
            .map(|(n, u)| (n.to_string(), u.iter().map(|s| s.to_string()).collect()))
            .collect();
        let graph = Graph::new(&after).unwrap();
        let nodes = graph
            .names
            .iter()
            .map(|_| {
                let mut task = TaskSpec::new(vec!["true".into()], "default");
                task.retry.max_attempts = 1;
                NodeSpec {
                    task,
                    pool: None,
                    trigger: TriggerRule::AllSuccess,
                }
            })
            .collect();
        WorkflowSpec {
            graph,
            nodes,
            max_active_runs,
        }
    }

    struct Sm {
        a: Applier,
        now: u64,
        next_request: u128,
    }

    impl Sm {
        fn new() -> Sm {
            Sm {
                a: Applier::default(),
                now: 1_000,
                next_request: 0,
            }
        }
        fn cmd(&mut self, c: Command) -> Result<CommandOutput, CommandError> {
            self.now += 10;
            self.a.one(self.now, c)
        }
        fn put(&mut self, name: &str, spec: WorkflowSpec) {
            self.cmd(Command::PutWorkflow {
                name: name.into(),
                spec,
                schedule: None,
            })
            .unwrap();
        }
        fn start(&mut self, name: &str) -> RunId {
            self.next_request += 1;
            match self.cmd(Command::StartRun {
                workflow: name.into(),
                request_id: RequestId(self.next_request),
                params: vec![("DAY".into(), "2026-12-03".into())],
            }) {
                Ok(CommandOutput::RunStarted { run, .. }) => run,
                other => panic!("{other:?}"),
            }
        }
        fn run(&self, id: RunId) -> &Run {
            self.a.state.workflows().run(id).unwrap()
        }
        /// The node names of the run with a task waiting for a worker.
        fn ready(&self, id: RunId) -> Vec<&str> {
            let r = self.run(id);
            let s = &self.a.state;
            r.tasks
                .iter()
                .enumerate()
                .filter_map(|(n, t)| Some((n, s.task((*t)?)?)))
                .filter(|(_, t)| t.state == TaskState::Queued && !s.is_held(t.id))
                .map(|(n, _)| r.spec.graph.names[n].as_str())
                .collect()
        }
        fn task_of(&self, id: RunId, node: &str) -> TaskId {
            let r = self.run(id);
            let n = r.spec.graph.names.iter().position(|x| x == node).unwrap();
            r.tasks[n].unwrap()
        }
        /// Leases the task and reports `ok`.
        fn finish(&mut self, task: TaskId, ok: bool) {
            let grant = match self.cmd(Command::GrantLeasesTo {
                worker: WorkerId(1),
                worker_name: "w1".into(),
                tasks: vec![task],
            }) {
                Ok(CommandOutput::LeasesGranted { mut grants }) => grants.pop().unwrap(),
                other => panic!("{other:?}"),
            };
            let outcome = if ok {
                AttemptOutcome::Succeeded
            } else {
                AttemptOutcome::Failed {
                    exit_code: Some(1),
                    signal: None,
                    error: None,
                }
            };
            self.cmd(Command::Complete {
                task,
                fencing_token: grant.fencing_token,
                outcome,
                output_tail: String::new(),
                retry_jitter_permille: 0,
            })
            .unwrap();
        }
        fn node(&mut self, id: RunId, node: &str, ok: bool) {
            let t = self.task_of(id, node);
            self.finish(t, ok);
        }
    }

    const DIAMOND: &[(&str, &[&str])] =
        &[("a", &[]), ("b", &["a"]), ("c", &["a"]), ("d", &["b", "c"])];

    #[test]
    fn a_run_creates_each_task_when_its_upstream_succeeded() {
        let mut sm = Sm::new();
        sm.put("diamond", spec(DIAMOND, 1));
        let run = sm.start("diamond");
        assert_eq!(sm.ready(run), ["a"], "only the root has a task");
        assert_eq!(sm.run(run).tasks.iter().flatten().count(), 1);
        let a = sm.task_of(run, "a");
        let env = &sm.a.state.task(a).unwrap().spec.env;
        for (k, v) in [
            ("FLEET_RUN_ID", "1"),
            ("FLEET_WORKFLOW", "diamond"),
            ("FLEET_TASK_NAME", "a"),
            ("FLEET_PARAM_DAY", "2026-12-03"),
        ] {
            assert!(env.contains(&(k.into(), v.into())), "{k} in {env:?}");
        }
        sm.node(run, "a", true);
        assert_eq!(sm.ready(run), ["b", "c"]);
        sm.node(run, "b", true);
        assert_eq!(sm.ready(run), ["c"], "d waits for c");
        sm.node(run, "c", true);
        assert_eq!(sm.ready(run), ["d"]);
        assert_eq!(sm.run(run).status, RunStatus::Running);
        sm.node(run, "d", true);
        assert_eq!(sm.run(run).status, RunStatus::Succeeded);
        let w = sm.a.state.workflows().get("diamond").unwrap();
        assert_eq!((w.counts.started, w.counts.succeeded), (1, 1));
        assert!(w.active.is_empty());
    }

    #[test]
    fn a_failure_fails_downstream_and_retry_failed_only_keeps_what_succeeded() {
        let mut sm = Sm::new();
        sm.put("diamond", spec(DIAMOND, 1));
        let run = sm.start("diamond");
        sm.node(run, "a", true);
        sm.node(run, "b", false);
        let states = |sm: &Sm| sm.run(run).node_states();
        assert_eq!(
            states(&sm),
            [
                NodeState::Succeeded,
                NodeState::Failed,
                NodeState::Started,
                NodeState::UpstreamFailed
            ]
        );
        assert!(sm.run(run).tasks[3].is_none(), "d never got a task");
        sm.node(run, "c", true);
        assert_eq!(sm.run(run).status, RunStatus::Failed);
        let e = sm
            .cmd(Command::Retry {
                task: sm.task_of(run, "b"),
            })
            .unwrap_err();
        assert!(e.to_string().contains("fleet run retry 1"), "{e}");
        let (a, b, c) = (
            sm.task_of(run, "a"),
            sm.task_of(run, "b"),
            sm.task_of(run, "c"),
        );
        sm.cmd(Command::RetryRun {
            run,
            failed_only: true,
        })
        .unwrap();
        assert_eq!(sm.run(run).status, RunStatus::Running);
        assert_eq!(sm.ready(run), ["b"], "only the failed task runs again");
        assert_eq!(sm.task_of(run, "a"), a, "succeeded tasks are kept");
        assert_eq!(sm.task_of(run, "c"), c);
        assert_ne!(sm.task_of(run, "b"), b, "a new task for b");
        assert_eq!(sm.run(run).earlier, [(1, b)]);
        sm.node(run, "b", true);
        sm.node(run, "d", true);
        assert_eq!(sm.run(run).status, RunStatus::Succeeded);
        let w = sm.a.state.workflows().get("diamond").unwrap();
        assert_eq!((w.counts.failed, w.counts.succeeded), (1, 1));
        // The old task of b ending (it had ended already) changes nothing.
        assert_eq!(sm.a.state.task(b).unwrap().state, TaskState::Dead);
    }

    #[test]
    fn max_active_runs_queues_runs_until_one_ends() {
        let mut sm = Sm::new();
        sm.put("one", spec(&[("x", &[])], 2));
        let runs: Vec<RunId> = (0..4).map(|_| sm.start("one")).collect();
        let status: Vec<RunStatus> = runs.iter().map(|r| sm.run(*r).status).collect();
        use RunStatus::*;
        assert_eq!(status, [Running, Running, Queued, Queued]);
        assert!(sm.run(runs[2]).tasks.iter().all(Option::is_none));
        sm.node(runs[1], "x", true);
        assert_eq!(
            sm.run(runs[2]).status,
            Running,
            "the oldest queued run starts"
        );
        assert_eq!(sm.run(runs[3]).status, Queued);
        sm.cmd(Command::CancelRun { run: runs[3] }).unwrap();
        assert_eq!(sm.run(runs[3]).status, Cancelled);
        // Raising the limit starts queued runs at once.
        let r5 = sm.start("one");
        assert_eq!(sm.run(r5).status, Queued);
        sm.put("one", spec(&[("x", &[])], 3));
        assert_eq!(sm.run(r5).status, Running);
        // A retried request makes no second run.
        let again = sm.cmd(Command::StartRun {
            workflow: "one".into(),
            request_id: RequestId(sm.next_request),
            params: vec![],
        });
        assert_eq!(
            again,
            Ok(CommandOutput::RunStarted {
                run: r5,
                duplicate: true
            })
        );
        // A running run cancelled counts once (its tasks' cancels end it too).
        sm.cmd(Command::CancelRun { run: runs[2] }).unwrap();
        let w = sm.a.state.workflows().get("one").unwrap();
        assert_eq!(
            (w.counts.started, w.counts.succeeded, w.counts.cancelled),
            (4, 1, 2),
            "{:?}",
            w.counts
        );
    }

    #[test]
    fn cancelling_a_run_cancels_its_tasks_and_a_new_definition_leaves_runs_alone() {
        let mut sm = Sm::new();
        sm.put("diamond", spec(DIAMOND, 5));
        let run = sm.start("diamond");
        sm.node(run, "a", true);
        let b = sm.task_of(run, "b");
        sm.put("diamond", spec(&[("only", &[])], 5));
        assert_eq!(
            sm.run(run).spec.nodes.len(),
            4,
            "the run keeps its definition"
        );
        sm.cmd(Command::CancelRun { run }).unwrap();
        assert_eq!(sm.run(run).status, RunStatus::Cancelled);
        assert_eq!(sm.a.state.task(b).unwrap().state, TaskState::Cancelled);
        let e = sm.cmd(Command::CancelRun { run }).unwrap_err();
        assert!(e.to_string().contains("cancelled already"), "{e}");
        // Retry (not failed-only) runs the cancelled tasks again.
        sm.cmd(Command::RetryRun {
            run,
            failed_only: false,
        })
        .unwrap();
        assert_eq!(sm.ready(run), ["b", "c"]);
        sm.cmd(Command::DeleteWorkflow {
            name: "diamond".into(),
        })
        .unwrap();
        sm.node(run, "b", true);
        sm.node(run, "c", true);
        sm.node(run, "d", true);
        assert_eq!(
            sm.run(run).status,
            RunStatus::Succeeded,
            "runs outlive a delete"
        );
    }

    #[test]
    fn a_task_submitted_after_others_waits_for_them_to_succeed() {
        let mut sm = Sm::new();
        let submit = |sm: &mut Sm, rid: u128, after: Vec<TaskId>| {
            let mut spec = TaskSpec::new(vec!["true".into()], "default");
            spec.retry.max_attempts = 1;
            let c = if after.is_empty() {
                Command::SubmitTask {
                    request_id: RequestId(rid),
                    spec,
                }
            } else {
                Command::SubmitAfter {
                    request_id: RequestId(rid),
                    spec,
                    pool: None,
                    after,
                }
            };
            match sm.cmd(c) {
                Ok(CommandOutput::TaskSubmitted { id, .. }) => id,
                other => panic!("{other:?}"),
            }
        };
        let u1 = submit(&mut sm, 1, vec![]);
        let u2 = submit(&mut sm, 2, vec![]);
        let held = submit(&mut sm, 3, vec![u1, u2]);
        let ready = |sm: &Sm| sm.a.state.pick_ready(&["default".into()], 10, sm.now);
        assert_eq!(ready(&sm), [u1, u2], "the held task is not offered");
        sm.finish(u1, true);
        assert!(sm.a.state.is_held(held));
        sm.finish(u2, true);
        assert!(!sm.a.state.is_held(held));
        assert_eq!(ready(&sm), [held]);
        let env = &sm.a.state.task(held).unwrap().spec.env;
        assert!(
            env.contains(&("FLEET_AFTER".into(), format!("{u1},{u2}"))),
            "{env:?}"
        );
        // An upstream that fails cancels what waits for it, and says why.
        let u3 = submit(&mut sm, 4, vec![]);
        let held2 = submit(&mut sm, 5, vec![u3]);
        sm.finish(u3, false);
        assert_eq!(sm.a.state.task(held2).unwrap().state, TaskState::Cancelled);
        assert_eq!(
            sm.a.state.workflows().after.upstream_failed[&held2],
            (u3, TaskState::Dead)
        );
        // Unknown and already-dead upstream tasks are refused by id.
        let mut spec = TaskSpec::new(vec!["true".into()], "default");
        spec.retry.max_attempts = 1;
        for (after, want) in [(TaskId(99), "task 99 not found"), (u3, "is dead")] {
            let e = sm
                .cmd(Command::SubmitAfter {
                    request_id: RequestId(100 + after.0 as u128),
                    spec: spec.clone(),
                    pool: None,
                    after: vec![after],
                })
                .unwrap_err();
            assert!(e.to_string().contains(want), "{e}");
        }
    }

    #[test]
    fn a_scheduled_workflow_runs_once_per_tick_and_backfills_the_ticks_without_a_run() {
        use crate::state::schedules::{PlannedRun, TickPlan, Trigger};
        let mut sm = Sm::new();
        let sched = crate::schedule::tests::spec(Trigger::Every {
            every_ms: 1_000,
            anchor_ms: 0,
        });
        sm.cmd(Command::PutWorkflow {
            name: "tick".into(),
            spec: spec(&[("x", &[])], 100),
            schedule: Some(sched),
        })
        .unwrap();
        let sid = sm.a.state.schedules().get("tick").unwrap().id;
        assert_eq!(sm.a.state.workflows().owner_of(sid), Some("tick"));
        // A plan for the ticks at 2 s and 3 s, proposed twice (a new leader re-proposing it).
        let after = sm.a.state.schedules().get("tick").unwrap().fired_through_ms;
        let plan = TickPlan {
            schedule: sid,
            after_ms: after,
            through_ms: 3_000,
            runs: [2_000, 3_000]
                .map(|f| PlannedRun {
                    fire_ms: f,
                    jitter_ms: 0,
                    catch_up: false,
                })
                .to_vec(),
            missed: vec![],
        };
        for _ in 0..2 {
            sm.cmd(Command::FireTicks {
                plans: vec![plan.clone()],
            })
            .unwrap();
        }
        let fires = |sm: &Sm| {
            let mut f: Vec<u64> =
                sm.a.state
                    .workflows()
                    .runs(None, Some("tick"), None)
                    .map(|r| r.fire_ms.unwrap())
                    .collect();
            f.sort();
            f
        };
        assert_eq!(fires(&sm), [2_000, 3_000], "one run per tick");
        let r =
            sm.a.state
                .workflows()
                .runs(None, None, None)
                .next()
                .unwrap();
        let t = sm.a.state.task(r.tasks[0].unwrap()).unwrap();
        assert!(t
            .spec
            .env
            .contains(&("FLEET_FIRE_TIME".into(), "1970-01-01T00:00:03Z".into())));
        // A backfill of 1 s to 3 s creates only the tick without a run.
        let out = sm
            .cmd(Command::BackfillWorkflow {
                name: "tick".into(),
                fires: vec![1_000, 2_000, 3_000],
            })
            .unwrap();
        let CommandOutput::WorkflowRuns { created, existing } = out else {
            panic!("{out:?}")
        };
        assert_eq!((created.len(), existing), (1, 2));
        assert_eq!(fires(&sm), [1_000, 2_000, 3_000]);
        // The schedule is the workflow's: refused as a plain schedule's command.
        let e = sm
            .cmd(Command::TriggerSchedule {
                name: "tick".into(),
                key: 1,
            })
            .unwrap_err();
        assert!(e.to_string().contains("belongs to workflow"), "{e}");
        // Without a schedule there is nothing to backfill; deleting removes the schedule.
        sm.put("tick", spec(&[("x", &[])], 100));
        assert!(sm.a.state.schedules().get("tick").is_none());
        let e = sm
            .cmd(Command::BackfillWorkflow {
                name: "tick".into(),
                fires: vec![1_000],
            })
            .unwrap_err();
        assert!(e.to_string().contains("has no schedule"), "{e}");
    }

    #[test]
    fn workflows_and_runs_survive_a_snapshot() {
        let mut sm = Sm::new();
        sm.put("diamond", spec(DIAMOND, 1));
        let run = sm.start("diamond");
        sm.start("diamond");
        sm.node(run, "a", true);
        let bytes = crate::raft::state_machine_store::encode_state(&sm.a.state).unwrap();
        let read = crate::raft::state_machine_store::decode_state("t", &bytes).unwrap();
        assert_eq!(read, sm.a.state);
        assert_eq!(read.workflows().runs(None, None, None).count(), 2);
        let older: Vec<RunId> = read
            .workflows()
            .runs(Some(RunId(2)), None, None)
            .map(|r| r.id)
            .collect();
        assert_eq!(older, [run], "paging: runs older than run 2");
    }
}
