//! The named fault scenarios and the seeded plan of each run.
//!
//! A scenario names a fault; a [`Plan`] is one scenario with every parameter drawn from the run's
//! seed (how long the fault holds, which replica or worker it hits, how much latency, how far the
//! clock steps). All plans of a run are drawn before the cluster starts and printed first, so a
//! run is described completely by its seed and its command line.

use std::time::Duration;

use rand::{Rng, SeedableRng};
use serde::Serialize;

/// Every scenario, in the order `--scenario all` runs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    KillLeader,
    KillFollower,
    KillWorker,
    KillMajority,
    StopLeader,
    StopWorker,
    StallLoop,
    StallFsync,
    PartitionLeader,
    PartitionWorkers,
    OneWayLoss,
    InboundCut,
    Latency,
    RollingRestart,
    Membership,
    ClockStep,
}

/// What `chaos --help` prints about the scenarios (a test checks it names every one).
pub const HELP: &str = "\
Scenarios (--scenario NAME[,NAME...] or all):
  kill-leader        SIGKILL the leader, restart it after the hold
  kill-follower      SIGKILL a follower, restart it after the hold
  kill-worker        SIGKILL a worker (its attempts die with it), start a new one
  kill-majority      SIGKILL a majority of the replicas, restart them after the hold
  stop-leader        SIGSTOP the leader (hung but alive), SIGCONT after the hold
  stop-worker        SIGSTOP a worker and its attempts (a paused machine) past the visibility timeout
  stall-loop         stall the leader's scheduling loop (fleet fault stall --component scheduler)
  stall-fsync        stall one replica's fsyncs (fleet fault stall --component storage)
  partition-leader   cut the leader off from the other replicas and the workers
  partition-workers  cut every worker off from every replica past the visibility timeout
  one-way-loss       drop everything the leader sends (it still hears the others)
  inbound-cut        cut every connection to the leader's port; the ones it opens still work
  latency            add latency to every replica and worker link
  rolling-restart    SIGTERM and restart each replica in turn, the leader last, while work flows
  membership         add a replica (fleet join), then remove a follower (leave)
  clock-step         step one replica's wall clock (fleet fault clock) by up to two minutes

The set `schedules` (--scenario schedules) runs kill-leader, kill-majority, stop-leader,
partition-leader, rolling-restart and clock-step with schedules and a pool in the workload
(--schedules adds them to any other list); it checks that every tick ran exactly once and no
pool held more leases than slots.

Faults between processes go through the harness's TCP proxy (one in front of every replica).
Every parameter comes from --seed; a failure prints the command that reruns it.";

impl Scenario {
    pub const ALL: [Scenario; 16] = [
        Scenario::KillLeader,
        Scenario::KillFollower,
        Scenario::KillWorker,
        Scenario::KillMajority,
        Scenario::StopLeader,
        Scenario::StopWorker,
        Scenario::StallLoop,
        Scenario::StallFsync,
        Scenario::PartitionLeader,
        Scenario::PartitionWorkers,
        Scenario::OneWayLoss,
        Scenario::InboundCut,
        Scenario::Latency,
        Scenario::RollingRestart,
        Scenario::Membership,
        Scenario::ClockStep,
    ];

    /// The faults `--scenario schedules` runs (with the schedule workload): the ones that move
    /// leadership, stop the whole cluster, or move the leader's clock.
    pub const SCHEDULES: [Scenario; 6] = [
        Scenario::KillLeader,
        Scenario::KillMajority,
        Scenario::StopLeader,
        Scenario::PartitionLeader,
        Scenario::RollingRestart,
        Scenario::ClockStep,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::KillLeader => "kill-leader",
            Scenario::KillFollower => "kill-follower",
            Scenario::KillWorker => "kill-worker",
            Scenario::KillMajority => "kill-majority",
            Scenario::StopLeader => "stop-leader",
            Scenario::StopWorker => "stop-worker",
            Scenario::StallLoop => "stall-loop",
            Scenario::StallFsync => "stall-fsync",
            Scenario::PartitionLeader => "partition-leader",
            Scenario::PartitionWorkers => "partition-workers",
            Scenario::OneWayLoss => "one-way-loss",
            Scenario::InboundCut => "inbound-cut",
            Scenario::Latency => "latency",
            Scenario::RollingRestart => "rolling-restart",
            Scenario::Membership => "membership",
            Scenario::ClockStep => "clock-step",
        }
    }

    /// Parses `all` or a comma-separated list of names.
    pub fn parse_list(s: &str) -> Result<Vec<Scenario>, String> {
        if s == "all" {
            return Ok(Scenario::ALL.to_vec());
        }
        if s == "schedules" {
            return Ok(Scenario::SCHEDULES.to_vec());
        }
        let mut out = Vec::new();
        for name in s.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            match Scenario::ALL.iter().find(|sc| sc.name() == name) {
                Some(sc) => out.push(*sc),
                None => {
                    return Err(format!(
                        "unknown scenario {name:?}: use all or one of {}",
                        Scenario::ALL.map(|s| s.name()).join(", ")
                    ))
                }
            }
        }
        if out.is_empty() {
            return Err("no scenario given: use all or a comma-separated list of names".into());
        }
        Ok(out)
    }

    /// The shortest hold that makes the scenario mean something: a fault meant to expire
    /// leases must outlast the visibility timeout and the worker liveness timeout.
    fn min_hold(self, lease_expiry: Duration) -> Duration {
        match self {
            Scenario::StopWorker | Scenario::PartitionWorkers => {
                lease_expiry + Duration::from_secs(1)
            }
            // Detection needs the stall threshold (3 s) first.
            Scenario::StallLoop | Scenario::StallFsync => Duration::from_secs(5),
            // Three missed peer polls (3 s) before the replicas say the leader is unreachable,
            // then the handover: long enough to see it happen while the cut holds.
            Scenario::InboundCut => Duration::from_secs(8),
            _ => Duration::from_secs(1),
        }
    }
}

