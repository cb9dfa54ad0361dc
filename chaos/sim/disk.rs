//! The simulated disk: a replica's Raft log and snapshot that survive its crashes.
//!
//! Writes are readable at once (the page cache) and durable only after an fsync, which takes
//! simulated time. A crash keeps the durable image plus a random prefix of the writes that were
//! not fsynced yet (a log written in order reaches the platter in order), and loses the rest.
//! The replica's log store is fleet's own (`raft::log_store::LogStore`) over [`SimBackend`], so
//! its logic runs unchanged; the snapshot is a [`SnapshotSlot`] (saved whole, like the atomic
//! rename of the snapshot file).

use std::collections::BTreeMap;
use std::io;
use std::ops::Bound;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleet::raft::log_store::Backend;
use fleet::raft::state_machine_store::SnapshotSlot;
use fleet::raft::TypeConfig;
use openraft::storage::IOFlushed;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::{mpsc, oneshot};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Image {
    log: BTreeMap<u64, Vec<u8>>,
    meta: BTreeMap<Vec<u8>, Vec<u8>>,
}

#[derive(Debug, Clone)]
enum Op {
    LogPut(u64, Vec<u8>),
    LogDel(u64),
    MetaPut(Vec<u8>, Vec<u8>),
    MetaDel(Vec<u8>),
}

impl Image {
    fn apply(&mut self, op: Op) {
        match op {
            Op::LogPut(i, v) => {
                self.log.insert(i, v);
            }
            Op::LogDel(i) => {
                self.log.remove(&i);
            }
            Op::MetaPut(k, v) => {
                self.meta.insert(k, v);
            }
            Op::MetaDel(k) => {
                self.meta.remove(&k);
            }
        }
    }
}

#[derive(Debug)]
struct State {
    durable: Image,
    cache: Image,
    unsynced: Vec<Op>,
    rng: StdRng,
    fsyncs: u64,
}

/// One replica's disk. Clones share it.
#[derive(Debug, Clone)]
pub struct Disk {
    state: Arc<Mutex<State>>,
    pub snapshot: SnapshotSlot,
}

impl Disk {
    pub fn new(seed: u64) -> Disk {
        Disk {
            state: Arc::new(Mutex::new(State {
                durable: Image::default(),
                cache: Image::default(),
                unsynced: Vec::new(),
                rng: StdRng::seed_from_u64(seed),
                fsyncs: 0,
            })),
            snapshot: SnapshotSlot::default(),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.lock().expect("disk lock"))
    }

    fn write(&self, op: Op) {
        self.with(|s| {
            s.cache.apply(op.clone());
            s.unsynced.push(op);
        })
    }

    /// Makes every write so far durable.
    fn sync(&self) {
        self.with(|s| {
            for op in s.unsynced.drain(..) {
                s.durable.apply(op);
            }
            s.fsyncs += 1;
        })
    }

    /// How long the next fsync takes (ms), drawn from the disk's own sequence.
    fn fsync_ms(&self) -> u64 {
        self.with(|s| {
            if s.rng.random_bool(0.02) {
                s.rng.random_range(20..80) // a slow moment of the disk
            } else {
                s.rng.random_range(1..4)
            }
        })
    }

    /// The replica crashed: what was not fsynced is lost, but for a random prefix. Returns the
    /// number of writes lost.
    pub fn crash(&self) -> usize {
        self.with(|s| {
            let n = s.unsynced.len();
            let keep = s.rng.random_range(0..=n);
            let ops: Vec<Op> = s.unsynced.drain(..).collect();
            for op in ops.into_iter().take(keep) {
                s.durable.apply(op);
            }
            s.cache = s.durable.clone();
            n - keep
        })
    }

    /// The backend for one incarnation of the replica, with its fsync task (ended by the
    /// returned handle's abort at a crash).
    pub fn backend(&self) -> (SimBackend, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(flusher(self.clone(), rx));
        (
            SimBackend {
                disk: self.clone(),
                flushes: tx,
            },
            task,
        )
    }
}

enum Waiter {
    Callback(IOFlushed<TypeConfig>),
    Reply(oneshot::Sender<()>),
}

/// The fsync task: takes every waiting flush request, fsyncs once (simulated time), completes
/// them in order; like fleet's flusher thread.
async fn flusher(disk: Disk, mut rx: mpsc::UnboundedReceiver<Waiter>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while let Ok(w) = rx.try_recv() {
            batch.push(w);
        }
        tokio::time::sleep(Duration::from_millis(disk.fsync_ms())).await;
        disk.sync();
        for w in batch {
            match w {
                Waiter::Callback(cb) => cb.io_completed(Ok(())),
                Waiter::Reply(tx) => {
                    let _ = tx.send(());
                }
            }
        }
    }
}

/// The log store's view of the disk during one incarnation.
#[derive(Clone)]
pub struct SimBackend {
    disk: Disk,
    flushes: mpsc::UnboundedSender<Waiter>,
}

fn stopped() -> io::Error {
    io::Error::other("the simulated replica is stopping")
}

impl Backend for SimBackend {
    fn log_insert(&self, index: u64, value: Vec<u8>) -> io::Result<()> {
        self.disk.write(Op::LogPut(index, value));
        Ok(())
    }
    fn log_remove(&self, index: u64) -> io::Result<()> {
        self.disk.write(Op::LogDel(index));
        Ok(())
    }
    fn log_range(&self, range: (Bound<u64>, Bound<u64>)) -> io::Result<Vec<(u64, Vec<u8>)>> {
        Ok(self.disk.with(|s| {
            s.cache
                .log
                .range(range)
                .map(|(k, v)| (*k, v.clone()))
                .collect()
        }))
    }
    fn log_indexes(&self, range: (Bound<u64>, Bound<u64>)) -> io::Result<Vec<u64>> {
        Ok(self
            .disk
            .with(|s| s.cache.log.range(range).map(|(k, _)| *k).collect()))
    }
    fn log_last(&self) -> io::Result<Option<Vec<u8>>> {
        Ok(self
            .disk
            .with(|s| s.cache.log.last_key_value().map(|(_, v)| v.clone())))
    }
    fn log_is_empty(&self) -> io::Result<bool> {
        Ok(self.disk.with(|s| s.cache.log.is_empty()))
    }
    fn meta_get(&self, key: &[u8]) -> io::Result<Option<Vec<u8>>> {
        Ok(self.disk.with(|s| s.cache.meta.get(key).cloned()))
    }
    fn meta_put(&self, key: &[u8], value: Vec<u8>) -> io::Result<()> {
        self.disk.write(Op::MetaPut(key.to_vec(), value));
        Ok(())
    }
    fn meta_remove(&self, key: &[u8]) -> io::Result<()> {
        self.disk.write(Op::MetaDel(key.to_vec()));
        Ok(())
    }
    async fn flush(&self) -> io::Result<()> {
        let (tx, rx) = oneshot::channel();
        self.flushes
            .send(Waiter::Reply(tx))
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())
    }
    fn after_flush(&self, callback: IOFlushed<TypeConfig>) {
        if let Err(mpsc::error::SendError(Waiter::Callback(cb))) =
            self.flushes.send(Waiter::Callback(callback))
        {
            cb.io_completed(Err(stopped()));
        }
    }
}
