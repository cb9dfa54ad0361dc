//! The Raft log, vote and markers in sled: openraft's `RaftLogStorage`.
//!
//! Layout of the node's one sled database:
//! - tree `raft_log`: key = log index as 8 big-endian bytes, value = [`ENTRY_FORMAT`] byte +
//!   bincode of the entry.
//! - tree `raft_meta`: `vote`, `committed`, `last_purged` (each a format byte + bincode) and the
//!   node's identity (see [`Identity`]).
//!
//! The logic is written once over a [`Backend`] (ordered log keys, a few meta keys, a flush):
//! [`Sled`] on a replica, the simulator's disk in `chaos sim`, so the simulator runs this very
//! code.
//!
//! Durability: `append` writes the entries and hands openraft's callback to the
//! [`Flusher`](super::flusher::Flusher), which fsyncs before completing it; `save_vote` waits for
//! the same fsync. `truncate_after` and `purge` are not fsynced on their own: a lost truncation
//! leaves entries that the next append overwrites, and a lost purge leaves entries that are
//! already covered by a snapshot; both are persisted by the next fsync, in order.

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};

use openraft::storage::{IOFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::flusher::{FlushStats, Flusher};
use super::{Entry, LogId, NodeId, TypeConfig, Vote};

/// The version of the stored entry and marker encoding. Bumped on any change; a node refuses
/// data it does not understand instead of misreading it.
pub const ENTRY_FORMAT: u8 = 1;

const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_LAST_PURGED: &[u8] = b"last_purged";
const KEY_IDENTITY: &[u8] = b"identity";

/// Who this data directory belongs to: written once, checked at every start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub node_id: NodeId,
    pub cluster_name: String,
    /// Set when the node forms or joins a cluster; `None` while it has never been part of one.
    pub cluster_id: Option<u128>,
}

/// What the log store needs of its storage. Writes are readable at once and durable only
/// after a flush.
pub trait Backend: Clone + Send + Sync + 'static {
    fn log_insert(&self, index: u64, value: Vec<u8>) -> io::Result<()>;
    fn log_remove(&self, index: u64) -> io::Result<()>;
    /// The entries with indexes in `range`, in index order.
    fn log_range(&self, range: (Bound<u64>, Bound<u64>)) -> io::Result<Vec<(u64, Vec<u8>)>>;
    /// The indexes in `range`, in order.
    fn log_indexes(&self, range: (Bound<u64>, Bound<u64>)) -> io::Result<Vec<u64>>;
    fn log_last(&self) -> io::Result<Option<Vec<u8>>>;
    fn log_is_empty(&self) -> io::Result<bool>;
    fn meta_get(&self, key: &[u8]) -> io::Result<Option<Vec<u8>>>;
    fn meta_put(&self, key: &[u8], value: Vec<u8>) -> io::Result<()>;
    fn meta_remove(&self, key: &[u8]) -> io::Result<()>;
    /// Returns once everything written so far is durable.
    fn flush(&self) -> impl std::future::Future<Output = io::Result<()>> + Send;
    /// Calls `callback` once everything written so far is durable.
    fn after_flush(&self, callback: IOFlushed<TypeConfig>);
}

/// A replica's backend: two sled trees, fsynced by the [`Flusher`].
#[derive(Clone)]
pub struct Sled {
    db: sled::Db,
    log: sled::Tree,
    meta: sled::Tree,
    flusher: Flusher,
}

fn sled_range(range: (Bound<u64>, Bound<u64>)) -> (Bound<[u8; 8]>, Bound<[u8; 8]>) {
    let key = |b: Bound<u64>| match b {
        Bound::Included(i) => Bound::Included(i.to_be_bytes()),
        Bound::Excluded(i) => Bound::Excluded(i.to_be_bytes()),
        Bound::Unbounded => Bound::Unbounded,
    };
    (key(range.0), key(range.1))
}

