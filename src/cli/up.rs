//! `fleet up`: a whole local fleet in one command, for trying fleet out.
//!
//! Starts the replicas (one process each, own data directory, loopback ports) and the workers,
//! all as child processes in their own process groups (so Ctrl-C reaches only `fleet up`, which
//! then stops them in order: workers drain first, then replicas hand over and stop). Runs a
//! demo batch with a progress bar, then keeps running until Ctrl-C or SIGTERM. Run again, it
//! reuses the data directories.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::Args;

use super::submit::POLL_EVERY;
use crate::client::Client;
use crate::rpc::{NewTask, ReadMode, SubmitTask};
use crate::state::{RequestId, TaskFilter, TaskId, TaskState};

#[derive(Args, Debug)]
pub struct UpArgs {
    /// Number of replicas (1 gives a single-node fleet).
    #[arg(long, default_value_t = 3)]
    pub replicas: usize,
    /// Number of workers.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Port of the first replica; the others use the following ports. Their HTTP endpoints
    /// (/health) use the ports 100 above.
    #[arg(long, default_value_t = 7101)]
    pub base_port: u16,
    /// Where the replicas keep their data and every process its log.
    #[arg(long, default_value = "fleet-data")]
    pub data_dir: PathBuf,
    /// Tasks in the demo batch (0: no demo).
    #[arg(long, default_value_t = 20)]
    pub demo_tasks: usize,
}

struct Child {
    name: String,
    log: PathBuf,
    process: tokio::process::Child,
}

fn spawn(exe: &Path, name: &str, args: &[String], log: PathBuf) -> anyhow::Result<Child> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .with_context(|| format!("cannot open {}", log.display()))?;
    let process = tokio::process::Command::new(exe)
        .args(args)
        .stdout(file.try_clone()?)
        .stderr(file)
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {name}"))?;
    Ok(Child {
        name: name.into(),
        log,
        process,
    })
}

fn signal(c: &Child, sig: i32) {
    if let Some(pid) = c.process.id() {
        // SAFETY: sends a signal to our own child process.
        unsafe { libc::kill(pid as i32, sig) };
    }
}

/// `config` is what the children read too (the same file and `FLEET__*` environment): the
/// cluster name and auth token come from it.
pub async fn up(config: &crate::config::Config, args: UpArgs) -> anyhow::Result<()> {
    if !(1..=9).contains(&args.replicas) {
        bail!("--replicas {} is not valid: use 1 to 9", args.replicas);
    }
    if args.workers > 64 {
        bail!("--workers {} is not valid: use 0 to 64", args.workers);
    }
    if args.demo_tasks > 10_000 {
        bail!(
            "--demo-tasks {} is not valid: use 0 to 10000",
            args.demo_tasks
        );
    }
    if args.base_port as usize + HTTP_PORT_OFFSET + args.replicas > 65_535 {
        bail!(
            "--base-port {} leaves no room for {} replicas and their HTTP ports (100 above)",
            args.base_port,
            args.replicas
        );
    }
    let exe = std::env::current_exe()?;
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("cannot create {}", args.data_dir.display()))?;
    let dir = args.data_dir.canonicalize()?;
    let addrs: Vec<String> = (0..args.replicas)
        .map(|i| format!("127.0.0.1:{}", args.base_port as usize + i))
        .collect();
    let peers = addrs.join(",");
    let mut replicas = Vec::new();
    for (i, addr) in addrs.iter().enumerate() {
        let id = i + 1;
        let a: Vec<String> = vec![
            "join".into(),
            "--node-id".into(),
            id.to_string(),
            "--listen".into(),
            addr.clone(),
            "--http-listen".into(),
            http_addr(args.base_port, i),
            "--peers".into(),
            peers.clone(),
            "--bootstrap-expect".into(),
            args.replicas.to_string(),
            "--data-dir".into(),
            dir.join(format!("node-{id}")).display().to_string(),
        ];
        let c = spawn(
            &exe,
            &format!("replica {id}"),
            &a,
            dir.join(format!("node-{id}.log")),
        )?;
        println!(
            "replica {id}  {addr}  http://{}/health  data {}  log {}",
            http_addr(args.base_port, i),
            dir.join(format!("node-{id}")).display(),
            c.log.display()
        );
        replicas.push(c);
    }
    let mut client = Client::new(
        addrs.clone(),
        &config.node.cluster_name,
        Duration::from_secs(30),
    )?
    .with_auth_token(&config.node.auth_token);
    let started = Instant::now();
    // Wait for the election (bounded); the pause paces the status reads.
    let mut status = client
        .call(|c, ctx| async move { c.cluster_status(ctx, 0).await })
        .await;
    while matches!(&status, Ok(s) if s.leader_id.is_none())
        && started.elapsed() < Duration::from_secs(20)
    {
        // A replica that could not start (a port taken, a bad config) will never vote: say so
        // now instead of waiting for an election that cannot happen.
        if let Some(why) = first_exit(&mut replicas) {
            anyhow::bail!("{why}");
        }
        tokio::time::sleep(POLL_EVERY).await;
        status = client
            .call(|c, ctx| async move { c.cluster_status(ctx, 0).await })
            .await;
    }
    match status {
        Ok(s) if s.leader_id.is_some() => println!(
            "cluster ready in {:.1}s: leader is node {}",
            started.elapsed().as_secs_f64(),
            s.leader_id.unwrap_or(0)
        ),
        Ok(_) => println!("cluster started; the leader election is still under way"),
        Err(e) => println!("cluster did not answer yet: {e}"),
    }
    let mut workers = Vec::new();
    for i in 1..=args.workers {
        let a: Vec<String> = vec![
            "worker".into(),
            "--peers".into(),
            peers.clone(),
            "--name".into(),
            format!("worker-{i}"),
        ];
        let c = spawn(
            &exe,
            &format!("worker {i}"),
            &a,
            dir.join(format!("worker-{i}.log")),
        )?;
        println!("worker-{i}  log {}", c.log.display());
        workers.push(c);
    }

    let demo = async {
        if args.demo_tasks > 0 {
            if let Err(e) = run_demo(&mut client, args.demo_tasks).await {
                println!("\ndemo batch: {e:#}");
            }
        }
        println!();
        println!("try, in another terminal:");
        println!("  export FLEET_PEERS={peers}");
        println!("  fleet submit -- echo hello        # prints the task id");
        println!("  fleet task show ID; fleet logs ID");
        println!("  fleet task list; fleet queue stats; fleet worker list; fleet cluster status");
        println!("  fleet health; fleet health --cluster");
        println!(
            "  curl -s http://{}/metrics | grep ^fleet_   # Prometheus metrics (docs/metrics.md)",
            http_addr(args.base_port, 0)
        );
        println!();
        println!("Ctrl-C stops the fleet (data stays in {}).", dir.display());
        std::future::pending::<()>().await
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let exited = async {
        let all = replicas.iter_mut().chain(workers.iter_mut());
        let (r, i, _) =
            futures::future::select_all(all.map(|c| {
                Box::pin(async { (c.process.wait().await, c.name.clone(), c.log.clone()) })
            }))
            .await;
        let _ = i;
        r
    };
    let outcome = tokio::select! {
        _ = tokio::signal::ctrl_c() => Ok(()),
        _ = term.recv() => Ok(()),
        _ = demo => Ok(()),
        (r, name, log) = exited => Err(anyhow::anyhow!(
            "{name} exited ({}); see {}",
            r.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string()),
            log.display()
        )),
    };
    println!("\nstopping: workers drain, then replicas stop");
    for w in &workers {
        signal(w, libc::SIGTERM);
    }
    for w in &mut workers {
        if tokio::time::timeout(Duration::from_secs(10), w.process.wait())
            .await
            .is_err()
        {
            // A second SIGTERM stops the running attempts and hands their leases back.
            signal(w, libc::SIGTERM);
            let _ = tokio::time::timeout(Duration::from_secs(10), w.process.wait()).await;
        }
    }
    for r in &replicas {
        signal(r, libc::SIGTERM);
    }
    for r in &mut replicas {
        let _ = tokio::time::timeout(Duration::from_secs(10), r.process.wait()).await;
    }
    outcome
}

