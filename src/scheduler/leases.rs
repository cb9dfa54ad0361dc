//! The leader's soft state about leases: last heartbeats, grace after a leader change, worker
//! liveness.
//!
//! Heartbeats are not replicated (thousands of workers must not cost thousands of Raft writes
//! per second). The leader records each heartbeat here and, from this record, decides which
//! leases to expire; each expiry is then proposed as a replicated
//! [`Command::ExpireLease`](crate::state::Command::ExpireLease) that the state machine
//! re-checks against the lease's fencing token.
//!
//! Safety: this record can only delay an expiry, never cause a wrong one. When it is lost (a
//! leader change), [`LeaseTracker::start_term`] gives every lease a fresh visibility window
//! from the new leader's start plus a grace period, so no lease expires only because the leader
//! changed; workers reconnect and heartbeat within the grace period.
//!
//! The tracker reads no clock: callers pass `now_ms` from the leader's monotonic clock
//! ([`super::mono_ms`]), never the wall clock, so a clock step cannot expire healthy leases or
//! keep dead ones. Bounds: one entry per lease
//! and per worker known to the state; [`LeaseTracker::sync`] drops entries the state no longer
//! has.

use std::collections::{BTreeMap, BTreeSet};

use crate::state::{TaskId, WorkerId};

/// One lease as the leader watches it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Watched {
    worker: WorkerId,
    fencing_token: u64,
    visibility_timeout_ms: u64,
    /// The last time the lease was known to be alive (first seen or heartbeat), monotonic ms.
    last_seen_ms: u64,
}

/// A lease the state machine holds, as [`LeaseTracker::sync`] takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseInfo {
    pub task: TaskId,
    pub worker: WorkerId,
    pub fencing_token: u64,
    /// When the caller saw the lease (monotonic ms): its window starts here for a lease the
    /// tracker did not know yet. Not the replicated grant time, which is wall-clock time.
    pub seen_at_ms: u64,
    pub visibility_timeout_ms: u64,
}

/// What a heartbeat learns about one of the worker's leases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseStatus {
    /// Extended: keep running.
    Extended,
    /// The lease is gone or belongs to a newer token: stop the attempt (it is fenced).
    Fenced,
}

/// A lease the leader should expire, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expiry {
    pub task: TaskId,
    /// The worker that held the lease (and went silent).
    pub worker: WorkerId,
    pub fencing_token: u64,
    pub reason: String,
    /// `worker_lost` or `visibility_timeout` (the `cause` label of `lease.expired`).
    pub cause: &'static str,
}

/// The leader's record of lease and worker liveness.
#[derive(Debug, Default)]
pub struct LeaseTracker {
    leases: BTreeMap<TaskId, Watched>,
    /// Last heartbeat per worker.
    workers: BTreeMap<WorkerId, u64>,
    /// No expiry before this time (the grace period after becoming leader).
    grace_until_ms: u64,
    /// Workers that lost a lease for silence and have not heartbeated since, with when. They
    /// get no new lease until they heartbeat again: a frozen worker's lease request may still
    /// be open, and granting to it would only lose another visibility timeout and another
    /// attempt. Bounded by the workers that held leases; dropped on their next heartbeat or
    /// by [`LeaseTracker::forget_silenced`].
    silenced: BTreeMap<WorkerId, u64>,
}

impl LeaseTracker {
    /// Called when this replica becomes leader: forget everything and start every lease's
    /// window afresh at `now_ms + grace_ms`.
    pub fn start_term(&mut self, now_ms: u64, grace_ms: u64) {
        self.leases.clear();
        self.workers.clear();
        self.silenced.clear();
        self.grace_until_ms = now_ms + grace_ms;
    }

    /// Brings the record in line with the state machine's leases: new leases are watched from
    /// their grant (or the grace period, whichever is later), ended ones are dropped.
    pub fn sync(&mut self, leases: impl IntoIterator<Item = LeaseInfo>) {
        let mut seen = BTreeSet::new();
        for l in leases {
            seen.insert(l.task);
            let start = l.seen_at_ms.max(self.grace_until_ms);
            let w = self.leases.entry(l.task).or_insert(Watched {
                worker: l.worker,
                fencing_token: l.fencing_token,
                visibility_timeout_ms: l.visibility_timeout_ms,
                last_seen_ms: start,
            });
            if w.fencing_token != l.fencing_token {
                *w = Watched {
                    worker: l.worker,
                    fencing_token: l.fencing_token,
                    visibility_timeout_ms: l.visibility_timeout_ms,
                    last_seen_ms: start,
                };
            }
            self.workers.entry(l.worker).or_insert(start);
        }
        self.leases.retain(|task, _| seen.contains(task));
        let live: BTreeSet<WorkerId> = self.leases.values().map(|w| w.worker).collect();
        self.workers.retain(|w, _| live.contains(w));
    }

