//! Every metric fleet records: name, kind, labels (in StatsD flattening order), unit, meaning.
//!
//! docs/metrics.md documents each one (a test checks that it names every entry of
//! [`CATALOG`]); the names follow Airflow's StatsD metrics where the meaning is the same
//! (`scheduler_heartbeat`, `scheduler.tasks.starving`, `executor.open_slots`).
//!
//! No StatsD name may be a prefix-with-wildcard of another (`workers.<state>` next to
//! `workers.open_slots` would make `statsd_exporter`'s mapping ambiguous): the test
//! `statsd_names_are_unambiguous` checks it.

use metrics::Unit;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// One metric.
#[derive(Debug, Clone, Copy)]
pub struct Def {
    pub name: &'static str,
    pub kind: Kind,
    pub labels: &'static [&'static str],
    pub unit: Option<Unit>,
    pub help: &'static str,
}

impl Def {
    /// The name in Prometheus's exposition (without `_bucket`/`_sum`/`_count`).
    pub fn prometheus_name(&self, prefix: &str) -> String {
        let mut n = format!("{prefix}_{}", self.name).replace('.', "_");
        match self.unit {
            Some(Unit::Seconds) => n.push_str("_seconds"),
            Some(Unit::Bytes) => n.push_str("_bytes"),
            _ => {}
        }
        if self.kind == Kind::Counter {
            n.push_str("_total");
        }
        n
    }
}

pub const SCHEDULER_HEARTBEAT: &str = "scheduler_heartbeat";
pub const SCHEDULER_LOOP_DURATION: &str = "scheduler.loop_duration";
pub const SCHEDULER_LOOP_LAG: &str = "scheduler.loop_lag";
pub const SCHEDULER_TASKS_STARVING: &str = "scheduler.tasks.starving";
pub const TASKS: &str = "tasks";
pub const QUEUE_OLDEST_READY_AGE: &str = "queue.oldest_ready_age";
pub const TASKS_SUBMITTED: &str = "task.submitted";
pub const TASKS_DEAD: &str = "task.dead";
pub const TASK_DURATION: &str = "task.duration";
pub const TASK_QUEUED_DURATION: &str = "task.queued_duration";
pub const ATTEMPTS_SUCCEEDED: &str = "attempts.succeeded";
pub const ATTEMPTS_FAILED: &str = "attempts.failed";
pub const ATTEMPTS_TIMED_OUT: &str = "attempts.timed_out";
pub const LEASE_GRANTED: &str = "lease.granted";
pub const LEASE_EXTENDED: &str = "lease.extended";
pub const LEASE_EXPIRED: &str = "lease.expired";
pub const LEASE_FENCED: &str = "lease.fenced";
pub const WORKERS: &str = "workers";
pub const WORKERS_OPEN_SLOTS: &str = "executor.open_slots";
pub const RAFT_TERM: &str = "raft.term";
pub const RAFT_IS_LEADER: &str = "raft.is_leader";
pub const RAFT_LEADER_CHANGES: &str = "raft.leader_changes";
pub const RAFT_LAST_LOG_INDEX: &str = "raft.last_log_index";
pub const RAFT_COMMIT_INDEX: &str = "raft.commit_index";
pub const RAFT_APPLIED_INDEX: &str = "raft.applied_index";
pub const RAFT_REPLICATION_LAG: &str = "raft.replication_lag";
pub const RAFT_SNAPSHOT_SIZE: &str = "raft.snapshot.size";
pub const RAFT_SNAPSHOT_DURATION: &str = "raft.snapshot.duration";
pub const STORAGE_FSYNC_DURATION: &str = "storage.fsync_duration";
pub const SCHEDULE_TICKS: &str = "schedule.ticks";
pub const SCHEDULE_TICK_LATENESS: &str = "schedule.tick_lateness";
pub const POOL_OPEN_SLOTS: &str = "pool.open_slots";
pub const POOL_RUNNING_SLOTS: &str = "pool.running_slots";
pub const POOL_QUEUED_TASKS: &str = "pool.queued_tasks";
pub const WORKFLOW_RUNS: &str = "workflow.runs";
pub const WORKFLOW_RUN_DURATION: &str = "workflow.run_duration";

use Kind::*;

const S: Option<Unit> = Some(Unit::Seconds);

