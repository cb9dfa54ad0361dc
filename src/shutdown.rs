//! The shutdown signal (the mini-redis `Shutdown` pattern): every long-running task of a
//! replica holds a [`Shutdown`] and returns when it fires, so a whole replica can be started
//! and stopped inside one process (the simulator does, many times per run).

use tokio::sync::watch;

/// Fires the signal (held by whoever owns the replica).
#[derive(Debug)]
pub struct Trigger(watch::Sender<bool>);

/// Waits for the signal (one clone per task).
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<bool>);

/// A new signal, not fired.
pub fn channel() -> (Trigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (Trigger(tx), Shutdown(rx))
}

impl Trigger {
    /// Fires the signal: every [`Shutdown::wait`] returns.
    pub fn fire(&self) {
        self.0.send_replace(true);
    }

    /// A receiver for one more task.
    pub fn subscribe(&self) -> Shutdown {
        Shutdown(self.0.subscribe())
    }
}

impl Shutdown {
    /// Whether the signal fired.
    pub fn is_fired(&self) -> bool {
        *self.0.borrow()
    }

    /// Returns once the signal fired (or its trigger was dropped).
    pub async fn wait(&mut self) {
        let _ = self.0.wait_for(|fired| *fired).await;
    }
}
