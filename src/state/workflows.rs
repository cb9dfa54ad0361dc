//! Workflows: the graph of a workflow definition and the trigger rules that decide when a
//! task of a run may start. Pure logic, like the rest of `state`: no IO, no clock.
//!
//! A workflow is a set of named tasks, each with the names of the tasks it runs `after` and a
//! [`TriggerRule`] (Airflow's names). [`Graph::new`] checks a definition once, when it is
//! applied: every upstream exists, no task is its own upstream, and there is no cycle (the
//! error names the cycle's path). It keeps each task's downstream edges, so that deciding what
//! a finished task unblocks costs O(its downstream edges), never O(run size).
//!
//! [`TriggerRule::decide`] is the whole readiness rule: given how a task's upstream tasks have
//! ended so far ([`UpstreamCounts`]), the task waits, becomes ready, or can never run and ends
//! `upstream_failed` or `skipped`.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::CommandError;

/// Most tasks in one workflow. A run creates all of them in one Raft entry, so this bounds an
/// entry (with [`MAX_WORKFLOW_EDGES`]) as `MAX_SUBMIT_BATCH` bounds a submission.
pub const MAX_WORKFLOW_TASKS: usize = 10_000;
/// Most `after` edges in one workflow.
pub const MAX_WORKFLOW_EDGES: usize = 100_000;
/// Longest task name in a workflow (names appear in `run show` and in metrics-free logs).
pub const MAX_WORKFLOW_TASK_NAME: usize = 128;

/// When a task of a run may start, given how its upstream tasks ended (Airflow's rules).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TriggerRule {
    /// Every upstream succeeded (the default).
    #[default]
    AllSuccess,
    /// Every upstream ended, however.
    AllDone,
    /// At least one upstream succeeded (starts as soon as one does).
    OneSuccess,
    /// At least one upstream failed (starts as soon as one does).
    OneFailed,
    /// Every upstream failed.
    AllFailed,
}

impl TriggerRule {
    pub const NAMES: &'static str = "all_success, all_done, one_success, one_failed, all_failed";

    pub fn as_str(self) -> &'static str {
        match self {
            TriggerRule::AllSuccess => "all_success",
            TriggerRule::AllDone => "all_done",
            TriggerRule::OneSuccess => "one_success",
            TriggerRule::OneFailed => "one_failed",
            TriggerRule::AllFailed => "all_failed",
        }
    }

    pub fn parse(s: &str) -> Result<TriggerRule, String> {
        [
            TriggerRule::AllSuccess,
            TriggerRule::AllDone,
            TriggerRule::OneSuccess,
            TriggerRule::OneFailed,
            TriggerRule::AllFailed,
        ]
        .into_iter()
        .find(|r| r.as_str() == s)
        .ok_or_else(|| format!("trigger {s:?} is not valid: use one of {}", Self::NAMES))
    }

    /// What a task with this rule does now. A task without upstream tasks is ready at once.
    pub fn decide(self, up: UpstreamCounts) -> Readiness {
        use Readiness::*;
        if up.total == 0 {
            return Ready;
        }
        let done = up.done();
        let all_done = done == up.total;
        match self {
            TriggerRule::AllSuccess => {
                if up.failed > 0 {
                    UpstreamFailed
                } else if up.skipped > 0 {
                    Skipped
                } else if up.succeeded == up.total {
                    Ready
                } else {
                    Wait
                }
            }
            TriggerRule::AllDone => {
                if all_done {
                    Ready
                } else {
                    Wait
                }
            }
            TriggerRule::OneSuccess => {
                if up.succeeded > 0 {
                    Ready
                } else if !all_done {
                    Wait
                } else if up.failed > 0 {
                    UpstreamFailed
                } else {
                    Skipped
                }
            }
            TriggerRule::OneFailed => {
                if up.failed > 0 {
                    Ready
                } else if all_done {
                    Skipped
                } else {
                    Wait
                }
            }
            TriggerRule::AllFailed => {
                if up.succeeded > 0 || up.skipped > 0 {
                    Skipped
                } else if up.failed == up.total {
                    Ready
                } else {
                    Wait
                }
            }
        }
    }
}

