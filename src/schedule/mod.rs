//! When schedules fire: cron expressions and intervals in IANA time zones, and the leader's
//! plan of which ticks to fire ([`plan`]). Pure: the current time and the random jitter are
//! passed in, so every rule here is a unit test.
//!
//! **DST.** A cron expression describes wall-clock times in its time zone. A wall-clock time
//! that a spring-forward change skips fires once, at the next valid instant (02:30 on the
//! night clocks go from 02:00 to 03:00 fires at 03:00). A wall-clock time that a fall-back
//! change repeats fires once, at its first instant: 01:30 fires at 01:30 summer time, not
//! again an hour later, and an hourly schedule fires 02:00 once on the night 02:00 happens
//! twice. A schedule that must fire every real hour uses `--every 1h`, which counts elapsed
//! time and knows no time zone.

pub mod plan;

use std::str::FromStr;

use chrono::{LocalResult, TimeZone};
use chrono_tz::Tz;

use crate::state::{ScheduleSpec, Trigger};

/// Parses a cron expression: 5 fields (minute to weekday), 6 with seconds first, or a macro
/// (`@yearly`, `@monthly`, `@weekly`, `@daily`, `@hourly`). The error names the expression.
pub fn parse_cron(expr: &str) -> Result<croner::Cron, String> {
    let fields = expr.split_whitespace().count();
    let macro_ok = expr.trim_start().starts_with('@');
    if !macro_ok && !(5..=6).contains(&fields) {
        return Err(format!(
            "cron expression {expr:?} has {fields} fields; use 5 (minute hour day-of-month \
             month day-of-week), 6 (seconds first) or a macro such as @hourly or @daily"
        ));
    }
    croner::Cron::from_str(expr).map_err(|e| {
        format!(
            "cron expression {expr:?} is not valid ({e}); use 5 fields (minute hour \
             day-of-month month day-of-week), 6 with seconds first, or @yearly, @monthly, \
             @weekly, @daily, @hourly"
        )
    })
}

/// Parses an IANA time zone name (`UTC`, `Europe/Berlin`, `America/New_York`).
pub fn parse_timezone(name: &str) -> Result<Tz, String> {
    Tz::from_str(name).map_err(|_| {
        format!(
            "unknown time zone {name:?}; use an IANA name such as UTC, Europe/Berlin or \
             America/New_York"
        )
    })
}

/// A schedule's fire times, ready to compute.
pub struct Timing {
    kind: Kind,
    start_ms: Option<u64>,
    end_ms: Option<u64>,
}

enum Kind {
    Cron(Box<croner::Cron>, Tz),
    Every { every_ms: u64, anchor_ms: u64 },
}

impl Timing {
    pub fn new(spec: &ScheduleSpec) -> Result<Timing, String> {
        let kind = match &spec.trigger {
            Trigger::Cron { expr, timezone } => {
                Kind::Cron(Box::new(parse_cron(expr)?), parse_timezone(timezone)?)
            }
            Trigger::Every {
                every_ms,
                anchor_ms,
            } => {
                if *every_ms == 0 {
                    return Err("an interval of 0 never ends: use at least 1s".into());
                }
                Kind::Every {
                    every_ms: *every_ms,
                    anchor_ms: *anchor_ms,
                }
            }
        };
        Ok(Timing {
            kind,
            start_ms: spec.start_at_ms,
            end_ms: spec.end_at_ms,
        })
    }

    /// The first fire time after `after_ms` (exclusive), within the start and end times.
    pub fn next_after(&self, after_ms: u64) -> Option<u64> {
        let after = match self.start_ms {
            Some(s) => after_ms.max(s.saturating_sub(1)),
            None => after_ms,
        };
        let next = match &self.kind {
            Kind::Every {
                every_ms,
                anchor_ms,
            } => {
                // anchor + k * every for any integer k (a backfill may reach before the
                // anchor), the first one after `after`.
                let (after, anchor, every) = (
                    i128::from(after),
                    i128::from(*anchor_ms),
                    i128::from(*every_ms),
                );
                let k = (after - anchor).div_euclid(every) + 1;
                u64::try_from(anchor + k * every).ok()
            }
            Kind::Cron(cron, tz) => next_cron(cron, tz, after),
        }?;
        match self.end_ms {
            Some(end) if next > end => None,
            _ => Some(next),
        }
    }

    /// The next `n` fire times after `after_ms`.
    pub fn upcoming(&self, after_ms: u64, n: usize) -> Vec<u64> {
        let mut out = Vec::with_capacity(n);
        let mut t = after_ms;
        while out.len() < n {
            match self.next_after(t) {
                Some(f) => {
                    out.push(f);
                    t = f;
                }
                None => break,
            }
        }
        out
    }

