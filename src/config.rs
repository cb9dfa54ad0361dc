//! Configuration: one documented [`Config`], loaded from a TOML file, overridden by
//! `FLEET__SECTION__KEY` environment variables, then by flags ([`load`] explains the layers and
//! the `KEY_file` / `KEY_cmd` form of secrets).
//!
//! Every field has a default that runs a node on a LAN; `config/fleet.example.toml` lists
//! each key with its default (a test fails when one is missing). Unknown keys are errors (a typo
//! must not be silently ignored), and [`Config::validate`] checks ranges once, at start, naming
//! the key, the value and what is accepted. Every `*_ms` key takes milliseconds or a duration
//! string (`"5s"`).

pub mod load;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The whole configuration of a `fleet` process.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub node: NodeConfig,
    pub raft: RaftConfig,
    pub client: ClientConfig,
    pub scheduler: SchedulerConfig,
    /// Defaults for submitted tasks (any queue).
    pub tasks: TaskDefaults,
    /// Per-queue overrides of [`Config::tasks`], by queue name (`[queues.reports]`).
    pub queues: std::collections::BTreeMap<String, QueueDefaults>,
    pub worker: WorkerConfig,
    pub health: HealthConfig,
    pub log: LogConfig,
    pub metrics: MetricsConfig,
    pub fault_injection: FaultInjectionConfig,
}

/// This replica: who it is, where it listens, where it keeps its data, how it finds the others.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// The node id, unique in the cluster for its lifetime. When unset, a new node draws a random
    /// id and keeps it in its data directory.
    pub id: Option<u64>,
    /// The address the replica listens on for peers and clients (`host:port`).
    pub listen: String,
    /// The address of the replica's HTTP endpoint (`/health`, `/health/cluster`); port 0 picks a
    /// free port (shown by `fleet health`); an empty string turns HTTP off.
    pub http_listen: String,
    /// The address other nodes use to reach this one; defaults to `listen`. Stored in the Raft
    /// membership, so it must be reachable from every other node.
    pub advertise: Option<String>,
    /// The data directory: the sled database (Raft log, vote, markers) and the snapshot file.
    pub data_dir: PathBuf,
    /// The name of the cluster. Nodes of differently named clusters refuse to talk.
    pub cluster_name: String,
    /// Addresses of other replicas (any subset) used to form or join the cluster.
    pub peers: Vec<String>,
    /// Form a new cluster once this many replicas (this one included) can see each other.
    /// Every node of the first set must be given the same value. Unset: join an existing cluster.
    pub bootstrap_expect: Option<usize>,
    /// A shared secret every replica, worker and CLI of the cluster presents when it connects;
    /// a replica with a token refuses callers without the same one. Empty: no check. A secret:
    /// give it as `auth_token_file` or `auth_token_cmd` to keep it out of the file. It keeps
    /// out strangers and misconfigured nodes, but is sent unencrypted (fleet's transport is
    /// plain TCP): run fleet on a private network or a VPN.
    pub auth_token: String,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            id: None,
            listen: "127.0.0.1:7101".into(),
            http_listen: "127.0.0.1:7180".into(),
            advertise: None,
            data_dir: PathBuf::from("/var/lib/fleet"),
            cluster_name: "fleet".into(),
            peers: Vec::new(),
            bootstrap_expect: None,
            auth_token: String::new(),
        }
    }
}

/// Raft timing and log compaction.
///
/// The defaults were chosen by measurement on a loaded 2-core machine (docs/operations.md,
/// Timing): a heartbeat every 125 ms (openraft waits one interval for its answer, so round trips
/// up to ~100 ms work) and an election timeout of 150-300 ms (the maximum is the leader lease)
/// caused no spurious elections under write load, and a killed leader is replaced in about
/// 0.3 s. `timing_multiplier` scales all three for slower networks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RaftConfig {
    /// How often the leader sends heartbeats, in milliseconds (before the multiplier).
    #[serde(deserialize_with = "load::duration_ms")]
    pub heartbeat_interval_ms: u64,
    /// The shortest election timeout, in milliseconds (before the multiplier).
    #[serde(deserialize_with = "load::duration_ms")]
    pub election_timeout_min_ms: u64,
    /// The longest election timeout, in milliseconds (before the multiplier).
    #[serde(deserialize_with = "load::duration_ms")]
    pub election_timeout_max_ms: u64,
    /// Scales heartbeat and election timing together: 2.0 doubles every interval.
    pub timing_multiplier: f64,
    /// Build a snapshot after this many log entries since the last one.
    pub snapshot_every_entries: u64,
    /// Log entries to keep behind a snapshot, so a briefly lagging follower catches up from the
    /// log instead of a whole snapshot.
    pub keep_log_entries_after_snapshot: u64,
    /// How long sending one snapshot chunk may take, in milliseconds.
    #[serde(deserialize_with = "load::duration_ms")]
    pub snapshot_chunk_timeout_ms: u64,
    /// The largest snapshot this node accepts from a leader, in bytes.
    pub max_snapshot_bytes: u64,
}

