//! Schedules in the replicated state: their specs, the ticks they fired, the runs they made.
//!
//! Vocabulary: a **schedule** says when to run a task (a cron expression in a time zone, or an
//! interval); a **tick** is one fire time of a schedule, identified by (schedule, fire time);
//! a **run** is the task a tick created.
//!
//! **Exactly-once ticks.** Each schedule records `fired_through_ms`: every fire time at or
//! before it has been decided (run, queued, skipped or missed). The leader plans the ticks
//! after that watermark (`crate::schedule::plan`) and proposes them as a [`TickPlan`] that
//! names the watermark it started from. The state machine applies a plan only if the
//! schedule's watermark is still that one, and then moves it to the plan's last tick: a plan
//! proposed twice (a retried proposal, two leaders, a replayed entry) finds the watermark
//! moved and is refused as a whole, so no tick creates a second run. Ticks are never lost for
//! the same reason: the watermark only moves past a tick in the entry that decided it, and a
//! new leader plans from the watermark it finds. Every run also carries a deterministic
//! idempotency key (its run id), which keeps backfills and manual runs from doubling a tick.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

use super::pools::PoolClaim;
use super::{CommandError, CommandOutput, State, TaskId, TaskSpec};

/// Longest schedule name.
pub const MAX_SCHEDULE_NAME_LEN: usize = 64;
/// Most schedules a cluster may have. `schedule list` answers with all of them in one reply
/// (about 5 MB at a typical 500 bytes each; schedules with very long commands could exceed the
/// 32 MiB frame limit, a known limit until the list is paged).
pub const MAX_SCHEDULES: usize = 10_000;
/// Tick records kept per schedule for `schedule show`.
pub const HISTORY_LEN: usize = 100;
/// Most ticks waiting behind an unfinished run (overlap `queue`); later ones are skipped.
pub const MAX_OVERLAP_QUEUE: usize = 100;
/// The catch-up window when none is given: ticks older than this are not caught up.
pub const DEFAULT_CATCHUP_WINDOW_MS: u64 = 3600 * 1000;
/// Longest catch-up window.
pub const MAX_CATCHUP_WINDOW_MS: u64 = 366 * 24 * 3600 * 1000;
/// Shortest interval of an `--every` schedule.
pub const MIN_EVERY_MS: u64 = 1_000;
/// Longest jitter.
pub const MAX_JITTER_MS: u64 = 24 * 3600 * 1000;
/// Most runs one backfill may create.
pub const MAX_BACKFILL: usize = 10_000;

/// Identifies a schedule; a schedule deleted and created again under its name gets a new id.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct ScheduleId(pub u64);

/// When a schedule fires. Fire times are computed by the leader (`crate::schedule`), never
/// by the state machine: a replica running another version (another time zone database)
/// must not reach another state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Trigger {
    /// A cron expression (5 fields, or 6 with seconds first, or a `@hourly`-style macro) in an
    /// IANA time zone.
    Cron { expr: String, timezone: String },
    /// Every `every_ms`, at `anchor_ms + k * every_ms`.
    Every { every_ms: u64, anchor_ms: u64 },
}

impl std::fmt::Display for Trigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Trigger::Cron { expr, timezone } => write!(f, "cron {expr:?} in {timezone}"),
            Trigger::Every { every_ms, .. } => write!(
                f,
                "every {}",
                humantime::format_duration(std::time::Duration::from_millis(*every_ms))
            ),
        }
    }
}

named_enum!(
    /// What happens to ticks whose time passed while no leader could fire them (the cluster
    /// was down or had no quorum, a failover was under way, or the schedule was paused).
    CatchupPolicy, "catch-up policy", {
        /// Skip them; each is recorded as missed.
        None => "none",
        /// Run the most recent one; the others are recorded as missed.
        Latest => "latest",
        /// Run every one within the catch-up window, oldest first; older ones are missed.
        All => "all",
    }
);

named_enum!(
    /// What a tick does when the schedule's previous run has not finished.
    OverlapPolicy, "overlap policy", {
        /// Record the tick as skipped.
        Skip => "skip",
        /// Run it after the previous run finishes (at most 100 wait).
        Queue => "queue",
        /// Run it anyway.
        Allow => "allow",
        /// Cancel the previous run, then run this one.
        CancelPrevious => "cancel-previous",
    }
);

/// Everything a schedule is, as created or updated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleSpec {
    pub trigger: Trigger,
    /// No tick before this time (ms since the epoch).
    pub start_at_ms: Option<u64>,
    /// No tick after this time.
    pub end_at_ms: Option<u64>,
    pub catchup: CatchupPolicy,
    /// Catch-up `all` runs passed ticks no older than this.
    pub catchup_window_ms: u64,
    pub overlap: OverlapPolicy,
    /// Each run starts up to this long after its tick (drawn by the leader per tick).
    pub jitter_ms: u64,
    /// The task each run is (its environment gets `FLEET_SCHEDULE`, `FLEET_FIRE_TIME` and
    /// `FLEET_RUN_ID` too).
    pub task: TaskSpec,
    pub pool: Option<PoolClaim>,
}

