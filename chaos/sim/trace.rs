//! The run's event trace: every message's fate, fault, execution and acknowledgement, with
//! its simulated time, folded into one hash. Two runs of one seed must give the same hash
//! (`chaos sim --seed N --twice` checks it); `--trace` also prints the events.

use std::hash::Hasher;
use std::sync::Mutex;

pub struct Trace {
    s: Mutex<(std::hash::DefaultHasher, u64)>,
    start: tokio::time::Instant,
    print: bool,
}

impl Trace {
    pub fn new(print: bool) -> Trace {
        Trace {
            // SipHash with fixed keys: the same events give the same hash in every process.
            s: Mutex::new((std::hash::DefaultHasher::new(), 0)),
            start: tokio::time::Instant::now(),
            print,
        }
    }

    /// Simulated ms since the run's start.
    pub fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    pub fn event(&self, what: std::fmt::Arguments<'_>) {
        let line = format!("{} {what}", self.now_ms());
        if self.print {
            println!("{line}");
        }
        let mut s = self.s.lock().expect("trace lock");
        s.0.write(line.as_bytes());
        s.1 += 1;
    }

    /// The hash of every event so far, and their number.
    pub fn hash(&self) -> (u64, u64) {
        let s = self.s.lock().expect("trace lock");
        (s.0.finish(), s.1)
    }
}
