//! The health monitor: one task per replica that compares progress watermarks with their
//! expected cadence, acts on a stall, and builds the health report.
//!
//! Watermarks:
//! - the scheduling loop's completed iterations and the time of the last one
//!   (`Scheduler::progress`). The loop iterates at least every `scheduler.tick_ms` on every
//!   replica (a follower's iterations are idle), so a loop silent for
//!   `health.stall_threshold_ms` is stalled, whatever the role;
//! - Raft's applied index against its committed index (a follower that stops applying);
//! - the fsync thread's in-flight time (a disk that stops answering);
//! - the last time the leader replicated to this replica (a follower cut off).
//!
//! Mitigation of a stalled scheduling loop, checked every `health.check_interval_ms`:
//! 1. lease confirmation stops at once: the scheduler's ready term is cleared, so heartbeats are
//!    refused, and lease requests waiting on this replica are answered "unavailable" so workers
//!    go elsewhere (a stalled loop grants nothing anyway);
//! 2. the replica stops standing for election (`elect(false)`), so it is not chosen again while
//!    stalled;
//! 3. a leader hands leadership to the most up-to-date voter that reports itself healthy
//!    (retried every check until leadership has moved).
//!
//! When the loop makes progress again the replica re-enables elections and stays a follower; if
//! it is still leader (a one-replica cluster, or no one could take over) the loop restarts its
//! term with the failover grace, as after any leader change.
//!
//! The cluster view: every `health.peer_poll_interval_ms` the replica asks each member for its
//! own report (`health` RPC, no fan-out) and keeps the answers; `/health` never waits on a peer.
//!
//! Reachability: each report lists the members its replica could not reach for
//! [`UNREACHABLE_AFTER_POLLS`] polls (`unreachable_peers`). A replica that reads, in the fresh
//! reports of other voters (fetched over its own outgoing connections), that so many of them
//! cannot reach it that fewer than a quorum can, is *cut off*: its incoming traffic is lost
//! while its outgoing connections work. Raft does not notice (the leader's appends go out and
//! their answers come back on its own connections), but no client, worker or forwarded call
//! reaches it. A cut-off replica stops standing for election, and a cut-off leader hands
//! leadership to a healthy voter that can reach a quorum, as for a stall. Only positive
//! evidence counts: a peer that cannot be asked says nothing, so a symmetric partition is left
//! to Raft.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use openraft::async_runtime::WatchReceiver;
use openraft::{Instant as _, ServerState};
use tokio::sync::watch;

use super::fault::FaultInjector;
use super::report::*;
use crate::clock::Clock;
use crate::config::HealthConfig;
use crate::raft::log_store::LogStore;
use crate::raft::{NodeId, Raft};
use crate::rpc::context_with_timeout;
use crate::rpc::peer::PeerPool;
use crate::scheduler::Scheduler;

/// What the health module reads and acts on, and nothing else of its replica. Shared by the
/// monitor's two tasks, the HTTP endpoint and the `health` RPC.
pub struct HealthContext {
    pub node_id: NodeId,
    pub addr: String,
    /// Raft's metrics, its runtime switches (elections) and leadership transfer.
    pub raft: Raft,
    /// The fsync statistics.
    pub log: LogStore,
    /// The scheduling loop's progress and term (cleared on a stall).
    pub scheduler: Arc<Scheduler>,
    pub clock: Clock,
    /// Connections to the other members, for their reports.
    pub pool: PeerPool,
    pub health: Arc<Health>,
    pub config: HealthConfig,
    pub election_timeout_max: Duration,
    /// `scheduler.tick_ms`: the loop's expected cadence (its lag is measured beyond it).
    pub tick_ms: u64,
    /// `scheduler.worker_liveness_timeout_ms`, for the workers' part of the report.
    pub worker_liveness_timeout_ms: u64,
}

/// Peers that have not answered for this many poll intervals are unreachable.
const UNREACHABLE_AFTER_POLLS: u32 = 3;

