//! The `fleet` binary: parse arguments, load the configuration, start logging, run the command,
//! report the error.

use clap::Parser;

fn main() {
    let cli = fleet::cli::Cli::parse();
    let config = match fleet::cli::load_config(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => fail(e),
    };
    // Replicas and workers log at info; client commands only at warn so their output stays clean.
    let default_level = match &cli.command {
        fleet::cli::Command::Join(_) => "info",
        fleet::cli::Command::Worker(w) if w.command.is_none() => "info",
        _ => "warn",
    };
    if let Err(e) = fleet::logging::init(&config.log, default_level) {
        fail(e);
    }

    // A client command whose stdout is closed (`fleet task show 1 | head -1`) ends quietly, as
    // Unix tools do: with SIGPIPE's default action, the first write to the closed pipe ends the
    // process, where Rust's ignored SIGPIPE would make `println!` panic. Sockets are unaffected
    // (the standard library sends with MSG_NOSIGNAL). Processes that run a fleet keep SIGPIPE
    // ignored: a replica, a worker or `fleet up` must not die because a reader went away
    // (`fleet up` writes its own output without panicking; see `cli::up`).
    if !cli.command.runs_a_fleet() {
        // SAFETY: resetting a signal disposition before any thread is started.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("start the tokio runtime");
    let result = runtime.block_on(fleet::cli::run(cli, config));
    if let Err(e) = result {
        // A check's status (fleet health) was printed already; only the code is left.
        if let Some(exit) = e.downcast_ref::<fleet::cli::health::Exit>() {
            std::process::exit(exit.0);
        }
        fail(e);
    }
}

fn fail(e: anyhow::Error) -> ! {
    eprintln!("error: {e:#}");
    std::process::exit(1);
}
