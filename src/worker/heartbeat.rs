//! The heartbeat path: its own OS thread, its own single-threaded runtime and its own
//! connection, so task work can never starve it (no lock, no thread pool and no connection is
//! shared with attempt execution or reporting).
//!
//! The rest of the worker tells it about leases over a channel ([`HeartbeatMsg`]); it sends one
//! heartbeat per interval covering every lease it knows, and passes the leader's verdicts back
//! as kill requests (cancelled or fenced attempts), and leases to adopt (granted to this
//! worker, but the lease reply was lost) to the lease loop.
//!
//! A lease also **lapses** here: when no heartbeat has extended it for [`lapse_after`] its
//! visibility timeout (80% of it), the attempt is killed, before the leader can expire the
//! lease and hand the task to another worker. The leader expires a lease no sooner than its
//! visibility timeout after the last heartbeat it *received*, and a heartbeat is received after
//! it was *sent*, so counting from the send time of the last extended heartbeat keeps the kill
//! ahead of any expiry. Without it, a worker whose heartbeats were lost (a lossy or cut link)
//! ran its attempt to the end while another worker ran the same task: found by `chaos sim`
//! (seed 112, a lossy network for 3 s).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{mpsc as std_mpsc, Arc};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::attempt::KillReason;
use crate::client::Client;
use crate::rpc::{HeldLease, LeaseVerdict, LeasedTask, WorkerInfo};
use crate::state::TaskId;

/// Messages from the worker to its heartbeat thread.
pub enum HeartbeatMsg {
    /// A lease to cover from now on, and where to send a kill request for it.
    Add {
        task: TaskId,
        fencing_token: u64,
        kill: mpsc::UnboundedSender<KillReason>,
        /// When the lease reached the worker (its window starts no later than this).
        received_at: Instant,
        /// The task's visibility timeout.
        visibility: Duration,
    },
    /// The attempt ended: stop covering the lease.
    Remove { task: TaskId },
}

/// What the heartbeat thread reads of the worker's changing state (atomics, no locks).
pub struct Shared {
    /// Heartbeat loop iterations (the worker's progress watermark, for the systemd watchdog).
    pub beats: AtomicU64,
    /// Consecutive failed heartbeats.
    pub failures: AtomicU32,
    pub running: AtomicU32,
    pub draining: AtomicBool,
    pub stop: AtomicBool,
    /// Bumped when heartbeats fail or start going to another replica (a new leader): the lease
    /// loop then abandons a long poll that may be stuck at a frozen or deposed leader.
    pub link_epoch: AtomicU64,
    pub link_changed: tokio::sync::Notify,
    /// The replica heartbeats last went to (the leader, after redirects).
    pub leader_addr: std::sync::Mutex<Option<String>>,
}

impl Default for Shared {
    fn default() -> Shared {
        Shared {
            beats: AtomicU64::new(0),
            failures: AtomicU32::new(0),
            running: AtomicU32::new(0),
            draining: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            link_epoch: AtomicU64::new(0),
            link_changed: tokio::sync::Notify::new(),
            leader_addr: std::sync::Mutex::new(None),
        }
    }
}

impl Shared {
    fn link_changed(&self, addr: Option<String>) {
        *self.leader_addr.lock().expect("leader addr lock") = addr;
        self.link_epoch.fetch_add(1, Ordering::AcqRel);
        self.link_changed.notify_waiters();
    }

    pub fn leader_addr(&self) -> Option<String> {
        self.leader_addr.lock().expect("leader addr lock").clone()
    }
}

/// How long after its last extension a lease lapses on the worker: 80% of its visibility
/// timeout, leaving a fifth of it for the heartbeat loop's pace and a clock running slow.
pub fn lapse_after(visibility: Duration) -> Duration {
    visibility - visibility / 5
}

/// The leases that lapsed at `now`: unextended for [`lapse_after`] their visibility timeout.
fn lapsed(held: &BTreeMap<TaskId, Held>, now: Instant) -> Vec<TaskId> {
    held.iter()
        .filter(|(_, h)| !h.killing && now >= h.extended_at + lapse_after(h.visibility))
        .map(|(t, _)| *t)
        .collect()
}

struct Held {
    fencing_token: u64,
    /// The send time of the last heartbeat that extended the lease (or its receipt).
    extended_at: Instant,
    visibility: Duration,
    kill: mpsc::UnboundedSender<KillReason>,
    /// A kill was requested already (do not repeat).
    killing: bool,
}