/// The health module's state in a replica.
pub struct Health {
    pub faults: FaultInjector,
    started: Instant,
    monitor: Mutex<MonitorState>,
    /// True while the scheduling loop is stalled (wakes lease requests waiting here).
    stalled: watch::Sender<bool>,
    peers: Mutex<BTreeMap<u64, PeerView>>,
    http_addr: Mutex<Option<SocketAddr>>,
    leader_contact: Mutex<Option<Instant>>,
}

struct MonitorState {
    leaderless_since: Option<Instant>,
    /// The applied index and when it last moved.
    applied: (u64, Instant),
    stalled_since: Option<(Instant, SystemTime)>,
    mitigation: Option<String>,
    elections_enabled: bool,
    /// Since when a quorum of voters cannot reach this replica (the members saying so).
    cut_off: Option<(Instant, Vec<u64>)>,
}

struct PeerView {
    report: Option<HealthReport>,
    answered: Option<Instant>,
    error: Option<String>,
    /// When this replica started asking the peer.
    since: Instant,
}

impl Default for PeerView {
    fn default() -> Self {
        PeerView {
            report: None,
            answered: None,
            error: None,
            since: Instant::now(),
        }
    }
}

impl PeerView {
    /// Not answered for `window` (and asked for at least that long).
    fn unreachable(&self, window: Duration) -> bool {
        self.error.is_some() && self.answered.unwrap_or(self.since).elapsed() >= window
    }

    /// Its report, if it answered within `window`.
    fn fresh_report(&self, window: Duration) -> Option<&HealthReport> {
        self.report
            .as_ref()
            .filter(|_| self.answered.is_some_and(|a| a.elapsed() < window))
    }
}

impl Health {
    pub fn new(fault_injection: bool, clock: crate::clock::Clock) -> Health {
        let now = Instant::now();
        Health {
            faults: FaultInjector::new(fault_injection, clock),
            started: now,
            monitor: Mutex::new(MonitorState {
                leaderless_since: Some(now),
                applied: (0, now),
                stalled_since: None,
                mitigation: None,
                elections_enabled: true,
                cut_off: None,
            }),
            stalled: watch::channel(false).0,
            peers: Mutex::default(),
            http_addr: Mutex::default(),
            leader_contact: Mutex::default(),
        }
    }

    /// Records that the leader replicated to this replica (an accepted `append_entries`).
    pub fn note_leader_contact(&self) {
        *self.leader_contact.lock().expect("contact lock") = Some(Instant::now());
    }

    pub fn set_http_addr(&self, addr: SocketAddr) {
        *self.http_addr.lock().expect("http lock") = Some(addr);
    }

    pub fn http_addr(&self) -> Option<SocketAddr> {
        *self.http_addr.lock().expect("http lock")
    }

    /// False while this replica keeps out of elections (stalled, or cut off from a quorum).
    pub fn standing_for_election(&self) -> bool {
        self.monitor.lock().expect("monitor lock").elections_enabled
    }

    /// Whether the scheduling loop is stalled now.
    pub fn is_stalled(&self) -> bool {
        *self.stalled.borrow()
    }

    /// Follows whether the loop is stalled (for the metrics sampler).
    pub fn stalled_watch(&self) -> watch::Receiver<bool> {
        self.stalled.subscribe()
    }

    /// Resolves when the loop is (or becomes) stalled.
    pub async fn wait_stalled(&self) {
        let mut rx = self.stalled.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }
}

fn ms(d: Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX)) as u64
}

fn rfc3339_ms(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

fn role_name(s: ServerState) -> &'static str {
    match s {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "shutdown",
    }
}

/// Runs the monitor and the peer poller until the replica stops.
pub fn spawn(cx: Arc<HealthContext>) {
    let r = cx.clone();
    tokio::spawn(tracing::Instrument::in_current_span(async move {
        let every = Duration::from_millis(r.config.check_interval_ms);
        let mut ticker = tokio::time::interval(every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            check(&r).await;
        }
    }));
    tokio::spawn(tracing::Instrument::in_current_span(async move {
        let every = Duration::from_millis(cx.config.peer_poll_interval_ms);
        let mut ticker = tokio::time::interval(every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            poll_peers(&cx, every).await;
        }
    }));
}

