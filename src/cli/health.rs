//! `fleet health` (a liveness probe or monitoring check) and `fleet fault` (test-only stalls).
//!
//! `fleet health` exit codes: 0 healthy, 1 unhealthy (or the cluster degraded), 2 unreachable.

use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use serde::Serialize;

use super::{client_peers, print_json, ClientArgs, Output};
use crate::client::Client;
use crate::config::Config;
use crate::health::fault::{Component, FaultRequest, FaultState};
use crate::health::report::{ClusterHealth, HealthReport};

/// A command's exit status, for commands whose result is the status (health checks).
#[derive(Debug)]
pub struct Exit(pub i32);

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit status {}", self.0)
    }
}

impl std::error::Error for Exit {}

pub const EXIT_UNHEALTHY: i32 = 1;
pub const EXIT_UNREACHABLE: i32 = 2;
/// How long a health check waits for a replica by default.
const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Args, Debug)]
pub struct HealthArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Judge the whole cluster (as the first reachable replica sees it) instead of each listed
    /// replica: healthy only with a healthy, scheduling leader, a healthy quorum and every member
    /// healthy.
    #[arg(long)]
    pub cluster: bool,
}

#[derive(Subcommand, Debug)]
pub enum FaultCommand {
    /// Stall a component of the replica at --peers (one address) for a while.
    Stall {
        #[command(flatten)]
        client: ClientArgs,
        /// What to stall.
        #[arg(long, value_enum)]
        component: ComponentArg,
        /// For how long (e.g. 10s, 2m; at most 1h).
        #[arg(long = "for", value_name = "DURATION", value_parser = super::submit::parse_duration_ms)]
        duration: u64,
    },
    /// Step the wall clock of the replica at --peers by an offset from the real clock.
    Clock {
        #[command(flatten)]
        client: ClientArgs,
        /// Milliseconds to add to every clock reading (negative: back; 0: restore).
        #[arg(long, allow_hyphen_values = true)]
        offset_ms: i64,
    },
    /// End every stall on the replica at --peers and restore its clock.
    Clear {
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(ValueEnum, Debug, Clone, Copy)]
pub enum ComponentArg {
    /// The scheduling loop.
    Scheduler,
    /// The fsync thread (every Raft write on the replica waits).
    Storage,
}

fn health_timeout(args: &ClientArgs) -> anyhow::Result<Duration> {
    match args.retry_for {
        Some(0) => anyhow::bail!("--retry-for 0s is not valid: use at least 1ms"),
        Some(ms) => Ok(Duration::from_millis(ms)),
        None => Ok(DEFAULT_HEALTH_TIMEOUT),
    }
}

/// Asks one replica for its report, within `timeout` (dial and handshake included).
async fn ask(
    config: &Config,
    addr: &str,
    cluster: bool,
    timeout: Duration,
) -> Result<HealthReport, String> {
    let client = Client::new(vec![addr.to_string()], &config.node.cluster_name, timeout)
        .map_err(|e| e.to_string())?
        .with_auth_token(&config.node.auth_token);
    let mut client = client.with_attempt_timeout(timeout);
    let call = client.call(|c, ctx| async move {
        c.health(ctx, cluster)
            .await
            .map(Ok::<_, crate::error::Error>)
    });
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(e)) => Err(format!("{e:#}")),
        Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
    }
}

#[derive(Serialize)]
struct ReplicaCheck {
    addr: String,
    reachable: bool,
    error: Option<String>,
    report: Option<HealthReport>,
}

#[derive(Serialize)]
struct ReplicasOutput {
    status: &'static str,
    replicas: Vec<ReplicaCheck>,
}

#[derive(Serialize)]
struct ClusterOutput<'a> {
    status: &'static str,
    asked: &'a str,
    cluster: Option<&'a ClusterHealth>,
    unreachable: Vec<(String, String)>,
}