impl Default for RaftConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval_ms: 125,
            election_timeout_min_ms: 150,
            election_timeout_max_ms: 300,
            timing_multiplier: 1.0,
            snapshot_every_entries: 10_000,
            keep_log_entries_after_snapshot: 1_000,
            snapshot_chunk_timeout_ms: 10_000,
            max_snapshot_bytes: 1 << 30,
        }
    }
}

impl RaftConfig {
    fn scaled(&self, ms: u64) -> u64 {
        ((ms as f64) * self.timing_multiplier).round().max(1.0) as u64
    }
    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.scaled(self.heartbeat_interval_ms))
    }
    pub fn election_timeout_min(&self) -> Duration {
        Duration::from_millis(self.scaled(self.election_timeout_min_ms))
    }
    pub fn election_timeout_max(&self) -> Duration {
        Duration::from_millis(self.scaled(self.election_timeout_max_ms))
    }
}

/// How CLI commands find the cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClientConfig {
    /// Replica addresses to try, in order (any subset of the cluster).
    pub peers: Vec<String>,
    /// How long a command keeps retrying (elections, unreachable replicas), in milliseconds.
    #[serde(deserialize_with = "load::duration_ms")]
    pub timeout_ms: u64,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            peers: Vec::new(),
            timeout_ms: 15_000,
        }
    }
}

/// The leader's scheduling loop: lease expiry, worker liveness, retention.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerConfig {
    /// How often the loop checks leases and delayed tasks when nothing else wakes it (ms).
    #[serde(deserialize_with = "load::duration_ms")]
    pub tick_ms: u64,
    /// A worker that sends no heartbeat for this long is lost; all its leases are released at
    /// once, sooner than their visibility timeouts (ms).
    #[serde(deserialize_with = "load::duration_ms")]
    pub worker_liveness_timeout_ms: u64,
    /// After a leader change, no lease expires before this long has passed, so workers can find
    /// the new leader and heartbeat (ms). Every lease also gets a fresh visibility window.
    #[serde(deserialize_with = "load::duration_ms")]
    pub failover_grace_ms: u64,
    /// Finished tasks (succeeded, dead, cancelled) are kept this long, then purged (ms).
    #[serde(deserialize_with = "load::duration_ms")]
    pub retention_ms: u64,
    /// Most tasks one lease request can get.
    pub max_leases_per_request: u32,
    /// Workers not heard from for this long disappear from `fleet worker list` (ms).
    #[serde(deserialize_with = "load::duration_ms")]
    pub forget_workers_after_ms: u64,
    /// Bytes of running attempts' live output this replica keeps in memory for `fleet logs
    /// --follow`, all attempts together (soft state; see docs/tasks.md, "Output").
    pub live_output_bytes: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            tick_ms: 100,
            worker_liveness_timeout_ms: 10_000,
            failover_grace_ms: 5_000,
            retention_ms: 24 * 3600 * 1000,
            max_leases_per_request: 256,
            forget_workers_after_ms: 3600 * 1000,
            live_output_bytes: 64 << 20,
        }
    }
}

/// Stall detection: how a replica judges its own progress, and when it gives up leadership.
///
/// The defaults and their reasoning are in docs/operations.md ("Health").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthConfig {
    /// A scheduling loop (or a follower's apply, or an fsync) that has made no progress for this
    /// long is stalled (ms). A stalled leader stops granting and hands leadership over.
    #[serde(deserialize_with = "load::duration_ms")]
    pub stall_threshold_ms: u64,
    /// How often the replica checks its own progress (ms).
    #[serde(deserialize_with = "load::duration_ms")]
    pub check_interval_ms: u64,
    /// How often the replica asks the other replicas for their health, for the cluster view
    /// (ms). A replica that has not answered for three intervals is reported unreachable.
    #[serde(deserialize_with = "load::duration_ms")]
    pub peer_poll_interval_ms: u64,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            stall_threshold_ms: 3_000,
            check_interval_ms: 250,
            peer_poll_interval_ms: 1_000,
        }
    }
}

