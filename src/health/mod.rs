//! Health: how a replica knows it makes progress, says so truthfully, and moves the work
//! elsewhere when it does not.
//!
//! - [`monitor`]: progress watermarks (scheduling loop iterations, Raft apply, fsync in flight,
//!   leader contact), stall detection against `[health] stall_threshold_ms`, and the mitigation
//!   of a stalled loop (stop confirming leases, stop standing for election, hand leadership to a
//!   healthy voter); it also builds the [`report`] and the cluster view.
//! - [`http`]: `GET /health` and `GET /health/cluster` on `node.http_listen`.
//! - [`systemd`]: the `Type=notify` integration (READY, STATUS, and WATCHDOG pings sent only
//!   while the watched loop makes progress).
//! - [`fault`]: test-only stalls of the scheduling loop or the fsync thread, refused unless
//!   `[fault_injection] enabled = true`.

pub mod fault;
pub mod http;
pub mod monitor;
pub mod report;
pub mod systemd;
