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

//!
//! Messages go out from one thread of their own: `sd_notify` writes to a datagram socket, and a
//! receiver that reads slowly (or not at all: a queue of 10 datagrams is Linux's default) makes
//! that write block. Blocking a runtime thread with it once stopped a replica's shutdown; now a
//! caller only queues the message (dropped if 64 are already waiting), and `stopping` waits at
//! most [`STOPPING_WAIT`] for it to be sent.

use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::time::Duration;

use sd_notify::NotifyState;

/// How often STATUS is sent when no watchdog asks for more.
const STATUS_EVERY: Duration = Duration::from_secs(5);
/// Messages waiting for the sending thread.
const QUEUE: usize = 64;
/// How long `stopping` waits for STOPPING=1 to be sent before the process goes on stopping.
pub const STOPPING_WAIT: Duration = Duration::from_secs(1);

/// One message: its states, and whom to tell once it was sent.
struct Message {
    ready: bool,
    stopping: bool,
    watchdog: bool,
    status: String,
    sent: Option<SyncSender<()>>,
}

/// The process's link to systemd.
#[derive(Debug, Clone)]
pub struct Notifier {
    watchdog: Option<Duration>,
    /// The sending thread's queue; `None` without `NOTIFY_SOCKET`.
    tx: Option<SyncSender<Message>>,
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.status)
    }
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` from the environment, and starts
    /// the sending thread when there is a socket.
    pub fn from_env() -> Notifier {
        let mut usec = 0u64;
        let watchdog = sd_notify::watchdog_enabled(false, &mut usec)
            .then(|| Duration::from_micros(usec))
            .filter(|d| !d.is_zero());
        let tx = std::env::var_os("NOTIFY_SOCKET").and_then(|_| {
            let (tx, rx) = sync_channel::<Message>(QUEUE);
            std::thread::Builder::new()
                .name("sd-notify".into())
                .spawn(move || {
                    for m in rx {
                        let mut states = vec![NotifyState::Status(&m.status)];
                        if m.ready {
                            states.push(NotifyState::Ready);
                        }
                        if m.stopping {
                            states.push(NotifyState::Stopping);
                        }
                        if m.watchdog {
                            states.push(NotifyState::Watchdog);
                        }
                        let _ = sd_notify::notify(false, &states);
                        if let Some(sent) = m.sent {
                            let _ = sent.try_send(());
                        }
                    }
                })
                .ok()
                .map(|_| tx)
        });
        Notifier { watchdog, tx }
    }

    /// Queues a message for the sending thread; never blocks (a full queue drops it).
    fn send(&self, m: Message) {
        if let Some(tx) = &self.tx {
            match tx.try_send(m) {
                Ok(()) | Err(TrySendError::Disconnected(_)) => {}
                Err(TrySendError::Full(m)) => {
                    tracing::debug!(message = ?m, "systemd notifications are not being read: dropped one")
                }
            }
        }
    }

    fn message(status: &str) -> Message {
        Message {
            ready: false,
            stopping: false,
            watchdog: false,
            status: status.to_string(),
            sent: None,
        }
    }

    /// The watchdog interval systemd asked for, if any.
    pub fn watchdog(&self) -> Option<Duration> {
        self.watchdog
    }

    pub fn ready(&self, status: &str) {
        self.send(Message {
            ready: true,
            ..Self::message(status)
        });
    }

    pub fn status(&self, status: &str) {
        self.send(Self::message(status));
    }

    /// Sends STOPPING=1, waiting (at most [`STOPPING_WAIT`]) until it was written.
    pub fn stopping(&self, status: &str) {
        let (sent, done) = sync_channel(1);
        self.send(Message {
            stopping: true,
            sent: Some(sent),
            ..Self::message(status)
        });
        if self.tx.is_some() {
            let _ = done.recv_timeout(STOPPING_WAIT);
        }
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
                if !moved && self.watchdog.is_some() && !stalled_logged {
                    tracing::warn!(
                        "the watched loop made no progress in {every:?}: withholding the systemd watchdog ping"
                    );
                    stalled_logged = true;
                } else if moved {
                    stalled_logged = false;
                }
                self.send(Message {
                    watchdog: moved && self.watchdog.is_some(),
                    ..Self::message(&status)
                });
            }
        });
    }
}
