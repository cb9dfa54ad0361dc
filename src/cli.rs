//! The `fleet` command line: argument parsing and one function per command.
//!
//! Replica commands (`join`, `up`) run a node; every other command is a client that finds the
//! cluster from `--peers`, the `FLEET_PEERS` environment variable, or `[client] peers` in the
//! config file, in that order. Every command that prints data takes `--output json`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Serialize;

pub mod cluster;
pub mod health;
pub mod logs;
pub mod recover;
pub mod schedule;
pub mod submit;
pub mod task;
pub mod up;
pub mod worker;
pub mod workflow;

pub use submit::SubmitArgs;
pub use up::UpArgs;

use crate::client::Client;
use crate::config::{parse_peer_list, Config};
use crate::server::Replica;
use crate::state::TaskState;

#[derive(Parser, Debug)]
#[command(
    name = "fleet",
    version,
    long_version = crate::formats::long_version(),
    about = "A distributed worker fleet with a Raft-replicated scheduler"
)]
pub struct Cli {
    /// Config file (TOML). Default: /etc/fleet/fleet.toml when it exists.
    #[arg(long, global = true, env = "FLEET_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a scheduler replica: form a new cluster or join a running one.
    Join(JoinArgs),
    /// Quorum-loss recovery: turn this stopped replica's data directory into a one-node
    /// cluster from its own data, when a majority of the replicas is gone for good. Refuses
    /// while a quorum is reachable. Then start it with `fleet join` and grow it back.
    Recover(recover::RecoverArgs),
    /// Write the man pages (DIR/man) and shell completions (DIR/completions) generated from
    /// this CLI, for the package (cluster/debian/build.sh).
    #[command(hide = true)]
    GenerateAssets {
        /// The directory to write them into.
        dir: PathBuf,
    },
    /// Run a local fleet on loopback: 3 replicas, 2 workers and a demo batch (for trying fleet
    /// out).
    Up(UpArgs),
    /// Stop the `fleet up` running on a data directory (e.g. one started in the background).
    Down(up::DownArgs),
    /// Run a worker (`fleet worker --peers ...`), or list workers (`fleet worker list`).
    Worker(worker::WorkerArgs),
    /// Print the recorded output of a task's attempts.
    Logs(logs::LogsArgs),
    /// Submit a task: `fleet submit [options] -- CMD ARGS...`, or many with --file.
    Submit(SubmitArgs),
    /// Inspect tasks.
    #[command(subcommand)]
    Task(TaskCommand),
    /// Inspect queues.
    #[command(subcommand)]
    Queue(QueueCommand),
    /// Run tasks by time: cron expressions and intervals with exactly-once ticks.
    #[command(subcommand)]
    Schedule(schedule::ScheduleCommand),
    /// Workflows: tasks with dependencies (a DAG in a TOML file), run by hand or on a
    /// schedule.
    #[command(subcommand)]
    Workflow(workflow::WorkflowCommand),
    /// Runs of workflows: list, show, cancel, retry.
    #[command(subcommand)]
    Run(workflow::RunCommand),
    /// Named, cluster-wide concurrency limits for tasks and schedules.
    #[command(subcommand)]
    Pool(schedule::PoolCommand),
    /// Inspect and change the cluster's membership.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Measure write throughput against a running cluster.
    Bench(BenchArgs),
    /// Check replicas (or, with --cluster, the cluster): exit 0 healthy, 1 unhealthy, 2
    /// unreachable.
    Health(health::HealthArgs),
    /// Stall a replica's scheduling loop or fsyncs (tests and chaos only; refused unless the
    /// replica's config sets [fault_injection] enabled = true).
    #[command(subcommand)]
    Fault(health::FaultCommand),
    /// Show the effective configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
}

