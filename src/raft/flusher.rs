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
    pub fn start(db: sled::Db, stall: Arc<Stall>) -> Flusher {
        let (tx, rx) = mpsc::sync_channel::<Done>(FLUSH_QUEUE_CAPACITY);
        let stats = Arc::new(Mutex::new(FlushStats::default()));
        let thread_stats = stats.clone();
        std::thread::Builder::new()
            .name("fleet-fsync".into())
            .spawn(move || run(db, rx, thread_stats, stall))
            .expect("spawn the fsync thread");
        Flusher { tx, stats }
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

fn run(db: sled::Db, rx: mpsc::Receiver<Done>, stats: Arc<Mutex<FlushStats>>, stall: Arc<Stall>) {
    while let Ok(first) = rx.recv() {
        let mut group = vec![first];
        while let Ok(more) = rx.try_recv() {
            group.push(more);
        }
        let started = Instant::now();
        stats.lock().expect("flush stats lock").in_flight_since = Some(started);
        stall.wait_blocking();
        // The fsync: `Db::flush` writes sled's buffers and fsyncs its files.
        let result = db.flush().map(|_| ());
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
