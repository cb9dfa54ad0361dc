//! The schedule and pool calls: changes resolved on the leader into replicated commands, and
//! reads of the schedules (with their next fire times) and pools.

use tarpc::context::Context;

use super::Replica;
use crate::error::Error;
use crate::rpc::schedules::{self, OpOutcome, ScheduleOp, ScheduleView};
use crate::schedule::Timing;
use crate::state::schedules::MAX_BACKFILL;
use crate::state::{Command, CommandOutput, PoolView, PutMode, State};

/// Most changes in one `schedule_ops` call (a schedule file of more is sent in parts).
pub const MAX_OPS: usize = 1_000;
/// Fire times `schedule show` lists.
const NEXT_FIRES: usize = 5;

impl Replica {
    /// Proposes the command of each resolved change (refusals stay refusals), in one batch, and
    /// pairs each change with its output. A retryable failure (leadership moved) fails the
    /// whole call, so the client retries it.
    pub(crate) async fn propose_resolved<T>(
        &self,
        resolved: Vec<Result<T, Error>>,
        command: impl Fn(&T) -> Command,
    ) -> Result<Vec<Result<(T, CommandOutput), Error>>, Error> {
        let commands: Vec<Command> = resolved.iter().flatten().map(&command).collect();
        let outputs = self.proposer.propose_many(commands).await;
        if let Some(Err(e)) = outputs
            .iter()
            .find(|r| matches!(r, Err(e) if e.is_retryable()))
        {
            return Err(e.clone());
        }
        let mut outputs = outputs.into_iter();
        Ok(resolved
            .into_iter()
            .map(|r| {
                let change = r?;
                let out = outputs.next().expect("one output per proposed command")?;
                Ok((change, out))
            })
            .collect())
    }

    pub(crate) async fn schedule_ops(
        &self,
        ctx: Context,
        ops: Vec<ScheduleOp>,
        hop: u8,
    ) -> Result<Vec<Result<OpOutcome, Error>>, Error> {
        if ops.len() > MAX_OPS {
            return Err(Error::InvalidArgument(format!(
                "{} changes in one call; at most {MAX_OPS} are accepted",
                ops.len()
            )));
        }
        if !self.raft.is_leader() {
            return self
                .forward(ctx, hop, |c, ctx| async move {
                    c.schedule_ops(ctx, ops, hop + 1).await
                })
                .await;
        }
        let now = self.clock.wall_ms();
        let resolved: Vec<Result<(Command, String), Error>> = self
            .sm
            .read(|s| ops.iter().map(|op| self.to_command(s, op, now)).collect())
            .await;
        let proposed = self.propose_resolved(resolved, |(c, _)| c.clone()).await?;
        Ok(proposed
            .into_iter()
            .map(|r| {
                let ((command, name), out) = r?;
                Ok(match out {
                    CommandOutput::ScheduleSaved { change, .. } => match command {
                        Command::PauseSchedule { paused, .. } => OpOutcome::Paused {
                            name,
                            paused,
                            changed: change != crate::state::PutChange::Unchanged,
                        },
                        _ => OpOutcome::Saved { name, change },
                    },
                    CommandOutput::ScheduleDeleted { .. } => OpOutcome::Deleted { name },
                    CommandOutput::ScheduleRuns { created, existing } => OpOutcome::Runs {
                        name,
                        created,
                        existing,
                    },
                    CommandOutput::PoolSet { name, slots } => OpOutcome::PoolSet { name, slots },
                    CommandOutput::PoolDeleted { name } => OpOutcome::PoolDeleted { name },
                    other => {
                        return Err(Error::Internal(format!(
                            "unexpected output for a schedule change: {other:?}"
                        )))
                    }
                })
            })
            .collect())
    }