impl Command {
    /// Whether the command runs part of a fleet (a replica, a worker, or `fleet up`) rather than
    /// being a client that prints and exits.
    pub fn runs_a_fleet(&self) -> bool {
        match self {
            Command::Join(_) | Command::Up(_) => true,
            Command::Worker(w) => w.command.is_none(),
            _ => false,
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Print the configuration a replica started with these flags would use (file, then
    /// FLEET__SECTION__KEY variables, then flags), validated, with secrets masked.
    Show {
        /// Print the built-in defaults instead.
        #[arg(long)]
        defaults: bool,
        #[command(flatten)]
        node: NodeFlags,
        /// Output format: text is TOML.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
}

#[derive(Args, Debug)]
pub struct JoinArgs {
    #[command(flatten)]
    pub node: NodeFlags,
    /// Start a new one-node cluster from a backup (`fleet cluster snapshot save`): every task,
    /// attempt, schedule, pool and workflow of the backup, this node the only voter, a new
    /// cluster id. Needs an empty data directory; grow the cluster afterwards with `fleet
    /// join --peers THIS_NODE` on the others.
    #[arg(long, value_name = "FILE")]
    pub restore: Option<PathBuf>,
}

/// The flags of a replica; each overrides one `[node]` or `[raft]` key (flags win over the
/// file and the environment).
#[derive(Args, Debug, Clone, Default)]
pub struct NodeFlags {
    /// Other replicas (any subset), comma-separated host:port. [node] peers.
    #[arg(long, value_name = "ADDRS")]
    pub peers: Option<String>,
    /// Form a new cluster once this many replicas see each other. [node] bootstrap_expect.
    #[arg(long, value_name = "N")]
    pub bootstrap_expect: Option<usize>,
    /// This node's id (unique for the cluster's lifetime). Default: kept in the data directory,
    /// or drawn at random for a new node. [node] id.
    #[arg(long, value_name = "N")]
    pub node_id: Option<u64>,
    /// Address to listen on for peers and clients. [node] listen.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Address other nodes use to reach this one. Default: --listen. [node] advertise.
    #[arg(long, value_name = "ADDR")]
    pub advertise: Option<String>,
    /// Address of the HTTP endpoint (/health, /metrics); port 0 picks a free one; "" turns HTTP
    /// off. [node] http_listen.
    #[arg(long, value_name = "ADDR")]
    pub http_listen: Option<String>,
    /// Data directory. [node] data_dir.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Cluster name; nodes of differently named clusters refuse to talk. [node] cluster_name.
    #[arg(long)]
    pub cluster_name: Option<String>,
    /// Scale all Raft timing (heartbeat, election timeout) by this factor.
    /// [raft] timing_multiplier.
    #[arg(long, value_name = "X")]
    pub raft_timing_multiplier: Option<f64>,
}

impl NodeFlags {
    /// Writes the given flags over `config`.
    pub fn apply(&self, config: &mut Config) -> anyhow::Result<()> {
        if let Some(p) = &self.peers {
            config.node.peers = parse_peer_list("--peers", p)?;
        }
        if self.bootstrap_expect.is_some() {
            config.node.bootstrap_expect = self.bootstrap_expect;
        }
        if self.node_id.is_some() {
            config.node.id = self.node_id;
        }
        if let Some(l) = &self.listen {
            config.node.listen = l.clone();
        }
        if self.advertise.is_some() {
            config.node.advertise = self.advertise.clone();
        }
        if let Some(h) = &self.http_listen {
            config.node.http_listen = h.clone();
        }
        if let Some(d) = &self.data_dir {
            config.node.data_dir = d.clone();
        }
        if let Some(n) = &self.cluster_name {
            config.node.cluster_name = n.clone();
        }
        if let Some(m) = self.raft_timing_multiplier {
            config.raft.timing_multiplier = m;
        }
        Ok(())
    }
}

#[derive(Args, Debug, Clone)]
pub struct ClientArgs {
    /// Replicas to contact (any subset), comma-separated host:port.
    #[arg(long, env = "FLEET_PEERS", value_name = "ADDRS")]
    pub peers: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
    /// How long to keep trying to reach the cluster (through elections and failovers), e.g.
    /// `30s`. Default: [client] timeout_ms. (Not a task option: a task's execution timeout is
    /// `fleet submit --timeout`.)
    #[arg(long, value_name = "DURATION", value_parser = submit::parse_duration_ms)]
    pub retry_for: Option<u64>,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum TaskCommand {
    /// Cancel a task. A running attempt is stopped by its worker.
    Cancel {
        #[command(flatten)]
        client: ClientArgs,
        /// The task id.
        id: u64,
    },
    /// Re-queue a dead or failed task with a fresh attempt budget.
    Retry {
        #[command(flatten)]
        client: ClientArgs,
        /// The task id.
        id: u64,
    },
    /// End a running attempt and run the task again (a hung attempt, a bad host): the attempt
    /// is recorded as lost, the worker is fenced at its next heartbeat and kills it, and the
    /// task is retried by its retry policy (backoff included; dead when no attempt is left).
    Requeue {
        #[command(flatten)]
        client: ClientArgs,
        /// The task id.
        id: u64,
        /// The fencing token of the attempt to end (`fleet task show` lists them). Without it,
        /// the running attempt is read first; either way, an attempt that ended meanwhile is
        /// left alone and the command fails, so it never ends an attempt you did not see.
        #[arg(long)]
        token: Option<u64>,
    },
    /// List tasks (linearizable unless --stale).
    List {
        #[command(flatten)]
        client: ClientArgs,
        /// Only tasks in this state (queued, running, failed, succeeded, dead, cancelled).
        #[arg(long)]
        state: Option<TaskState>,
        /// Only tasks of this queue.
        #[arg(long)]
        queue: Option<String>,
        /// At most this many tasks (1 to 10000).
        #[arg(long, default_value_t = 1000)]
        limit: usize,
        /// Only tasks with a greater id (for paging).
        #[arg(long)]
        after: Option<u64>,
        /// Read from the contacted replica without confirming with the leader (may be stale).
        #[arg(long)]
        stale: bool,
    },
    /// Show one task.
    Show {
        #[command(flatten)]
        client: ClientArgs,
        /// The task id.
        id: u64,
        /// Read from the contacted replica without confirming with the leader (may be stale).
        #[arg(long)]
        stale: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum QueueCommand {
    /// Tasks per queue in each state (ready, delayed, running, failed, dead, and the succeeded and
    /// cancelled ones still retained), and the oldest ready task's age.
    Stats {
        #[command(flatten)]
        client: ClientArgs,
        /// Read from the contacted replica without confirming with the leader (may be stale).
        #[arg(long)]
        stale: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum ClusterCommand {
    /// Leader, term, and each member's role, address, match index and last contact.
    Status {
        #[command(flatten)]
        client: ClientArgs,
        /// Show the contacted replica's own view instead of the leader's.
        #[arg(long)]
        local: bool,
    },
    /// Remove a node from the cluster.
    Remove {
        #[command(flatten)]
        client: ClientArgs,
        /// The node id to remove.
        node: u64,
    },
    /// Ask the node at --peers (exactly one address) to leave the cluster and stop. A leader
    /// hands off leadership first.
    Leave {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Backups: save the cluster's state to a file, or inspect one.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
}

#[derive(Subcommand, Debug)]
pub enum SnapshotCommand {
    /// Save a consistent backup of the running cluster (taken by the leader after confirming
    /// its leadership) to FILE: every task, attempt, schedule, pool and workflow, with a
    /// checksum and the format version. Restore it with `fleet join --restore FILE`.
    Save {
        #[command(flatten)]
        client: ClientArgs,
        /// Where to write the backup (replaced atomically if it exists).
        file: PathBuf,
    },
    /// Check a backup file (magic, format, checksum, decoding) and summarize what it holds.
    Inspect {
        /// The backup file.
        file: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Concurrency levels to measure, comma-separated (each client has its own connection).
    #[arg(long, default_value = "1,64")]
    pub clients: String,
    /// Seconds to run each level.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Also write one line per acknowledged write to this file: the wall-clock time of the
    /// acknowledgement and the write's latency (`UNIX_NANOS LATENCY_MICROS`). A failover
    /// benchmark kills the leader during the run and finds the first write acknowledged after.
    #[arg(long, value_name = "FILE")]
    pub timeline: Option<std::path::PathBuf>,
    /// Instead of writes: submit N tasks one at a time from this one connection, each after the
    /// previous ended, and report the time from the submit call to the task's start as the
    /// task prints it (the first word of its output, seconds since the epoch, as bash's
    /// `$EPOCHREALTIME`). The task is CMD, by default `bash -c 'echo $EPOCHREALTIME'`.
    #[arg(long, value_name = "N")]
    pub start_latency: Option<usize>,
    /// The queue of the --start-latency tasks.
    #[arg(long, default_value = "default")]
    pub queue: String,
    /// The --start-latency task's command.
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// Runs the parsed command with the configuration from [`load_config`].
pub async fn run(cli: Cli, config: Config) -> anyhow::Result<()> {
    match cli.command {
        Command::Join(args) => join(config, args).await,
        Command::Recover(args) => recover::recover(config, args).await,
        Command::GenerateAssets { dir } => generate_assets(&dir),
        Command::Up(args) => up::up(&config, cli.config.as_deref(), args).await,
        Command::Down(args) => up::down(args).await,
        Command::Worker(args) => worker::worker(config, args).await,
        Command::Logs(args) => logs::logs(&config, args).await,
        Command::Submit(args) => submit::submit(&config, args).await,
        Command::Schedule(cmd) => schedule::schedule(&config, cmd).await,
        Command::Pool(cmd) => schedule::pool(&config, cmd).await,
        Command::Workflow(cmd) => workflow::workflow(&config, cmd).await,
        Command::Run(cmd) => workflow::run(&config, cmd).await,
        Command::Task(cmd) => task::task(&config, cmd).await,
        Command::Queue(QueueCommand::Stats { client, stale }) => {
            task::queue_stats(&config, &client, stale).await
        }
        Command::Cluster(cmd) => cluster::cluster(&config, cmd).await,
        Command::Config(ConfigCommand::Show {
            defaults,
            node,
            output,
        }) => config_show(config, defaults, node, output),
        Command::Bench(args) => crate::bench::run(&config, args).await,
        Command::Health(args) => health::health(&config, args).await,
        Command::Fault(cmd) => health::fault(&config, cmd).await,
    }
}

/// Man pages (one per command, `fleet.1`, `fleet-join.1`, ...) and bash, zsh and fish
/// completions, from the CLI definition.
fn generate_assets(dir: &std::path::Path) -> anyhow::Result<()> {
    use clap::CommandFactory;
    let man = dir.join("man");
    let completions = dir.join("completions");
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&completions)?;
    clap_mangen::generate_to(Cli::command(), &man)?;
    for shell in [
        clap_complete::Shell::Bash,
        clap_complete::Shell::Zsh,
        clap_complete::Shell::Fish,
    ] {
        clap_complete::generate_to(shell, &mut Cli::command(), "fleet", &completions)?;
    }
    println!(
        "man pages in {}, completions in {}",
        man.display(),
        completions.display()
    );
    Ok(())
}

/// `fleet config show`: the effective configuration (secrets masked), or the defaults.
fn config_show(
    config: Config,
    defaults: bool,
    node: NodeFlags,
    output: Output,
) -> anyhow::Result<()> {
    let config = if defaults {
        Config::default()
    } else {
        let mut config = config;
        node.apply(&mut config)?;
        config.validate()?;
        config
    };
    let shown = crate::config::load::masked(&config)?;
    if output == Output::Json {
        print_json(&shown)
    } else {
        print!("{}", toml::to_string(&shown)?);
        Ok(())
    }
}

/// The configuration file (`--config`, else `/etc/fleet/fleet.toml` when it exists) with the
/// `FLEET__*` environment on top; flags are applied by each command.
pub fn load_config(path: Option<&std::path::Path>) -> anyhow::Result<Config> {
    let default = std::path::Path::new("/etc/fleet/fleet.toml");
    let file = match (path, std::fs::metadata(default)) {
        (Some(p), _) => Some(p),
        (None, Ok(_)) => Some(default),
        (None, Err(e)) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            // The package makes /etc/fleet readable by the fleet group only (it may hold the
            // token): say why its settings (peers, token) are missing instead of failing later.
            eprintln!(
                "note: {} is not readable by this user ({e}); using the defaults and FLEET__* \
                 variables. Run as root or a member of the fleet group, or pass --config FILE.",
                default.display()
            );
            None
        }
        (None, Err(_)) => None,
    };
    Config::load(file)
}

pub(crate) fn client_peers(config: &Config, args: &ClientArgs) -> anyhow::Result<Vec<String>> {
    match &args.peers {
        Some(p) => parse_peer_list("--peers", p),
        None => Ok(config.client.peers.clone()),
    }
}

pub(crate) fn connect(config: &Config, args: &ClientArgs) -> anyhow::Result<Client> {
    config.validate()?;
    let timeout = Duration::from_millis(args.retry_for.unwrap_or(config.client.timeout_ms));
    if timeout.is_zero() {
        bail!("--retry-for 0s is not valid: use at least 1ms");
    }
    Ok(Client::new(
        client_peers(config, args)?,
        &config.node.cluster_name,
        timeout,
    )?
    .with_auth_token(&config.node.auth_token)
    .with_attempt_timeout(CLI_ATTEMPT_TIMEOUT))
}

/// The longest one CLI call waits on one replica before trying the next. A replica that froze
/// (SIGSTOP, a hung host) with the call in flight keeps its connection open and never answers;
/// every call the CLI makes is answered within milliseconds by a live replica (the largest, a
/// 10,000-task submission, in well under a second), and writes carry request ids, so the retry
/// elsewhere is never applied twice.
const CLI_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) fn print_json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

pub(crate) fn report(
    args: &ClientArgs,
    json: &serde_json::Value,
    text: &str,
) -> anyhow::Result<()> {
    if args.output == Output::Json {
        print_json(json)
    } else {
        println!("{text}");
        Ok(())
    }
}

pub(crate) fn shell_words<S: AsRef<str>>(words: impl IntoIterator<Item = S>) -> String {
    words
        .into_iter()
        .map(|w| {
            let w = w.as_ref();
            if !w.is_empty()
                && w.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c))
            {
                w.to_string()
            } else {
                format!("'{}'", w.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

pub(crate) fn format_time_ms(ms: u64) -> String {
    let secs = (ms / 1000) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

async fn join(mut config: Config, args: JoinArgs) -> anyhow::Result<()> {
    args.node.apply(&mut config)?;
    // Everything the replica logs is inside this span; a new node's id is recorded once its
    // data directory is open.
    let span = tracing::info_span!("replica", node = tracing::field::Empty);
    if let Some(id) = config.node.id {
        span.record("node", id);
    }
    use tracing::Instrument;
    run_replica(config, args.restore).instrument(span).await
}

async fn run_replica(config: Config, restore: Option<PathBuf>) -> anyhow::Result<()> {
    config.validate()?;
    let replica = Replica::start_restoring(config, restore.as_deref()).await?;
    let notifier = crate::health::systemd::Notifier::from_env();
    notifier.ready(&format!("serving on {}", replica.addr));
    let watched = replica.clone();
    notifier.clone().spawn(move || watched.progress_status());
    let mut stop = replica.stop.subscribe();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let outcome = tokio::select! {
        _ = tokio::signal::ctrl_c() => { tracing::info!("interrupted; stopping"); Ok(()) }
        _ = term.recv() => { tracing::info!("SIGTERM; stopping"); Ok(()) }
        r = stop.wait_for(|s| s.is_some()) => match r.ok().and_then(|s| s.clone()) {
            Some(reason) if !reason.is_empty() => Err(anyhow::anyhow!(reason)),
            _ => Ok(()),
        },
    };
    notifier.stopping("stopping: handing over leadership if leading");
    replica.shutdown().await;
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_utc_times() {
        assert_eq!(format_time_ms(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_time_ms(1_700_000_000_000), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn quotes_shell_words() {
        let w = vec!["echo".to_string(), "a b".to_string(), "it's".to_string()];
        assert_eq!(shell_words(&w), "echo 'a b' 'it'\\''s'");
    }
}