/// Logging: `tracing` to standard error (journald under systemd).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// A `tracing` filter: `info`, `debug`, `fleet=debug,openraft=warn`, ... Empty: `info` for
    /// replicas and workers, `warn` for other commands. `RUST_LOG`, when set, wins.
    pub level: String,
    /// `text` (human; coloured on a terminal) or `json` (one object per line, with the span
    /// fields: node, worker, task, attempt; for journald, Loki, Elasticsearch).
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Metrics (listed in docs/metrics.md): StatsD export and the Prometheus `/metrics` endpoint
/// on `node.http_listen`. Replicas emit them; the leader emits the cluster-wide ones.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Send metrics to a StatsD daemon over UDP.
    pub statsd: bool,
    /// The StatsD daemon's host name or address.
    pub statsd_host: String,
    /// The StatsD daemon's UDP port.
    pub statsd_port: u16,
    /// Prepended to every StatsD name (`fleet.scheduler_heartbeat`) and, with `_`, to every
    /// Prometheus name (`fleet_scheduler_heartbeat_total`).
    pub prefix: String,
    /// Serve `/metrics` in the Prometheus text format on `node.http_listen`.
    pub prometheus: bool,
    /// How often gauges (tasks by state, queue age, workers, Raft indexes) are sampled (ms).
    #[serde(deserialize_with = "load::duration_ms")]
    pub interval_ms: u64,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            statsd: false,
            statsd_host: "127.0.0.1".into(),
            statsd_port: 8125,
            prefix: "fleet".into(),
            prometheus: true,
            interval_ms: 1_000,
        }
    }
}

/// Fault injection for tests and the chaos harness: `fleet fault ...` can stall this replica's
/// scheduling loop or its fsyncs. Refused unless enabled here; never enable it in production.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaultInjectionConfig {
    pub enabled: bool,
}

/// Defaults for a task's policy; `fleet submit` options override them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TaskDefaults {
    pub priority: i32,
    /// Attempts before the task is dead (the first run counts).
    pub max_attempts: u32,
    /// Delay before the first retry (ms); each later retry multiplies it.
    #[serde(deserialize_with = "load::duration_ms")]
    pub backoff_initial_ms: u64,
    /// Longest delay between retries (ms).
    #[serde(deserialize_with = "load::duration_ms")]
    pub backoff_max_ms: u64,
    /// Factor between consecutive retry delays (1.0 to 10.0). Each delay is jittered down to
    /// half its value by a random draw of the leader.
    pub backoff_multiplier: f64,
    /// How long one attempt may run before it is killed (ms); 0 for no limit.
    #[serde(deserialize_with = "load::duration_ms")]
    pub execution_timeout_ms: u64,
    /// How long a lease stays valid without a heartbeat (ms).
    #[serde(deserialize_with = "load::duration_ms")]
    pub visibility_timeout_ms: u64,
}

impl Default for TaskDefaults {
    fn default() -> Self {
        let r = crate::state::RetryPolicy::default();
        Self {
            priority: 0,
            max_attempts: r.max_attempts,
            backoff_initial_ms: r.backoff_initial_ms,
            backoff_max_ms: r.backoff_max_ms,
            backoff_multiplier: f64::from(r.backoff_multiplier_permille) / 1000.0,
            execution_timeout_ms: 0,
            visibility_timeout_ms: 30_000,
        }
    }
}

/// Per-queue overrides: any key of [`TaskDefaults`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueueDefaults {
    pub priority: Option<i32>,
    pub max_attempts: Option<u32>,
    #[serde(deserialize_with = "load::opt_duration_ms")]
    pub backoff_initial_ms: Option<u64>,
    #[serde(deserialize_with = "load::opt_duration_ms")]
    pub backoff_max_ms: Option<u64>,
    pub backoff_multiplier: Option<f64>,
    #[serde(deserialize_with = "load::opt_duration_ms")]
    pub execution_timeout_ms: Option<u64>,
    #[serde(deserialize_with = "load::opt_duration_ms")]
    pub visibility_timeout_ms: Option<u64>,
    /// Most tasks of the queue running at once across the fleet (the leader grants no more).
    pub max_running: Option<u32>,
    /// How a worker runs the queue's attempts: "oneshot" (a process per attempt, the
    /// default) or "persistent" (attempts are fed one by one to long-lived processes started
    /// with `executor_command`; see docs/tasks.md). Read by workers, not by replicas.
    pub executor: Option<String>,
    /// The command that starts a persistent executor process (`executor = "persistent"`).
    pub executor_command: Option<Vec<String>>,
}