/// Every metric, in the order docs/metrics.md lists them.
#[rustfmt::skip]
pub const CATALOG: &[Def] = &[
    Def { name: SCHEDULER_HEARTBEAT, kind: Counter, labels: &[], unit: None,
        help: "Incremented every metrics interval while this replica leads and its scheduling loop is making progress." },
    Def { name: SCHEDULER_LOOP_DURATION, kind: Histogram, labels: &[], unit: S,
        help: "Time one working iteration of the leader's scheduling loop took (a tick: expiries and purges; or answering lease requests)." },
    Def { name: SCHEDULER_LOOP_LAG, kind: Gauge, labels: &["node"], unit: S,
        help: "Time since this replica's scheduling loop last completed an iteration." },
    Def { name: SCHEDULER_TASKS_STARVING, kind: Gauge, labels: &["queue"], unit: None,
        help: "Ready tasks of a queue that no active worker has a free slot for." },
    Def { name: TASKS, kind: Gauge, labels: &["queue", "state"], unit: None,
        help: "Tasks per queue and state: ready, delayed, running, failed (waiting to retry), succeeded, dead, cancelled." },
    Def { name: QUEUE_OLDEST_READY_AGE, kind: Gauge, labels: &["queue"], unit: S,
        help: "How long the oldest ready task of a queue has been waiting (0 when none is)." },
    Def { name: TASKS_SUBMITTED, kind: Counter, labels: &["queue"], unit: None,
        help: "Tasks accepted (committed), not counting duplicates of an idempotency key." },
    Def { name: TASKS_DEAD, kind: Counter, labels: &["queue"], unit: None,
        help: "Tasks that became dead: their last allowed attempt failed, timed out or was lost." },
    Def { name: TASK_DURATION, kind: Histogram, labels: &["queue"], unit: S,
        help: "Run time of finished attempts (start to report), any outcome." },
    Def { name: TASK_QUEUED_DURATION, kind: Histogram, labels: &["queue"], unit: S,
        help: "Time from ready (submitted, or retry backoff over) to lease grant." },
    Def { name: ATTEMPTS_SUCCEEDED, kind: Counter, labels: &["queue"], unit: None,
        help: "Attempts that exited 0." },
    Def { name: ATTEMPTS_FAILED, kind: Counter, labels: &["queue"], unit: None,
        help: "Attempts that exited non-zero, were killed by a signal or could not start." },
    Def { name: ATTEMPTS_TIMED_OUT, kind: Counter, labels: &["queue"], unit: None,
        help: "Attempts killed by their execution timeout." },
    Def { name: LEASE_GRANTED, kind: Counter, labels: &["queue"], unit: None,
        help: "Leases granted (each starts an attempt)." },
    Def { name: LEASE_EXTENDED, kind: Counter, labels: &[], unit: None,
        help: "Lease extensions by worker heartbeats (one per lease per heartbeat)." },
    Def { name: LEASE_EXPIRED, kind: Counter, labels: &["cause"], unit: None,
        help: "Leases taken back by the leader: cause visibility_timeout (no heartbeat for the lease), worker_lost (no heartbeat from the worker), handed_back (a draining or departing worker), requeued (fleet task requeue)." },
    Def { name: LEASE_FENCED, kind: Counter, labels: &["call"], unit: None,
        help: "Heartbeats (call=heartbeat) or reports (call=report) rejected for a stale fencing token: a worker acted on a lease it had lost." },
    Def { name: WORKERS, kind: Gauge, labels: &["state"], unit: None,
        help: "Workers the leader knows, by state: active, draining, lost." },
    Def { name: WORKERS_OPEN_SLOTS, kind: Gauge, labels: &[], unit: None,
        help: "Free attempt slots over all active workers." },
    Def { name: RAFT_TERM, kind: Gauge, labels: &["node"], unit: None,
        help: "This replica's current Raft term." },
    Def { name: RAFT_IS_LEADER, kind: Gauge, labels: &["node"], unit: None,
        help: "1 while this replica is the leader, else 0." },
    Def { name: RAFT_LEADER_CHANGES, kind: Counter, labels: &["node"], unit: None,
        help: "Times this replica saw the leader change (to a new leader or to none)." },
    Def { name: RAFT_LAST_LOG_INDEX, kind: Gauge, labels: &["node"], unit: None,
        help: "Index of the last entry in this replica's log (fsynced)." },
    Def { name: RAFT_COMMIT_INDEX, kind: Gauge, labels: &["node"], unit: None,
        help: "Highest log index this replica knows to be committed." },
    Def { name: RAFT_APPLIED_INDEX, kind: Gauge, labels: &["node"], unit: None,
        help: "Highest log index this replica has applied to its state." },
    Def { name: RAFT_REPLICATION_LAG, kind: Gauge, labels: &["node", "follower"], unit: None,
        help: "On the leader: log entries a follower is behind the leader's last entry." },
    Def { name: RAFT_SNAPSHOT_SIZE, kind: Gauge, labels: &["node"], unit: Some(Unit::Bytes),
        help: "Size of the latest snapshot this replica built." },
    Def { name: RAFT_SNAPSHOT_DURATION, kind: Histogram, labels: &["node"], unit: S,
        help: "Time to build and fsync a snapshot." },
    Def { name: STORAGE_FSYNC_DURATION, kind: Histogram, labels: &["node"], unit: S,
        help: "Latency of one fsync of the Raft log (one group commit)." },
    Def { name: SCHEDULE_TICKS, kind: Counter, labels: &["schedule", "result"], unit: None,
        help: "Ticks of a schedule decided by the leader: result fired (a run was created or queued), missed (passed while no leader could fire it and not caught up) or skipped (overlap policy)." },
    Def { name: SCHEDULE_TICK_LATENESS, kind: Histogram, labels: &["schedule"], unit: S,
        help: "Time from a tick's fire time to the lease grant of its run's first attempt." },
    Def { name: POOL_OPEN_SLOTS, kind: Gauge, labels: &["pool"], unit: None,
        help: "Slots of a pool not held by a leased attempt (Airflow's pool.open_slots)." },
    Def { name: POOL_RUNNING_SLOTS, kind: Gauge, labels: &["pool"], unit: None,
        help: "Slots of a pool held by leased attempts." },
    Def { name: POOL_QUEUED_TASKS, kind: Gauge, labels: &["pool"], unit: None,
        help: "Tasks of a pool waiting for a lease." },
    Def { name: WORKFLOW_RUNS, kind: Counter, labels: &["workflow", "result"], unit: None,
        help: "Runs of a workflow: result started (left the max_active_runs queue), succeeded, failed or cancelled." },
    Def { name: WORKFLOW_RUN_DURATION, kind: Histogram, labels: &["workflow"], unit: S,
        help: "Time from a run's start to its end (succeeded, failed or cancelled)." },
];