/// Milliseconds since the scheduling loop's last iteration (since start if none yet).
fn loop_silence_ms(replica: &HealthContext) -> u64 {
    let (_, last) = replica.scheduler.progress();
    let uptime = ms(replica.health.started.elapsed());
    if last == 0 {
        uptime
    } else {
        replica.clock.wall_ms().saturating_sub(last).min(uptime)
    }
}

/// One check of the watermarks, and the mitigation it calls for.
async fn check(replica: &HealthContext) {
    let h = &replica.health;
    let threshold = replica.config.stall_threshold_ms;
    let m = replica.raft.metrics().borrow_watched().clone();
    let silence = loop_silence_ms(replica);
    let stalled = silence > threshold;
    let leading = m.current_leader == Some(replica.node_id) && m.state.is_leader();
    let mut hand_over = false;
    {
        let mut st = h.monitor.lock().expect("monitor lock");
        if m.current_leader.is_none() {
            st.leaderless_since.get_or_insert_with(Instant::now);
        } else {
            st.leaderless_since = None;
        }
        let applied = m.last_applied.as_ref().map_or(0, |l| l.index);
        if applied != st.applied.0 {
            st.applied = (applied, Instant::now());
        }
        let cut_off = cut_off_by(replica, &m);
        match (&cut_off, &st.cut_off) {
            (Some(by), None) => {
                tracing::error!(
                    unreachable_by = ?by,
                    leading,
                    "a quorum of voters cannot reach this replica (its incoming connections are \
                     lost): not standing for election{}",
                    if leading { "; handing over leadership" } else { "" }
                );
                st.cut_off = Some((Instant::now(), by.clone()));
            }
            (None, Some((since, _))) => {
                tracing::info!(
                    cut_off_ms = ms(since.elapsed()),
                    "a quorum of voters reaches this replica again"
                );
                st.cut_off = None;
            }
            _ => {}
        }
        if stalled {
            // Refuse heartbeats while stalled; the loop restarts its term when it resumes.
            replica.scheduler.ready_term.store(0, Ordering::Release);
            if st.stalled_since.is_none() {
                let since = Duration::from_millis(silence);
                st.stalled_since = Some((Instant::now() - since, SystemTime::now() - since));
                tracing::error!(
                    silence_ms = silence,
                    threshold_ms = threshold,
                    leading,
                    "the scheduling loop made no progress past the stall threshold: \
                     refusing lease confirmations and not standing for election"
                );
                st.mitigation = Some("stopped confirming leases and standing for election".into());
                h.stalled.send_replace(true);
            }
            hand_over = leading;
        } else if let Some((since, _)) = st.stalled_since.take() {
            tracing::info!(
                stalled_ms = ms(since.elapsed()),
                "the scheduling loop makes progress again"
            );
            st.mitigation = None;
            h.stalled.send_replace(false);
        }
        if let Some((_, by)) = &st.cut_off {
            let note = format!(
                "cut off: nodes {by:?} cannot reach this replica; not standing for election"
            );
            if st.stalled_since.is_none() {
                st.mitigation = Some(note);
            }
            hand_over |= leading;
        } else if st.stalled_since.is_none() {
            st.mitigation = None;
        }
        // Elections: off while stalled or cut off, on again when neither holds.
        let elect = st.stalled_since.is_none() && st.cut_off.is_none();
        if elect != st.elections_enabled {
            replica.raft.runtime_config().elect(elect);
            st.elections_enabled = elect;
            if elect {
                tracing::info!("standing for election again");
            }
        }
    }
    if hand_over {
        let window = peer_window(replica);
        let voters = m.membership_config.membership().voter_ids().count();
        let quorum = voters / 2 + 1;
        // A target must be healthy and able to reach a quorum itself (its own report lists
        // few enough members as unreachable).
        let healthy: BTreeSet<u64> = h
            .peers
            .lock()
            .expect("peers lock")
            .iter()
            .filter_map(|(id, v)| v.fresh_report(window).map(|r| (*id, r)))
            .filter(|(_, r)| {
                r.status.is_healthy()
                    && voters.saturating_sub(r.raft.unreachable_peers.len()) >= quorum
            })
            .map(|(id, _)| id)
            .collect();
        let wait = replica.election_timeout_max * 2;
        let moved =
            crate::raft::hand_over_leadership(&replica.raft, replica.node_id, wait, &healthy).await;
        let note = if moved {
            let to = replica.raft.metrics().borrow_watched().current_leader;
            format!(
                "stopped confirming leases and standing for election; handed leadership to node {}",
                to.map_or("?".into(), |t| t.to_string())
            )
        } else {
            "stopped confirming leases and standing for election; leadership not handed over \
             yet (no other voter took it), retrying"
                .to_string()
        };
        let mut st = h.monitor.lock().expect("monitor lock");
        st.mitigation = Some(match &st.cut_off {
            Some((_, by)) if st.stalled_since.is_none() => {
                format!("cut off: nodes {by:?} cannot reach this replica; {note}")
            }
            _ => note,
        });
    }
}