impl QueueDefaults {
    /// The persistent executor command, if the queue has one (after [`Config::validate`]).
    pub fn persistent_command(&self) -> Option<&[String]> {
        match self.executor.as_deref() {
            Some("persistent") => self.executor_command.as_deref(),
            _ => None,
        }
    }

    fn executor_valid(&self, q: &str) -> anyhow::Result<()> {
        match (self.executor.as_deref(), &self.executor_command) {
            (None | Some("oneshot"), None) => Ok(()),
            (Some("persistent"), Some(c)) if !c.is_empty() && !c[0].is_empty() => Ok(()),
            (Some("persistent"), _) => anyhow::bail!(
                "queues.{q}.executor = \"persistent\" needs queues.{q}.executor_command, the \
                 program (and its arguments) that starts the long-lived process, e.g. \
                 [\"python3\", \"/srv/handler.py\"]"
            ),
            (None | Some("oneshot"), Some(_)) => anyhow::bail!(
                "queues.{q}.executor_command is only used with executor = \"persistent\": add \
                 that, or remove the command"
            ),
            (Some(other), _) => anyhow::bail!(
                "queues.{q}.executor = {other:?} is not valid: use \"oneshot\" (a process per \
                 attempt, the default) or \"persistent\""
            ),
        }
    }
}

/// A worker process (`fleet worker`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    /// Queues to take tasks from.
    pub queues: Vec<String>,
    /// Attempts run at once.
    pub concurrency: u32,
    /// One heartbeat covering every lease is sent this often (ms). Keep it well below the
    /// visibility timeouts and `scheduler.worker_liveness_timeout_ms`.
    #[serde(deserialize_with = "load::duration_ms")]
    pub heartbeat_interval_ms: u64,
    /// How long an idle worker's lease request waits at the leader for work (ms).
    #[serde(deserialize_with = "load::duration_ms")]
    pub poll_wait_ms: u64,
    /// After SIGTERM to an attempt's process group (timeout, cancel, fencing), SIGKILL follows
    /// after this long (ms).
    #[serde(deserialize_with = "load::duration_ms")]
    pub kill_grace_ms: u64,
    /// On SIGTERM, running attempts get this long to finish before they are killed and their
    /// leases handed back (ms).
    #[serde(deserialize_with = "load::duration_ms")]
    pub drain_timeout_ms: u64,
    /// Bytes of each attempt's output (stdout and stderr together) the worker keeps: streamed
    /// live to the replicas while the attempt runs, and reported with its end, when they are
    /// replicated and kept with the task.
    pub output_tail_bytes: usize,
    /// The most output per second of one attempt streamed live (`fleet logs --follow`);
    /// a task printing faster shows gaps live, and its kept tail is unaffected.
    pub output_stream_bytes_per_sec: usize,
    /// How the processes an attempt starts are ended with it, even those that left its process
    /// group: "cgroup" (a cgroup v2 per attempt; needs a writable cgroup tree: root or
    /// systemd's Delegate=yes), "subreaper" (PR_SET_CHILD_SUBREAPER and the attempt's fencing
    /// token in the environment), or "auto" (cgroup when possible). See docs/tasks.md.
    pub containment: String,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            queues: vec![crate::state::DEFAULT_QUEUE.to_string()],
            concurrency: 4,
            heartbeat_interval_ms: 1_000,
            poll_wait_ms: 10_000,
            kill_grace_ms: 5_000,
            drain_timeout_ms: 60_000,
            output_tail_bytes: 1 << 20,
            output_stream_bytes_per_sec: 256 << 10,
            containment: "auto".into(),
        }
    }
}

impl Config {
    /// The effective task defaults for `queue`: `[tasks]` with `[queues.<queue>]` on top.
    pub fn task_defaults(&self, queue: &str) -> TaskDefaults {
        let mut d = self.tasks.clone();
        if let Some(q) = self.queues.get(queue) {
            d.priority = q.priority.unwrap_or(d.priority);
            d.max_attempts = q.max_attempts.unwrap_or(d.max_attempts);
            d.backoff_initial_ms = q.backoff_initial_ms.unwrap_or(d.backoff_initial_ms);
            d.backoff_max_ms = q.backoff_max_ms.unwrap_or(d.backoff_max_ms);
            d.backoff_multiplier = q.backoff_multiplier.unwrap_or(d.backoff_multiplier);
            d.execution_timeout_ms = q.execution_timeout_ms.unwrap_or(d.execution_timeout_ms);
            d.visibility_timeout_ms = q.visibility_timeout_ms.unwrap_or(d.visibility_timeout_ms);
        }
        d
    }

