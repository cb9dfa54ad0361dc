//! Task lifecycle types: specs, attempts, leases, retry policy.
//!
//! Vocabulary (one meaning each): a **task** is one unit of work; an **attempt** is one try at
//! running it, numbered from 1; a **lease** is one worker's right to run one attempt; a
//! **fencing token** grows with every lease granted (cluster-wide), and any call carrying an
//! older token than the task's current lease is rejected.

use serde::{Deserialize, Serialize};

use super::{CommandError, TaskId};

/// Identifies a worker process for the cluster's lifetime (chosen by the worker at start).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct WorkerId(pub u64);

/// How a failed attempt is retried. Integer arithmetic only, so every replica computes the
/// same delays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// Attempts in total, the first included (1 = never retry).
    pub max_attempts: u32,
    /// Delay before the second attempt, in milliseconds.
    pub backoff_initial_ms: u64,
    /// Longest delay between attempts, in milliseconds.
    pub backoff_max_ms: u64,
    /// Growth per attempt in thousandths (2000 = doubling).
    pub backoff_multiplier_permille: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 3,
            backoff_initial_ms: 1_000,
            backoff_max_ms: 300_000,
            backoff_multiplier_permille: 2_000,
        }
    }
}

/// Most attempts a task may be given.
pub const MAX_ATTEMPTS_LIMIT: u32 = 1_000;

impl RetryPolicy {
    pub fn validate(&self) -> Result<(), CommandError> {
        if !(1..=MAX_ATTEMPTS_LIMIT).contains(&self.max_attempts) {
            return Err(CommandError::Invalid(format!(
                "max attempts {} is not valid: use 1 to {MAX_ATTEMPTS_LIMIT}",
                self.max_attempts
            )));
        }
        if self.backoff_initial_ms > self.backoff_max_ms {
            return Err(CommandError::Invalid(format!(
                "initial backoff {} ms is greater than the maximum backoff {} ms",
                self.backoff_initial_ms, self.backoff_max_ms
            )));
        }
        if !(1_000..=10_000).contains(&self.backoff_multiplier_permille) {
            return Err(CommandError::Invalid(format!(
                "backoff multiplier {:.3} is not valid: use 1.0 to 10.0",
                f64::from(self.backoff_multiplier_permille) / 1000.0
            )));
        }
        Ok(())
    }

    /// The delay before attempt `next_attempt` (2 for the first retry), before jitter.
    pub fn base_delay_ms(&self, next_attempt: u32) -> u64 {
        let mut delay = self.backoff_initial_ms;
        for _ in 2..next_attempt {
            delay = delay.saturating_mul(u64::from(self.backoff_multiplier_permille)) / 1000;
            if delay >= self.backoff_max_ms {
                return self.backoff_max_ms;
            }
        }
        delay.min(self.backoff_max_ms)
    }

    /// The delay with the leader's jitter applied: between half and all of the base delay
    /// ("equal jitter"), so retries of many tasks spread out but never come sooner than half.
    pub fn delay_ms(&self, next_attempt: u32, jitter_permille: u32) -> u64 {
        let base = self.base_delay_ms(next_attempt);
        let j = u64::from(jitter_permille.min(1000));
        base / 2 + (base - base / 2) * j / 1000
    }
}

/// How one attempt ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttemptOutcome {
    /// The process exited 0.
    Succeeded,
    /// The process exited non-zero, was killed by a signal, or could not start.
    Failed {
        exit_code: Option<i32>,
        signal: Option<i32>,
        error: Option<String>,
    },
    /// The execution timeout killed it.
    TimedOut,
    /// The lease was lost (no heartbeat within the visibility timeout, or the worker was
    /// declared lost); the worker, if alive, is fenced.
    Lost { reason: String },
    /// The task was cancelled while the attempt ran.
    Cancelled,
}

impl AttemptOutcome {
    /// A failure with a reason and no exit status (the process could not start, was fenced,
    /// or a persistent executor reported or caused it).
    pub fn failed(error: impl Into<String>) -> AttemptOutcome {
        AttemptOutcome::Failed {
            exit_code: None,
            signal: None,
            error: Some(error.into()),
        }
    }
}

impl std::fmt::Display for AttemptOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AttemptOutcome::Succeeded => write!(f, "succeeded"),
            AttemptOutcome::Failed {
                exit_code,
                signal,
                error,
            } => {
                write!(f, "failed")?;
                if let Some(c) = exit_code {
                    write!(f, ": exit code {c}")?;
                }
                if let Some(s) = signal {
                    write!(f, ": killed by signal {s}")?;
                }
                if let Some(e) = error {
                    write!(f, ": {e}")?;
                }
                Ok(())
            }
            AttemptOutcome::TimedOut => write!(f, "timed out (killed)"),
            AttemptOutcome::Lost { reason } => write!(f, "lost: {reason}"),
            AttemptOutcome::Cancelled => write!(f, "cancelled (killed)"),
        }
    }
}

impl AttemptOutcome {
    pub fn is_success(&self) -> bool {
        matches!(self, AttemptOutcome::Succeeded)
    }
}

