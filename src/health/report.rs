//! The health report: what `/health`, `fleet health` and the `health` RPC return.
//!
//! One report per replica, about itself (its status decides HTTP 200 or 503), with one section
//! per component, and optionally the cluster as this replica sees it. Every unhealthy verdict
//! carries its reason in words. Times are both RFC 3339 strings (for people) and milliseconds
//! (for machines).
//!
//! No field is skipped when empty: the same structs travel over bincode, which needs every field.

use serde::{Deserialize, Serialize};

use super::fault::FaultState;

/// An overall verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Healthy,
    /// Cluster view only: the cluster schedules (a healthy leader and a healthy quorum), but some
    /// member is unhealthy or unreachable.
    Degraded,
    Unhealthy,
}

impl Status {
    pub fn is_healthy(self) -> bool {
        self == Status::Healthy
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Healthy => "healthy",
            Status::Degraded => "degraded",
            Status::Unhealthy => "unhealthy",
        }
    }
}

/// One replica's report on itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HealthReport {
    /// `healthy` or `unhealthy` (this replica only; the cluster has its own status).
    pub status: Status,
    /// Why it is unhealthy (empty when healthy).
    pub reasons: Vec<String>,
    pub node_id: u64,
    pub addr: String,
    /// The HTTP endpoint's address, when HTTP is on.
    pub http_addr: Option<String>,
    pub checked_at: String,
    pub checked_at_ms: u64,
    pub uptime_ms: u64,
    pub raft: RaftHealth,
    pub storage: StorageHealth,
    pub scheduler: SchedulerHealth,
    /// The leader's view of the workers (`None` on a follower: only the leader hears them).
    pub workers: Option<WorkersHealth>,
    pub fault_injection: FaultState,
    /// The cluster as this replica sees it (when asked for).
    pub cluster: Option<ClusterHealth>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaftHealth {
    pub healthy: bool,
    pub reason: Option<String>,
    /// `leader`, `follower`, `candidate`, `learner` or `shutdown`.
    pub role: String,
    pub term: u64,
    pub leader_id: Option<u64>,
    pub leader_addr: Option<String>,
    pub last_log_index: Option<u64>,
    pub committed_index: Option<u64>,
    pub applied_index: Option<u64>,
    /// Leader: milliseconds since a quorum last acknowledged it.
    pub quorum_ack_ms_ago: Option<u64>,
    /// Follower: milliseconds since the leader last replicated to it (heartbeat or entries).
    pub leader_contact_ms_ago: Option<u64>,
    /// Whether this replica may stand for election (off while its scheduling loop is stalled,
    /// or while a quorum cannot reach it).
    pub elections_enabled: bool,
    /// Members this replica has not reached for three peer-poll intervals (its own calls to
    /// their client port fail).
    pub unreachable_peers: Vec<u64>,
    /// Members whose latest reports say they cannot reach this replica. When they leave it
    /// without a quorum able to reach it, it steps down (see health::monitor).
    pub unreachable_by: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageHealth {
    pub healthy: bool,
    pub reason: Option<String>,
    /// The last fsync that succeeded.
    pub last_fsync_at: Option<String>,
    pub last_fsync_at_ms: Option<u64>,
    /// How long it took, in microseconds.
    pub last_fsync_latency_us: u64,
    /// How long the fsync under way has been waiting, if one is.
    pub fsync_in_flight_ms: Option<u64>,
    pub fsyncs: u64,
    pub fsync_failures: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchedulerHealth {
    pub healthy: bool,
    pub reason: Option<String>,
    /// `leading` (granting leases), `catching_up` (leader, not ready yet), `standby`
    /// (follower) or `stalled`.
    pub state: String,
    /// When the scheduling loop last completed an iteration (Airflow's name for it).
    pub latest_scheduler_heartbeat: Option<String>,
    pub latest_scheduler_heartbeat_ms: u64,
    /// How far the loop is behind its tick: milliseconds since its last iteration, less one
    /// tick (0 when on time).
    pub loop_lag_ms: u64,
    pub iterations: u64,
    /// The longest time between two consecutive iterations since the replica started (ms):
    /// how close the loop has come to the stall threshold (a stall itself included).
    pub longest_gap_ms: u64,
    /// Since when the loop has been stalled (as judged by this replica's health monitor).
    pub stalled_since: Option<String>,
    /// What the health monitor did about it.
    pub mitigation: Option<String>,
    /// Follower: committed entries not yet applied, and how long apply has not advanced.
    pub apply_backlog: u64,
    pub apply_idle_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkersHealth {
    pub active: u32,
    pub draining: u32,
    /// Not heard from for `scheduler.worker_liveness_timeout_ms`: their leases are released.
    pub lost: u32,
    /// Open slots of active workers (slots less running attempts).
    pub free_slots: u64,
    /// Every draining or lost worker, by name.
    pub not_active: Vec<WorkerBrief>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerBrief {
    pub id: u64,
    pub name: String,
    pub state: String,
    pub last_seen_ms_ago: u64,
}

/// The cluster as one replica sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterHealth {
    pub status: Status,
    pub reasons: Vec<String>,
    pub reported_by: u64,
    pub leader_id: Option<u64>,
    pub term: u64,
    pub voters: u32,
    pub healthy_voters: u32,
    pub members: Vec<MemberHealth>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberHealth {
    pub id: u64,
    pub addr: String,
    pub voter: bool,
    /// Whether it answered within the last three poll intervals.
    pub reachable: bool,
    /// Its own verdict on itself, from its last answer.
    pub status: Option<Status>,
    pub reasons: Vec<String>,
    pub role: Option<String>,
    pub term: Option<u64>,
    /// Milliseconds since its scheduling loop last completed an iteration (its progress).
    pub scheduler_heartbeat_ms_ago: Option<u64>,
    /// Milliseconds since it last answered this replica.
    pub answered_ms_ago: Option<u64>,
    pub error: Option<String>,
}
