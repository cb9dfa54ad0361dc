//! Backups (`fleet cluster snapshot save`) and restoring one into a new cluster
//! (`fleet join --restore FILE`).
//!
//! A backup is a snapshot file (the layout of `snapshot.bin`: magic, file format, CRC-32,
//! then the snapshot's metadata and the state bytes with their state format), taken by the
//! leader after confirming its leadership with a quorum (ReadIndex), so it holds every write
//! acknowledged before the save began. It travels in pieces of at most
//! [`BACKUP_CHUNK_BYTES`]; the leader keeps the one backup being fetched for up to
//! [`BACKUP_IDLE`] between pieces.
//!
//! Restoring writes the backup as the snapshot of a fresh data directory, with this node as
//! the only voter and a new cluster id (so no node of the old cluster can mix with the new
//! one). Raft starts from that snapshot; the operator grows the cluster with `fleet join`.

use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use openraft::vote::RaftLeaderIdExt;
use openraft::ReadPolicy;
use tarpc::context::Context;

use super::Replica;
use crate::error::Error;
use crate::raft::state_machine_store::{decode_state, read_snapshot_file, write_snapshot_file};
use crate::raft::{LogId, Node, NodeId, SnapshotMeta, StoredMembership, TypeConfig};
use crate::rpc::{BackupChunk, BACKUP_CHUNK_BYTES, BACKUP_IDLE};
use crate::state::State;

/// The backup a leader is serving.
#[derive(Default)]
pub struct BackupCache {
    current: Mutex<Option<Cached>>,
}

struct Cached {
    session: u64,
    bytes: std::sync::Arc<Vec<u8>>,
    touched: Instant,
}

impl Replica {
    /// See [`crate::rpc::FleetService::backup_chunk`].
    pub async fn backup_chunk(
        &self,
        ctx: Context,
        session: u64,
        offset: u64,
        hop: u8,
    ) -> Result<BackupChunk, Error> {
        // Not forwarded: the client follows the hint to the leader itself, over a connection
        // whose negotiated version it checks (a forward could reach a leader of an older
        // version, which cannot decode this call). The pieces come from the one leader.
        let _ = (ctx, hop);
        if !self.raft.is_leader() {
            return Err(crate::raft::not_leader_of(&self.raft));
        }
        let (session, bytes) = if session == 0 {
            self.start_backup().await?
        } else {
            self.cached_backup(session)?
        };
        let start = (offset as usize).min(bytes.len());
        let end = (start + BACKUP_CHUNK_BYTES).min(bytes.len());
        Ok(BackupChunk {
            session,
            total: bytes.len() as u64,
            offset: start as u64,
            data: bytes[start..end].to_vec(),
        })
    }

    async fn start_backup(&self) -> Result<(u64, std::sync::Arc<Vec<u8>>), Error> {
        self.raft
            .ensure_linearizable(ReadPolicy::ReadIndex)
            .await
            .map_err(|e| match e.forward_to_leader() {
                Some(_) => crate::raft::not_leader_of(&self.raft),
                None => Error::Unavailable(format!("cannot confirm leadership: {e}")),
            })?;
        let bytes = self
            .sm
            .backup_bytes()
            .await
            .map_err(|e| Error::Internal(format!("cannot encode the backup: {e}")))?;
        let session = self.random.range(1..u64::MAX);
        let bytes = std::sync::Arc::new(bytes);
        tracing::info!(bytes = bytes.len(), session, "backup taken");
        *self.backups.current.lock().expect("backup lock") = Some(Cached {
            session,
            bytes: bytes.clone(),
            touched: Instant::now(),
        });
        Ok((session, bytes))
    }

    fn cached_backup(&self, session: u64) -> Result<(u64, std::sync::Arc<Vec<u8>>), Error> {
        let mut current = self.backups.current.lock().expect("backup lock");
        match current.as_mut() {
            Some(c) if c.session == session && c.touched.elapsed() < BACKUP_IDLE => {
                c.touched = Instant::now();
                Ok((session, c.bytes.clone()))
            }
            _ => Err(Error::Rejected(format!(
                "backup session {session} is not known to the leader (it changed, or the backup \
                 sat idle for over {BACKUP_IDLE:?}); run the save again"
            ))),
        }
    }
}

/// What a backup file holds, read and checked (magic, format, checksum, state decoding).
pub struct Backup {
    pub meta: SnapshotMeta,
    pub state: State,
    /// The state bytes' format.
    pub state_format: u8,
    pub bytes: usize,
}

/// Reads and checks a backup file; the error says what is wrong with it.
pub fn read_backup(path: &Path) -> anyhow::Result<Backup> {
    let bytes = std::fs::metadata(path)
        .map_err(|e| anyhow::anyhow!("cannot read backup {}: {e}", path.display()))?
        .len() as usize;
    let (meta, data) = read_snapshot_file(path)
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .ok_or_else(|| anyhow::anyhow!("backup {} does not exist", path.display()))?;
    let state_format = data.first().copied().unwrap_or(0);
    let state = decode_state(&format!("backup {}", path.display()), &data)?;
    Ok(Backup {
        meta,
        state,
        state_format,
        bytes,
    })
}

/// Writes the backup at `file` as the snapshot of the fresh data directory `data_dir`, with
/// `node` (at `addr`) as the only member.
pub fn restore_into(
    file: &Path,
    data_dir: &Path,
    node: NodeId,
    addr: &str,
) -> anyhow::Result<Backup> {
    let backup = read_backup(file)?;
    let index = backup.meta.last_log_id.as_ref().map_or(0, |l| l.index());
    write_as_new_cluster(data_dir, node, addr, index, &backup.state)?;
    Ok(backup)
}

/// Writes `state` as the snapshot of a one-node cluster of `node` at `addr` (restore and
/// quorum-loss recovery). The snapshot keeps the log `index` the state was taken at, so the
/// state's indexes go on growing; its term is 0, below any term of the new cluster.
pub fn write_as_new_cluster(
    data_dir: &Path,
    node: NodeId,
    addr: &str,
    index: u64,
    state: &State,
) -> anyhow::Result<()> {
    let leader =
        <<TypeConfig as openraft::RaftTypeConfig>::LeaderId as RaftLeaderIdExt>::new_committed(
            0, node,
        );
    let log_id: LogId = LogId::new(leader, index);
    let membership = openraft::Membership::new(
        vec![[node].into()],
        std::collections::BTreeMap::from([(node, Node { addr: addr.into() })]),
    )
    .map_err(|e| anyhow::anyhow!("membership of the new cluster: {e}"))?;
    let meta = SnapshotMeta {
        last_log_id: Some(log_id),
        last_membership: StoredMembership::new(Some(log_id), membership),
    };
    let data = crate::raft::state_machine_store::encode_state(state)?;
    write_snapshot_file(&data_dir.join("snapshot.bin"), &meta, &data)?;
    Ok(())
}