impl ScheduleSpec {
    /// Checks what the state machine can check (the leader parsed the trigger already).
    pub fn validate(&self) -> Result<(), CommandError> {
        self.task.validate()?;
        if self.task.idempotency_key.is_some() || self.task.not_before_ms.is_some() {
            return Err(CommandError::Invalid(
                "a schedule's task takes no idempotency key, delay or not-before time: each run \
                 gets its own key and runs at its tick"
                    .into(),
            ));
        }
        match &self.trigger {
            Trigger::Every { every_ms, .. } if *every_ms < MIN_EVERY_MS => {
                return Err(CommandError::Invalid(format!(
                    "interval {every_ms} ms is not valid: use at least {} (1s)",
                    MIN_EVERY_MS
                )))
            }
            Trigger::Cron { expr, timezone } if expr.is_empty() || timezone.is_empty() => {
                return Err(CommandError::Invalid(
                    "a cron schedule needs an expression and a time zone".into(),
                ))
            }
            _ => {}
        }
        if let (Some(s), Some(e)) = (self.start_at_ms, self.end_at_ms) {
            if e <= s {
                return Err(CommandError::Invalid(format!(
                    "the end time {} is not after the start time {}",
                    rfc3339(e),
                    rfc3339(s)
                )));
            }
        }
        if !(1..=MAX_CATCHUP_WINDOW_MS).contains(&self.catchup_window_ms) {
            return Err(CommandError::Invalid(format!(
                "catch-up window {} ms is not valid: use 1 ms to 366 days",
                self.catchup_window_ms
            )));
        }
        if self.jitter_ms > MAX_JITTER_MS {
            return Err(CommandError::Invalid(format!(
                "jitter {} ms is not valid: use at most 24h",
                self.jitter_ms
            )));
        }
        Ok(())
    }
}

/// A schedule name is 1 to 64 characters of `A-Z a-z 0-9 _ - .`.
pub fn validate_schedule_name(name: &str) -> Result<(), CommandError> {
    super::validate_queue_name(name).map_err(|_| {
        CommandError::Invalid(format!(
            "schedule name {name:?} is not valid: use 1 to {MAX_SCHEDULE_NAME_LEN} characters \
             of letters, digits, '_', '-' and '.'"
        ))
    })
}

/// How a run came about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunKind {
    /// A tick fired on time.
    Scheduled,
    /// A passed tick run by the catch-up policy.
    CatchUp,
    /// `fleet schedule trigger`.
    Manual,
    /// `fleet schedule backfill`.
    Backfill,
}

/// What became of one tick (or of a range of missed ones).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TickResult {
    /// A run was created.
    Run { task: TaskId },
    /// Waiting behind an unfinished run (overlap `queue`).
    Queued,
    /// Not run because of the overlap policy.
    Skipped { reason: String },
    /// Passed while no leader could fire them; not run by the catch-up policy. `count` ticks
    /// from this record's fire time to `last_ms`.
    Missed {
        count: u64,
        last_ms: u64,
        reason: String,
    },
    /// A run of the workflow that owns the schedule was started (or queued behind its
    /// `max_active_runs`).
    WorkflowRun { run: super::RunId },
}

/// One line of a schedule's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TickRecord {
    pub fire_ms: u64,
    pub kind: RunKind,
    pub result: TickResult,
    /// The state's clock when it was decided.
    pub decided_at_ms: u64,
}

/// Ticks counted since the schedule was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TickCounts {
    /// Ticks that created a run or wait for one (overlap `queue`); manual runs and backfills
    /// not included.
    pub fired: u64,
    pub missed: u64,
    pub skipped: u64,
}

/// One schedule in the state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schedule {
    pub id: ScheduleId,
    pub name: String,
    pub spec: ScheduleSpec,
    pub paused: bool,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    /// Every fire time at or before this was decided. Starts at the creation time (ticks
    /// before a schedule existed are never due: `schedule backfill` runs those).
    pub fired_through_ms: u64,
    /// When the schedule was last paused.
    pub paused_at_ms: Option<u64>,
    /// When it was last resumed: ticks from `paused_at_ms` to this passed while paused.
    pub resumed_at_ms: Option<u64>,
    /// Its runs that have not finished.
    pub active: BTreeSet<TaskId>,
    /// Ticks waiting behind an unfinished run (overlap `queue`), oldest first.
    pub queued: VecDeque<(u64, RunKind)>,
    /// The latest tick records, oldest first (at most [`HISTORY_LEN`]).
    pub history: VecDeque<TickRecord>,
    pub counts: TickCounts,
}

impl Schedule {
    /// Records a run created outside a plan (a trigger, a backfill, a queued tick's start).
    fn record_run(&mut self, fire_ms: u64, kind: RunKind, task: TaskId, now: u64) {
        self.record(TickRecord {
            fire_ms,
            kind,
            result: TickResult::Run { task },
            decided_at_ms: now,
        });
    }

