//! `fleet task list|show|cancel|retry|requeue` and `fleet queue stats`.

use anyhow::bail;

use super::TaskCommand;
use super::{connect, format_time_ms, print_json, report, shell_words, ClientArgs, Output};
use crate::config::Config;
use crate::rpc::ReadMode;
use crate::state::{Task, TaskFilter, TaskId, TaskState};

/// Runs one `fleet task` subcommand.
pub async fn task(config: &Config, cmd: TaskCommand) -> anyhow::Result<()> {
    match cmd {
        TaskCommand::List {
            client,
            state,
            queue,
            limit,
            after,
            stale,
        } => {
            let filter = TaskFilter {
                state,
                queue,
                after: after.map(TaskId),
                limit,
            };
            list(config, &client, filter, stale).await
        }
        TaskCommand::Show { client, id, stale } => show(config, &client, id, stale).await,
        TaskCommand::Cancel { client, id } => change_task(config, &client, id, true).await,
        TaskCommand::Retry { client, id } => change_task(config, &client, id, false).await,
        TaskCommand::Requeue { client, id, token } => requeue(config, &client, id, token).await,
    }
}

fn read_mode(stale: bool) -> ReadMode {
    if stale {
        ReadMode::Local
    } else {
        ReadMode::Linearizable
    }
}

/// `fleet task list`.
async fn list(
    config: &Config,
    client: &ClientArgs,
    filter: TaskFilter,
    stale: bool,
) -> anyhow::Result<()> {
    let limit = filter.limit;
    if !(1..=10_000).contains(&limit) {
        bail!("--limit {limit} is not valid: use 1 to 10000");
    }
    if let Some(q) = &filter.queue {
        crate::state::validate_queue_name(q)?;
    }
    let mut c = connect(config, client)?;
    let mode = read_mode(stale);
    let reply = c
        .call(|cl, ctx| {
            let f = filter.clone();
            async move { cl.list_tasks(ctx, f, mode, 0).await }
        })
        .await?;
    if client.output == Output::Json {
        return print_json(&reply);
    }
    if !reply.linearizable {
        eprintln!(
            "(served locally by node {} at applied index {}; may be stale)",
            reply.served_by, reply.applied_index
        );
    }
    println!(
        "{:<10} {:<10} {:<16} {:<24} COMMAND",
        "ID", "STATE", "QUEUE", "SUBMITTED"
    );
    for t in &reply.value {
        println!(
            "{:<10} {:<10} {:<16} {:<24} {}",
            t.id,
            t.state.as_str(),
            t.spec.queue,
            format_time_ms(t.submitted_at_ms),
            shell_words(&t.spec.command)
        );
    }
    Ok(())
}

/// `fleet task show`.
async fn show(config: &Config, client: &ClientArgs, id: u64, stale: bool) -> anyhow::Result<()> {
    let mut c = connect(config, client)?;
    let mode = read_mode(stale);
    let reply = c
        .call(|cl, ctx| async move { cl.get_task(ctx, TaskId(id), mode, 0).await })
        .await?;
    let Some(task) = &reply.value else {
        bail!("task {id} not found");
    };
    if client.output == Output::Json {
        return print_json(&reply);
    }
    if !reply.linearizable {
        eprintln!("(served locally by node {}; may be stale)", reply.served_by);
    }
    print_task(task);
    Ok(())
}

fn print_task(task: &Task) {
    println!("id:         {}", task.id);
    println!("state:      {}", task.state.as_str());
    println!("queue:      {}", task.spec.queue);
    println!("command:    {}", shell_words(&task.spec.command));
    println!("submitted:  {}", format_time_ms(task.submitted_at_ms));
    println!("log index:  {}", task.created_index);
    println!("priority:   {}", task.spec.priority);
    if matches!(task.state, TaskState::Queued | TaskState::Failed) {
        println!("ready at:   {}", format_time_ms(task.ready_at_ms));
    }
    if let Some(f) = task.finished_at_ms {
        println!("finished:   {}", format_time_ms(f));
    }
    println!(
        "timeouts:   execution {}, visibility {} ms",
        task.spec
            .execution_timeout_ms
            .map_or("none".to_string(), |t| format!("{t} ms")),
        task.spec.visibility_timeout_ms
    );
    let r = &task.spec.retry;
    println!(
        "retry:      {} attempts, backoff {} ms x{:.1} up to {} ms",
        r.max_attempts,
        r.backoff_initial_ms,
        f64::from(r.backoff_multiplier_permille) / 1000.0,
        r.backoff_max_ms
    );
    if let Some(k) = &task.spec.idempotency_key {
        println!("idem. key:  {k}");
    }
    for (k, v) in &task.spec.env {
        println!("env:        {k}={v}");
    }
    println!(
        "attempts:   {} of {}",
        task.attempts_used(),
        task.spec.retry.max_attempts
    );
    for a in &task.attempts {
        let ran = a
            .ended_at_ms
            .map(|e| {
                format!(
                    " ran {:.3}s",
                    e.saturating_sub(a.started_at_ms) as f64 / 1000.0
                )
            })
            .unwrap_or_default();
        let outcome = a
            .outcome
            .as_ref()
            .map(|o| o.to_string())
            .unwrap_or_else(|| "running".into());
        let output = if a.output_tail.is_empty() {
            String::new()
        } else {
            format!(
                " ({} bytes of output: fleet logs {})",
                a.output_tail.len(),
                task.id
            )
        };
        println!(
            "  #{} worker {} token {} started {}{ran}: {outcome}{output}",
            a.number,
            a.worker_label(),
            a.fencing_token,
            format_time_ms(a.started_at_ms),
        );
    }
}

