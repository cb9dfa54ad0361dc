//! The client's view of schedules and pools: what `fleet schedule` and `fleet pool` send, and
//! how the leader turns it into replicated commands.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::NewTask;
use crate::error::Error;
use crate::schedule::Timing;
use crate::state::schedules::DEFAULT_CATCHUP_WINDOW_MS;
use crate::state::{
    CatchupPolicy, OverlapPolicy, PoolClaim, PutChange, RequestId, Schedule, ScheduleSpec, TaskId,
    TaskSpec, TaskState, Trigger,
};

/// A schedule as a client describes it (command-line flags, one entry of a schedule file).
/// Fields left out take their defaults on create and stay as they are on update.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ScheduleDef {
    pub name: String,
    pub cron: Option<String>,
    pub every_ms: Option<u64>,
    /// IANA name; default `UTC`.
    pub timezone: Option<String>,
    pub start_at_ms: Option<u64>,
    pub end_at_ms: Option<u64>,
    /// Default `all`.
    pub catchup: Option<CatchupPolicy>,
    /// Default 1h.
    pub catchup_window_ms: Option<u64>,
    /// Default `allow`.
    pub overlap: Option<OverlapPolicy>,
    pub jitter_ms: Option<u64>,
    pub paused: Option<bool>,
    /// The task of each run; its command is required on create.
    pub task: NewTask,
    /// On update: options to remove (`start-at`, `end-at`, `pool`, `jitter`).
    pub unset: Vec<String>,
}

/// The options `schedule update --unset` removes.
pub const UNSETTABLE: [&str; 4] = ["start-at", "end-at", "pool", "jitter"];

/// One change a client asks for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ScheduleOp {
    /// Create (the same definition again is not an error).
    Create(ScheduleDef),
    /// Create, or replace every field of an existing one (`schedule apply`).
    Apply(ScheduleDef),
    /// Change the given fields of an existing one.
    Update(ScheduleDef),
    Pause(String),
    Resume(String),
    Delete(String),
    /// One run now; the request id makes a retry create nothing more.
    Trigger {
        name: String,
        request_id: RequestId,
    },
    /// A run for each fire time in `from_ms..=to_ms` that has none.
    Backfill {
        name: String,
        from_ms: u64,
        to_ms: u64,
    },
    SetPool {
        name: String,
        slots: u32,
    },
    DeletePool(String),
}

/// What one [`ScheduleOp`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OpOutcome {
    Saved {
        name: String,
        change: PutChange,
    },
    /// Paused (`paused`) or resumed; `changed` is false when it was so already.
    Paused {
        name: String,
        paused: bool,
        changed: bool,
    },
    Deleted {
        name: String,
    },
    Runs {
        name: String,
        /// (fire time, task) of each run created.
        created: Vec<(u64, TaskId)>,
        /// Fire times that had a run already.
        existing: u32,
    },
    PoolSet {
        name: String,
        slots: u32,
    },
    PoolDeleted {
        name: String,
    },
}

/// One schedule as `schedule list` and `schedule show` see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleView {
    pub schedule: Schedule,
    /// The next fire times (at most 5), from the serving replica's clock.
    pub next_fires: Vec<u64>,
    /// The state of each run named in the history that is still retained.
    pub run_states: BTreeMap<TaskId, TaskState>,
}

fn invalid(e: impl std::fmt::Display) -> Error {
    Error::InvalidArgument(e.to_string())
}

/// The trigger `def` names (`cron` with `timezone`, or `every_ms`), if any.
fn trigger(
    def: &ScheduleDef,
    now_ms: u64,
    old: Option<&Trigger>,
) -> Result<Option<Trigger>, Error> {
    match (&def.cron, def.every_ms) {
        (Some(_), Some(_)) => Err(invalid(format!(
            "schedule {:?}: give either a cron expression or an interval, not both",
            def.name
        ))),
        (Some(expr), None) => {
            let timezone = def
                .timezone
                .clone()
                .or_else(|| match old {
                    Some(Trigger::Cron { timezone, .. }) => Some(timezone.clone()),
                    _ => None,
                })
                .unwrap_or_else(|| "UTC".into());
            Ok(Some(Trigger::Cron {
                expr: expr.trim().to_string(),
                timezone,
            }))
        }
        (None, Some(every_ms)) => {
            if def.timezone.is_some() {
                return Err(invalid(format!(
                    "schedule {:?}: an interval has no time zone (it counts elapsed time); a \
                     time zone goes with a cron expression",
                    def.name
                )));
            }
            if every_ms < crate::state::schedules::MIN_EVERY_MS {
                return Err(invalid(format!(
                    "schedule {:?}: interval {} is not valid: use at least 1s",
                    def.name,
                    humantime::format_duration(std::time::Duration::from_millis(every_ms))
                )));
            }
            // Intervals count from the start time, or from the whole second of creation.
            let anchor_ms = def.start_at_ms.unwrap_or(now_ms - now_ms % 1000);
            Ok(Some(Trigger::Every {
                every_ms,
                anchor_ms,
            }))
        }
        (None, None) => match (&def.timezone, old) {
            (Some(tz), Some(Trigger::Cron { expr, .. })) => Ok(Some(Trigger::Cron {
                expr: expr.clone(),
                timezone: tz.clone(),
            })),
            (Some(_), _) => Err(invalid(format!(
                "schedule {:?}: a time zone goes with a cron expression",
                def.name
            ))),
            (None, _) => Ok(None),
        },
    }
}

