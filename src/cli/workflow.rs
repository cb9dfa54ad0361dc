//! Workflow definition files (TOML), read by the CLI before anything reaches the cluster.
//!
//! ```toml
//! name = "etl"
//! max_active_runs = 1
//! [defaults]            # task options every task starts from
//! queue = "default"
//! [tasks.extract]
//! command = ["sh", "-c", "extract.sh"]
//! [tasks.transform]
//! command = ["sh", "-c", "transform.sh"]
//! after = ["extract"]
//! [tasks.load]
//! command = ["sh", "-c", "load.sh"]
//! after = ["transform"]
//! trigger = "all_success"
//! ```
//!
//! Every key is checked (an unknown one is refused with its name), durations are written as
//! for `fleet submit` (`30s`, `1h`), and the graph is checked as the state machine will check
//! it again ([`crate::state::workflows::Graph`]): an unknown upstream, a cycle (with its
//! path), more than the stated limits. A task name defined twice is refused by the TOML
//! parser itself (a duplicate table).

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};

use serde::Deserialize;

use super::submit::{merge, parse_duration_ms, parse_env, parse_key};
use super::{connect, format_time_ms, print_json, shell_words, ClientArgs, Output};
use crate::config::Config;
use crate::rpc::schedules::ScheduleDef;
use crate::rpc::workflows::{
    node_state_name, RunFilter, RunView, WorkflowOp, WorkflowOutcome, WorkflowView, MAX_RUN_LIST,
};
use crate::rpc::{NewTask, ReadMode};
use crate::state::runs::MAX_ACTIVE_RUNS;
use crate::state::workflows::NodeState;
use crate::state::workflows::{Graph, TriggerRule};
use crate::state::{PutChange, RequestId, RunId, RunStatus};

pub use crate::rpc::workflows::{WorkflowDef, WorkflowTaskDef};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    name: String,
    max_active_runs: Option<u32>,
    #[serde(default)]
    defaults: Options,
    /// Each task's table: `command`, `after` and `trigger`, then the keys of [`Options`].
    #[serde(default)]
    tasks: BTreeMap<String, toml::Table>,
    schedule: Option<FileSchedule>,
}

/// The `[schedule]` table: when runs start (the timing keys of a schedule file; a run per
/// tick, so no overlap policy or jitter: `max_active_runs` bounds the runs at once).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSchedule {
    cron: Option<String>,
    every: Option<String>,
    timezone: Option<String>,
    start_at: Option<String>,
    end_at: Option<String>,
    catchup: Option<String>,
    catchup_window: Option<String>,
}

impl FileSchedule {
    fn def(&self, name: &str) -> Result<ScheduleDef, String> {
        if self.cron.is_none() == self.every.is_none() {
            return Err("[schedule] needs either cron = \"EXPR\" or every = \"DURATION\"".into());
        }
        let at = |e: String| format!("[schedule] {e}");
        let time = |key: &str, v: &Option<String>| {
            parse_key(key, v, super::schedule::parse_time_arg).map_err(at)
        };
        Ok(ScheduleDef {
            name: name.to_string(),
            cron: self.cron.clone(),
            every_ms: parse_key("every", &self.every, super::schedule::parse_every).map_err(at)?,
            timezone: self.timezone.clone(),
            start_at_ms: time("start_at", &self.start_at)?,
            end_at_ms: time("end_at", &self.end_at)?,
            catchup: parse_key("catchup", &self.catchup, str::parse).map_err(at)?,
            catchup_window_ms: parse_key("catchup_window", &self.catchup_window, parse_duration_ms)
                .map_err(at)?,
            ..ScheduleDef::default()
        })
    }
}

/// The task options of a file, for `[defaults]` and each task.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Options {
    queue: Option<String>,
    priority: Option<i32>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    max_attempts: Option<u32>,
    backoff_initial: Option<String>,
    backoff_max: Option<String>,
    backoff_multiplier: Option<f64>,
    timeout: Option<String>,
    visibility_timeout: Option<String>,
    pool: Option<String>,
    pool_slots: Option<u32>,
}