/// How a task's upstream tasks have ended so far. `failed` counts tasks that failed for good
/// (dead) and tasks that ended `upstream_failed`; `skipped` counts skipped and cancelled ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct UpstreamCounts {
    pub total: u32,
    pub succeeded: u32,
    pub failed: u32,
    pub skipped: u32,
}

impl UpstreamCounts {
    pub fn done(&self) -> u32 {
        self.succeeded + self.failed + self.skipped
    }
}

/// What a task of a run does, decided by its trigger rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// Not decided yet: an upstream task that matters has not ended.
    Wait,
    /// May start now.
    Ready,
    /// Can never start: the upstream failures make the rule unsatisfiable.
    UpstreamFailed,
    /// Can never start, without a failure to blame (Airflow's `skipped`).
    Skipped,
}

/// A checked workflow graph: task names in a stable order, with edges both ways.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Graph {
    /// Task names, sorted (the index of a name is its node number).
    pub names: Vec<String>,
    /// `upstream[i]`: the nodes task `i` runs after.
    pub upstream: Vec<Vec<usize>>,
    /// `downstream[i]`: the nodes that run after task `i`.
    pub downstream: Vec<Vec<usize>>,
}

impl Graph {
    /// Checks `after` (task name -> its upstream names) and builds the graph. Errors name the
    /// unknown upstream, the self-dependency, the cycle's path or the limit.
    pub fn new(after: &BTreeMap<String, Vec<String>>) -> Result<Graph, CommandError> {
        let invalid = |m: String| Err(CommandError::Invalid(m));
        if after.is_empty() {
            return invalid("a workflow needs at least one task".into());
        }
        if after.len() > MAX_WORKFLOW_TASKS {
            return invalid(format!(
                "a workflow of {} tasks is too large: at most {MAX_WORKFLOW_TASKS} tasks",
                after.len()
            ));
        }
        let names: Vec<String> = after.keys().cloned().collect();
        for name in &names {
            check_task_name(name)?;
        }
        let index: BTreeMap<&str, usize> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.as_str(), i))
            .collect();
        let mut upstream = vec![Vec::new(); names.len()];
        let mut downstream = vec![Vec::new(); names.len()];
        let mut edges = 0usize;
        for (i, (name, ups)) in after.iter().enumerate() {
            let mut seen = BTreeSet::new();
            for up in ups {
                let Some(&u) = index.get(up.as_str()) else {
                    return invalid(format!(
                        "task {name:?} runs after {up:?}, which is not a task of this workflow"
                    ));
                };
                if u == i {
                    return invalid(format!("task {name:?} runs after itself"));
                }
                if !seen.insert(u) {
                    return invalid(format!("task {name:?} lists {up:?} twice in `after`"));
                }
                upstream[i].push(u);
                downstream[u].push(i);
                edges += 1;
            }
        }
        if edges > MAX_WORKFLOW_EDGES {
            return invalid(format!(
                "a workflow of {edges} `after` edges is too large: at most {MAX_WORKFLOW_EDGES}"
            ));
        }
        let graph = Graph {
            names,
            upstream,
            downstream,
        };
        if let Some(cycle) = graph.find_cycle() {
            let name = |i: &usize| graph.names[*i].as_str();
            let shown = if cycle.len() <= 12 {
                cycle.iter().map(name).collect::<Vec<_>>().join(" -> ")
            } else {
                format!(
                    "{} -> ... ({} tasks in all) -> {}",
                    cycle[..8].iter().map(name).collect::<Vec<_>>().join(" -> "),
                    cycle.len() - 1,
                    cycle[cycle.len() - 2..]
                        .iter()
                        .map(name)
                        .collect::<Vec<_>>()
                        .join(" -> ")
                )
            };
            return invalid(format!(
                "the workflow has a cycle: {shown} (a task cannot run after itself, even \
                 indirectly)"
            ));
        }
        Ok(graph)
    }

    /// A cycle as a path that starts and ends at the same node, if there is one. Iterative
    /// depth-first search (a 10,000-task chain must not overflow the stack).
    fn find_cycle(&self) -> Option<Vec<usize>> {
        const NEW: u8 = 0;
        const ON_PATH: u8 = 1;
        const DONE: u8 = 2;
        let mut mark = vec![NEW; self.names.len()];
        for root in 0..self.names.len() {
            if mark[root] != NEW {
                continue;
            }
            // (node, next downstream edge to follow)
            let mut path: Vec<(usize, usize)> = vec![(root, 0)];
            mark[root] = ON_PATH;
            while let Some(top) = path.last_mut() {
                let node = top.0;
                if let Some(&child) = self.downstream[node].get(top.1) {
                    top.1 += 1;
                    match mark[child] {
                        NEW => {
                            mark[child] = ON_PATH;
                            path.push((child, 0));
                        }
                        ON_PATH => {
                            let from = path.iter().position(|&(n, _)| n == child)?;
                            let mut cycle: Vec<usize> =
                                path[from..].iter().map(|&(n, _)| n).collect();
                            cycle.push(child);
                            return Some(cycle);
                        }
                        _ => {}
                    }
                } else {
                    mark[node] = DONE;
                    path.pop();
                }
            }
        }
        None
    }

    /// The tasks in topological layers: layer 0 has no upstream, each later task sits one
    /// layer below its deepest upstream. Within a layer, by name.
    pub fn layers(&self) -> Vec<Vec<usize>> {
        let mut depth = vec![0usize; self.names.len()];
        let mut pending: Vec<usize> = self.upstream.iter().map(Vec::len).collect();
        let mut queue: std::collections::VecDeque<usize> =
            (0..self.names.len()).filter(|&i| pending[i] == 0).collect();
        while let Some(n) = queue.pop_front() {
            for &d in &self.downstream[n] {
                depth[d] = depth[d].max(depth[n] + 1);
                pending[d] -= 1;
                if pending[d] == 0 {
                    queue.push_back(d);
                }
            }
        }
        let deepest = depth.iter().copied().max().unwrap_or(0);
        let mut layers = vec![Vec::new(); deepest + 1];
        for (i, d) in depth.into_iter().enumerate() {
            layers[d].push(i);
        }
        layers
    }
}

