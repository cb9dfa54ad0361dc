//! The Raft glue: openraft's three adapters, each in its own module, and the type config.
//!
//! - [`log_store`]: the Raft log, the vote and the committed/purged markers in sled. Every append
//!   and vote is fsynced (by [`flusher`]) before openraft is told it is durable.
//! - [`state_machine_store`]: the in-memory [`crate::state::State`] behind openraft's
//!   `RaftStateMachine`, persisted through snapshot files written atomically.
//! - [`network`]: openraft's `RaftNetworkV2` over fleet's tarpc RPC layer ([`crate::rpc`]).
//!
//! Read [`TypeConfig`] first, then `log_store::LogStore::append`.
//!
//! Where the fsyncs happen:
//! 1. `LogStore::append`: entries are written to sled, then the flusher thread calls
//!    `Db::flush`, `fsync`s any new blob file, `fdatasync`s sled's log file (sled's own flush
//!    is only `sync_file_range` on Linux: see `flusher`), and only then completes openraft's
//!    `IOFlushed` callback.
//! 2. `LogStore::save_vote`: returns only after the flusher has flushed the vote.
//! 3. Snapshot files: written to a temporary file, fsynced, renamed, and the directory fsynced.
//!
//! Because one sled database holds the log and the vote and one flush persists every earlier
//! write, a vote and a log write are never reordered on disk.
//!
//! IMPLEMENTATION CAVEATS
//! - sled 0.34 is assumed to recover a prefix of its writes after a crash (its log is
//!   sequential); a purge records the purged marker before removing entries, and readers skip
//!   entries at or below it, so a torn purge never exposes a hole.
//! - The state machine is in memory; restart cost is loading the last snapshot and re-applying
//!   the log after it (bounded by `raft.snapshot_every_entries`).

pub mod flusher;
pub mod leader_loss;
pub mod log_store;
pub mod network;
pub mod proposer;
pub mod runtime;
pub mod state_machine_store;

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::config::RaftConfig;
use crate::state::{Request, Response};

/// A replica's id. Unique for the cluster's lifetime; never reused for a new empty node.
pub type NodeId = u64;

/// What the membership stores about each node: how to reach it.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Node {
    /// The node's advertised `host:port` for peers and clients.
    pub addr: String,
}

impl std::fmt::Display for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.addr)
    }
}

openraft::declare_raft_types!(
    /// fleet's Raft types: u64 node ids, [`Node`] addresses, batched [`Request`]s.
    pub TypeConfig:
        D = Request,
        R = Response,
        Node = Node,
        AsyncRuntime = runtime::FleetRuntime,
);

pub type Raft = openraft::Raft<TypeConfig, state_machine_store::StateMachineStore>;
pub type LogId = openraft::type_config::alias::LogIdOf<TypeConfig>;
pub type Vote = openraft::type_config::alias::VoteOf<TypeConfig>;
pub type Entry = openraft::type_config::alias::EntryOf<TypeConfig>;
pub type StoredMembership = openraft::type_config::alias::StoredMembershipOf<TypeConfig>;
pub type SnapshotMeta = openraft::type_config::alias::SnapshotMetaOf<TypeConfig>;

/// Builds openraft's config from fleet's, with timing scaled by the multiplier.
pub fn openraft_config(
    cluster_name: &str,
    r: &RaftConfig,
) -> anyhow::Result<Arc<openraft::Config>> {
    let config = openraft::Config {
        cluster_name: cluster_name.to_string(),
        heartbeat_interval: r.heartbeat_interval().as_millis() as u64,
        election_timeout_min: r.election_timeout_min().as_millis() as u64,
        election_timeout_max: r.election_timeout_max().as_millis() as u64,
        install_snapshot_timeout: r.snapshot_chunk_timeout_ms,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(r.snapshot_every_entries),
        max_in_snapshot_log_to_keep: r.keep_log_entries_after_snapshot,
        // Entries are batches of up to `raft::proposer::MAX_BATCH_BYTES`; a bounded count per
        // AppendEntries keeps every frame under the RPC layer's frame limit.
        max_payload_entries: 16,
        // A lagging follower beyond this distance is sent a snapshot instead of entries.
        replication_lag_threshold: r.snapshot_every_entries.max(1000) * 2,
        // A node that cannot win (partitioned, stale log) must not bump terms and depose a
        // healthy leader when it comes back.
        enable_pre_vote: Some(true),
        // The state machine is not fsynced on apply, so a restarted leader must learn the
        // commit point from an election, not resume leadership with a stale state machine.
        enable_leader_restore: Some(false),
        ..Default::default()
    };
    Ok(Arc::new(
        config
            .validate()
            .map_err(|e| anyhow::anyhow!("raft config: {e}"))?,
    ))
}

/// The error that sends a caller to the leader `raft` knows of (if any).
pub fn not_leader_of(raft: &Raft) -> crate::error::Error {
    use openraft::async_runtime::WatchReceiver;
    let m = raft.metrics().borrow_watched().clone();
    let leader_addr = m.current_leader.and_then(|l| {
        m.membership_config
            .membership()
            .get_node(&l)
            .map(|n| n.addr.clone())
    });
    crate::error::Error::NotLeader {
        leader_id: m.current_leader,
        leader_addr,
    }
}

/// Asks Raft to hand leadership from `me` to another voter: one in `prefer` if any, the most
/// up to date among them; waits up to `wait` for the leadership to move. Whether it moved.
pub async fn hand_over_leadership(
    raft: &Raft,
    me: NodeId,
    wait: std::time::Duration,
    prefer: &std::collections::BTreeSet<NodeId>,
) -> bool {
    use openraft::async_runtime::WatchReceiver;
    let metrics = raft.metrics().borrow_watched().clone();
    let membership = metrics.membership_config.membership().clone();
    let replication = metrics.replication.clone().unwrap_or_default();
    let target = membership.voter_ids().filter(|v| *v != me).max_by_key(|v| {
        (
            prefer.contains(v),
            replication.get(v).cloned().flatten().map(|l| l.index()),
        )
    });
    let Some(target) = target else {
        return false;
    };
    tracing::info!(to = target, "handing over leadership");
    if raft.trigger().transfer_leader(target).await.is_err() {
        return false;
    }
    let deadline = std::time::Instant::now() + wait;
    let mut rx = raft.metrics();
    loop {
        let leader = rx.borrow_watched().current_leader;
        if leader.is_some() && leader != Some(me) {
            tracing::info!(to = ?leader, "leadership handed over");
            return true;
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() || tokio::time::timeout(left, rx.changed()).await.is_err() {
            tracing::warn!("leadership did not move before the deadline");
            return false;
        }
    }
}

/// Every member (voter or learner) but `me`, with its address, as Raft's membership has them.
pub fn other_members(raft: &Raft, me: NodeId) -> Vec<(NodeId, String)> {
    use openraft::async_runtime::WatchReceiver;
    let m = raft.metrics().borrow_watched().clone();
    m.membership_config
        .membership()
        .nodes()
        .filter(|(id, _)| **id != me)
        .map(|(id, n)| (*id, n.addr.clone()))
        .collect()
}
