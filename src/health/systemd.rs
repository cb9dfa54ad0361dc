//! systemd `Type=notify` integration through `sd_notify`.
//!
//! - `READY=1` once the process serves (a replica's listener is bound and Raft started; a
//!   worker's paths are running).
//! - `STATUS=...` every few seconds, saying what the process is doing.
//! - `WATCHDOG=1` every half `WATCHDOG_USEC`, **only if the watched loop advanced since the
//!   previous ping**: a process that is alive but whose loop is stuck stops pinging, and systemd
//!   restarts it (`WatchdogSec=` in the unit).
//! - `STOPPING=1` on shutdown.
//!
//! Without `NOTIFY_SOCKET` (not under systemd) every call is a no-op.

use std::time::Duration;

use sd_notify::NotifyState;

/// How often STATUS is sent when no watchdog asks for more.
const STATUS_EVERY: Duration = Duration::from_secs(5);

/// The process's link to systemd.
#[derive(Debug, Clone, Copy)]
pub struct Notifier {
    watchdog: Option<Duration>,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` from the environment.
    pub fn from_env() -> Notifier {
        let mut usec = 0u64;
        let watchdog = sd_notify::watchdog_enabled(false, &mut usec)
            .then(|| Duration::from_micros(usec))
            .filter(|d| !d.is_zero());
        Notifier { watchdog }
    }

    /// The watchdog interval systemd asked for, if any.
    pub fn watchdog(&self) -> Option<Duration> {
        self.watchdog
    }

    pub fn ready(&self, status: &str) {
        let _ = sd_notify::notify(false, &[NotifyState::Ready, NotifyState::Status(status)]);
    }

    pub fn status(&self, status: &str) {
        let _ = sd_notify::notify(false, &[NotifyState::Status(status)]);
    }

    pub fn stopping(&self, status: &str) {
        let _ = sd_notify::notify(false, &[NotifyState::Stopping, NotifyState::Status(status)]);
    }

    /// Spawns the ping loop. `probe` returns the watched loop's progress counter and a status
    /// line; a ping is sent only when the counter moved since the previous probe.
    pub fn spawn(self, probe: impl Fn() -> (u64, String) + Send + 'static) {
        let every = self
            .watchdog
            .map_or(STATUS_EVERY, |w| (w / 2).min(STATUS_EVERY));
        tokio::spawn(async move {
            let mut last = probe().0;
            let mut stalled_logged = false;
            let mut ticker = tokio::time::interval(every);
            ticker.tick().await;
            loop {
                ticker.tick().await;
                let (now, status) = probe();
                let moved = now != last;
                last = now;
                let mut states = vec![NotifyState::Status(&status)];
                if moved {
                    states.push(NotifyState::Watchdog);
                    stalled_logged = false;
                } else if self.watchdog.is_some() && !stalled_logged {
                    tracing::warn!(
                        "the watched loop made no progress in {every:?}: withholding the systemd watchdog ping"
                    );
                    stalled_logged = true;
                }
                if self.watchdog.is_none() {
                    states.retain(|s| !matches!(s, NotifyState::Watchdog));
                }
                let _ = sd_notify::notify(false, &states);
            }
        });
    }
}
