//! The gauges: sampled every `metrics.interval_ms` by each replica.
//!
//! Every replica reports its own Raft position and scheduling-loop lag (label `node`). The
//! leader also reports the cluster: tasks by queue and state, the oldest ready task's age,
//! starving tasks, workers and open slots, replication lag per follower, and counts
//! `scheduler_heartbeat` while its loop makes progress. A replica that stops leading sets the
//! cluster gauges it reported to 0 once, so a Prometheus scrape of a follower shows no stale
//! queue, and never sends them again (StatsD names carry no node: only the leader may write
//! them).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::clock::Clock;
use crate::metrics::names::*;
use crate::raft::state_machine_store::StateMachineStore;
use crate::raft::{NodeId, Raft};
use crate::rpc::peer::LocalIdentity;
use crate::rpc::ClusterStatus;
use crate::scheduler::workers::{Registered, WorkerState};
use crate::scheduler::Scheduler;
use crate::state::runs::RunCounts;
use crate::state::{QueueStats, RunId};

/// What the sampler reads of its replica, and nothing more.
pub struct SamplerContext {
    pub node_id: NodeId,
    /// Raft's metrics: this replica's position and view of the cluster.
    pub raft: Raft,
    pub identity: Arc<LocalIdentity>,
    /// The scheduling loop's progress, term and worker registry.
    pub scheduler: Arc<Scheduler>,
    /// The replicated state (queue, pool and run counts).
    pub sm: StateMachineStore,
    pub clock: Clock,
    /// True while the health module has the scheduling loop stalled.
    pub stalled: watch::Receiver<bool>,
    /// Set when the replica stops.
    pub stop: watch::Receiver<Option<String>>,
    pub interval: Duration,
    pub stall_threshold_ms: u64,
    pub worker_liveness_timeout_ms: u64,
}

/// Runs until the replica stops.
pub async fn run(mut cx: SamplerContext) {
    let mut ticker = tokio::time::interval(cx.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stop = cx.stop.clone();
    let mut state = Sampled::default();
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.wait_for(|s| s.is_some()) => return,
        }
        sample(&mut cx, &mut state).await;
        crate::metrics::upkeep();
    }
}

/// What the previous samples reported, to notice changes and zero what disappeared.
#[derive(Default)]
struct Sampled {
    leader: Option<u64>,
    first: bool,
    /// Cluster gauges (name, labels) last set by this replica as leader.
    cluster: BTreeSet<Series>,
    /// While leading: the replicated run counts per workflow counted so far, and the last run
    /// end whose duration was recorded (`None` until the first sample as leader sets them, so
    /// a new leader does not count again what its predecessor counted).
    runs: Option<RunsSeen>,
}

/// Run counts per workflow, and the last run end recorded.
type RunsSeen = (BTreeMap<String, RunCounts>, (u64, RunId));

/// A gauge series: its name and labels.
type Series = (&'static str, Vec<(&'static str, String)>);

