//! Pools: named, cluster-wide concurrency limits (Airflow's pools), in the replicated state.
//!
//! A task may claim `slots` of one pool. A lease for it is granted only while the pool's leased
//! slots plus the claim fit in the pool's size; the slots are held from the grant until the
//! attempt ends (completion or expiry), and a cancelled task holds them until its attempt has
//! really ended. The state machine re-checks every grant against the pool, so no leader, old
//! or new, can put more slots in use than the pool has.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{CommandError, CommandOutput, State, TaskId, TaskState};

/// Most slots a pool may have.
pub const MAX_POOL_SLOTS: u32 = 1_000_000;
/// Most pools a cluster may have.
pub const MAX_POOLS: usize = 10_000;

/// A task's claim on a pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolClaim {
    pub pool: String,
    /// Slots one attempt of the task holds (1 unless said otherwise).
    pub slots: u32,
}

/// One pool.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pool {
    pub slots: u32,
    /// Slots held by leased attempts now.
    pub used: u32,
}

/// One pool as `fleet pool list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolView {
    pub name: String,
    pub slots: u32,
    pub used: u32,
    /// Tasks of the pool waiting for a lease (queued or waiting for a retry).
    pub queued: u64,
    /// Tasks of the pool holding a lease.
    pub running: u64,
}

/// The pools and which task claims what (part of [`State`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pools {
    pools: BTreeMap<String, Pool>,
    claims: BTreeMap<TaskId, PoolClaim>,
}

impl Pools {
    /// How many pools there are.
    pub fn len(&self) -> usize {
        self.pools.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pools.is_empty()
    }

    pub fn get(&self, name: &str) -> Option<&Pool> {
        self.pools.get(name)
    }

    pub fn claim(&self, task: TaskId) -> Option<&PoolClaim> {
        self.claims.get(&task)
    }

    /// A pool whose use count is `used`, whatever its tasks hold (to prove the invariant
    /// check catches a wrong count).
    #[cfg(test)]
    pub(super) fn set_used_for_test(&mut self, name: &str, used: u32) {
        self.pools.insert(name.into(), Pool { slots: 4, used });
    }

    /// Every pool's size and use.
    pub fn sizes(&self) -> impl Iterator<Item = (&String, &Pool)> {
        self.pools.iter()
    }

    /// Whether `task`'s claim (if any) fits in its pool with `used` slots already held.
    pub fn fits(&self, task: TaskId, used: impl Fn(&str) -> u32) -> bool {
        match self.claims.get(&task) {
            None => true,
            Some(c) => self
                .pools
                .get(&c.pool)
                .is_some_and(|p| used(&c.pool).saturating_add(c.slots) <= p.slots),
        }
    }
}

/// A pool name is 1 to 64 characters of `A-Z a-z 0-9 _ - .` (like a queue name).
pub fn validate_pool_name(name: &str) -> Result<(), CommandError> {
    super::validate_queue_name(name).map_err(|_| {
        CommandError::Invalid(format!(
            "pool name {name:?} is not valid: use 1 to {} characters of letters, digits, '_', \
             '-' and '.'",
            super::MAX_QUEUE_NAME_LEN
        ))
    })
}

/// Checks a pool size.
pub fn validate_pool_slots(slots: u32) -> Result<(), CommandError> {
    if (1..=MAX_POOL_SLOTS).contains(&slots) {
        Ok(())
    } else {
        Err(CommandError::Invalid(format!(
            "{slots} slots is not a valid pool size: use 1 to {MAX_POOL_SLOTS}"
        )))
    }
}

impl State {
    pub fn pools(&self) -> &Pools {
        &self.pools
    }

    /// Creates a pool or resizes it. A pool made smaller than its use grants nothing more
    /// until enough attempts end.
    pub(super) fn set_pool(
        &mut self,
        name: &str,
        slots: u32,
    ) -> Result<CommandOutput, CommandError> {
        validate_pool_name(name)?;
        validate_pool_slots(slots)?;
        if !self.pools.pools.contains_key(name) && self.pools.pools.len() >= MAX_POOLS {
            return Err(CommandError::Invalid(format!(
                "the cluster has {MAX_POOLS} pools already; delete one first"
            )));
        }
        self.pools.pools.entry(name.to_string()).or_default().slots = slots;
        Ok(CommandOutput::PoolSet {
            name: name.to_string(),
            slots,
        })
    }

