//! `fleet submit`: one task from the command line, or many from a JSON-lines file.
//!
//! Options left out take the cluster's defaults for the queue (`[tasks]`, `[queues.NAME]` in
//! the leader's config). In a file, each line is a [`NewTask`] object; options given on the
//! command line fill the fields a line leaves out.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::Args;

use super::{connect, print_json, ClientArgs, Output};
use crate::config::Config;
use crate::rpc::{NewTask, SubmitTask, Submitted};
use crate::state::RequestId;

/// Most tasks per `submit` call when reading a file.
const SUBMIT_FILE_BATCH: usize = 1000;
/// Most encoded bytes per `submit` call: batches are cut by size as well as by count, so a file
/// of large lines never makes a call larger than the wire's frame limit
/// ([`MAX_FRAME_BYTES`](crate::rpc::MAX_FRAME_BYTES), 32 MiB). One task is at most ~130 KiB
/// (the per-task limits of [`check_task_size`](crate::state::check_task_size)), so it always
/// fits.
const SUBMIT_BATCH_BYTES: usize = 4 << 20;

/// The options of a task, shared by `fleet submit` and `fleet schedule create|update`.
#[derive(Args, Debug, Clone, Default)]
pub struct TaskOptions {
    /// The queue for the task. Default: `default`.
    #[arg(long)]
    pub queue: Option<String>,
    /// Higher runs first; FIFO within one priority.
    #[arg(long, allow_hyphen_values = true)]
    pub priority: Option<i32>,
    /// Attempts before the task is dead (the first run counts).
    #[arg(long, value_name = "N")]
    pub max_attempts: Option<u32>,
    /// Delay before the first retry, e.g. `1s` (later retries multiply it; jittered).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_ms)]
    pub backoff_initial: Option<u64>,
    /// Longest delay between retries, e.g. `5m`.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_ms)]
    pub backoff_max: Option<u64>,
    /// Factor between consecutive retry delays (1.0 to 10.0).
    #[arg(long, value_name = "X")]
    pub backoff_multiplier: Option<f64>,
    /// Execution timeout per attempt, e.g. `10m` (`0s`: none). The process group gets SIGTERM,
    /// then SIGKILL.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_ms)]
    pub timeout: Option<u64>,
    /// How long a lease stays valid without a worker heartbeat, e.g. `30s`.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_ms)]
    pub visibility_timeout: Option<u64>,
    /// An environment variable for the task, `KEY=VALUE` (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// A pool (`fleet pool set`) whose slots the task holds while it runs: the leader never
    /// runs more of the pool's tasks at once than it has slots.
    #[arg(long, value_name = "NAME")]
    pub pool: Option<String>,
    /// Slots of the pool one attempt holds (default 1).
    #[arg(long, value_name = "K")]
    pub pool_slots: Option<u32>,
}

impl TaskOptions {
    /// The task the options describe (without a command).
    pub fn new_task(&self) -> NewTask {
        NewTask {
            command: Vec::new(),
            queue: self.queue.clone(),
            priority: self.priority,
            env: self.env.iter().cloned().collect::<BTreeMap<_, _>>(),
            max_attempts: self.max_attempts,
            backoff_initial_ms: self.backoff_initial,
            backoff_max_ms: self.backoff_max,
            backoff_multiplier: self.backoff_multiplier,
            timeout_ms: self.timeout,
            visibility_timeout_ms: self.visibility_timeout,
            delay_ms: None,
            not_before_ms: None,
            idempotency_key: None,
            pool: self.pool.clone(),
            pool_slots: self.pool_slots,
            after: Vec::new(),
        }
    }
}

#[derive(Args, Debug)]
pub struct SubmitArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(flatten)]
    pub task: TaskOptions,
    /// Do not run before this long from now, e.g. `90s`.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_ms, conflicts_with = "not_before")]
    pub delay: Option<u64>,
    /// Do not run before this time (RFC 3339, e.g. `2026-12-01T08:00:00Z`).
    #[arg(long, value_name = "TIME", value_parser = parse_time_ms)]
    pub not_before: Option<u64>,
    /// A second submission with the same key, while the first task is retained, returns the
    /// first task's id instead of creating another.
    #[arg(long, value_name = "KEY")]
    pub idempotency_key: Option<String>,
    /// Run only after these tasks have succeeded (comma-separated ids, e.g. `--after 4,7`);
    /// if one of them ends dead or cancelled, this task is cancelled.
    #[arg(long, value_name = "ID,...", value_delimiter = ',', value_parser = parse_task_id)]
    pub after: Vec<u64>,
    /// Submit many tasks from a JSON-lines file, one object per line with the fields
    /// `command` (required), `queue`, `priority`, `env` (an object), `max_attempts`,
    /// `backoff_initial_ms`, `backoff_max_ms`, `backoff_multiplier`, `timeout_ms`,
    /// `visibility_timeout_ms`, `delay_ms`, `not_before_ms`, `idempotency_key`, `pool`,
    /// `pool_slots`, `after` (task ids). `-` reads standard input.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["command", "idempotency_key"])]
    pub file: Option<PathBuf>,
    /// The program and its arguments, after `--`.
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