/// Submits `n` small real tasks and shows their progress until all are final.
async fn run_demo(client: &mut Client, n: usize) -> anyhow::Result<()> {
    let batch: Vec<SubmitTask> = (0..n)
        .map(|i| SubmitTask {
            request_id: RequestId(rand::random()),
            task: NewTask::command(vec![
                "sh".into(),
                "-c".into(),
                format!(
                    "sleep 0.{}; echo \"demo task $FLEET_TASK_ID (attempt $FLEET_ATTEMPT) ran on $FLEET_WORKER\"",
                    1 + i % 9
                ),
            ]),
        })
        .collect();
    let submitted = client
        .call(|c, ctx| {
            let b = batch.clone();
            async move { c.submit(ctx, b, 0).await }
        })
        .await?;
    let ids: Vec<TaskId> = submitted
        .into_iter()
        .map(|r| r.map(|s| s.id))
        .collect::<Result<_, _>>()?;
    let first = ids.iter().min().copied().unwrap_or(TaskId(1));
    println!(
        "\ndemo: submitted {} tasks ({} to {}); running them on the workers",
        ids.len(),
        first,
        ids.iter().max().copied().unwrap_or(first)
    );
    let started = Instant::now();
    loop {
        let filter = TaskFilter {
            after: Some(TaskId(first.0 - 1)),
            limit: ids.len(),
            ..Default::default()
        };
        let tasks = client
            .call(|c, ctx| {
                let f = filter.clone();
                async move { c.list_tasks(ctx, f, ReadMode::Linearizable, 0).await }
            })
            .await?
            .value;
        let count = |s: TaskState| tasks.iter().filter(|t| t.state == s).count();
        let done = tasks.iter().filter(|t| t.state.is_final()).count();
        let width = 30;
        let filled = done * width / ids.len().max(1);
        print!(
            "\r[{}{}] {done}/{} done: {} succeeded, {} running, {} queued, {} failed or dead  ",
            "#".repeat(filled),
            "-".repeat(width - filled),
            ids.len(),
            count(TaskState::Succeeded),
            count(TaskState::Running),
            count(TaskState::Queued),
            count(TaskState::Failed) + count(TaskState::Dead),
        );
        let _ = std::io::stdout().flush();
        if done >= ids.len() {
            println!(
                "\ndemo: all {} tasks finished in {:.1}s; see one with `fleet logs {}`",
                ids.len(),
                started.elapsed().as_secs_f64(),
                first
            );
            return Ok(());
        }
        // Pacing the progress display.
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// The first child that has exited, with its status and the last lines of its log.
fn first_exit(children: &mut [Child]) -> Option<String> {
    for c in children.iter_mut() {
        if let Ok(Some(status)) = c.process.try_wait() {
            let log = std::fs::read_to_string(&c.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(3).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            return Some(format!(
                "{} exited at start ({status}); the end of {}:\n{}",
                c.name,
                c.log.display(),
                tail.join("\n")
            ));
        }
    }
    None
}

/// The HTTP ports of `fleet up`'s replicas are this far above their RPC ports.
const HTTP_PORT_OFFSET: usize = 100;

fn http_addr(base_port: u16, i: usize) -> String {
    format!("127.0.0.1:{}", base_port as usize + HTTP_PORT_OFFSET + i)
}