/// `task cancel` (`cancel = true`) or `task retry`: makes the change and prints the task's
/// state afterwards.
async fn change_task(
    config: &Config,
    args: &ClientArgs,
    id: u64,
    cancel: bool,
) -> anyhow::Result<()> {
    let mut c = connect(config, args)?;
    let state = c
        .call(|cl, ctx| async move {
            if cancel {
                cl.cancel_task(ctx, TaskId(id), 0).await
            } else {
                cl.retry_task(ctx, TaskId(id), 0).await
            }
        })
        .await?;
    report(
        args,
        &serde_json::json!({"id": id, "state": state}),
        &format!("task {id} is {}", state.as_str()),
    )
}

/// `task requeue`: ends the attempt named by `token` (or the one running now) and prints what
/// became of the task.
async fn requeue(
    config: &Config,
    args: &ClientArgs,
    id: u64,
    token: Option<u64>,
) -> anyhow::Result<()> {
    let mut c = connect(config, args)?.with_min_protocol(crate::rpc::REQUEUE_PROTOCOL);
    let token = match token {
        Some(t) => t,
        None => {
            let task = read_task(&mut c, id).await?;
            match &task.lease {
                Some(l) => l.fencing_token,
                None => bail!(
                    "task {id} is {} and has no running attempt: nothing to requeue",
                    task.state.as_str()
                ),
            }
        }
    };
    let result = c
        .call(|cl, ctx| async move { cl.requeue_task(ctx, TaskId(id), token, 0).await })
        .await;
    let (state, ended) = match result {
        Ok(state) => (state, "ended (requeued)"),
        Err(e) if matches!(e.downcast_ref(), Some(crate::error::Error::StaleToken(_))) => {
            // That attempt is not the live lease. It may have been ended by this very command
            // (a try whose answer was lost, then retried): say what became of it.
            let task = read_task(&mut c, id).await?;
            let ended = task.attempts.iter().find(|a| a.fencing_token == token);
            match ended.and_then(|a| a.outcome.as_ref()) {
                Some(crate::state::AttemptOutcome::Lost { reason })
                    if reason == crate::rpc::REQUEUE_REASON =>
                {
                    (task.state, "had already been ended by a requeue")
                }
                Some(outcome) => bail!(
                    "task {id}: the attempt with fencing token {token} already ended ({outcome}); \
                     nothing was changed. The task is {}{}",
                    task.state.as_str(),
                    running_now(&task)
                ),
                None => bail!(
                    "task {id} has no running attempt with fencing token {token}; nothing was \
                     changed. The task is {}{} (`fleet task show {id}` lists its attempts)",
                    task.state.as_str(),
                    running_now(&task)
                ),
            }
        }
        Err(e) => return Err(e),
    };
    let then = match state {
        TaskState::Failed => {
            "its worker kills the attempt at its next heartbeat, and the task runs again after \
             its retry backoff, no sooner than one visibility timeout from the requeue"
        }
        TaskState::Dead => "it had no attempt left and is dead (`fleet task retry` runs it again)",
        TaskState::Cancelled => "it was cancelled, so it does not run again",
        _ => "it runs again already",
    };
    report(
        args,
        &serde_json::json!({"id": id, "fencing_token": token, "state": state}),
        &format!(
            "task {id}: the attempt with fencing token {token} {ended}; the task is {}: {then}",
            state.as_str()
        ),
    )
}

/// A linearizable read of one task; an error when it does not exist.
async fn read_task(c: &mut crate::client::Client, id: u64) -> anyhow::Result<Task> {
    c.call(|cl, ctx| async move {
        cl.get_task(ctx, TaskId(id), ReadMode::Linearizable, 0)
            .await
    })
    .await?
    .value
    .ok_or_else(|| anyhow::anyhow!("task {id} not found"))
}

/// ", running attempt N (fencing token T)" when the task has a live lease.
fn running_now(task: &Task) -> String {
    match (&task.lease, task.attempts.last()) {
        (Some(l), Some(a)) => format!(
            ", running attempt {} (fencing token {}); requeue it with --token {}",
            a.number, l.fencing_token, l.fencing_token
        ),
        _ => String::new(),
    }
}

/// `fleet queue stats`.
pub async fn queue_stats(config: &Config, client: &ClientArgs, stale: bool) -> anyhow::Result<()> {
    let mut c = connect(config, client)?;
    let mode = read_mode(stale);
    let reply = c
        .call(|cl, ctx| async move { cl.queue_stats(ctx, mode, 0).await })
        .await?;
    if client.output == Output::Json {
        return print_json(&reply);
    }
    let now = crate::clock::system_wall_ms();
    // Every state a task can be in, so a finished demo shows its succeeded tasks.
    println!(
        "{:<16} {:>8} {:>8} {:>8} {:>8} {:>8} {:>10} {:>10} {:>12}",
        "QUEUE",
        "READY",
        "DELAYED",
        "RUNNING",
        "FAILED",
        "DEAD",
        "SUCCEEDED",
        "CANCELLED",
        "OLDEST READY"
    );
    for (q, st) in &reply.value {
        let age = st
            .oldest_ready_since_ms
            .map(|t| format!("{:.1}s", now.saturating_sub(t) as f64 / 1000.0))
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<16} {:>8} {:>8} {:>8} {:>8} {:>8} {:>10} {:>10} {:>12}",
            q,
            st.ready,
            st.delayed,
            st.running,
            st.failed,
            st.dead,
            st.succeeded,
            st.cancelled,
            age
        );
    }
    Ok(())
}
