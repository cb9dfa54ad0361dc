//! Fault injection: stall one replica's scheduling loop or its fsyncs on demand, without
//! freezing the process, so tests and the chaos harness can create the "alive but not making
//! progress" hang the health module must detect.
//!
//! Off unless `[fault_injection] enabled = true`; a request to a replica without it is refused
//! (`fleet fault` names the key). Every stall has a duration (at most [`MAX_STALL`]) so a crashed
//! test cannot leave a replica stalled forever; `fleet fault clear` ends it early.
//!
//! - The scheduling loop waits in [`Stall::wait`] at the top of each iteration: an async hang,
//!   like a loop blocked on a lock or a channel that never answers.
//! - The fsync thread waits in [`Stall::wait_blocking`] before `fsync`: a disk that stopped
//!   answering. Raft writes on this replica then wait, as they would on a dying disk.
//! - The clock offset steps the replica's [`Clock`] (every wall-clock reading the replica
//!   makes goes through it): a clock step (NTP jumping, an operator's `date -s`)
//!   without root and without touching the machine's clock.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::clock::Clock;

/// The longest stall one request may ask for.
pub const MAX_STALL: Duration = Duration::from_secs(3600);

/// The largest clock offset one request may set (either way).
pub const MAX_CLOCK_OFFSET_MS: i64 = 24 * 3600 * 1000;

/// One stallable component.
#[derive(Default)]
pub struct Stall {
    until: Mutex<Option<Instant>>,
    cv: Condvar,
    notify: tokio::sync::Notify,
}

impl Stall {
    /// Stalls until `until` (or ends the stall with `None`).
    pub fn set(&self, until: Option<Instant>) {
        *self.until.lock().expect("stall lock") = until;
        self.cv.notify_all();
        self.notify.notify_waiters();
    }

    /// How much longer the stall lasts, if one is active.
    pub fn remaining(&self) -> Option<Duration> {
        let until = (*self.until.lock().expect("stall lock"))?;
        let left = until.saturating_duration_since(Instant::now());
        (!left.is_zero()).then_some(left)
    }

    /// Waits (async) while a stall is active.
    pub async fn wait(&self) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let Some(left) = self.remaining() else {
                return;
            };
            tokio::select! {
                _ = tokio::time::sleep(left) => {}
                _ = notified => {}
            }
        }
    }

    /// Blocks the calling thread while a stall is active.
    pub fn wait_blocking(&self) {
        let mut until = self.until.lock().expect("stall lock");
        loop {
            let left = match *until {
                Some(u) => u.saturating_duration_since(Instant::now()),
                None => return,
            };
            if left.is_zero() {
                return;
            }
            until = self.cv.wait_timeout(until, left).expect("stall lock").0;
        }
    }
}

/// What `fleet fault` can stall.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Component {
    /// The scheduling loop (on a leader: grants, expiries, retries; on a follower: its idle
    /// iterations).
    Scheduler,
    /// The fsync thread: every Raft write on this replica waits.
    Storage,
}

impl std::fmt::Display for Component {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Component::Scheduler => "scheduler",
            Component::Storage => "storage",
        })
    }
}

/// A fault request (the `inject_fault` RPC).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FaultRequest {
    Stall {
        component: Component,
        duration_ms: u64,
    },
    /// Step this replica's wall clock by `offset_ms` (negative: back) from the real clock;
    /// 0 restores it.
    ClockOffset { offset_ms: i64 },
    /// End every active stall and restore the clock.
    Clear,
}

/// The active faults on one replica.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultState {
    /// Whether `[fault_injection] enabled` is set on this replica.
    pub enabled: bool,
    /// Milliseconds left of a scheduling loop stall.
    pub scheduler_stall_left_ms: Option<u64>,
    /// Milliseconds left of an fsync stall.
    pub storage_stall_left_ms: Option<u64>,
    /// The offset added to this replica's wall clock.
    pub clock_offset_ms: i64,
}

/// The replica's fault switches.
pub struct FaultInjector {
    enabled: bool,
    pub scheduler: Arc<Stall>,
    pub storage: Arc<Stall>,
    /// The replica's clock, which the clock fault steps.
    clock: Clock,
}