pub async fn health(config: &Config, args: HealthArgs) -> anyhow::Result<()> {
    config.validate()?;
    let peers = client_peers(config, &args.client)?;
    if peers.is_empty() {
        anyhow::bail!(
            "no replica address given: use --peers host:port[,host:port...], set FLEET_PEERS, \
             or set [client] peers in the config file"
        );
    }
    let timeout = health_timeout(&args.client)?;
    let json = args.client.output == Output::Json;
    if args.cluster {
        let mut unreachable = Vec::new();
        for addr in &peers {
            match ask(config, addr, true, timeout).await {
                Err(e) => unreachable.push((addr.clone(), e)),
                Ok(report) => {
                    let cluster = report.cluster.as_ref();
                    let status = cluster.map_or("unhealthy", |c| c.status.as_str());
                    if json {
                        print_json(&ClusterOutput {
                            status,
                            asked: addr,
                            cluster,
                            unreachable,
                        })?;
                    } else if let Some(c) = cluster {
                        print_cluster(addr, c);
                    }
                    return match cluster {
                        Some(c) if c.status.is_healthy() => Ok(()),
                        _ => Err(Exit(EXIT_UNHEALTHY).into()),
                    };
                }
            }
        }
        if json {
            print_json(&ClusterOutput {
                status: "unreachable",
                asked: "",
                cluster: None,
                unreachable,
            })?;
        } else {
            for (addr, e) in &unreachable {
                println!("{addr}: UNREACHABLE: {e}");
            }
            println!("cluster: unknown, no replica answered");
        }
        return Err(Exit(EXIT_UNREACHABLE).into());
    }

    let asks = peers.iter().map(|addr| ask(config, addr, false, timeout));
    let results = futures::future::join_all(asks).await;
    let checks: Vec<ReplicaCheck> = peers
        .iter()
        .zip(results)
        .map(|(addr, r)| match r {
            Ok(report) => ReplicaCheck {
                addr: addr.clone(),
                reachable: true,
                error: None,
                report: Some(report),
            },
            Err(e) => ReplicaCheck {
                addr: addr.clone(),
                reachable: false,
                error: Some(e),
                report: None,
            },
        })
        .collect();
    let any_unreachable = checks.iter().any(|c| !c.reachable);
    let any_unhealthy = checks
        .iter()
        .any(|c| c.report.as_ref().is_some_and(|r| !r.status.is_healthy()));
    let (status, code) = if any_unreachable {
        ("unreachable", EXIT_UNREACHABLE)
    } else if any_unhealthy {
        ("unhealthy", EXIT_UNHEALTHY)
    } else {
        ("healthy", 0)
    };
    if json {
        print_json(&ReplicasOutput {
            status,
            replicas: checks,
        })?;
    } else {
        for c in &checks {
            match (&c.report, &c.error) {
                (Some(r), _) => print_replica(r),
                (None, e) => println!(
                    "{}: UNREACHABLE: {}",
                    c.addr,
                    e.as_deref().unwrap_or("no answer")
                ),
            }
        }
    }
    if code == 0 {
        Ok(())
    } else {
        Err(Exit(code).into())
    }
}

fn print_replica(r: &HealthReport) {
    let role = match (r.raft.role.as_str(), r.raft.leader_id) {
        ("leader", _) => "leader".to_string(),
        (role, Some(l)) => format!("{role} of node {l}"),
        (role, None) => format!("{role}, no leader known"),
    };
    let verdict = if r.status.is_healthy() {
        "healthy"
    } else {
        "UNHEALTHY"
    };
    println!(
        "node {} ({}): {verdict}: {role}, term {}; scheduler {}, last iteration {} ({} ms late); \
         last fsync {} us",
        r.node_id,
        r.addr,
        r.raft.term,
        r.scheduler.state,
        r.scheduler
            .latest_scheduler_heartbeat
            .as_deref()
            .unwrap_or("never"),
        r.scheduler.loop_lag_ms,
        r.storage.last_fsync_latency_us,
    );
    for reason in &r.reasons {
        println!("  - {reason}");
    }
    if let Some(m) = &r.scheduler.mitigation {
        println!("  mitigation: {m}");
    }
    if let Some(w) = &r.workers {
        println!(
            "  workers: {} active ({} free slots), {} draining, {} lost",
            w.active, w.free_slots, w.draining, w.lost
        );
        for b in &w.not_active {
            println!(
                "    {} (worker {}): {}, last heard {} ms ago",
                b.name, b.id, b.state, b.last_seen_ms_ago
            );
        }
    }
    if let Some(h) = &r.http_addr {
        println!("  http://{h}/health");
    }
}

