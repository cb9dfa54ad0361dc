//! `fleet schedule` and `fleet pool`: create, change and inspect schedules and pools.
//!
//! Every subcommand takes `--output json`. Changes go to the leader (through any replica);
//! `list`, `show` and `pool list` are linearizable unless `--stale`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use clap::{Args, Subcommand};
use serde::Deserialize;

use super::submit::{parse_duration_ms, parse_env, parse_key, TaskOptions};
use super::{connect, format_time_ms, print_json, shell_words, ClientArgs, Output};
use crate::config::Config;
use crate::rpc::schedules::{OpOutcome, ScheduleDef, ScheduleOp, ScheduleView};
use crate::rpc::{NewTask, ReadMode};
use crate::state::{CatchupPolicy, OverlapPolicy, RequestId, RunKind, TickResult, Trigger};

#[derive(Subcommand, Debug)]
pub enum ScheduleCommand {
    /// Create a schedule: `fleet schedule create NAME (--cron EXPR | --every DURATION)
    /// [options] -- CMD ARGS...`.
    Create(ScheduleArgs),
    /// Change the given options of a schedule; the others stay as they are.
    Update(ScheduleArgs),
    /// Every schedule with its next fire time and tick counts.
    List {
        #[command(flatten)]
        client: ClientArgs,
        /// Read from the contacted replica without confirming with the leader.
        #[arg(long)]
        stale: bool,
    },
    /// One schedule: its spec, the next 5 fire times, its latest ticks with their runs and
    /// outcomes, and the ticks it missed or skipped and why.
    Show {
        #[command(flatten)]
        client: ClientArgs,
        name: String,
        /// Read from the contacted replica without confirming with the leader.
        #[arg(long)]
        stale: bool,
    },
    /// Stop firing ticks (ticks passed while paused follow the catch-up policy on resume).
    Pause {
        #[command(flatten)]
        client: ClientArgs,
        name: String,
    },
    /// Fire ticks again.
    Resume {
        #[command(flatten)]
        client: ClientArgs,
        name: String,
    },
    /// Delete a schedule (its unfinished runs go on as ordinary tasks).
    Delete {
        #[command(flatten)]
        client: ClientArgs,
        name: String,
    },
    /// Run the schedule's task once now, whatever its overlap policy.
    Trigger {
        #[command(flatten)]
        client: ClientArgs,
        name: String,
    },
    /// Create a run for every past fire time from --from to --to that has none.
    Backfill {
        #[command(flatten)]
        client: ClientArgs,
        name: String,
        /// The first fire time to cover (RFC 3339).
        #[arg(long, value_name = "TIME", value_parser = parse_time_arg)]
        from: u64,
        /// The last fire time to cover (RFC 3339, or `now`).
        #[arg(long, value_name = "TIME", value_parser = parse_time_arg)]
        to: u64,
    },
    /// Create or update the schedules (and pools) of a TOML file (see docs/schedules.md);
    /// schedules missing from the file are left alone unless --prune.
    Apply {
        #[command(flatten)]
        client: ClientArgs,
        /// The schedule file.
        file: PathBuf,
        /// Delete the schedules the file does not name.
        #[arg(long)]
        prune: bool,
    },
}

#[derive(Args, Debug)]
pub struct ScheduleArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The schedule's name (1 to 64 of letters, digits, `_`, `-`, `.`).
    pub name: String,
    /// A cron expression: 5 fields (`*/5 * * * *`), 6 with seconds first (`*/10 * * * * *`),
    /// or @yearly, @monthly, @weekly, @daily, @hourly.
    #[arg(long, value_name = "EXPR", conflicts_with = "every")]
    pub cron: Option<String>,
    /// Fire every DURATION (`30s`, `5m`, `1h`), counted from --start-at or the creation time.
    #[arg(long, value_name = "DURATION", value_parser = parse_every)]
    pub every: Option<u64>,
    /// The time zone of a cron expression (IANA name, e.g. Europe/Berlin). Default: UTC.
    #[arg(long, value_name = "TZ")]
    pub timezone: Option<String>,
    /// No tick before this time (RFC 3339).
    #[arg(long, value_name = "TIME", value_parser = parse_time_arg)]
    pub start_at: Option<u64>,
    /// No tick after this time (RFC 3339).
    #[arg(long, value_name = "TIME", value_parser = parse_time_arg)]
    pub end_at: Option<u64>,
    /// Ticks that passed while no leader could fire them (or while paused): none (skip them),
    /// latest (run the most recent), all (run each within --catchup-window). Default: all.
    #[arg(long, value_name = "POLICY")]
    pub catchup: Option<CatchupPolicy>,
    /// How far back `--catchup all` goes, e.g. `1h` (the default).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_ms)]
    pub catchup_window: Option<u64>,
    /// When the previous run has not finished: skip, queue, allow, cancel-previous. Default:
    /// allow.
    #[arg(long, value_name = "POLICY")]
    pub overlap: Option<OverlapPolicy>,
    /// Start each run up to this long after its tick, drawn at random (e.g. `30s`).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_ms)]
    pub jitter: Option<u64>,
    /// Create the schedule paused (`schedule resume` starts it).
    #[arg(long)]
    pub paused: bool,
    /// On update: remove an option (start-at, end-at, pool, jitter); repeatable.
    #[arg(long, value_name = "OPTION", value_parser = parse_unset)]
    pub unset: Vec<String>,
    #[command(flatten)]
    pub task: TaskOptions,
    /// The program and its arguments, after `--`.
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

