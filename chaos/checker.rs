//! The invariants, judged on a [`History`] after the run. Pure logic: no IO, no clock.
//!
//! 1. **lost**: every acknowledged submission exists at the end and is final (succeeded, dead
//!    or cancelled).
//! 2. **double-success**: no task has more than one succeeded attempt.
//! 3. **stale-success**: a succeeded attempt carries the task's newest fencing token, and an
//!    execution with that token really ran to a zero exit.
//! 4. **token-run-twice**: a fencing token (one lease) is executed at most once.
//! 5. **overlap**: two executions of one task overlap in time only when the one with the older
//!    lease had lost it and was killed: it never ran to its end while the newer one ran, and
//!    its attempt did not succeed. One exception, because no scheduler can do better: a worker
//!    that could not hear the cluster (frozen, or cut off from every replica) learns that its
//!    lease moved on at its first heartbeat after the heal, so its execution may end on its
//!    own before then: within [`HEAL_GRACE_MS`] of that worker's heal, and never as a success.
//! 6. **leader-per-term**: at most one replica leads in any term (no replica claims to lead a
//!    term another leads, and no two replicas name different leaders for one term).
//! 7. **tick-exactly-once** (with schedules): no (schedule, fire time) has two runs; every fire
//!    time of a schedule from its creation to its final watermark has a run, unless the
//!    schedule's catch-up policy skipped it (then its missed count covers it: runs + missed +
//!    skipped equals the fire times); a schedule with catch-up `all` misses none; no run has a
//!    fire time that is not one of its schedule's.
//! 8. **pool-over** (with pools): at no point did a pool's tasks hold more leases than its
//!    slots. Judged on the replicated lease intervals (each attempt from grant to end, in the
//!    state machine's clock, which follows log order); at equal times ends count first.
//! 9. **workflow** (with workflows): every run the workload started ended (succeeded, failed
//!    or cancelled), and its state agrees with its tasks' (succeeded only if every task
//!    succeeded or was skipped); no task of a run started (its first execution, from the
//!    execution log) before its upstream tasks had ended as its trigger rule requires (an
//!    upstream counts as succeeded from the end of its successful execution); and no task of
//!    a run ran twice: one task per (run, task name), and that task's executions are
//!    judged by invariants 2-5 like any other's.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::history::{ExecEvent, ExecKind, History, Isolation, TaskRecord};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Violation {
    pub invariant: &'static str,
    pub task: Option<u64>,
    pub detail: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.task {
            Some(t) => write!(f, "[{}] task {t}: {}", self.invariant, self.detail),
            None => write!(f, "[{}] {}", self.invariant, self.detail),
        }
    }
}

/// One execution: a start event and what ended it, if anything was recorded.
#[derive(Debug, Clone)]
struct Execution {
    token: u64,
    worker: String,
    start_ms: u64,
    /// (time, completed?) — `completed` false for a SIGTERM kill.
    end: Option<(u64, bool, Option<i32>)>,
}

impl Execution {
    fn end_ms(&self) -> u64 {
        self.end.map_or(u64::MAX, |(t, _, _)| t)
    }
    fn completed(&self) -> bool {
        matches!(self.end, Some((_, true, _)))
    }
}

/// How long after a worker's isolation ends it may take to hear that its lease moved on: the
/// chaos workers' heartbeat interval (300 ms, `cluster::CONFIG`), a reconnect after the
/// replica dropped the frozen connection, and the kill's delivery.
pub const HEAL_GRACE_MS: u64 = 1_000;

pub fn check(h: &History) -> Vec<Violation> {
    let mut out = Vec::new();
    let tasks: BTreeMap<u64, &TaskRecord> = h.tasks.iter().map(|t| (t.id, t)).collect();
    check_lost(h, &tasks, &mut out);
    let execs = executions(&h.executions, &mut out);
    for t in &h.tasks {
        check_successes(t, execs.get(&t.id), &mut out);
    }
    for (task, list) in &execs {
        check_overlaps(
            *task,
            list,
            tasks.get(task).copied(),
            &h.isolations,
            &mut out,
        );
    }
    check_leaders(h, &mut out);
    check_ticks(h, &mut out);
    check_pools(h, &mut out);
    check_runs(h, &tasks, &execs, &mut out);
    out
}