    /// Deletes a pool that no unfinished task and no schedule uses.
    pub(super) fn delete_pool(&mut self, name: &str) -> Result<CommandOutput, CommandError> {
        if !self.pools.pools.contains_key(name) {
            return Err(self.unknown_pool(name));
        }
        let waiting = self
            .pools
            .claims
            .iter()
            .filter(|(id, c)| {
                c.pool == name
                    && self
                        .tasks
                        .get(id)
                        .is_some_and(|t| !t.state.is_final() || t.lease.is_some())
            })
            .count();
        if waiting > 0 {
            return Err(CommandError::Invalid(format!(
                "pool {name:?} is used by {waiting} unfinished tasks; cancel them or wait until \
                 they end"
            )));
        }
        if let Some(s) = self.schedules.using_pool(name) {
            return Err(CommandError::Invalid(format!(
                "pool {name:?} is used by schedule {s:?}; update or delete the schedule first"
            )));
        }
        if let Some(user) = self.workflows.using_pool(name) {
            return Err(CommandError::Invalid(format!(
                "pool {name:?} is used by {user}; change the workflow or wait for the run first"
            )));
        }
        self.pools.pools.remove(name);
        Ok(CommandOutput::PoolDeleted {
            name: name.to_string(),
        })
    }

    pub(super) fn unknown_pool(&self, name: &str) -> CommandError {
        let known: Vec<&str> = self.pools.pools.keys().map(|s| s.as_str()).collect();
        CommandError::Invalid(format!(
            "unknown pool {name:?}; {} (create one with `fleet pool set {name} --slots N`)",
            if known.is_empty() {
                "the cluster has no pools".to_string()
            } else {
                format!("pools: {}", known.join(", "))
            }
        ))
    }

    /// Checks a claim against the pools as they are now.
    pub(super) fn check_claim(&self, claim: &PoolClaim) -> Result<(), CommandError> {
        let pool = self
            .pools
            .pools
            .get(&claim.pool)
            .ok_or_else(|| self.unknown_pool(&claim.pool))?;
        if claim.slots == 0 || claim.slots > pool.slots {
            return Err(CommandError::Invalid(format!(
                "a task cannot hold {} slots of pool {:?}: use 1 to its {} slots",
                claim.slots, claim.pool, pool.slots
            )));
        }
        Ok(())
    }

    pub(super) fn add_claim(&mut self, task: TaskId, claim: PoolClaim) {
        self.pools.claims.insert(task, claim);
    }

    /// Whether a lease for `task` may be granted now (its pool has room).
    pub(super) fn pool_admits(&self, task: TaskId) -> bool {
        self.pools
            .fits(task, |p| self.pools.pools.get(p).map_or(0, |p| p.used))
    }

    /// A lease for `task` was granted: its claim's slots are held.
    pub(super) fn hold_slots(&mut self, task: TaskId) {
        if let Some(c) = self.pools.claims.get(&task) {
            if let Some(p) = self.pools.pools.get_mut(&c.pool) {
                p.used += c.slots;
            }
        }
    }

    /// `task`'s lease ended: its claim's slots are free again.
    pub(super) fn release_slots(&mut self, task: TaskId) {
        if let Some(c) = self.pools.claims.get(&task) {
            if let Some(p) = self.pools.pools.get_mut(&c.pool) {
                p.used = p.used.saturating_sub(c.slots);
            }
        }
    }

    pub(super) fn forget_claim(&mut self, task: TaskId) {
        self.pools.claims.remove(&task);
    }