impl ScheduleArgs {
    fn def(&self) -> ScheduleDef {
        ScheduleDef {
            name: self.name.clone(),
            cron: self.cron.clone(),
            every_ms: self.every,
            timezone: self.timezone.clone(),
            start_at_ms: self.start_at,
            end_at_ms: self.end_at,
            catchup: self.catchup,
            catchup_window_ms: self.catchup_window,
            overlap: self.overlap,
            jitter_ms: self.jitter,
            paused: self.paused.then_some(true),
            task: NewTask {
                command: self.command.clone(),
                ..self.task.new_task()
            },
            unset: self.unset.clone(),
        }
    }
}

fn parse_unset(s: &str) -> Result<String, String> {
    let known = crate::rpc::schedules::UNSETTABLE;
    if known.contains(&s) {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{s:?} is not an option that can be removed: use one of {}",
            known.join(", ")
        ))
    }
}

#[derive(Subcommand, Debug)]
pub enum PoolCommand {
    /// Create a pool or change its size.
    Set {
        #[command(flatten)]
        client: ClientArgs,
        name: String,
        /// Slots: at most this many slots of the pool are held by running tasks at once.
        #[arg(long, value_name = "N")]
        slots: u32,
    },
    /// Every pool: slots, used, queued and running tasks.
    List {
        #[command(flatten)]
        client: ClientArgs,
        /// Read from the contacted replica without confirming with the leader.
        #[arg(long)]
        stale: bool,
    },
    /// Delete a pool no unfinished task and no schedule uses.
    Delete {
        #[command(flatten)]
        client: ClientArgs,
        name: String,
    },
}

pub(crate) fn parse_time_arg(s: &str) -> Result<u64, String> {
    crate::schedule::parse_time(s, crate::clock::system_wall_ms())
}

pub(crate) fn parse_every(s: &str) -> Result<u64, String> {
    let ms = parse_duration_ms(s)?;
    if ms < crate::state::schedules::MIN_EVERY_MS {
        return Err(format!("interval {s:?} is not valid: use at least 1s"));
    }
    Ok(ms)
}

fn mode(stale: bool) -> ReadMode {
    if stale {
        ReadMode::Local
    } else {
        ReadMode::Linearizable
    }
}

/// Sends the changes; prints each outcome; fails if any was refused.
async fn send(config: &Config, client: &ClientArgs, ops: Vec<ScheduleOp>) -> anyhow::Result<()> {
    let mut c = connect(config, client)?;
    let mut results = Vec::new();
    for chunk in ops.chunks(crate::server::schedule_calls::MAX_OPS) {
        let chunk = chunk.to_vec();
        let r = c
            .call(|cl, ctx| {
                let ops = chunk.clone();
                async move { cl.schedule_ops(ctx, ops, 0).await }
            })
            .await?;
        results.extend(r);
    }
    let failed = results.iter().filter(|r| r.is_err()).count();
    if let [Err(e)] = results.as_slice() {
        // One change: its error is the command's error.
        bail!("{e}");
    }
    if client.output == Output::Json {
        let json: Vec<serde_json::Value> = results
            .iter()
            .map(|r| match r {
                Ok(o) => serde_json::to_value(o).unwrap_or_default(),
                Err(e) => serde_json::json!({ "error": e.to_string() }),
            })
            .collect();
        print_json(&json)?;
    } else {
        for r in &results {
            match r {
                Ok(o) => println!("{}", describe(o)),
                Err(e) => eprintln!("error: {e}"),
            }
        }
    }
    if failed > 0 {
        bail!("{failed} of {} changes were refused", results.len());
    }
    Ok(())
}

