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
use crate::rpc::{HeartbeatReply, HeldLease, LeaseVerdict, LeasedTask, WorkerInfo};
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
    /// Heartbeats the leader answered (a drain waits for one sent after it began).
    pub answered: AtomicU64,
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
            answered: AtomicU64::new(0),
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
    client: Client,
    base: WorkerInfo,
    shared: Arc<Shared>,
    interval: Duration,
    inbox: std_mpsc::Receiver<HeartbeatMsg>,
    adopt: mpsc::UnboundedSender<LeasedTask>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let mut beater = Beater {
        client,
        base,
        shared,
        inbox,
        adopt,
        held: BTreeMap::new(),
        failures: 0,
    };
    std::thread::Builder::new()
        .name("fleet-heartbeat".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a current-thread runtime");
            rt.block_on(async move {
                let mut next = Instant::now();
                while !beater.shared.stop.load(Ordering::Acquire) {
                    // Pace: one heartbeat per interval (a timer, not synchronization).
                    tokio::time::sleep_until(next.into()).await;
                    next = Instant::now() + interval;
                    beater.beat().await;
                }
            });
        })
}

/// The heartbeat thread's state: the leases it covers and how the link to the leader fares.
struct Beater {
    client: Client,
    base: WorkerInfo,
    shared: Arc<Shared>,
    inbox: std_mpsc::Receiver<HeartbeatMsg>,
    adopt: mpsc::UnboundedSender<LeasedTask>,
    held: BTreeMap<TaskId, Held>,
    /// Heartbeats failed in a row.
    failures: u32,
}

impl Beater {
    /// One heartbeat covering every held lease, then the verdicts and the lapse check.
    async fn beat(&mut self) {
        self.shared.beats.fetch_add(1, Ordering::Relaxed);
        self.shared.failures.store(self.failures, Ordering::Relaxed);
        self.take_inbox();
        let sent: Vec<HeldLease> = self
            .held
            .iter()
            .map(|(task, h)| HeldLease {
                task: *task,
                fencing_token: h.fencing_token,
            })
            .collect();
        let sent_at = Instant::now();
        let result = self.send(&sent, sent_at).await;
        self.note_link(result.is_ok());
        match result {
            Ok(reply) => {
                for a in reply.adopt {
                    // Usually the grant's reply is still on its way to the lease loop (this
                    // heartbeat overtook it), sometimes it was lost; the lease loop starts each
                    // fencing token once either way. Not a warning: it happens in normal runs.
                    tracing::info!(
                        task = %a.task,
                        fencing_token = a.fencing_token,
                        "the leader says this worker holds a lease it has not started (its grant \
                         reply is on its way or was lost): starting it"
                    );
                    let _ = self.adopt.send(a);
                }
                if self.failures > 0 {
                    tracing::info!(
                        after_failures = self.failures,
                        "heartbeats go through again"
                    );
                }
                self.failures = 0;
                self.apply_verdicts(&sent, reply.verdicts, sent_at);
                // After the leases to adopt were passed on: a drain waiting for this answer
                // finds them queued.
                self.shared.answered.fetch_add(1, Ordering::Release);
            }
            Err(e) => {
                self.failures += 1;
                tracing::warn!(error = %e, failures = self.failures, "heartbeat failed");
            }
        }
        self.kill_lapsed();
    }

    /// Takes the attempts started and ended since the last heartbeat.
    fn take_inbox(&mut self) {
        while let Ok(msg) = self.inbox.try_recv() {
            match msg {
                HeartbeatMsg::Add {
                    task,
                    fencing_token,
                    kill,
                    received_at,
                    visibility,
                } => {
                    let h = Held {
                        fencing_token,
                        extended_at: received_at,
                        visibility,
                        kill,
                        killing: false,
                    };
                    self.held.insert(task, h);
                }
                HeartbeatMsg::Remove { task } => {
                    self.held.remove(&task);
                }
            }
        }
    }

    /// The heartbeat call, bounded so that it does not outlast the first lease to lapse: the
    /// lapse check must run in time even when the leader does not answer.
    async fn send(
        &mut self,
        leases: &[HeldLease],
        sent_at: Instant,
    ) -> Result<HeartbeatReply, String> {
        let mut info = self.base.clone();
        info.running = self.shared.running.load(Ordering::Relaxed);
        info.draining = self.shared.draining.load(Ordering::Relaxed);
        let bound = self
            .held
            .values()
            .filter(|h| !h.killing)
            .map(|h| (h.extended_at + lapse_after(h.visibility)).saturating_duration_since(sent_at))
            .min()
            .unwrap_or(Duration::MAX)
            .max(Duration::from_millis(10));
        let call = self.client.call(|c, ctx| {
            let (info, leases) = (info.clone(), leases.to_vec());
            async move { c.heartbeat(ctx, info, leases, 0).await }
        });
        match tokio::time::timeout(bound, call).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err(format!(
                "no answer within {} ms, when a lease lapses",
                bound.as_millis()
            )),
        }
    }

    /// Heartbeats failed, or now reach another leader: a lease request waiting at the old one
    /// is renewed (not on the first success: nothing moved).
    fn note_link(&self, ok: bool) {
        let now_at = self.client.connected_to().map(str::to_string);
        let before = self.shared.leader_addr();
        if !ok || (before.is_some() && now_at != before) {
            self.shared.link_changed(now_at);
        } else if before.is_none() {
            *self.shared.leader_addr.lock().expect("leader addr lock") = now_at;
        }
    }

    /// Extends the leases the leader extended; kills the attempts of the others.
    fn apply_verdicts(
        &mut self,
        sent: &[HeldLease],
        verdicts: Vec<LeaseVerdict>,
        sent_at: Instant,
    ) {
        for (l, v) in sent.iter().zip(verdicts) {
            let Some(h) = self.held.get_mut(&l.task) else {
                continue;
            };
            let reason = match v {
                LeaseVerdict::Extended => {
                    if h.fencing_token == l.fencing_token {
                        h.extended_at = h.extended_at.max(sent_at);
                    }
                    continue;
                }
                LeaseVerdict::Cancelled => KillReason::Cancelled,
                LeaseVerdict::Fenced => KillReason::Fenced,
            };
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

    /// Kills the attempts whose lease no heartbeat extended in time, before the leader can
    /// hand their tasks to another worker.
    fn kill_lapsed(&mut self) {
        for task in lapsed(&self.held, Instant::now()) {
            let h = self.held.get_mut(&task).expect("listed");
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