/// How long a peer may go unanswered before it counts as unreachable, and how fresh a report
/// must be to count as evidence.
fn peer_window(replica: &HealthContext) -> Duration {
    Duration::from_millis(replica.config.peer_poll_interval_ms) * UNREACHABLE_AFTER_POLLS
}

/// The voters whose fresh reports say they cannot reach this replica, when they leave fewer
/// than a quorum of voters (this one included) able to reach it; `None` otherwise.
fn cut_off_by(
    replica: &HealthContext,
    m: &openraft::RaftMetrics<crate::raft::TypeConfig>,
) -> Option<Vec<u64>> {
    let membership = m.membership_config.membership();
    let voters: BTreeSet<u64> = membership.voter_ids().collect();
    if voters.len() < 2 || !voters.contains(&replica.node_id) {
        return None;
    }
    let by: Vec<u64> = unreachable_by(replica)
        .into_iter()
        .filter(|id| voters.contains(id))
        .collect();
    let quorum = voters.len() / 2 + 1;
    (voters.len() - by.len() < quorum).then_some(by)
}

/// Members this replica has not reached for the peer window.
fn unreachable_peers(replica: &HealthContext) -> Vec<u64> {
    peers_where(replica, |v, window| v.unreachable(window))
}

/// Members whose fresh reports say they cannot reach this replica.
fn unreachable_by(replica: &HealthContext) -> Vec<u64> {
    peers_where(replica, |v, window| {
        v.fresh_report(window)
            .is_some_and(|r| r.raft.unreachable_peers.contains(&replica.node_id))
    })
}

/// The members whose view (and the peer window) passes `keep`.
fn peers_where(replica: &HealthContext, keep: impl Fn(&PeerView, Duration) -> bool) -> Vec<u64> {
    let window = peer_window(replica);
    replica
        .health
        .peers
        .lock()
        .expect("peers lock")
        .iter()
        .filter(|(_, v)| keep(v, window))
        .map(|(id, _)| *id)
        .collect()
}

/// Asks every other member for its own report.
async fn poll_peers(replica: &Arc<HealthContext>, timeout: Duration) {
    let members = crate::raft::other_members(&replica.raft, replica.node_id);
    let calls = members.into_iter().map(|(id, addr)| {
        let replica = replica.clone();
        async move {
            let peer = replica.pool.get(Some(id), &addr);
            let result = match peer.client().await {
                Err(e) => Err(e.to_string()),
                Ok(c) => match c.health(context_with_timeout(timeout), false).await {
                    Ok(r) => Ok(r),
                    Err(e) => {
                        if crate::rpc::peer::is_transport_failure(&e) {
                            peer.reset().await;
                        }
                        Err(format!("no health answer: {e}"))
                    }
                },
            };
            (id, result)
        }
    });
    let results = futures::future::join_all(calls).await;
    let mut peers = replica.health.peers.lock().expect("peers lock");
    let known: BTreeSet<u64> = results.iter().map(|(id, _)| *id).collect();
    peers.retain(|id, _| known.contains(id));
    for (id, result) in results {
        let view = peers.entry(id).or_default();
        match result {
            Ok(r) => {
                view.report = Some(r);
                view.answered = Some(Instant::now());
                view.error = None;
            }
            Err(e) => view.error = Some(e),
        }
    }
}

