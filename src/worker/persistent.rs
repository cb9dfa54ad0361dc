//! Persistent executors: a queue with `executor = "persistent"` runs its attempts in
//! long-lived processes instead of a process per attempt (the idea of Bazel's persistent
//! workers and of Celery's reused pool processes), so a handler that imports a heavy library
//! pays for it once, not per task.
//!
//! The protocol (docs/tasks.md, "Persistent executors"): the worker writes one JSON line per
//! attempt to the process's stdin (task, attempt, fencing token, queue, args, env, timeout) and
//! reads its stdout until a line that is a JSON object with the attempt's `fencing_token` and
//! `ok` (the result). The process serves one attempt at a time; a worker runs as many
//! processes of a queue as it runs attempts of it at once, and keeps them between attempts.
//! Everything else the process writes (stderr, and stdout lines that are not results) is the
//! attempt's output, captured per attempt exactly as for one-shot tasks.
//!
//! Leases, heartbeats and fencing are the worker's, unchanged. What ends an attempt other than
//! its result also ends the process, which is started again for the next attempt (as is one
//! found dead when an attempt would be given to it): the
//! execution timeout, a cancel or a lost lease (SIGTERM to its process group, SIGKILL after
//! the grace period), the process exiting, or a result that breaks the protocol. The process
//! is contained like an attempt (its own cgroup or, with the subreaper, its own
//! `FLEET_EXECUTOR_ID` mark), and dies with the worker (parent-death signal).

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::mpsc;

use super::attempt::{signal_group, terminate, worker_environment, Ended, KillReason, Tail};
use super::containment::{Contained, Containment};
use super::spawn;
use crate::rpc::LeasedTask;
use crate::state::AttemptOutcome;

/// Longest stdout line read as one line; a longer one is output, not a result.
const MAX_LINE: usize = 1024 * 1024;

/// The persistent executors of one worker, by queue.
#[derive(Default)]
pub struct Executors {
    pools: HashMap<String, Pool>,
    /// Numbers the processes (`FLEET_EXECUTOR_ID`).
    started: AtomicU64,
}

/// The idle processes of one queue's executor, and how to start another.
struct Pool {
    command: Vec<String>,
    idle: Mutex<Vec<Executor>>,
}

/// One long-lived process.
struct Executor {
    id: u64,
    process: spawn::Process,
    contained: Contained,
    /// `None` once closed (end of input: the process should exit).
    stdin: Option<pipe::Sender>,
    stdout: LineReader,
    stderr: Option<pipe::Receiver>,
    /// Attempts it has served.
    served: u64,
}

/// Everything one attempt needs from the worker.
pub struct AttemptEnv<'a> {
    pub containment: &'a Containment,
    pub worker_name: &'a str,
    pub kill_grace: Duration,
}

/// The request line for one attempt.
#[derive(Serialize)]
struct Request<'a> {
    task: u64,
    attempt: u32,
    fencing_token: u64,
    queue: &'a str,
    args: &'a crate::state::Argv,
    env: BTreeMap<&'a str, &'a str>,
    execution_timeout_ms: Option<u64>,
}

/// What a stdout line is to the running attempt.
#[derive(Debug, PartialEq)]
enum Line {
    /// Output.
    Output,
    /// The attempt's result.
    Result(AttemptOutcome),
    /// A result line that breaks the protocol: the process is not trusted with another
    /// attempt.
    Broken(String),
}

/// Reads `line` as the process's answer to the attempt with `token`.
fn classify(line: &[u8], token: u64) -> Line {
    let Ok(serde_json::Value::Object(o)) = serde_json::from_slice::<serde_json::Value>(line) else {
        return Line::Output;
    };
    let Some(answered) = o.get("fencing_token") else {
        return Line::Output;
    };
    if answered.as_u64() != Some(token) {
        return Line::Broken(format!(
            "the persistent executor answered for fencing token {answered} while the attempt \
             with token {token} was running"
        ));
    }
    match o.get("ok") {
        Some(serde_json::Value::Bool(true)) => Line::Result(AttemptOutcome::Succeeded),
        Some(serde_json::Value::Bool(false)) => {
            Line::Result(AttemptOutcome::failed(match o.get("error") {
                Some(serde_json::Value::String(e)) => e.clone(),
                Some(e) => e.to_string(),
                None => "the persistent executor reported a failure".into(),
            }))
        }
        other => Line::Broken(format!(
            "the persistent executor's result has \"ok\": {}; expected true or false",
            other.map_or("(missing)".to_string(), |v| v.to_string())
        )),
    }
}