    /// Records one heartbeat from `worker` covering `leases` (task, fencing token).
    pub fn heartbeat(
        &mut self,
        worker: WorkerId,
        leases: &[(TaskId, u64)],
        now_ms: u64,
    ) -> Vec<LeaseStatus> {
        self.workers.insert(worker, now_ms);
        self.silenced.remove(&worker);
        leases
            .iter()
            .map(|(task, token)| match self.leases.get_mut(task) {
                Some(w) if w.fencing_token == *token && w.worker == worker => {
                    w.last_seen_ms = w.last_seen_ms.max(now_ms);
                    LeaseStatus::Extended
                }
                _ => LeaseStatus::Fenced,
            })
            .collect()
    }

    /// The leases to expire at `now_ms`: those unseen for their visibility timeout, and all
    /// leases of a worker unheard for `worker_liveness_ms` (sooner than their visibility
    /// timeouts when the liveness timeout is shorter). Nothing expires during the grace period.
    pub fn expired(&self, now_ms: u64, worker_liveness_ms: u64) -> Vec<Expiry> {
        if now_ms < self.grace_until_ms {
            return Vec::new();
        }
        self.leases
            .iter()
            .filter_map(|(task, w)| {
                let worker_seen = self
                    .workers
                    .get(&w.worker)
                    .copied()
                    .unwrap_or(w.last_seen_ms);
                let (reason, cause) = if now_ms >= worker_seen.saturating_add(worker_liveness_ms) {
                    (
                        format!(
                            "worker {} lost: no heartbeat for {} ms",
                            w.worker.0,
                            now_ms - worker_seen
                        ),
                        "worker_lost",
                    )
                } else if now_ms >= w.last_seen_ms.saturating_add(w.visibility_timeout_ms) {
                    (
                        format!(
                            "no heartbeat for {} ms (visibility timeout {} ms)",
                            now_ms - w.last_seen_ms,
                            w.visibility_timeout_ms
                        ),
                        "visibility_timeout",
                    )
                } else {
                    return None;
                };
                Some(Expiry {
                    task: *task,
                    worker: w.worker,
                    fencing_token: w.fencing_token,
                    reason,
                    cause,
                })
            })
            .collect()
    }

    /// Records that `worker` lost a lease for silence at `now_ms` (the expiry was applied).
    pub fn silence(&mut self, worker: WorkerId, now_ms: u64) {
        self.silenced.insert(worker, now_ms);
    }

    /// Whether `worker` may be granted leases: not while it is silenced (see `silenced`).
    pub fn may_grant(&self, worker: WorkerId) -> bool {
        !self.silenced.contains_key(&worker)
    }

    /// Forgets silenced workers unheard for `after_ms` (they are gone; a new worker process
    /// has a new id).
    pub fn forget_silenced(&mut self, now_ms: u64, after_ms: u64) {
        self.silenced
            .retain(|_, at| now_ms < at.saturating_add(after_ms));
    }

