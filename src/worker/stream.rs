//! Live output: the worker sends what its running attempts print to the cluster, a few times a
//! second, so `fleet logs ID --follow` shows it as it is produced.
//!
//! Each attempt's [`Tail`] keeps its last `worker.output_tail_bytes`; every [`SEND_EVERY`] the
//! stream sends each attempt's new bytes as one chunk to the replica its connection reaches
//! (any replica takes it, so an election does not hold the output up). Per attempt at most
//! `worker.output_stream_bytes_per_sec` go out (a token bucket holding one second), and at
//! most [`MAX_CHUNK_BYTES`] per call: a task printing faster than that shows a gap live
//! (its kept tail, reported when it ends, is whole). A replica that has nothing for an attempt
//! (it just started, or the worker moved to it when another died) answers "from your oldest
//! byte", and gets the whole kept tail in the next calls, outside the rate limit. An attempt's
//! last bytes are sent after it ended, also outside the limit, marked as the last.
//!
//! Nothing here delays an attempt or its report: the stream only reads the tails.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::attempt::Tail;
use crate::client::Client;
use crate::error::Error;
use crate::rpc::{OutputChunk, MAX_CHUNKS_PER_CALL, MAX_CHUNK_BYTES};
use crate::state::{TaskId, WorkerId};

/// How often new output is sent.
pub const SEND_EVERY: Duration = Duration::from_millis(200);
/// After the cluster refused the call for its protocol (replicas older than live output),
/// the stream tries again after this long.
const OLD_CLUSTER_PAUSE: Duration = Duration::from_secs(30);

struct Stream {
    tail: Tail,
    /// Where the replica's buffer ends, as it last said (0: it wants the whole tail).
    acked: u64,
    /// The furthest any replica ever acknowledged: while `acked` is below it, the replica is
    /// catching up on output sent before (it just started, or the worker moved to it), and
    /// that goes out outside the rate limit.
    high: u64,
    /// The attempt ended: its remaining bytes go out at once, the last marked.
    ended: bool,
    /// Bytes this attempt may still send now (refilled at the rate, up to one second's worth).
    allowance: f64,
}

/// The attempts whose output is streamed, shared by the attempts (which open and end their
/// streams) and the stream loop.
#[derive(Clone, Default)]
pub struct Streams(Arc<Mutex<HashMap<(TaskId, u64), Stream>>>);

impl Streams {
    pub fn open(&self, task: TaskId, fencing_token: u64, tail: Tail, rate: usize) {
        self.0.lock().expect("streams lock").insert(
            (task, fencing_token),
            Stream {
                tail,
                acked: 0,
                high: 0,
                ended: false,
                allowance: rate as f64,
            },
        );
    }

    /// The attempt ended; its last bytes go out on the next send.
    pub fn end(&self, task: TaskId, fencing_token: u64) {
        if let Some(s) = self
            .0
            .lock()
            .expect("streams lock")
            .get_mut(&(task, fencing_token))
        {
            s.ended = true;
        }
    }

    /// The chunks to send now, `elapsed` after the last time, at `rate` bytes per second.
    fn take(&self, elapsed: Duration, rate: usize) -> Vec<OutputChunk> {
        let mut streams = self.0.lock().expect("streams lock");
        let mut out = Vec::new();
        for (&(task, fencing_token), s) in streams.iter_mut() {
            s.allowance = (s.allowance + rate as f64 * elapsed.as_secs_f64()).min(rate as f64);
            let (tail_start, total) = s.tail.span();
            let unlimited = s.ended || s.acked < s.high;
            let budget = if unlimited {
                MAX_CHUNK_BYTES
            } else {
                (s.allowance as usize).min(MAX_CHUNK_BYTES)
            };
            // The oldest bytes not yet sent; if the tail dropped them (the attempt prints
            // faster than the rate), from the oldest kept byte: the replica restarts there.
            let (from, data) = s.tail.read(s.acked.max(tail_start), budget);
            let last = s.ended && from + data.len() as u64 == total;
            if data.is_empty() && !last {
                continue;
            }
            if !unlimited {
                s.allowance -= data.len() as f64;
            }
            out.push(OutputChunk {
                task,
                fencing_token,
                offset: from,
                tail_start,
                data,
                last,
            });
            if out.len() == MAX_CHUNKS_PER_CALL {
                break;
            }
        }
        out
    }

    /// Takes the replica's answers to `sent`.
    fn answered(&self, sent: &[OutputChunk], answers: Vec<Result<u64, Error>>) {
        let mut streams = self.0.lock().expect("streams lock");
        for (c, a) in sent.iter().zip(answers) {
            let key = (c.task, c.fencing_token);
            let Some(s) = streams.get_mut(&key) else {
                continue;
            };
            match a {
                Ok(end) => {
                    let total = s.tail.span().1;
                    s.acked = end;
                    s.high = s.high.max(end);
                    if c.last && end == total {
                        streams.remove(&key);
                    }
                }
                Err(e) => {
                    // A stale fencing token: the attempt was given to another worker.
                    tracing::debug!(task = %c.task, error = %e, "live output refused; not streamed further");
                    streams.remove(&key);
                }
            }
        }
    }