impl Options {
    /// The options as a task without a command; errors name the key.
    fn new_task(&self) -> Result<NewTask, String> {
        let dur = |key: &str, v: &Option<String>| parse_key(key, v, parse_duration_ms);
        for k in self.env.keys() {
            parse_env(&format!("{k}=x")).map_err(|e| format!("env: {e}"))?;
        }
        Ok(NewTask {
            queue: self.queue.clone(),
            priority: self.priority,
            env: self.env.clone(),
            max_attempts: self.max_attempts,
            backoff_initial_ms: dur("backoff_initial", &self.backoff_initial)?,
            backoff_max_ms: dur("backoff_max", &self.backoff_max)?,
            backoff_multiplier: self.backoff_multiplier,
            timeout_ms: dur("timeout", &self.timeout)?,
            visibility_timeout_ms: dur("visibility_timeout", &self.visibility_timeout)?,
            pool: self.pool.clone(),
            pool_slots: self.pool_slots,
            ..NewTask::default()
        })
    }
}

/// A task's table, split.
struct TaskTable {
    command: Vec<String>,
    after: Vec<String>,
    trigger: Option<String>,
    options: Options,
}

/// Splits a task's table into its command, upstream tasks, trigger and options (whose
/// unknown keys are refused by name, as everywhere in the file).
fn split_task(mut t: toml::Table) -> Result<TaskTable, String> {
    fn take<T: serde::de::DeserializeOwned>(
        t: &mut toml::Table,
        key: &str,
    ) -> Result<Option<T>, String> {
        t.remove(key)
            .map(|v| v.try_into().map_err(|e| format!("{key}: {e}")))
            .transpose()
    }
    let command: Vec<String> = take(&mut t, "command")?.ok_or("command is missing")?;
    let after: Vec<String> = take(&mut t, "after")?.unwrap_or_default();
    let trigger: Option<String> = take(&mut t, "trigger")?;
    let options: Options = toml::Value::Table(t)
        .try_into()
        .map_err(|e: toml::de::Error| e.message().to_string())?;
    Ok(TaskTable {
        command,
        after,
        trigger,
        options,
    })
}

/// Parses and checks a workflow file's text; errors say which task and key are wrong.
pub fn parse_workflow(text: &str) -> Result<WorkflowDef, String> {
    let file: File = toml::from_str(text).map_err(|e| e.to_string())?;
    crate::state::workflows::check_workflow_name(&file.name).map_err(|e| e.to_string())?;
    if file.tasks.is_empty() {
        return Err("the workflow has no task: add at least one [tasks.NAME] table".into());
    }
    if let Some(n) = file.max_active_runs {
        if !(1..=MAX_ACTIVE_RUNS).contains(&n) {
            return Err(format!(
                "max_active_runs = {n} is not valid: use 1 to {MAX_ACTIVE_RUNS}"
            ));
        }
    }
    let defaults = file
        .defaults
        .new_task()
        .map_err(|e| format!("[defaults] {e}"))?;
    let mut tasks = BTreeMap::new();
    for (name, t) in file.tasks {
        let at = |e: String| format!("task {name:?}: {e}");
        let TaskTable {
            command,
            after,
            trigger,
            options,
        } = split_task(t).map_err(at)?;
        if command.first().is_none_or(|p| p.is_empty()) {
            return Err(at(
                "command is empty: give a program and its arguments".into()
            ));
        }
        let trigger = trigger
            .as_deref()
            .map(TriggerRule::parse)
            .transpose()
            .map_err(at)?
            .unwrap_or_default();
        let own = options.new_task().map_err(at)?;
        let task = merge(NewTask { command, ..own }, &defaults);
        if let Some(q) = &task.queue {
            crate::state::validate_queue_name(q).map_err(|e| at(format!("queue: {e}")))?;
        }
        tasks.insert(
            name,
            WorkflowTaskDef {
                task,
                after,
                trigger,
            },
        );
    }
    let edges: BTreeMap<String, Vec<String>> = tasks
        .iter()
        .map(|(n, t)| (n.clone(), t.after.clone()))
        .collect();
    Graph::new(&edges).map_err(|e| e.to_string())?;
    let schedule = file
        .schedule
        .as_ref()
        .map(|s| s.def(&file.name))
        .transpose()?;
    Ok(WorkflowDef {
        name: file.name,
        max_active_runs: file.max_active_runs,
        tasks,
        schedule,
    })
}

