//! `fleet logs ID [--follow]`: a task's output, attempt by attempt.
//!
//! An ended attempt shows the tail its worker reported with its end (stdout and stderr, the
//! last `worker.output_tail_bytes`, 1 MiB by default), which is replicated with the attempt's
//! record and outlives the worker. A running attempt shows its live output: the worker streams
//! it to the replicas a few times a second (soft state, `server::live_output`), and `--follow`
//! prints it as it comes, from whichever replica answers, across elections and replica
//! deaths, then each later attempt, until the task is succeeded, dead or cancelled.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Args;

use super::submit::POLL_EVERY;
use super::{connect, format_time_ms, print_json, ClientArgs, Output};
use crate::client::Client;
use crate::config::Config;
use crate::rpc::{OutputRead, ReadMode, LIVE_OUTPUT_PROTOCOL};
use crate::state::{Attempt, Task, TaskId};

/// After an attempt ended, how long its live output may still take to arrive in full (its
/// worker sends the last bytes after the end) before the kept tail is used instead.
const END_GRACE: Duration = Duration::from_secs(3);

#[derive(Args, Debug)]
pub struct LogsArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The task id.
    pub id: u64,
    /// Keep printing: the running attempt's output as it is produced, then each later attempt,
    /// until the task is succeeded, dead or cancelled.
    #[arg(long, short = 'f')]
    pub follow: bool,
}

fn header(a: &Attempt) -> String {
    format!(
        "=== attempt {} (worker {}, fencing token {}, started {})",
        a.number,
        a.worker_label(),
        a.fencing_token,
        format_time_ms(a.started_at_ms)
    )
}

fn outcome_of(a: &Attempt) -> String {
    a.outcome
        .as_ref()
        .map(|o| o.to_string())
        .unwrap_or_else(|| "running".into())
}

fn print_text(text: &str) {
    if !text.is_empty() {
        print!("{text}");
        if !text.ends_with('\n') {
            println!();
        }
    }
}

fn print_attempt(a: &Attempt) {
    println!("{}: {}", header(a), outcome_of(a));
    print_text(&a.output_tail);
}

async fn get(c: &mut Client, id: TaskId) -> anyhow::Result<Task> {
    let reply = c
        .call(move |cl, ctx| async move { cl.get_task(ctx, id, ReadMode::Linearizable, 0).await })
        .await?;
    match reply.value {
        Some(t) => Ok(t),
        None => bail!("task {id} not found"),
    }
}

/// An ended attempt without a kept tail (its worker died before reporting) may still have
/// live output on the replicas (soft state, for a while): shown, saying so.
async fn print_unreported(live: &mut Client, id: TaskId, a: &Attempt) {
    let Ok(Some(r)) = read_live(live, id, a.fencing_token, 0).await else {
        return;
    };
    if r.data.is_empty() {
        return;
    }
    println!(
        "=== output streamed live before attempt {} ended without a report (not kept: it is \
         gone when the replicas holding it restart)",
        a.number
    );
    if r.from > 0 {
        println!("[fleet: {} bytes of output not streamed]", r.from);
    }
    print_text(&String::from_utf8_lossy(&r.data));
}

/// What was shown of a running attempt's live output.
struct Shown {
    /// Bytes printed.
    bytes: u64,
    /// The worker's last byte was among them.
    complete: bool,
    /// The cluster streams no output (its replicas are older than live output).
    unsupported: bool,
}

async fn read_live(
    live: &mut Client,
    id: TaskId,
    token: u64,
    offset: u64,
) -> anyhow::Result<Option<OutputRead>> {
    live.call(move |c, ctx| async move { c.read_output(ctx, id, token, offset, 0).await })
        .await
}

