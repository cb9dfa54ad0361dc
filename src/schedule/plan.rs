//! The leader's plan of which ticks to fire: pure, driven by the schedule's state, the time
//! and the leader's term.
//!
//! A tick whose fire time is at or after the moment this leader became able to fire (its
//! `ready_since_ms`) and after the schedule's last resume is **on time**, however late the
//! loop gets to it: it runs. A tick before that moment **passed** while no leader could fire
//! it (a failover, no quorum, the cluster down) or while the schedule was paused; the
//! schedule's catch-up policy decides:
//!
//! - `none`: none of them runs; each is recorded as missed;
//! - `latest`: the most recent one runs; the others are missed;
//! - `all`: every one no older than the catch-up window runs, oldest first; older ones are
//!   missed.
//!
//! The plan starts at the schedule's watermark and the state machine applies it only if the
//! watermark is still that one (`state::schedules`), which makes each tick exactly-once.

use super::Timing;
use crate::state::schedules::MissedTicks;
use crate::state::{CatchupPolicy, PlannedRun, Schedule, TickPlan};

/// Most ticks one plan covers; a schedule further behind is planned in several steps.
pub const MAX_TICKS_PER_PLAN: usize = 10_000;

/// The ticks of `schedule` due at `now_ms`, or `None` when none is. `jitter(max)` draws a
/// delay in `0..=max` for each run.
pub fn plan(
    schedule: &Schedule,
    timing: &Timing,
    now_ms: u64,
    ready_since_ms: u64,
    jitter: &mut dyn FnMut(u64) -> u64,
) -> Option<TickPlan> {
    if schedule.paused {
        return None;
    }
    let mut fires = Vec::new();
    let mut t = schedule.fired_through_ms;
    let mut more = false;
    while let Some(f) = timing.next_after(t) {
        if f > now_ms {
            break;
        }
        if fires.len() == MAX_TICKS_PER_PLAN {
            more = true;
            break;
        }
        fires.push(f);
        t = f;
    }
    let through_ms = *fires.last()?;
    let on_time_from = ready_since_ms.max(schedule.resumed_at_ms.unwrap_or(0));
    let passed = fires.partition_point(|f| *f < on_time_from);
    let spec = &schedule.spec;
    let mut run = vec![false; fires.len()];
    for r in run.iter_mut().skip(passed) {
        *r = true;
    }
    match spec.catchup {
        CatchupPolicy::None => {}
        CatchupPolicy::Latest => {
            // The chunk's last passed tick is the latest one unless more passed ticks follow.
            let latest_is_here = !more || passed < fires.len();
            if passed > 0 && latest_is_here {
                run[passed - 1] = true;
            }
        }
        CatchupPolicy::All => {
            let oldest = now_ms.saturating_sub(spec.catchup_window_ms);
            for (i, f) in fires[..passed].iter().enumerate() {
                run[i] = *f >= oldest;
            }
        }
    }
    let window =
        humantime::format_duration(std::time::Duration::from_millis(spec.catchup_window_ms));
    let mut missed: Vec<MissedTicks> = Vec::new();
    let mut runs = Vec::new();
    for (i, f) in fires.iter().enumerate() {
        if run[i] {
            let jitter_ms = if spec.jitter_ms > 0 {
                jitter(spec.jitter_ms).min(spec.jitter_ms)
            } else {
                0
            };
            runs.push(PlannedRun {
                fire_ms: *f,
                jitter_ms,
                catch_up: i < passed,
            });
            continue;
        }
        let why = schedule.passed_reason(*f);
        let reason = match spec.catchup {
            CatchupPolicy::None => format!("{why}; catch-up policy none"),
            CatchupPolicy::Latest => format!("{why}; catch-up policy latest ran a later tick"),
            CatchupPolicy::All => format!("{why}; older than the catch-up window of {window}"),
        };
        match missed.last_mut() {
            Some(m) if m.reason == reason && !run[i - 1] => {
                m.count += 1;
                m.last_ms = *f;
            }
            _ => missed.push(MissedTicks {
                count: 1,
                first_ms: *f,
                last_ms: *f,
                reason,
            }),
        }
    }
    Some(TickPlan {
        schedule: schedule.id,
        after_ms: schedule.fired_through_ms,
        through_ms,
        runs,
        missed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{
        Command, CommandOutput, OverlapPolicy, PutMode, Request, ScheduleSpec, State, Trigger,
    };

    const S: u64 = 1_000;

    /// A state with one schedule firing every second from t=0, created at `created`.
    fn state_with(catchup: CatchupPolicy, window_ms: u64, created: u64) -> State {
        let mut spec: ScheduleSpec = super::super::tests::spec(Trigger::Every {
            every_ms: S,
            anchor_ms: 0,
        });
        spec.catchup = catchup;
        spec.catchup_window_ms = window_ms;
        spec.overlap = OverlapPolicy::Allow;
        let mut st = State::default();
        let r = st.apply(
            1,
            &Request {
                proposed_at_ms: created,
                commands: vec![Command::PutSchedule {
                    name: "s".into(),
                    spec,
                    paused: None,
                    mode: PutMode::Create,
                }],
            },
        );
        assert!(matches!(
            r.results[0],
            Ok(CommandOutput::ScheduleSaved { .. })
        ));
        st
    }

    fn plan_at(st: &State, now: u64, ready_since: u64) -> Option<TickPlan> {
        let s = st.schedules().get("s").unwrap();
        let timing = Timing::new(&s.spec).unwrap();
        plan(s, &timing, now, ready_since, &mut |_| 0)
    }

    fn run_fires(p: &TickPlan) -> Vec<u64> {
        p.runs.iter().map(|r| r.fire_ms / S).collect()
    }

    #[test]
    fn on_time_ticks_run_however_late_the_loop_is() {
        let st = state_with(CatchupPolicy::None, 3_600_000, 10 * S);
        // The leader has led since before the schedule existed; its loop comes 3.5 s late.
        let p = plan_at(&st, 13 * S + 500, 0).unwrap();
        assert_eq!(run_fires(&p), [11, 12, 13]);
        assert!(p.missed.is_empty());
        assert_eq!((p.after_ms, p.through_ms), (10 * S, 13 * S));
        assert!(plan_at(&st, 10 * S + 999, 0).is_none(), "nothing due yet");
    }

    #[test]
    fn catchup_none_skips_every_passed_tick() {
        let st = state_with(CatchupPolicy::None, 3_600_000, 10 * S);
        // Leader since t=20.5: ticks 11..=20 passed without a leader.
        let p = plan_at(&st, 22 * S, 20 * S + 500).unwrap();
        assert_eq!(run_fires(&p), [21, 22]);
        assert_eq!(p.missed.len(), 1);
        let m = &p.missed[0];
        assert_eq!((m.count, m.first_ms, m.last_ms), (10, 11 * S, 20 * S));
        assert!(m.reason.contains("no leader"), "{}", m.reason);
    }

    #[test]
    fn catchup_latest_runs_only_the_most_recent_passed_tick() {
        let st = state_with(CatchupPolicy::Latest, 3_600_000, 10 * S);
        let p = plan_at(&st, 22 * S, 20 * S + 500).unwrap();
        assert_eq!(run_fires(&p), [20, 21, 22]);
        assert!(p.runs[0].catch_up && !p.runs[1].catch_up);
        assert_eq!(p.missed[0].count, 9);
    }

    #[test]
    fn catchup_all_runs_the_window_oldest_first() {
        let st = state_with(CatchupPolicy::All, 5 * S, 10 * S);
        let p = plan_at(&st, 22 * S, 20 * S + 500).unwrap();
        // Window 5 s at t=22: ticks from 17 on are run, 11..=16 are missed.
        assert_eq!(run_fires(&p), [17, 18, 19, 20, 21, 22]);
        assert_eq!(p.missed[0].count, 6);
        assert!(p.missed[0].reason.contains("catch-up window of 5s"));
    }

    #[test]
    fn a_long_backlog_is_planned_in_steps_and_latest_waits_for_its_last_step() {
        let st = state_with(CatchupPolicy::Latest, 3_600_000, 0);
        let now = (MAX_TICKS_PER_PLAN as u64 + 50) * S;
        let p = plan_at(&st, now, now).unwrap();
        assert_eq!(p.through_ms, MAX_TICKS_PER_PLAN as u64 * S);
        assert!(
            p.runs.is_empty(),
            "the latest passed tick is in a later step"
        );
        assert_eq!(p.missed[0].count, MAX_TICKS_PER_PLAN as u64);
    }

    #[test]
    fn paused_schedules_plan_nothing_and_resume_under_their_policy() {
        let mut st = state_with(CatchupPolicy::None, 3_600_000, 10 * S);
        let pause = |st: &mut State, now, paused| {
            st.apply(
                9,
                &Request {
                    proposed_at_ms: now,
                    commands: vec![Command::PauseSchedule {
                        name: "s".into(),
                        paused,
                    }],
                },
            );
        };
        pause(&mut st, 10 * S + 100, true);
        assert!(plan_at(&st, 15 * S, 0).is_none());
        pause(&mut st, 15 * S + 100, false);
        let p = plan_at(&st, 16 * S, 0).unwrap();
        assert_eq!(run_fires(&p), [16]);
        assert_eq!(p.missed[0].count, 5);
        assert!(
            p.missed[0].reason.contains("paused"),
            "{}",
            p.missed[0].reason
        );
    }

    #[test]
    fn jitter_is_drawn_per_run_and_bounded() {
        let mut st = state_with(CatchupPolicy::All, 3_600_000, 10 * S);
        let _ = &mut st;
        let s = st.schedules().get("s").unwrap();
        let mut spec = s.spec.clone();
        spec.jitter_ms = 300;
        let mut s = s.clone();
        s.spec = spec;
        let timing = Timing::new(&s.spec).unwrap();
        let p = plan(&s, &timing, 12 * S, 0, &mut |max| max * 10).unwrap();
        assert!(p.runs.iter().all(|r| r.jitter_ms == 300));
    }
}
