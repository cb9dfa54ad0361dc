//! openraft's `RaftStateMachine` around the pure [`State`], with snapshot files.
//!
//! The state lives in memory and is rebuilt on start from the last snapshot file plus the log
//! entries after it (openraft re-applies them up to the saved `committed` marker). A snapshot
//! file is written atomically: temporary file, fsync, rename, fsync of the directory, so a
//! crash leaves either the old snapshot or the new one, never half of one.
//!
//! Snapshot file layout (`snapshot.bin` in the data directory):
//! `b"FLEETSNP"` | format `u32` LE | CRC-32 of the body `u32` LE | body length `u64` LE | body,
//! where the body is bincode of ([`SnapshotMeta`], state bytes) and the state bytes are a
//! format byte ([`STATE_FORMAT`]) plus bincode of [`State`]. The state bytes are exactly what
//! travels to a follower in snapshot chunks.

use std::io::{self, Cursor, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::{Stream, TryStreamExt};
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder};
use tokio::sync::RwLock;

use super::{LogId, SnapshotMeta, StoredMembership, TypeConfig};
use crate::state::{Response, State};

type Snapshot = openraft::type_config::alias::SnapshotOf<TypeConfig, Cursor<Vec<u8>>>;

const SNAPSHOT_MAGIC: &[u8; 8] = b"FLEETSNP";
/// The layout of the snapshot file around the state bytes.
pub const SNAPSHOT_FILE_FORMAT: u32 = 1;
const SNAPSHOT_FILE: &str = "snapshot.bin";
/// The format of the state bytes. 4: the state, then its schedules, its pools and its
/// workflows (with their runs). 3 (still read): no workflows. 2 (still read): the state only
/// (no schedules, no pools). 1 (still read): attempts carry no worker name either.
pub const STATE_FORMAT: u8 = 4;

/// The state bytes of `state` (format byte, then bincode of the state, its schedules, its
/// pools and its workflows).
pub fn encode_state(state: &State) -> io::Result<Vec<u8>> {
    let mut out = vec![STATE_FORMAT];
    let cfg = bincode::config::standard();
    let err = |e| io::Error::new(io::ErrorKind::InvalidData, e);
    bincode::serde::encode_into_std_write(state, &mut out, cfg).map_err(err)?;
    bincode::serde::encode_into_std_write(&state.schedules, &mut out, cfg).map_err(err)?;
    bincode::serde::encode_into_std_write(&state.pools, &mut out, cfg).map_err(err)?;
    bincode::serde::encode_into_std_write(&state.workflows, &mut out, cfg).map_err(err)?;
    Ok(out)
}

/// The body of format 3 (`with_workflows` false) or 4: the state, its schedules, its pools
/// and (4) its workflows, one after the other.
fn decode_parts(what: &str, bytes: &[u8], with_workflows: bool) -> io::Result<State> {
    let cfg = bincode::config::standard();
    let err = |e: bincode::error::DecodeError| {
        io::Error::new(io::ErrorKind::InvalidData, format!("{what}: {e}"))
    };
    let (mut state, a): (State, usize) =
        bincode::serde::decode_from_slice(bytes, cfg).map_err(err)?;
    let (schedules, b) = bincode::serde::decode_from_slice(&bytes[a..], cfg).map_err(err)?;
    let (pools, c) = bincode::serde::decode_from_slice(&bytes[a + b..], cfg).map_err(err)?;
    state.schedules = schedules;
    state.pools = pools;
    if with_workflows {
        let (workflows, _) =
            bincode::serde::decode_from_slice(&bytes[a + b + c..], cfg).map_err(err)?;
        state.workflows = workflows;
    }
    Ok(state)
}

/// Reads state bytes of any format this fleet understands; a newer one is refused by name.
pub fn decode_state(what: &str, bytes: &[u8]) -> io::Result<State> {
    let mut state = decode_any_format(what, bytes)?;
    state.rebuild_tally();
    Ok(state)
}

fn decode_any_format(what: &str, bytes: &[u8]) -> io::Result<State> {
    let body = |b: &[u8]| {
        bincode::serde::decode_from_slice(b, bincode::config::standard())
            .map(|(v, _)| v)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{what}: {e}")))
    };
    match bytes.first() {
        Some(&STATE_FORMAT) => decode_parts(what, &bytes[1..], true),
        Some(3) => decode_parts(what, &bytes[1..], false),
        Some(2) => body(&bytes[1..]),
        Some(1) => crate::state::decoding_attempts_without_names(|| body(&bytes[1..])),
        Some(v) => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{what}: state format {v} is not understood by this fleet (it reads formats 1 \
                 to {STATE_FORMAT})"
            ),
        )),
        None => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{what}: empty"),
        )),
    }
}