    fn record(&mut self, record: TickRecord) {
        if self.history.len() >= HISTORY_LEN {
            self.history.pop_front();
        }
        self.history.push_back(record);
    }

    /// Why a tick at `fire_ms` passed unfired: the schedule was paused then, or no leader
    /// could fire it.
    pub fn passed_reason(&self, fire_ms: u64) -> &'static str {
        match (self.paused_at_ms, self.resumed_at_ms) {
            (Some(p), Some(r)) if p <= fire_ms && fire_ms < r => "the schedule was paused",
            _ => "no leader could fire it (failover, no quorum or cluster down)",
        }
    }
}

/// One run the leader decided a tick makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedRun {
    pub fire_ms: u64,
    /// Drawn by the leader; the run's task is not ready before its tick's application plus
    /// this.
    pub jitter_ms: u64,
    pub catch_up: bool,
}

/// Passed ticks the catch-up policy does not run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MissedTicks {
    pub count: u64,
    pub first_ms: u64,
    pub last_ms: u64,
    pub reason: String,
}

/// The leader's decision for one schedule's ticks from `after_ms` (the watermark it saw,
/// exclusive) through `through_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TickPlan {
    pub schedule: ScheduleId,
    pub after_ms: u64,
    pub through_ms: u64,
    pub runs: Vec<PlannedRun>,
    pub missed: Vec<MissedTicks>,
}

/// What applying one [`TickPlan`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TickOutcome {
    pub schedule: ScheduleId,
    /// False when the plan was stale (its ticks were decided already) or the schedule is gone
    /// or paused: nothing was done.
    pub applied: bool,
    pub runs: u32,
    pub queued: u32,
    pub skipped: u32,
    pub missed: u64,
}

/// How [`super::Command::PutSchedule`] treats an existing schedule of that name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PutMode {
    /// Create; an existing schedule with another spec is an error (the same spec is not: a
    /// retried create succeeds).
    Create,
    /// Create, or replace the spec of an existing one (`schedule apply`).
    CreateOrReplace,
    /// Replace the spec of an existing one (`schedule update`).
    Replace,
}

/// What a put did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PutChange {
    Created,
    Updated,
    Unchanged,
}

/// The schedules and their runs (part of [`State`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schedules {
    next_id: u64,
    by_id: BTreeMap<ScheduleId, Schedule>,
    by_name: BTreeMap<String, ScheduleId>,
    /// Every retained run: its schedule and fire time.
    run_of: BTreeMap<TaskId, (ScheduleId, u64)>,
    /// The log index being applied (a run created when another ends records it).
    applying_index: u64,
    /// Grows with every create, update, pause, resume and delete (the leader's ticker plans
    /// again when it moves).
    changes: u64,
}

impl Schedules {
    pub fn get(&self, name: &str) -> Option<&Schedule> {
        self.by_name.get(name).and_then(|id| self.by_id.get(id))
    }

    pub fn by_id(&self, id: ScheduleId) -> Option<&Schedule> {
        self.by_id.get(&id)
    }

