//! `fleet logs ID [--follow]`: the recorded output of a task's attempts.
//!
//! Workers report the tail of each attempt's output (stdout and stderr, bounded by
//! `worker.output_tail_bytes`) when the attempt ends, and it is replicated with the attempt's
//! record. So `logs` shows ended attempts; `--follow` waits and prints each attempt as it ends,
//! until the task reaches a final state. A running attempt's output is not streamed live.

use anyhow::bail;
use clap::Args;

use super::submit::POLL_EVERY;
use super::{connect, format_time_ms, print_json, ClientArgs, Output};
use crate::config::Config;
use crate::rpc::ReadMode;
use crate::state::{Attempt, Task, TaskId};

#[derive(Args, Debug)]
pub struct LogsArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The task id.
    pub id: u64,
    /// Keep printing attempts as they end, until the task is succeeded, dead or cancelled.
    #[arg(long, short = 'f')]
    pub follow: bool,
}

fn print_attempt(a: &Attempt) {
    let outcome = a
        .outcome
        .as_ref()
        .map(|o| o.to_string())
        .unwrap_or_else(|| "running".into());
    println!(
        "=== attempt {} (worker {}, fencing token {}, started {}): {outcome}",
        a.number,
        a.worker_label(),
        a.fencing_token,
        format_time_ms(a.started_at_ms)
    );
    if !a.output_tail.is_empty() {
        print!("{}", a.output_tail);
        if !a.output_tail.ends_with('\n') {
            println!();
        }
    }
}

async fn get(c: &mut crate::client::Client, id: TaskId) -> anyhow::Result<Task> {
    let reply = c
        .call(move |cl, ctx| async move { cl.get_task(ctx, id, ReadMode::Linearizable, 0).await })
        .await?;
    match reply.value {
        Some(t) => Ok(t),
        None => bail!("task {id} not found"),
    }
}

pub async fn logs(config: &Config, args: LogsArgs) -> anyhow::Result<()> {
    let mut c = connect(config, &args.client)?;
    let id = TaskId(args.id);
    let mut task = get(&mut c, id).await?;
    if args.client.output == Output::Json && !args.follow {
        return print_json(&task.attempts);
    }
    let mut printed = 0;
    loop {
        for a in task.attempts.iter().skip(printed) {
            if a.outcome.is_none() {
                break;
            }
            if args.client.output == Output::Json {
                println!("{}", serde_json::to_string(a)?);
            } else {
                print_attempt(a);
            }
            printed += 1;
        }
        if !args.follow || task.state.is_final() {
            break;
        }
        // Polling for the next ended attempt; the pause paces the reads.
        tokio::time::sleep(POLL_EVERY).await;
        task = get(&mut c, id).await?;
    }
    if args.client.output == Output::Text {
        if let Some(running) = task.attempts.iter().find(|a| a.outcome.is_none()) {
            println!(
                "=== attempt {} is running (its output is recorded when it ends)",
                running.number
            );
        }
        println!("task {} is {}", task.id, task.state.as_str());
    }
    Ok(())
}
