//! Health: how a process reports that it makes progress.
//!
//! Built so far: [`systemd`], the `Type=notify` integration (READY, STATUS, and WATCHDOG pings
//! sent only while the watched loop makes progress). The progress watermarks it reads are the
//! scheduling loop's iteration counter (`Scheduler::progress`) on replicas and the heartbeat
//! loop's on workers. Next (issue 4): stall detection and mitigation, `/health`, `fleet health`.

pub mod systemd;