/// A task name: 1 to [`MAX_WORKFLOW_TASK_NAME`] characters of letters, digits, `-`, `_`, `.`.
pub fn check_task_name(name: &str) -> Result<(), CommandError> {
    check_name("task", name)
}

/// A workflow name: the same characters and length as a task name.
pub fn check_workflow_name(name: &str) -> Result<(), CommandError> {
    check_name("workflow", name)
}

fn check_name(kind: &str, name: &str) -> Result<(), CommandError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_WORKFLOW_TASK_NAME
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(CommandError::Invalid(format!(
            "{kind} name {name:?} is not valid: use 1 to {MAX_WORKFLOW_TASK_NAME} letters, \
             digits, '-', '_' or '.'"
        )))
    }
}

/// How a task of a run ended, as the run sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskEnd {
    Succeeded,
    /// Dead: every attempt failed.
    Failed,
    Cancelled,
}

/// Where one task of a run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    /// Its trigger rule is not decided yet.
    Waiting,
    /// Its trigger rule was met and the caller created the task (its id is kept by the caller).
    Started,
    Succeeded,
    Failed,
    /// Never ran: upstream failures made its trigger rule unsatisfiable.
    UpstreamFailed,
    /// Never ran: its trigger rule can no longer be met, with no failure to blame.
    Skipped,
    /// Cancelled with its run, started or not.
    Cancelled,
}

impl NodeState {
    pub fn is_final(self) -> bool {
        !matches!(self, NodeState::Waiting | NodeState::Started)
    }

