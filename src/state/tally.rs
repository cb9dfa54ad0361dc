//! Per-queue counts kept as tasks move, so `queue stats` and the metrics sample cost O(queues)
//! instead of a scan of every retained task (with 200,000 tasks queued, the sampler's scan ran
//! under the state lock every sample).
//!
//! Derived state: not encoded in snapshots, rebuilt after decoding ([`super::State::rebuild_tally`]).

use std::collections::BTreeMap;

use super::TaskState;

/// The counts of one queue.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueTally {
    /// Tasks by state (indexed by [`index`]).
    pub by_state: [u64; 6],
    /// Ready tasks (in the ready index) whose state is `Failed` (a retry whose time came).
    pub ready_failed: u64,
    /// `ready_at_ms` of the ready tasks: when each became ready, with how many at that time.
    pub ready_since: BTreeMap<u64, u64>,
}

/// The counts of every queue with a retained task.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tally {
    pub queues: BTreeMap<String, QueueTally>,
}

/// The slot of `s` in [`QueueTally::by_state`].
pub fn index(s: TaskState) -> usize {
    match s {
        TaskState::Queued => 0,
        TaskState::Running => 1,
        TaskState::Failed => 2,
        TaskState::Succeeded => 3,
        TaskState::Dead => 4,
        TaskState::Cancelled => 5,
    }
}

impl Tally {
    fn queue(&mut self, q: &str) -> &mut QueueTally {
        if !self.queues.contains_key(q) {
            self.queues.insert(q.to_string(), QueueTally::default());
        }
        self.queues.get_mut(q).expect("inserted")
    }

    /// A task of queue `q` moved from `from` (None: it is new) to `to` (None: it is gone).
    pub fn moved(&mut self, q: &str, from: Option<TaskState>, to: Option<TaskState>) {
        let t = self.queue(q);
        if let Some(f) = from {
            t.by_state[index(f)] -= 1;
        }
        if let Some(s) = to {
            t.by_state[index(s)] += 1;
        }
        if t.by_state.iter().all(|&n| n == 0) {
            self.queues.remove(q);
        }
    }

    /// A task of queue `q` in `state`, ready since `at`, entered (`+1`) or left (`-1`) the
    /// ready index.
    pub fn ready(&mut self, q: &str, state: TaskState, at: u64, entered: bool) {
        let t = self.queue(q);
        let failed = u64::from(state == TaskState::Failed);
        if entered {
            t.ready_failed += failed;
            *t.ready_since.entry(at).or_default() += 1;
        } else {
            t.ready_failed -= failed;
            if let Some(n) = t.ready_since.get_mut(&at) {
                *n -= 1;
                if *n == 0 {
                    t.ready_since.remove(&at);
                }
            }
        }
    }
}