    /// Fire times in `from..=to`, at most `max`.
    pub fn between(&self, from_ms: u64, to_ms: u64, max: usize) -> Vec<u64> {
        let mut out = Vec::new();
        let mut t = from_ms.saturating_sub(1);
        while out.len() < max {
            match self.next_after(t) {
                Some(f) if f <= to_ms => {
                    out.push(f);
                    t = f;
                }
                _ => break,
            }
        }
        out
    }
}

/// The next cron fire time after `after_ms` in `tz`, with the DST rule of the module docs
/// (croner already moves a skipped time to the next valid instant; a repeated wall-clock time
/// is dropped here at its second instant).
fn next_cron(cron: &croner::Cron, tz: &Tz, after_ms: u64) -> Option<u64> {
    let mut t = tz
        .timestamp_millis_opt(i64::try_from(after_ms).ok()?)
        .single()?;
    for _ in 0..1_000 {
        let next = cron.find_next_occurrence(&t, false).ok()?;
        if let LocalResult::Ambiguous(first, _) = tz.from_local_datetime(&next.naive_local()) {
            if first != next {
                t = next;
                continue; // the second instant of a repeated wall-clock time
            }
        }
        return u64::try_from(next.timestamp_millis()).ok();
    }
    None
}

/// Parses a time given on the command line or in a schedule file: RFC 3339
/// (`2026-12-03T09:00:00Z`, `2026-12-03T10:00:00+01:00`) or `now`.
pub fn parse_time(s: &str, now_ms: u64) -> Result<u64, String> {
    if s == "now" {
        return Ok(now_ms);
    }
    let t = chrono::DateTime::parse_from_rfc3339(s).map_err(|e| {
        format!(
            "time {s:?} is not valid ({e}); use RFC 3339 such as 2026-12-03T09:00:00Z or \
             2026-12-03T10:00:00+01:00, or `now`"
        )
    })?;
    u64::try_from(t.timestamp_millis())
        .map_err(|_| format!("time {s:?} is before 1970; use a later time"))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::state::{CatchupPolicy, OverlapPolicy, TaskSpec};

    fn cron(expr: &str, tz: &str) -> Timing {
        Timing::new(&spec(Trigger::Cron {
            expr: expr.into(),
            timezone: tz.into(),
        }))
        .unwrap()
    }

    pub(crate) fn spec(trigger: Trigger) -> ScheduleSpec {
        ScheduleSpec {
            trigger,
            start_at_ms: None,
            end_at_ms: None,
            catchup: CatchupPolicy::All,
            catchup_window_ms: 3_600_000,
            overlap: OverlapPolicy::Allow,
            jitter_ms: 0,
            task: TaskSpec::new(vec!["true".into()], "default"),
            pool: None,
        }
    }

    fn at(s: &str) -> u64 {
        parse_time(s, 0).unwrap()
    }

    fn fires(t: &Timing, from: &str, n: usize) -> Vec<String> {
        t.upcoming(at(from), n)
            .into_iter()
            .map(|ms| {
                chrono::DateTime::from_timestamp_millis(ms as i64)
                    .unwrap()
                    .to_rfc3339()
            })
            .collect()
    }

    #[test]
    fn five_and_six_fields_and_macros() {
        let t = cron("*/15 * * * *", "UTC");
        assert_eq!(
            fires(&t, "2026-12-03T01:07:30Z", 2),
            ["2026-12-03T01:15:00+00:00", "2026-12-03T01:30:00+00:00"]
        );
        let t = cron("*/20 * * * * *", "UTC");
        assert_eq!(
            fires(&t, "2026-12-03T01:00:00.500Z", 2),
            ["2026-12-03T01:00:20+00:00", "2026-12-03T01:00:40+00:00"]
        );
        let t = cron("@daily", "UTC");
        assert_eq!(
            fires(&t, "2026-12-03T01:00:00Z", 1),
            ["2026-12-04T00:00:00+00:00"]
        );
        // Every second, from a time between two seconds.
        let t = cron("* * * * * *", "UTC");
        assert_eq!(
            t.upcoming(at("2026-12-03T01:00:00.250Z"), 2),
            [at("2026-12-03T01:00:01Z"), at("2026-12-03T01:00:02Z")]
        );
    }

    #[test]
    fn bad_expressions_and_zones_are_named() {
        for bad in [
            "61 * * * *",
            "* * *",
            "@often",
            "* * * * * * * *",
            "a b c d e",
        ] {
            let e = parse_cron(bad).unwrap_err();
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
        let e = parse_timezone("Mars/Olympus").unwrap_err();
        assert!(e.contains("\"Mars/Olympus\"") && e.contains("IANA"), "{e}");
    }

    /// New York springs forward on 2026-03-08 (02:00 -> 03:00) and falls back on 2026-11-01
    /// (02:00 -> 01:00).
    #[test]
    fn dst_new_york() {
        let daily = cron("30 2 * * *", "America/New_York");
        // 02:30 does not exist on 03-08: it fires once, at 03:00 EDT.
        assert_eq!(
            fires(&daily, "2026-03-07T12:00:00-05:00", 3),
            [
                "2026-03-08T07:00:00+00:00",
                "2026-03-09T06:30:00+00:00",
                "2026-03-10T06:30:00+00:00"
            ]
        );
        // 01:30 happens twice on 11-01: it fires once, at its first instant (EDT).
        let daily = cron("30 1 * * *", "America/New_York");
        assert_eq!(
            fires(&daily, "2026-10-31T12:00:00-04:00", 2),
            ["2026-11-01T05:30:00+00:00", "2026-11-02T06:30:00+00:00"]
        );
        // Every 30 minutes through the repeated hour: 01:00 and 01:30 once each.
        let half = cron("*/30 * * * *", "America/New_York");
        assert_eq!(
            fires(&half, "2026-11-01T00:10:00-04:00", 4),
            [
                "2026-11-01T04:30:00+00:00", // 00:30 EDT
                "2026-11-01T05:00:00+00:00", // 01:00 EDT
                "2026-11-01T05:30:00+00:00", // 01:30 EDT
                "2026-11-01T07:00:00+00:00", // 02:00 EST (01:00 and 01:30 EST are repeats)
            ]
        );
        // Through the gap: 02:00 and 02:30 do not exist; they fire once, at 03:00.
        assert_eq!(
            fires(&half, "2026-03-08T01:10:00-05:00", 3),
            [
                "2026-03-08T06:30:00+00:00", // 01:30 EST
                "2026-03-08T07:00:00+00:00", // 03:00 EDT
                "2026-03-08T07:30:00+00:00", // 03:30 EDT
            ]
        );
    }

    /// Berlin springs forward on 2026-03-29 (02:00 -> 03:00) and falls back on 2026-10-25
    /// (03:00 -> 02:00).
    #[test]
    fn dst_berlin() {
        let daily = cron("30 2 * * *", "Europe/Berlin");
        assert_eq!(
            fires(&daily, "2026-03-28T12:00:00+01:00", 2),
            ["2026-03-29T01:00:00+00:00", "2026-03-30T00:30:00+00:00"]
        );
        assert_eq!(
            fires(&daily, "2026-10-24T12:00:00+02:00", 2),
            ["2026-10-25T00:30:00+00:00", "2026-10-26T01:30:00+00:00"]
        );
        let hourly = cron("@hourly", "Europe/Berlin");
        assert_eq!(
            fires(&hourly, "2026-10-25T00:10:00+02:00", 3),
            [
                "2026-10-24T23:00:00+00:00", // 01:00 CEST
                "2026-10-25T00:00:00+00:00", // 02:00 CEST
                "2026-10-25T02:00:00+00:00", // 03:00 CET (02:00 CET is a repeat)
            ]
        );
        // An interval's fire times extend before its anchor (a backfill can reach them).
        let every = Timing::new(&spec(Trigger::Every {
            every_ms: 3_600_000,
            anchor_ms: at("2026-10-25T00:00:00Z"),
        }))
        .unwrap();
        assert_eq!(
            every.between(at("2026-10-24T21:30:00Z"), at("2026-10-25T00:00:00Z"), 10),
            [
                at("2026-10-24T22:00:00Z"),
                at("2026-10-24T23:00:00Z"),
                at("2026-10-25T00:00:00Z")
            ]
        );
        // An interval knows no wall clock: every real hour.
        let every = Timing::new(&spec(Trigger::Every {
            every_ms: 3_600_000,
            anchor_ms: at("2026-10-24T23:00:00Z"),
        }))
        .unwrap();
        assert_eq!(
            every.upcoming(at("2026-10-24T23:30:00Z"), 3),
            [
                at("2026-10-25T00:00:00Z"),
                at("2026-10-25T01:00:00Z"),
                at("2026-10-25T02:00:00Z")
            ]
        );
    }

    #[test]
    fn start_and_end_bound_the_fire_times() {
        let mut s = spec(Trigger::Cron {
            expr: "0 * * * *".into(),
            timezone: "UTC".into(),
        });
        s.start_at_ms = Some(at("2026-12-03T05:00:00Z"));
        s.end_at_ms = Some(at("2026-12-03T06:30:00Z"));
        let t = Timing::new(&s).unwrap();
        assert_eq!(
            t.upcoming(at("2026-12-03T01:00:00Z"), 5),
            [at("2026-12-03T05:00:00Z"), at("2026-12-03T06:00:00Z")]
        );
        assert_eq!(
            t.between(at("2026-12-03T05:00:00Z"), at("2026-12-03T06:00:00Z"), 10)
                .len(),
            2
        );
    }

    #[test]
    fn times_parse_or_are_named() {
        assert_eq!(at("1970-01-01T00:00:01Z"), 1000);
        assert_eq!(parse_time("now", 7).unwrap(), 7);
        let e = parse_time("tomorrow", 0).unwrap_err();
        assert!(e.contains("\"tomorrow\"") && e.contains("RFC 3339"), "{e}");
    }
}
