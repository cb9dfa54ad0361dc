//! `fleet worker` (run a worker) and `fleet worker list`.

use clap::{Args, Subcommand};

use super::{connect, print_json, ClientArgs, Output};
use crate::config::{parse_peer_list, Config};
use crate::worker::WorkerOptions;

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct WorkerArgs {
    #[command(subcommand)]
    pub command: Option<WorkerCommand>,
    #[command(flatten)]
    pub run: WorkerRunArgs,
}

#[derive(Subcommand, Debug)]
pub enum WorkerCommand {
    /// Workers the leader knows: state (active, draining, lost), slots, leases, last heartbeat.
    List {
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Args, Debug)]
pub struct WorkerRunArgs {
    /// Replicas to contact (any subset), comma-separated host:port.
    #[arg(long, env = "FLEET_PEERS", value_name = "ADDRS")]
    pub peers: Option<String>,
    /// Queues to take tasks from, comma-separated. Default: [worker] queues, or `default`.
    #[arg(long, value_name = "Q1,Q2")]
    pub queues: Option<String>,
    /// Attempts to run at once. Default: [worker] concurrency (4).
    #[arg(long, value_name = "N")]
    pub concurrency: Option<u32>,
    /// A name shown in `fleet worker list` and given to tasks as FLEET_WORKER. Default:
    /// host:pid.
    #[arg(long)]
    pub name: Option<String>,
}

pub async fn worker(config: Config, args: WorkerArgs) -> anyhow::Result<()> {
    match args.command {
        Some(WorkerCommand::List { client }) => list(&config, &client).await,
        None => run(config, args.run).await,
    }
}

async fn run(mut config: Config, args: WorkerRunArgs) -> anyhow::Result<()> {
    let peers = match &args.peers {
        Some(p) => parse_peer_list("--peers", p)?,
        None => config.client.peers.clone(),
    };
    if let Some(q) = &args.queues {
        config.worker.queues = q
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect();
        if config.worker.queues.is_empty() {
            anyhow::bail!("--queues {q:?} names no queue; expected q1[,q2...]");
        }
    }
    if let Some(c) = args.concurrency {
        config.worker.concurrency = c;
    }
    config.validate().map_err(|e| {
        let e = e.to_string();
        if e.contains("worker.queues") || e.contains("worker.concurrency") {
            anyhow::anyhow!(
                "{e} (--queues and --concurrency set worker.queues and worker.concurrency)"
            )
        } else {
            anyhow::anyhow!(e)
        }
    })?;
    let name = args.name.unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".into());
        format!("{host}:{}", std::process::id())
    });
    if name.is_empty() || name.len() > 256 {
        anyhow::bail!("--name of {} bytes is not valid: use 1 to 256", name.len());
    }
    crate::worker::run(WorkerOptions {
        peers: if peers.is_empty() {
            anyhow::bail!(
                "no replica address given: use --peers host:port[,host:port...], set FLEET_PEERS, \
                 or set [client] peers in the config file"
            )
        } else {
            peers
        },
        cluster_name: config.node.cluster_name.clone(),
        auth_token: config.node.auth_token.clone(),
        name,
        persistent: config
            .queues
            .iter()
            .filter(|(q, _)| config.worker.queues.contains(q))
            .filter_map(|(q, d)| Some((q.clone(), d.persistent_command()?.to_vec())))
            .collect(),
        config: config.worker.clone(),
    })
    .await
}

async fn list(config: &Config, client: &ClientArgs) -> anyhow::Result<()> {
    let mut c = connect(config, client)?;
    let workers = c
        .call(|cl, ctx| async move { cl.list_workers(ctx, 0).await })
        .await?;
    if client.output == Output::Json {
        return print_json(&workers);
    }
    let now = crate::clock::system_wall_ms();
    // The name first: it is how `task show`, `logs` and the task's FLEET_WORKER name a worker.
    println!(
        "{:<24} {:<18} {:<9} {:>5} {:>7} {:>6} {:>10} QUEUES",
        "NAME", "ID", "STATE", "SLOTS", "RUNNING", "LEASES", "LAST SEEN"
    );
    for w in &workers {
        println!(
            "{:<24} {:<18} {:<9} {:>5} {:>7} {:>6} {:>9.1}s {}",
            w.info.name,
            w.info.id.0,
            w.state,
            w.info.slots,
            w.info.running,
            w.leases,
            now.saturating_sub(w.last_seen_ms) as f64 / 1000.0,
            w.info.queues.join(",")
        );
    }
    Ok(())
}