/// `fleet workflow ...`.
#[derive(clap::Subcommand, Debug)]
pub enum WorkflowCommand {
    /// Check a workflow file and print its graph in topological layers. Reads the file only:
    /// nothing is sent to the cluster.
    Validate {
        /// The workflow file (TOML).
        file: PathBuf,
    },
    /// Check a workflow file and store it (replicated): a new workflow, or a new version of
    /// one (runs in progress keep the version they started with).
    Apply {
        #[command(flatten)]
        client: ClientArgs,
        /// The workflow file (TOML).
        file: PathBuf,
    },
    /// List the workflows (linearizable unless --stale).
    List {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long)]
        stale: bool,
    },
    /// Show a workflow: its graph in topological layers, schedule and run counts.
    Show {
        #[command(flatten)]
        client: ClientArgs,
        name: String,
        #[arg(long)]
        stale: bool,
    },
    /// Delete a workflow and its schedule. Runs in progress go on; queued runs are cancelled.
    Delete {
        #[command(flatten)]
        client: ClientArgs,
        name: String,
    },
    /// Start a run (queued while the workflow has max_active_runs runs going). Prints the
    /// run's id. Every task of the run gets FLEET_RUN_ID, FLEET_WORKFLOW, FLEET_TASK_NAME and
    /// FLEET_PARAM_<K> for each --param.
    Run {
        #[command(flatten)]
        client: ClientArgs,
        name: String,
        /// A run parameter, K=V (repeatable): the tasks see it as FLEET_PARAM_K.
        #[arg(long = "param", value_name = "K=V", value_parser = parse_param)]
        params: Vec<(String, String)>,
        /// Wait for the run to end; exit 0 if it succeeded, 1 if not.
        #[arg(long)]
        wait: bool,
    },
    /// A run for each past tick of the workflow's schedule in a range that has none (Airflow's
    /// backfill): queued behind max_active_runs, oldest first, each with its FLEET_FIRE_TIME.
    Backfill {
        #[command(flatten)]
        client: ClientArgs,
        name: String,
        /// The first fire time to consider (RFC 3339, e.g. `2026-12-01T00:00:00Z`).
        #[arg(long, value_name = "TIME", value_parser = super::schedule::parse_time_arg)]
        from: u64,
        /// The last fire time to consider (RFC 3339, or `now`).
        #[arg(long, value_name = "TIME", value_parser = super::schedule::parse_time_arg)]
        to: u64,
    },
}

/// `fleet run ...`: runs of workflows.
#[derive(clap::Subcommand, Debug)]
pub enum RunCommand {
    /// List runs, newest first (linearizable unless --stale).
    List {
        #[command(flatten)]
        client: ClientArgs,
        /// Only runs of this workflow.
        #[arg(long)]
        workflow: Option<String>,
        /// Only runs in this state (queued, running, succeeded, failed, cancelled).
        #[arg(long)]
        state: Option<RunStatus>,
        /// At most this many runs (1 to 1000).
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Only runs older than this run (for paging: the last id of the previous page).
        #[arg(long, value_name = "RUN")]
        before: Option<u64>,
        #[arg(long)]
        stale: bool,
    },
    /// Show a run: every task with its state, attempts and duration, as a graph (coloured by
    /// state on a terminal).
    Show {
        #[command(flatten)]
        client: ClientArgs,
        run: u64,
        #[arg(long)]
        stale: bool,
    },
    /// Cancel a run: running attempts are killed at their worker's next heartbeat, the other
    /// tasks never start.
    Cancel {
        #[command(flatten)]
        client: ClientArgs,
        run: u64,
    },
    /// Run a finished run's failed tasks again (Airflow's "clear"): failed, upstream_failed,
    /// skipped and cancelled tasks and everything downstream of them; succeeded tasks keep
    /// their results.
    Retry {
        #[command(flatten)]
        client: ClientArgs,
        run: u64,
        /// Only failed and upstream_failed tasks (and their downstream), not skipped or
        /// cancelled ones.
        #[arg(long)]
        failed_only: bool,
    },
}

fn parse_param(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not a parameter: use K=V"))?;
    let ok = !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !ok {
        return Err(format!(
            "parameter name {k:?} is not valid: use letters, digits and '_'"
        ));
    }
    Ok((k.to_string(), v.to_string()))
}