    /// Workers heard from, with their last heartbeat.
    pub fn workers(&self) -> impl Iterator<Item = (WorkerId, u64)> + '_ {
        self.workers.iter().map(|(w, t)| (*w, *t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W1: WorkerId = WorkerId(1);
    const W2: WorkerId = WorkerId(2);

    fn lease(task: u64, worker: WorkerId, token: u64, granted: u64) -> LeaseInfo {
        LeaseInfo {
            task: TaskId(task),
            worker,
            fencing_token: token,
            seen_at_ms: granted,
            visibility_timeout_ms: 1_000,
        }
    }

    #[test]
    fn heartbeats_extend_and_silence_expires() {
        let mut t = LeaseTracker::default();
        t.sync([lease(1, W1, 10, 0), lease(2, W1, 11, 0)]);
        assert_eq!(
            t.heartbeat(W1, &[(TaskId(1), 10)], 900),
            vec![LeaseStatus::Extended]
        );
        // Task 2 was not in the heartbeat: it expires at its visibility timeout; task 1 lives.
        let e = t.expired(1_000, 60_000);
        assert_eq!(e.len(), 1);
        assert_eq!((e[0].task, e[0].fencing_token), (TaskId(2), 11));
        assert!(
            e[0].reason.contains("visibility timeout 1000 ms"),
            "{}",
            e[0].reason
        );
        assert!(t.expired(1_899, 60_000).iter().all(|e| e.task != TaskId(1)));
        assert!(t.expired(1_900, 60_000).iter().any(|e| e.task == TaskId(1)));
    }

    #[test]
    fn a_worker_silenced_by_an_expiry_gets_nothing_until_it_heartbeats() {
        let mut t = LeaseTracker::default();
        t.sync([lease(1, W1, 10, 0)]);
        assert!(t.may_grant(W1));
        let e = t.expired(1_000, 60_000);
        assert_eq!(e[0].worker, W1);
        t.silence(W1, 1_000);
        assert!(
            !t.may_grant(W1),
            "its open lease request must not get the retry"
        );
        assert!(t.may_grant(W2));
        // It wakes and heartbeats (learning its old lease is fenced): it may take work again.
        assert_eq!(
            t.heartbeat(W1, &[(TaskId(1), 10)], 5_000),
            vec![LeaseStatus::Extended]
        );
        assert!(t.may_grant(W1));
        // A silenced worker that never comes back is forgotten.
        t.silence(W2, 1_000);
        t.forget_silenced(60_999, 60_000);
        assert!(!t.may_grant(W2));
        t.forget_silenced(61_000, 60_000);
        assert!(t.may_grant(W2));
    }

    #[test]
    fn stale_or_foreign_tokens_are_fenced() {
        let mut t = LeaseTracker::default();
        t.sync([lease(1, W1, 10, 0)]);
        // The task was re-leased to W2 with a newer token.
        t.sync([lease(1, W2, 12, 500)]);
        assert_eq!(
            t.heartbeat(W1, &[(TaskId(1), 10)], 600),
            vec![LeaseStatus::Fenced]
        );
        assert_eq!(
            t.heartbeat(W2, &[(TaskId(1), 12), (TaskId(9), 1)], 600),
            vec![LeaseStatus::Extended, LeaseStatus::Fenced]
        );
    }

    #[test]
    fn a_silent_worker_loses_all_its_leases_before_their_visibility_timeouts() {
        let mut t = LeaseTracker::default();
        let long = |task, token| LeaseInfo {
            visibility_timeout_ms: 600_000,
            ..lease(task, W1, token, 0)
        };
        t.sync([
            long(1, 10),
            long(2, 11),
            LeaseInfo {
                visibility_timeout_ms: 600_000,
                ..lease(3, W2, 12, 0)
            },
        ]);
        t.heartbeat(W2, &[(TaskId(3), 12)], 9_000);
        let e = t.expired(10_000, 10_000);
        let tasks: Vec<u64> = e.iter().map(|e| e.task.0).collect();
        assert_eq!(tasks, vec![1, 2]);
        assert!(e[0].reason.contains("worker 1 lost"), "{}", e[0].reason);
    }

    #[test]
    fn a_new_leader_honours_leases_with_a_grace_period() {
        let mut t = LeaseTracker::default();
        // The new leader starts at t=50s with a 5 s grace; the lease was granted long ago.
        t.start_term(50_000, 5_000);
        t.sync([lease(1, W1, 10, 0)]);
        assert!(
            t.expired(54_999, 60_000).is_empty(),
            "nothing expires during the grace period"
        );
        // The worker reconnects within the grace period: its lease lives on.
        assert_eq!(
            t.heartbeat(W1, &[(TaskId(1), 10)], 54_000),
            vec![LeaseStatus::Extended]
        );
        assert!(t.expired(55_900, 60_000).is_empty());
        // A lease whose worker never came back expires one visibility window after the grace.
        t.sync([lease(1, W1, 10, 0), lease(2, W2, 11, 0)]);
        assert!(t
            .expired(55_999, 60_000)
            .iter()
            .all(|e| e.task != TaskId(2)));
        assert!(t
            .expired(56_000, 60_000)
            .iter()
            .any(|e| e.task == TaskId(2)));
    }

    #[test]
    fn sync_drops_ended_leases_and_idle_workers() {
        let mut t = LeaseTracker::default();
        t.sync([lease(1, W1, 10, 0), lease(2, W2, 11, 0)]);
        t.sync([lease(2, W2, 11, 0)]);
        assert!(t
            .expired(10_000, 60_000)
            .iter()
            .all(|e| e.task == TaskId(2)));
        let workers: Vec<WorkerId> = t.workers().map(|(w, _)| w).collect();
        assert_eq!(workers, vec![W2]);
    }
}