    /// Reads a TOML file, then the `FLEET__*` environment (see [`load`]). Unknown keys, wrong
    /// types and bad durations are errors naming the key.
    pub fn load(path: Option<&Path>) -> anyhow::Result<Config> {
        load::load(path, std::env::vars())
    }

    /// Checks every value once, at start; the first bad value is the error, naming its key.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.validate_node()?;
        self.validate_raft()?;
        self.validate_client()?;
        self.validate_scheduler()?;
        self.validate_health()?;
        self.validate_queues()?;
        self.validate_worker()?;
        self.validate_metrics()
    }

    /// `[node]`: addresses, the bootstrap set, the token and the cluster name.
    fn validate_node(&self) -> anyhow::Result<()> {
        let n = &self.node;
        if n.id == Some(0) {
            anyhow::bail!("node.id = 0 is not valid: node ids start at 1");
        }
        parse_addr("node.listen", &n.listen)?;
        if let Some(a) = &n.advertise {
            parse_addr("node.advertise", a)?;
        }
        if !n.http_listen.is_empty() {
            parse_addr("node.http_listen", &n.http_listen)?;
        }
        for p in &n.peers {
            parse_addr("node.peers", p)?;
        }
        if let Some(e) = n.bootstrap_expect {
            if !(1..=9).contains(&e) {
                anyhow::bail!(
                    "node.bootstrap_expect = {e} is not valid: use 1 to 9 (3 or 5 in production)"
                );
            }
        }
        if let Some(e) = n.bootstrap_expect {
            let mut named: Vec<&str> = n.peers.iter().map(String::as_str).collect();
            let me = self.advertise_addr();
            named.push(&me);
            named.sort();
            named.dedup();
            if named.len() < e {
                anyhow::bail!(
                    "node.bootstrap_expect = {e}, but node.peers names only {} node(s) including \
                     this one; list every node of the first set in --peers",
                    named.len()
                );
            }
        }
        if n.auth_token.len() > 4096 || n.auth_token.chars().any(char::is_control) {
            anyhow::bail!(
                "node.auth_token ({} bytes) is not valid: use at most 4096 bytes without control \
                 characters (the value is not shown: it is a secret)",
                n.auth_token.len()
            );
        }
        if n.cluster_name.is_empty() || n.cluster_name.len() > 64 {
            anyhow::bail!(
                "node.cluster_name = {:?} is not valid: use 1 to 64 characters",
                n.cluster_name
            );
        }
        Ok(())
    }

    /// `[raft]`: timings that can elect a leader, snapshot settings.
    fn validate_raft(&self) -> anyhow::Result<()> {
        let r = &self.raft;
        if !(r.timing_multiplier.is_finite() && (0.1..=100.0).contains(&r.timing_multiplier)) {
            anyhow::bail!(
                "raft.timing_multiplier = {} is not valid: use a number from 0.1 to 100",
                r.timing_multiplier
            );
        }
        if r.heartbeat_interval_ms == 0 {
            anyhow::bail!("raft.heartbeat_interval_ms = 0 is not valid: use at least 1");
        }
        // A follower stands for election after hearing nothing for the lease it granted
        // (election_timeout_max) plus a random time in [min, max]: at least three heartbeats
        // must fit in the shortest such wait, and openraft needs min above the heartbeat.
        if r.election_timeout_min_ms <= r.heartbeat_interval_ms
            || r.election_timeout_min_ms + r.election_timeout_max_ms < 3 * r.heartbeat_interval_ms
        {
            anyhow::bail!(
                "raft.election_timeout_min_ms = {} is not valid with \
                 raft.heartbeat_interval_ms = {}: it must be greater than the heartbeat \
                 interval, and min + max must be at least three heartbeat intervals",
                r.election_timeout_min_ms,
                r.heartbeat_interval_ms,
            );
        }
        if r.election_timeout_max_ms <= r.election_timeout_min_ms {
            anyhow::bail!(
                "raft.election_timeout_max_ms = {} is not valid: it must be greater than \
                 raft.election_timeout_min_ms ({})",
                r.election_timeout_max_ms,
                r.election_timeout_min_ms
            );
        }
        if r.snapshot_every_entries == 0 {
            anyhow::bail!("raft.snapshot_every_entries = 0 is not valid: use at least 1");
        }
        if r.snapshot_chunk_timeout_ms < 100 {
            anyhow::bail!(
                "raft.snapshot_chunk_timeout_ms = {} is not valid: use at least 100",
                r.snapshot_chunk_timeout_ms
            );
        }
        if r.max_snapshot_bytes < (1 << 20) {
            anyhow::bail!(
                "raft.max_snapshot_bytes = {} is not valid: use at least 1048576 (1 MiB)",
                r.max_snapshot_bytes
            );
        }
        Ok(())
    }

    /// `[client]`.
    fn validate_client(&self) -> anyhow::Result<()> {
        if self.client.timeout_ms == 0 {
            anyhow::bail!("client.timeout_ms = 0 is not valid: use at least 1");
        }
        for p in &self.client.peers {
            parse_addr("client.peers", p)?;
        }
        Ok(())
    }

    /// `[scheduler]`.
    fn validate_scheduler(&self) -> anyhow::Result<()> {
        let s = &self.scheduler;
        check_range("scheduler.tick_ms", s.tick_ms, 10, 10_000)?;
        check_range(
            "scheduler.worker_liveness_timeout_ms",
            s.worker_liveness_timeout_ms,
            500,
            crate::state::MAX_TIMEOUT_MS,
        )?;
        check_range(
            "scheduler.failover_grace_ms",
            s.failover_grace_ms,
            0,
            3_600_000,
        )?;
        check_range(
            "scheduler.retention_ms",
            s.retention_ms,
            1_000,
            365 * 24 * 3_600_000,
        )?;
        check_range(
            "scheduler.max_leases_per_request",
            u64::from(s.max_leases_per_request),
            1,
            10_000,
        )?;
        check_range(
            "scheduler.forget_workers_after_ms",
            s.forget_workers_after_ms,
            1_000,
            30 * 24 * 3_600_000,
        )?;
        check_range(
            "scheduler.live_output_bytes",
            s.live_output_bytes as u64,
            1 << 20,
            16 << 30,
        )?;
        Ok(())
    }

    /// `[health]` (its stall threshold against the scheduler's tick).
    fn validate_health(&self) -> anyhow::Result<()> {
        let h = &self.health;
        check_range(
            "health.stall_threshold_ms",
            h.stall_threshold_ms,
            (3 * self.scheduler.tick_ms).max(500),
            3_600_000,
        )?;
        check_range(
            "health.check_interval_ms",
            h.check_interval_ms,
            10,
            h.stall_threshold_ms.max(10),
        )?;
        check_range(
            "health.peer_poll_interval_ms",
            h.peer_poll_interval_ms,
            100,
            60_000,
        )?;
        Ok(())
    }

    /// `[tasks]` and every `[queues.NAME]`.
    fn validate_queues(&self) -> anyhow::Result<()> {
        self.task_defaults_valid("tasks", &self.tasks)?;
        for q in self.queues.keys() {
            crate::state::validate_queue_name(q)
                .map_err(|e| anyhow::anyhow!("[queues.{q}]: {e}"))?;
            self.task_defaults_valid(&format!("queues.{q}"), &self.task_defaults(q))?;
            self.queues[q].executor_valid(q)?;
            if self.queues[q].max_running == Some(0) {
                anyhow::bail!(
                    "queues.{q}.max_running = 0 is not valid: use 1 or more, or leave it out \
                     for no limit"
                );
            }
        }
        Ok(())
    }

    /// `[worker]` (its heartbeat against the scheduler's liveness timeout).
    fn validate_worker(&self) -> anyhow::Result<()> {
        let w = &self.worker;
        if w.queues.is_empty() {
            anyhow::bail!("worker.queues = [] is not valid: name at least one queue");
        }
        for q in &w.queues {
            crate::state::validate_queue_name(q)
                .map_err(|e| anyhow::anyhow!("worker.queues: {e}"))?;
        }
        check_range("worker.concurrency", u64::from(w.concurrency), 1, 4096)?;
        check_range(
            "worker.heartbeat_interval_ms",
            w.heartbeat_interval_ms,
            50,
            60_000,
        )?;
        if w.heartbeat_interval_ms.saturating_mul(3) > self.scheduler.worker_liveness_timeout_ms {
            anyhow::bail!(
                "worker.heartbeat_interval_ms = {} is too long for \
                 scheduler.worker_liveness_timeout_ms = {}: a worker must be able to miss two \
                 heartbeats before it is declared lost (use at most a third of it)",
                w.heartbeat_interval_ms,
                self.scheduler.worker_liveness_timeout_ms
            );
        }
        check_range("worker.poll_wait_ms", w.poll_wait_ms, 0, 60_000)?;
        check_range("worker.kill_grace_ms", w.kill_grace_ms, 0, 600_000)?;
        if !["auto", "cgroup", "subreaper"].contains(&w.containment.as_str()) {
            anyhow::bail!(
                "worker.containment = {:?} is not valid: use \"auto\", \"cgroup\" or \"subreaper\"",
                w.containment
            );
        }
        check_range("worker.drain_timeout_ms", w.drain_timeout_ms, 0, 86_400_000)?;
        check_range(
            "worker.output_tail_bytes",
            self.worker.output_tail_bytes as u64,
            0,
            1 << 20,
        )?;
        check_range(
            "worker.output_stream_bytes_per_sec",
            self.worker.output_stream_bytes_per_sec as u64,
            1024,
            64 << 20,
        )?;
        Ok(())
    }

    /// `[metrics]`.
    fn validate_metrics(&self) -> anyhow::Result<()> {
        let m = &self.metrics;
        if m.statsd {
            if m.statsd_host.is_empty() {
                anyhow::bail!("metrics.statsd_host = \"\" is not valid: name the StatsD host");
            }
            if m.statsd_port == 0 {
                anyhow::bail!("metrics.statsd_port = 0 is not valid: use 1 to 65535");
            }
        }
        if m.prefix.is_empty()
            || !m
                .prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
            || m.prefix.starts_with(|c: char| c.is_ascii_digit())
        {
            anyhow::bail!(
                "metrics.prefix = {:?} is not valid: use letters, digits, '_' and '.', not \
                 starting with a digit",
                m.prefix
            );
        }
        check_range("metrics.interval_ms", m.interval_ms, 100, 600_000)?;
        Ok(())
    }

    fn task_defaults_valid(&self, key: &str, d: &TaskDefaults) -> anyhow::Result<()> {
        d.to_policy()
            .validate()
            .map_err(|e| anyhow::anyhow!("[{key}]: {e}"))?;
        check_range(
            &format!("{key}.visibility_timeout_ms"),
            d.visibility_timeout_ms,
            100,
            crate::state::MAX_TIMEOUT_MS,
        )?;
        check_range(
            &format!("{key}.execution_timeout_ms"),
            d.execution_timeout_ms,
            0,
            crate::state::MAX_TIMEOUT_MS,
        )?;
        Ok(())
    }

    /// The address stored in the membership for this node.
    pub fn advertise_addr(&self) -> String {
        self.node
            .advertise
            .clone()
            .unwrap_or_else(|| self.node.listen.clone())
    }
}

