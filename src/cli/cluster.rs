//! `fleet cluster status|remove|leave`.

use anyhow::bail;

use std::io::Write as _;
use std::path::Path;

use anyhow::Context as _;

use super::{
    client_peers, connect, print_json, report, ClientArgs, ClusterCommand, Output, SnapshotCommand,
};
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
        ClusterCommand::Snapshot(SnapshotCommand::Save { client, file }) => {
            save(config, &client, &file).await
        }
        ClusterCommand::Snapshot(SnapshotCommand::Inspect { file, output }) => {
            inspect(&file, output)
        }
    }
}

/// `fleet cluster snapshot save`: fetches the backup piece by piece, writes it to a temporary
/// file, fsyncs it, checks it, and renames it over `file`.
async fn save(config: &Config, client: &ClientArgs, file: &Path) -> anyhow::Result<()> {
    // Backups came with protocol 7; a replica of an older version cannot take the call.
    let mut c = connect(config, client)?.with_min_protocol(7);
    let first = c
        .call(|cl, ctx| async move { cl.backup_chunk(ctx, 0, 0, 0).await })
        .await?;
    let (session, total) = (first.session, first.total);
    let mut bytes = first.data;
    while (bytes.len() as u64) < total {
        let offset = bytes.len() as u64;
        let chunk = c
            .call(|cl, ctx| async move { cl.backup_chunk(ctx, session, offset, 0).await })
            .await?;
        anyhow::ensure!(
            chunk.offset == offset && !chunk.data.is_empty() && chunk.total == total,
            "the leader answered piece {} of {} bytes at offset {offset} of {total}; run the save again",
            chunk.offset,
            chunk.data.len()
        );
        bytes.extend_from_slice(&chunk.data);
    }
    let name = file
        .file_name()
        .ok_or_else(|| anyhow::anyhow!("{} is not a file name", file.display()))?;
    let tmp = file.with_file_name(format!(".{}.tmp", name.to_string_lossy()));
    {
        let mut f = std::fs::File::create(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        f.write_all(&bytes)?;
        f.sync_all()?;
    }
    let backup = match crate::server::backup::read_backup(&tmp) {
        Ok(b) => b,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            anyhow::bail!("the backup received does not check out: {e:#}");
        }
    };
    std::fs::rename(&tmp, file)?;
    let dir = match file.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)?.sync_all()?;
    let summary = Summary::of(&backup);
    report(
        client,
        &serde_json::to_value(&summary)?,
        &format!(
            "saved {} ({} bytes): {} tasks, {} schedules, {} pools, {} workflows, {} runs, as of log index {}",
            file.display(),
            summary.bytes,
            summary.tasks,
            summary.schedules,
            summary.pools,
            summary.workflows,
            summary.runs,
            summary.log_index
        ),
    )
}

/// What a backup holds, as `inspect` and `save` print it.
#[derive(serde::Serialize)]
struct Summary {
    bytes: usize,
    file_format: u32,
    state_format: u8,
    log_index: u64,
    log_term: u64,
    members: Vec<(u64, String)>,
    tasks: usize,
    tasks_by_state: std::collections::BTreeMap<String, usize>,
    attempts: usize,
    schedules: usize,
    pools: usize,
    workflows: usize,
    runs: usize,
}

impl Summary {
    fn of(b: &crate::server::backup::Backup) -> Summary {
        let mut tasks_by_state = std::collections::BTreeMap::new();
        let mut tasks = 0;
        let mut attempts = 0;
        for t in b.state.all_tasks() {
            tasks += 1;
            attempts += t.attempts.len();
            *tasks_by_state
                .entry(t.state.as_str().to_string())
                .or_default() += 1;
        }
        let last = b.meta.last_log_id.as_ref();
        Summary {
            bytes: b.bytes,
            file_format: crate::formats::SNAPSHOT_FILE_FORMAT,
            state_format: b.state_format,
            log_index: last.map_or(0, |l| l.index()),
            log_term: last.map_or(0, |l| l.committed_leader_id().term),
            members: b
                .meta
                .last_membership
                .membership()
                .nodes()
                .map(|(id, n)| (*id, n.addr.clone()))
                .collect(),
            tasks,
            tasks_by_state,
            attempts,
            schedules: b.state.schedules.len(),
            pools: b.state.pools.len(),
            workflows: b.state.workflows.len(),
            runs: b.state.workflows.run_count(),
        }
    }
}

/// `fleet cluster snapshot inspect`.
fn inspect(file: &Path, output: Output) -> anyhow::Result<()> {
    let backup = crate::server::backup::read_backup(file)?;
    let s = Summary::of(&backup);
    if output == Output::Json {
        return print_json(&s);
    }
    println!(
        "file:        {} ({} bytes, checksum ok)",
        file.display(),
        s.bytes
    );
    println!(
        "formats:     snapshot file {}, state {}",
        s.file_format, s.state_format
    );
    println!(
        "as of:       log index {}, term {}",
        s.log_index, s.log_term
    );
    let members: Vec<String> = s
        .members
        .iter()
        .map(|(id, a)| format!("{id}={a}"))
        .collect();
    println!("members:     {}", members.join(", "));
    let by_state: Vec<String> = s
        .tasks_by_state
        .iter()
        .map(|(k, v)| format!("{v} {k}"))
        .collect();
    println!("tasks:       {} ({})", s.tasks, by_state.join(", "));
    println!("attempts:    {}", s.attempts);
    println!("schedules:   {}", s.schedules);
    println!("pools:       {}", s.pools);
    println!("workflows:   {} ({} runs)", s.workflows, s.runs);
    Ok(())
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