impl SubmitArgs {
    /// The task the options describe (without a command).
    fn template(&self) -> NewTask {
        NewTask {
            delay_ms: self.delay,
            not_before_ms: self.not_before,
            idempotency_key: self.idempotency_key.clone(),
            after: self.after.clone(),
            ..self.task.new_task()
        }
    }
}

/// A task id for `--after`.
fn parse_task_id(s: &str) -> Result<u64, String> {
    s.trim()
        .parse::<u64>()
        .ok()
        .filter(|id| *id > 0)
        .ok_or_else(|| format!("{s:?} is not a task id: use the number `fleet submit` printed"))
}

/// An optional file value parsed by `parse`; the error names the key (`timeout: ...`).
pub(crate) fn parse_key<T>(
    key: &str,
    value: &Option<String>,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<Option<T>, String> {
    value
        .as_deref()
        .map(parse)
        .transpose()
        .map_err(|e| format!("{key}: {e}"))
}

/// Parses `500ms`, `30s`, `10m`, `1h 30m`, `2d`.
pub fn parse_duration_ms(s: &str) -> Result<u64, String> {
    humantime::parse_duration(s)
        .map(|d| d.as_millis().min(u128::from(u64::MAX)) as u64)
        .map_err(|e| {
            format!(
                "{s:?} is not a duration ({e}); use a number with a unit: 500ms, 30s, 10m, 2h, 1d"
            )
        })
}

/// Parses an RFC 3339 time into milliseconds since the Unix epoch.
pub fn parse_time_ms(s: &str) -> Result<u64, String> {
    let t = humantime::parse_rfc3339_weak(s).map_err(|e| {
        format!("{s:?} is not a time ({e}); use RFC 3339, e.g. 2026-12-01T08:00:00Z")
    })?;
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .map_err(|_| format!("{s:?} is before 1970"))
}

pub fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

/// Fills the fields `line` leaves out from `template`.
pub(crate) fn merge(mut line: NewTask, t: &NewTask) -> NewTask {
    line.queue = line.queue.or_else(|| t.queue.clone());
    line.priority = line.priority.or(t.priority);
    for (k, v) in &t.env {
        line.env.entry(k.clone()).or_insert_with(|| v.clone());
    }
    line.max_attempts = line.max_attempts.or(t.max_attempts);
    line.backoff_initial_ms = line.backoff_initial_ms.or(t.backoff_initial_ms);
    line.backoff_max_ms = line.backoff_max_ms.or(t.backoff_max_ms);
    line.backoff_multiplier = line.backoff_multiplier.or(t.backoff_multiplier);
    line.timeout_ms = line.timeout_ms.or(t.timeout_ms);
    line.visibility_timeout_ms = line.visibility_timeout_ms.or(t.visibility_timeout_ms);
    if line.delay_ms.is_none() && line.not_before_ms.is_none() {
        line.delay_ms = t.delay_ms;
        line.not_before_ms = t.not_before_ms;
    }
    if line.pool.is_none() {
        line.pool = t.pool.clone();
        line.pool_slots = line.pool_slots.or(t.pool_slots);
    }
    line
}

/// Checks what can be checked without the cluster's defaults.
fn precheck(t: &NewTask) -> anyhow::Result<()> {
    if t.command.is_empty() || t.command[0].is_empty() {
        bail!("the task command is empty: give a program and its arguments after `--`");
    }
    if let Some(q) = &t.queue {
        crate::state::validate_queue_name(q)?;
    }
    crate::state::check_task_size(
        t.command.iter().map(String::as_str),
        t.env.iter().map(|(k, v)| k.len() + v.len()).sum(),
    )?;
    Ok(())
}

pub async fn submit(config: &Config, args: SubmitArgs) -> anyhow::Result<()> {
    let template = args.template();
    // For a file, the line number of each task (blank lines are skipped).
    let mut lines: Vec<usize> = Vec::new();
    let tasks: Vec<NewTask> = match &args.file {
        Some(path) => read_task_file(path)?
            .into_iter()
            .map(|(line, t)| {
                lines.push(line);
                merge(t, &template)
            })
            .collect(),
        None => {
            if args.command.is_empty() {
                bail!(
                    "no command given: use `fleet submit [options] -- CMD ARGS...` or --file FILE"
                );
            }
            vec![NewTask {
                command: args.command.clone(),
                ..template
            }]
        }
    };
    for (i, t) in tasks.iter().enumerate() {
        precheck(t).map_err(|e| match &args.file {
            Some(path) => anyhow::anyhow!("{}:{}: {e}", path.display(), t_line(&lines, i)),
            None => e,
        })?;
    }
    let mut client = connect(config, &args.client)?;
    let mut results: Vec<Submitted> = Vec::with_capacity(tasks.len());
    let many = args.file.is_some();
    for batch in batches(&tasks) {
        let out = client
            .call(|c, ctx| {
                let b = batch.clone();
                async move { c.submit(ctx, b, 0).await }
            })
            .await?;
        for (i, r) in out.into_iter().enumerate() {
            let n = results.len() + i;
            results.push(r.map_err(|e| {
                if many {
                    anyhow::anyhow!("line {}: {e}", t_line(&lines, n))
                } else {
                    anyhow::anyhow!("{e}")
                }
            })?);
        }
    }
    if args.client.output == Output::Json {
        if many {
            print_json(&results)
        } else {
            print_json(&results[0])
        }
    } else {
        for r in &results {
            println!("{}", r.id);
        }
        Ok(())
    }
}

/// Cuts the tasks into `submit` calls of at most [`SUBMIT_FILE_BATCH`] tasks and
/// [`SUBMIT_BATCH_BYTES`] encoded bytes, each task with a fresh request id.
fn batches(tasks: &[NewTask]) -> Vec<Vec<SubmitTask>> {
    let mut out: Vec<Vec<SubmitTask>> = Vec::new();
    let mut bytes = 0;
    for t in tasks {
        let one = SubmitTask {
            request_id: RequestId(rand::random()),
            task: t.clone(),
        };
        let size = bincode::serde::encode_to_vec(&one, bincode::config::standard())
            .map_or(usize::MAX, |b| b.len());
        match out.last_mut() {
            Some(b) if b.len() < SUBMIT_FILE_BATCH && bytes + size <= SUBMIT_BATCH_BYTES => {
                bytes += size;
                b.push(one);
            }
            _ => {
                bytes = size;
                out.push(vec![one]);
            }
        }
    }
    out
}

/// The line number of the `i`th task of a file (or its position, for a single task).
fn t_line(lines: &[usize], i: usize) -> usize {
    lines.get(i).copied().unwrap_or(i + 1)
}

/// The tasks of a JSON-lines file, each with its line number.
fn read_task_file(path: &std::path::Path) -> anyhow::Result<Vec<(usize, NewTask)>> {
    let reader: Box<dyn BufRead> = if path.as_os_str() == "-" {
        Box::new(std::io::BufReader::new(std::io::stdin()))
    } else {
        Box::new(std::io::BufReader::new(
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?,
        ))
    };
    let mut tasks = Vec::new();
    for (n, line) in reader.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let t: NewTask = serde_json::from_str(&line).map_err(|e| {
            anyhow::anyhow!(
                "{}:{}: {e}; expected a JSON object like {{\"command\": [\"echo\", \"hi\"], \"queue\": \"default\"}}",
                path.display(),
                n + 1
            )
        })?;
        tasks.push((n + 1, t));
    }
    if tasks.is_empty() {
        bail!("{} contains no tasks", path.display());
    }
    Ok(tasks)
}

