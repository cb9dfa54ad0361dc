//! The leader's registry of workers: soft state, rebuilt from heartbeats after a leader change.
//!
//! Workers are not replicated: a worker describes itself ([`WorkerInfo`]) in every lease
//! request and heartbeat, so a new leader knows every live worker within one heartbeat interval.
//! What must survive a leader change (which worker holds which lease, with which fencing token)
//! is in the replicated state; this registry only answers `fleet worker list`.
//!
//! Bounds: at most [`MAX_WORKERS`] entries; workers unheard for `forget_after_ms` are dropped,
//! the longest-silent first when the bound is reached.

use std::collections::BTreeMap;

use crate::rpc::WorkerInfo;
use crate::state::WorkerId;

/// Most workers the registry remembers.
pub const MAX_WORKERS: usize = 100_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    pub info: WorkerInfo,
    pub last_seen_ms: u64,
}

/// How a worker looks from the leader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    Active,
    Draining,
    Lost,
}

impl WorkerState {
    pub fn as_str(&self) -> &'static str {
        match self {
            WorkerState::Active => "active",
            WorkerState::Draining => "draining",
            WorkerState::Lost => "lost",
        }
    }
}

#[derive(Debug, Default)]
pub struct WorkerRegistry {
    workers: BTreeMap<WorkerId, Registered>,
}

impl WorkerRegistry {
    /// Records that `info.id` was heard from at `now_ms`.
    pub fn seen(&mut self, info: &WorkerInfo, now_ms: u64) {
        let entry = self.workers.entry(info.id).or_insert_with(|| Registered {
            info: info.clone(),
            last_seen_ms: now_ms,
        });
        entry.info = info.clone();
        entry.last_seen_ms = entry.last_seen_ms.max(now_ms);
        if self.workers.len() > MAX_WORKERS {
            let oldest = self
                .workers
                .iter()
                .min_by_key(|(_, r)| r.last_seen_ms)
                .map(|(id, _)| *id);
            if let Some(id) = oldest {
                self.workers.remove(&id);
            }
        }
    }

    /// A worker that said it is leaving.
    pub fn remove(&mut self, id: WorkerId) {
        self.workers.remove(&id);
    }

    /// Drops workers unheard since `now_ms - forget_after_ms`.
    pub fn forget_silent(&mut self, now_ms: u64, forget_after_ms: u64) {
        self.workers
            .retain(|_, r| now_ms < r.last_seen_ms.saturating_add(forget_after_ms));
    }

    /// Every known worker with its state at `now_ms`.
    pub fn list(&self, now_ms: u64, liveness_ms: u64) -> Vec<(Registered, WorkerState)> {
        self.workers
            .values()
            .map(|r| {
                let state = if now_ms >= r.last_seen_ms.saturating_add(liveness_ms) {
                    WorkerState::Lost
                } else if r.info.draining {
                    WorkerState::Draining
                } else {
                    WorkerState::Active
                };
                (r.clone(), state)
            })
            .collect()
    }

    /// Whether the worker's latest heartbeat said it is draining.
    pub fn is_draining(&self, id: WorkerId) -> bool {
        self.workers.get(&id).is_some_and(|r| r.info.draining)
    }

    pub fn clear(&mut self) {
        self.workers.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: u64, draining: bool) -> WorkerInfo {
        WorkerInfo {
            id: WorkerId(id),
            name: format!("w{id}"),
            queues: vec!["default".into()],
            slots: 4,
            running: 0,
            draining,
        }
    }

    #[test]
    fn states_follow_heartbeats_and_draining() {
        let mut r = WorkerRegistry::default();
        r.seen(&info(1, false), 1_000);
        r.seen(&info(2, true), 1_000);
        r.seen(&info(3, false), 0);
        let states: Vec<WorkerState> = r.list(5_000, 4_500).into_iter().map(|x| x.1).collect();
        assert_eq!(
            states,
            vec![
                WorkerState::Active,
                WorkerState::Draining,
                WorkerState::Lost
            ]
        );
        r.forget_silent(5_000, 4_500);
        assert_eq!(r.list(5_000, 4_500).len(), 2);
        r.remove(WorkerId(2));
        assert_eq!(r.list(5_000, 4_500).len(), 1);
    }

    #[test]
    fn last_seen_never_goes_back() {
        let mut r = WorkerRegistry::default();
        r.seen(&info(1, false), 2_000);
        r.seen(&info(1, false), 1_000);
        assert_eq!(r.list(2_000, 10)[0].0.last_seen_ms, 2_000);
    }
}
