//! The heartbeat path: its own OS thread, its own single-threaded runtime and its own
//! connection, so task work can never starve it (no lock, no thread pool and no connection is
//! shared with attempt execution or reporting).
//!
//! The rest of the worker tells it about leases over a channel ([`HeartbeatMsg`]); it sends one
//! heartbeat per interval covering every lease it knows, and passes the leader's verdicts back
//! as kill requests (cancelled or fenced attempts), and leases to adopt (granted to this
//! worker, but the lease reply was lost) to the lease loop.

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

struct Held {
    fencing_token: u64,
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
                            } => {
                                held.insert(
                                    task,
                                    Held {
                                        fencing_token,
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
                    let result = client
                        .call(|c, ctx| {
                            let (info, leases) = (info.clone(), leases.clone());
                            async move { c.heartbeat(ctx, info, leases, 0).await }
                        })
                        .await;
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
                                    LeaseVerdict::Extended => continue,
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
                }
            });
        })
}