struct Inner {
    last_applied: Option<LogId>,
    last_membership: StoredMembership,
    state: State,
    /// The last snapshot's metadata and size. Its bytes are in the snapshot file only, read
    /// back when a follower needs them: a copy in memory would cost as much as the state's
    /// encoding (about 140 bytes per retained task).
    current: Option<(SnapshotMeta, usize)>,
}

/// The simulator's stand-in for the snapshot file: the last snapshot saved, kept by the
/// simulated disk across a node's crash. Saving replaces it whole, as the atomic rename does.
pub type SnapshotSlot = Arc<std::sync::Mutex<Option<(SnapshotMeta, Vec<u8>)>>>;

/// Where snapshots are saved.
#[derive(Clone)]
enum Files {
    /// `snapshot.bin` in this directory (fsynced; read and written on the blocking pool).
    Dir(PathBuf),
    /// The simulator's disk (no thread, no file).
    Memory(SnapshotSlot),
}

impl Files {
    async fn save(&self, meta: &SnapshotMeta, data: Vec<u8>) -> io::Result<Vec<u8>> {
        match self {
            Files::Dir(dir) => {
                let path = dir.join(SNAPSHOT_FILE);
                let m = meta.clone();
                tokio::task::spawn_blocking(move || {
                    write_snapshot_file(&path, &m, &data).map(|()| data)
                })
                .await
                .map_err(io::Error::other)?
            }
            Files::Memory(slot) => {
                *slot.lock().expect("snapshot slot") = Some((meta.clone(), data.clone()));
                Ok(data)
            }
        }
    }

    async fn load(&self) -> io::Result<Option<(SnapshotMeta, Vec<u8>)>> {
        match self {
            Files::Dir(dir) => {
                let path = dir.join(SNAPSHOT_FILE);
                tokio::task::spawn_blocking(move || read_snapshot_file(&path))
                    .await
                    .map_err(io::Error::other)?
            }
            Files::Memory(slot) => Ok(slot.lock().expect("snapshot slot").clone()),
        }
    }
}

/// The state machine store. Clones share the state.
#[derive(Clone)]
pub struct StateMachineStore {
    inner: Arc<RwLock<Inner>>,
    files: Files,
    /// Check [`State::check_invariants`] after every applied batch (the simulator sets it; the
    /// state also checks itself in debug builds).
    check_invariants: bool,
    /// The simulator's bug switches, set on every state this store holds.
    bugs: crate::state::Bugs,
}

impl StateMachineStore {
    /// Opens the store in `dir`, loading the last snapshot if there is one.
    pub fn open(dir: &Path) -> io::Result<StateMachineStore> {
        std::fs::create_dir_all(dir)?;
        let saved = read_snapshot_file(&dir.join(SNAPSHOT_FILE))?;
        StateMachineStore::from_saved(Files::Dir(dir.to_path_buf()), saved)
    }

    /// A store on the simulator's disk, loading the snapshot `slot` holds, if any; every
    /// applied batch is checked against the state's invariants.
    pub fn in_memory(
        slot: SnapshotSlot,
        bugs: crate::state::Bugs,
    ) -> io::Result<StateMachineStore> {
        let saved = slot.lock().expect("snapshot slot").clone();
        let mut store = StateMachineStore::from_saved(Files::Memory(slot), saved)?;
        store.check_invariants = true;
        store.bugs = bugs;
        if let Ok(mut inner) = store.inner.try_write() {
            inner.state.set_bugs(bugs);
        }
        Ok(store)
    }

    fn from_saved(
        files: Files,
        saved: Option<(SnapshotMeta, Vec<u8>)>,
    ) -> io::Result<StateMachineStore> {
        let mut inner = Inner {
            last_applied: None,
            last_membership: StoredMembership::default(),
            state: State::default(),
            current: None,
        };
        if let Some((meta, data)) = saved {
            inner.state = decode_state("snapshot state", &data)?;
            inner.last_applied = meta.last_log_id;
            inner.last_membership = meta.last_membership.clone();
            inner.current = Some((meta, data.len()));
        }
        Ok(StateMachineStore {
            inner: Arc::new(RwLock::new(inner)),
            files,
            check_invariants: false,
            bugs: crate::state::Bugs::default(),
        })
    }