impl Backend for Sled {
    fn log_insert(&self, index: u64, value: Vec<u8>) -> io::Result<()> {
        self.log
            .insert(index.to_be_bytes(), value)
            .map(|_| ())
            .map_err(io_err)
    }
    fn log_remove(&self, index: u64) -> io::Result<()> {
        self.log
            .remove(index.to_be_bytes())
            .map(|_| ())
            .map_err(io_err)
    }
    fn log_range(&self, range: (Bound<u64>, Bound<u64>)) -> io::Result<Vec<(u64, Vec<u8>)>> {
        self.log
            .range(sled_range(range))
            .map(|kv| {
                let (k, v) = kv.map_err(io_err)?;
                Ok((key_index(&k), v.to_vec()))
            })
            .collect()
    }
    fn log_indexes(&self, range: (Bound<u64>, Bound<u64>)) -> io::Result<Vec<u64>> {
        self.log
            .range(sled_range(range))
            .keys()
            .map(|k| k.map(|k| key_index(&k)).map_err(io_err))
            .collect()
    }
    fn log_last(&self) -> io::Result<Option<Vec<u8>>> {
        Ok(self.log.last().map_err(io_err)?.map(|(_, v)| v.to_vec()))
    }
    fn log_is_empty(&self) -> io::Result<bool> {
        Ok(self.log.is_empty())
    }
    fn meta_get(&self, key: &[u8]) -> io::Result<Option<Vec<u8>>> {
        Ok(self.meta.get(key).map_err(io_err)?.map(|v| v.to_vec()))
    }
    fn meta_put(&self, key: &[u8], value: Vec<u8>) -> io::Result<()> {
        self.meta.insert(key, value).map(|_| ()).map_err(io_err)
    }
    fn meta_remove(&self, key: &[u8]) -> io::Result<()> {
        self.meta.remove(key).map(|_| ()).map_err(io_err)
    }
    async fn flush(&self) -> io::Result<()> {
        self.flusher.flush().await
    }
    fn after_flush(&self, callback: IOFlushed<TypeConfig>) {
        self.flusher.after_flush(callback)
    }
}

/// The log store: the Raft log, vote and markers on a [`Backend`]. Cheap to clone: clones
/// share the storage.
#[derive(Clone)]
pub struct LogStore<B: Backend = Sled> {
    b: B,
}

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard()
}

pub fn encode<T: Serialize>(value: &T) -> io::Result<Vec<u8>> {
    let mut out = vec![ENTRY_FORMAT];
    bincode::serde::encode_into_std_write(value, &mut out, bincode_config())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok(out)
}

pub fn decode<T: DeserializeOwned>(what: &str, bytes: &[u8]) -> io::Result<T> {
    match bytes.first() {
        Some(&ENTRY_FORMAT) => bincode::serde::decode_from_slice(&bytes[1..], bincode_config())
            .map(|(v, _)| v)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{what}: {e}"))),
        Some(v) => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{what}: stored format {v} is not understood by this fleet (it reads format {ENTRY_FORMAT})"),
        )),
        None => Err(io::Error::new(io::ErrorKind::InvalidData, format!("{what}: empty value"))),
    }
}

fn io_err(e: sled::Error) -> io::Error {
    io::Error::other(e)
}

impl LogStore<Sled> {
    /// Opens the log trees of `db`, sharing `flusher` for fsyncs.
    pub fn open(db: sled::Db, flusher: Flusher) -> io::Result<LogStore> {
        let log = db.open_tree("raft_log").map_err(io_err)?;
        let meta = db.open_tree("raft_meta").map_err(io_err)?;
        Ok(LogStore {
            b: Sled {
                db,
                log,
                meta,
                flusher,
            },
        })
    }

    pub fn identity(&self) -> io::Result<Option<Identity>> {
        self.get_meta(KEY_IDENTITY)
    }

    /// Records who owns this directory and fsyncs it.
    pub async fn save_identity(&self, identity: &Identity) -> io::Result<()> {
        self.put_meta(KEY_IDENTITY, identity)?;
        self.b.flusher.flush().await
    }

    pub fn flush_stats(&self) -> FlushStats {
        self.b.flusher.stats()
    }

    /// Bytes sled reports on disk for the whole database.
    pub fn size_on_disk(&self) -> u64 {
        self.b.db.size_on_disk().unwrap_or(0)
    }
}

impl<B: Backend> LogStore<B> {
    /// A log store on `backend` (the simulator's disk; replicas use [`LogStore::open`]).
    pub fn on(backend: B) -> LogStore<B> {
        LogStore { b: backend }
    }

    fn get_meta<T: DeserializeOwned>(&self, key: &[u8]) -> io::Result<Option<T>> {
        match self.b.meta_get(key)? {
            Some(v) => Ok(Some(decode(
                std::str::from_utf8(key).unwrap_or("meta"),
                &v,
            )?)),
            None => Ok(None),
        }
    }

    fn put_meta<T: Serialize>(&self, key: &[u8], value: &T) -> io::Result<()> {
        self.b.meta_put(key, encode(value)?)
    }

