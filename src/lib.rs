//! fleet: a distributed worker fleet with a Raft-replicated, highly available scheduler.
//!
//! A map of the crate (ARCHITECTURE.md has the long version):
//! - [`state`]: the replicated scheduler state, a pure deterministic state machine.
//! - [`raft`]: the openraft glue: sled log store, state machine store, network adapter.
//! - [`rpc`]: the tarpc service, the handshake, the bincode transport, reconnecting peers.
//! - [`scheduler`]: the leader's scheduling loop: lease grants, expiries, worker liveness,
//!   retention.
//! - [`worker`]: the worker process: lease loop, heartbeat thread, attempts, reports.
//! - [`server`]: a replica: Raft + listener + formation + request handlers + write batching.
//! - [`health`]: stall detection and mitigation, `/health`, systemd notify, fault injection.
//! - [`client`]: finding the cluster and retrying through elections (used by the CLI).
//! - [`cli`]: the `fleet` command line; [`bench`]: the built-in write benchmark.
//! - [`config`]: the one documented configuration; [`error`]: the wire error type.
//! - [`pidlock`]: lock files that name their holder (data directories, `fleet up`).

pub mod bench;
pub mod cli;
pub mod client;
pub mod clock;
pub mod config;
pub mod error;
pub mod formats;
pub mod health;
pub mod logging;
pub mod metrics;
pub mod pidlock;
pub mod raft;
pub mod random;
pub mod rpc;
pub mod schedule;
pub mod scheduler;
pub mod server;
pub mod shutdown;
pub mod state;
pub mod worker;