fn describe(o: &OpOutcome) -> String {
    match o {
        OpOutcome::Saved { name, change } => format!(
            "schedule {name} {}",
            match change {
                crate::state::PutChange::Created => "created",
                crate::state::PutChange::Updated => "updated",
                crate::state::PutChange::Unchanged => "unchanged",
            }
        ),
        OpOutcome::Paused {
            name,
            paused,
            changed,
        } => format!(
            "schedule {name} {}{}",
            if *paused { "paused" } else { "resumed" },
            if *changed { "" } else { " (it was already)" }
        ),
        OpOutcome::Deleted { name } => format!("schedule {name} deleted"),
        OpOutcome::Runs {
            name,
            created,
            existing,
        } => {
            let ids: Vec<String> = created
                .iter()
                .map(|(f, t)| format!("task {t} for {}", format_time_ms(*f)))
                .collect();
            let mut s = format!("schedule {name}: {} runs created", created.len());
            if !ids.is_empty() && ids.len() <= 20 {
                s.push_str(&format!(" ({})", ids.join(", ")));
            }
            if *existing > 0 {
                s.push_str(&format!("; {existing} ticks had a run already"));
            }
            s
        }
        OpOutcome::PoolSet { name, slots } => format!("pool {name} has {slots} slots"),
        OpOutcome::PoolDeleted { name } => format!("pool {name} deleted"),
    }
}

pub async fn schedule(config: &Config, cmd: ScheduleCommand) -> anyhow::Result<()> {
    match cmd {
        ScheduleCommand::Create(args) => {
            if !args.unset.is_empty() {
                bail!("--unset is for update: a new schedule has only the options given");
            }
            let def = args.def();
            send(config, &args.client, vec![ScheduleOp::Create(def)]).await
        }
        ScheduleCommand::Update(args) => {
            if args.paused {
                bail!(
                    "--paused is for create; use `fleet schedule pause {}`",
                    args.name
                );
            }
            let def = args.def();
            send(config, &args.client, vec![ScheduleOp::Update(def)]).await
        }
        ScheduleCommand::Pause { client, name } => {
            send(config, &client, vec![ScheduleOp::Pause(name)]).await
        }
        ScheduleCommand::Resume { client, name } => {
            send(config, &client, vec![ScheduleOp::Resume(name)]).await
        }
        ScheduleCommand::Delete { client, name } => {
            send(config, &client, vec![ScheduleOp::Delete(name)]).await
        }
        ScheduleCommand::Trigger { client, name } => {
            let request_id = RequestId(rand::random());
            send(
                config,
                &client,
                vec![ScheduleOp::Trigger { name, request_id }],
            )
            .await
        }
        ScheduleCommand::Backfill {
            client,
            name,
            from,
            to,
        } => {
            send(
                config,
                &client,
                vec![ScheduleOp::Backfill {
                    name,
                    from_ms: from,
                    to_ms: to,
                }],
            )
            .await
        }
        ScheduleCommand::Apply {
            client,
            file,
            prune,
        } => apply(config, &client, &file, prune).await,
        ScheduleCommand::List { client, stale } => {
            let views = read(config, &client, None, stale).await?;
            if client.output == Output::Json {
                return print_json(&views);
            }
            println!(
                "{:<24} {:<32} {:<8} {:<22} {:>8} {:>8} {:>8}",
                "NAME", "TRIGGER", "STATE", "NEXT FIRE", "FIRED", "MISSED", "SKIPPED"
            );
            for v in &views {
                let s = &v.schedule;
                println!(
                    "{:<24} {:<32} {:<8} {:<22} {:>8} {:>8} {:>8}",
                    s.name,
                    trigger_text(&s.spec.trigger),
                    if s.paused { "paused" } else { "active" },
                    v.next_fires
                        .first()
                        .map_or("-".to_string(), |f| format_time_ms(*f)),
                    s.counts.fired,
                    s.counts.missed,
                    s.counts.skipped
                );
            }
            Ok(())
        }
        ScheduleCommand::Show {
            client,
            name,
            stale,
        } => {
            let views = read(config, &client, Some(name), stale).await?;
            let v = views.first().context("the cluster returned no schedule")?;
            if client.output == Output::Json {
                return print_json(v);
            }
            print_show(v);
            Ok(())
        }
    }
}