/// One try at running a task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Attempt {
    /// Numbered from 1.
    pub number: u32,
    pub worker: WorkerId,
    pub fencing_token: u64,
    pub started_at_ms: u64,
    pub ended_at_ms: Option<u64>,
    pub outcome: Option<AttemptOutcome>,
    /// The end of the attempt's output, as reported by the worker (bounded by the worker).
    pub output_tail: String,
    /// The worker's name (`fleet worker --name`, by default host:pid), as `fleet worker list`
    /// and the task's `FLEET_WORKER` show it. Empty for attempts recorded before names were
    /// (state format 1).
    pub worker_name: String,
}

impl Attempt {
    /// How the attempt's worker is shown: its name, or its id for attempts without one.
    pub fn worker_label(&self) -> String {
        if self.worker_name.is_empty() {
            format!("id {}", self.worker.0)
        } else {
            self.worker_name.clone()
        }
    }
}

thread_local! {
    /// Set while decoding a state of format 1, whose attempts have no worker name.
    static ATTEMPTS_WITHOUT_NAMES: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `decode` on state bytes of format 1 (attempts without a worker name). bincode carries
/// no schema, so the reader must know which fields were written.
pub fn decoding_attempts_without_names<T>(decode: impl FnOnce() -> T) -> T {
    /// Clears the flag however `decode` ends.
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            ATTEMPTS_WITHOUT_NAMES.with(|f| f.set(false));
        }
    }
    ATTEMPTS_WITHOUT_NAMES.with(|f| f.set(true));
    let _reset = Reset;
    decode()
}

/// An attempt as state format 1 stored it.
#[derive(Deserialize)]
#[serde(rename = "Attempt")]
struct AttemptV1 {
    number: u32,
    worker: WorkerId,
    fencing_token: u64,
    started_at_ms: u64,
    ended_at_ms: Option<u64>,
    outcome: Option<AttemptOutcome>,
    output_tail: String,
}

/// An attempt as it is stored now (and as JSON shows it; a JSON attempt without the name is
/// read with an empty one).
#[derive(Deserialize)]
#[serde(rename = "Attempt")]
struct AttemptV2 {
    number: u32,
    worker: WorkerId,
    fencing_token: u64,
    started_at_ms: u64,
    ended_at_ms: Option<u64>,
    outcome: Option<AttemptOutcome>,
    output_tail: String,
    #[serde(default)]
    worker_name: String,
}

impl<'de> Deserialize<'de> for Attempt {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if ATTEMPTS_WITHOUT_NAMES.with(|f| f.get()) {
            let a = AttemptV1::deserialize(d)?;
            return Ok(Attempt {
                number: a.number,
                worker: a.worker,
                fencing_token: a.fencing_token,
                started_at_ms: a.started_at_ms,
                ended_at_ms: a.ended_at_ms,
                outcome: a.outcome,
                output_tail: a.output_tail,
                worker_name: String::new(),
            });
        }
        let a = AttemptV2::deserialize(d)?;
        Ok(Attempt {
            number: a.number,
            worker: a.worker,
            fencing_token: a.fencing_token,
            started_at_ms: a.started_at_ms,
            ended_at_ms: a.ended_at_ms,
            outcome: a.outcome,
            output_tail: a.output_tail,
            worker_name: a.worker_name,
        })
    }
}

/// The current lease of a running task (replicated part: the grant). Extensions by heartbeat
/// are soft state on the leader; see ARCHITECTURE.md.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub worker: WorkerId,
    pub fencing_token: u64,
    pub attempt: u32,
    pub granted_at_ms: u64,
}

/// What a worker receives for a granted lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseGrant {
    pub task: TaskId,
    pub attempt: u32,
    pub fencing_token: u64,
    pub granted_at_ms: u64,
}

/// Why a lease-bound call was refused.
pub fn stale_token(task: TaskId, given: u64, current: Option<u64>) -> CommandError {
    CommandError::StaleToken {
        task,
        given,
        current,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = RetryPolicy {
            max_attempts: 10,
            backoff_initial_ms: 100,
            backoff_max_ms: 1_000,
            backoff_multiplier_permille: 2_000,
        };
        let delays: Vec<u64> = (2..=7).map(|a| p.base_delay_ms(a)).collect();
        assert_eq!(delays, vec![100, 200, 400, 800, 1_000, 1_000]);
    }

    #[test]
    fn jitter_stays_within_half_and_all_of_the_delay() {
        let p = RetryPolicy::default();
        for attempt in 2..12 {
            let base = p.base_delay_ms(attempt);
            for j in [0, 1, 250, 500, 999, 1000, 5000] {
                let d = p.delay_ms(attempt, j);
                assert!(
                    d >= base / 2 && d <= base,
                    "attempt {attempt} jitter {j}: {d} vs {base}"
                );
            }
            assert_eq!(p.delay_ms(attempt, 0), base / 2);
            assert_eq!(p.delay_ms(attempt, 1000), base);
        }
    }

    #[test]
    fn bad_policies_are_named() {
        let p = RetryPolicy {
            max_attempts: 0,
            ..Default::default()
        };
        assert!(p
            .validate()
            .unwrap_err()
            .to_string()
            .contains("max attempts 0"));
        let p = RetryPolicy {
            backoff_multiplier_permille: 500,
            ..Default::default()
        };
        assert!(p.validate().unwrap_err().to_string().contains("0.500"));
        let p = RetryPolicy {
            backoff_initial_ms: 10,
            backoff_max_ms: 5,
            ..Default::default()
        };
        assert!(p.validate().unwrap_err().to_string().contains("10 ms"));
    }
}