    fn as_upstream(self) -> Option<fn(&mut UpstreamCounts)> {
        match self {
            NodeState::Succeeded => Some(|c| c.succeeded += 1),
            NodeState::Failed | NodeState::UpstreamFailed => Some(|c| c.failed += 1),
            NodeState::Skipped | NodeState::Cancelled => Some(|c| c.skipped += 1),
            NodeState::Waiting | NodeState::Started => None,
        }
    }
}

/// How a run ended (or that it has not).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    Running,
    /// Every task succeeded or was skipped.
    Succeeded,
    /// Some task failed, ended upstream_failed, or was cancelled on its own. Stricter than
    /// Airflow's leaf rule: a failure is never hidden by an `all_done` task after it that
    /// succeeded.
    Failed,
    Cancelled,
}

/// The progress of one run through its graph: one [`NodeState`] per task, and per task the
/// counts of its upstream tasks that ended, kept as they end (so a task's end costs O(its
/// downstream edges)). Pure: the caller creates and cancels the real tasks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunProgress {
    pub nodes: Vec<NodeState>,
    counts: Vec<UpstreamCounts>,
    /// Tasks not final yet; the run ends when it reaches 0.
    open: usize,
    pub state: RunState,
}

impl RunProgress {
    /// A new run: returns it and the tasks to start now (those without upstream, and any that
    /// the rules decide at once).
    pub fn start(graph: &Graph, rules: &[TriggerRule]) -> (RunProgress, Vec<usize>) {
        let n = graph.names.len();
        let mut run = RunProgress {
            nodes: vec![NodeState::Waiting; n],
            counts: graph
                .upstream
                .iter()
                .map(|u| UpstreamCounts {
                    total: u.len() as u32,
                    ..Default::default()
                })
                .collect(),
            open: n,
            state: RunState::Running,
        };
        let roots: Vec<usize> = (0..n).filter(|&i| graph.upstream[i].is_empty()).collect();
        let start = run.settle(graph, rules, roots);
        (run, start)
    }

    /// Task `node` ended: returns the tasks that may start now. A task that is not started
    /// (already final, or cancelled with its run) is ignored.
    pub fn task_ended(
        &mut self,
        graph: &Graph,
        rules: &[TriggerRule],
        node: usize,
        end: TaskEnd,
    ) -> Vec<usize> {
        if self.nodes.get(node) != Some(&NodeState::Started) {
            return Vec::new();
        }
        let state = match end {
            TaskEnd::Succeeded => NodeState::Succeeded,
            TaskEnd::Failed => NodeState::Failed,
            TaskEnd::Cancelled => NodeState::Cancelled,
        };
        self.finish(graph, node, state);
        let downstream = graph.downstream[node].clone();
        self.settle(graph, rules, downstream)
    }

    /// Cancels the run: every task not final is cancelled; returns the started ones (the
    /// caller cancels their tasks).
    pub fn cancel(&mut self, graph: &Graph) -> Vec<usize> {
        if self.state != RunState::Running {
            return Vec::new();
        }
        let mut started = Vec::new();
        for i in 0..self.nodes.len() {
            match self.nodes[i] {
                NodeState::Started => {
                    started.push(i);
                    self.finish(graph, i, NodeState::Cancelled)
                }
                NodeState::Waiting => self.finish(graph, i, NodeState::Cancelled),
                _ => {}
            }
        }
        self.state = RunState::Cancelled;
        started
    }

