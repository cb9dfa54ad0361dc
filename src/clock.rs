//! Time as an input: one [`Clock`] per replica, passed to whatever reads time.
//!
//! A reading is a [`Now`]: the **monotonic** clock (ms since the clock's start; silence,
//! timeouts and deadlines are measured with it, so a wall-clock step can neither expire healthy
//! leases nor keep dead ones) and the **wall** clock (ms since the Unix epoch; what the leader
//! stamps into the replicated state).
//!
//! The wall reading is slewed: it follows the source's wall clock exactly while the two agree
//! within [`CLOCK_STEP_TOLERANCE_US`]; a larger step (NTP jumping, `date -s`, a wrong clock at
//! boot) is approached at most 10% faster or slower than the monotonic clock, and the reading
//! never goes back. Why: the replicated state's clock never goes back and retry times are
//! computed from it; a one-minute step forward followed at once and then corrected held every
//! retry for that minute (found by the chaos harness's clock-step scenario).
//!
//! The clock-step fault (`fleet fault clock`) is a property of the clock: [`Clock::step`]
//! offsets the source's wall clock. Sources: [`Clock::system`] (the process's clocks; the
//! monotonic one is tokio's, which is the real one outside a paused runtime) and
//! [`Clock::simulated`] (the simulator's virtual time, with a per-node skew). Nothing in
//! fleet's replica reads time any other way: there is no process-wide clock.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

/// Wall-clock differences up to this are followed at once.
pub const CLOCK_STEP_TOLERANCE_US: u64 = 1_000_000;

/// One reading of both clocks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Now {
    /// Monotonic ms since the clock's start.
    pub mono_ms: u64,
    /// Wall-clock ms since the Unix epoch (slewed, never going back).
    pub wall_ms: u64,
}

impl Now {
    /// A reading for tests of pure code: both clocks at the given values.
    pub fn at(mono_ms: u64, wall_ms: u64) -> Now {
        Now { mono_ms, wall_ms }
    }
}

/// Where readings come from.
#[derive(Debug)]
enum Source {
    /// The process's clocks.
    System,
    /// Virtual time: the wall clock is `epoch_us` plus the elapsed (paused) tokio time plus the
    /// node's skew.
    Simulated { epoch_us: u64, skew_us: i64 },
}

#[derive(Debug)]
struct Inner {
    source: Source,
    start: Instant,
    /// The clock fault's offset, in ms (0 unless `fleet fault clock` set one).
    offset_ms: AtomicI64,
    /// The last wall reading (µs) and the monotonic time it was made at (µs).
    last: Mutex<Option<(u64, u64)>>,
}

/// A replica's clock (cheap to clone; clones share the slew state and the fault offset).
#[derive(Debug, Clone)]
pub struct Clock(Arc<Inner>);

impl Clock {
    fn new(source: Source) -> Clock {
        Clock(Arc::new(Inner {
            source,
            start: Instant::now(),
            offset_ms: AtomicI64::new(0),
            last: Mutex::new(None),
        }))
    }

    /// The process's clocks.
    pub fn system() -> Clock {
        Clock::new(Source::System)
    }

    /// Virtual time for the simulator: starts at `epoch_ms` on the wall clock, skewed by
    /// `skew_ms`; both clocks advance with tokio's (paused) time.
    pub fn simulated(epoch_ms: u64, skew_ms: i64) -> Clock {
        Clock::new(Source::Simulated {
            epoch_us: epoch_ms * 1000,
            skew_us: skew_ms * 1000,
        })
    }

    fn mono_us(&self) -> u64 {
        self.0.start.elapsed().as_micros() as u64
    }

    fn source_wall_us(&self, mono_us: u64) -> u64 {
        let raw = match self.0.source {
            Source::System => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_micros() as u64)
                .unwrap_or(0),
            Source::Simulated { epoch_us, skew_us } => {
                (epoch_us + mono_us).saturating_add_signed(skew_us)
            }
        };
        raw.saturating_add_signed(self.offset_ms().saturating_mul(1000))
    }

    /// Both clocks, now.
    pub fn now(&self) -> Now {
        let mono_us = self.mono_us();
        let wall_us = self.source_wall_us(mono_us);
        let mut last = self.0.last.lock().expect("clock lock");
        let us = match *last {
            None => wall_us,
            Some((last_us, at)) => slew_us(last_us, mono_us.saturating_sub(at), wall_us),
        };
        *last = Some((us, mono_us));
        Now {
            mono_ms: mono_us / 1000,
            wall_ms: us / 1000,
        }
    }

    /// The monotonic clock alone (ms since the clock's start).
    pub fn mono_ms(&self) -> u64 {
        self.mono_us() / 1000
    }

    /// The wall clock alone (ms since the Unix epoch).
    pub fn wall_ms(&self) -> u64 {
        self.now().wall_ms
    }

    /// The tokio instant of a monotonic reading, for timers.
    pub fn instant_at(&self, mono_ms: u64) -> Instant {
        self.0.start + std::time::Duration::from_millis(mono_ms)
    }

    /// A monotonic reading as wall-clock time, for display.
    pub fn mono_to_wall_ms(&self, mono_ms: u64) -> u64 {
        let now = self.now();
        now.wall_ms
            .saturating_sub(now.mono_ms.saturating_sub(mono_ms))
    }

    /// Steps the wall clock by `offset_ms` from its source (the clock fault; 0 restores it).
    pub fn step(&self, offset_ms: i64) {
        self.0.offset_ms.store(offset_ms, Ordering::Relaxed);
    }

    /// The clock fault's offset (ms).
    pub fn offset_ms(&self) -> i64 {
        self.0.offset_ms.load(Ordering::Relaxed)
    }
}

/// The next wall reading: `last_us` advanced by `elapsed_us` (monotonic), moved toward
/// `wall_us` as the module describes. Pure, for tests.
pub fn slew_us(last_us: u64, elapsed_us: u64, wall_us: u64) -> u64 {
    let projected = last_us + elapsed_us;
    let next = if wall_us.abs_diff(projected) <= CLOCK_STEP_TOLERANCE_US {
        wall_us
    } else if wall_us > projected {
        projected + elapsed_us / 10
    } else {
        projected - elapsed_us / 10
    };
    next.max(last_us)
}

/// The wall clock of this process without slewing, for what a client prints or parses (`now`
/// in a time argument). A replica never uses this: it reads its [`Clock`].
pub fn system_wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_follows_small_differences_and_slews_toward_steps() {
        const S: u64 = 1_000_000;
        // In step with the wall clock: followed exactly, small corrections too.
        assert_eq!(slew_us(100 * S, S, 101 * S), 101 * S);
        assert_eq!(slew_us(100 * S, S, 101 * S + S / 2), 101 * S + S / 2);
        // A minute forward: 10% faster than real time, not the minute.
        assert_eq!(slew_us(100 * S, S, 161 * S), 101 * S + S / 10);
        // A minute back: 10% slower, never backwards.
        assert_eq!(slew_us(100 * S, S, 41 * S), 101 * S - S / 10);
        assert_eq!(slew_us(100 * S, 0, 41 * S), 100 * S);
        // A small step back is followed, but the clock holds still rather than go back.
        assert_eq!(slew_us(100 * S, 0, 100 * S - S / 2), 100 * S);
        // Slewing converges: a minute ahead is absorbed within ten minutes.
        let (mut clock, mut wall) = (160 * S, 100 * S);
        for _ in 0..700 {
            clock = slew_us(clock, S, wall + S);
            wall += S;
        }
        assert_eq!(clock, wall, "caught up with the wall clock");
    }
}