impl HealthContext {
    /// This replica's health report, with the cluster view when `with_cluster`.
    pub async fn health_report(&self, with_cluster: bool) -> HealthReport {
        let h = &self.health;
        let threshold = self.config.stall_threshold_ms;
        let m = self.raft.metrics().borrow_watched().clone();
        let membership = m.membership_config.membership().clone();
        let now = self.clock.wall_ms();
        let leading = m.current_leader == Some(self.node_id) && m.state.is_leader();
        let (raft, scheduler) = {
            let st = h.monitor.lock().expect("monitor lock");
            (
                self.raft_health(&m, &membership, &st, threshold),
                self.scheduler_health(&m, &st, leading, threshold),
            )
        };
        let storage = self.storage_health(threshold);
        let workers = leading.then(|| self.workers_health());
        let reasons: Vec<String> = [&raft.reason, &storage.reason, &scheduler.reason]
            .into_iter()
            .flatten()
            .cloned()
            .collect();
        let mut report = HealthReport {
            status: if reasons.is_empty() {
                Status::Healthy
            } else {
                Status::Unhealthy
            },
            reasons,
            node_id: self.node_id,
            addr: self.addr.clone(),
            http_addr: h.http_addr().map(|a| a.to_string()),
            checked_at: rfc3339_ms(now),
            checked_at_ms: now,
            uptime_ms: ms(h.started.elapsed()),
            raft,
            storage,
            scheduler,
            workers,
            fault_injection: h.faults.state(),
            cluster: None,
        };
        if with_cluster {
            report.cluster = Some(self.cluster_health(&report, &membership));
        }
        report
    }

    /// The Raft part of the report: role, progress, and why it is unhealthy if it is.
    fn raft_health(
        &self,
        m: &openraft::RaftMetrics<crate::raft::TypeConfig>,
        membership: &openraft::Membership<crate::raft::NodeId, crate::raft::Node>,
        st: &MonitorState,
        threshold: u64,
    ) -> RaftHealth {
        let h = &self.health;
        let role = role_name(m.state);
        let leading = m.current_leader == Some(self.node_id) && m.state.is_leader();
        let voters = membership.voter_ids().count();
        let quorum_ack_ms_ago = if leading {
            m.last_quorum_acked.as_ref().map(|t| ms(t.elapsed()))
        } else {
            None
        };
        let leader_contact_ms_ago = if leading {
            None
        } else {
            h.leader_contact
                .lock()
                .expect("contact lock")
                .map(|t| ms(t.elapsed()))
        };
        let raft_reason = if let Err(f) = &m.running_state {
            Some(format!("raft stopped: {f}"))
        } else if let Some(since) = st.leaderless_since.filter(|s| ms(s.elapsed()) > threshold) {
            Some(format!(
                "no leader known for {} ms (no quorum reachable, or not yet a member of a formed \
                 cluster)",
                ms(since.elapsed())
            ))
        } else if leading && voters > 1 {
            match quorum_ack_ms_ago {
                Some(a) if a > threshold => {
                    Some(format!("the leader has not heard from a quorum for {a} ms"))
                }
                _ => None,
            }
        } else if !leading && m.state != ServerState::Candidate {
            let age = leader_contact_ms_ago.unwrap_or(ms(h.started.elapsed()));
            (age > threshold).then(|| {
                format!(
                    "no contact with the leader (node {}) for {age} ms",
                    m.current_leader.map_or("?".into(), |l| l.to_string())
                )
            })
        } else {
            None
        };
        RaftHealth {
            healthy: raft_reason.is_none(),
            reason: raft_reason,
            role: role.into(),
            term: m.current_term,
            leader_id: m.current_leader,
            leader_addr: m
                .current_leader
                .and_then(|l| membership.get_node(&l).map(|n| n.addr.clone())),
            last_log_index: m.last_log_index,
            committed_index: m.local_committed.as_ref().map(|l| l.index),
            applied_index: m.last_applied.as_ref().map(|l| l.index),
            quorum_ack_ms_ago,
            leader_contact_ms_ago,
            elections_enabled: st.elections_enabled,
            unreachable_peers: unreachable_peers(self),
            unreachable_by: unreachable_by(self),
        }
    }

