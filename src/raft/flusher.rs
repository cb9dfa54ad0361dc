//! The fsync thread: group commit for sled.
//!
//! sled's `flush_async` deadlocks under concurrency on 0.34, so fleet calls the blocking
//! `Db::flush` (which fsyncs) on one dedicated OS thread. Writers put their data into sled first,
//! then hand the flusher a completion; the thread takes every completion waiting, flushes once,
//! and completes them all. One fsync therefore covers every write issued before it, and
//! throughput grows with concurrency.
//!
//! Bound: at most [`FLUSH_QUEUE_CAPACITY`] completions wait; a writer beyond that blocks until
//! the thread catches up (back-pressure on the Raft storage task).
//!
//! **What `Db::flush` does not do, and this thread does.** On Linux sled 0.34 makes its log
//! "stable" with `sync_file_range(WAIT_BEFORE|WRITE|WAIT_AFTER)`, which writes the pages but
//! neither persists the file's metadata (its size grows as segments are added) nor flushes the
//! drive's write cache: a power loss or kernel crash could lose what sled called flushed. And
//! a value over sled's blob threshold (a Raft entry over ~128 KiB: a large batch, a task's
//! output tail) goes to its own file under `blobs/`, written without any sync. So each group
//! commit here is, in order: (1) `fsync` every blob file created since the last one, then
//! the `blobs` directory; (2) `Db::flush`; (3) blobs created meanwhile, as in (1); (4)
//! `fdatasync` of sled's log file `db`. Only then is any waiting write acknowledged. Step (1)
//! before (2) keeps a durable log record from pointing at a blob that is not.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use openraft::storage::IOFlushed;

use super::TypeConfig;
use crate::health::fault::Stall;

/// Most completions waiting for a flush.
pub const FLUSH_QUEUE_CAPACITY: usize = 65_536;

enum Done {
    Raft(IOFlushed<TypeConfig>),
    Notify(tokio::sync::oneshot::Sender<std::io::Result<()>>),
}

/// The latest fsync, for health reporting and metrics.
#[derive(Debug, Clone, Copy, Default)]
pub struct FlushStats {
    pub last_ok_at: Option<SystemTime>,
    pub last_latency: Duration,
    pub flushes: u64,
    pub failures: u64,
    /// Whether the latest fsync failed.
    pub last_failed: bool,
    /// When the fsync under way (or waiting to start) began: a stuck disk shows here.
    pub in_flight_since: Option<Instant>,
}

/// A handle to the fsync thread. Cloning shares the thread.
#[derive(Clone)]
pub struct Flusher {
    tx: mpsc::SyncSender<Done>,
    stats: Arc<Mutex<FlushStats>>,
}

impl Flusher {
    /// Starts the thread for `db`. It ends when every handle is dropped.
    /// `stall` is the fault-injection switch (see `health::fault`); idle unless a test sets it.
    /// `path` is the directory sled was opened on (its `db` file and `blobs` directory).
    pub fn start(db: sled::Db, path: &Path, stall: Arc<Stall>) -> std::io::Result<Flusher> {
        let files = SledFiles::open(path)?;
        let (tx, rx) = mpsc::sync_channel::<Done>(FLUSH_QUEUE_CAPACITY);
        let stats = Arc::new(Mutex::new(FlushStats::default()));
        let thread_stats = stats.clone();
        std::thread::Builder::new()
            .name("fleet-fsync".into())
            .spawn(move || run(db, files, rx, thread_stats, stall))?;
        Ok(Flusher { tx, stats })
    }

    /// Completes openraft's callback after everything written so far is on disk.
    pub fn after_flush(&self, callback: IOFlushed<TypeConfig>) {
        if let Err(mpsc::SendError(Done::Raft(cb))) = self.tx.send(Done::Raft(callback)) {
            cb.io_completed(Err(std::io::Error::other("the fsync thread has stopped")));
        }
    }

    /// Waits until everything written so far is on disk.
    pub async fn flush(&self) -> std::io::Result<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.tx
            .send(Done::Notify(tx))
            .map_err(|_| std::io::Error::other("the fsync thread has stopped"))?;
        rx.await
            .map_err(|_| std::io::Error::other("the fsync thread has stopped"))?
    }

    pub fn stats(&self) -> FlushStats {
        *self.stats.lock().expect("flush stats lock")
    }
}

/// sled's files that its own flush does not make durable (see the module docs).
struct SledFiles {
    /// sled's log file, opened for `fdatasync` (it syncs the inode, whichever descriptor).
    log: File,
    blobs: PathBuf,
    /// Blob files are named by the LSN that wrote them; those up to this one are synced.
    blobs_synced_through: Option<u64>,
    /// The `blobs` directory's mtime when it was last scanned, and when that scan began.
    blobs_scanned: Option<(SystemTime, SystemTime)>,
}

