//! [`State::check_invariants`]: what must hold between the state's indexes after every apply.
//!
//! The state keeps several indexes of the same facts (the ready queues, the waiting set, the
//! finished set, the leased set, the request and idempotency tables, the pools' use, the
//! workflows' task maps) so that each operation costs O(log n). A bug that updates one index
//! and not another would show up much later as a task never run, or run twice; this check
//! finds it at the apply that caused it. It is O(state): run after every apply in unit tests
//! and debug builds (see [`State::apply`]), never in release builds.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};

use super::{State, TaskId, TaskState, REQUEST_DEDUP_CAPACITY};

impl State {
    /// Checks that the indexes agree with the tasks and with each other; the error names the
    /// first disagreement found.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.check_leases()?;
        self.check_queues()?;
        self.check_finished()?;
        self.check_tables()?;
        self.check_pools()?;
        self.check_workflows()
    }

    /// `leased` holds exactly the tasks with a lease; a lease is its task's last, unended
    /// attempt; only running tasks (and cancelled ones whose attempt still runs) hold one.
    fn check_leases(&self) -> Result<(), String> {
        for (id, t) in &self.tasks {
            let leased = self.leased.contains(id);
            match &t.lease {
                Some(l) => {
                    if !leased {
                        return Err(format!("task {id} holds a lease but is not in `leased`"));
                    }
                    let last = t.attempts.last();
                    if last.is_none_or(|a| {
                        a.fencing_token != l.fencing_token || a.ended_at_ms.is_some()
                    }) {
                        return Err(format!(
                            "task {id}: lease token {} is not its last, unended attempt's",
                            l.fencing_token
                        ));
                    }
                    if !matches!(t.state, TaskState::Running | TaskState::Cancelled) {
                        return Err(format!(
                            "task {id} is {} but holds a lease",
                            t.state.as_str()
                        ));
                    }
                    if l.fencing_token > self.next_fencing_token {
                        return Err(format!(
                            "task {id}: token {} was never issued",
                            l.fencing_token
                        ));
                    }
                }
                None if leased => return Err(format!("task {id} is in `leased` without a lease")),
                None if t.state == TaskState::Running => {
                    return Err(format!("task {id} is running without a lease"))
                }
                None => {}
            }
        }
        if let Some(id) = self.leased.iter().find(|id| !self.tasks.contains_key(id)) {
            return Err(format!("`leased` names task {id}, which does not exist"));
        }
        Ok(())
    }

    /// Every queued or failed task is in exactly one of the ready queue and the waiting set
    /// (or, held for `--after`, in neither), under its current key; nothing else is in them.
    fn check_queues(&self) -> Result<(), String> {
        let mut ready: BTreeSet<TaskId> = BTreeSet::new();
        for (queue, keys) in &self.ready {
            if keys.is_empty() {
                return Err(format!("the ready queue {queue:?} is empty but kept"));
            }
            for &(Reverse(priority), seq, id) in keys {
                let t = self
                    .tasks
                    .get(&id)
                    .ok_or_else(|| format!("ready queue {queue:?} names missing task {id}"))?;
                let key_ok = t.spec.queue == *queue && t.spec.priority == priority && t.seq == seq;
                if !key_ok || !matches!(t.state, TaskState::Queued | TaskState::Failed) {
                    return Err(format!(
                        "task {id} ({}) is in ready queue {queue:?} under a stale key",
                        t.state.as_str()
                    ));
                }
                if t.ready_at_ms > self.clock_ms {
                    return Err(format!("task {id} is ready before its time"));
                }
                if !ready.insert(id) {
                    return Err(format!("task {id} is in the ready queues twice"));
                }
            }
        }
        let mut waiting: BTreeSet<TaskId> = BTreeSet::new();
        for &(at, id) in &self.waiting {
            let t = self
                .tasks
                .get(&id)
                .ok_or_else(|| format!("the waiting set names missing task {id}"))?;
            if t.ready_at_ms != at || !matches!(t.state, TaskState::Queued | TaskState::Failed) {
                return Err(format!("task {id} waits under a stale key"));
            }
            if at <= self.clock_ms {
                return Err(format!("task {id} should have been promoted at {at}"));
            }
            if ready.contains(&id) || !waiting.insert(id) {
                return Err(format!(
                    "task {id} is both ready and waiting, or waits twice"
                ));
            }
        }
        for (id, t) in &self.tasks {
            let queued = matches!(t.state, TaskState::Queued | TaskState::Failed);
            let indexed = ready.contains(id) || waiting.contains(id);
            let held = self.is_held(*id);
            if held && (t.state != TaskState::Queued || indexed) {
                return Err(format!(
                    "task {id} is held for --after but is ready or not queued"
                ));
            }
            if queued && !indexed && !held {
                return Err(format!(
                    "task {id} is {} but neither ready nor waiting",
                    t.state.as_str()
                ));
            }
        }
        Ok(())
    }

    /// `finished` holds exactly the final tasks, by the time they finished.
    fn check_finished(&self) -> Result<(), String> {
        for &(at, id) in &self.finished {
            let t = self
                .tasks
                .get(&id)
                .ok_or_else(|| format!("`finished` names missing task {id}"))?;
            if !t.state.is_final() || t.finished_at_ms != Some(at) {
                return Err(format!("task {id} is in `finished` under a stale key"));
            }
        }
        let finals = self.tasks.values().filter(|t| t.state.is_final()).count();
        if finals != self.finished.len() {
            return Err(format!(
                "{finals} final tasks but {} in `finished`",
                self.finished.len()
            ));
        }
        Ok(())
    }

    /// The request and idempotency tables are within their bounds and name real tasks.
    fn check_tables(&self) -> Result<(), String> {
        if self.requests.len() != self.request_order.len()
            || self.requests.len() > REQUEST_DEDUP_CAPACITY
        {
            return Err(format!(
                "{} request ids, {} in arrival order (bound {REQUEST_DEDUP_CAPACITY})",
                self.requests.len(),
                self.request_order.len()
            ));
        }
        for (key, id) in &self.idempotency_keys {
            let t = self
                .tasks
                .get(id)
                .ok_or_else(|| format!("idempotency key {key:?} names missing task {id}"))?;
            if t.spec.idempotency_key.as_deref() != Some(key.as_str()) {
                return Err(format!(
                    "idempotency key {key:?} names task {id}, which has another"
                ));
            }
        }
        if let Some((&id, _)) = self.tasks.iter().next_back() {
            if id.0 > self.next_task_id {
                return Err(format!("task {id} is beyond the last id issued"));
            }
        }
        Ok(())
    }

    /// Each pool's use is the slots its leased tasks hold.
    fn check_pools(&self) -> Result<(), String> {
        let mut held: BTreeMap<&str, u32> = BTreeMap::new();
        for id in &self.leased {
            if let Some(c) = self.pools.claim(*id) {
                *held.entry(c.pool.as_str()).or_default() += c.slots;
            }
        }
        for (name, pool) in self.pools.sizes() {
            let h = held.get(name.as_str()).copied().unwrap_or(0);
            if pool.used != h {
                return Err(format!(
                    "pool {name:?} counts {} slots in use, its leased tasks hold {h}",
                    pool.used
                ));
            }
        }
        Ok(())
    }

    /// The workflows' maps agree with the runs and the tasks.
    fn check_workflows(&self) -> Result<(), String> {
        self.workflows
            .check(|id| self.tasks.get(&id).map(|t| t.state))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::testing::Applier;
    use crate::state::{Command, CommandOutput, RequestId, TaskSpec, WorkerId};

    /// A state with a ready task, a delayed one, a running one and a finished one.
    fn state() -> State {
        let mut a = Applier::default();
        let submit = |a: &mut Applier, rid: u128, delay: Option<u64>| {
            let mut spec = TaskSpec::new(vec!["true".into()], "q");
            spec.not_before_ms = delay;
            let out = a.one(
                1_000,
                Command::SubmitTask {
                    request_id: RequestId(rid),
                    spec,
                },
            );
            let Ok(CommandOutput::TaskSubmitted { id, .. }) = out else {
                panic!("{out:?}")
            };
            id
        };
        let done = submit(&mut a, 1, None);
        let running = submit(&mut a, 2, None);
        submit(&mut a, 3, None);
        submit(&mut a, 4, Some(60_000));
        let lease = |a: &mut Applier, id| {
            a.one(
                1_000,
                Command::GrantLeasesTo {
                    worker: WorkerId(1),
                    worker_name: "w".into(),
                    tasks: vec![id],
                },
            )
            .unwrap()
        };
        let CommandOutput::LeasesGranted { grants } = lease(&mut a, done) else {
            panic!()
        };
        a.one(
            1_100,
            Command::Complete {
                task: done,
                fencing_token: grants[0].fencing_token,
                outcome: crate::state::AttemptOutcome::Succeeded,
                output_tail: String::new(),
                retry_jitter_permille: 0,
            },
        )
        .unwrap();
        lease(&mut a, running);
        a.state
    }

    #[test]
    fn a_consistent_state_passes_and_each_broken_index_is_named() {
        let s = state();
        assert_eq!(s.check_invariants(), Ok(()));
        type Corrupt = Box<dyn Fn(&mut State)>;
        let broken: Vec<(&str, Corrupt)> = vec![
            ("neither ready nor waiting", Box::new(|s| s.ready.clear())),
            (
                "should have been promoted",
                Box::new(|s| s.clock_ms = 100_000),
            ),
            (
                "without a lease",
                Box::new(|s| {
                    s.tasks.get_mut(&TaskId(2)).unwrap().lease = None;
                }),
            ),
            (
                "`leased` names task 9",
                Box::new(|s| {
                    s.leased.insert(TaskId(9));
                }),
            ),
            (
                "final tasks but",
                Box::new(|s| {
                    s.finished.clear();
                }),
            ),
            (
                "request ids",
                Box::new(|s| {
                    s.request_order.pop_back();
                }),
            ),
            (
                "slots in use",
                Box::new(|s| {
                    s.pools.set_used_for_test("p", 3);
                }),
            ),
        ];
        for (needle, corrupt) in broken {
            let mut s = state();
            corrupt(&mut s);
            let e = s.check_invariants().expect_err(needle);
            assert!(e.contains(needle), "{needle:?}: {e}");
        }
    }
}