    /// Forgets ended attempts (when the cluster cannot take their output).
    fn drop_ended(&self) {
        self.0.lock().expect("streams lock").retain(|_, s| !s.ended);
    }
}

/// Sends new output until `stop` is set and every ended attempt's output is out (or could
/// not be sent).
pub async fn run(
    mut client: Client,
    worker: WorkerId,
    streams: Streams,
    rate: usize,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut last = Instant::now();
    let mut ticks = tokio::time::interval(SEND_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let chunks = streams.take(last.elapsed(), rate);
        last = Instant::now();
        if chunks.is_empty() {
            if stop.load(std::sync::atomic::Ordering::Acquire) {
                return;
            }
            continue;
        }
        let sent = chunks.clone();
        let result = client
            .call(move |c, ctx| {
                let chunks = chunks.clone();
                async move { c.append_output(ctx, worker, chunks).await }
            })
            .await;
        match result {
            Ok(answers) => streams.answered(&sent, answers),
            Err(e) if e.to_string().contains("speaks fleet protocol") => {
                tracing::info!(error = %e, "the cluster does not take live output yet; output is kept and reported when attempts end");
                streams.drop_ended();
                if stop.load(std::sync::atomic::Ordering::Acquire) {
                    return;
                }
                tokio::time::sleep(OLD_CLUSTER_PAUSE).await;
            }
            Err(e) => {
                tracing::debug!(error = %e, "sending live output failed; trying again");
                if stop.load(std::sync::atomic::Ordering::Acquire) {
                    streams.drop_ended();
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RATE: usize = 1000;

    fn streams_with(data: &[u8]) -> (Streams, Tail) {
        let s = Streams::default();
        let tail = Tail::new(4096);
        tail.push(data);
        s.open(TaskId(1), 9, tail.clone(), RATE);
        (s, tail)
    }

    #[test]
    fn new_bytes_go_out_once_and_the_last_is_marked() {
        let (s, tail) = streams_with(b"hello\n");
        let c = s.take(SEND_EVERY, RATE);
        assert_eq!(
            (c[0].offset, &c[0].data[..], c[0].last),
            (0, &b"hello\n"[..], false)
        );
        s.answered(&c, vec![Ok(6)]);
        assert!(s.take(SEND_EVERY, RATE).is_empty(), "nothing new");
        tail.push(b"bye\n");
        s.end(TaskId(1), 9);
        let c = s.take(SEND_EVERY, RATE);
        assert_eq!(
            (c[0].offset, &c[0].data[..], c[0].last),
            (6, &b"bye\n"[..], true)
        );
        s.answered(&c, vec![Ok(10)]);
        assert!(s.0.lock().unwrap().is_empty(), "the ended stream is gone");
    }

    #[test]
    fn a_replica_asking_for_the_whole_tail_gets_it_outside_the_rate() {
        let (s, tail) = streams_with(&[b'x'; 1500]);
        let c = s.take(SEND_EVERY, RATE);
        assert_eq!(
            (c[0].offset, c[0].data.len()),
            (0, RATE),
            "one second's allowance"
        );
        s.answered(&c, vec![Ok(1000)]);
        // The worker moved to a replica that has nothing: it asks for everything.
        tail.push(&[b'x'; 100]);
        let c = s.take(SEND_EVERY, RATE);
        assert_eq!((c[0].offset, c[0].data.len()), (1000, 200));
        s.answered(&c, vec![Ok(0)]);
        let c = s.take(Duration::ZERO, RATE);
        assert_eq!(
            (c[0].offset, c[0].data.len()),
            (0, 1600),
            "the whole tail at once"
        );
        s.answered(&c, vec![Ok(1600)]);
        assert!(s.take(Duration::ZERO, RATE).is_empty());
    }

    #[test]
    fn the_rate_bounds_what_a_chatty_attempt_sends() {
        let s = Streams::default();
        let tail = Tail::new(2000);
        s.open(TaskId(1), 9, tail.clone(), RATE);
        let mut sent = 0;
        let mut gaps = 0;
        let mut acked = 0;
        for _ in 0..50 {
            tail.push(&[b'y'; 500]);
            let c = s.take(SEND_EVERY, RATE);
            if let Some(c) = c.first() {
                sent += c.data.len();
                gaps += u64::from(c.offset > acked);
                acked = c.offset + c.data.len() as u64;
                s.answered(std::slice::from_ref(c), vec![Ok(acked)]);
            }
        }
        // 10 simulated seconds at 1000 B/s, plus the first second's allowance.
        assert!(sent <= 11 * RATE, "sent {sent}");
        assert!(
            gaps > 0,
            "output the tail dropped before it was sent is skipped"
        );
    }

    #[test]
    fn a_refused_attempt_is_not_streamed_further() {
        let (s, _tail) = streams_with(b"abc");
        let c = s.take(SEND_EVERY, RATE);
        s.answered(&c, vec![Err(Error::StaleToken("task 1".into()))]);
        assert!(s.take(SEND_EVERY, RATE).is_empty());
    }
}