    /// Whether this node has any Raft state (a vote or a log): such a node never initializes.
    pub fn has_raft_state(&self) -> io::Result<bool> {
        Ok(self.b.meta_get(KEY_VOTE)?.is_some()
            || !self.b.log_is_empty()?
            || self.b.meta_get(KEY_LAST_PURGED)?.is_some())
    }

    fn last_purged(&self) -> io::Result<Option<LogId>> {
        self.get_meta(KEY_LAST_PURGED)
    }

    fn read_range<RB: RangeBounds<u64>>(&self, range: RB) -> io::Result<Vec<Entry>> {
        // Entries at or below the purge marker may survive a crash mid-purge; they are gone
        // as far as Raft is concerned.
        let floor = self.last_purged()?.map(|l| l.index() + 1).unwrap_or(0);
        let start = match range.start_bound() {
            Bound::Included(s) => (*s).max(floor),
            Bound::Excluded(s) => s.saturating_add(1).max(floor),
            Bound::Unbounded => floor,
        };
        let end = range.end_bound().cloned();
        if let Bound::Included(e) | Bound::Excluded(e) = end {
            if e < start {
                return Ok(Vec::new());
            }
        }
        let mut out = Vec::new();
        let mut expect = start;
        for (index, v) in self.b.log_range((Bound::Included(start), end))? {
            let entry: Entry = decode("raft log entry", &v)?;
            assert_eq!(
                entry.log_id.index(),
                index,
                "log entry stored under the wrong key"
            );
            if !out.is_empty() && index != expect {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("hole in the raft log: expected index {expect}, found {index}"),
                ));
            }
            expect = index + 1;
            out.push(entry);
        }
        Ok(out)
    }
}

fn key_index(k: &[u8]) -> u64 {
    u64::from_be_bytes(k.try_into().expect("raft log keys are 8 bytes"))
}

impl<B: Backend> RaftLogReader<TypeConfig> for LogStore<B> {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        self.read_range(range)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        self.get_meta(KEY_VOTE)
    }
}

impl<B: Backend> RaftLogStorage<TypeConfig> for LogStore<B> {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let last_purged = self.last_purged()?;
        let last = match self.b.log_last()? {
            Some(v) => Some(decode::<Entry>("raft log entry", &v)?.log_id),
            None => None,
        };
        let last = match (last, &last_purged) {
            (Some(l), Some(p)) if l.index() <= p.index() => Some(*p),
            (Some(l), _) => Some(l),
            (None, p) => *p,
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        self.put_meta(KEY_VOTE, vote)?;
        // The vote must be on disk before openraft acts on it (and before any later log write).
        self.b.flush().await
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        // Not fsynced here: a lost `committed` only means a restarted node re-applies less of
        // its log until it hears from the leader. It is persisted with the next append's fsync.
        match committed {
            Some(c) => self.put_meta(KEY_COMMITTED, &c),
            None => self.b.meta_remove(KEY_COMMITTED),
        }
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        self.get_meta(KEY_COMMITTED)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<TypeConfig>,
    ) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        // Plain inserts in index order, not a `sled::Batch`: sled recovers a prefix of its
        // log, so a crash midway leaves a prefix of these entries, which Raft handles (none
        // was acknowledged). A batch would add nothing here and costs two more buffer writes
        // (`pin_log` seals the current buffer, then a batch manifest), each with its own
        // `sync_file_range` on the write path: ~0.25 ms per append on this machine.
        for entry in entries {
            self.b.log_insert(entry.log_id.index(), encode(&entry)?)?;
        }
        // The entries are readable now; they are durable only after the flusher's fsync,
        // which is when openraft hears about them.
        self.b.after_flush(callback);
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let from = last_log_id.map(|l| l.index() + 1).unwrap_or(0);
        // Remove from the end backward so a crash midway never leaves a hole.
        let indexes = self
            .b
            .log_indexes((Bound::Included(from), Bound::Unbounded))?;
        for i in indexes.into_iter().rev() {
            self.b.log_remove(i)?;
        }
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        // Marker first: entries at or below it are ignored from now on, even if a crash stops
        // the removal midway.
        self.put_meta(KEY_LAST_PURGED, &log_id)?;
        let indexes = self
            .b
            .log_indexes((Bound::Unbounded, Bound::Included(log_id.index())))?;
        for i in indexes {
            self.b.log_remove(i)?;
        }
        Ok(())
    }
}