fn print_cluster(asked: &str, c: &ClusterHealth) {
    println!(
        "cluster: {} (as node {} at {asked} sees it), term {}, leader {}, {} of {} voters healthy",
        c.status.as_str(),
        c.reported_by,
        c.term,
        c.leader_id.map_or("none".into(), |l| format!("node {l}")),
        c.healthy_voters,
        c.voters
    );
    for reason in &c.reasons {
        println!("  - {reason}");
    }
    for m in &c.members {
        let state = match (m.reachable, m.status) {
            (false, _) => "unreachable".to_string(),
            (true, Some(s)) => s.as_str().to_string(),
            (true, None) => "unknown".to_string(),
        };
        println!(
            "  node {} {} {}{}: {state}, scheduler progress {} ms ago",
            m.id,
            m.addr,
            m.role.as_deref().unwrap_or("?"),
            if m.voter { "" } else { " (learner)" },
            m.scheduler_heartbeat_ms_ago
                .map_or("?".into(), |v| v.to_string()),
        );
    }
}

pub async fn fault(config: &Config, cmd: FaultCommand) -> anyhow::Result<()> {
    let (client, req) = match cmd {
        FaultCommand::Stall {
            client,
            component,
            duration,
        } => (
            client,
            FaultRequest::Stall {
                component: match component {
                    ComponentArg::Scheduler => Component::Scheduler,
                    ComponentArg::Storage => Component::Storage,
                },
                duration_ms: duration,
            },
        ),
        FaultCommand::Clock { client, offset_ms } => {
            let max = crate::health::fault::MAX_CLOCK_OFFSET_MS;
            if offset_ms.abs() > max {
                anyhow::bail!("--offset-ms {offset_ms} is not valid: use -{max} to {max}");
            }
            (client, FaultRequest::ClockOffset { offset_ms })
        }
        FaultCommand::Clear { client } => (client, FaultRequest::Clear),
    };
    if let FaultRequest::Stall { duration_ms, .. } = &req {
        let max = crate::health::fault::MAX_STALL.as_millis() as u64;
        if *duration_ms == 0 || *duration_ms > max {
            anyhow::bail!("--for {duration_ms}ms is not valid: use 1ms to 1h");
        }
    }
    let peers = client_peers(config, &client)?;
    if peers.len() != 1 {
        anyhow::bail!(
            "fleet fault needs exactly one address in --peers (the replica to stall); got {}",
            if peers.is_empty() {
                "none".to_string()
            } else {
                peers.join(",")
            }
        );
    }
    let mut c = super::connect(config, &client)?;
    let r = req.clone();
    let state: FaultState = c
        .call(|cl, ctx| {
            let r = r.clone();
            async move { cl.inject_fault(ctx, r).await }
        })
        .await?;
    if client.output == Output::Json {
        print_json(&state)
    } else {
        match req {
            FaultRequest::Stall { component, .. } => println!(
                "{component} of the replica at {} stalled for {} ms",
                peers[0],
                match component {
                    Component::Scheduler => state.scheduler_stall_left_ms,
                    Component::Storage => state.storage_stall_left_ms,
                }
                .unwrap_or(0)
            ),
            FaultRequest::ClockOffset { offset_ms } => println!(
                "the clock of the replica at {} now runs {offset_ms} ms from the real clock",
                peers[0]
            ),
            FaultRequest::Clear => println!(
                "every stall on the replica at {} cleared, its clock restored",
                peers[0]
            ),
        }
        Ok(())
    }
}