/// Registers the descriptions and units with the installed recorder.
pub fn describe() {
    for d in CATALOG {
        let help: metrics::SharedString = d.help.into();
        match (d.kind, d.unit) {
            (Counter, Some(u)) => metrics::describe_counter!(d.name, u, help),
            (Counter, None) => metrics::describe_counter!(d.name, help),
            (Gauge, Some(u)) => metrics::describe_gauge!(d.name, u, help),
            (Gauge, None) => metrics::describe_gauge!(d.name, help),
            (Histogram, Some(u)) => metrics::describe_histogram!(d.name, u, help),
            (Histogram, None) => metrics::describe_histogram!(d.name, help),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docs_list_every_metric_with_its_names() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/metrics.md");
        let doc = std::fs::read_to_string(path).unwrap();
        for d in CATALOG {
            let statsd = std::iter::once(format!("fleet.{}", d.name))
                .chain(d.labels.iter().map(|l| format!("<{l}>")))
                .collect::<Vec<_>>()
                .join(".");
            assert!(
                doc.contains(&format!("`{statsd}`")),
                "{statsd} missing from docs/metrics.md"
            );
            let prom = d.prometheus_name("fleet");
            assert!(
                doc.contains(&format!("`{prom}`")),
                "{prom} missing from docs/metrics.md"
            );
        }
    }

    /// A flattened name `a.b.<l1>` must not also match another metric's pattern.
    #[test]
    fn statsd_names_are_unambiguous() {
        let patterns: Vec<Vec<&str>> = CATALOG
            .iter()
            .map(|d| {
                d.name
                    .split('.')
                    .chain(d.labels.iter().map(|_| "*"))
                    .collect()
            })
            .collect();
        for (i, a) in patterns.iter().enumerate() {
            for (j, b) in patterns.iter().enumerate() {
                if i != j && a.len() == b.len() {
                    let overlap = a
                        .iter()
                        .zip(b)
                        .all(|(x, y)| x == y || *x == "*" || *y == "*");
                    assert!(!overlap, "{} and {} overlap", a.join("."), b.join("."));
                }
            }
        }
    }

    /// config/statsd-mapping.yml has one mapping per metric, turning the flattened StatsD name
    /// back into the Prometheus name and labels that `/metrics` shows.
    #[test]
    fn statsd_mapping_matches_the_catalog() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/statsd-mapping.yml");
        let text = std::fs::read_to_string(path).unwrap();
        let (_, mappings) = text.split_once("\nmappings:\n").expect("a mappings list");
        let mut want = String::new();
        for d in CATALOG {
            let pattern = std::iter::once(format!("fleet.{}", d.name))
                .chain(d.labels.iter().map(|_| "*".to_string()))
                .collect::<Vec<_>>()
                .join(".");
            want.push_str(&format!("  - match: \"{pattern}\"\n"));
            want.push_str(&format!("    name: \"{}\"\n", d.prometheus_name("fleet")));
            if !d.labels.is_empty() {
                want.push_str("    labels:\n");
                for (i, l) in d.labels.iter().enumerate() {
                    want.push_str(&format!("      {l}: \"${}\"\n", i + 1));
                }
            }
        }
        assert_eq!(
            mappings, want,
            "config/statsd-mapping.yml is out of step with CATALOG"
        );
    }

    #[test]
    fn names_are_unique() {
        let mut names: Vec<&str> = CATALOG.iter().map(|d| d.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), CATALOG.len());
    }
}
