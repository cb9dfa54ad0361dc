//! fleet's error type for everything that crosses the wire or reaches a user.
//!
//! One enum, serializable, so a replica's answer reaches the CLI intact. Variants say what the
//! caller can do: [`Error::NotLeader`] and [`Error::Unavailable`] are worth retrying (elsewhere
//! or later); [`Error::InvalidArgument`] and [`Error::NotFound`] are not.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Error {
    /// This replica is not the leader. `leader_addr` is where to go, when known.
    #[error("not the leader{}", match (.leader_id, .leader_addr) {
        (Some(id), Some(addr)) => format!("; the leader is node {id} at {addr}"),
        _ => "; no leader is known right now (an election may be under way)".to_string(),
    })]
    NotLeader {
        leader_id: Option<u64>,
        leader_addr: Option<String>,
    },
    /// The request is malformed or names a bad value; retrying will not help.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The named thing does not exist; the text says what ("task 9 not found").
    #[error("{0}")]
    NotFound(String),
    /// The cluster cannot serve the request now (no quorum, shutting down, timed out);
    /// a retry later may succeed.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The peer is not part of this cluster or speaks another protocol version.
    #[error("rejected: {0}")]
    Rejected(String),
    /// The caller's lease was lost: its fencing token is older than the task's current one.
    /// The caller must stop the attempt.
    #[error("fenced: {0}")]
    StaleToken(String),
    /// A bug or a storage failure on the replica.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// Whether a client should retry the request (at another replica or after a pause).
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::NotLeader { .. } | Error::Unavailable(_))
    }
}

impl From<crate::state::CommandError> for Error {
    fn from(e: crate::state::CommandError) -> Error {
        use crate::state::CommandError;
        match e {
            CommandError::NotFound(_) => Error::NotFound(e.to_string()),
            CommandError::StaleToken { .. } => Error::StaleToken(e.to_string()),
            CommandError::Invalid(_) | CommandError::WrongState { .. } => {
                Error::InvalidArgument(e.to_string())
            }
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
