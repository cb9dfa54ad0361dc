//! The live-output calls (`append_output`, `read_output`), answered by whichever replica is
//! contacted; the buffers are soft state ([`super::live_output`]).

use std::time::Duration;

use futures::future::join_all;
use tarpc::context::Context;

use super::live_output::{MAX_CHUNKS_PER_CALL, MAX_CHUNK_BYTES, MAX_READ_BYTES};
use super::Replica;
use crate::error::Error;
use crate::rpc::{OutputChunk, OutputRead, LIVE_OUTPUT_PROTOCOL};
use crate::state::task::stale_token;
use crate::state::{State, TaskId, WorkerId};

/// How long a read waits for the other replicas' buffers.
const PEER_READ_TIMEOUT: Duration = Duration::from_millis(500);

/// Whether `worker` may write the output of `c`'s attempt, by this replica's state: the
/// attempt is the task's newest and ran on this worker. Its last bytes may come after its end
/// (the report can commit first). A replica that has not applied the grant yet (a lagging
/// follower) accepts: the buffers are bounded either way.
fn may_write(s: &State, worker: WorkerId, c: &OutputChunk) -> Result<(), Error> {
    let Some(task) = s.task(c.task) else {
        return Ok(());
    };
    let newest = task.attempts.iter().map(|a| a.fencing_token).max();
    let other_worker = task
        .attempts
        .iter()
        .any(|a| a.fencing_token == c.fencing_token && a.worker != worker);
    if other_worker || newest.is_some_and(|n| n > c.fencing_token) {
        return Err(Error::from(stale_token(
            c.task,
            c.fencing_token,
            task.lease.as_ref().map(|l| l.fencing_token),
        )));
    }
    Ok(())
}

fn check_chunks(chunks: &[OutputChunk]) -> Result<(), Error> {
    if chunks.len() > MAX_CHUNKS_PER_CALL {
        return Err(Error::InvalidArgument(format!(
            "{} output chunks in one call; at most {MAX_CHUNKS_PER_CALL}",
            chunks.len()
        )));
    }
    for c in chunks {
        if c.data.len() > MAX_CHUNK_BYTES {
            return Err(Error::InvalidArgument(format!(
                "an output chunk of {} bytes for task {}; at most {MAX_CHUNK_BYTES}",
                c.data.len(),
                c.task
            )));
        }
        if c.tail_start > c.offset {
            return Err(Error::InvalidArgument(format!(
                "an output chunk for task {} at offset {} names an oldest byte {} after it",
                c.task, c.offset, c.tail_start
            )));
        }
    }
    Ok(())
}

/// Of the buffers found, the one to answer with: one that holds the offset asked for, if
/// any, then the one that reaches furthest.
fn best(offset: u64, found: impl IntoIterator<Item = OutputRead>) -> Option<OutputRead> {
    found
        .into_iter()
        .max_by_key(|r| (r.from == offset, r.end, r.complete))
}

impl Replica {
    pub(crate) async fn append_output(
        &self,
        worker: WorkerId,
        chunks: Vec<OutputChunk>,
    ) -> Result<Vec<Result<u64, Error>>, Error> {
        check_chunks(&chunks)?;
        let verdicts: Vec<Result<(), Error>> = self
            .sm
            .read(|s| chunks.iter().map(|c| may_write(s, worker, c)).collect())
            .await;
        let now = self.clock.mono_ms();
        let mut live = self.live_output.lock().expect("live output lock");
        let answers = chunks
            .iter()
            .zip(verdicts)
            .map(|(c, ok)| ok.map(|()| live.append(c, now)))
            .collect();
        Ok(answers)
    }

    pub(crate) async fn read_output(
        &self,
        ctx: Context,
        task: TaskId,
        fencing_token: u64,
        offset: u64,
        hop: u8,
    ) -> Result<Option<OutputRead>, Error> {
        let local = self.live_output.lock().expect("live output lock").read(
            task,
            fencing_token,
            offset,
            MAX_READ_BYTES,
        );
        if hop > 0 {
            return Ok(local);
        }
        let others = self.others_output(ctx, task, fencing_token, offset).await;
        Ok(best(offset, local.into_iter().chain(others)))
    }

    /// What the other members (voters and learners) hold of an attempt's output; members that
    /// cannot be reached in time, or speak a protocol without the call, are left out.
    async fn others_output(
        &self,
        ctx: Context,
        task: TaskId,
        fencing_token: u64,
        offset: u64,
    ) -> Vec<OutputRead> {
        let members = crate::raft::other_members(&self.raft, self.id);
        let wait = ctx
            .deadline
            .saturating_duration_since(std::time::Instant::now())
            .min(PEER_READ_TIMEOUT);
        let asks = members.into_iter().map(|(id, addr)| {
            let peer = self.pool.get(Some(id), &addr);
            async move {
                let (client, protocol) = peer.connected().await.ok()?;
                if protocol < LIVE_OUTPUT_PROTOCOL {
                    return None;
                }
                let ctx = crate::rpc::context_with_timeout(wait);
                match client
                    .read_output(ctx, task, fencing_token, offset, 1)
                    .await
                {
                    Ok(Ok(r)) => r,
                    Ok(Err(_)) => None,
                    Err(e) => {
                        if crate::rpc::peer::is_transport_failure(&e) {
                            peer.reset().await;
                        }
                        None
                    }
                }
            }
        });
        match tokio::time::timeout(wait, join_all(asks)).await {
            Ok(found) => found.into_iter().flatten().collect(),
            Err(_) => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(from: u64, end: u64, complete: bool) -> OutputRead {
        OutputRead {
            start: from,
            from,
            end,
            data: Vec::new(),
            complete,
        }
    }

    #[test]
    fn the_buffer_holding_the_offset_wins_then_the_furthest() {
        let got = best(100, [read(200, 900, false), read(100, 300, false)]).unwrap();
        assert_eq!(got.end, 300, "continuity first");
        let got = best(100, [read(100, 300, false), read(100, 500, false)]).unwrap();
        assert_eq!(got.end, 500);
        let got = best(100, [read(100, 500, false), read(100, 500, true)]).unwrap();
        assert!(got.complete);
        assert!(best(0, []).is_none());
    }

    #[test]
    fn chunks_are_bounded() {
        let c = OutputChunk {
            task: TaskId(1),
            fencing_token: 1,
            offset: 0,
            tail_start: 0,
            data: vec![0; MAX_CHUNK_BYTES + 1],
            last: false,
        };
        let e = check_chunks(std::slice::from_ref(&c))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("262145 bytes") && e.contains("at most 262144"),
            "{e}"
        );
        let c = OutputChunk {
            data: vec![],
            offset: 5,
            tail_start: 9,
            ..c
        };
        let e = check_chunks(&[c]).unwrap_err().to_string();
        assert!(e.contains("oldest byte 9 after it"), "{e}");
    }
}
