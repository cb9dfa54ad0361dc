//! `chaos`: fleet's chaos-test harness.
//!
//! It starts a real fleet (the built `fleet` binary as separate processes: replicas behind a
//! fault-injecting proxy each, workers, each with its own data directory), runs a workload
//! whose tasks record every execution, injects faults drawn from one seed, and judges the
//! recorded history against fleet's invariants. Modelled on TigerBeetle's VOPR and Jepsen: a
//! safety phase under faults, a liveness phase after healing that requires convergence, and
//! every failure printed with the command that reruns it.
//!
//! Read [`run`] first (the flow of a run), then [`checker`] (the invariants). [`proxy`] is the
//! network fault injector, [`cluster`] the processes, [`record`] the task command, [`history`]
//! what is observed, [`report`] the figures, the JSON report and the plot.
//!
//! Caveats: the seed fixes which faults strike, where, for how long, and the workload; it
//! cannot fix the operating system's scheduling of real processes, so a rerun reproduces the
//! run's faults, not every interleaving. Partitions are emulated by the proxy holding bytes, not
//! by dropping packets (see `proxy`); with root, network namespaces would add real packet loss
//! (not built yet).

mod checker;
mod cluster;
mod history;
mod ports;
mod proxy;
mod record;
mod report;
mod run;
mod scenario;
mod sim;
mod workflows;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "chaos",
    version,
    about = "Chaos tests for fleet: real processes, seeded faults, checked invariants",
    after_help = scenario::HELP
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Start a fleet, run scenarios under a workload, check the invariants. Exit 0 when every
    /// invariant held and the fleet converged after every fault, 1 otherwise, 2 on bad usage.
    #[command(after_help = scenario::HELP)]
    Run(run::RunArgs),
    /// The whole cluster in one process on simulated time, network, disks and clocks, driven
    /// by one seed: thousands of fault schedules per run, each replayable bit for bit. Exit 0
    /// when every seed passed, 1 otherwise.
    Sim(sim::SimArgs),
    /// List the scenarios.
    List,
    /// Judge a saved history (history.json of an earlier run) again.
    Check {
        #[arg(long)]
        history: PathBuf,
    },
    /// Median and worst recovery figures per scenario over several runs' report.json files.
    Summarize {
        /// report.json files (or run output folders).
        #[arg(required = true)]
        reports: Vec<PathBuf>,
    },
    /// The workload's task command (run by fleet workers, not by hand).
    #[command(hide = true)]
    Record(record::RecordArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Record(args) => record::run(args),
        Cmd::Sim(args) => sim::main(args),
        Cmd::List => {
            println!("{}", scenario::HELP);
            ExitCode::SUCCESS
        }
        Cmd::Check { history } => check(&history),
        Cmd::Summarize { reports } => match report::summarize(&reports) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("chaos: {e}");
                ExitCode::from(2)
            }
        },
        Cmd::Run(args) => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            match rt.block_on(run::run(args)) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::from(1),
                Err(e) => {
                    eprintln!("chaos: {e:#}");
                    ExitCode::from(2)
                }
            }
        }
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    let h: history::History = match std::fs::read(path)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(h) => h,
        Err(e) => {
            eprintln!("chaos: cannot read the history {}: {e}", path.display());
            return ExitCode::from(2);
        }
    };
    let violations = checker::check(&h);
    println!(
        "history of seed {}: {} submissions, {} execution events, {} tasks, {} leader observations",
        h.seed,
        h.submissions.len(),
        h.executions.len(),
        h.tasks.len(),
        h.leaders.len()
    );
    if violations.is_empty() {
        println!("invariants: OK");
        ExitCode::SUCCESS
    } else {
        for v in &violations {
            println!("  {v}");
        }
        println!("invariants: {} VIOLATED", violations.len());
        ExitCode::from(1)
    }
}