/// Splits a pipe into lines; cancel-safe (the partial line stays in `buf`).
struct LineReader {
    rx: pipe::Receiver,
    buf: Vec<u8>,
}

impl LineReader {
    /// The next line without its newline; `None` at end of file.
    async fn next_line(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        loop {
            if let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
                let mut line: Vec<u8> = self.buf.drain(..=i).collect();
                line.pop();
                return Ok(Some(line));
            }
            if self.buf.len() >= MAX_LINE {
                return Ok(Some(std::mem::take(&mut self.buf)));
            }
            let mut chunk = [0u8; 8192];
            let n = self.rx.read(&mut chunk).await?;
            if n == 0 {
                return Ok((!self.buf.is_empty()).then(|| std::mem::take(&mut self.buf)));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// How an attempt on a persistent process ended.
enum End {
    /// It answered: the process may serve the next attempt.
    Answered(AttemptOutcome),
    /// The process broke the protocol.
    Broken(String),
    /// Its stdout closed or its stdin broke: it exited (or is exiting).
    Exited,
    TimedOut,
    Killed(KillReason),
}

impl Executors {
    /// The executors of the queues that have one (`[queues.<q>] executor = "persistent"`).
    pub fn new(commands: BTreeMap<String, Vec<String>>) -> Executors {
        Executors {
            pools: commands
                .into_iter()
                .map(|(q, command)| {
                    let pool = Pool {
                        command,
                        idle: Mutex::new(Vec::new()),
                    };
                    (q, pool)
                })
                .collect(),
            started: AtomicU64::new(0),
        }
    }

    /// Whether attempts of `queue` go to a persistent executor.
    pub fn serves(&self, queue: &str) -> bool {
        self.pools.contains_key(queue)
    }

    /// Runs the leased attempt on an idle process of its queue's executor, or a new one.
    pub async fn run(
        &self,
        lease: &LeasedTask,
        env: &AttemptEnv<'_>,
        mut tail: Tail,
        mut kill: mpsc::UnboundedReceiver<KillReason>,
    ) -> Ended {
        let pool = &self.pools[&lease.spec.queue];
        let idle = self.idle_process(pool, env).await;
        let mut exec = match idle {
            Some(e) => e,
            None => match self.start(pool, &lease.spec.queue, env).await {
                Ok(e) => e,
                Err(e) => {
                    return Ended {
                        outcome: Some(AttemptOutcome::failed(format!(
                            "cannot start the persistent executor {:?}: {e}",
                            pool.command[0]
                        ))),
                        output_tail: String::new(),
                        pid: None,
                    };
                }
            },
        };
        let pid = Some(exec.process.id());
        tracing::debug!(
            executor = exec.id,
            pid = exec.process.id(),
            served = exec.served,
            "attempt given to a persistent executor"
        );
        let end = exec.serve(lease, &mut tail, &mut kill).await;
        exec.served += 1;
        let outcome = match end {
            End::Answered(outcome) => {
                exec.drain_stderr(&mut tail);
                pool.idle.lock().expect("idle lock").push(exec);
                Some(outcome)
            }
            End::Broken(why) => {
                tracing::warn!(executor = exec.id, error = %why, "the persistent executor broke the protocol; it is stopped");
                exec.stop(env, &mut tail).await;
                Some(AttemptOutcome::failed(why))
            }
            End::Exited => {
                let id = exec.id;
                let status = exec.stop(env, &mut tail).await;
                tracing::warn!(executor = id, ?status, "the persistent executor exited during an attempt; the next attempt starts another");
                Some(AttemptOutcome::Failed {
                    exit_code: status.and_then(|s| s.code()),
                    signal: status.and_then(|s| s.signal()),
                    error: Some(
                        "the persistent executor exited during the attempt (the next attempt \
                         starts a new one)"
                            .into(),
                    ),
                })
            }
            End::TimedOut => {
                exec.stop(env, &mut tail).await;
                Some(AttemptOutcome::TimedOut)
            }
            End::Killed(reason) => {
                exec.stop(env, &mut tail).await;
                reason.outcome()
            }
        };
        Ended {
            outcome,
            output_tail: tail.text(),
            pid,
        }
    }

    /// An idle process of `pool` that is still alive. One that exited while idle (killed, out
    /// of memory) is cleaned up and not used: the attempt must not fail for it.
    async fn idle_process(&self, pool: &Pool, env: &AttemptEnv<'_>) -> Option<Executor> {
        loop {
            let mut e = pool.idle.lock().expect("idle lock").pop()?;
            if !e.process.has_exited() {
                return Some(e);
            }
            tracing::warn!(
                executor = e.id,
                pid = e.process.id(),
                "a persistent executor exited while idle; starting another"
            );
            e.stop(env, &mut Tail::new(0)).await;
        }
    }

    /// Starts a process of `pool`'s executor.
    async fn start(
        &self,
        pool: &Pool,
        queue: &str,
        env: &AttemptEnv<'_>,
    ) -> std::io::Result<Executor> {
        let id = self.started.fetch_add(1, Ordering::Relaxed) + 1;
        let mut vars = worker_environment();
        for (k, v) in [
            ("FLEET_QUEUE", queue.to_string()),
            ("FLEET_WORKER", env.worker_name.to_string()),
            ("FLEET_EXECUTOR_ID", id.to_string()),
        ] {
            vars.insert(OsString::from(k), OsString::from(v));
        }
        let contained = env.containment.prepare(format!("FLEET_EXECUTOR_ID={id}"))?;
        let request = spawn::Request {
            program: &pool.command[0],
            args: pool.command[1..].iter().map(String::as_str).collect(),
            env: vars.into_iter().collect(),
            cgroup_procs: contained.cgroup_procs(),
            stdio: spawn::Stdio::Separate,
        };
        let spawned = match env.containment.spawn(|| spawn::spawn(&request)) {
            Ok(s) => s,
            Err(e) => {
                env.containment.release(contained);
                return Err(e);
            }
        };
        let spawn::Spawned {
            mut process,
            output,
            stdin,
            stderr,
        } = spawned;
        let pipes = (|| {
            let stdin = pipe::Sender::from_owned_fd(stdin.expect("separate stdio"))?;
            let stdout = pipe::Receiver::from_owned_fd(output)?;
            let stderr = pipe::Receiver::from_owned_fd(stderr.expect("separate stdio"))?;
            std::io::Result::Ok((stdin, stdout, stderr))
        })();
        let (stdin, stdout, stderr) = match pipes {
            Ok(p) => p,
            Err(e) => {
                // Not usable: it goes at once.
                let pid = process.id();
                signal_group(pid as i32, libc::SIGKILL);
                let _ = process.wait().await;
                env.containment.end(contained, Some(pid)).await;
                return Err(e);
            }
        };
        tracing::info!(executor = id, pid = process.id(), queue, command = ?pool.command, "persistent executor started");
        Ok(Executor {
            id,
            process,
            contained,
            stdin: Some(stdin),
            stdout: LineReader {
                rx: stdout,
                buf: Vec::new(),
            },
            stderr: Some(stderr),
            served: 0,
        })
    }

    /// Stops every idle process: end of input first (a well-behaved handler exits), then
    /// SIGTERM and SIGKILL after the grace period. Called when the worker stops.
    pub async fn shutdown(&self, env: &AttemptEnv<'_>) {
        let idle: Vec<Executor> = self
            .pools
            .values()
            .flat_map(|p| std::mem::take(&mut *p.idle.lock().expect("idle lock")))
            .collect();
        for mut e in idle {
            let mut sink = Tail::new(0);
            e.close_input();
            let exited = tokio::time::timeout(env.kill_grace, e.process.wait())
                .await
                .is_ok();
            if !exited {
                tracing::info!(
                    executor = e.id,
                    "the persistent executor did not exit at end of input; stopping it"
                );
            }
            e.stop(env, &mut sink).await;
        }
    }
}

impl Executor {
    /// Sends the attempt and waits for its result, the process's end, the timeout or a kill
    /// request; collects the attempt's output into `tail` meanwhile.
    async fn serve(
        &mut self,
        lease: &LeasedTask,
        tail: &mut Tail,
        kill: &mut mpsc::UnboundedReceiver<KillReason>,
    ) -> End {
        let spec = &lease.spec;
        let request = Request {
            task: lease.task.0,
            attempt: lease.attempt,
            fencing_token: lease.fencing_token,
            queue: &spec.queue,
            args: &spec.command,
            env: spec
                .env
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect(),
            execution_timeout_ms: spec.execution_timeout_ms,
        };
        let mut line = serde_json::to_vec(&request).expect("a request serializes");
        line.push(b'\n');
        let timer = async {
            match spec.execution_timeout_ms {
                Some(t) => tokio::time::sleep(Duration::from_millis(t)).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(timer);
        let token = lease.fencing_token;
        let Executor {
            stdin,
            stdout,
            stderr,
            ..
        } = self;
        let Some(stdin) = stdin else {
            return End::Exited;
        };
        let send = stdin.write_all(&line);
        tokio::pin!(send);
        let mut sent = false;
        let mut errbuf = [0u8; 8192];
        loop {
            tokio::select! {
                r = &mut send, if !sent => match r {
                    Ok(()) => sent = true,
                    Err(_) => return End::Exited,
                },
                l = stdout.next_line() => {
                    let Ok(Some(l)) = l else {
                        return End::Exited;
                    };
                    // What went to stderr before this line comes first in the output.
                    drain(stderr, tail);
                    match classify(&l, token) {
                        Line::Output => {
                            tail.push(&l);
                            tail.push(b"\n");
                        }
                        Line::Result(outcome) => return End::Answered(outcome),
                        Line::Broken(why) => return End::Broken(why),
                    }
                }
                n = read_some(stderr, &mut errbuf) => match n {
                    Some(n) => tail.push(&errbuf[..n]),
                    None => *stderr = None,
                },
                _ = &mut timer => return End::TimedOut,
                Some(reason) = kill.recv() => return End::Killed(reason),
            }
        }
    }

    /// Moves what the process has written to stderr so far into `tail`.
    fn drain_stderr(&mut self, tail: &mut Tail) {
        drain(&self.stderr, tail);
    }

    /// Closes the process's stdin: end of input.
    fn close_input(&mut self) {
        self.stdin = None;
    }

    /// Ends the process and whatever it started: SIGTERM (to its group and its containment),
    /// SIGKILL after the grace period, then the containment's end. Its exit status.
    async fn stop(
        mut self,
        env: &AttemptEnv<'_>,
        tail: &mut Tail,
    ) -> Option<std::process::ExitStatus> {
        let pgid = self.process.id() as i32;
        // An exiting process gets a moment to finish on its own (its output is the attempt's).
        let status =
            match tokio::time::timeout(Duration::from_millis(100), self.process.wait()).await {
                Ok(s) => s.ok(),
                Err(_) => {
                    env.containment.signal(&self.contained, libc::SIGTERM);
                    terminate(&mut self.process, pgid, env.kill_grace)
                        .await
                        .ok()
                }
            };
        signal_group(pgid, libc::SIGKILL);
        self.drain_stderr(tail);
        env.containment
            .end(self.contained, Some(self.process.id()))
            .await;
        status
    }
}

/// Moves what is in the pipe now into `tail`. Reads the (non-blocking) fd directly: the
/// runtime may not have seen it become readable yet, and the output written before a stdout
/// line must come before that line.
fn drain(r: &Option<pipe::Receiver>, tail: &mut Tail) {
    let Some(r) = r else {
        return;
    };
    let fd = std::os::fd::AsRawFd::as_raw_fd(r);
    let mut buf = [0u8; 8192];
    loop {
        // SAFETY: reads into a local buffer from an fd this executor owns.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            break;
        }
        tail.push(&buf[..n as usize]);
    }
}

/// One read from `r`; `None` once it is closed (or gone). Never ready when there is no `r`.
async fn read_some(r: &mut Option<pipe::Receiver>, buf: &mut [u8]) -> Option<usize> {
    match r {
        Some(rx) => match rx.read(buf).await {
            Ok(0) | Err(_) => None,
            Ok(n) => Some(n),
        },
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_result_line_names_the_attempts_token() {
        assert_eq!(
            classify(br#"{"fencing_token": 7, "ok": true}"#, 7),
            Line::Result(AttemptOutcome::Succeeded)
        );
        assert_eq!(
            classify(
                br#"{"fencing_token":7,"ok":false,"error":"no such file"}"#,
                7
            ),
            Line::Result(AttemptOutcome::failed("no such file"))
        );
        assert_eq!(
            classify(br#"{"fencing_token":7,"ok":false}"#, 7),
            Line::Result(AttemptOutcome::failed(
                "the persistent executor reported a failure"
            ))
        );
        // Anything else on stdout is output.
        for line in [
            &b"hello"[..],
            b"",
            b"[1, 2]",
            br#"{"progress": 50}"#,
            b"{\"fencing_token\": 7",
        ] {
            assert_eq!(classify(line, 7), Line::Output, "{line:?}");
        }
    }

    #[test]
    fn a_result_for_another_attempt_or_without_ok_breaks_the_protocol() {
        let Line::Broken(why) = classify(br#"{"fencing_token": 6, "ok": true}"#, 7) else {
            panic!("accepted a stale token");
        };
        assert!(why.contains("token 6") && why.contains("token 7"), "{why}");
        let Line::Broken(why) = classify(br#"{"fencing_token": 7, "ok": "yes"}"#, 7) else {
            panic!("accepted a non-boolean ok");
        };
        assert!(why.contains("\"yes\""), "{why}");
        assert!(matches!(
            classify(br#"{"fencing_token": 7}"#, 7),
            Line::Broken(_)
        ));
    }
}