    /// Every schedule, by name.
    pub fn all(&self) -> impl Iterator<Item = &Schedule> {
        self.by_name.values().map(|id| &self.by_id[id])
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn changes(&self) -> u64 {
        self.changes
    }

    /// The log index being applied.
    pub(super) fn applying_index(&self) -> u64 {
        self.applying_index
    }

    /// Records a backfilled workflow run in the schedule's history.
    pub(super) fn record_workflow_run(
        &mut self,
        id: ScheduleId,
        fire_ms: u64,
        run: super::RunId,
        now: u64,
    ) {
        if let Some(s) = self.by_id.get_mut(&id) {
            s.record(TickRecord {
                fire_ms,
                kind: RunKind::Backfill,
                result: TickResult::WorkflowRun { run },
                decided_at_ms: now,
            });
        }
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// The schedule and fire time of a run.
    pub fn run_of(&self, task: TaskId) -> Option<(&Schedule, u64)> {
        let (sid, fire) = self.run_of.get(&task)?;
        Some((self.by_id.get(sid)?, *fire))
    }

    pub(super) fn using_pool(&self, pool: &str) -> Option<&str> {
        self.by_id
            .values()
            .find(|s| s.spec.pool.as_ref().is_some_and(|c| c.pool == pool))
            .map(|s| s.name.as_str())
    }
}

/// A time as RFC 3339 in UTC (`2026-12-03T01:00:00Z`, milliseconds only when not zero).
pub fn rfc3339(ms: u64) -> String {
    chrono::DateTime::from_timestamp_millis(ms as i64)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
        .unwrap_or_else(|| format!("{ms} ms"))
}

/// A run's id (also its task's idempotency key): the schedule name and the fire time, so the
/// same tick always gets the same id; manual runs are named by the request that made them.
pub fn run_id(schedule: &str, fire_ms: u64, kind: RunKind, manual_key: Option<u128>) -> String {
    match (kind, manual_key) {
        (RunKind::Manual, Some(k)) => format!("{schedule}@manual-{k:032x}"),
        _ => format!("{schedule}@{}", rfc3339(fire_ms)),
    }
}

impl State {
    pub fn schedules(&self) -> &Schedules {
        &self.schedules
    }

    pub(super) fn set_applying_index(&mut self, index: u64) {
        self.schedules.applying_index = index;
    }

    fn schedule_named(&self, name: &str) -> Result<ScheduleId, CommandError> {
        self.schedules
            .by_name
            .get(name)
            .copied()
            .ok_or_else(|| CommandError::Invalid(format!("no schedule named {name:?}")))
    }

    pub(super) fn put_schedule(
        &mut self,
        name: &str,
        spec: &ScheduleSpec,
        paused: Option<bool>,
        mode: PutMode,
    ) -> Result<CommandOutput, CommandError> {
        validate_schedule_name(name)?;
        spec.validate()?;
        if let Some(claim) = &spec.pool {
            self.check_claim(claim)?;
        }
        let now = self.clock_ms;
        if let Some(&id) = self.schedules.by_name.get(name) {
            let s = self.schedules.by_id.get_mut(&id).expect("indexed");
            let same = s.spec == *spec && paused.is_none_or(|p| p == s.paused);
            if same {
                return Ok(CommandOutput::ScheduleSaved {
                    id,
                    change: PutChange::Unchanged,
                });
            }
            if mode == PutMode::Create {
                return Err(CommandError::Invalid(format!(
                    "schedule {name:?} exists already with another spec; use `fleet schedule \
                     update` or `fleet schedule apply` to change it"
                )));
            }
            s.spec = spec.clone();
            s.updated_at_ms = now;
            self.schedules.changes += 1;
            // A start moved later: nothing before it is due.
            if let Some(start) = spec.start_at_ms {
                s.fired_through_ms = s.fired_through_ms.max(start.saturating_sub(1));
            }
            if let Some(p) = paused {
                self.pause(id, p);
            }
            return Ok(CommandOutput::ScheduleSaved {
                id,
                change: PutChange::Updated,
            });
        }
        if mode == PutMode::Replace {
            return Err(CommandError::Invalid(format!("no schedule named {name:?}")));
        }
        if self.schedules.by_id.len() >= MAX_SCHEDULES {
            return Err(CommandError::Invalid(format!(
                "the cluster has {MAX_SCHEDULES} schedules already; delete one first"
            )));
        }
        self.schedules.next_id += 1;
        let id = ScheduleId(self.schedules.next_id);
        let paused = paused.unwrap_or(false);
        let schedule = Schedule {
            id,
            name: name.to_string(),
            spec: spec.clone(),
            paused,
            created_at_ms: now,
            updated_at_ms: now,
            fired_through_ms: now.max(spec.start_at_ms.unwrap_or(0).saturating_sub(1)),
            paused_at_ms: paused.then_some(now),
            resumed_at_ms: None,
            active: BTreeSet::new(),
            queued: VecDeque::new(),
            history: VecDeque::new(),
            counts: TickCounts::default(),
        };
        self.schedules.by_id.insert(id, schedule);
        self.schedules.by_name.insert(name.to_string(), id);
        self.schedules.changes += 1;
        Ok(CommandOutput::ScheduleSaved {
            id,
            change: PutChange::Created,
        })
    }

    fn pause(&mut self, id: ScheduleId, paused: bool) {
        let now = self.clock_ms;
        let s = self.schedules.by_id.get_mut(&id).expect("exists");
        if s.paused == paused {
            return;
        }
        s.paused = paused;
        self.schedules.changes += 1;
        if paused {
            s.paused_at_ms = Some(now);
        } else {
            s.resumed_at_ms = Some(now);
        }
    }

    pub(super) fn set_schedule_paused(
        &mut self,
        name: &str,
        paused: bool,
    ) -> Result<CommandOutput, CommandError> {
        let id = self.schedule_named(name)?;
        let change = if self.schedules.by_id[&id].paused == paused {
            PutChange::Unchanged
        } else {
            PutChange::Updated
        };
        self.pause(id, paused);
        Ok(CommandOutput::ScheduleSaved { id, change })
    }

    /// Deletes a schedule. Its unfinished runs go on as ordinary tasks.
    pub(super) fn delete_schedule(&mut self, name: &str) -> Result<CommandOutput, CommandError> {
        let id = self.schedule_named(name)?;
        self.schedules.by_name.remove(name);
        self.schedules.by_id.remove(&id);
        self.schedules.changes += 1;
        Ok(CommandOutput::ScheduleDeleted { id })
    }

    /// Applies the leader's tick plans (see the module documentation for why this is
    /// exactly-once).
    pub(super) fn fire_ticks(&mut self, index: u64, plans: &[TickPlan]) -> CommandOutput {
        let outcomes = plans.iter().map(|p| self.apply_plan(index, p)).collect();
        CommandOutput::TicksFired { outcomes }
    }

    fn apply_plan(&mut self, index: u64, plan: &TickPlan) -> TickOutcome {
        let now = self.clock_ms;
        let mut out = TickOutcome {
            schedule: plan.schedule,
            ..Default::default()
        };
        let Some(s) = self.schedules.by_id.get_mut(&plan.schedule) else {
            return out;
        };
        if s.fired_through_ms != plan.after_ms || s.paused || plan.through_ms <= plan.after_ms {
            return out; // decided already (a stale or repeated plan), or paused meanwhile
        }
        out.applied = true;
        s.fired_through_ms = plan.through_ms;
        for m in &plan.missed {
            s.counts.missed += m.count;
            out.missed += m.count;
            s.record(TickRecord {
                fire_ms: m.first_ms,
                kind: RunKind::CatchUp,
                result: TickResult::Missed {
                    count: m.count,
                    last_ms: m.last_ms,
                    reason: m.reason.clone(),
                },
                decided_at_ms: now,
            });
        }
        let mut runs: Vec<&PlannedRun> = plan.runs.iter().collect();
        runs.sort_by_key(|r| r.fire_ms);
        for run in runs {
            let kind = if run.catch_up {
                RunKind::CatchUp
            } else {
                RunKind::Scheduled
            };
            match self.tick(index, plan.schedule, run.fire_ms, kind, run.jitter_ms) {
                TickResult::Run { .. } | TickResult::WorkflowRun { .. } => out.runs += 1,
                TickResult::Queued => out.queued += 1,
                TickResult::Skipped { .. } => out.skipped += 1,
                TickResult::Missed { .. } => {}
            }
        }
        out
    }

    /// One tick under the schedule's overlap policy.
    fn tick(
        &mut self,
        index: u64,
        id: ScheduleId,
        fire_ms: u64,
        kind: RunKind,
        jitter_ms: u64,
    ) -> TickResult {
        let now = self.clock_ms;
        let s = &self.schedules.by_id[&id];
        let busy = s.active.iter().next().copied();
        let owner = self.workflows.owner_of(id).map(str::to_string);
        let result = match (s.spec.overlap, busy) {
            // A workflow's tick starts a run of it, keyed by the tick (so a tick decided
            // twice still makes one run); `max_active_runs` decides when it starts.
            _ if owner.is_some() => {
                let key = run_id(&s.name, fire_ms, kind, None);
                let workflow = owner.as_deref().expect("checked");
                match self.tick_workflow(workflow, key, fire_ms) {
                    Ok(run) => TickResult::WorkflowRun { run },
                    Err(e) => TickResult::Skipped {
                        reason: e.to_string(),
                    },
                }
            }
            (_, None) | (OverlapPolicy::Allow, _) => {
                let task = self.create_run(index, id, fire_ms, kind, jitter_ms, None);
                TickResult::Run { task }
            }
            (OverlapPolicy::Skip, Some(prev)) => TickResult::Skipped {
                reason: format!("run {prev} had not finished"),
            },
            (OverlapPolicy::Queue, Some(prev)) => {
                let s = self.schedules.by_id.get_mut(&id).expect("exists");
                if s.queued.len() >= MAX_OVERLAP_QUEUE {
                    TickResult::Skipped {
                        reason: format!(
                            "run {prev} had not finished and {MAX_OVERLAP_QUEUE} ticks wait \
                             already"
                        ),
                    }
                } else {
                    s.queued.push_back((fire_ms, kind));
                    TickResult::Queued
                }
            }
            (OverlapPolicy::CancelPrevious, Some(_)) => {
                let previous: Vec<TaskId> = s.active.iter().copied().collect();
                for p in previous {
                    let _ = self.cancel(p);
                    // A run cancelled while running ends its attempt later; it no longer counts.
                    if let Some(s) = self.schedules.by_id.get_mut(&id) {
                        s.active.remove(&p);
                    }
                }
                let task = self.create_run(index, id, fire_ms, kind, jitter_ms, None);
                TickResult::Run { task }
            }
        };
        let s = self.schedules.by_id.get_mut(&id).expect("exists");
        match &result {
            TickResult::Run { .. } | TickResult::Queued | TickResult::WorkflowRun { .. } => {
                s.counts.fired += 1
            }
            TickResult::Skipped { .. } => s.counts.skipped += 1,
            TickResult::Missed { .. } => {}
        }
        s.record(TickRecord {
            fire_ms,
            kind,
            result: result.clone(),
            decided_at_ms: now,
        });
        result
    }

    /// Creates the task of one run (or finds the one its run id made before).
    fn create_run(
        &mut self,
        index: u64,
        id: ScheduleId,
        fire_ms: u64,
        kind: RunKind,
        jitter_ms: u64,
        manual_key: Option<u128>,
    ) -> TaskId {
        let now = self.clock_ms;
        let s = &self.schedules.by_id[&id];
        let run = run_id(&s.name, fire_ms, kind, manual_key);
        if let Some(existing) = self.idempotency_keys.get(&run) {
            return *existing;
        }
        let mut spec = s.spec.task.clone();
        spec.env.push(("FLEET_SCHEDULE".into(), s.name.clone()));
        spec.env.push(("FLEET_FIRE_TIME".into(), rfc3339(fire_ms)));
        spec.env.push(("FLEET_RUN_ID".into(), run.clone()));
        spec.idempotency_key = Some(run);
        spec.not_before_ms = (jitter_ms > 0).then(|| now.saturating_add(jitter_ms));
        let claim = s.spec.pool.clone();
        let task = self.insert_task(index, spec);
        if let Some(c) = claim {
            self.add_claim(task, c);
        }
        self.schedules.run_of.insert(task, (id, fire_ms));
        self.schedules
            .by_id
            .get_mut(&id)
            .expect("exists")
            .active
            .insert(task);
        task
    }

    /// `fleet schedule trigger`: one run now, whatever the overlap policy.
    pub(super) fn trigger_schedule(
        &mut self,
        index: u64,
        name: &str,
        key: u128,
    ) -> Result<CommandOutput, CommandError> {
        let id = self.schedule_named(name)?;
        let now = self.clock_ms;
        let task = self.create_run(index, id, now, RunKind::Manual, 0, Some(key));
        let s = self.schedules.by_id.get_mut(&id).expect("exists");
        if !s
            .history
            .iter()
            .any(|r| r.result == TickResult::Run { task })
        {
            s.record_run(now, RunKind::Manual, task, now);
        }
        Ok(CommandOutput::ScheduleRuns {
            created: vec![(now, task)],
            existing: 0,
        })
    }

    /// `fleet schedule backfill`: a run for each given fire time that has none retained,
    /// whatever the overlap policy (a pool bounds how many run at once).
    pub(super) fn backfill(
        &mut self,
        index: u64,
        name: &str,
        fires: &[u64],
    ) -> Result<CommandOutput, CommandError> {
        let id = self.schedule_named(name)?;
        if fires.len() > MAX_BACKFILL {
            return Err(CommandError::Invalid(format!(
                "a backfill of {} ticks; at most {MAX_BACKFILL} at once",
                fires.len()
            )));
        }
        let now = self.clock_ms;
        let mut created = Vec::new();
        let mut existing = 0;
        for &fire in fires {
            let run = run_id(name, fire, RunKind::Backfill, None);
            if self.idempotency_keys.contains_key(&run) {
                existing += 1;
                continue;
            }
            let task = self.create_run(index, id, fire, RunKind::Backfill, 0, None);
            let s = self.schedules.by_id.get_mut(&id).expect("exists");
            s.record_run(fire, RunKind::Backfill, task, now);
            created.push((fire, task));
        }
        Ok(CommandOutput::ScheduleRuns { created, existing })
    }

    /// A task reached a final state: if it is a run, its schedule may start a queued tick.
    pub(super) fn run_ended(&mut self, task: TaskId) {
        let Some(&(sid, _)) = self.schedules.run_of.get(&task) else {
            return;
        };
        let Some(s) = self.schedules.by_id.get_mut(&sid) else {
            return;
        };
        if !s.active.remove(&task) || !s.active.is_empty() {
            return;
        }
        if s.spec.overlap != OverlapPolicy::Queue {
            return;
        }
        let Some((fire, kind)) = s.queued.pop_front() else {
            return;
        };
        let index = self.schedules.applying_index;
        let now = self.clock_ms;
        let task = self.create_run(index, sid, fire, kind, 0, None);
        let s = self.schedules.by_id.get_mut(&sid).expect("exists");
        s.record_run(fire, kind, task, now);
    }

    /// A retried run counts as unfinished again.
    pub(super) fn run_reopened(&mut self, task: TaskId) {
        if let Some(&(sid, _)) = self.schedules.run_of.get(&task) {
            if let Some(s) = self.schedules.by_id.get_mut(&sid) {
                s.active.insert(task);
            }
        }
    }

    pub(super) fn forget_run(&mut self, task: TaskId) {
        self.schedules.run_of.remove(&task);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{AttemptOutcome, Command, CommandOutput, LeaseGrant, TaskState, WorkerId};

    const S: u64 = 1_000;

    /// The shared applier (`state`, `one`) with the schedule helpers below.
    #[derive(Default)]
    struct Sm(crate::state::testing::Applier);

    impl std::ops::Deref for Sm {
        type Target = crate::state::testing::Applier;
        fn deref(&self) -> &Self::Target {
            &self.0
        }
    }

    impl std::ops::DerefMut for Sm {
        fn deref_mut(&mut self) -> &mut Self::Target {
            &mut self.0
        }
    }

    impl Sm {
        fn new() -> Sm {
            Sm::default()
        }
        fn create(&mut self, now: u64, name: &str, overlap: OverlapPolicy) {
            let mut spec = crate::schedule::tests::spec(Trigger::Every {
                every_ms: S,
                anchor_ms: 0,
            });
            spec.overlap = overlap;
            self.one(
                now,
                Command::PutSchedule {
                    name: name.into(),
                    spec,
                    paused: None,
                    mode: PutMode::Create,
                },
            )
            .unwrap();
        }
        fn sched(&self, name: &str) -> &Schedule {
            self.state.schedules().get(name).unwrap()
        }
        /// The plan a leader would make for ticks `fires` (after the current watermark).
        fn plan(&self, name: &str, fires: &[u64]) -> TickPlan {
            let s = self.sched(name);
            TickPlan {
                schedule: s.id,
                after_ms: s.fired_through_ms,
                through_ms: *fires.last().unwrap(),
                runs: fires
                    .iter()
                    .map(|f| PlannedRun {
                        fire_ms: *f,
                        jitter_ms: 0,
                        catch_up: false,
                    })
                    .collect(),
                missed: vec![],
            }
        }
        fn fire(&mut self, now: u64, plan: TickPlan) -> TickOutcome {
            match self.one(now, Command::FireTicks { plans: vec![plan] }) {
                Ok(CommandOutput::TicksFired { mut outcomes }) => outcomes.pop().unwrap(),
                other => panic!("{other:?}"),
            }
        }
        fn grant_all(&mut self, now: u64, worker: u64) -> Vec<LeaseGrant> {
            let picks = self.state.pick_ready(&["default".into()], 1000, now);
            match self.one(
                now,
                Command::GrantLeasesTo {
                    worker: WorkerId(worker),
                    worker_name: format!("w{worker}"),
                    tasks: picks,
                },
            ) {
                Ok(CommandOutput::LeasesGranted { grants }) => grants,
                other => panic!("{other:?}"),
            }
        }
        fn complete(&mut self, now: u64, g: &LeaseGrant) {
            self.one(
                now,
                Command::Complete {
                    task: g.task,
                    fencing_token: g.fencing_token,
                    outcome: AttemptOutcome::Succeeded,
                    output_tail: String::new(),
                    retry_jitter_permille: 0,
                },
            )
            .unwrap();
        }
        fn state_of(&self, id: TaskId) -> TaskState {
            self.state.task(id).unwrap().state
        }
    }

    #[test]
    fn a_plan_applies_once_however_often_it_is_proposed() {
        let mut sm = Sm::new();
        sm.create(10 * S, "s", OverlapPolicy::Allow);
        let plan = sm.plan("s", &[11 * S, 12 * S]);
        let first = sm.fire(12 * S, plan.clone());
        assert!(first.applied);
        assert_eq!(first.runs, 2);
        // The same plan again (a retried proposal, a replayed entry): nothing.
        let again = sm.fire(12 * S + 10, plan.clone());
        assert!(!again.applied);
        // Another leader that planned from the same watermark, with one tick more: refused.
        let mut other = plan;
        other.through_ms = 13 * S;
        other.runs.push(PlannedRun {
            fire_ms: 13 * S,
            jitter_ms: 0,
            catch_up: false,
        });
        assert!(!sm.fire(13 * S, other).applied);
        assert_eq!(sm.state.task_count(), 2);
        assert_eq!(sm.sched("s").fired_through_ms, 12 * S);
        assert_eq!(sm.sched("s").counts.fired, 2);
        // The next plan starts where the first ended.
        let next = sm.plan("s", &[13 * S]);
        assert_eq!(next.after_ms, 12 * S);
        assert!(sm.fire(13 * S, next).applied);
        assert_eq!(sm.state.task_count(), 3);
    }

    #[test]
    fn each_run_knows_its_schedule_fire_time_and_run_id() {
        let mut sm = Sm::new();
        sm.create(10 * S, "nightly", OverlapPolicy::Allow);
        let fire = 1_796_259_600_000; // 2026-12-03T01:00:00Z
        let mut plan = sm.plan("nightly", &[fire]);
        plan.runs[0].jitter_ms = 250;
        sm.fire(fire + 5, plan);
        let t = sm.state.task(TaskId(1)).unwrap();
        let env: std::collections::BTreeMap<_, _> = t.spec.env.iter().cloned().collect();
        assert_eq!(env["FLEET_SCHEDULE"], "nightly");
        assert_eq!(env["FLEET_FIRE_TIME"], "2026-12-03T01:00:00Z");
        assert_eq!(env["FLEET_RUN_ID"], "nightly@2026-12-03T01:00:00Z");
        assert_eq!(
            t.spec.idempotency_key.as_deref(),
            Some("nightly@2026-12-03T01:00:00Z")
        );
        assert_eq!(t.ready_at_ms, fire + 5 + 250, "jitter delays the run");
        assert_eq!(sm.state.schedules().run_of(t.id).unwrap().1, fire);
        // A backfill of the same tick finds the run; a trigger makes its own, once per key.
        match sm.one(
            fire + 10,
            Command::Backfill {
                name: "nightly".into(),
                fires: vec![fire, fire - 3_600_000],
            },
        ) {
            Ok(CommandOutput::ScheduleRuns { created, existing }) => {
                assert_eq!(existing, 1);
                assert_eq!(created, vec![(fire - 3_600_000, TaskId(2))]);
            }
            other => panic!("{other:?}"),
        }
        for _ in 0..2 {
            sm.one(
                fire + 20,
                Command::TriggerSchedule {
                    name: "nightly".into(),
                    key: 7,
                },
            )
            .unwrap();
        }
        assert_eq!(sm.state.task_count(), 3, "a retried trigger makes one run");
    }

    #[test]
    fn overlap_skip_queue_allow_and_cancel_previous() {
        let mut sm = Sm::new();
        for (name, p) in [
            ("skip", OverlapPolicy::Skip),
            ("queue", OverlapPolicy::Queue),
            ("allow", OverlapPolicy::Allow),
            ("cancel", OverlapPolicy::CancelPrevious),
        ] {
            sm.create(0, name, p);
        }
        let names = ["skip", "queue", "allow", "cancel"];
        for n in names {
            let p = sm.plan(n, &[S]);
            sm.fire(S, p);
        }
        // Every first run is leased and still running when the second tick comes.
        let first = sm.grant_all(S, 1);
        assert_eq!(first.len(), 4);
        for n in names {
            let p = sm.plan(n, &[2 * S]);
            sm.fire(2 * S, p);
        }
        let runs = |sm: &Sm, n: &str| -> Vec<TickResult> {
            sm.sched(n)
                .history
                .iter()
                .map(|r| r.result.clone())
                .collect()
        };
        assert!(matches!(runs(&sm, "skip")[1], TickResult::Skipped { .. }));
        assert_eq!(sm.sched("skip").counts.skipped, 1);
        assert_eq!(runs(&sm, "queue")[1], TickResult::Queued);
        assert!(matches!(runs(&sm, "allow")[1], TickResult::Run { .. }));
        assert_eq!(sm.sched("allow").active.len(), 2);
        let cancel_first = sm.sched("cancel").history[0].result.clone();
        let TickResult::Run { task: cancelled } = cancel_first else {
            panic!()
        };
        assert_eq!(sm.state_of(cancelled), TaskState::Cancelled);
        assert_eq!(sm.sched("cancel").active.len(), 1);
        // The queued tick runs when the first run of `queue` ends, with its own fire time.
        let queue_first = first
            .iter()
            .find(|g| sm.state.schedules().run_of(g.task).unwrap().0.name == "queue")
            .unwrap()
            .clone();
        assert_eq!(sm.sched("queue").active.len(), 1);
        sm.complete(3 * S, &queue_first);
        let q = sm.sched("queue");
        assert_eq!(q.active.len(), 1);
        let TickResult::Run { task } = q.history.back().unwrap().result.clone() else {
            panic!("{:?}", q.history)
        };
        assert_eq!(sm.state.schedules().run_of(task).unwrap().1, 2 * S);
        assert_eq!(sm.state_of(task), TaskState::Queued);
    }

    #[test]
    fn paused_schedules_refuse_plans_and_deleted_ones_ignore_them() {
        let mut sm = Sm::new();
        sm.create(0, "s", OverlapPolicy::Allow);
        let p = sm.plan("s", &[S]);
        sm.one(
            S / 2,
            Command::PauseSchedule {
                name: "s".into(),
                paused: true,
            },
        )
        .unwrap();
        assert!(!sm.fire(S, p.clone()).applied, "paused after planning");
        sm.one(
            2 * S,
            Command::PauseSchedule {
                name: "s".into(),
                paused: false,
            },
        )
        .unwrap();
        assert_eq!(sm.sched("s").resumed_at_ms, Some(2 * S));
        assert!(sm.fire(2 * S, p.clone()).applied);
        sm.one(3 * S, Command::DeleteSchedule { name: "s".into() })
            .unwrap();
        assert!(!sm.fire(3 * S, p).applied);
    }

    #[test]
    fn creating_twice_is_idempotent_but_another_spec_is_refused() {
        let mut sm = Sm::new();
        sm.create(0, "s", OverlapPolicy::Allow);
        sm.create(5, "s", OverlapPolicy::Allow);
        let mut spec = sm.sched("s").spec.clone();
        spec.overlap = OverlapPolicy::Skip;
        let put = |mode| Command::PutSchedule {
            name: "s".into(),
            spec: spec.clone(),
            paused: None,
            mode,
        };
        let e = sm.one(6, put(PutMode::Create)).unwrap_err().to_string();
        assert!(e.contains("exists already"), "{e}");
        assert!(matches!(
            sm.one(7, put(PutMode::Replace)),
            Ok(CommandOutput::ScheduleSaved {
                change: PutChange::Updated,
                ..
            })
        ));
        let e = sm
            .one(
                8,
                Command::PutSchedule {
                    name: "other".into(),
                    spec: spec.clone(),
                    paused: None,
                    mode: PutMode::Replace,
                },
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("no schedule named \"other\""), "{e}");
    }
}