/// Starts the heartbeat thread.
pub fn spawn(
    mut client: Client,
    base: WorkerInfo,
    shared: Arc<Shared>,
    interval: Duration,
    inbox: std_mpsc::Receiver<HeartbeatMsg>,
    adopt: mpsc::UnboundedSender<LeasedTask>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("fleet-heartbeat".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a current-thread runtime");
            rt.block_on(async move {
                let mut held: BTreeMap<TaskId, Held> = BTreeMap::new();
                let mut next = Instant::now();
                let mut failures = 0u32;
                while !shared.stop.load(Ordering::Acquire) {
                    // Pace: one heartbeat per interval (a timer, not synchronization).
                    tokio::time::sleep_until(next.into()).await;
                    next = Instant::now() + interval;
                    shared.beats.fetch_add(1, Ordering::Relaxed);
                    shared.failures.store(failures, Ordering::Relaxed);
                    while let Ok(msg) = inbox.try_recv() {
                        match msg {
                            HeartbeatMsg::Add {
                                task,
                                fencing_token,
                                kill,
                                received_at,
                                visibility,
                            } => {
                                held.insert(
                                    task,
                                    Held {
                                        fencing_token,
                                        extended_at: received_at,
                                        visibility,
                                        kill,
                                        killing: false,
                                    },
                                );
                            }
                            HeartbeatMsg::Remove { task } => {
                                held.remove(&task);
                            }
                        }
                    }
                    let mut info = base.clone();
                    info.running = shared.running.load(Ordering::Relaxed);
                    info.draining = shared.draining.load(Ordering::Relaxed);
                    let leases: Vec<HeldLease> = held
                        .iter()
                        .map(|(task, h)| HeldLease {
                            task: *task,
                            fencing_token: h.fencing_token,
                        })
                        .collect();
                    let sent = leases.clone();
                    let sent_at = Instant::now();
                    // The call may not outlast the first lease to lapse: the lapse check below
                    // must run in time even when the leader does not answer.
                    let bound = held
                        .values()
                        .filter(|h| !h.killing)
                        .map(|h| {
                            (h.extended_at + lapse_after(h.visibility))
                                .saturating_duration_since(sent_at)
                        })
                        .min()
                        .unwrap_or(Duration::MAX)
                        .max(Duration::from_millis(10));
                    let call = client.call(|c, ctx| {
                        let (info, leases) = (info.clone(), leases.clone());
                        async move { c.heartbeat(ctx, info, leases, 0).await }
                    });
                    let result = match tokio::time::timeout(bound, call).await {
                        Ok(r) => r.map_err(|e| e.to_string()),
                        Err(_) => Err(format!(
                            "no answer within {} ms, when a lease lapses",
                            bound.as_millis()
                        )),
                    };
                    // Heartbeats failed, or now reach another leader: a lease request waiting
                    // at the old one is renewed (not on the first success: nothing moved).
                    let now_at = client.connected_to().map(str::to_string);
                    let before = shared.leader_addr();
                    if result.is_err() || (before.is_some() && now_at != before) {
                        shared.link_changed(now_at);
                    } else if before.is_none() {
                        *shared.leader_addr.lock().expect("leader addr lock") = now_at;
                    }
                    match result {
                        Ok(reply) => {
                            for a in reply.adopt {
                                tracing::warn!(
                                    task = %a.task,
                                    fencing_token = a.fencing_token,
                                    "the leader says this worker holds a lease it never received; adopting it"
                                );
                                let _ = adopt.send(a);
                            }
                            let verdicts = reply.verdicts;
                            if failures > 0 {
                                tracing::info!(after_failures = failures, "heartbeats go through again");
                            }
                            failures = 0;
                            for (l, v) in sent.iter().zip(verdicts) {
                                let reason = match v {
                                    LeaseVerdict::Extended => {
                                        if let Some(h) = held.get_mut(&l.task) {
                                            if h.fencing_token == l.fencing_token {
                                                h.extended_at = h.extended_at.max(sent_at);
                                            }
                                        }
                                        continue;
                                    }
                                    LeaseVerdict::Cancelled => KillReason::Cancelled,
                                    LeaseVerdict::Fenced => KillReason::Fenced,
                                };
                                if let Some(h) = held.get_mut(&l.task) {
                                    if !h.killing {
                                        h.killing = true;
                                        tracing::warn!(
                                            task = %l.task,
                                            fencing_token = l.fencing_token,
                                            ?reason,
                                            "the leader no longer extends this lease: killing the attempt"
                                        );
                                        let _ = h.kill.send(reason);
                                    }
                                }
                            }
                        }
                        Err(e) => {
                            failures += 1;
                            tracing::warn!(error = %e, failures, "heartbeat failed");
                        }
                    }
                    for task in lapsed(&held, Instant::now()) {
                        let h = held.get_mut(&task).expect("listed");
                        h.killing = true;
                        tracing::warn!(
                            %task,
                            fencing_token = h.fencing_token,
                            unextended_ms = h.extended_at.elapsed().as_millis() as u64,
                            visibility_timeout_ms = h.visibility.as_millis() as u64,
                            "no heartbeat extended this lease in time: killing the attempt before \
                             the leader can hand the task to another worker"
                        );
                        let _ = h.kill.send(KillReason::Lapsed);
                    }
                }
            });
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(extended_at: Instant, visibility_ms: u64, killing: bool) -> Held {
        Held {
            fencing_token: 1,
            extended_at,
            visibility: Duration::from_millis(visibility_ms),
            kill: mpsc::unbounded_channel().0,
            killing,
        }
    }

    #[test]
    fn a_lease_lapses_at_four_fifths_of_its_visibility_timeout() {
        assert_eq!(
            lapse_after(Duration::from_secs(30)),
            Duration::from_secs(24)
        );
        let t0 = Instant::now();
        let mut map = BTreeMap::new();
        map.insert(TaskId(1), held(t0, 1_000, false));
        map.insert(
            TaskId(2),
            held(t0 + Duration::from_millis(500), 1_000, false),
        );
        map.insert(TaskId(3), held(t0, 1_000, true));
        assert!(lapsed(&map, t0 + Duration::from_millis(799)).is_empty());
        assert_eq!(
            lapsed(&map, t0 + Duration::from_millis(800)),
            vec![TaskId(1)]
        );
        // An extension moves the window; a kill already sent is not repeated.
        assert_eq!(
            lapsed(&map, t0 + Duration::from_millis(1_300)),
            vec![TaskId(1), TaskId(2)]
        );
    }
}