async fn read(
    config: &Config,
    client: &ClientArgs,
    name: Option<String>,
    stale: bool,
) -> anyhow::Result<Vec<ScheduleView>> {
    let mut c = connect(config, client)?;
    let mode = mode(stale);
    let reply = c
        .call(|cl, ctx| {
            let name = name.clone();
            async move { cl.get_schedules(ctx, name, mode, 0).await }
        })
        .await?;
    if !reply.linearizable {
        eprintln!(
            "(served locally by node {} at applied index {}; may be stale)",
            reply.served_by, reply.applied_index
        );
    }
    Ok(reply.value)
}

fn trigger_text(t: &Trigger) -> String {
    match t {
        Trigger::Cron { expr, timezone } if timezone == "UTC" => format!("cron {expr}"),
        Trigger::Cron { expr, timezone } => format!("cron {expr} ({timezone})"),
        Trigger::Every { .. } => t.to_string(),
    }
}

fn duration(ms: u64) -> String {
    humantime::format_duration(std::time::Duration::from_millis(ms)).to_string()
}

fn print_show(v: &ScheduleView) {
    let s = &v.schedule;
    let spec = &s.spec;
    println!("name:       {}", s.name);
    println!("trigger:    {}", spec.trigger);
    println!(
        "state:      {}",
        match (s.paused, s.paused_at_ms) {
            (true, Some(at)) => format!("paused since {}", format_time_ms(at)),
            (true, None) => "paused".into(),
            (false, _) => "active".into(),
        }
    );
    if let Some(t) = spec.start_at_ms {
        println!("starts:     {}", format_time_ms(t));
    }
    if let Some(t) = spec.end_at_ms {
        println!("ends:       {}", format_time_ms(t));
    }
    println!(
        "catch-up:   {}{}",
        spec.catchup,
        if spec.catchup == CatchupPolicy::All {
            format!(" (window {})", duration(spec.catchup_window_ms))
        } else {
            String::new()
        }
    );
    println!("overlap:    {}", spec.overlap);
    if spec.jitter_ms > 0 {
        println!("jitter:     up to {}", duration(spec.jitter_ms));
    }
    println!("command:    {}", shell_words(&spec.task.command));
    println!("queue:      {}", spec.task.queue);
    if let Some(p) = &spec.pool {
        println!("pool:       {} ({} slots per run)", p.pool, p.slots);
    }
    println!("created:    {}", format_time_ms(s.created_at_ms));
    println!(
        "ticks:      {} fired, {} missed, {} skipped",
        s.counts.fired, s.counts.missed, s.counts.skipped
    );
    println!("decided to: {}", format_time_ms(s.fired_through_ms));
    if v.next_fires.is_empty() {
        println!("next fires: none");
    } else {
        println!("next fires:");
        for f in &v.next_fires {
            println!("  {}", format_time_ms(*f));
        }
    }
    if !s.active.is_empty() {
        let ids: Vec<String> = s.active.iter().map(|t| t.to_string()).collect();
        println!("unfinished: tasks {}", ids.join(", "));
    }
    if !s.queued.is_empty() {
        println!(
            "queued:     {} ticks wait for the running one",
            s.queued.len()
        );
    }
    println!("latest ticks (newest first):");
    println!("  {:<22} {:<10} RESULT", "FIRE TIME", "KIND");
    for r in s.history.iter().rev() {
        let kind = match r.kind {
            RunKind::Scheduled => "scheduled",
            RunKind::CatchUp => "catch-up",
            RunKind::Manual => "manual",
            RunKind::Backfill => "backfill",
        };
        let result = match &r.result {
            TickResult::Run { task } => format!(
                "task {task} {}",
                v.run_states.get(task).map_or("(purged)", |s| s.as_str())
            ),
            TickResult::WorkflowRun { run } => format!("run {run} of the workflow"),
            TickResult::Queued => "queued behind the running run".into(),
            TickResult::Skipped { reason } => format!("skipped: {reason}"),
            TickResult::Missed {
                count,
                last_ms,
                reason,
            } => {
                if *count == 1 {
                    format!("missed: {reason}")
                } else {
                    format!(
                        "missed {count} ticks through {}: {reason}",
                        format_time_ms(*last_ms)
                    )
                }
            }
        };
        println!(
            "  {:<22} {:<10} {}",
            format_time_ms(r.fire_ms),
            kind,
            result
        );
    }
}