/// One scenario with its seeded parameters.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub scenario: Scenario,
    /// How long the fault lasts before it is healed.
    pub hold_ms: u64,
    /// Picks the target among the candidates when the fault strikes (replica ids or workers,
    /// in id order): `pick % candidates.len()`.
    pub pick: u64,
    /// Added one-way latency (latency).
    pub latency_ms: u64,
    /// The clock step (clock-step), either way.
    pub clock_offset_ms: i64,
}

impl Plan {
    pub fn describe(&self) -> String {
        let mut s = format!(
            "{} hold={}ms pick={}",
            self.scenario.name(),
            self.hold_ms,
            self.pick
        );
        match self.scenario {
            Scenario::Latency => s.push_str(&format!(" latency={}ms", self.latency_ms)),
            Scenario::ClockStep => s.push_str(&format!(" offset={}ms", self.clock_offset_ms)),
            _ => {}
        }
        s
    }
}

/// Draws plans from the seed: first one per listed scenario, then (for a soak) random
/// scenarios of the list, for as long as the caller asks.
pub struct Planner {
    rng: rand::rngs::StdRng,
    scenarios: Vec<Scenario>,
    hold: Duration,
    lease_expiry: Duration,
    next: usize,
    /// A fixed one-way latency for the latency scenario (else drawn).
    latency_ms: Option<u64>,
}

impl Planner {
    pub fn new(
        seed: u64,
        scenarios: Vec<Scenario>,
        hold: Duration,
        lease_expiry: Duration,
    ) -> Self {
        Planner {
            rng: rand::rngs::StdRng::seed_from_u64(seed),
            scenarios,
            hold,
            lease_expiry,
            next: 0,
            latency_ms: None,
        }
    }

    /// Fixes the latency scenario's one-way latency (the draw still happens, so every other
    /// parameter of the seed stays the same).
    pub fn with_latency(mut self, latency_ms: Option<u64>) -> Self {
        self.latency_ms = latency_ms;
        self
    }

    pub fn next_plan(&mut self) -> Plan {
        let scenario = if self.next < self.scenarios.len() {
            self.scenarios[self.next]
        } else {
            self.scenarios[self.rng.random_range(0..self.scenarios.len())]
        };
        self.next += 1;
        let base = self.hold.max(scenario.min_hold(self.lease_expiry));
        let hold_ms = base.as_millis() as u64 * self.rng.random_range(100..=150u64) / 100;
        let offset = self.rng.random_range(30_000..=120_000i64);
        Plan {
            scenario,
            hold_ms,
            pick: self.rng.random(),
            latency_ms: {
                let drawn = self.rng.random_range(20..=150);
                self.latency_ms.unwrap_or(drawn)
            },
            clock_offset_ms: if self.rng.random() { offset } else { -offset },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn help_names_every_scenario_and_names_parse() {
        for s in Scenario::ALL {
            assert!(HELP.contains(&format!("  {} ", s.name())), "{}", s.name());
            assert_eq!(Scenario::parse_list(s.name()).unwrap(), vec![s]);
        }
        assert_eq!(
            Scenario::parse_list("all").unwrap().len(),
            Scenario::ALL.len()
        );
        let e = Scenario::parse_list("kill-leader,nope").unwrap_err();
        assert!(e.contains("\"nope\"") && e.contains("kill-follower"), "{e}");
    }

    #[test]
    fn the_same_seed_gives_the_same_plans() {
        let draw = |seed| {
            let mut p = Planner::new(
                seed,
                Scenario::ALL.to_vec(),
                Duration::from_secs(3),
                Duration::from_secs(4),
            );
            (0..40)
                .map(|_| p.next_plan().describe())
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        // The first round runs every listed scenario once, in order.
        let first = draw(7);
        for (i, s) in Scenario::ALL.iter().enumerate() {
            assert!(first[i].starts_with(s.name()), "{}", first[i]);
        }
    }
}