/// How long to wait between two polls of a changing value in `logs --follow` and `up`.
pub(crate) const POLL_EVERY: Duration = Duration::from_millis(200);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_times_parse_or_say_what_is_accepted() {
        assert_eq!(parse_duration_ms("1m 30s"), Ok(90_000));
        assert_eq!(parse_duration_ms("250ms"), Ok(250));
        let e = parse_duration_ms("10").unwrap_err();
        assert!(e.contains("\"10\"") && e.contains("30s"), "{e}");
        assert_eq!(parse_time_ms("1970-01-01T00:00:01Z"), Ok(1000));
        assert!(parse_time_ms("tomorrow").unwrap_err().contains("RFC 3339"));
        assert!(parse_env("NOVALUE").is_err());
        assert_eq!(parse_env("A=b=c"), Ok(("A".into(), "b=c".into())));
    }

    #[test]
    fn batches_are_cut_by_encoded_size_and_by_count() {
        let big = NewTask {
            command: vec!["echo".into(), "x".repeat(60_000)],
            ..Default::default()
        };
        // 1,000 lines of 60 kB would be a 60 MB call; cut by size, each call is under 4 MiB.
        let b = batches(&vec![big; 1000]);
        assert!(b.len() >= 15, "{} calls", b.len());
        for call in &b {
            let bytes = bincode::serde::encode_to_vec(call, bincode::config::standard())
                .unwrap()
                .len();
            assert!(bytes <= SUBMIT_BATCH_BYTES + 64, "{bytes}");
        }
        assert_eq!(b.iter().map(Vec::len).sum::<usize>(), 1000);
        let small = NewTask {
            command: vec!["true".into()],
            ..Default::default()
        };
        let b = batches(&vec![small; 2500]);
        assert_eq!(
            b.iter().map(Vec::len).collect::<Vec<_>>(),
            [1000, 1000, 500]
        );
    }

    #[test]
    fn file_lines_keep_their_fields_over_options() {
        let t = NewTask {
            queue: Some("q".into()),
            priority: Some(5),
            delay_ms: Some(10),
            ..Default::default()
        };
        let line = NewTask {
            command: vec!["x".into()],
            priority: Some(1),
            not_before_ms: Some(7),
            ..Default::default()
        };
        let m = merge(line, &t);
        assert_eq!(m.queue.as_deref(), Some("q"));
        assert_eq!(m.priority, Some(1));
        assert_eq!((m.delay_ms, m.not_before_ms), (None, Some(7)));
    }
}