pub async fn workflow(config: &Config, cmd: WorkflowCommand) -> anyhow::Result<()> {
    match cmd {
        WorkflowCommand::Validate { file } => {
            let def = read_workflow_file(&file)?;
            print!("{}", render_graph(&def));
            Ok(())
        }
        WorkflowCommand::Apply { client, file } => {
            let def = read_workflow_file(&file)?;
            let name = def.name.clone();
            let out = send(config, &client, WorkflowOp::Apply(Box::new(def))).await?;
            let WorkflowOutcome::Saved { change, .. } = &out else {
                bail!("unexpected answer: {out:?}");
            };
            let what = match change {
                PutChange::Created => "created",
                PutChange::Updated => "updated",
                PutChange::Unchanged => "unchanged",
            };
            done(&client, &out, &format!("workflow {name} {what}"))
        }
        WorkflowCommand::Delete { client, name } => {
            let out = send(config, &client, WorkflowOp::Delete(name.clone())).await?;
            done(&client, &out, &format!("workflow {name} deleted"))
        }
        WorkflowCommand::Run {
            client,
            name,
            params,
            wait,
        } => {
            let op = WorkflowOp::Run {
                workflow: name,
                params,
                request_id: RequestId(rand::random()),
            };
            let out = send(config, &client, op).await?;
            let WorkflowOutcome::Started { run, .. } = out else {
                bail!("unexpected answer: {out:?}");
            };
            if !wait {
                return done(&client, &out, &run.to_string());
            }
            let view = wait_for_run(config, &client, run).await?;
            if client.output == Output::Json {
                print_json(&view)?;
            } else {
                println!("run {run} {}", view.status.as_str());
            }
            if view.status != RunStatus::Succeeded {
                std::process::exit(1);
            }
            Ok(())
        }
        WorkflowCommand::Backfill {
            client,
            name,
            from,
            to,
        } => {
            let op = WorkflowOp::Backfill {
                workflow: name.clone(),
                from_ms: from,
                to_ms: to,
            };
            let out = send(config, &client, op).await?;
            let WorkflowOutcome::Backfilled { created, existing } = &out else {
                bail!("unexpected answer: {out:?}");
            };
            let mut text = format!(
                "workflow {name}: {} runs created, {existing} ticks had a run already",
                created.len()
            );
            for (fire, run) in created {
                text.push_str(&format!("\n  {}  run {run}", format_time_ms(*fire)));
            }
            done(&client, &out, &text)
        }
        WorkflowCommand::List { client, stale } => {
            let views = read_workflows(config, &client, None, stale).await?;
            if client.output == Output::Json {
                return print_json(&views);
            }
            println!(
                "{:<24} {:>5} {:>7} {:>6} {:>7} {:>9} {:>7} {:<24}",
                "NAME", "TASKS", "VERSION", "ACTIVE", "QUEUED", "SUCCEEDED", "FAILED", "SCHEDULE"
            );
            for v in &views {
                let w = &v.workflow;
                println!(
                    "{:<24} {:>5} {:>7} {:>6} {:>7} {:>9} {:>7} {:<24}",
                    w.name,
                    w.spec.nodes.len(),
                    w.version,
                    w.active.len(),
                    w.queued.len(),
                    w.counts.succeeded,
                    w.counts.failed,
                    v.schedule.as_ref().map_or("-".into(), |(t, paused, _)| {
                        format!("{t}{}", if *paused { " (paused)" } else { "" })
                    })
                );
            }
            Ok(())
        }
        WorkflowCommand::Show {
            client,
            name,
            stale,
        } => {
            let views = read_workflows(config, &client, Some(name), stale).await?;
            let v = views.first().context("the cluster returned no workflow")?;
            if client.output == Output::Json {
                return print_json(v);
            }
            print_workflow(v);
            Ok(())
        }
    }
}

pub async fn run(config: &Config, cmd: RunCommand) -> anyhow::Result<()> {
    match cmd {
        RunCommand::List {
            client,
            workflow,
            state,
            limit,
            before,
            stale,
        } => {
            if !(1..=MAX_RUN_LIST).contains(&limit) {
                bail!("--limit {limit} is not valid: use 1 to {MAX_RUN_LIST}");
            }
            let filter = RunFilter {
                run: None,
                workflow,
                status: state,
                limit,
                before: before.map(RunId),
            };
            let views = read_runs(config, &client, filter, stale).await?;
            if client.output == Output::Json {
                return print_json(&views);
            }
            println!(
                "{:>6} {:<24} {:<10} {:<21} {:>10}  TASKS",
                "RUN", "WORKFLOW", "STATE", "STARTED", "DURATION"
            );
            for v in &views {
                let counts: Vec<String> = v
                    .counts
                    .iter()
                    .map(|(s, n)| format!("{n} {}", node_state_name(*s)))
                    .collect();
                println!(
                    "{:>6} {:<24} {:<10} {:<21} {:>10}  {}",
                    v.id,
                    v.workflow,
                    v.status.as_str(),
                    v.started_at_ms.map_or("-".into(), format_time_ms),
                    run_duration(v),
                    counts.join(", ")
                );
            }
            Ok(())
        }
        RunCommand::Show { client, run, stale } => {
            let filter = RunFilter {
                run: Some(RunId(run)),
                ..Default::default()
            };
            let views = read_runs(config, &client, filter, stale).await?;
            let v = views.first().context("the cluster returned no run")?;
            if client.output == Output::Json {
                return print_json(v);
            }
            let color = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
            print!("{}", render_run(v, color));
            Ok(())
        }
        RunCommand::Cancel { client, run } => {
            let out = send(config, &client, WorkflowOp::Cancel(RunId(run))).await?;
            done(&client, &out, &format!("run {run} cancelled"))
        }
        RunCommand::Retry {
            client,
            run,
            failed_only,
        } => {
            let op = WorkflowOp::Retry {
                run: RunId(run),
                failed_only,
            };
            let out = send(config, &client, op).await?;
            let WorkflowOutcome::Updated { status, .. } = &out else {
                bail!("unexpected answer: {out:?}");
            };
            done(&client, &out, &format!("run {run} is {}", status.as_str()))
        }
    }
}