impl FaultInjector {
    pub fn new(enabled: bool, clock: Clock) -> FaultInjector {
        FaultInjector {
            enabled,
            scheduler: Arc::default(),
            storage: Arc::default(),
            clock,
        }
    }

    /// Applies a request; refused (with the key to set) when fault injection is off.
    pub fn apply(&self, node: u64, req: &FaultRequest) -> Result<FaultState, String> {
        if !self.enabled {
            return Err(format!(
                "fault injection is disabled on node {node}; it is only for tests: set \
                 [fault_injection] enabled = true in that replica's config to allow it"
            ));
        }
        match req {
            FaultRequest::Stall {
                component,
                duration_ms,
            } => {
                let d = Duration::from_millis(*duration_ms);
                if d.is_zero() || d > MAX_STALL {
                    return Err(format!(
                        "a stall of {duration_ms} ms is not valid: use 1 ms to {} ms",
                        MAX_STALL.as_millis()
                    ));
                }
                let stall = match component {
                    Component::Scheduler => &self.scheduler,
                    Component::Storage => &self.storage,
                };
                tracing::warn!(%component, duration_ms, "fault injection: stalling");
                stall.set(Some(Instant::now() + d));
            }
            FaultRequest::ClockOffset { offset_ms } => {
                if offset_ms.abs() > MAX_CLOCK_OFFSET_MS {
                    return Err(format!(
                        "a clock offset of {offset_ms} ms is not valid: use -{MAX_CLOCK_OFFSET_MS} \
                         to {MAX_CLOCK_OFFSET_MS} ms"
                    ));
                }
                tracing::warn!(offset_ms, "fault injection: wall clock stepped");
                self.clock.step(*offset_ms);
            }
            FaultRequest::Clear => {
                tracing::warn!("fault injection: every stall cleared, clock restored");
                self.scheduler.set(None);
                self.storage.set(None);
                self.clock.step(0);
            }
        }
        Ok(self.state())
    }

    pub fn state(&self) -> FaultState {
        let ms = |s: &Stall| s.remaining().map(|d| d.as_millis() as u64);
        FaultState {
            enabled: self.enabled,
            scheduler_stall_left_ms: ms(&self.scheduler),
            storage_stall_left_ms: ms(&self.storage),
            clock_offset_ms: self.clock.offset_ms(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_unless_enabled_and_bounded() {
        let off = FaultInjector::new(false, Clock::system());
        let req = FaultRequest::Stall {
            component: Component::Scheduler,
            duration_ms: 1000,
        };
        let e = off.apply(7, &req).unwrap_err();
        assert!(e.contains("[fault_injection] enabled = true"), "{e}");
        assert!(off.scheduler.remaining().is_none());

        let on = FaultInjector::new(true, Clock::system());
        let e = on
            .apply(
                7,
                &FaultRequest::Stall {
                    component: Component::Storage,
                    duration_ms: 0,
                },
            )
            .unwrap_err();
        assert!(e.contains("0 ms is not valid"), "{e}");
        let st = on.apply(7, &req).unwrap();
        assert!(st.scheduler_stall_left_ms.is_some_and(|ms| ms <= 1000));
        assert!(st.storage_stall_left_ms.is_none());
        let st = on.apply(7, &FaultRequest::Clear).unwrap();
        assert_eq!(st.scheduler_stall_left_ms, None);
    }

    #[test]
    fn a_blocked_thread_is_released_by_clear() {
        let stall = Arc::new(Stall::default());
        stall.set(Some(Instant::now() + Duration::from_secs(3600)));
        let s = stall.clone();
        let t = std::thread::spawn(move || s.wait_blocking());
        stall.set(None);
        t.join().unwrap();
    }

    #[tokio::test]
    async fn an_async_waiter_is_released_by_clear() {
        let stall = Arc::new(Stall::default());
        stall.set(Some(Instant::now() + Duration::from_secs(3600)));
        let s = stall.clone();
        let t = tokio::spawn(async move { s.wait().await });
        tokio::task::yield_now().await;
        stall.set(None);
        tokio::time::timeout(Duration::from_secs(10), t)
            .await
            .expect("released")
            .unwrap();
    }
}
