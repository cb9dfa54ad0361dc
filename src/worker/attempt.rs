//! Running one attempt: a child process in its own process group, with a bounded output tail,
//! an execution timeout, and kill on request (cancel, fencing, shutdown).
//!
//! Kills go to the whole process group (the command and anything it started): SIGTERM first,
//! SIGKILL after the grace period. After the command exits, any process left in its group is
//! SIGKILLed too, and so is any process that escaped the group (`setsid`, a daemon): those are
//! found through the attempt's cgroup or its fencing token ([`super::containment`]), so no
//! process of an attempt outlives it.

use std::collections::{BTreeMap, VecDeque};
use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;

use super::containment::Containment;
use super::spawn;
use crate::rpc::LeasedTask;
use crate::state::AttemptOutcome;

/// Why a running attempt is being killed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KillReason {
    /// The task was cancelled: the attempt is reported as cancelled.
    Cancelled,
    /// The lease is gone: the attempt is reported as killed, and the leader rejects the report
    /// for its stale fencing token (the rejection is logged).
    Fenced,
    /// The worker is shutting down without waiting: the lease is handed back instead.
    Shutdown,
    /// No heartbeat extended the lease in time (the worker could not reach the leader): the
    /// attempt is reported as failed, and rejected if the leader expired the lease meanwhile.
    Lapsed,
}

impl KillReason {
    /// What an attempt killed for this reason is reported as (`None`: not reported).
    pub fn outcome(self) -> Option<AttemptOutcome> {
        match self {
            KillReason::Cancelled => Some(AttemptOutcome::Cancelled),
            KillReason::Fenced => Some(AttemptOutcome::failed(
                "killed: the lease was lost (fenced)",
            )),
            KillReason::Shutdown => None,
            KillReason::Lapsed => Some(AttemptOutcome::failed(
                "killed: no heartbeat extended the lease within 80% of its visibility timeout",
            )),
        }
    }
}

/// How an attempt ended, as the worker saw it.
#[derive(Debug)]
pub struct Ended {
    /// `None` when the attempt must not be reported (handed back at shutdown).
    pub outcome: Option<AttemptOutcome>,
    pub output_tail: String,
    /// The process id the command ran as (for logs and tests).
    pub pid: Option<u32>,
}

/// The last `cap` bytes of an attempt's output, and how many were written in all. Cloned
/// handles share one buffer: the attempt writes, the live-output stream ([`super::stream`])
/// reads.
#[derive(Clone)]
pub struct Tail(Arc<Mutex<TailBuf>>);

struct TailBuf {
    buf: VecDeque<u8>,
    cap: usize,
    /// Bytes written since the attempt started: the offset of the next byte.
    total: u64,
}

impl Tail {
    pub fn new(cap: usize) -> Tail {
        Tail(Arc::new(Mutex::new(TailBuf {
            buf: VecDeque::new(),
            cap,
            total: 0,
        })))
    }

    pub fn push(&self, data: &[u8]) {
        let mut t = self.0.lock().expect("tail lock");
        t.total += data.len() as u64;
        if t.cap == 0 {
            return;
        }
        let data = if data.len() > t.cap {
            &data[data.len() - t.cap..]
        } else {
            data
        };
        let overflow = (t.buf.len() + data.len()).saturating_sub(t.cap);
        t.buf.drain(..overflow);
        t.buf.extend(data);
    }

    /// The kept bytes as text (invalid UTF-8 replaced), at most `cap` bytes of it: replacement
    /// characters are longer than the bytes they replace, so the oldest text goes first.
    pub fn text(&self) -> String {
        let t = self.0.lock().expect("tail lock");
        let bytes: Vec<u8> = t.buf.iter().copied().collect();
        let text = String::from_utf8_lossy(&bytes);
        let mut cut = text.len().saturating_sub(t.cap);
        while !text.is_char_boundary(cut) {
            cut += 1;
        }
        text[cut..].to_string()
    }

    /// The oldest offset still kept, and the offset of the next byte.
    pub fn span(&self) -> (u64, u64) {
        let t = self.0.lock().expect("tail lock");
        (t.total - t.buf.len() as u64, t.total)
    }

    /// Up to `max` kept bytes from `offset` (from the oldest kept byte, if that is later), and
    /// where they start.
    pub fn read(&self, offset: u64, max: usize) -> (u64, Vec<u8>) {
        let t = self.0.lock().expect("tail lock");
        let start = t.total - t.buf.len() as u64;
        let from = offset.clamp(start, t.total);
        let skip = (from - start) as usize;
        let n = (t.buf.len() - skip).min(max);
        (from, t.buf.range(skip..skip + n).copied().collect())
    }
}

async fn drain_into(mut r: impl AsyncRead + Unpin, tail: Tail) {
    let mut buf = vec![0u8; 8192];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => tail.push(&buf[..n]),
        }
    }
}

pub(super) fn signal_group(pgid: i32, sig: i32) {
    // SAFETY: sends a signal to a process group this worker created; no memory is shared.
    unsafe {
        libc::killpg(pgid, sig);
    }
}