/// A schedule file: `[[schedule]]` entries and an optional `[pools]` table (name = slots).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScheduleFile {
    #[serde(default)]
    pools: BTreeMap<String, u32>,
    #[serde(default)]
    schedule: Vec<FileSchedule>,
}

/// One `[[schedule]]` entry: the flags of `schedule create`, durations and times as strings.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSchedule {
    name: String,
    cron: Option<String>,
    every: Option<String>,
    timezone: Option<String>,
    start_at: Option<String>,
    end_at: Option<String>,
    catchup: Option<String>,
    catchup_window: Option<String>,
    overlap: Option<String>,
    jitter: Option<String>,
    paused: Option<bool>,
    command: Vec<String>,
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

impl FileSchedule {
    fn def(&self) -> Result<ScheduleDef, String> {
        let dur = |key: &str, v: &Option<String>| parse_key(key, v, parse_duration_ms);
        let time = |key: &str, v: &Option<String>| parse_key(key, v, parse_time_arg);
        let every = parse_key("every", &self.every, parse_every)?;
        for k in self.env.keys() {
            parse_env(&format!("{k}=x")).map_err(|e| format!("env: {e}"))?;
        }
        Ok(ScheduleDef {
            name: self.name.clone(),
            cron: self.cron.clone(),
            every_ms: every,
            timezone: self.timezone.clone(),
            start_at_ms: time("start_at", &self.start_at)?,
            end_at_ms: time("end_at", &self.end_at)?,
            catchup: parse_key("catchup", &self.catchup, str::parse)?,
            catchup_window_ms: dur("catchup_window", &self.catchup_window)?,
            overlap: parse_key("overlap", &self.overlap, str::parse)?,
            jitter_ms: dur("jitter", &self.jitter)?,
            paused: self.paused,
            task: NewTask {
                command: self.command.clone(),
                queue: self.queue.clone(),
                priority: self.priority,
                env: self.env.clone(),
                max_attempts: self.max_attempts,
                backoff_initial_ms: dur("backoff_initial", &self.backoff_initial)?,
                backoff_max_ms: dur("backoff_max", &self.backoff_max)?,
                backoff_multiplier: self.backoff_multiplier,
                timeout_ms: dur("timeout", &self.timeout)?,
                visibility_timeout_ms: dur("visibility_timeout", &self.visibility_timeout)?,
                delay_ms: None,
                not_before_ms: None,
                idempotency_key: None,
                pool: self.pool.clone(),
                pool_slots: self.pool_slots,
                after: Vec::new(),
            },
            unset: Vec::new(),
        })
    }
}

/// Reads a schedule file into the changes it asks for (pools first); errors name the file,
/// and the schedule or the line.
fn read_file(path: &Path) -> anyhow::Result<(Vec<ScheduleOp>, Vec<String>)> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read schedule file {}", path.display()))?;
    let file: ScheduleFile = toml::from_str(&text)
        .map_err(|e| anyhow::anyhow!("schedule file {}: {e}", path.display()))?;
    let mut ops: Vec<ScheduleOp> = file
        .pools
        .iter()
        .map(|(name, slots)| ScheduleOp::SetPool {
            name: name.clone(),
            slots: *slots,
        })
        .collect();
    let mut names = Vec::new();
    for s in &file.schedule {
        if names.contains(&s.name) {
            bail!(
                "schedule file {}: schedule {:?} is defined twice",
                path.display(),
                s.name
            );
        }
        names.push(s.name.clone());
        let def = s.def().map_err(|e| {
            anyhow::anyhow!(
                "schedule file {}: schedule {:?}: {e}",
                path.display(),
                s.name
            )
        })?;
        ops.push(ScheduleOp::Apply(def));
    }
    Ok((ops, names))
}

async fn apply(
    config: &Config,
    client: &ClientArgs,
    file: &Path,
    prune: bool,
) -> anyhow::Result<()> {
    let (mut ops, names) = read_file(file)?;
    if prune {
        let existing = read(config, client, None, false).await?;
        for v in existing {
            if !names.contains(&v.schedule.name) {
                ops.push(ScheduleOp::Delete(v.schedule.name));
            }
        }
    }
    if ops.is_empty() {
        bail!(
            "schedule file {} has no [[schedule]] entries and no [pools]",
            file.display()
        );
    }
    send(config, client, ops).await
}

