//! The async runtime openraft runs on: tokio, with election randomness that the simulator can
//! seed.
//!
//! openraft draws its election timeouts from `AsyncRuntime::thread_rng`; tokio's runtime hands
//! out the operating system's thread RNG, so two simulator runs of one seed would elect
//! differently. [`FleetRuntime`] is tokio in every other respect (tasks, timers, channels:
//! tokio's time, which the simulator pauses) and draws from a per-thread sequence that
//! [`seed_thread`] makes reproducible; unseeded (every production replica) it is seeded from
//! the OS at each draw. openraft's own `DeterministicRng` wrapper needs every Raft task to run
//! inside its task-local scope, which a replica started from `fleet join` is not.

use std::cell::Cell;
use std::future::Future;
use std::time::Duration;

use openraft::async_runtime::{AsyncRuntime, Select2, Select3, Select4};
use openraft::OptionalSend;
use openraft_rt_tokio::TokioRuntime;
use rand010::rngs::StdRng;
use rand010::SeedableRng;

thread_local! {
    /// The simulator's seed for this thread's election randomness (None: from the OS).
    static SEED: Cell<Option<u64>> = const { Cell::new(None) };
}

/// Makes this thread's election randomness a reproducible sequence from `seed` (the simulator
/// calls it before starting a run on the thread); `None` returns to the OS's randomness.
pub fn seed_thread(seed: Option<u64>) {
    SEED.with(|s| s.set(seed));
}

/// SplitMix64: the next seed of the thread's sequence.
fn next(seed: u64) -> u64 {
    let z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    let z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// tokio, with reproducible election randomness when the thread is seeded.
#[derive(Debug)]
pub struct FleetRuntime(TokioRuntime);

impl AsyncRuntime for FleetRuntime {
    type JoinError = <TokioRuntime as AsyncRuntime>::JoinError;
    type JoinHandle<T: OptionalSend + 'static> = <TokioRuntime as AsyncRuntime>::JoinHandle<T>;
    type Sleep = <TokioRuntime as AsyncRuntime>::Sleep;
    type Instant = <TokioRuntime as AsyncRuntime>::Instant;
    type TimeoutError = <TokioRuntime as AsyncRuntime>::TimeoutError;
    type Timeout<R, T: Future<Output = R> + OptionalSend> =
        <TokioRuntime as AsyncRuntime>::Timeout<R, T>;
    type ThreadLocalRng = StdRng;
    type Mpsc = <TokioRuntime as AsyncRuntime>::Mpsc;
    type Watch = <TokioRuntime as AsyncRuntime>::Watch;
    type Oneshot = <TokioRuntime as AsyncRuntime>::Oneshot;
    type Mutex<T: OptionalSend + 'static> = <TokioRuntime as AsyncRuntime>::Mutex<T>;

    fn spawn<T>(future: T) -> Self::JoinHandle<T::Output>
    where
        T: Future + OptionalSend + 'static,
        T::Output: OptionalSend + 'static,
    {
        TokioRuntime::spawn(future)
    }

    fn sleep(duration: Duration) -> Self::Sleep {
        TokioRuntime::sleep(duration)
    }

    fn sleep_until(deadline: Self::Instant) -> Self::Sleep {
        TokioRuntime::sleep_until(deadline)
    }

    fn timeout<R, F: Future<Output = R> + OptionalSend>(
        duration: Duration,
        future: F,
    ) -> Self::Timeout<R, F> {
        TokioRuntime::timeout(duration, future)
    }

    fn timeout_at<R, F: Future<Output = R> + OptionalSend>(
        deadline: Self::Instant,
        future: F,
    ) -> Self::Timeout<R, F> {
        TokioRuntime::timeout_at(deadline, future)
    }

    fn select2<A, B>(
        a: A,
        b: B,
    ) -> impl Future<Output = Select2<A::Output, B::Output>> + OptionalSend
    where
        A: Future + OptionalSend,
        B: Future + OptionalSend,
    {
        TokioRuntime::select2(a, b)
    }

    fn select3<A, B, C>(
        a: A,
        b: B,
        c: C,
    ) -> impl Future<Output = Select3<A::Output, B::Output, C::Output>> + OptionalSend
    where
        A: Future + OptionalSend,
        B: Future + OptionalSend,
        C: Future + OptionalSend,
    {
        TokioRuntime::select3(a, b, c)
    }

    fn select4<A, B, C, D>(
        a: A,
        b: B,
        c: C,
        d: D,
    ) -> impl Future<Output = Select4<A::Output, B::Output, C::Output, D::Output>> + OptionalSend
    where
        A: Future + OptionalSend,
        B: Future + OptionalSend,
        C: Future + OptionalSend,
        D: Future + OptionalSend,
    {
        TokioRuntime::select4(a, b, c, d)
    }

    fn is_panic(join_error: &Self::JoinError) -> bool {
        TokioRuntime::is_panic(join_error)
    }

    fn thread_rng() -> Self::ThreadLocalRng {
        match SEED.with(|s| {
            let seed = s.get()?;
            s.set(Some(next(seed)));
            Some(seed)
        }) {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_rng(&mut rand010::rng()),
        }
    }

    fn new(threads: usize) -> Self {
        FleetRuntime(TokioRuntime::new(threads))
    }

    fn block_on<F, T>(&mut self, future: F) -> T
    where
        F: Future<Output = T>,
    {
        self.0.block_on(future)
    }
}