/// Checks that a spec's trigger parses and fires at least once after `now_ms`.
fn check_timing(name: &str, spec: &ScheduleSpec, now_ms: u64) -> Result<(), Error> {
    let timing = Timing::new(spec).map_err(|e| invalid(format!("schedule {name:?}: {e}")))?;
    let after = now_ms.max(spec.start_at_ms.unwrap_or(0).saturating_sub(1));
    if timing.next_after(after).is_none() {
        return Err(invalid(format!(
            "schedule {name:?} never fires after now ({}): check the expression and the end time",
            spec.trigger
        )));
    }
    Ok(())
}

/// The pool claim of `task`, if it names a pool.
pub fn pool_claim(task: &NewTask) -> Result<Option<PoolClaim>, Error> {
    match (&task.pool, task.pool_slots) {
        (Some(pool), slots) => Ok(Some(PoolClaim {
            pool: pool.clone(),
            slots: slots.unwrap_or(1),
        })),
        (None, Some(_)) => Err(invalid(
            "pool slots were given without a pool: add --pool NAME",
        )),
        (None, None) => Ok(None),
    }
}

fn check_run_task(name: &str, t: &NewTask) -> Result<(), Error> {
    if !t.after.is_empty() {
        return Err(invalid(format!(
            "schedule {name:?}: a schedule's task cannot wait for other tasks (`after`); use \
             a workflow with a schedule for runs of dependent tasks"
        )));
    }
    if t.delay_ms.is_some() || t.not_before_ms.is_some() || t.idempotency_key.is_some() {
        return Err(invalid(format!(
            "schedule {name:?}: a schedule's task takes no delay, not-before time or \
             idempotency key (each run starts at its tick and gets its own key; use --jitter \
             to spread runs)"
        )));
    }
    Ok(())
}

/// The full spec of a new schedule (or of a replacement): every field left out takes its
/// default, the task takes the queue's defaults from the leader's `config`.
pub fn resolve(
    def: &ScheduleDef,
    config: &crate::config::Config,
    now_ms: u64,
) -> Result<ScheduleSpec, Error> {
    crate::state::schedules::validate_schedule_name(&def.name).map_err(invalid)?;
    check_run_task(&def.name, &def.task)?;
    let trigger = trigger(def, now_ms, None)?.ok_or_else(|| {
        invalid(format!(
            "schedule {:?} needs --cron EXPR or --every DURATION",
            def.name
        ))
    })?;
    if def.task.command.is_empty() {
        return Err(invalid(format!(
            "schedule {:?} needs a command: give the program and its arguments after `--`",
            def.name
        )));
    }
    let task = def.task.resolve(config, now_ms)?;
    let spec = ScheduleSpec {
        trigger,
        start_at_ms: def.start_at_ms,
        end_at_ms: def.end_at_ms,
        catchup: def.catchup.unwrap_or(CatchupPolicy::All),
        catchup_window_ms: def.catchup_window_ms.unwrap_or(DEFAULT_CATCHUP_WINDOW_MS),
        overlap: def.overlap.unwrap_or(OverlapPolicy::Allow),
        jitter_ms: def.jitter_ms.unwrap_or(0),
        task,
        pool: pool_claim(&def.task)?,
    };
    finish(&def.name, spec, now_ms)
}

fn finish(name: &str, spec: ScheduleSpec, now_ms: u64) -> Result<ScheduleSpec, Error> {
    spec.validate()
        .map_err(|e| invalid(format!("schedule {name:?}: {e}")))?;
    check_timing(name, &spec, now_ms)?;
    Ok(spec)
}

/// `old` with the fields `def` gives changed.
pub fn update(def: &ScheduleDef, old: &ScheduleSpec, now_ms: u64) -> Result<ScheduleSpec, Error> {
    check_run_task(&def.name, &def.task)?;
    let mut spec = old.clone();
    if let Some(t) = trigger(def, now_ms, Some(&old.trigger))? {
        spec.trigger = t;
    }
    macro_rules! set {
        ($field:ident, $value:expr) => {
            if let Some(v) = $value {
                spec.$field = v;
            }
        };
    }
    if def.start_at_ms.is_some() {
        spec.start_at_ms = def.start_at_ms;
    }
    if def.end_at_ms.is_some() {
        spec.end_at_ms = def.end_at_ms;
    }
    set!(catchup, def.catchup);
    set!(catchup_window_ms, def.catchup_window_ms);
    set!(overlap, def.overlap);
    set!(jitter_ms, def.jitter_ms);
    spec.task = patch_task(&old.task, &def.task);
    if let Some(claim) = pool_claim(&def.task)? {
        spec.pool = Some(claim);
    } else if let (Some(slots), Some(c)) = (def.task.pool_slots, spec.pool.as_mut()) {
        c.slots = slots;
    }
    for u in &def.unset {
        match u.as_str() {
            "start-at" => spec.start_at_ms = None,
            "end-at" => spec.end_at_ms = None,
            "pool" => spec.pool = None,
            "jitter" => spec.jitter_ms = 0,
            other => {
                return Err(invalid(format!(
                    "--unset {other:?} is not an option that can be removed: use one of {}",
                    UNSETTABLE.join(", ")
                )))
            }
        }
    }
    finish(&def.name, spec, now_ms)
}

