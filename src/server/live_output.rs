//! The live output of running attempts: soft state, in memory, on the replicas a worker
//! streams to. Nothing here is written to Raft or to disk.
//!
//! A worker keeps the last `worker.output_tail_bytes` of each attempt's output and sends what
//! is new, a few times a second, to whichever replica its connection reaches (any replica
//! accepts it: following a task's output must not wait for an election). Each chunk names its
//! byte offset in the attempt's output and the oldest offset the worker still holds, so a
//! replica that has nothing for the attempt (it just started, or the worker moved to it from a
//! dead replica) answers "send from your oldest byte", and gets the worker's whole kept tail on
//! the next call. A read asks every replica and takes the most complete buffer
//! (`server::output_calls`).
//!
//! What is replicated is the tail the worker reports with the attempt's end (`Command::Complete`,
//! one Raft entry of at most `worker.output_tail_bytes`): it outlives the worker, the replica
//! and the leader. These buffers only bridge the time an attempt runs.
//!
//! Bounds: a chunk is at most [`MAX_CHUNK_BYTES`], one attempt's buffer at most
//! [`ATTEMPT_BUFFER_BYTES`] (older bytes are dropped first), all buffers together at most the
//! configured total (`scheduler.live_output_bytes`; finished attempts' buffers go first, then
//! the largest buffer loses its older half), and a buffer nobody appended to for
//! [`IDLE_DROP_MS`] is dropped.

use std::collections::{HashMap, VecDeque};

use crate::rpc::{OutputChunk, OutputRead};
use crate::state::TaskId;

pub use crate::rpc::{MAX_CHUNKS_PER_CALL, MAX_CHUNK_BYTES};
/// The most one attempt's buffer holds; older output is dropped first.
pub const ATTEMPT_BUFFER_BYTES: usize = 1 << 20;
/// A buffer nobody appended to for this long is dropped (its worker is gone; the attempt's
/// kept tail, if it was reported, is in the replicated state).
pub const IDLE_DROP_MS: u64 = 15 * 60_000;
/// The most one read returns.
pub const MAX_READ_BYTES: usize = 256 << 10;

struct Buffer {
    /// The offset, in the attempt's output, of `data[0]`.
    start: u64,
    data: VecDeque<u8>,
    /// The worker sent the attempt's last byte.
    complete: bool,
    touched_ms: u64,
}

impl Buffer {
    fn end(&self) -> u64 {
        self.start + self.data.len() as u64
    }

    /// Drops the oldest `n` bytes.
    fn trim(&mut self, n: usize) -> usize {
        let n = n.min(self.data.len());
        self.data.drain(..n);
        self.start += n as u64;
        n
    }
}

/// Every attempt's buffer on this replica, by (task, fencing token).
pub struct LiveOutput {
    buffers: HashMap<(TaskId, u64), Buffer>,
    total: usize,
    cap: usize,
}

impl LiveOutput {
    /// Buffers holding at most `cap` bytes together.
    pub fn new(cap: usize) -> LiveOutput {
        LiveOutput {
            buffers: HashMap::new(),
            total: 0,
            cap,
        }
    }

    /// Bytes held.
    pub fn total_bytes(&self) -> usize {
        self.total
    }