    /// The storage part: the fsync thread's progress.
    fn storage_health(&self, threshold: u64) -> StorageHealth {
        let fs = self.log.flush_stats();
        let in_flight = fs.in_flight_since.map(|t| ms(t.elapsed()));
        let storage_reason = match in_flight {
            Some(w) if w > threshold => Some(format!(
                "an fsync has not completed for {w} ms (threshold {threshold} ms): the disk is \
                 stalled, and Raft writes on this replica wait"
            )),
            _ if fs.last_failed => Some("the last fsync failed (see the log)".to_string()),
            _ => None,
        };
        let last_ok_ms = fs
            .last_ok_at
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(ms);
        StorageHealth {
            healthy: storage_reason.is_none(),
            reason: storage_reason,
            last_fsync_at: fs.last_ok_at.map(rfc3339),
            last_fsync_at_ms: last_ok_ms,
            last_fsync_latency_us: fs.last_latency.as_micros() as u64,
            fsync_in_flight_ms: in_flight,
            fsyncs: fs.flushes,
            fsync_failures: fs.failures,
        }
    }

    /// The scheduler part: the loop's progress and the apply backlog.
    fn scheduler_health(
        &self,
        m: &openraft::RaftMetrics<crate::raft::TypeConfig>,
        st: &MonitorState,
        leading: bool,
        threshold: u64,
    ) -> SchedulerHealth {
        let (iterations, last_ms) = self.scheduler.progress();
        let silence = loop_silence_ms(self);
        let applied = m.last_applied.as_ref().map_or(0, |l| l.index);
        let committed = m.local_committed.as_ref().map_or(0, |l| l.index);
        let apply_backlog = committed.saturating_sub(applied);
        let apply_idle_ms = ms(st.applied.1.elapsed());
        let sched_reason = if let Some((since, _)) = st.stalled_since {
            Some(format!(
                "the scheduling loop has made no progress for {} ms (threshold {threshold} ms)",
                ms(since.elapsed()).max(silence)
            ))
        } else if apply_backlog > 0 && apply_idle_ms > threshold {
            Some(format!(
                "{apply_backlog} committed entries have not been applied for {apply_idle_ms} ms"
            ))
        } else {
            None
        };
        let state = if st.stalled_since.is_some() {
            "stalled"
        } else if leading && self.scheduler.ready_term() == Some(m.current_term) {
            "leading"
        } else if leading {
            "catching_up"
        } else {
            "standby"
        };
        SchedulerHealth {
            healthy: sched_reason.is_none(),
            reason: sched_reason,
            state: state.into(),
            latest_scheduler_heartbeat: (last_ms > 0).then(|| rfc3339_ms(last_ms)),
            latest_scheduler_heartbeat_ms: last_ms,
            loop_lag_ms: silence.saturating_sub(self.tick_ms),
            iterations,
            longest_gap_ms: self.scheduler.longest_gap_ms(),
            stalled_since: st.stalled_since.map(|(_, t)| rfc3339(t)),
            mitigation: st.mitigation.clone(),
            apply_backlog,
            apply_idle_ms,
        }
    }

    /// The workers as the leader knows them.
    fn workers_health(&self) -> WorkersHealth {
        let mono = self.clock.mono_ms();
        let list = self
            .scheduler
            .core()
            .workers()
            .list(mono, self.worker_liveness_timeout_ms);
        let mut w = WorkersHealth {
            active: 0,
            draining: 0,
            lost: 0,
            free_slots: 0,
            not_active: Vec::new(),
        };
        for (r, state) in list {
            match state.as_str() {
                "active" => {
                    w.active += 1;
                    w.free_slots += u64::from(r.info.slots.saturating_sub(r.info.running));
                    continue;
                }
                "draining" => w.draining += 1,
                _ => w.lost += 1,
            }
            w.not_active.push(WorkerBrief {
                id: r.info.id.0,
                name: r.info.name.clone(),
                state: state.as_str().into(),
                last_seen_ms_ago: mono.saturating_sub(r.last_seen_ms),
            });
        }
        w
    }