/// Runs the leased attempt to its end. `kill` delivers kill requests from the heartbeat path
/// and the shutdown path.
pub async fn run(
    lease: &LeasedTask,
    containment: &Containment,
    worker_name: &str,
    tail: Tail,
    kill_grace: Duration,
    mut kill: mpsc::UnboundedReceiver<KillReason>,
) -> Ended {
    let spec = &lease.spec;
    let spawned = containment
        .prepare(format!("FLEET_FENCING_TOKEN={}", lease.fencing_token))
        .and_then(|c| {
            let request = spawn::Request {
                program: spec.command.program(),
                args: spec.command.args().collect(),
                env: environment(lease, worker_name),
                cgroup_procs: c.cgroup_procs(),
                stdio: spawn::Stdio::Combined,
            };
            match containment.spawn(|| spawn::spawn(&request)) {
                Ok(s) => Ok((c, s)),
                Err(e) => {
                    // Nothing started: the cgroup goes back as it came.
                    containment.release(c);
                    Err(e)
                }
            }
        });
    let (contained, spawned) = match spawned {
        Ok(c) => c,
        Err(e) => {
            return Ended {
                outcome: Some(AttemptOutcome::failed(format!(
                    "cannot start {:?}: {e}",
                    spec.command.program()
                ))),
                output_tail: String::new(),
                pid: None,
            }
        }
    };
    let mut child = spawned.process;
    let pid = Some(child.id());
    let pgid = child.id() as i32;
    let reader = tokio::net::unix::pipe::Receiver::from_owned_fd(spawned.output)
        .map(|out| tokio::spawn(drain_into(out, tail.clone())))
        .map_err(|e| tracing::warn!(error = %e, "cannot read the attempt's output"))
        .ok();
    let timeout = spec.execution_timeout_ms.map(Duration::from_millis);
    let timer = async {
        match timeout {
            Some(t) => tokio::time::sleep(t).await,
            None => std::future::pending().await,
        }
    };
    // What ended the attempt, if not the command itself.
    let mut stopped_by: Option<Result<KillReason, ()>> = None;
    let status = tokio::select! {
        s = child.wait() => s,
        _ = timer => {
            stopped_by = Some(Err(()));
            containment.signal(&contained, libc::SIGTERM);
            terminate(&mut child, pgid, kill_grace).await
        }
        Some(reason) = kill.recv() => {
            stopped_by = Some(Ok(reason));
            containment.signal(&contained, libc::SIGTERM);
            terminate(&mut child, pgid, kill_grace).await
        }
    };
    if pgid > 0 {
        // Whatever the command left running in its group goes with it.
        signal_group(pgid, libc::SIGKILL);
    }
    // And whatever escaped the group (setsid, daemons): its cgroup, or its fencing token.
    containment.end(contained, pid).await;
    if let Some(r) = reader {
        // A process that left the group may still hold the pipe: do not wait for it forever.
        let _ = tokio::time::timeout(Duration::from_secs(1), r).await;
    }
    let output_tail = tail.text();
    let outcome = match stopped_by {
        Some(Err(())) => Some(AttemptOutcome::TimedOut),
        Some(Ok(reason)) => reason.outcome(),
        None => Some(match status {
            Ok(s) if s.success() => AttemptOutcome::Succeeded,
            Ok(s) => AttemptOutcome::Failed {
                exit_code: s.code(),
                signal: s.signal(),
                error: None,
            },
            Err(e) => AttemptOutcome::failed(format!("waiting for the process failed: {e}")),
        }),
    };
    Ended {
        outcome,
        output_tail,
        pid,
    }
}

/// The worker's environment without its own systemd link: what every process it starts
/// inherits.
pub(super) fn worker_environment() -> BTreeMap<OsString, OsString> {
    std::env::vars_os()
        .filter(|(k, _)| {
            !matches!(
                k.to_str(),
                Some("NOTIFY_SOCKET" | "WATCHDOG_USEC" | "WATCHDOG_PID")
            )
        })
        .collect()
}

/// The attempt's environment: the worker's, plus the task's `env` and the attempt's identity.
fn environment(lease: &LeasedTask, worker_name: &str) -> Vec<(OsString, OsString)> {
    let mut env = worker_environment();
    let spec = &lease.spec;
    env.extend(spec.env.iter().map(|(k, v)| (k.into(), v.into())));
    for (k, v) in [
        ("FLEET_TASK_ID", lease.task.to_string()),
        ("FLEET_ATTEMPT", lease.attempt.to_string()),
        ("FLEET_FENCING_TOKEN", lease.fencing_token.to_string()),
        ("FLEET_QUEUE", spec.queue.clone()),
        ("FLEET_WORKER", worker_name.to_string()),
    ] {
        env.insert(k.into(), v.into());
    }
    env.into_iter().collect()
}

/// SIGTERM to the group, SIGKILL after `grace` if it is still there.
pub(super) async fn terminate(
    child: &mut spawn::Process,
    pgid: i32,
    grace: Duration,
) -> std::io::Result<std::process::ExitStatus> {
    if pgid > 0 {
        signal_group(pgid, libc::SIGTERM);
    }
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(s) => s,
        Err(_) => {
            if pgid > 0 {
                signal_group(pgid, libc::SIGKILL);
            }
            child.wait().await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_last_bytes() {
        let t = Tail::new(5);
        t.push(b"abc");
        t.push(b"defg");
        assert_eq!(t.text(), "cdefg");
        assert_eq!(t.span(), (2, 7));
        assert_eq!(
            t.read(0, 100),
            (2, b"cdefg".to_vec()),
            "from the oldest kept"
        );
        assert_eq!(t.read(5, 1), (5, b"f".to_vec()));
        assert_eq!(t.read(9, 1), (7, vec![]), "past the end");
        t.push(b"0123456789");
        assert_eq!(t.text(), "56789");
        assert_eq!(t.span(), (12, 17));
        let z = Tail::new(0);
        z.push(b"abc");
        assert_eq!(z.text(), "");
        assert_eq!(z.span(), (3, 3));
    }

    #[test]
    fn tail_text_of_invalid_utf8_stays_within_the_bound() {
        let t = Tail::new(8);
        t.push(&[0xff; 8]);
        let text = t.text();
        assert!(text.len() <= 8, "{} bytes", text.len());
        assert_eq!(text, "\u{fffd}\u{fffd}");
    }
}