    /// Takes a chunk; returns the end offset now held for its attempt (the worker sends from
    /// there next), or 0 when this replica holds nothing and wants the worker's whole tail.
    pub fn append(&mut self, c: &OutputChunk, now_ms: u64) -> u64 {
        self.drop_idle(now_ms);
        let key = (c.task, c.fencing_token);
        let chunk_end = c.offset + c.data.len() as u64;
        let b = match self.buffers.entry(key) {
            std::collections::hash_map::Entry::Occupied(b) => b.into_mut(),
            std::collections::hash_map::Entry::Vacant(_) if c.offset != c.tail_start => return 0,
            std::collections::hash_map::Entry::Vacant(v) => v.insert(Buffer {
                start: c.offset,
                data: VecDeque::new(),
                complete: false,
                touched_ms: now_ms,
            }),
        };
        if c.offset > b.end() {
            if c.offset != c.tail_start {
                return b.end();
            }
            // The worker no longer holds the bytes in between: restart at its tail.
            self.total -= b.data.len();
            b.data.clear();
            b.start = c.offset;
        }
        b.touched_ms = now_ms;
        // Bytes of the chunk this buffer already has are skipped.
        let have = (b.end().saturating_sub(c.offset) as usize).min(c.data.len());
        b.data.extend(&c.data[have..]);
        self.total += c.data.len() - have;
        if c.last && b.end() == chunk_end {
            b.complete = true;
        }
        let over = b.data.len().saturating_sub(ATTEMPT_BUFFER_BYTES);
        self.total -= b.trim(over);
        let end = b.end();
        self.enforce_cap(key);
        end
    }

    /// Up to `max` bytes of an attempt's output from `offset` (from the oldest byte held, if
    /// that is later), or `None` when this replica holds nothing for it.
    pub fn read(
        &self,
        task: TaskId,
        fencing_token: u64,
        offset: u64,
        max: usize,
    ) -> Option<OutputRead> {
        let b = self.buffers.get(&(task, fencing_token))?;
        let from = offset.clamp(b.start, b.end());
        let skip = (from - b.start) as usize;
        let n = (b.data.len() - skip).min(max);
        let data: Vec<u8> = b.data.range(skip..skip + n).copied().collect();
        Some(OutputRead {
            start: b.start,
            from,
            end: b.end(),
            data,
            complete: b.complete,
        })
    }

    fn drop_idle(&mut self, now_ms: u64) {
        let total = &mut self.total;
        self.buffers.retain(|_, b| {
            let keep = now_ms.saturating_sub(b.touched_ms) < IDLE_DROP_MS;
            if !keep {
                *total -= b.data.len();
            }
            keep
        });
    }