    /// Runs again the tasks that did not succeed (`failed_only`: only failed and
    /// upstream_failed ones, keeping skipped and cancelled ones as they are), and everything
    /// downstream of them; succeeded tasks are kept. Returns the tasks to start now. Refused
    /// (`None`) while the run is still running.
    pub fn retry(
        &mut self,
        graph: &Graph,
        rules: &[TriggerRule],
        failed_only: bool,
    ) -> Option<Vec<usize>> {
        if self.state == RunState::Running {
            return None;
        }
        let redo = |s: NodeState| match s {
            NodeState::Failed | NodeState::UpstreamFailed => true,
            NodeState::Skipped | NodeState::Cancelled => !failed_only,
            _ => false,
        };
        // The tasks to redo and everything downstream of them (a downstream task that
        // succeeded ran on the old results: Airflow's clear with downstream).
        let mut reset = vec![false; self.nodes.len()];
        let mut stack: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| redo(self.nodes[i]))
            .collect();
        while let Some(i) = stack.pop() {
            if !std::mem::replace(&mut reset[i], true) {
                stack.extend(graph.downstream[i].iter().copied());
            }
        }
        for (node, &r) in self.nodes.iter_mut().zip(&reset) {
            if r {
                *node = NodeState::Waiting;
            }
        }
        // Recount from scratch: retries are rare, and this keeps the counters exact.
        for (i, ups) in graph.upstream.iter().enumerate() {
            let mut c = UpstreamCounts {
                total: ups.len() as u32,
                ..Default::default()
            };
            for &u in ups {
                if let Some(add) = self.nodes[u].as_upstream() {
                    add(&mut c);
                }
            }
            self.counts[i] = c;
        }
        self.open = reset.iter().filter(|r| **r).count();
        self.state = RunState::Running;
        let candidates: Vec<usize> = (0..self.nodes.len()).filter(|&i| reset[i]).collect();
        Some(self.settle(graph, rules, candidates))
    }

    /// Decides `candidates` and, through a work list, every task their decisions decide in
    /// turn (an upstream_failed task can fail its own downstream at once). Returns the tasks
    /// to start.
    fn settle(
        &mut self,
        graph: &Graph,
        rules: &[TriggerRule],
        candidates: Vec<usize>,
    ) -> Vec<usize> {
        let mut start = Vec::new();
        let mut work = candidates;
        while let Some(i) = work.pop() {
            if self.nodes[i] != NodeState::Waiting {
                continue;
            }
            match rules[i].decide(self.counts[i]) {
                Readiness::Wait => {}
                Readiness::Ready => {
                    self.nodes[i] = NodeState::Started;
                    start.push(i);
                }
                Readiness::UpstreamFailed => {
                    self.finish(graph, i, NodeState::UpstreamFailed);
                    work.extend(graph.downstream[i].iter().copied());
                }
                Readiness::Skipped => {
                    self.finish(graph, i, NodeState::Skipped);
                    work.extend(graph.downstream[i].iter().copied());
                }
            }
        }
        start.sort_unstable();
        start
    }

    /// Records that task `i` is final and counts it in its downstream tasks.
    fn finish(&mut self, graph: &Graph, i: usize, state: NodeState) {
        debug_assert!(state.is_final() && !self.nodes[i].is_final());
        self.nodes[i] = state;
        if let Some(add) = state.as_upstream() {
            for &d in &graph.downstream[i] {
                add(&mut self.counts[d]);
            }
        }
        self.open -= 1;
        if self.open == 0 && self.state == RunState::Running {
            let all_ok = self
                .nodes
                .iter()
                .all(|n| matches!(n, NodeState::Succeeded | NodeState::Skipped));
            self.state = if all_ok {
                RunState::Succeeded
            } else {
                RunState::Failed
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn after(edges: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
        edges
            .iter()
            .map(|(n, ups)| (n.to_string(), ups.iter().map(|u| u.to_string()).collect()))
            .collect()
    }

    fn error(a: &BTreeMap<String, Vec<String>>) -> String {
        Graph::new(a).expect_err("refused").to_string()
    }

    fn counts(total: u32, succeeded: u32, failed: u32, skipped: u32) -> UpstreamCounts {
        UpstreamCounts {
            total,
            succeeded,
            failed,
            skipped,
        }
    }

    #[test]
    fn every_trigger_rule_decides_as_airflow_does() {
        use Readiness::*;
        use TriggerRule::*;
        // (rule, total, succeeded, failed, skipped) -> readiness
        let table: &[(TriggerRule, [u32; 4], Readiness)] = &[
            (AllSuccess, [0, 0, 0, 0], Ready),
            (AllSuccess, [3, 2, 0, 0], Wait),
            (AllSuccess, [3, 3, 0, 0], Ready),
            (AllSuccess, [3, 1, 1, 0], UpstreamFailed),
            (AllSuccess, [3, 1, 0, 1], Skipped),
            (AllSuccess, [3, 1, 1, 1], UpstreamFailed),
            (AllDone, [3, 1, 1, 0], Wait),
            (AllDone, [3, 1, 1, 1], Ready),
            (AllDone, [2, 0, 2, 0], Ready),
            (OneSuccess, [3, 0, 0, 0], Wait),
            (OneSuccess, [3, 1, 0, 0], Ready),
            (OneSuccess, [3, 0, 2, 0], Wait),
            (OneSuccess, [3, 0, 2, 1], UpstreamFailed),
            (OneSuccess, [2, 0, 0, 2], Skipped),
            (OneFailed, [3, 2, 0, 0], Wait),
            (OneFailed, [3, 0, 1, 0], Ready),
            (OneFailed, [3, 3, 0, 0], Skipped),
            (OneFailed, [3, 2, 0, 1], Skipped),
            (AllFailed, [3, 0, 2, 0], Wait),
            (AllFailed, [3, 0, 3, 0], Ready),
            (AllFailed, [3, 1, 0, 0], Skipped),
            (AllFailed, [3, 0, 1, 1], Skipped),
        ];
        for &(rule, [t, s, f, k], want) in table {
            assert_eq!(
                rule.decide(counts(t, s, f, k)),
                want,
                "{} with {t} upstream: {s} succeeded, {f} failed, {k} skipped",
                rule.as_str()
            );
        }
    }

    #[test]
    fn trigger_rules_parse_by_their_airflow_names() {
        for name in TriggerRule::NAMES.split(", ") {
            assert_eq!(TriggerRule::parse(name).expect("known").as_str(), name);
        }
        let e = TriggerRule::parse("none_failed").expect_err("unknown");
        assert!(
            e.contains("\"none_failed\"") && e.contains("all_success"),
            "{e}"
        );
    }

    #[test]
    fn a_diamond_has_three_layers_and_edges_both_ways() {
        let g = Graph::new(&after(&[
            ("extract", &[]),
            ("t1", &["extract"]),
            ("t2", &["extract"]),
            ("load", &["t1", "t2"]),
        ]))
        .expect("valid");
        let layer_names: Vec<Vec<&str>> = g
            .layers()
            .iter()
            .map(|l| l.iter().map(|&i| g.names[i].as_str()).collect())
            .collect();
        assert_eq!(
            layer_names,
            vec![vec!["extract"], vec!["t1", "t2"], vec!["load"]]
        );
        let extract = g.names.iter().position(|n| n == "extract").expect("node");
        assert_eq!(g.downstream[extract].len(), 2);
    }

    #[test]
    fn a_cycle_is_refused_with_its_path() {
        let e = error(&after(&[
            ("a", &[]),
            ("b", &["a", "d"]),
            ("c", &["b"]),
            ("d", &["c"]),
        ]));
        assert!(e.contains("cycle: b -> c -> d -> b"), "{e}");
        let e = error(&after(&[("a", &["a"])]));
        assert!(e.contains("\"a\" runs after itself"), "{e}");
    }

    #[test]
    fn unknown_upstreams_duplicates_and_bad_names_are_named() {
        let e = error(&after(&[("load", &["transform"])]));
        assert!(
            e.contains("\"load\" runs after \"transform\", which is not a task"),
            "{e}"
        );
        let e = error(&after(&[("a", &[]), ("b", &["a", "a"])]));
        assert!(e.contains("lists \"a\" twice"), "{e}");
        let e = error(&after(&[("bad name", &[])]));
        assert!(e.contains("\"bad name\" is not valid"), "{e}");
        assert!(error(&BTreeMap::new()).contains("at least one task"));
    }

    #[test]
    fn limits_are_stated_and_a_long_chain_is_checked_without_recursion() {
        let chain: BTreeMap<String, Vec<String>> = (0..MAX_WORKFLOW_TASKS)
            .map(|i| {
                let ups = if i == 0 {
                    vec![]
                } else {
                    vec![format!("t{:05}", i - 1)]
                };
                (format!("t{i:05}"), ups)
            })
            .collect();
        let g = Graph::new(&chain).expect("a 10,000-task chain is accepted");
        assert_eq!(g.layers().len(), MAX_WORKFLOW_TASKS);
        let mut too_many = chain.clone();
        too_many.insert("one-more".into(), vec![]);
        assert!(error(&too_many).contains("at most 10000 tasks"));
        // A cycle closing the whole chain is found and named from its start.
        let mut closed = chain;
        closed.insert(
            "t00000".into(),
            vec![format!("t{:05}", MAX_WORKFLOW_TASKS - 1)],
        );
        let e = error(&closed);
        assert!(
            e.contains("cycle: t00000 -> t00001 -> ")
                && e.contains("(10000 tasks in all) -> t09999 -> t00000"),
            "{e}"
        );
        assert!(e.len() < 400, "the error stays short: {e}");
    }

    /// A run driven to its end: `ends` says how each started task ends (by name; default
    /// success). Returns the order tasks started and the final progress.
    fn drive(
        g: &Graph,
        rules: &[TriggerRule],
        ends: &[(&str, TaskEnd)],
    ) -> (Vec<String>, RunProgress) {
        let (mut run, mut ready) = RunProgress::start(g, rules);
        let mut order = Vec::new();
        while let Some(i) = ready.pop() {
            order.push(g.names[i].clone());
            let end = ends
                .iter()
                .find(|(n, _)| *n == g.names[i])
                .map_or(TaskEnd::Succeeded, |(_, e)| *e);
            ready.extend(run.task_ended(g, rules, i, end));
        }
        (order, run)
    }

    fn node(g: &Graph, name: &str) -> usize {
        g.names.iter().position(|n| n == name).expect("task")
    }

    fn etl() -> Graph {
        Graph::new(&after(&[
            ("extract", &[]),
            ("t1", &["extract"]),
            ("t2", &["extract"]),
            ("t3", &["extract"]),
            ("load", &["t1", "t2", "t3"]),
            ("notify", &["load"]),
        ]))
        .expect("valid")
    }

    #[test]
    fn a_run_starts_each_task_after_its_upstreams_and_succeeds() {
        let g = etl();
        let rules = vec![TriggerRule::AllSuccess; g.names.len()];
        let (order, run) = drive(&g, &rules, &[]);
        assert_eq!(run.state, RunState::Succeeded);
        assert!(run.nodes.iter().all(|s| *s == NodeState::Succeeded));
        let pos = |n: &str| order.iter().position(|x| x == n).expect("ran");
        for (task, ups) in [
            ("t1", "extract"),
            ("load", "t1"),
            ("load", "t3"),
            ("notify", "load"),
        ] {
            assert!(pos(ups) < pos(task), "{ups} before {task}: {order:?}");
        }
        assert_eq!(order.len(), 6, "each task once: {order:?}");
    }

    #[test]
    fn a_failure_propagates_upstream_failed_and_fails_the_run() {
        let g = etl();
        let rules = vec![TriggerRule::AllSuccess; g.names.len()];
        let (order, run) = drive(&g, &rules, &[("t2", TaskEnd::Failed)]);
        assert!(!order.contains(&"load".to_string()));
        assert_eq!(run.nodes[node(&g, "t2")], NodeState::Failed);
        assert_eq!(run.nodes[node(&g, "load")], NodeState::UpstreamFailed);
        assert_eq!(run.nodes[node(&g, "notify")], NodeState::UpstreamFailed);
        assert_eq!(run.nodes[node(&g, "t1")], NodeState::Succeeded);
        assert_eq!(run.state, RunState::Failed);
    }

    #[test]
    fn an_all_done_cleanup_and_a_one_failed_alert_run_after_a_failure() {
        let g = Graph::new(&after(&[
            ("work", &[]),
            ("cleanup", &["work"]),
            ("alert", &["work"]),
        ]))
        .expect("valid");
        let mut rules = vec![TriggerRule::AllSuccess; 3];
        rules[node(&g, "cleanup")] = TriggerRule::AllDone;
        rules[node(&g, "alert")] = TriggerRule::OneFailed;
        let (order, run) = drive(&g, &rules, &[("work", TaskEnd::Failed)]);
        assert_eq!(order[0], "work");
        assert!(order.contains(&"cleanup".to_string()) && order.contains(&"alert".to_string()));
        // The cleanup and the alert ran, yet the run failed: unlike Airflow's leaf rule, a
        // failure anywhere fails the run (and `run retry` can run it again).
        assert_eq!(run.nodes[node(&g, "work")], NodeState::Failed);
        assert_eq!(run.state, RunState::Failed);
        // Without the failure, the alert is skipped and the run still succeeds.
        let (order, run) = drive(&g, &rules, &[]);
        assert!(!order.contains(&"alert".to_string()));
        assert_eq!(run.nodes[node(&g, "alert")], NodeState::Skipped);
        assert_eq!(run.state, RunState::Succeeded);
    }

    #[test]
    fn retry_failed_only_reruns_the_failed_and_their_downstream_and_keeps_the_rest() {
        let g = etl();
        let rules = vec![TriggerRule::AllSuccess; g.names.len()];
        let (_, mut run) = drive(&g, &rules, &[("t2", TaskEnd::Failed)]);
        assert_eq!(run.state, RunState::Failed);
        let mut ready = run.retry(&g, &rules, true).expect("the run ended");
        assert_eq!(ready, vec![node(&g, "t2")], "only t2 starts again");
        assert_eq!(run.nodes[node(&g, "t1")], NodeState::Succeeded, "kept");
        let mut rerun = Vec::new();
        while let Some(i) = ready.pop() {
            rerun.push(g.names[i].as_str());
            ready.extend(run.task_ended(&g, &rules, i, TaskEnd::Succeeded));
        }
        assert_eq!(rerun, vec!["t2", "load", "notify"]);
        assert_eq!(run.state, RunState::Succeeded);
        // A running run cannot be retried.
        let (mut running, _) = RunProgress::start(&g, &rules);
        assert!(running.retry(&g, &rules, false).is_none());
    }

    #[test]
    fn cancel_ends_every_open_task_and_returns_the_started_ones() {
        let g = etl();
        let rules = vec![TriggerRule::AllSuccess; g.names.len()];
        let (mut run, ready) = RunProgress::start(&g, &rules);
        assert_eq!(ready, vec![node(&g, "extract")]);
        assert_eq!(run.cancel(&g), vec![node(&g, "extract")]);
        assert!(run.nodes.iter().all(|s| *s == NodeState::Cancelled));
        assert_eq!(run.state, RunState::Cancelled);
        // The cancelled task's late end changes nothing.
        assert!(run
            .task_ended(&g, &rules, node(&g, "extract"), TaskEnd::Succeeded)
            .is_empty());
        assert_eq!(run.state, RunState::Cancelled);
    }

    #[test]
    fn a_fan_out_of_a_thousand_counts_each_edge_once() {
        let mut edges: Vec<(String, Vec<String>)> = vec![("root".into(), vec![])];
        for i in 0..1000 {
            edges.push((format!("f{i:04}"), vec!["root".into()]));
        }
        edges.push((
            "join".into(),
            (0..1000).map(|i| format!("f{i:04}")).collect(),
        ));
        let g = Graph::new(&edges.into_iter().collect()).expect("valid");
        let rules = vec![TriggerRule::AllSuccess; g.names.len()];
        let (order, run) = drive(&g, &rules, &[]);
        assert_eq!(order.len(), 1002);
        assert_eq!(order.last().map(String::as_str), Some("join"));
        assert_eq!(run.state, RunState::Succeeded);
    }
}
