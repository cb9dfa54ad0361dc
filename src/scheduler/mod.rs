//! The scheduler: what the leader decides that the state machine then commits.
//!
//! Built so far: [`leases::LeaseTracker`], the leader's soft state about heartbeats, grace
//! periods and worker liveness, from which it decides lease expiries. Next (issue 3): the
//! scheduling loop that grants leases to waiting workers (`State::pick_ready` then
//! `Command::GrantLeases`), proposes expiries and retention purges, and records its progress
//! for the health module.

pub mod leases;
