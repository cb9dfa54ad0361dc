//! The leader's ticker: fires the ticks of every schedule when they are due.
//!
//! One task per replica; it acts only while the replica's scheduling loop is ready in the
//! current term (so the state it plans from includes everything committed before the term).
//! Each round it plans every schedule's due ticks ([`crate::schedule::plan`]: what is on time,
//! what passed while no leader could fire it and what the catch-up policy does with that),
//! proposes the plans in [`Command::FireTicks`] entries, and sleeps until the next fire time
//! (at most [`MAX_SLEEP`]) or until a schedule changes. The state machine applies a plan only
//! from the watermark it was made from, so a plan repeated by a retry or made by a deposed
//! leader creates nothing twice.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;

use super::scheduling_loop::LoopContext;
use crate::metrics::names as m;
use crate::schedule::{plan::plan, Timing};
use crate::state::{Command, CommandOutput, ScheduleId, State, TickPlan};

/// Longest sleep between two rounds when no tick is due sooner.
pub const MAX_SLEEP: Duration = Duration::from_secs(1);
/// How long the ticker waits before planning again when no plan of a round was applied.
const RETRY_AFTER_MS: u64 = 100;
/// Most runs one `FireTicks` entry creates (bounds one entry's size and apply time).
pub const MAX_RUNS_PER_ENTRY: usize = 10_000;

/// Parsed timings, kept while a schedule's spec is unchanged.
#[derive(Default)]
pub struct Timings {
    by_id: HashMap<ScheduleId, (TimingKey, Timing)>,
}

type TimingKey = (crate::state::Trigger, Option<u64>, Option<u64>);

impl Timings {
    fn get(&mut self, s: &crate::state::Schedule) -> Option<&Timing> {
        let key = (s.spec.trigger.clone(), s.spec.start_at_ms, s.spec.end_at_ms);
        let fresh = self.by_id.get(&s.id).is_some_and(|(k, _)| *k == key);
        if !fresh {
            match Timing::new(&s.spec) {
                Ok(t) => {
                    self.by_id.insert(s.id, (key, t));
                }
                Err(e) => {
                    tracing::warn!(schedule = %s.name, error = %e, "schedule cannot fire");
                    return None;
                }
            }
        }
        self.by_id.get(&s.id).map(|(_, t)| t)
    }
}

/// Plans every schedule's due ticks at `now_ms`; returns the plans and the next fire time of
/// any schedule after `now_ms`. Pure apart from the jitter draw.
pub fn plan_all(
    state: &State,
    timings: &mut Timings,
    now_ms: u64,
    ready_since_ms: u64,
    jitter: &mut dyn FnMut(u64) -> u64,
) -> (Vec<TickPlan>, Option<u64>) {
    let mut plans = Vec::new();
    let mut next: Option<u64> = None;
    let live: std::collections::HashSet<ScheduleId> =
        state.schedules().all().map(|s| s.id).collect();
    timings.by_id.retain(|id, _| live.contains(id));
    for s in state.schedules().all() {
        if s.paused {
            continue;
        }
        let Some(timing) = timings.get(s) else {
            continue;
        };
        if let Some(p) = plan(s, timing, now_ms, ready_since_ms, jitter) {
            plans.push(p);
        }
        let after = now_ms.max(s.fired_through_ms);
        if let Some(f) = timing.next_after(after) {
            next = Some(next.map_or(f, |n| n.min(f)));
        }
    }
    (plans, next)
}

/// Runs the ticker until the replica stops.
pub async fn run(cx: LoopContext) {
    let mut metrics = cx.raft.metrics();
    let mut timings = Timings::default();
    let mut seen_changes = u64::MAX;
    let mut wake_at = cx.clock.wall_ms();
    let mut shutdown = cx.shutdown.clone();
    loop {
        let sched = &cx.scheduler;
        let Some(term) = sched.ready_term() else {
            seen_changes = u64::MAX;
            tokio::select! {
                biased;
                _ = shutdown.wait() => return,
                r = metrics.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(MAX_SLEEP) => {}
            }
            continue;
        };
        let changes = cx.sm.read(|s| s.schedules().changes()).await;
        let now = cx.clock.wall_ms();
        if changes == seen_changes && now < wake_at {
            // Nothing changed and nothing is due: wait for either.
            let sleep = Duration::from_millis(wake_at - now);
            tokio::select! {
                biased;
                _ = shutdown.wait() => return,
                r = metrics.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(sleep) => {}
            }
            continue;
        }
        seen_changes = changes;
        let ready_since = sched.ready_since_ms.load(Ordering::Acquire);
        let (plans, next) = cx
            .sm
            .read(|s| {
                plan_all(s, &mut timings, now, ready_since, &mut |max| {
                    cx.random.range(0..=max)
                })
            })
            .await;
        if sched.ready_term() != Some(term) {
            continue; // leadership moved while planning
        }
        let planned = !plans.is_empty();
        let applied = fire(&cx, plans).await;
        // Plans that were cut at MAX_TICKS_PER_PLAN leave more due ticks: plan again at once.
        // Plans that were all refused or failed (leadership moving, a schedule paused
        // meanwhile) are planned again from the new state after a short pause, never in a
        // tight loop.
        wake_at = if planned && applied {
            cx.clock.wall_ms()
        } else if planned {
            cx.clock.wall_ms() + RETRY_AFTER_MS
        } else {
            next.unwrap_or(u64::MAX)
                .min(cx.clock.wall_ms() + MAX_SLEEP.as_millis() as u64)
        };
    }
}

/// Proposes the plans, at most [`MAX_RUNS_PER_ENTRY`] runs per entry, and counts the outcome;
/// whether any plan was applied.
async fn fire(cx: &LoopContext, plans: Vec<TickPlan>) -> bool {
    let mut entries: Vec<Vec<TickPlan>> = vec![Vec::new()];
    let mut runs = 0;
    for p in plans {
        if runs + p.runs.len() > MAX_RUNS_PER_ENTRY && !entries.last().expect("one").is_empty() {
            entries.push(Vec::new());
            runs = 0;
        }
        runs += p.runs.len();
        entries.last_mut().expect("one").push(p);
    }
    let commands: Vec<Command> = entries
        .into_iter()
        .filter(|e| !e.is_empty())
        .map(|plans| Command::FireTicks { plans })
        .collect();
    if commands.is_empty() {
        return false;
    }
    let outputs = cx.proposer.propose_many(commands).await;
    let outcomes: Vec<_> = outputs
        .into_iter()
        .filter_map(|o| match o {
            Ok(CommandOutput::TicksFired { outcomes }) => Some(outcomes),
            Ok(_) => None,
            Err(e) => {
                tracing::debug!(error = %e, "ticks not applied; planned again next round");
                None
            }
        })
        .flatten()
        .filter(|o| o.applied)
        .collect();
    if outcomes.is_empty() {
        return false;
    }
    cx.sm
        .read(|s| {
            for o in &outcomes {
                let Some(sch) = s.schedules().by_id(o.schedule) else {
                    continue;
                };
                for (result, n) in [
                    ("fired", u64::from(o.runs + o.queued)),
                    ("missed", o.missed),
                    ("skipped", u64::from(o.skipped)),
                ] {
                    metrics::counter!(m::SCHEDULE_TICKS, "schedule" => sch.name.clone(), "result" => result)
                        .increment(n);
                }
                if o.missed > 0 {
                    tracing::warn!(schedule = %sch.name, missed = o.missed, "ticks missed (see `fleet schedule show`)");
                }
            }
        })
        .await;
    true
}