    fn cluster_health(
        &self,
        own: &HealthReport,
        membership: &openraft::Membership<crate::raft::NodeId, crate::raft::Node>,
    ) -> ClusterHealth {
        let fresh =
            Duration::from_millis(self.config.peer_poll_interval_ms) * UNREACHABLE_AFTER_POLLS;
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        let peers = self.health.peers.lock().expect("peers lock");
        let now = own.checked_at_ms;
        let mut members = Vec::new();
        let mut reports: BTreeMap<u64, &HealthReport> = BTreeMap::new();
        for (id, node) in membership.nodes() {
            let (report, answered, error) = if *id == self.node_id {
                (Some(own), Some(Duration::ZERO), None)
            } else {
                match peers.get(id) {
                    Some(v) => (
                        v.report.as_ref(),
                        v.answered.map(|a| a.elapsed()),
                        v.error.clone(),
                    ),
                    None => (None, None, Some("not asked yet".into())),
                }
            };
            let reachable = answered.is_some_and(|a| a < fresh);
            let report = report.filter(|_| reachable);
            if let Some(r) = report {
                reports.insert(*id, r);
            }
            members.push(MemberHealth {
                id: *id,
                addr: node.addr.clone(),
                voter: voters.contains(id),
                reachable,
                status: report.map(|r| r.status),
                reasons: report.map(|r| r.reasons.clone()).unwrap_or_default(),
                role: report.map(|r| r.raft.role.clone()),
                term: report.map(|r| r.raft.term),
                scheduler_heartbeat_ms_ago: report.map(|r| {
                    let at = r.scheduler.latest_scheduler_heartbeat_ms;
                    if at == 0 {
                        r.uptime_ms
                    } else {
                        r.checked_at_ms.saturating_sub(at) + now.saturating_sub(r.checked_at_ms)
                    }
                }),
                answered_ms_ago: answered.map(ms),
                error: if reachable { None } else { error },
            });
        }
        // The leader: as named by the reachable member with the highest term.
        let (term, leader) = reports
            .values()
            .map(|r| (r.raft.term, r.raft.leader_id))
            .max_by_key(|(t, l)| (*t, l.is_some()))
            .unwrap_or((own.raft.term, own.raft.leader_id));
        let healthy_voters = voters
            .iter()
            .filter(|v| reports.get(v).is_some_and(|r| r.status.is_healthy()))
            .count() as u32;
        let quorum = voters.len() as u32 / 2 + 1;
        let mut reasons = Vec::new();
        let mut status = Status::Healthy;
        match leader {
            None => reasons.push(format!("no leader in term {term}")),
            Some(l) => match reports.get(&l) {
                None => reasons.push(format!("the leader (node {l}) is unreachable")),
                Some(r) if !r.status.is_healthy() => reasons.push(format!(
                    "the leader (node {l}) is unhealthy: {}",
                    r.reasons.join("; ")
                )),
                Some(r) if r.scheduler.state != "leading" => reasons.push(format!(
                    "the leader (node {l}) is not scheduling yet ({})",
                    r.scheduler.state
                )),
                Some(_) => {}
            },
        }
        if healthy_voters < quorum {
            reasons.push(format!(
                "only {healthy_voters} of {} voters are healthy; a quorum needs {quorum}",
                voters.len()
            ));
        }
        if !reasons.is_empty() {
            status = Status::Unhealthy;
        }
        for m in &members {
            if Some(m.id) == leader {
                continue;
            }
            let problem = if !m.reachable {
                Some(format!(
                    "node {} is unreachable{}",
                    m.id,
                    m.error
                        .as_ref()
                        .map(|e| format!(" ({e})"))
                        .unwrap_or_default()
                ))
            } else if m.status != Some(Status::Healthy) {
                Some(format!(
                    "node {} is unhealthy: {}",
                    m.id,
                    m.reasons.join("; ")
                ))
            } else {
                None
            };
            if let Some(p) = problem {
                reasons.push(p);
                if status == Status::Healthy {
                    status = Status::Degraded;
                }
            }
        }
        ClusterHealth {
            status,
            reasons,
            reported_by: self.node_id,
            leader_id: leader,
            term,
            voters: voters.len() as u32,
            healthy_voters,
            members,
        }
    }
}