/// The directory's mtime comes from the kernel's coarse clock (a tick of a few ms), so a blob
/// created in the same tick as the last change leaves it unchanged; a scan that began this
/// long after the mtime saw every file created in that tick.
const MTIME_TICK: Duration = Duration::from_millis(50);

impl SledFiles {
    fn open(path: &Path) -> std::io::Result<SledFiles> {
        let log = File::open(path.join("db")).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("cannot open sled's log {}: {e}", path.join("db").display()),
            )
        })?;
        let mut files = SledFiles {
            log,
            blobs: path.join("blobs"),
            blobs_synced_through: None,
            blobs_scanned: None,
        };
        files.sync_new_blobs()?;
        Ok(files)
    }

    /// Group commit: every write sled accepted before this call is durable when it returns.
    fn sync(&mut self, db: &sled::Db) -> std::io::Result<()> {
        self.sync_new_blobs()?;
        db.flush().map_err(std::io::Error::other)?;
        self.sync_new_blobs()?;
        self.log.sync_data()
    }

    /// `fsync`s each blob file newer than the last synced one, then the directory. Costs one
    /// `stat` when the directory has not changed since a scan (sled writes no blob at all
    /// while every entry is under its threshold).
    fn sync_new_blobs(&mut self) -> std::io::Result<()> {
        let mtime = match std::fs::metadata(&self.blobs) {
            Ok(m) => m.modified()?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        if let Some((seen, scan_began)) = self.blobs_scanned {
            if seen == mtime && scan_began.duration_since(mtime).unwrap_or_default() > MTIME_TICK {
                return Ok(());
            }
        }
        let scan_began = SystemTime::now();
        let entries = std::fs::read_dir(&self.blobs)?;
        let mut newest = self.blobs_synced_through;
        for entry in entries {
            let entry = entry?;
            let Some(lsn) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            if self.blobs_synced_through.is_some_and(|done| lsn <= done) {
                continue;
            }
            match File::open(entry.path()) {
                Ok(f) => f.sync_all()?,
                // Collected by sled's garbage collection meanwhile: nothing to keep.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            }
            newest = newest.max(Some(lsn));
        }
        if newest != self.blobs_synced_through {
            File::open(&self.blobs)?.sync_all()?;
            self.blobs_synced_through = newest;
        }
        self.blobs_scanned = Some((mtime, scan_began));
        Ok(())
    }
}

fn run(
    db: sled::Db,
    mut files: SledFiles,
    rx: mpsc::Receiver<Done>,
    stats: Arc<Mutex<FlushStats>>,
    stall: Arc<Stall>,
) {
    while let Ok(first) = rx.recv() {
        let mut group = vec![first];
        while let Ok(more) = rx.try_recv() {
            group.push(more);
        }
        let started = Instant::now();
        stats.lock().expect("flush stats lock").in_flight_since = Some(started);
        stall.wait_blocking();
        // The fsync: sled's buffers written, then its files synced (see the module docs).
        let result = files.sync(&db);
        let latency = started.elapsed();
        metrics::histogram!(
            crate::metrics::names::STORAGE_FSYNC_DURATION,
            "node" => crate::metrics::node()
        )
        .record(latency);
        {
            let mut s = stats.lock().expect("flush stats lock");
            s.in_flight_since = None;
            s.last_failed = result.is_err();
            match &result {
                Ok(()) => {
                    s.last_ok_at = Some(SystemTime::now());
                    s.last_latency = latency;
                    s.flushes += 1;
                }
                Err(e) => {
                    s.failures += 1;
                    tracing::error!(error = %e, "fsync of the data directory failed");
                }
            }
        }
        for done in group {
            let r = result
                .as_ref()
                .map(|_| ())
                .map_err(|e| std::io::Error::other(format!("fsync failed: {e}")));
            match done {
                Done::Raft(cb) => cb.io_completed(r),
                Done::Notify(tx) => {
                    let _ = tx.send(r);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A value over sled's blob threshold lands in its own file, which sled never syncs: the
    /// group commit finds it and syncs it and its directory.
    #[test]
    fn a_blob_written_by_sled_is_synced_by_the_group_commit() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("db");
        let db = sled::Config::new().path(&path).open().expect("open sled");
        let mut files = SledFiles::open(&path).expect("sled files");
        db.insert(b"small", vec![1u8; 100]).expect("insert");
        files.sync(&db).expect("sync");
        assert_eq!(files.blobs_synced_through, None, "no blob yet");
        db.insert(b"large", vec![7u8; 300 * 1024]).expect("insert");
        files.sync(&db).expect("sync");
        let first = files
            .blobs_synced_through
            .expect("the blob was found and synced");
        db.insert(b"larger", vec![8u8; 400 * 1024]).expect("insert");
        files.sync(&db).expect("sync");
        assert!(files.blobs_synced_through.expect("synced") > first);
        drop(db);
        let db = sled::Config::new().path(&path).open().expect("reopen sled");
        assert_eq!(
            db.get(b"larger").expect("get").expect("present").len(),
            400 * 1024
        );
    }
}