    /// The command for one change, decided against the current state at `now`.
    fn to_command(&self, s: &State, op: &ScheduleOp, now: u64) -> Result<(Command, String), Error> {
        let missing = |name: &str| Error::InvalidArgument(format!("no schedule named {name:?}"));
        let put = |def: &schedules::ScheduleDef, spec, mode| {
            (
                Command::PutSchedule {
                    name: def.name.clone(),
                    spec,
                    paused: def.paused,
                    mode,
                },
                def.name.clone(),
            )
        };
        Ok(match op {
            ScheduleOp::Create(def) => put(
                def,
                schedules::resolve(def, &self.config, now)?,
                PutMode::Create,
            ),
            ScheduleOp::Apply(def) => put(
                def,
                schedules::resolve(def, &self.config, now)?,
                PutMode::CreateOrReplace,
            ),
            ScheduleOp::Update(def) => {
                let old = s
                    .schedules()
                    .get(&def.name)
                    .ok_or_else(|| missing(&def.name))?;
                put(
                    def,
                    schedules::update(def, &old.spec, now)?,
                    PutMode::Replace,
                )
            }
            ScheduleOp::Pause(name) | ScheduleOp::Resume(name) => (
                Command::PauseSchedule {
                    name: name.clone(),
                    paused: matches!(op, ScheduleOp::Pause(_)),
                },
                name.clone(),
            ),
            ScheduleOp::Delete(name) => {
                (Command::DeleteSchedule { name: name.clone() }, name.clone())
            }
            ScheduleOp::Trigger { name, request_id } => (
                Command::TriggerSchedule {
                    name: name.clone(),
                    key: request_id.0,
                },
                name.clone(),
            ),
            ScheduleOp::Backfill {
                name,
                from_ms,
                to_ms,
            } => {
                let sch = s.schedules().get(name).ok_or_else(|| missing(name))?;
                let fires = backfill_fires(&sch.spec, *from_ms, *to_ms, now)?;
                (
                    Command::Backfill {
                        name: name.clone(),
                        fires,
                    },
                    name.clone(),
                )
            }
            ScheduleOp::SetPool { name, slots } => (
                Command::SetPool {
                    name: name.clone(),
                    slots: *slots,
                },
                name.clone(),
            ),
            ScheduleOp::DeletePool(name) => {
                (Command::DeletePool { name: name.clone() }, name.clone())
            }
        })
    }
}

/// The fire times of `spec` in `from_ms..=to_ms`, for a backfill: the range must be in the
/// past and hold at most [`MAX_BACKFILL`] ticks.
pub fn backfill_fires(
    spec: &crate::state::ScheduleSpec,
    from_ms: u64,
    to_ms: u64,
    now: u64,
) -> Result<Vec<u64>, Error> {
    use crate::state::schedules::rfc3339;
    if from_ms > to_ms {
        return Err(Error::InvalidArgument(format!(
            "backfill from {} to {}: the start is after the end",
            rfc3339(from_ms),
            rfc3339(to_ms)
        )));
    }
    if to_ms > now {
        return Err(Error::InvalidArgument(format!(
            "backfill to {} is in the future: a backfill runs past ticks (the schedule fires the \
             future ones itself)",
            rfc3339(to_ms)
        )));
    }
    let timing = Timing::new(spec).map_err(Error::InvalidArgument)?;
    let fires = timing.between(from_ms, to_ms, MAX_BACKFILL + 1);
    if fires.len() > MAX_BACKFILL {
        return Err(Error::InvalidArgument(format!(
            "the range holds more than {MAX_BACKFILL} ticks; backfill it in parts"
        )));
    }
    Ok(fires)
}

/// Views of one schedule or of all (all: without their history, to keep the answer small).
pub fn schedule_views(s: &State, name: Option<&str>, now: u64) -> Result<Vec<ScheduleView>, Error> {
    let view = |sch: &crate::state::Schedule, full: bool| {
        let next_fires = if sch.paused {
            Vec::new()
        } else {
            Timing::new(&sch.spec)
                .map(|t| t.upcoming(now.max(sch.fired_through_ms), NEXT_FIRES))
                .unwrap_or_default()
        };
        let mut schedule = sch.clone();
        if !full {
            schedule.history.clear();
        }
        let run_states = schedule
            .history
            .iter()
            .filter_map(|r| match r.result {
                crate::state::TickResult::Run { task } => Some(task),
                _ => None,
            })
            .chain(schedule.active.iter().copied())
            .filter_map(|id| s.task(id).map(|t| (id, t.state)))
            .collect();
        ScheduleView {
            schedule,
            next_fires,
            run_states,
        }
    };
    match name {
        Some(n) => {
            let sch = s
                .schedules()
                .get(n)
                .ok_or_else(|| Error::InvalidArgument(format!("no schedule named {n:?}")))?;
            Ok(vec![view(sch, true)])
        }
        None => Ok(s.schedules().all().map(|sch| view(sch, false)).collect()),
    }
}

pub fn pools(s: &State) -> Vec<PoolView> {
    s.pool_views()
}