    /// Runs `f` on the current state (a local read: as fresh as this replica's applied index).
    pub async fn read<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        f(&self.inner.read().await.state)
    }

    /// A snapshot file of the state as applied now, in memory (a backup). Encoded under the
    /// read lock, so the state and its log id match; applying waits meanwhile.
    pub async fn backup_bytes(&self) -> io::Result<Vec<u8>> {
        let inner = self.inner.read().await;
        let data = encode_state(&inner.state)?;
        let meta = SnapshotMeta {
            last_log_id: inner.last_applied,
            last_membership: inner.last_membership.clone(),
        };
        snapshot_file_bytes(&meta, &data)
    }

    /// The index of the last entry applied here.
    pub async fn applied_index(&self) -> u64 {
        self.inner
            .read()
            .await
            .last_applied
            .as_ref()
            .map(|l| l.index())
            .unwrap_or(0)
    }

    /// Size of the current snapshot in bytes, if any.
    pub async fn snapshot_size(&self) -> Option<usize> {
        self.inner
            .read()
            .await
            .current
            .as_ref()
            .map(|(_, size)| *size)
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    type SnapshotData = Cursor<Vec<u8>>;

    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        let started = std::time::Instant::now();
        let (meta, data) = {
            let inner = self.inner.read().await;
            let meta = SnapshotMeta {
                last_log_id: inner.last_applied,
                last_membership: inner.last_membership.clone(),
            };
            (meta, encode_state(&inner.state)?)
        };
        let data = self.files.save(&meta, data).await?;
        tracing::info!(
            last_log_id = ?meta.last_log_id,
            bytes = data.len(),
            "built and saved a snapshot"
        );
        let node = crate::metrics::node();
        metrics::gauge!(crate::metrics::names::RAFT_SNAPSHOT_SIZE, "node" => node.clone())
            .set(data.len() as f64);
        metrics::histogram!(crate::metrics::names::RAFT_SNAPSHOT_DURATION, "node" => node)
            .record(started.elapsed());
        let mut inner = self.inner.write().await;
        inner.current = Some((meta.clone(), data.len()));
        Ok(Snapshot {
            meta,
            snapshot: Cursor::new(data),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotData = Cursor<Vec<u8>>;
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        let inner = self.inner.read().await;
        Ok((inner.last_applied, inner.last_membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + OptionalSend,
    {
        let mut inner = self.inner.write().await;
        while let Some((entry, responder)) = entries.try_next().await? {
            let index = entry.log_id.index();
            let response = match &entry.payload {
                EntryPayload::Blank => Response::default(),
                EntryPayload::Normal(request) => inner.state.apply(index, request),
                EntryPayload::Membership(m) => {
                    inner.last_membership = StoredMembership::new(Some(entry.log_id), m.clone());
                    Response::default()
                }
            };
            inner.last_applied = Some(entry.log_id);
            if let Some(responder) = responder {
                responder.send(response);
            }
        }
        if self.check_invariants {
            if let Err(e) = inner.state.check_invariants() {
                let at = inner.last_applied.map_or(0, |l| l.index());
                panic!("state invariant broken by the entries up to {at}: {e}");
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Self::SnapshotData,
    ) -> Result<(), io::Error> {
        let data = snapshot.into_inner();
        // Decode before touching anything: a corrupt snapshot must not replace good state.
        let mut state: State = decode_state("received snapshot", &data)?;
        state.set_bugs(self.bugs);
        let size = data.len();
        self.files.save(meta, data).await?;
        tracing::info!(last_log_id = ?meta.last_log_id, bytes = size, "installed a snapshot");
        let mut inner = self.inner.write().await;
        inner.state = state;
        inner.last_applied = meta.last_log_id;
        inner.last_membership = meta.last_membership.clone();
        inner.current = Some((meta.clone(), size));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        if self.inner.read().await.current.is_none() {
            return Ok(None);
        }
        // The file holds the current snapshot: it is written before `current` changes, and
        // a newer one replaces it atomically (rename).
        let read = self.files.load().await?;
        Ok(read.map(|(meta, data)| Snapshot {
            meta,
            snapshot: Cursor::new(data),
        }))
    }
}

/// The snapshot file's bytes before the state bytes `data`: magic, format, checksum, length,
/// and the body's head (see the module docs for the layout).
fn snapshot_file_head(meta: &SnapshotMeta, data: &[u8]) -> io::Result<Vec<u8>> {
    // The body is `(meta, data)` as bincode encodes the pair: the metadata, the length of the
    // data, the data.
    let cfg = bincode::config::standard();
    let err = |e| io::Error::new(io::ErrorKind::InvalidData, e);
    let mut head = bincode::serde::encode_to_vec(meta, cfg).map_err(err)?;
    head.extend(bincode::encode_to_vec(data.len() as u64, cfg).map_err(err)?);
    let mut crc = crc32fast::Hasher::new();
    crc.update(&head);
    crc.update(data);
    let mut out = Vec::with_capacity(24 + head.len());
    out.extend_from_slice(SNAPSHOT_MAGIC);
    out.extend_from_slice(&SNAPSHOT_FILE_FORMAT.to_le_bytes());
    out.extend_from_slice(&crc.finalize().to_le_bytes());
    out.extend_from_slice(&((head.len() + data.len()) as u64).to_le_bytes());
    out.extend_from_slice(&head);
    Ok(out)
}

/// A whole snapshot file in memory (its golden fixture; a backup).
pub fn snapshot_file_bytes(meta: &SnapshotMeta, data: &[u8]) -> io::Result<Vec<u8>> {
    let mut out = snapshot_file_head(meta, data)?;
    out.extend_from_slice(data);
    Ok(out)
}

/// Writes the snapshot atomically. Written in two pieces, so the state's bytes are not copied
/// once more.
pub fn write_snapshot_file(path: &Path, meta: &SnapshotMeta, data: &[u8]) -> io::Result<()> {
    let head = snapshot_file_head(meta, data)?;
    let tmp = path.with_extension("bin.tmp");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        f.write_all(&head)?;
        f.write_all(data)?;
        // fsync: the snapshot is durable before the log entries it covers may be purged.
        f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

pub fn read_snapshot_file(path: &Path) -> io::Result<Option<(SnapshotMeta, Vec<u8>)>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let bad = |why: &str| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("snapshot file {}: {why}", path.display()),
        )
    };
    if bytes.len() < 24 || &bytes[..8] != SNAPSHOT_MAGIC {
        return Err(bad("not a fleet snapshot (bad magic)"));
    }
    let format = u32::from_le_bytes(bytes[8..12].try_into().unwrap());
    if format != SNAPSHOT_FILE_FORMAT {
        return Err(bad(&format!(
            "format {format} is not understood (this fleet reads format {SNAPSHOT_FILE_FORMAT})"
        )));
    }
    let crc = u32::from_le_bytes(bytes[12..16].try_into().unwrap());
    let len = u64::from_le_bytes(bytes[16..24].try_into().unwrap()) as usize;
    let body = bytes.get(24..24 + len).ok_or_else(|| bad("truncated"))?;
    if crc32fast::hash(body) != crc {
        return Err(bad("checksum mismatch (corrupt)"));
    }
    // The body is `(meta, data)`: decode the metadata and the data's length, then keep the
    // data where it lies in `bytes` instead of copying it out.
    let cfg = bincode::config::standard();
    let (meta, a): (SnapshotMeta, usize) =
        bincode::serde::decode_from_slice(body, cfg).map_err(|e| bad(&e.to_string()))?;
    let (n, b): (u64, usize) =
        bincode::decode_from_slice(&body[a..], cfg).map_err(|e| bad(&e.to_string()))?;
    let start = 24 + a + b;
    let end = start
        .checked_add(n as usize)
        .filter(|e| *e <= 24 + len)
        .ok_or_else(|| bad("truncated state"))?;
    let mut data = bytes;
    data.truncate(end);
    data.drain(..start);
    Ok(Some((meta, data)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A snapshot file written by fleet before attempts carried worker names (state format 1):
    /// three succeeded tasks and a dead one, run by one worker. Committed bytes: a change of
    /// the state encoding without a new format number fails here.
    const FORMAT_1: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/snapshot-state-format-1.bin"
    );

    #[test]
    fn a_format_1_snapshot_still_reads_and_re_encodes_as_the_current_format() {
        let (_, data) = read_snapshot_file(Path::new(FORMAT_1))
            .unwrap()
            .expect("the fixture exists");
        assert_eq!(data[0], 1, "the fixture is state format 1");
        let state = decode_state("fixture", &data).unwrap();
        let tasks = state.tasks(&crate::state::TaskFilter {
            limit: 100,
            ..Default::default()
        });
        let attempts: Vec<_> = tasks.iter().flat_map(|t| t.attempts.iter()).collect();
        assert!(!attempts.is_empty(), "the fixture has attempts");
        for a in &attempts {
            assert!(a.worker_name.is_empty() && a.worker.0 != 0, "{a:?}");
            assert!(a.fencing_token > 0 && a.started_at_ms > 0, "{a:?}");
        }
        assert!(attempts.iter().any(|a| a.output_tail.starts_with("golden")));
        let again = encode_state(&state).unwrap();
        assert_eq!(again[0], STATE_FORMAT);
        assert_eq!(decode_state("again", &again).unwrap(), state);
        // A format from the future is refused by name, never misread.
        let mut future = again.clone();
        future[0] = STATE_FORMAT + 1;
        let e = decode_state("future", &future).unwrap_err().to_string();
        assert!(e.contains("state format 5 is not understood"), "{e}");
    }

    /// The snapshot file is written in pieces and read without copying the state out, in the
    /// very format the committed fixture was written in (`(meta, data)` encoded whole).
    #[test]
    fn a_snapshot_file_is_written_and_read_in_the_same_format() {
        let fixture = std::fs::read(FORMAT_1).unwrap();
        let (meta, data) = read_snapshot_file(Path::new(FORMAT_1)).unwrap().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SNAPSHOT_FILE);
        write_snapshot_file(&path, &meta, &data).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), fixture);
        let (meta2, data2) = read_snapshot_file(&path).unwrap().unwrap();
        assert_eq!((meta2, data2), (meta, data));
        let mut cut = fixture.clone();
        cut.truncate(fixture.len() - 1);
        std::fs::write(&path, &cut).unwrap();
        let e = read_snapshot_file(&path).unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");
    }

    /// Format 2 (before schedules and pools) is the format-3 state without its two trailing
    /// parts: it still reads, with no schedules and no pools.
    #[test]
    fn a_format_2_state_reads_with_no_schedules_or_pools() {
        let (_, data) = read_snapshot_file(Path::new(FORMAT_1)).unwrap().unwrap();
        let state = decode_state("fixture", &data).unwrap();
        let mut format_2 = vec![2u8];
        bincode::serde::encode_into_std_write(&state, &mut format_2, bincode::config::standard())
            .unwrap();
        let read = decode_state("format 2", &format_2).unwrap();
        assert_eq!(read, state);
        assert!(read.schedules().is_empty());
        assert!(read.pool_views().is_empty());
    }

    #[test]
    fn schedules_and_pools_survive_a_snapshot() {
        use crate::state::*;
        let mut state = State::default();
        let spec = ScheduleSpec {
            trigger: Trigger::Cron {
                expr: "* * * * * *".into(),
                timezone: "Europe/Berlin".into(),
            },
            start_at_ms: None,
            end_at_ms: None,
            catchup: CatchupPolicy::Latest,
            catchup_window_ms: 60_000,
            overlap: OverlapPolicy::Queue,
            jitter_ms: 0,
            task: TaskSpec::new(vec!["true".into()], "default"),
            pool: Some(PoolClaim {
                pool: "p".into(),
                slots: 1,
            }),
        };
        let commands = vec![
            Command::SetPool {
                name: "p".into(),
                slots: 2,
            },
            Command::PutSchedule {
                name: "s".into(),
                spec,
                paused: None,
                mode: PutMode::Create,
            },
            Command::TriggerSchedule {
                name: "s".into(),
                key: 1,
            },
        ];
        let r = state.apply(
            1,
            &Request {
                proposed_at_ms: 1_000,
                commands,
            },
        );
        assert!(r.results.iter().all(|r| r.is_ok()), "{r:?}");
        let bytes = encode_state(&state).unwrap();
        let read = decode_state("round trip", &bytes).unwrap();
        assert_eq!(read, state);
        assert_eq!(read.schedules().len(), 1);
        assert_eq!(read.pool_views()[0].queued, 1);
        // Format 3 is format 4 without the trailing workflows: it still reads, without them.
        let mut format_3 = encode_state(&state).unwrap();
        let empty = bincode::serde::encode_to_vec(
            crate::state::Workflows::default(),
            bincode::config::standard(),
        )
        .unwrap();
        format_3.truncate(format_3.len() - empty.len());
        format_3[0] = 3;
        let read = decode_state("format 3", &format_3).unwrap();
        assert_eq!(read.schedules().len(), 1);
        assert!(read.workflows().all().next().is_none());
    }
}