    /// Every pool with its use and how many of its tasks wait or run.
    pub fn pool_views(&self) -> Vec<PoolView> {
        let mut views: BTreeMap<&str, PoolView> = self
            .pools
            .pools
            .iter()
            .map(|(n, p)| {
                (
                    n.as_str(),
                    PoolView {
                        name: n.clone(),
                        slots: p.slots,
                        used: p.used,
                        queued: 0,
                        running: 0,
                    },
                )
            })
            .collect();
        for (id, c) in &self.pools.claims {
            let (Some(v), Some(t)) = (views.get_mut(c.pool.as_str()), self.tasks.get(id)) else {
                continue;
            };
            match t.state {
                TaskState::Queued | TaskState::Failed => v.queued += 1,
                TaskState::Running => v.running += 1,
                _ => {}
            }
        }
        views.into_values().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::testing::Applier;
    use crate::state::{Command, RequestId, TaskSpec, WorkerId};
    use rand::{Rng, SeedableRng};

    fn pooled(rid: u128, pool: &str, slots: u32) -> Command {
        Command::SubmitPooled {
            request_id: RequestId(rid),
            spec: TaskSpec::new(vec!["true".into()], "default"),
            pool: PoolClaim {
                pool: pool.into(),
                slots,
            },
        }
    }

    #[test]
    fn unknown_pools_and_bad_sizes_are_named() {
        let mut sm = Applier::default();
        let e = sm.one(1, pooled(1, "gpu", 1)).unwrap_err().to_string();
        assert!(
            e.contains("unknown pool \"gpu\"") && e.contains("fleet pool set gpu"),
            "{e}"
        );
        let e = sm
            .one(
                1,
                Command::SetPool {
                    name: "gpu".into(),
                    slots: 0,
                },
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("0 slots") && e.contains("use 1 to"), "{e}");
        sm.one(
            1,
            Command::SetPool {
                name: "gpu".into(),
                slots: 2,
            },
        )
        .unwrap();
        let e = sm.one(1, pooled(2, "gpu", 3)).unwrap_err().to_string();
        assert!(e.contains("3 slots of pool \"gpu\""), "{e}");
        sm.one(1, pooled(3, "gpu", 2)).unwrap();
        let e = sm
            .one(1, Command::DeletePool { name: "gpu".into() })
            .unwrap_err()
            .to_string();
        assert!(e.contains("used by 1 unfinished tasks"), "{e}");
    }

    /// Random grants (by up to two leaders deciding from stale states), completions, expiries
    /// and resizes: the state never holds more slots than a pool has, and `used` always equals
    /// the slots of the leased claims. Rerun a seed with `FLEET_TEST_SEED=N`.
    #[test]
    fn pool_use_never_exceeds_its_slots() {
        let seed: u64 = std::env::var("FLEET_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(rand::random);
        eprintln!("pool_use_never_exceeds_its_slots: seed {seed} (FLEET_TEST_SEED={seed})");
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut sm = Applier::default();
        sm.one(
            0,
            Command::SetPool {
                name: "p".into(),
                slots: 3,
            },
        )
        .unwrap();
        for rid in 0..60u128 {
            sm.one(0, pooled(rid, "p", rng.random_range(1..=2)))
                .unwrap();
        }
        let mut now = 1;
        for _ in 0..2_000 {
            now += 1;
            let before = sm.state.pools().get("p").unwrap().used;
            match rng.random_range(0..10) {
                0..=3 => {
                    // A leader (or a deposed one, from an older copy) proposes grants.
                    let stale = sm.state.clone();
                    let picks = stale.pick_ready(&["default".into()], rng.random_range(1..5), now);
                    let w = WorkerId(rng.random_range(1..4));
                    sm.one(
                        now,
                        Command::GrantLeases {
                            worker: w,
                            tasks: picks.clone(),
                        },
                    )
                    .unwrap();
                    if rng.random_bool(0.3) {
                        // The same decision again, as a second leader would.
                        sm.one(
                            now,
                            Command::GrantLeases {
                                worker: w,
                                tasks: picks,
                            },
                        )
                        .unwrap();
                    }
                }
                4..=7 => {
                    let leased: Vec<(TaskId, u64)> = sm
                        .state
                        .leases()
                        .map(|(t, l)| (t.id, l.fencing_token))
                        .collect();
                    if let Some(&(task, token)) =
                        leased.get(rng.random_range(0..leased.len().max(1)))
                    {
                        let c = if rng.random_bool(0.7) {
                            crate::state::testing::random_report(&mut rng, task, token)
                        } else {
                            Command::expire(task, token, "test".into(), 0)
                        };
                        let _ = sm.one(now, c);
                    }
                }
                8 => {
                    let slots = rng.random_range(1..=4);
                    sm.one(
                        now,
                        Command::SetPool {
                            name: "p".into(),
                            slots,
                        },
                    )
                    .unwrap();
                }
                _ => {
                    now += 2_000; // retries become ready
                }
            }
            let held: u32 = sm
                .state
                .leases()
                .filter_map(|(t, _)| sm.state.pools().claim(t.id).map(|c| c.slots))
                .sum();
            let pool = sm.state.pools().get("p").unwrap();
            assert_eq!(pool.used, held, "seed {seed}");
            // Use grows only by grants that fit (a resize below the use grants nothing more).
            if pool.used > before {
                assert!(
                    pool.used <= pool.slots,
                    "seed {seed}: {} of {}",
                    pool.used,
                    pool.slots
                );
            }
        }
    }

    #[test]
    fn a_grant_over_the_pool_is_refused_when_applied() {
        let mut sm = Applier::default();
        sm.one(
            0,
            Command::SetPool {
                name: "p".into(),
                slots: 1,
            },
        )
        .unwrap();
        sm.one(0, pooled(1, "p", 1)).unwrap();
        sm.one(0, pooled(2, "p", 1)).unwrap();
        // A leader that ignored the pool proposes both.
        let out = sm
            .one(
                1,
                Command::GrantLeases {
                    worker: WorkerId(1),
                    tasks: vec![TaskId(1), TaskId(2)],
                },
            )
            .unwrap();
        let CommandOutput::LeasesGranted { grants } = out else {
            panic!()
        };
        assert_eq!(grants.len(), 1);
        assert_eq!(sm.state.pools().get("p").unwrap().used, 1);
        assert!(
            sm.state.pick_ready(&["default".into()], 10, 1).is_empty(),
            "the pool is full"
        );
        let views = sm.state.pool_views();
        assert_eq!(
            (views[0].used, views[0].queued, views[0].running),
            (1, 1, 1)
        );
    }
}
