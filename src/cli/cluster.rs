//! `fleet cluster status|remove|leave`.

use anyhow::bail;

use super::{client_peers, connect, print_json, report, ClientArgs, ClusterCommand, Output};
use crate::config::Config;
use crate::rpc::ClusterStatus;

/// Runs one `fleet cluster` subcommand.
pub async fn cluster(config: &Config, cmd: ClusterCommand) -> anyhow::Result<()> {
    match cmd {
        ClusterCommand::Status { client, local } => {
            let status = cluster_status(config, &client, local).await?;
            if client.output == Output::Json {
                print_json(&status)
            } else {
                print_status(&status);
                Ok(())
            }
        }
        ClusterCommand::Remove { client, node } => {
            let mut c = connect(config, &client)?;
            c.call(|cl, ctx| async move { cl.remove_member(ctx, node, 0).await })
                .await?;
            report(
                &client,
                &serde_json::json!({"removed": node}),
                &format!("node {node} removed"),
            )
        }
        ClusterCommand::Leave { client } => {
            let peers = client_peers(config, &client)?;
            if peers.len() != 1 {
                bail!(
                    "cluster leave needs exactly one address in --peers (the node that leaves); got {}",
                    peers.join(",")
                );
            }
            let mut c = connect(config, &client)?;
            c.call(|cl, ctx| async move { cl.leave(ctx).await }).await?;
            report(
                &client,
                &serde_json::json!({"left": peers[0]}),
                &format!("node at {} left the cluster", peers[0]),
            )
        }
    }
}

/// The leader's view of the cluster from the first listed replica that can give it; without
/// one (no quorum, or every listed replica cut off), the first replica's own view.
async fn cluster_status(
    config: &Config,
    args: &ClientArgs,
    local: bool,
) -> anyhow::Result<ClusterStatus> {
    // hop = 1 makes a replica answer with its own view instead of asking the leader.
    let hop = u8::from(local);
    let peers = client_peers(config, args)?;
    let mut fallback: Option<anyhow::Result<ClusterStatus>> = None;
    for peer in &peers {
        let one = ClientArgs {
            peers: Some(peer.clone()),
            ..args.clone()
        };
        let mut c = connect(config, &one)?;
        let r = c
            .call(|cl, ctx| async move { cl.cluster_status(ctx, hop).await })
            .await;
        match r {
            Ok(s) if s.leader_view || local => return Ok(s),
            other => {
                if fallback.as_ref().is_none_or(|f| f.is_err()) {
                    fallback = Some(other);
                }
            }
        }
    }
    fallback.unwrap_or_else(|| Err(anyhow::anyhow!("no replica address given")))
}

fn print_status(s: &ClusterStatus) {
    let leader = match (s.leader_id, &s.leader_addr) {
        (Some(id), Some(a)) => format!("node {id} at {a}"),
        _ => "none (election in progress or no quorum)".into(),
    };
    println!(
        "cluster:  {} ({})",
        s.cluster_name,
        s.cluster_id.as_deref().unwrap_or("not formed")
    );
    println!("leader:   {leader}");
    println!("term:     {}", s.term);
    println!(
        "log:      last {}  committed {}  applied {}  snapshot {}  purged {}",
        opt(s.last_log_index),
        opt(s.commit_index),
        opt(s.applied_index),
        opt(s.snapshot_index),
        opt(s.purged_index)
    );
    if !s.leader_view {
        println!(
            "(reported by node {} without a reachable leader: match index and contact unknown)",
            s.reported_by
        );
    }
    println!();
    println!(
        "{:<6} {:<22} {:<9} {:<6} {:>12} {:>14}",
        "NODE", "ADDRESS", "ROLE", "VOTER", "MATCH INDEX", "LAST CONTACT"
    );
    for m in &s.members {
        println!(
            "{:<6} {:<22} {:<9} {:<6} {:>12} {:>14}",
            m.id,
            m.addr,
            m.role,
            if m.voter { "yes" } else { "no" },
            opt(m.match_index),
            m.last_contact_ms
                .map(|ms| format!("{ms} ms ago"))
                .unwrap_or_else(|| "-".into())
        );
    }
}

fn opt(v: Option<u64>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}