fn done(client: &ClientArgs, out: &WorkflowOutcome, text: &str) -> anyhow::Result<()> {
    if client.output == Output::Json {
        print_json(out)
    } else {
        println!("{text}");
        Ok(())
    }
}

async fn send(
    config: &Config,
    client: &ClientArgs,
    op: WorkflowOp,
) -> anyhow::Result<WorkflowOutcome> {
    let mut c = connect(config, client)?;
    let mut out = c
        .call(|cl, ctx| {
            let op = op.clone();
            async move { cl.workflow_ops(ctx, vec![op], 0).await }
        })
        .await?;
    Ok(out.pop().context("the cluster returned no answer")??)
}

fn mode(stale: bool) -> ReadMode {
    if stale {
        ReadMode::Local
    } else {
        ReadMode::Linearizable
    }
}

async fn read_workflows(
    config: &Config,
    client: &ClientArgs,
    name: Option<String>,
    stale: bool,
) -> anyhow::Result<Vec<WorkflowView>> {
    let mut c = connect(config, client)?;
    let mode = mode(stale);
    let reply = c
        .call(|cl, ctx| {
            let name = name.clone();
            async move { cl.get_workflows(ctx, name, mode, 0).await }
        })
        .await?;
    Ok(reply.value)
}

async fn read_runs(
    config: &Config,
    client: &ClientArgs,
    filter: RunFilter,
    stale: bool,
) -> anyhow::Result<Vec<RunView>> {
    let mut c = connect(config, client)?;
    let mode = mode(stale);
    let reply = c
        .call(|cl, ctx| {
            let filter = filter.clone();
            async move { cl.get_runs(ctx, filter, mode, 0).await }
        })
        .await?;
    Ok(reply.value)
}

