//! `chaos record`: the workload's task command. It records every execution to a log the
//! checker reads.
//!
//! A worker runs it as an attempt's command; it appends one JSON line when it starts (task,
//! attempt, fencing token and worker from the `FLEET_*` environment, its pid, the wall clock),
//! works for `--work-ms` in 10 ms steps, and appends a line when it ends: `end` with its exit
//! code, or `killed` when SIGTERM arrives (the worker's kill on fencing, cancel or timeout).
//! SIGKILL leaves no end line. Work is counted in steps, not read off the clock, so an attempt
//! frozen with SIGSTOP still has its remaining work to do when it is resumed, like a real
//! computation. Each line is one `write` on a file opened with `O_APPEND`, so lines of
//! concurrent executions never interleave.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::history::{ExecEvent, ExecKind};

#[derive(clap::Args, Debug)]
pub struct RecordArgs {
    /// The execution log to append to.
    #[arg(long)]
    pub log: PathBuf,
    /// The submission's key (the task's idempotency key).
    #[arg(long)]
    pub key: String,
    /// How long to work.
    #[arg(long)]
    pub work_ms: u64,
    /// Exit 1 on attempts up to this number (a flaky task).
    #[arg(long, default_value_t = 0)]
    pub fail_attempts: u32,
}

static TERMINATED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigterm(_: libc::c_int) {
    TERMINATED.store(true, Ordering::SeqCst);
}

fn env_u64(name: &str) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

pub fn run(args: RecordArgs) -> ExitCode {
    // SAFETY: installs a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGTERM, on_sigterm as *const () as libc::sighandler_t);
    }
    let mut log = match std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&args.log)
    {
        Ok(f) => f,
        Err(e) => {
            eprintln!("chaos record: cannot open {}: {e}", args.log.display());
            return ExitCode::from(2);
        }
    };
    let attempt = env_u64("FLEET_ATTEMPT") as u32;
    let mut event = ExecEvent {
        kind: ExecKind::Start,
        key: args.key.clone(),
        task: env_u64("FLEET_TASK_ID"),
        attempt,
        token: env_u64("FLEET_FENCING_TOKEN"),
        worker: std::env::var("FLEET_WORKER").unwrap_or_default(),
        pid: std::process::id(),
        t_ms: crate::history::wall_ms(),
        exit: None,
    };
    let mut write = |e: &ExecEvent| {
        let mut line = serde_json::to_vec(e).expect("serializable");
        line.push(b'\n');
        // One write per line: O_APPEND keeps concurrent writers' lines whole.
        let _ = log.write_all(&line);
    };
    write(&event);
    let steps = args.work_ms.div_ceil(10);
    for _ in 0..steps {
        if TERMINATED.load(Ordering::SeqCst) {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    event.t_ms = crate::history::wall_ms();
    if TERMINATED.load(Ordering::SeqCst) {
        event.kind = ExecKind::Killed;
        write(&event);
        return ExitCode::from(143);
    }
    let code = if attempt <= args.fail_attempts { 1 } else { 0 };
    event.kind = ExecKind::End;
    event.exit = Some(code);
    write(&event);
    ExitCode::from(code as u8)
}