fn labels_of(labels: &[(&'static str, String)]) -> Vec<metrics::Label> {
    labels
        .iter()
        .map(|(k, v)| metrics::Label::new(*k, v.clone()))
        .collect()
}

/// The cluster gauges set in one sample, to zero the ones that disappeared afterwards.
#[derive(Default)]
struct Gauges {
    set: BTreeSet<Series>,
}

impl Gauges {
    fn set(&mut self, name: &'static str, labels: Vec<(&'static str, String)>, v: f64) {
        metrics::gauge!(name, labels_of(&labels)).set(v);
        self.set.insert((name, labels));
    }
}

async fn sample(cx: &mut SamplerContext, sampled: &mut Sampled) {
    let node = crate::metrics::node();
    let status = ClusterStatus::of(&cx.raft, cx.node_id, &cx.identity);
    let leading = status.leader_id == Some(cx.node_id);
    own_gauges(&node, &status, leading, sampled);
    let (_, last_iteration_ms) = cx.scheduler.progress();
    let now = cx.clock.wall_ms();
    let lag = crate::metrics::seconds_between_ms(last_iteration_ms, now);
    metrics::gauge!(SCHEDULER_LOOP_LAG, "node" => node.clone()).set(lag);

    let scheduling = leading && cx.scheduler.ready_term() == Some(status.term);
    if !scheduling {
        sampled.runs = None;
        // Zero what this replica reported while it led, once.
        for (name, labels) in std::mem::take(&mut sampled.cluster) {
            metrics::gauge!(name, labels_of(&labels)).set(0.0);
        }
        return;
    }
    zero_counters();
    let stall_ms = cx.stall_threshold_ms as f64;
    if lag * 1000.0 < stall_ms && !*cx.stalled.borrow_and_update() {
        metrics::counter!(SCHEDULER_HEARTBEAT).increment(1);
    }
    let mut gauges = Gauges::default();
    replication_gauges(&mut gauges, &node, &status, cx.node_id);
    let (stats, pools) = cx.sm.read(|s| (s.queue_stats(), s.pool_views())).await;
    count_runs(&cx.sm, &mut sampled.runs).await;
    for p in &pools {
        let l = || vec![("pool", p.name.clone())];
        gauges.set(POOL_OPEN_SLOTS, l(), p.slots.saturating_sub(p.used) as f64);
        gauges.set(POOL_RUNNING_SLOTS, l(), p.used as f64);
        gauges.set(POOL_QUEUED_TASKS, l(), p.queued as f64);
    }
    let workers = cx
        .scheduler
        .core()
        .workers()
        .list(cx.clock.mono_ms(), cx.worker_liveness_timeout_ms);
    let free_per_queue = worker_gauges(&mut gauges, &workers);
    queue_gauges(&mut gauges, &stats, &free_per_queue, now);
    // Series that disappeared (a queue purged, a follower removed) go to 0.
    for (name, labels) in sampled.cluster.difference(&gauges.set) {
        metrics::gauge!(*name, labels_of(labels)).set(0.0);
    }
    sampled.cluster = gauges.set;
}

/// Every replica's own Raft position, and a leader change seen since the last sample.
fn own_gauges(node: &str, status: &ClusterStatus, leading: bool, sampled: &mut Sampled) {
    let node = node.to_string();
    metrics::gauge!(RAFT_TERM, "node" => node.clone()).set(status.term as f64);
    metrics::gauge!(RAFT_IS_LEADER, "node" => node.clone()).set(if leading { 1.0 } else { 0.0 });
    for (name, v) in [
        (RAFT_LAST_LOG_INDEX, status.last_log_index),
        (RAFT_COMMIT_INDEX, status.commit_index),
        (RAFT_APPLIED_INDEX, status.applied_index),
    ] {
        metrics::gauge!(name, "node" => node.clone()).set(v.unwrap_or(0) as f64);
    }
    metrics::counter!(RAFT_LEADER_CHANGES, "node" => node.clone()).increment(0);
    if sampled.first && sampled.leader != status.leader_id {
        metrics::counter!(RAFT_LEADER_CHANGES, "node" => node).increment(1);
    }
    sampled.first = true;
    sampled.leader = status.leader_id;
}

/// Counters exist from the first sample, at 0, so rate() and alerts see them before the first
/// event.
fn zero_counters() {
    metrics::counter!(SCHEDULER_HEARTBEAT).increment(0);
    metrics::counter!(LEASE_EXTENDED).increment(0);
    for cause in [
        "visibility_timeout",
        "worker_lost",
        "handed_back",
        "requeued",
    ] {
        metrics::counter!(LEASE_EXPIRED, "cause" => cause).increment(0);
    }
    for call in ["heartbeat", "report"] {
        metrics::counter!(LEASE_FENCED, "call" => call).increment(0);
    }
}

/// How many entries each follower is behind the leader's log.
fn replication_gauges(gauges: &mut Gauges, node: &str, status: &ClusterStatus, me: u64) {
    for m in status.members.iter().filter(|m| m.id != me) {
        let behind = status
            .last_log_index
            .unwrap_or(0)
            .saturating_sub(m.match_index.unwrap_or(0));
        gauges.set(
            RAFT_REPLICATION_LAG,
            vec![("node", node.to_string()), ("follower", m.id.to_string())],
            behind as f64,
        );
    }
}

/// Workers by state and their open slots; returns the open slots per queue.
fn worker_gauges<'a>(
    gauges: &mut Gauges,
    workers: &'a [(Registered, WorkerState)],
) -> BTreeMap<&'a str, u64> {
    let mut by_state: BTreeMap<&'static str, u64> =
        [("active", 0), ("draining", 0), ("lost", 0)].into();
    let mut open_slots = 0u64;
    let mut free_per_queue: BTreeMap<&str, u64> = BTreeMap::new();
    for (w, state) in workers {
        *by_state.entry(state.as_str()).or_default() += 1;
        if *state == WorkerState::Active {
            let free = u64::from(w.info.slots.saturating_sub(w.info.running));
            open_slots += free;
            for q in &w.info.queues {
                *free_per_queue.entry(q.as_str()).or_default() += free;
            }
        }
    }
    for (state, n) in by_state {
        gauges.set(WORKERS, vec![("state", state.to_string())], n as f64);
    }
    gauges.set(WORKERS_OPEN_SLOTS, vec![], open_slots as f64);
    free_per_queue
}