pub async fn pool(config: &Config, cmd: PoolCommand) -> anyhow::Result<()> {
    match cmd {
        PoolCommand::Set {
            client,
            name,
            slots,
        } => send(config, &client, vec![ScheduleOp::SetPool { name, slots }]).await,
        PoolCommand::Delete { client, name } => {
            send(config, &client, vec![ScheduleOp::DeletePool(name)]).await
        }
        PoolCommand::List { client, stale } => {
            let mut c = connect(config, &client)?;
            let mode = mode(stale);
            let reply = c
                .call(|cl, ctx| async move { cl.list_pools(ctx, mode, 0).await })
                .await?;
            if client.output == Output::Json {
                return print_json(&reply.value);
            }
            println!(
                "{:<24} {:>8} {:>8} {:>8} {:>8} {:>8}",
                "POOL", "SLOTS", "USED", "OPEN", "RUNNING", "QUEUED"
            );
            for p in &reply.value {
                println!(
                    "{:<24} {:>8} {:>8} {:>8} {:>8} {:>8}",
                    p.name,
                    p.slots,
                    p.used,
                    p.slots.saturating_sub(p.used),
                    p.running,
                    p.queued
                );
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> tempfile::NamedTempFile {
        use std::io::Write;
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    #[test]
    fn a_schedule_file_reads_into_pools_then_schedules() {
        let f = write(
            r#"
[pools]
db = 3

[[schedule]]
name = "nightly"
cron = "0 2 * * *"
timezone = "Europe/Berlin"
catchup = "latest"
overlap = "skip"
jitter = "30s"
command = ["/usr/local/bin/report", "--daily"]
pool = "db"

[[schedule]]
name = "heartbeat"
every = "10s"
command = ["true"]
"#,
        );
        let (ops, names) = read_file(f.path()).unwrap();
        assert_eq!(names, ["nightly", "heartbeat"]);
        assert!(matches!(&ops[0], ScheduleOp::SetPool { name, slots: 3 } if name == "db"));
        let ScheduleOp::Apply(d) = &ops[1] else {
            panic!()
        };
        assert_eq!(d.catchup, Some(CatchupPolicy::Latest));
        assert_eq!(d.jitter_ms, Some(30_000));
        assert_eq!(d.task.pool.as_deref(), Some("db"));
        let ScheduleOp::Apply(d) = &ops[2] else {
            panic!()
        };
        assert_eq!(d.every_ms, Some(10_000));
    }

    /// The shipped example is a valid schedule file, and each of its schedules resolves into a
    /// spec that fires (what `schedule apply` would check on the leader).
    #[test]
    fn the_example_schedule_file_applies() {
        let path = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/config/schedules.example.toml"
        ));
        let (ops, names) = read_file(path).unwrap();
        assert_eq!(
            names,
            ["nightly-report", "sync-inventory", "standup-digest"]
        );
        let config = Config::default();
        let now = 1_796_259_600_000; // 2026-12-03T01:00:00Z
        for op in &ops {
            if let ScheduleOp::Apply(def) = op {
                let spec = crate::rpc::schedules::resolve(def, &config, now)
                    .unwrap_or_else(|e| panic!("{}: {e}", def.name));
                assert!(crate::schedule::Timing::new(&spec).is_ok());
            }
        }
        assert!(matches!(&ops[0], ScheduleOp::SetPool { slots: 2, .. }));
    }

    #[test]
    fn a_typo_in_a_schedule_file_is_named() {
        let f = write("[[schedule]]\nname = \"a\"\ncronn = \"* * * * *\"\ncommand = [\"true\"]\n");
        let e = read_file(f.path()).unwrap_err().to_string();
        assert!(
            e.contains("unknown field `cronn`") && e.contains("line 3"),
            "{e}"
        );
        let f = write("[[schedule]]\nname = \"a\"\nevery = \"0s\"\ncommand = [\"true\"]\n");
        let e = read_file(f.path()).unwrap_err().to_string();
        assert!(e.contains("schedule \"a\": every: interval \"0s\""), "{e}");
        let f = write("[[schedule]]\nname = \"a\"\nevery = \"1s\"\novrlap = \"x\"\ncommand = []\n");
        assert!(read_file(f.path())
            .unwrap_err()
            .to_string()
            .contains("ovrlap"));
        let f = write("[[schedule]]\nname = \"a\"\nevery = \"1s\"\noverlap = \"sometimes\"\ncommand = [\"x\"]\n");
        let e = read_file(f.path()).unwrap_err().to_string();
        assert!(e.contains("unknown overlap policy \"sometimes\""), "{e}");
    }
}
