//! Randomness as an input: one [`Random`] per replica, passed to whatever draws random values
//! (retry jitter, a new node's id, schedule jitter). Production seeds it from the operating
//! system; the simulator seeds it from its seed, so a run can be replayed bit for bit.

use std::sync::{Arc, Mutex};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A shared random source (cheap to clone; clones draw from one sequence).
#[derive(Debug, Clone)]
pub struct Random(Arc<Mutex<StdRng>>);

impl Random {
    /// Seeded from the operating system.
    pub fn from_os() -> Random {
        Random(Arc::new(Mutex::new(StdRng::from_os_rng())))
    }

    /// A reproducible sequence.
    pub fn seeded(seed: u64) -> Random {
        Random(Arc::new(Mutex::new(StdRng::seed_from_u64(seed))))
    }

    /// Runs `f` with the generator (never across an await).
    pub fn with<T>(&self, f: impl FnOnce(&mut StdRng) -> T) -> T {
        f(&mut self.0.lock().expect("rng lock"))
    }

    /// A value in `range`.
    pub fn range<T, R>(&self, range: R) -> T
    where
        T: rand::distr::uniform::SampleUniform,
        R: rand::distr::uniform::SampleRange<T>,
    {
        self.with(|r| r.random_range(range))
    }
}