fn check_runs(
    h: &History,
    tasks: &BTreeMap<u64, &TaskRecord>,
    execs: &BTreeMap<u64, Vec<Execution>>,
    out: &mut Vec<Violation>,
) {
    use fleet::state::workflows::{Readiness, TriggerRule, UpstreamCounts};
    let by_id: BTreeMap<u64, &crate::history::RunRecord> =
        h.runs.iter().map(|r| (r.id, r)).collect();
    for id in &h.runs_started {
        match by_id.get(id) {
            None => v(
                out,
                "workflow",
                None,
                format!("run {id} was started but is gone"),
            ),
            Some(r) if !r.is_final() => v(
                out,
                "workflow",
                None,
                format!("run {id} ({}) did not end: {}", r.workflow, r.status),
            ),
            _ => {}
        }
    }
    // One task per (run, task name).
    let mut seen: BTreeMap<&(u64, String), u64> = BTreeMap::new();
    for t in &h.tasks {
        if let Some(rn) = &t.run_node {
            if let Some(other) = seen.insert(rn, t.id) {
                v(
                    out,
                    "workflow",
                    Some(t.id),
                    format!(
                        "task {} of run {} ran twice: tasks {other} and {}",
                        rn.1, rn.0, t.id
                    ),
                );
            }
        }
    }
    for r in &h.runs {
        let ok = r
            .nodes
            .iter()
            .all(|n| matches!(n.state.as_str(), "succeeded" | "skipped"));
        if (r.status == "succeeded") != ok && r.is_final() && r.status != "cancelled" {
            v(
                out,
                "workflow",
                None,
                format!(
                    "run {} is {} but its tasks are {:?}",
                    r.id,
                    r.status,
                    r.nodes.iter().map(|n| &n.state).collect::<Vec<_>>()
                ),
            );
        }
        let first_start = |task: u64| {
            execs
                .get(&task)
                .and_then(|l| l.iter().map(|x| x.start_ms).min())
        };
        // When each task ended as its run saw it: (succeeded?, end time from the log).
        let ended = |name: &str| -> Option<(bool, Option<u64>)> {
            let n = r.nodes.iter().find(|n| n.name == name)?;
            let Some(task) = n.task.and_then(|t| tasks.get(&t)) else {
                return Some((false, None)); // never ran: decided without an execution
            };
            let ok_token = task
                .attempts
                .iter()
                .find(|a| a.outcome == "succeeded")
                .map(|a| a.token);
            let list = execs.get(&task.id);
            match ok_token {
                Some(tok) => Some((
                    true,
                    list.and_then(|l| l.iter().find(|x| x.token == tok).map(|x| x.end_ms())),
                )),
                None if task.is_final() => Some((
                    false,
                    list.and_then(|l| l.iter().map(|x| x.end.map_or(0, |e| e.0)).max()),
                )),
                None => None,
            }
        };
        for n in &r.nodes {
            let Some(task) = n.task else { continue };
            let Some(start) = first_start(task) else {
                continue;
            };
            let Ok(rule) = TriggerRule::parse(&n.trigger) else {
                v(
                    out,
                    "workflow",
                    Some(task),
                    format!("unknown trigger {}", n.trigger),
                );
                continue;
            };
            let mut c = UpstreamCounts {
                total: n.after.len() as u32,
                ..Default::default()
            };
            for up in &n.after {
                match ended(up) {
                    Some((true, Some(end))) if end <= start => c.succeeded += 1,
                    Some((false, end)) if end.is_none_or(|e| e <= start) => {
                        let skipped = r.nodes.iter().any(|x| {
                            &x.name == up && matches!(x.state.as_str(), "skipped" | "cancelled")
                        });
                        if skipped {
                            c.skipped += 1
                        } else {
                            c.failed += 1
                        }
                    }
                    _ => {}
                }
            }
            if rule.decide(c) != Readiness::Ready {
                v(
                    out,
                    "workflow",
                    Some(task),
                    format!(
                        "run {} task {} ({}) started at {start} before its upstream tasks {:?} \
                         had ended as its rule requires ({} of {} succeeded, {} failed by then)",
                        r.id, n.name, n.trigger, n.after, c.succeeded, c.total, c.failed
                    ),
                );
            }
        }
    }
}