    /// Over the cap: finished attempts' buffers go first (least recently touched first), then
    /// the largest buffer loses its older half, until the total fits. `keep` (the buffer just
    /// appended to) is dropped last.
    fn enforce_cap(&mut self, keep: (TaskId, u64)) {
        while self.total > self.cap {
            let finished = self
                .buffers
                .iter()
                .filter(|(k, b)| b.complete && **k != keep)
                .min_by_key(|(_, b)| b.touched_ms)
                .map(|(k, _)| *k);
            if let Some(k) = finished {
                let b = self.buffers.remove(&k).expect("found above");
                self.total -= b.data.len();
                continue;
            }
            let Some((_, largest)) = self.buffers.iter_mut().max_by_key(|(_, b)| b.data.len())
            else {
                return;
            };
            let half = largest.data.len().div_ceil(2);
            self.total -= largest.trim(half);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(offset: u64, tail_start: u64, data: &[u8], last: bool) -> OutputChunk {
        OutputChunk {
            task: TaskId(1),
            fencing_token: 5,
            offset,
            tail_start,
            data: data.to_vec(),
            last,
        }
    }

    fn text(o: &LiveOutput, offset: u64) -> (u64, String, bool) {
        let r = o.read(TaskId(1), 5, offset, usize::MAX).unwrap();
        (r.from, String::from_utf8(r.data).unwrap(), r.complete)
    }

    #[test]
    fn chunks_append_in_order_and_overlaps_are_skipped() {
        let mut o = LiveOutput::new(1 << 20);
        assert_eq!(o.append(&chunk(0, 0, b"one\n", false), 0), 4);
        assert_eq!(o.append(&chunk(4, 0, b"two\n", false), 1), 8);
        // A retried chunk (the reply was lost) is not added twice.
        assert_eq!(o.append(&chunk(4, 0, b"two\nthree\n", true), 2), 14);
        assert_eq!(text(&o, 0), (0, "one\ntwo\nthree\n".into(), true));
        assert_eq!(text(&o, 8), (8, "three\n".into(), true));
        assert_eq!(o.total_bytes(), 14);
        assert!(o.read(TaskId(1), 6, 0, 10).is_none(), "another attempt");
    }

    #[test]
    fn a_replica_without_the_attempt_asks_for_the_workers_whole_tail() {
        let mut o = LiveOutput::new(1 << 20);
        // The worker moved here after writing 100 bytes elsewhere; it still holds from 40.
        assert_eq!(o.append(&chunk(100, 40, b"x", false), 0), 0);
        assert!(o.read(TaskId(1), 5, 0, 10).is_none());
        let tail = vec![b'a'; 61];
        assert_eq!(o.append(&chunk(40, 40, &tail, false), 1), 101);
        let (from, data, _) = text(&o, 0);
        assert_eq!((from, data.len()), (40, 61), "reading from 0 starts at 40");
    }

    #[test]
    fn a_gap_the_worker_can_no_longer_fill_restarts_the_buffer_at_its_tail() {
        let mut o = LiveOutput::new(1 << 20);
        o.append(&chunk(0, 0, b"abc", false), 0);
        // The worker's tail moved past 3 (a chatty task outran the stream).
        assert_eq!(o.append(&chunk(10, 8, b"z", false), 1), 3, "asks for 3");
        assert_eq!(o.append(&chunk(8, 8, b"xyz", false), 2), 11);
        assert_eq!(text(&o, 0), (8, "xyz".into(), false));
        assert_eq!(o.total_bytes(), 3);
    }

    #[test]
    fn one_attempt_keeps_at_most_its_bound() {
        let mut o = LiveOutput::new(64 << 20);
        let big = vec![b'q'; MAX_CHUNK_BYTES];
        let mut off = 0;
        for _ in 0..6 {
            off = o.append(&chunk(off, 0, &big, false), 0);
        }
        let r = o.read(TaskId(1), 5, 0, usize::MAX).unwrap();
        assert_eq!(r.end, 6 * MAX_CHUNK_BYTES as u64);
        assert_eq!(r.end - r.start, ATTEMPT_BUFFER_BYTES as u64);
        assert_eq!(o.total_bytes(), ATTEMPT_BUFFER_BYTES);
    }

    #[test]
    fn over_the_total_finished_buffers_go_first_then_the_largest_is_halved() {
        let mut o = LiveOutput::new(1000);
        let c = |task, token, data: &[u8], last| OutputChunk {
            task: TaskId(task),
            fencing_token: token,
            offset: 0,
            tail_start: 0,
            data: data.to_vec(),
            last,
        };
        o.append(&c(1, 1, &[b'a'; 400], true), 0);
        o.append(&c(2, 2, &[b'b'; 500], false), 1);
        o.append(&c(3, 3, &[b'c'; 300], false), 2);
        assert!(
            o.read(TaskId(1), 1, 0, 10).is_none(),
            "the finished one went"
        );
        assert_eq!(o.total_bytes(), 800);
        o.append(&c(4, 4, &[b'd'; 300], false), 3);
        let two = o.read(TaskId(2), 2, 0, usize::MAX).unwrap();
        assert_eq!(
            (two.start, two.end),
            (250, 500),
            "the largest lost its older half"
        );
        assert!(o.total_bytes() <= 1000);
    }

    #[test]
    fn idle_buffers_are_dropped() {
        let mut o = LiveOutput::new(1 << 20);
        o.append(&chunk(0, 0, b"abc", false), 0);
        let other = OutputChunk {
            task: TaskId(2),
            ..chunk(0, 0, b"x", false)
        };
        o.append(&other, IDLE_DROP_MS);
        assert!(o.read(TaskId(1), 5, 0, 10).is_none());
        assert_eq!(o.total_bytes(), 1);
    }
}
