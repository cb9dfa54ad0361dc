//! Every encoded format fleet writes to disk or sends on the wire, with its version, in one
//! place; the compatibility policy is in docs/operations.md ("Versions and upgrades").
//!
//! | format | constant | where |
//! |---|---|---|
//! | wire protocol (handshake frame and the RPC messages) | [`PROTOCOL_VERSION`] | `rpc::handshake`, `rpc` |
//! | data directory layout | [`DATA_FORMAT`] | `server::data_dir` (the `FORMAT` file) |
//! | a Raft log entry and the log's markers (vote, committed, purged, identity) | [`ENTRY_FORMAT`] | `raft::log_store` |
//! | the state bytes (snapshots, snapshot chunks, backups) | [`STATE_FORMAT`] | `raft::state_machine_store` |
//! | the snapshot file around them | [`SNAPSHOT_FILE_FORMAT`] | `raft::state_machine_store` |
//!
//! Golden fixtures of each, committed under `tests/fixtures/formats/` and checked by this
//! module's tests, fail a test when an encoding changes without its version changing.

pub use crate::raft::log_store::ENTRY_FORMAT;
pub use crate::raft::state_machine_store::{SNAPSHOT_FILE_FORMAT, STATE_FORMAT};
pub use crate::rpc::handshake::PROTOCOL_VERSION;
pub use crate::server::data_dir::DATA_FORMAT;

/// One line naming every format version this build writes, for `fleet --version`.
pub fn describe() -> String {
    format!(
        "{} (protocol {PROTOCOL_VERSION}, data directory {DATA_FORMAT}, log entries \
         {ENTRY_FORMAT}, state {STATE_FORMAT}, snapshot file {SNAPSHOT_FILE_FORMAT})",
        env!("CARGO_PKG_VERSION")
    )
}

/// [`describe`], kept for the life of the process (clap's `--version` takes a `&'static str`).
pub fn long_version() -> &'static str {
    static LINE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    LINE.get_or_init(describe)
}

#[cfg(test)]
mod golden;