fn check_ticks(h: &History, out: &mut Vec<Violation>) {
    let mut runs: BTreeMap<(&str, u64), Vec<u64>> = BTreeMap::new();
    for t in &h.tasks {
        let Some((schedule, fire)) = &t.run_of else {
            continue;
        };
        match fleet::schedule::parse_time(fire, 0) {
            Ok(ms) => runs.entry((schedule.as_str(), ms)).or_default().push(t.id),
            Err(e) => v(
                out,
                "tick-exactly-once",
                Some(t.id),
                format!("bad FLEET_FIRE_TIME: {e}"),
            ),
        }
    }
    for ((schedule, fire), tasks) in &runs {
        if tasks.len() > 1 {
            v(
                out,
                "tick-exactly-once",
                Some(tasks[0]),
                format!(
                    "schedule {schedule} tick {fire} has {} runs: tasks {tasks:?}",
                    tasks.len()
                ),
            );
        }
    }
    for s in &h.schedules {
        let Ok(timing) = fleet::schedule::Timing::new(&s.spec) else {
            continue;
        };
        let expected: BTreeSet<u64> = timing
            .between(s.created_at_ms + 1, s.fired_through_ms, 1_000_000)
            .into_iter()
            .collect();
        let ran: BTreeSet<u64> = runs
            .keys()
            .filter(|(name, _)| *name == s.name)
            .map(|(_, f)| *f)
            .collect();
        if let Some(f) = ran.difference(&expected).next() {
            v(
                out,
                "tick-exactly-once",
                None,
                format!(
                    "schedule {} ran tick {f}, which is not one of its fire times",
                    s.name
                ),
            );
        }
        let missing: Vec<u64> = expected.difference(&ran).copied().collect();
        let policy_all = s.spec.catchup == fleet::state::CatchupPolicy::All;
        let accounted = s.counts.missed + s.counts.skipped;
        if (policy_all && s.counts.missed > 0 && !missing.is_empty())
            || missing.len() as u64 != accounted
        {
            v(
                out,
                "tick-exactly-once",
                None,
                format!(
                    "schedule {} (catch-up {}): {} fire times from creation to {}, {} without a run (e.g. {:?}) but {} recorded missed or skipped",
                    s.name,
                    s.spec.catchup,
                    expected.len(),
                    s.fired_through_ms,
                    missing.len(),
                    &missing[..missing.len().min(3)],
                    accounted
                ),
            );
        }
    }
}

fn check_pools(h: &History, out: &mut Vec<Violation>) {
    for (pool, slots) in &h.pools {
        // (time, +1 grant / -1 end, task); ends sort first at equal times.
        let mut events: Vec<(u64, i64, u64)> = Vec::new();
        for t in h.tasks.iter().filter(|t| t.pool.as_deref() == Some(pool)) {
            for a in &t.attempts {
                events.push((a.started_at_ms, 1, t.id));
                if let Some(end) = a.ended_at_ms {
                    events.push((end, -1, t.id));
                }
            }
        }
        events.sort();
        let mut held = 0i64;
        for (at, d, task) in events {
            held += d;
            if held > i64::from(*slots) {
                v(
                    out,
                    "pool-over",
                    Some(task),
                    format!("pool {pool} had {held} leases of {slots} slots at {at}"),
                );
                return;
            }
        }
    }
}

fn v(out: &mut Vec<Violation>, invariant: &'static str, task: Option<u64>, detail: String) {
    out.push(Violation {
        invariant,
        task,
        detail,
    });
}

fn check_lost(h: &History, tasks: &BTreeMap<u64, &TaskRecord>, out: &mut Vec<Violation>) {
    for s in &h.submissions {
        let Some(id) = s.acked else { continue };
        match tasks.get(&id) {
            None => v(
                out,
                "lost",
                Some(id),
                format!(
                    "submission {} was acknowledged but the cluster has no such task",
                    s.key
                ),
            ),
            Some(t) if !t.is_final() => v(
                out,
                "lost",
                Some(id),
                format!(
                    "submission {} ({}) never reached a final state: it is {}",
                    s.key, s.kind, t.state
                ),
            ),
            Some(_) => {}
        }
    }
}

