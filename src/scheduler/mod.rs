//! The scheduler: what the leader decides that the state machine then commits.
//!
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

pub mod leases;
pub mod scheduling_loop;
pub mod ticker;
pub mod workers;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use crate::error::Error;
use crate::rpc::{LeasedTask, WorkerInfo};

/// Most lease requests waiting at the leader at once; more are refused as unavailable (the
/// worker retries).
pub const MAX_PENDING_POLLS: usize = 65_536;

/// One worker's lease request waiting in the loop.
pub(crate) struct Poll {
    pub worker: WorkerInfo,
    pub max: u32,
    pub deadline: Instant,
    pub reply: oneshot::Sender<Result<Vec<LeasedTask>, Error>>,
}

/// The scheduler's shared part: soft state and the loop's inbox.
pub struct Scheduler {
    pub(crate) tracker: Mutex<leases::LeaseTracker>,
    pub(crate) workers: Mutex<workers::WorkerRegistry>,
    polls: mpsc::Sender<Poll>,
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

impl Default for Scheduler {
    fn default() -> Self {
        let (polls, inbox) = mpsc::channel(MAX_PENDING_POLLS);
        Scheduler {
            tracker: Mutex::default(),
            workers: Mutex::default(),
            polls,
            inbox: Mutex::new(Some(inbox)),
            ready_term: AtomicU64::new(0),
            ready_since_ms: AtomicU64::new(0),
            iterations: AtomicU64::new(0),
            last_iteration_ms: AtomicU64::new(0),
            longest_gap_ms: AtomicU64::new(0),
        }
    }
}

impl Scheduler {
    /// Queues a lease request for the loop and waits for its answer.
    pub(crate) async fn lease(
        &self,
        worker: WorkerInfo,
        max: u32,
        deadline: Instant,
    ) -> Result<Vec<LeasedTask>, Error> {
        let (reply, rx) = oneshot::channel();
        self.polls
            .try_send(Poll {
                worker,
                max,
                deadline,
                reply,
            })
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

/// Milliseconds on this process's monotonic clock (since its first reading). The lease tracker
/// and the worker registry measure silence with it, never with the wall clock: a wall-clock
/// step (NTP, `date -s`, the clock fault) must not make every healthy lease look silent (a
/// step forward expired them all, found by the chaos harness's clock-step scenario) nor keep a
/// dead worker's leases alive (a step back).
pub fn mono_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
}

/// A [`mono_ms`] reading as wall-clock time (ms since the Unix epoch), for display.
pub fn mono_to_wall_ms(mono: u64) -> u64 {
    crate::server::proposer::now_ms().saturating_sub(mono_ms().saturating_sub(mono))
}