/// `old` with the options `patch` sets.
fn patch_task(old: &TaskSpec, patch: &NewTask) -> TaskSpec {
    let mut t = old.clone();
    if !patch.command.is_empty() {
        t.command = patch.command.clone().into();
    }
    if let Some(q) = &patch.queue {
        t.queue = q.clone();
    }
    if let Some(p) = patch.priority {
        t.priority = p;
    }
    if !patch.env.is_empty() {
        t.env = patch
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
    }
    if let Some(n) = patch.max_attempts {
        t.retry.max_attempts = n;
    }
    if let Some(v) = patch.backoff_initial_ms {
        t.retry.backoff_initial_ms = v;
    }
    if let Some(v) = patch.backoff_max_ms {
        t.retry.backoff_max_ms = v;
    }
    if let Some(m) = patch.backoff_multiplier {
        t.retry.backoff_multiplier_permille = crate::config::multiplier_permille(m);
    }
    if let Some(v) = patch.timeout_ms {
        t.execution_timeout_ms = Some(v).filter(|v| *v > 0);
    }
    if let Some(v) = patch.visibility_timeout_ms {
        t.visibility_timeout_ms = v;
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(name: &str) -> ScheduleDef {
        ScheduleDef {
            name: name.into(),
            every_ms: Some(60_000),
            task: NewTask::command(vec!["true".into()]),
            ..Default::default()
        }
    }

    #[test]
    fn create_takes_defaults_and_update_changes_only_what_is_given() {
        let config = crate::config::Config::default();
        let now = 1_796_259_600_500;
        let mut d = def("s");
        d.jitter_ms = Some(5_000);
        d.start_at_ms = Some(now + 60_000);
        let spec = resolve(&d, &config, now).unwrap();
        assert_eq!(spec.catchup, CatchupPolicy::All);
        assert_eq!(spec.overlap, OverlapPolicy::Allow);
        assert_eq!(spec.catchup_window_ms, DEFAULT_CATCHUP_WINDOW_MS);
        let mut patch = ScheduleDef {
            name: "s".into(),
            overlap: Some(OverlapPolicy::Skip),
            ..Default::default()
        };
        let updated = update(&patch, &spec, now).unwrap();
        assert_eq!(updated.overlap, OverlapPolicy::Skip);
        assert_eq!(updated.jitter_ms, 5_000, "left alone");
        assert_eq!(updated.task.command, ["true"], "left alone");
        patch.unset = vec!["jitter".into(), "start-at".into()];
        let updated = update(&patch, &spec, now).unwrap();
        assert_eq!((updated.jitter_ms, updated.start_at_ms), (0, None));
        patch.unset = vec!["queue".into()];
        let e = update(&patch, &spec, now).unwrap_err().to_string();
        assert!(
            e.contains("\"queue\" is not an option that can be removed"),
            "{e}"
        );
        // A cron expression keeps the old time zone unless a new one is given.
        let mut c = def("c");
        c.every_ms = None;
        c.cron = Some("0 3 * * *".into());
        c.timezone = Some("Europe/Berlin".into());
        let spec = resolve(&c, &config, now).unwrap();
        let patch = ScheduleDef {
            name: "c".into(),
            cron: Some("0 4 * * *".into()),
            ..Default::default()
        };
        let updated = update(&patch, &spec, now).unwrap();
        assert_eq!(
            updated.trigger,
            Trigger::Cron {
                expr: "0 4 * * *".into(),
                timezone: "Europe/Berlin".into()
            }
        );
    }

    #[test]
    fn bad_definitions_are_named() {
        let config = crate::config::Config::default();
        let mut d = def("s");
        d.cron = Some("* * * * *".into());
        let e = resolve(&d, &config, 0).unwrap_err().to_string();
        assert!(e.contains("not both"), "{e}");
        let mut d = def("s");
        d.task.delay_ms = Some(5);
        let e = resolve(&d, &config, 0).unwrap_err().to_string();
        assert!(e.contains("no delay"), "{e}");
        let mut d = def("s");
        d.timezone = Some("UTC".into());
        let e = resolve(&d, &config, 0).unwrap_err().to_string();
        assert!(e.contains("an interval has no time zone"), "{e}");
        let mut d = def("s");
        d.task.pool_slots = Some(2);
        let e = resolve(&d, &config, 0).unwrap_err().to_string();
        assert!(e.contains("without a pool"), "{e}");
    }
}