/// Groups events into executions per task, keyed by fencing token; a token started twice is a
/// violation.
fn executions(events: &[ExecEvent], out: &mut Vec<Violation>) -> BTreeMap<u64, Vec<Execution>> {
    let mut by_token: BTreeMap<(u64, u64), Execution> = BTreeMap::new();
    let mut events: Vec<&ExecEvent> = events.iter().collect();
    events.sort_by_key(|e| (e.t_ms, e.kind != ExecKind::Start));
    for e in events {
        let key = (e.task, e.token);
        match e.kind {
            ExecKind::Start => {
                if let Some(prev) = by_token.get(&key) {
                    v(
                        out,
                        "token-run-twice",
                        Some(e.task),
                        format!(
                            "fencing token {} ran twice: on {} at {} and on {} at {}",
                            e.token, prev.worker, prev.start_ms, e.worker, e.t_ms
                        ),
                    );
                    continue;
                }
                by_token.insert(
                    key,
                    Execution {
                        token: e.token,
                        worker: e.worker.clone(),
                        start_ms: e.t_ms,
                        end: None,
                    },
                );
            }
            ExecKind::End | ExecKind::Killed => {
                if let Some(x) = by_token.get_mut(&key) {
                    x.end = Some((e.t_ms, e.kind == ExecKind::End, e.exit));
                }
            }
        }
    }
    let mut per_task: BTreeMap<u64, Vec<Execution>> = BTreeMap::new();
    for ((task, _), x) in by_token {
        per_task.entry(task).or_default().push(x);
    }
    per_task
}

fn check_successes(t: &TaskRecord, execs: Option<&Vec<Execution>>, out: &mut Vec<Violation>) {
    let successes: Vec<_> = t
        .attempts
        .iter()
        .filter(|a| a.outcome == "succeeded")
        .collect();
    if successes.len() > 1 {
        v(
            out,
            "double-success",
            Some(t.id),
            format!(
                "{} attempts succeeded (tokens {:?})",
                successes.len(),
                successes.iter().map(|a| a.token).collect::<Vec<_>>()
            ),
        );
    }
    let newest = t.attempts.iter().map(|a| a.token).max().unwrap_or(0);
    for a in successes {
        if a.token != newest {
            v(
                out,
                "stale-success",
                Some(t.id),
                format!(
                    "attempt {} succeeded with fencing token {} but the task's newest lease is {}",
                    a.number, a.token, newest
                ),
            );
        }
        let ran = execs.is_some_and(|list| {
            list.iter()
                .any(|x| x.token == a.token && matches!(x.end, Some((_, true, Some(0)))))
        });
        if !ran {
            v(
                out,
                "stale-success",
                Some(t.id),
                format!(
                    "attempt {} succeeded with fencing token {}, but no execution with that token \
                     ran to a zero exit",
                    a.number, a.token
                ),
            );
        }
    }
}

fn check_overlaps(
    task: u64,
    list: &[Execution],
    record: Option<&TaskRecord>,
    isolations: &[Isolation],
    out: &mut Vec<Violation>,
) {
    for (i, a) in list.iter().enumerate() {
        for b in &list[i + 1..] {
            let (old, new) = if a.token < b.token { (a, b) } else { (b, a) };
            let overlap = old.start_ms < new.end_ms() && new.start_ms < old.end_ms();
            if !overlap {
                continue;
            }
            if old.completed() && !ended_before_it_could_hear(old, isolations) {
                v(
                    out,
                    "overlap",
                    Some(task),
                    format!(
                        "the execution with fencing token {} (on {}, {}..{}) ran to its end while \
                         the one with token {} (on {}, from {}) ran: it was not killed",
                        old.token,
                        old.worker,
                        old.start_ms,
                        old.end_ms(),
                        new.token,
                        new.worker,
                        new.start_ms
                    ),
                );
                continue;
            }
            let old_attempt = record.and_then(|r| r.attempts.iter().find(|x| x.token == old.token));
            if old_attempt.is_some_and(|x| x.outcome == "succeeded") {
                v(
                    out,
                    "overlap",
                    Some(task),
                    format!(
                        "the execution with fencing token {} overlapped token {} yet its attempt \
                         is recorded as succeeded",
                        old.token, new.token
                    ),
                );
            }
        }
    }
}

