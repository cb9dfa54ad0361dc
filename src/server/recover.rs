//! Quorum-loss recovery (`fleet recover`): when a majority of the replicas is gone for good,
//! a surviving replica's data directory is turned into a one-node cluster, in the spirit of
//! etcd's `--force-new-cluster` and Consul's `peers.json`.
//!
//! With the replica stopped, its state is rebuilt from its own data: the last snapshot plus
//! every entry in its log, committed or not (an entry the survivor holds but never learned was
//! committed may or may not have been acknowledged to a client; keeping it loses nothing that
//! was acknowledged and the survivor received). Whatever the lost replicas held beyond the
//! survivor's log is lost: that is the price, and the command says so before it acts.
//!
//! The old database and snapshot are kept beside the new ones (`*.before-recovery-<time>`),
//! the node gets a new cluster id (so a lost replica that comes back with its old data is
//! refused instead of disrupting the new cluster), and the state is written as the snapshot
//! of a new one-node cluster, as a restore does ([`super::backup`]).
//!
//! The command refuses while the survivor can reach enough of the other voters to form a
//! quorum with them: then the cluster is not lost, and recovery would split it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use openraft::storage::{RaftLogReader, RaftLogStorage};
use openraft::EntryPayload;

use crate::config::Config;
use crate::raft::log_store::{Identity, LogStore};
use crate::raft::state_machine_store::{decode_state, read_snapshot_file};
use crate::raft::{flusher::Flusher, LogId, NodeId, SnapshotMeta};
use crate::state::State;

/// What a stopped replica's data directory holds.
pub struct Survivor {
    pub identity: Identity,
    pub state: State,
    /// The snapshot's last index, the last log entry, and the last entry it knew committed.
    pub snapshot_index: u64,
    pub last_log: Option<LogId>,
    pub committed: Option<LogId>,
    /// The membership in force at the end of its log: the voters and their addresses.
    pub voters: Vec<(NodeId, String)>,
}

/// Reads a stopped replica's data: its snapshot, then every entry of its log applied on top.
pub async fn read_survivor(data_dir: &Path) -> anyhow::Result<Survivor> {
    let (meta, data) = read_snapshot_file(&data_dir.join("snapshot.bin"))?
        .unwrap_or_else(|| (SnapshotMeta::default(), Vec::new()));
    let mut state = if data.is_empty() {
        State::default()
    } else {
        decode_state("snapshot.bin", &data)?
    };
    let snapshot_index = meta.last_log_id.as_ref().map_or(0, |l| l.index());
    let mut membership = meta.last_membership.membership().clone();
    let db = sled::Config::new().path(data_dir.join("db")).open()?;
    let flusher = Flusher::start(db.clone(), &data_dir.join("db"), Arc::default())?;
    let mut log = LogStore::open(db, flusher)?;
    let identity = log
        .identity()?
        .ok_or_else(|| anyhow::anyhow!("{} holds no node identity", data_dir.display()))?;
    let committed = log.read_committed().await?;
    // Without a snapshot the log starts at index 0 (the initial membership).
    let first = meta.last_log_id.as_ref().map_or(0, |l| l.index() + 1);
    let entries = log.try_get_log_entries(first..).await?;
    let mut last_log = meta.last_log_id;
    for e in &entries {
        match &e.payload {
            EntryPayload::Normal(request) => {
                state.apply(e.log_id.index(), request);
            }
            EntryPayload::Membership(m) => membership = m.clone(),
            EntryPayload::Blank => {}
        }
        last_log = Some(e.log_id);
    }
    let voters = membership
        .voter_ids()
        .map(|id| {
            let addr = membership
                .get_node(&id)
                .map_or(String::new(), |n| n.addr.clone());
            (id, addr)
        })
        .collect();
    Ok(Survivor {
        identity,
        state,
        snapshot_index,
        last_log,
        committed,
        voters,
    })
}

/// The other voters the survivor reaches now (each asked for its status, with a short
/// timeout).
pub async fn reachable_voters(s: &Survivor, config: &Config) -> Vec<(NodeId, String)> {
    let mut up = Vec::new();
    for (id, addr) in &s.voters {
        if *id == s.identity.node_id {
            continue;
        }
        let client = crate::client::Client::new(
            vec![addr.clone()],
            &s.identity.cluster_name,
            Duration::from_secs(2),
        );
        let Ok(client) = client else { continue };
        let mut client = client
            .with_auth_token(&config.node.auth_token)
            .with_attempt_timeout(Duration::from_secs(2));
        let r = client
            .call(|c, ctx| async move { c.cluster_status(ctx, 1).await })
            .await;
        if r.is_ok() {
            up.push((*id, addr.clone()));
        }
    }
    up
}

/// Moves the old database and snapshot aside and writes the survivor's state as a new
/// one-node cluster of this node at `addr`, under a new cluster id. Returns where the old
/// data went.
pub async fn recover(
    data_dir: &Path,
    s: &Survivor,
    addr: &str,
    cluster_id: u128,
) -> anyhow::Result<Vec<PathBuf>> {
    let stamp = crate::clock::system_wall_ms() / 1000;
    let mut kept = Vec::new();
    for name in ["db", "snapshot.bin"] {
        let from = data_dir.join(name);
        if from.exists() {
            let to = data_dir.join(format!("{name}.before-recovery-{stamp}"));
            std::fs::rename(&from, &to)?;
            kept.push(to);
        }
    }
    std::fs::File::open(data_dir)?.sync_all()?;
    // The new database holds the identity only (fsynced by the flush thread).
    let db = sled::Config::new().path(data_dir.join("db")).open()?;
    let flusher = Flusher::start(db.clone(), &data_dir.join("db"), Arc::default())?;
    let log = LogStore::open(db, flusher)?;
    let identity = Identity {
        cluster_id: Some(cluster_id),
        ..s.identity.clone()
    };
    log.save_identity(&identity).await?;
    let index = s.last_log.as_ref().map_or(0, |l| l.index());
    super::backup::write_as_new_cluster(data_dir, identity.node_id, addr, index, &s.state)?;
    Ok(kept)
}
