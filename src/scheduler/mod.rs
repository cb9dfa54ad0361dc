//! The scheduler: what the leader decides that the state machine then commits.
//!
//! - [`core::SchedulerCore`]: the leader's decisions as plain code (sans-IO): lease requests,
//!   heartbeat verdicts, expiries, purges and grants, driven by inputs and returning commands
//!   and replies. Everything below is a shell around it.
//! - [`scheduling_loop`]: the leader's loop. It grants leases to waiting workers
//!   ([`State::pick_ready`](crate::state::State::pick_ready) then
//!   [`Command::GrantLeases`](crate::state::Command::GrantLeases)), expires leases that were
//!   not extended in time or whose worker is lost, purges finished tasks past their retention,
//!   and records its progress.
//! - [`leases::LeaseTracker`]: the leader's soft state about heartbeats, grace periods and
//!   worker liveness, from which it decides expiries.
//! - [`workers::WorkerRegistry`]: the workers the leader has heard from (soft state).
//! - [`ticker`]: the leader's loop that fires due schedule ticks (planned by
//!   [`crate::schedule::plan`], applied exactly once by the state machine).
//!
//! Heartbeats, lease requests and reports arrive as RPCs (`server::service`); heartbeats only
//! touch the soft state and never cost a Raft write.

pub mod core;
pub mod leases;
pub mod scheduling_loop;
pub mod ticker;
pub mod workers;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use tokio::sync::{mpsc, oneshot};

use self::core::{CoreConfig, PollRequest, SchedulerCore};
use crate::error::Error;
use crate::rpc::{LeasedTask, WorkerInfo};

/// Most lease requests waiting at the leader at once; more are refused as unavailable (the
/// worker retries).
pub const MAX_PENDING_POLLS: usize = 65_536;

/// One worker's lease request on its way to the loop, with the channel its answer goes to.
pub(crate) struct Poll {
    pub request: PollRequest,
    pub reply: oneshot::Sender<Result<Vec<LeasedTask>, Error>>,
}

/// The scheduler's shared part: soft state and the loop's inbox.
pub struct Scheduler {
    /// The decisions and the soft state they need. Locked briefly, never across an await
    /// (after the state machine's lock when both are held).
    core: Mutex<SchedulerCore>,
    polls: mpsc::Sender<Poll>,
    next_poll: AtomicU64,
    inbox: Mutex<Option<mpsc::Receiver<Poll>>>,
    /// The term whose state the loop has caught up with (0: not leading). Heartbeats are only
    /// answered when it equals the current term, so a new leader never fences a lease it has
    /// not applied yet.
    pub(crate) ready_term: AtomicU64,
    /// When the loop became ready in its term (ms since the epoch, this replica's clock): ticks
    /// before it passed while no leader could fire them (`schedule::plan`).
    pub(crate) ready_since_ms: AtomicU64,
    /// Completed loop iterations, and when the last one ended (ms since the epoch).
    iterations: AtomicU64,
    last_iteration_ms: AtomicU64,
    /// The longest time between two consecutive iterations since start (ms): how close a
    /// healthy loop came to the stall threshold.
    longest_gap_ms: AtomicU64,
}

impl Scheduler {
    pub fn new(cfg: CoreConfig) -> Self {
        let (polls, inbox) = mpsc::channel(MAX_PENDING_POLLS);
        Scheduler {
            core: Mutex::new(SchedulerCore::new(cfg)),
            polls,
            next_poll: AtomicU64::new(1),
            inbox: Mutex::new(Some(inbox)),
            ready_term: AtomicU64::new(0),
            ready_since_ms: AtomicU64::new(0),
            iterations: AtomicU64::new(0),
            last_iteration_ms: AtomicU64::new(0),
            longest_gap_ms: AtomicU64::new(0),
        }
    }

    /// The core (locked).
    pub fn core(&self) -> MutexGuard<'_, SchedulerCore> {
        self.core.lock().expect("scheduler core lock")
    }

    /// Queues a lease request for the loop and waits for its answer; `deadline_ms` is on the
    /// replica's monotonic clock.
    pub async fn lease(
        &self,
        worker: WorkerInfo,
        max: u32,
        deadline_ms: u64,
    ) -> Result<Vec<LeasedTask>, Error> {
        let (reply, rx) = oneshot::channel();
        let request = PollRequest {
            id: self.next_poll.fetch_add(1, Ordering::Relaxed),
            worker,
            max,
            deadline_ms,
        };
        self.polls
            .try_send(Poll { request, reply })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => Error::Unavailable(format!(
                    "{MAX_PENDING_POLLS} lease requests are waiting already; retry"
                )),
                mpsc::error::TrySendError::Closed(_) => {
                    Error::Unavailable("the scheduling loop has stopped".into())
                }
            })?;
        rx.await
            .unwrap_or_else(|_| Err(Error::Unavailable("the scheduling loop has stopped".into())))
    }

    /// The term the loop is ready in, if it is leading.
    pub fn ready_term(&self) -> Option<u64> {
        Some(self.ready_term.load(Ordering::Acquire)).filter(|t| *t > 0)
    }

    /// Completed iterations of the loop and the time the last one ended (ms since the epoch).
    pub fn progress(&self) -> (u64, u64) {
        (
            self.iterations.load(Ordering::Relaxed),
            self.last_iteration_ms.load(Ordering::Relaxed),
        )
    }

    /// The longest time between two consecutive iterations since start (ms).
    pub fn longest_gap_ms(&self) -> u64 {
        self.longest_gap_ms.load(Ordering::Relaxed)
    }

    /// Records a completed iteration at `now_ms`.
    pub(crate) fn record_iteration(&self, now_ms: u64) {
        self.iterations.fetch_add(1, Ordering::Relaxed);
        let last = self.last_iteration_ms.swap(now_ms, Ordering::Relaxed);
        if last > 0 {
            self.longest_gap_ms
                .fetch_max(now_ms.saturating_sub(last), Ordering::Relaxed);
        }
    }

    fn take_inbox(&self) -> Option<mpsc::Receiver<Poll>> {
        self.inbox.lock().expect("inbox lock").take()
    }
}