impl TaskDefaults {
    /// The retry policy these defaults describe.
    pub fn to_policy(&self) -> crate::state::RetryPolicy {
        crate::state::RetryPolicy {
            max_attempts: self.max_attempts,
            backoff_initial_ms: self.backoff_initial_ms,
            backoff_max_ms: self.backoff_max_ms,
            backoff_multiplier_permille: multiplier_permille(self.backoff_multiplier),
        }
    }
}

/// A backoff multiplier as thousandths (out-of-range values stay out of range, to be reported).
pub fn multiplier_permille(x: f64) -> u32 {
    if x.is_finite() && x >= 0.0 {
        (x * 1000.0).round().min(u32::MAX as f64) as u32
    } else {
        u32::MAX
    }
}

fn check_range(key: &str, value: u64, min: u64, max: u64) -> anyhow::Result<()> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        anyhow::bail!("{key} = {value} is not valid: use {min} to {max}")
    }
}

/// Parses `host:port`, resolving names; the error names the key and the value.
pub fn parse_addr(key: &str, value: &str) -> anyhow::Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    let bad = |why: String| {
        anyhow::anyhow!("{key}: {value:?} is not a valid address ({why}); expected host:port, e.g. 127.0.0.1:7101")
    };
    let (host, port) = value
        .rsplit_once(':')
        .ok_or_else(|| bad("no port".into()))?;
    if host.is_empty() {
        return Err(bad("no host".into()));
    }
    port.parse::<u16>()
        .map_err(|_| bad(format!("port {port:?} is not a number from 0 to 65535")))?;
    value
        .to_socket_addrs()
        .map_err(|e| bad(e.to_string()))?
        .next()
        .ok_or_else(|| bad("the name resolves to no address".into()))
}