/// Whether `old`'s worker was isolated before `old` ended, and `old` ended within
/// [`HEAL_GRACE_MS`] of that isolation's end (so before its first heartbeat could fence it).
fn ended_before_it_could_hear(old: &Execution, isolations: &[Isolation]) -> bool {
    let end = old.end_ms();
    isolations.iter().any(|iso| {
        iso.workers.contains(&old.worker) && iso.from_ms < end && end <= iso.to_ms + HEAL_GRACE_MS
    })
}

fn check_leaders(h: &History, out: &mut Vec<Violation>) {
    let mut self_claimed: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
    let mut named: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
    for o in &h.leaders {
        if let Some(l) = o.leader {
            named.entry(o.term).or_default().insert(l);
            if l == o.node {
                self_claimed.entry(o.term).or_default().insert(o.node);
            }
        }
    }
    for (term, leaders) in self_claimed.iter().chain(named.iter()) {
        if leaders.len() > 1 {
            v(
                out,
                "leader-per-term",
                None,
                format!("term {term} has more than one leader: nodes {leaders:?}"),
            );
        }
    }
    out.dedup();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{AttemptRecord, LeaderObs, Submission};

    fn ev(kind: ExecKind, task: u64, token: u64, worker: &str, t_ms: u64) -> ExecEvent {
        ExecEvent {
            kind,
            key: format!("k{task}"),
            task,
            attempt: 1,
            token,
            worker: worker.into(),
            pid: 1,
            t_ms,
            exit: (kind == ExecKind::End).then_some(0),
        }
    }

    fn attempt(number: u32, token: u64, outcome: &str) -> AttemptRecord {
        AttemptRecord {
            number,
            token,
            worker: 1,
            started_at_ms: 0,
            ended_at_ms: Some(1),
            outcome: outcome.into(),
        }
    }

    fn task(id: u64, state: &str, attempts: Vec<AttemptRecord>) -> TaskRecord {
        TaskRecord {
            id,
            state: state.into(),
            key: Some(format!("k{id}")),
            attempts,
            run_of: None,
            pool: None,
            run_node: None,
        }
    }

    fn acked(id: u64) -> Submission {
        Submission {
            key: format!("k{id}"),
            kind: "short".into(),
            t_ms: 0,
            acked: Some(id),
            acked_at_ms: Some(0),
            error: None,
        }
    }

    /// A history with no fault in it: task 1 ran once; task 2 lost its first lease (the
    /// execution was killed after the second started) and succeeded on the second.
    fn clean() -> History {
        History {
            seed: 1,
            submissions: vec![
                acked(1),
                acked(2),
                Submission {
                    acked: None,
                    error: Some("timed out".into()),
                    ..acked(3)
                },
            ],
            executions: vec![
                ev(ExecKind::Start, 1, 10, "a", 100),
                ev(ExecKind::End, 1, 10, "a", 200),
                ev(ExecKind::Start, 2, 11, "a", 100),
                ev(ExecKind::Start, 2, 12, "b", 5_000),
                ev(ExecKind::Killed, 2, 11, "a", 5_500),
                ev(ExecKind::End, 2, 12, "b", 6_000),
            ],
            tasks: vec![
                task(1, "succeeded", vec![attempt(1, 10, "succeeded")]),
                task(
                    2,
                    "succeeded",
                    vec![attempt(1, 11, "lost"), attempt(2, 12, "succeeded")],
                ),
            ],
            leaders: vec![
                LeaderObs {
                    t_ms: 1,
                    node: 1,
                    term: 1,
                    leader: Some(1),
                },
                LeaderObs {
                    t_ms: 1,
                    node: 2,
                    term: 1,
                    leader: Some(1),
                },
                LeaderObs {
                    t_ms: 9,
                    node: 2,
                    term: 2,
                    leader: Some(2),
                },
            ],
            ..Default::default()
        }
    }

    fn invariants(h: &History) -> Vec<&'static str> {
        check(h).iter().map(|v| v.invariant).collect()
    }

    #[test]
    fn a_clean_history_passes() {
        assert_eq!(check(&clean()), vec![]);
    }

    #[test]
    fn a_lost_task_is_reported() {
        let mut h = clean();
        h.tasks.retain(|t| t.id != 2);
        let found = check(&h);
        assert!(
            found
                .iter()
                .any(|v| v.invariant == "lost" && v.task == Some(2)),
            "{found:?}"
        );
        // A task that exists but never finished is lost too.
        let mut h = clean();
        h.tasks[0].state = "queued".into();
        assert_eq!(invariants(&h), vec!["lost"]);
    }

    #[test]
    fn a_double_success_is_reported() {
        let mut h = clean();
        h.tasks[1].attempts[0].outcome = "succeeded".into();
        let found = invariants(&h);
        assert!(found.contains(&"double-success"), "{found:?}");
    }

    #[test]
    fn a_stale_token_success_is_reported() {
        let mut h = clean();
        // The old lease's attempt is recorded as the success, the new one as lost.
        h.tasks[1].attempts[0].outcome = "succeeded".into();
        h.tasks[1].attempts[1].outcome = "lost".into();
        let found = check(&h);
        assert!(
            found
                .iter()
                .any(|v| v.invariant == "stale-success" && v.detail.contains("newest lease is 12")),
            "{found:?}"
        );
        // A success nobody ran.
        let mut h = clean();
        h.executions
            .retain(|e| !(e.task == 1 && e.kind == ExecKind::End));
        assert_eq!(invariants(&h), vec!["stale-success"]);
    }

    #[test]
    fn overlapping_executions_are_reported() {
        // The stale execution ran to its end while the new one ran.
        let mut h = clean();
        for e in &mut h.executions {
            if e.task == 2 && e.token == 11 && e.kind == ExecKind::Killed {
                e.kind = ExecKind::End;
                e.exit = Some(0);
            }
        }
        let found = check(&h);
        assert!(
            found
                .iter()
                .any(|v| v.invariant == "overlap" && v.detail.contains("was not killed")),
            "{found:?}"
        );
        // A token executed twice.
        let mut h = clean();
        h.executions.push(ev(ExecKind::Start, 1, 10, "b", 150));
        assert!(invariants(&h).contains(&"token-run-twice"));
    }

    #[test]
    fn an_isolated_worker_may_end_an_execution_only_until_it_can_hear() {
        // Task 2's first execution (token 11, worker a) ran to its end at 5,500 while token
        // 12 ran from 5,000: a was frozen 1,000..5,200.
        let mut h = clean();
        for e in &mut h.executions {
            if e.task == 2 && e.token == 11 && e.kind == ExecKind::Killed {
                e.kind = ExecKind::End;
                e.exit = Some(0);
            }
        }
        let frozen = |worker: &str, to_ms: u64| Isolation {
            workers: vec![worker.into()],
            from_ms: 1_000,
            to_ms,
        };
        h.isolations = vec![frozen("a", 5_200)];
        assert_eq!(check(&h), vec![], "ended 300 ms after the heal: allowed");
        // Another worker's isolation does not excuse it.
        h.isolations = vec![frozen("b", 5_200)];
        assert!(invariants(&h).contains(&"overlap"));
        // Nor one that healed long before it ended.
        h.isolations = vec![frozen("a", 5_500 - HEAL_GRACE_MS - 1)];
        assert!(invariants(&h).contains(&"overlap"));
        // And the excused execution still must not be recorded as a success.
        h.isolations = vec![frozen("a", 5_200)];
        h.tasks[1].attempts[0].outcome = "succeeded".into();
        assert!(check(&h)
            .iter()
            .any(|v| v.invariant == "overlap" && v.detail.contains("recorded as succeeded")));
    }

    #[test]
    fn two_leaders_in_one_term_are_reported() {
        let mut h = clean();
        h.leaders.push(LeaderObs {
            t_ms: 5,
            node: 3,
            term: 1,
            leader: Some(3),
        });
        assert!(invariants(&h).contains(&"leader-per-term"));
    }

    /// A schedule firing every second from t=1000 (created then) through t=5000, with catch-up
    /// `policy`, and runs for `fires` (seconds).
    fn scheduled(policy: fleet::state::CatchupPolicy, fires: &[u64], missed: u64) -> History {
        use fleet::state::*;
        let spec = ScheduleSpec {
            trigger: Trigger::Every {
                every_ms: 1000,
                anchor_ms: 0,
            },
            start_at_ms: None,
            end_at_ms: None,
            catchup: policy,
            catchup_window_ms: 3_600_000,
            overlap: OverlapPolicy::Allow,
            jitter_ms: 0,
            task: TaskSpec::new(vec!["true".into()], "default"),
            pool: None,
        };
        let mut state = State::default();
        let r = state.apply(
            1,
            &Request {
                proposed_at_ms: 1000,
                commands: vec![Command::PutSchedule {
                    name: "s".into(),
                    spec,
                    paused: None,
                    mode: PutMode::Create,
                }],
            },
        );
        assert!(r.results[0].is_ok());
        let mut s = state.schedules().get("s").unwrap().clone();
        s.fired_through_ms = 5000;
        s.counts.missed = missed;
        let mut h = History {
            schedules: vec![s],
            ..Default::default()
        };
        for (i, f) in fires.iter().enumerate() {
            let mut t = task(
                100 + i as u64,
                "succeeded",
                vec![attempt(1, 50 + i as u64, "succeeded")],
            );
            t.run_of = Some(("s".into(), format!("1970-01-01T00:00:0{f}Z")));
            h.tasks.push(t);
        }
        h
    }

    /// The tick invariant's violations alone (the histories have no executions).
    fn ticks(h: &History) -> Vec<Violation> {
        let mut out = Vec::new();
        check_ticks(h, &mut out);
        out
    }

    #[test]
    fn tick_exactly_once_catches_doubled_missed_and_foreign_ticks() {
        use fleet::state::CatchupPolicy::{All, None as Skip};
        assert!(ticks(&scheduled(All, &[2, 3, 4, 5], 0)).is_empty());
        // Two runs of one tick.
        let found = ticks(&scheduled(All, &[2, 3, 3, 4, 5], 0));
        assert!(
            found
                .iter()
                .any(|v| v.invariant == "tick-exactly-once" && v.detail.contains("has 2 runs")),
            "{found:?}"
        );
        // A tick without a run and not recorded missed.
        let found = ticks(&scheduled(All, &[2, 4, 5], 0));
        assert!(
            found.iter().any(|v| v.invariant == "tick-exactly-once" && v.detail.contains("1 without a run")),
            "{found:?}"
        );
        // catch-up none may skip it, when its missed count says so; all may not.
        assert!(ticks(&scheduled(Skip, &[2, 4, 5], 1)).is_empty());
        assert!(!ticks(&scheduled(All, &[2, 4, 5], 1)).is_empty());
        // A run for a time the schedule never fires at.
        let mut h = scheduled(All, &[2, 3, 4, 5], 0);
        h.tasks[0].run_of = Some(("s".into(), "1970-01-01T00:00:02.500Z".into()));
        let found = ticks(&h);
        assert!(
            found
                .iter()
                .any(|v| v.detail.contains("not one of its fire times")),
            "{found:?}"
        );
    }

    #[test]
    fn pool_over_catches_more_leases_than_slots() {
        let mut h = History::default();
        h.pools.insert("p".into(), 2);
        let lease = |token, from, to| AttemptRecord {
            number: 1,
            token,
            worker: 1,
            started_at_ms: from,
            ended_at_ms: Some(to),
            outcome: "succeeded".into(),
        };
        for (id, from, to) in [(1, 0, 100), (2, 50, 150), (3, 100, 200)] {
            let mut t = task(id, "succeeded", vec![lease(id, from, to)]);
            t.pool = Some("p".into());
            h.tasks.push(t);
        }
        // Task 3 starts as task 1 ends: two at a time.
        let pools = |h: &History| {
            let mut out = Vec::new();
            check_pools(h, &mut out);
            out
        };
        assert!(pools(&h).is_empty(), "{:?}", pools(&h));
        h.tasks[2].attempts[0].started_at_ms = 99;
        let found = pools(&h);
        assert!(
            found
                .iter()
                .any(|v| v.invariant == "pool-over" && v.detail.contains("3 leases of 2")),
            "{found:?}"
        );
    }

    /// A diamond run `a -> (b, c) -> d` over tasks 1-4 (ids in that order), each run once at
    /// `starts[i]` for 100 ms and succeeded.
    fn workflow_history(starts: [u64; 4]) -> History {
        use crate::history::{NodeRecord, RunRecord};
        let names = ["a", "b", "c", "d"];
        let after: [&[&str]; 4] = [&[], &["a"], &["a"], &["b", "c"]];
        let mut h = History {
            runs_started: vec![7],
            ..Default::default()
        };
        for (i, name) in names.iter().enumerate() {
            let id = i as u64 + 1;
            let token = 100 + id;
            h.executions
                .push(ev(ExecKind::Start, id, token, "w", starts[i]));
            h.executions
                .push(ev(ExecKind::End, id, token, "w", starts[i] + 100));
            h.tasks.push(TaskRecord {
                run_node: Some((7, name.to_string())),
                key: None,
                ..task(id, "succeeded", vec![attempt(1, token, "succeeded")])
            });
        }
        h.runs.push(RunRecord {
            id: 7,
            workflow: "diamond".into(),
            status: "succeeded".into(),
            nodes: names
                .iter()
                .zip(after)
                .enumerate()
                .map(|(i, (n, a))| NodeRecord {
                    name: n.to_string(),
                    after: a.iter().map(|s| s.to_string()).collect(),
                    trigger: "all_success".into(),
                    state: "succeeded".into(),
                    task: Some(i as u64 + 1),
                })
                .collect(),
        });
        h
    }

    #[test]
    fn the_workflow_invariant_catches_early_starts_unended_runs_and_doubled_tasks() {
        let ok = workflow_history([1_000, 1_200, 1_150, 1_400]);
        assert_eq!(check(&ok), vec![]);
        // d starts while c (ended at 1,350 here) is still running.
        let early = workflow_history([1_000, 1_200, 1_250, 1_300]);
        let found = check(&early);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].invariant, "workflow");
        assert_eq!(found[0].task, Some(4));
        assert!(
            found[0].detail.contains("task d (all_success)"),
            "{}",
            found[0]
        );
        // A run that did not end, and one whose state contradicts its tasks.
        let mut open = ok.clone();
        open.runs[0].status = "running".into();
        assert!(check(&open)[0]
            .detail
            .contains("run 7 (diamond) did not end"));
        let mut wrong = ok.clone();
        wrong.runs[0].nodes[3].state = "upstream_failed".into();
        assert!(check(&wrong)[0].detail.contains("run 7 is succeeded but"));
        // A second task for one task of the run.
        let mut twice = ok.clone();
        twice.tasks.push(TaskRecord {
            id: 9,
            ..twice.tasks[1].clone()
        });
        let found = check(&twice);
        assert!(
            found
                .iter()
                .any(|v| v.detail.contains("task b of run 7 ran twice")),
            "{found:?}"
        );
        // An all_done task may start after a failed upstream; an all_success one may not.
        let mut failed = workflow_history([1_000, 1_200, 1_150, 1_400]);
        failed.tasks[1].state = "dead".into();
        failed.tasks[1].attempts[0].outcome = "failed".into();
        failed.runs[0].status = "failed".into();
        failed.runs[0].nodes[1].state = "failed".into();
        let found = check(&failed);
        assert!(found.iter().any(|v| v.task == Some(4)), "{found:?}");
        failed.runs[0].nodes[3].trigger = "all_done".into();
        let found: Vec<_> = check(&failed)
            .into_iter()
            .filter(|v| v.invariant == "workflow")
            .collect();
        assert_eq!(found, vec![], "all_done after a failure is allowed");
    }
}