/// Polls the run until it ends (`workflow run --wait`).
async fn wait_for_run(config: &Config, client: &ClientArgs, run: RunId) -> anyhow::Result<RunView> {
    loop {
        let filter = RunFilter {
            run: Some(run),
            ..Default::default()
        };
        let mut views = read_runs(config, client, filter, false).await?;
        let v = views.pop().context("the cluster returned no run")?;
        if v.status.is_final() {
            return Ok(v);
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

fn run_duration(v: &RunView) -> String {
    match (v.started_at_ms, v.ended_at_ms) {
        (Some(s), Some(e)) => human_ms(e.saturating_sub(s)),
        _ => "-".into(),
    }
}

fn human_ms(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms}ms")
    } else {
        humantime::format_duration(std::time::Duration::from_millis(ms / 100 * 100)).to_string()
    }
}

fn print_workflow(v: &WorkflowView) {
    let w = &v.workflow;
    println!("name:            {}", w.name);
    println!("version:         {}", w.version);
    println!("max_active_runs: {}", w.spec.max_active_runs);
    match &v.schedule {
        Some((trigger, paused, next)) => {
            let next: Vec<String> = next.iter().map(|f| format_time_ms(*f)).collect();
            println!(
                "schedule:        {trigger}{}",
                if *paused { " (paused)" } else { "" }
            );
            if !next.is_empty() {
                println!("next runs:       {}", next.join(", "));
            }
        }
        None => println!("schedule:        none (runs start with `fleet workflow run`)"),
    }
    let c = &w.counts;
    println!(
        "runs:            {} active, {} queued; {} started, {} succeeded, {} failed, {} cancelled",
        w.active.len(),
        w.queued.len(),
        c.started,
        c.succeeded,
        c.failed,
        c.cancelled
    );
    let triggers: Vec<TriggerRule> = w.spec.nodes.iter().map(|n| n.trigger).collect();
    print!(
        "{}",
        render_layers(&w.name, &w.spec.graph, &triggers, &|n| {
            let t = &w.spec.nodes[n].task;
            format!("  [{}] {}", t.queue, shell_words(t.command.iter()))
        })
    );
}

/// The run's tasks in topological layers, each with its state, task, attempts and duration;
/// `color` paints the state (green succeeded, red failed, yellow upstream_failed, ...).
pub fn render_run(v: &RunView, color: bool) -> String {
    let mut out = format!(
        "run:       {} (workflow {} v{})
",
        v.id, v.workflow, v.version
    );
    out.push_str(&format!(
        "state:     {}
",
        v.status.as_str()
    ));
    if let Some(f) = v.fire_ms {
        out.push_str(&format!(
            "fire time: {}
",
            format_time_ms(f)
        ));
    }
    for (k, val) in &v.params {
        out.push_str(&format!(
            "param:     {k}={val}
"
        ));
    }
    out.push_str(&format!(
        "started:   {}   duration {}{}
",
        v.started_at_ms.map_or("-".into(), format_time_ms),
        run_duration(v),
        if v.retries > 0 {
            format!("   retried {} times", v.retries)
        } else {
            String::new()
        }
    ));
    let mut after: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for n in &v.nodes {
        after.insert(n.name.clone(), n.after.clone());
    }
    let Ok(graph) = Graph::new(&after) else {
        return out;
    };
    for (i, layer) in graph.layers().iter().enumerate() {
        out.push_str(&format!(
            "layer {}:
",
            i + 1
        ));
        for &node in layer {
            let n = &v.nodes[node];
            let state = node_state_name(n.state);
            let painted = if color {
                let code = match n.state {
                    NodeState::Succeeded => "32",
                    NodeState::Failed => "31",
                    NodeState::UpstreamFailed => "33",
                    NodeState::Started => "36",
                    NodeState::Skipped | NodeState::Cancelled => "35",
                    NodeState::Waiting => "2",
                };
                format!("\x1b[{code}m{state:<15}\x1b[0m")
            } else {
                format!("{state:<15}")
            };
            let took = match (n.started_at_ms, n.ended_at_ms) {
                (Some(s), Some(e)) => human_ms(e.saturating_sub(s)),
                _ => "-".into(),
            };
            out.push_str(&format!(
                "  {:<20} {painted} {:<10} {:>8} {:>9}{}\n",
                n.name,
                n.task.map_or("-".into(), |t| format!("task {t}")),
                format!("{} att.", n.attempts),
                took,
                if n.after.is_empty() {
                    String::new()
                } else {
                    format!("  after {}", n.after.join(", "))
                }
            ));
        }
    }
    out
}

/// The graph of a workflow file in topological layers (`workflow validate`): each task with
/// its upstream tasks and any trigger rule other than the default.
pub fn render_graph(def: &WorkflowDef) -> String {
    let edges: BTreeMap<String, Vec<String>> = def
        .tasks
        .iter()
        .map(|(n, t)| (n.clone(), t.after.clone()))
        .collect();
    let graph = match Graph::new(&edges) {
        Ok(g) => g,
        Err(e) => return format!("{e}\n"),
    };
    let triggers: Vec<TriggerRule> = graph.names.iter().map(|n| def.tasks[n].trigger).collect();
    render_layers(&def.name, &graph, &triggers, &|_| String::new())
}

/// `workflow NAME: N tasks, E edges, L layers`, then each layer's tasks with their upstream
/// tasks, non-default trigger rule and `extra`.
fn render_layers(
    name: &str,
    graph: &Graph,
    triggers: &[TriggerRule],
    extra: &dyn Fn(usize) -> String,
) -> String {
    let layers = graph.layers();
    let edge_count: usize = graph.upstream.iter().map(Vec::len).sum();
    let count = |n: usize, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
    let mut out = format!(
        "workflow {}: {}, {}, {}\n",
        name,
        count(graph.names.len(), "task"),
        count(edge_count, "edge"),
        count(layers.len(), "layer")
    );
    for (i, layer) in layers.iter().enumerate() {
        out.push_str(&format!("layer {}:\n", i + 1));
        for &node in layer {
            out.push_str(&format!("  {}", graph.names[node]));
            if !graph.upstream[node].is_empty() {
                let ups: Vec<&str> = graph.upstream[node]
                    .iter()
                    .map(|&u| graph.names[u].as_str())
                    .collect();
                out.push_str(&format!("  after {}", ups.join(", ")));
            }
            if triggers[node] != TriggerRule::default() {
                out.push_str(&format!("  (trigger {})", triggers[node].as_str()));
            }
            out.push_str(&extra(node));
            out.push('\n');
        }
    }
    out
}

/// Reads and checks a workflow file; errors name the file.
pub fn read_workflow_file(path: &Path) -> anyhow::Result<WorkflowDef> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read workflow file {}: {e}", path.display()))?;
    parse_workflow(&text).map_err(|e| anyhow::anyhow!("workflow file {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ETL: &str = r#"
name = "etl"
[defaults]
queue = "default"
[tasks.extract]
command = ["sh", "-c", "extract.sh"]
[tasks.transform]
command = ["sh", "-c", "transform.sh"]
after = ["extract"]
[tasks.load]
command = ["sh", "-c", "load.sh"]
after = ["transform"]
trigger = "all_success"
"#;

    fn refused(text: &str) -> String {
        parse_workflow(text).expect_err("refused")
    }

    #[test]
    fn the_issue_s_example_parses_with_defaults_filled_in() {
        let w = parse_workflow(ETL).expect("valid");
        assert_eq!(w.name, "etl");
        assert_eq!(w.tasks.len(), 3);
        let load = &w.tasks["load"];
        assert_eq!(load.after, vec!["transform"]);
        assert_eq!(load.trigger, TriggerRule::AllSuccess);
        assert_eq!(load.task.queue.as_deref(), Some("default"));
        assert_eq!(load.task.command, vec!["sh", "-c", "load.sh"]);
    }

    #[test]
    fn the_graph_is_printed_in_layers() {
        let w = parse_workflow(&ETL.replace("trigger = \"all_success\"", "trigger = \"all_done\""))
            .expect("valid");
        assert_eq!(
            render_graph(&w),
            "workflow etl: 3 tasks, 2 edges, 3 layers\n\
             layer 1:\n  extract\n\
             layer 2:\n  transform  after extract\n\
             layer 3:\n  load  after transform  (trigger all_done)\n"
        );
    }

    #[test]
    fn a_task_s_own_options_win_over_the_defaults() {
        let w = parse_workflow(
            r#"
name = "w"
max_active_runs = 2
[defaults]
queue = "q1"
timeout = "10m"
env = { A = "1", B = "1" }
[tasks.a]
command = ["true"]
queue = "q2"
env = { B = "2" }
"#,
        )
        .expect("valid");
        let a = &w.tasks["a"].task;
        assert_eq!(a.queue.as_deref(), Some("q2"));
        assert_eq!(a.timeout_ms, Some(600_000));
        assert_eq!(a.env.get("A").map(String::as_str), Some("1"));
        assert_eq!(a.env.get("B").map(String::as_str), Some("2"));
        assert_eq!(w.max_active_runs, Some(2));
    }

    #[test]
    fn bad_files_are_refused_with_what_is_wrong() {
        let cycle = format!("{ETL}\n[tasks.again]\ncommand = [\"true\"]\nafter = [\"load\"]\n")
            .replace(
                "[tasks.extract]\ncommand = [\"sh\", \"-c\", \"extract.sh\"]",
                "[tasks.extract]\ncommand = [\"sh\", \"-c\", \"extract.sh\"]\nafter = [\"again\"]",
            );
        let e = refused(&cycle);
        assert!(
            e.contains("cycle: again -> extract -> transform -> load -> again"),
            "{e}"
        );
        let e = refused(&ETL.replace("after = [\"extract\"]", "after = [\"extrakt\"]"));
        assert!(e.contains("\"transform\" runs after \"extrakt\""), "{e}");
        let e = refused(&format!("{ETL}\n[tasks.load]\ncommand = [\"true\"]\n"));
        assert!(e.contains("duplicate") && e.contains("load"), "{e}");
        let e = refused(&ETL.replace("trigger = \"all_success\"", "triger = \"all_success\""));
        assert!(e.contains("task \"load\"") && e.contains("triger"), "{e}");
        let e = refused(&format!("{ETL}\n[tasks.nothing]\nafter = [\"load\"]\n"));
        assert!(e.contains("task \"nothing\": command is missing"), "{e}");
        let e = refused(&ETL.replace("name = \"etl\"", "name = \"etl\"\nretries = 3"));
        assert!(e.contains("retries"), "{e}");
        let e = refused(&ETL.replace("all_success", "none_failed"));
        assert!(
            e.contains("task \"load\"") && e.contains("none_failed"),
            "{e}"
        );
        let e = refused(&ETL.replace(
            "[defaults]\nqueue = \"default\"",
            "[defaults]\ntimeout = \"soon\"",
        ));
        assert!(
            e.contains("[defaults] timeout") && e.contains("\"soon\""),
            "{e}"
        );
        let e = refused("name = \"empty\"\n");
        assert!(e.contains("no task"), "{e}");
        let e = refused(&ETL.replace("command = [\"sh\", \"-c\", \"load.sh\"]", "command = []"));
        assert!(e.contains("task \"load\": command is empty"), "{e}");
        let e = refused(&format!("max_active_runs = 0\n{ETL}"));
        assert!(e.contains("max_active_runs = 0"), "{e}");
    }

    #[test]
    fn a_ten_thousand_task_file_is_accepted_and_one_more_is_refused_with_the_limit() {
        let mut text = String::from("name = \"big\"\n");
        for i in 0..crate::state::workflows::MAX_WORKFLOW_TASKS {
            text.push_str(&format!("[tasks.t{i}]\ncommand = [\"true\"]\n"));
            if i > 0 {
                text.push_str(&format!("after = [\"t{}\"]\n", i - 1));
            }
        }
        assert_eq!(parse_workflow(&text).expect("accepted").tasks.len(), 10_000);
        text.push_str("[tasks.extra]\ncommand = [\"true\"]\n");
        assert!(refused(&text).contains("at most 10000 tasks"));
    }

    /// docs/workflows.md shows docs/examples/etl.workflow.toml as it is, and the graph
    /// `workflow validate` prints for it.
    #[test]
    fn the_documented_example_is_the_example_file_and_its_graph() {
        let root = env!("CARGO_MANIFEST_DIR");
        let file =
            std::fs::read_to_string(format!("{root}/docs/examples/etl.workflow.toml")).unwrap();
        let doc = std::fs::read_to_string(format!("{root}/docs/workflows.md")).unwrap();
        let body = &file[file.find("name = ").unwrap()..];
        assert!(
            doc.contains(body),
            "docs/workflows.md does not show the example as it is"
        );
        let def = parse_workflow(&file).expect("the example is valid");
        assert!(def.schedule.is_some());
        assert!(doc.contains(&render_graph(&def)), "{}", render_graph(&def));
    }

    #[test]
    fn a_run_is_shown_in_layers_coloured_by_state_only_when_asked() {
        use crate::rpc::workflows::NodeView;
        let node = |name: &str, after: &[&str], state: NodeState, task: Option<u64>| NodeView {
            name: name.into(),
            after: after.iter().map(|s| s.to_string()).collect(),
            trigger: TriggerRule::AllSuccess,
            state,
            task: task.map(crate::state::TaskId),
            task_state: None,
            attempts: u32::from(task.is_some()),
            started_at_ms: task.map(|_| 1_000),
            ended_at_ms: task.map(|_| 1_250),
        };
        let v = RunView {
            id: RunId(3),
            workflow: "etl".into(),
            version: 2,
            status: RunStatus::Failed,
            params: vec![("DAY".into(), "monday".into())],
            fire_ms: None,
            created_at_ms: 0,
            started_at_ms: Some(1_000),
            ended_at_ms: Some(2_000),
            retries: 0,
            counts: vec![],
            nodes: vec![
                node("extract", &[], NodeState::Succeeded, Some(7)),
                node("load", &["transform"], NodeState::UpstreamFailed, None),
                node("transform", &["extract"], NodeState::Failed, Some(8)),
            ],
        };
        let plain = render_run(&v, false);
        assert!(!plain.contains('\x1b'), "{plain}");
        for line in [
            "run:       3 (workflow etl v2)",
            "state:     failed",
            "param:     DAY=monday",
            "layer 1:\n  extract              succeeded       task 7",
            "layer 3:\n  load                 upstream_failed -",
        ] {
            assert!(plain.contains(line), "{line:?} in\n{plain}");
        }
        let coloured = render_run(&v, true);
        assert!(coloured.contains("\x1b[31mfailed"), "{coloured}");
        assert!(coloured.contains("\x1b[32msucceeded"), "{coloured}");
        assert!(coloured.contains("\x1b[33mupstream_failed"), "{coloured}");
    }
}