/// Splits a comma-separated peer list, validating each address.
pub fn parse_peer_list(key: &str, value: &str) -> anyhow::Result<Vec<String>> {
    let peers: Vec<String> = value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    if peers.is_empty() {
        anyhow::bail!("{key}: {value:?} names no address; expected host:port[,host:port...]");
    }
    for p in &peers {
        parse_addr(key, p)?;
    }
    Ok(peers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_key_is_an_error_naming_it() {
        let err = toml::from_str::<Config>("[raft]\nheartbeat_interval = 5\n").unwrap_err();
        assert!(err.to_string().contains("heartbeat_interval"), "{err}");
    }

    #[test]
    fn a_queue_executor_is_checked() {
        let check = |executor: Option<&str>, command: Option<Vec<&str>>| {
            let mut c = Config::default();
            let q = QueueDefaults {
                executor: executor.map(String::from),
                executor_command: command.map(|c| c.into_iter().map(String::from).collect()),
                ..Default::default()
            };
            c.queues.insert("py".into(), q.clone());
            c.validate()
                .map(|()| q.persistent_command().map(<[String]>::to_vec))
                .map_err(|e| e.to_string())
        };
        assert_eq!(
            check(Some("persistent"), Some(vec!["python3", "h.py"])),
            Ok(Some(vec!["python3".to_string(), "h.py".to_string()]))
        );
        assert_eq!(check(None, None), Ok(None));
        assert_eq!(check(Some("oneshot"), None), Ok(None));
        let e = check(Some("persistent"), None).unwrap_err();
        assert!(e.contains("queues.py.executor_command"), "{e}");
        let e = check(Some("persistent"), Some(vec![])).unwrap_err();
        assert!(e.contains("queues.py.executor_command"), "{e}");
        let e = check(None, Some(vec!["python3"])).unwrap_err();
        assert!(
            e.contains("only used with executor = \"persistent\""),
            "{e}"
        );
        let e = check(Some("forked"), None).unwrap_err();
        assert!(
            e.contains("queues.py.executor = \"forked\"") && e.contains("\"oneshot\""),
            "{e}"
        );
    }

    #[test]
    fn bad_values_are_named() {
        let mut c = Config::default();
        c.raft.election_timeout_min_ms = 100;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("raft.election_timeout_min_ms = 100"), "{e}");
        let mut c = Config::default();
        c.worker.heartbeat_interval_ms = 5_000;
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("worker.heartbeat_interval_ms = 5000")
                && e.contains("scheduler.worker_liveness_timeout_ms = 10000"),
            "{e}"
        );
        let mut c = Config::default();
        c.queues.insert(
            "reports".into(),
            QueueDefaults {
                max_attempts: Some(0),
                ..Default::default()
            },
        );
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("[queues.reports]") && e.contains("max attempts 0"),
            "{e}"
        );
        let mut c = Config::default();
        c.queues.insert(
            "reports".into(),
            QueueDefaults {
                max_running: Some(0),
                ..Default::default()
            },
        );
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("queues.reports.max_running = 0"), "{e}");
        let e = parse_addr("node.peers", "localhost")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("\"localhost\"") && e.contains("host:port"),
            "{e}"
        );
        let e = parse_addr("node.peers", "127.0.0.1:99999")
            .unwrap_err()
            .to_string();
        assert!(e.contains("99999"), "{e}");
    }

    #[test]
    fn multiplier_scales_all_timing() {
        let r = RaftConfig {
            timing_multiplier: 2.0,
            ..Default::default()
        };
        assert_eq!(r.heartbeat_interval(), Duration::from_millis(250));
        assert_eq!(r.election_timeout_min(), Duration::from_millis(300));
        assert_eq!(r.election_timeout_max(), Duration::from_millis(600));
    }
}

#[cfg(test)]
mod example_file_tests {
    use super::*;

    /// config/fleet.example.toml must parse (no stale keys) and mention every key of
    /// [`Config`] (no undocumented ones).
    #[test]
    fn example_config_documents_every_key() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/fleet.example.toml");
        let text = std::fs::read_to_string(path).unwrap();
        let parsed: Config = toml::from_str(&text).expect("example config parses");
        parsed.validate().expect("example config is valid");
        let defaults = toml::Value::try_from(Config::default()).unwrap();
        for (section, table) in defaults.as_table().unwrap() {
            assert!(
                text.contains(&format!("[{section}]")),
                "section [{section}] missing"
            );
            for key in table.as_table().unwrap().keys() {
                assert!(
                    text.contains(&format!("{key} =")),
                    "{section}.{key} missing from the example"
                );
            }
        }
        for key in ["id", "advertise", "bootstrap_expect"] {
            assert!(
                text.contains(&format!("# {key} =")),
                "optional node.{key} missing"
            );
        }
    }
}