/// Tasks per queue and state, the oldest ready task's age, and the ready tasks no open slot
/// could take (starving).
fn queue_gauges(
    gauges: &mut Gauges,
    stats: &BTreeMap<String, QueueStats>,
    free_per_queue: &BTreeMap<&str, u64>,
    now: u64,
) {
    for (queue, st) in stats {
        for name in [
            TASKS_SUBMITTED,
            TASKS_DEAD,
            ATTEMPTS_SUCCEEDED,
            ATTEMPTS_FAILED,
            ATTEMPTS_TIMED_OUT,
            LEASE_GRANTED,
        ] {
            metrics::counter!(name, "queue" => queue.clone()).increment(0);
        }
        for (state, n) in [
            ("ready", st.ready),
            ("delayed", st.delayed),
            ("running", st.running),
            ("failed", st.failed),
            ("succeeded", st.succeeded),
            ("dead", st.dead),
            ("cancelled", st.cancelled),
        ] {
            gauges.set(
                TASKS,
                vec![("queue", queue.clone()), ("state", state.to_string())],
                n as f64,
            );
        }
        let age = st
            .oldest_ready_since_ms
            .map_or(0.0, |t| crate::metrics::seconds_between_ms(t, now));
        gauges.set(QUEUE_OLDEST_READY_AGE, vec![("queue", queue.clone())], age);
        let free = free_per_queue.get(queue.as_str()).copied().unwrap_or(0);
        gauges.set(
            SCHEDULER_TASKS_STARVING,
            vec![("queue", queue.clone())],
            st.ready.saturating_sub(free) as f64,
        );
    }
}

/// Counts run starts and ends (from the replicated per-workflow counts, by difference) and
/// records the duration of each run that ended since the last sample.
async fn count_runs(sm: &StateMachineStore, seen: &mut Option<RunsSeen>) {
    let first = seen.is_none();
    let (counts, cursor) = seen.get_or_insert_with(Default::default);
    let from = *cursor;
    let (now_counts, ended) = sm
        .read(|s| {
            let w = s.workflows();
            let counts: BTreeMap<String, RunCounts> =
                w.all().map(|w| (w.name.clone(), w.counts)).collect();
            let ended: Vec<(u64, String, u64)> = if first {
                Vec::new()
            } else {
                w.ended_after(from)
                    .map(|(at, r)| {
                        let took = at.saturating_sub(r.started_at_ms.unwrap_or(at));
                        (at, r.workflow.clone(), took)
                    })
                    .collect()
            };
            (counts, (ended, w.last_ended()))
        })
        .await;
    let (ended, last) = ended;
    *cursor = last;
    for (_, workflow, took_ms) in ended {
        metrics::histogram!(WORKFLOW_RUN_DURATION, "workflow" => workflow)
            .record(took_ms as f64 / 1000.0);
    }
    for (name, c) in now_counts {
        let before = if first {
            c
        } else {
            counts.get(&name).copied().unwrap_or_default()
        };
        for (result, now, was) in [
            ("started", c.started, before.started),
            ("succeeded", c.succeeded, before.succeeded),
            ("failed", c.failed, before.failed),
            ("cancelled", c.cancelled, before.cancelled),
        ] {
            metrics::counter!(WORKFLOW_RUNS, "workflow" => name.clone(), "result" => result)
                .increment(now.saturating_sub(was));
        }
        counts.insert(name, c);
    }
}
