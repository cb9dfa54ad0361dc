//! The `fleet` binary: parse arguments, start logging, run the command, report the error.

use clap::Parser;

fn main() {
    let cli = fleet::cli::Cli::parse();
    // Replicas and workers log at info; client commands only at warn so their output stays clean.
    let default_level = match &cli.command {
        fleet::cli::Command::Join(_) => "info",
        fleet::cli::Command::Worker(w) if w.command.is_none() => "info",
        _ => "warn",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("start the tokio runtime");
    let result = runtime.block_on(fleet::cli::run(cli));
    if let Err(e) = result {
        // A check's status (fleet health) was printed already; only the code is left.
        if let Some(exit) = e.downcast_ref::<fleet::cli::health::Exit>() {
            std::process::exit(exit.0);
        }
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