/// Prints a running attempt's live output from its start: once, or (`follow`) until the
/// worker sent its last byte or [`END_GRACE`] after the attempt ended.
async fn show_live(
    c: &mut Client,
    live: &mut Client,
    task: TaskId,
    token: u64,
    follow: bool,
) -> anyhow::Result<Shown> {
    let mut shown = Shown {
        bytes: 0,
        complete: false,
        unsupported: false,
    };
    let mut offset = 0;
    let mut ended_at: Option<Instant> = None;
    let mut out = std::io::stdout();
    loop {
        let read = match read_live(live, task, token, offset).await {
            Ok(r) => r,
            Err(e) if e.to_string().contains("speaks fleet protocol") => {
                shown.unsupported = true;
                return Ok(shown);
            }
            Err(e) => return Err(e),
        };
        let mut more = false;
        if let Some(r) = read {
            if r.from > offset {
                writeln!(
                    out,
                    "[fleet: {} bytes of output not streamed]",
                    r.from - offset
                )?;
            }
            out.write_all(&r.data)?;
            out.flush()?;
            offset = r.from + r.data.len() as u64;
            shown.bytes += r.data.len() as u64;
            if r.complete && offset == r.end {
                shown.complete = true;
                return Ok(shown);
            }
            more = offset < r.end;
        }
        if !follow {
            return Ok(shown);
        }
        if more {
            continue;
        }
        if ended_at.is_none() {
            let t = get(c, task).await?;
            let ended = t
                .attempts
                .iter()
                .any(|a| a.fencing_token == token && a.outcome.is_some());
            if ended {
                ended_at = Some(Instant::now());
            }
        }
        if ended_at.is_some_and(|at| at.elapsed() > END_GRACE) {
            return Ok(shown);
        }
        // Polling for new output; the pause paces the reads.
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// Shows the running attempt `a` (live), and with `follow` its end; returns whether its end
/// was shown.
async fn show_running(
    c: &mut Client,
    live: &mut Client,
    id: TaskId,
    a: &Attempt,
    follow: bool,
) -> anyhow::Result<bool> {
    println!("{}: running", header(a));
    let shown = show_live(c, live, id, a.fencing_token, follow).await?;
    if shown.bytes > 0 && !shown.complete {
        println!();
    }
    if !follow {
        if shown.unsupported {
            println!("(this cluster does not stream output; it is recorded when the attempt ends)");
        }
        return Ok(false);
    }
    // Followed to its end: the record gets the outcome and the kept tail when the worker's
    // report commits (or the lease expires), shortly after its last output.
    let ended = loop {
        let task = get(c, id).await?;
        let found = task
            .attempts
            .into_iter()
            .find(|e| e.fencing_token == a.fencing_token && e.outcome.is_some());
        if let Some(e) = found {
            break e;
        }
        // Polling for the attempt's end; the pause paces the reads.
        tokio::time::sleep(POLL_EVERY).await;
    };
    let ended = &ended;
    println!("=== attempt {}: {}", ended.number, outcome_of(ended));
    if shown.bytes == 0 {
        print_text(&ended.output_tail);
    } else if !shown.complete && !ended.output_tail.is_empty() {
        println!("=== the live output stopped early; the kept tail of attempt {} follows (it may repeat lines above)", ended.number);
        print_text(&ended.output_tail);
    }
    Ok(true)
}

pub async fn logs(config: &Config, args: LogsArgs) -> anyhow::Result<()> {
    let mut c = connect(config, &args.client)?;
    let mut live = connect(config, &args.client)?.with_min_protocol(LIVE_OUTPUT_PROTOCOL);
    let id = TaskId(args.id);
    let mut task = get(&mut c, id).await?;
    let json = args.client.output == Output::Json;
    if json && !args.follow {
        return print_json(&task.attempts);
    }
    let mut printed = 0;
    loop {
        let attempts: Vec<Attempt> = task.attempts.iter().skip(printed).cloned().collect();
        for a in attempts {
            if a.outcome.is_some() {
                if json {
                    println!("{}", serde_json::to_string(&a)?);
                } else {
                    print_attempt(&a);
                    if a.output_tail.is_empty() {
                        print_unreported(&mut live, id, &a).await;
                    }
                }
                printed += 1;
                continue;
            }
            // JSON follows ended attempts only; text shows the running one live.
            if !json && show_running(&mut c, &mut live, id, &a, args.follow).await? {
                printed += 1;
            }
            break;
        }
        if !args.follow {
            break;
        }
        task = get(&mut c, id).await?;
        if task.state.is_final() && printed == task.attempts.len() {
            break;
        }
        if printed == task.attempts.len() || json {
            // Polling for the next attempt; the pause paces the reads.
            tokio::time::sleep(POLL_EVERY).await;
        }
    }
    if !json {
        println!("task {} is {}", task.id, task.state.as_str());
    }
    Ok(())
}
