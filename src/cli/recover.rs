//! `fleet recover`: quorum-loss recovery of a stopped replica ([`crate::server::recover`]).

use anyhow::bail;
use clap::Args;

use super::NodeFlags;
use crate::config::Config;
use crate::server::data_dir::{self, Found};
use crate::server::recover::{reachable_voters, read_survivor, recover as rewrite};

#[derive(Args, Debug)]
pub struct RecoverArgs {
    #[command(flatten)]
    pub node: NodeFlags,
    /// Do it: without this flag the command only says what it would do and what may be lost.
    #[arg(long)]
    pub accept_data_loss: bool,
}

pub async fn recover(mut config: Config, args: RecoverArgs) -> anyhow::Result<()> {
    args.node.apply(&mut config)?;
    config.validate()?;
    let dir = config.node.data_dir.clone();
    if data_dir::check(&dir)? == Found::Empty {
        bail!(
            "data directory {} holds no data to recover from",
            dir.display()
        );
    }
    let lock = crate::pidlock::PidLock::acquire(&dir.join("fleet.pid")).map_err(|e| {
        anyhow::anyhow!(
            "data directory {} is {e}: stop that replica first",
            dir.display()
        )
    })?;
    let s = read_survivor(&dir).await?;
    let me = s.identity.node_id;
    let last = s.last_log.as_ref().map_or(0, |l| l.index());
    let committed = s.committed.as_ref().map_or(0, |l| l.index());
    let voters: Vec<String> = s
        .voters
        .iter()
        .map(|(id, a)| format!("{id} at {a}"))
        .collect();
    eprintln!(
        "node {me} of cluster {:?} ({}); voters: {}",
        s.identity.cluster_name,
        s.identity
            .cluster_id
            .map_or("no id".to_string(), |c| format!("{c:032x}")),
        voters.join(", ")
    );
    eprintln!(
        "its data: snapshot at index {}, log up to index {last}, known committed up to {committed}; \
         {} tasks",
        s.snapshot_index,
        s.state.all_tasks().count()
    );
    let up = reachable_voters(&s, &config).await;
    let majority = s.voters.len() / 2 + 1;
    let me_voter = s.voters.iter().any(|(id, _)| *id == me);
    if up.len() + usize::from(me_voter) >= majority {
        let names: Vec<String> = up.iter().map(|(id, a)| format!("{id} at {a}")).collect();
        let others = s.voters.len() - usize::from(me_voter);
        bail!(
            "refusing: this node and {} of the {others} other voters ({}) make a quorum of \
             {majority} of {}: the cluster is not lost, and recovering this node would split it. \
             Start this replica again with fleet join; replace lost replicas with fleet cluster \
             remove and fleet join",
            up.len(),
            if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            },
            s.voters.len(),
        );
    }
    eprintln!();
    eprintln!(
        "WARNING: quorum-loss recovery makes this node a new one-node cluster from its own data."
    );
    eprintln!(
        "  - Everything the lost replicas had beyond this node's log (index {last}) is LOST: writes \
         acknowledged to clients may be among it."
    );
    if last > committed {
        eprintln!(
            "  - Entries {}..={last} were not known to be committed here; they are KEPT (some may \
             never have been acknowledged: a submission may appear that its client saw fail).",
            committed + 1
        );
    }
    eprintln!(
        "  - The node gets a new cluster id: the old replicas, if they come back, are refused; \
         give them empty data directories and fleet join them to this node."
    );
    eprintln!("  - The old data stays beside the new, as db.before-recovery-* and snapshot.bin.before-recovery-*.");
    if !args.accept_data_loss {
        bail!("nothing was changed; run again with --accept-data-loss to recover");
    }
    let cluster_id: u128 = rand::random();
    let kept = rewrite(&dir, &s, &config.advertise_addr(), cluster_id).await?;
    drop(lock);
    // Run as root on a replica that runs as `fleet` (the package's unit): the new files must
    // be the replica's, or it cannot open them.
    let given = data_dir::give_to_owner(&dir).map_err(|e| {
        anyhow::anyhow!(
            "recovered, but the files in {} could not be given to the directory's owner: {e}; \
             chown them (chown -R OWNER {}) before starting the replica",
            dir.display(),
            dir.display()
        )
    })?;
    if given > 0 {
        eprintln!(
            "gave {given} new files in {} to the data directory's owner",
            dir.display()
        );
    }
    println!(
        "recovered: node {me} is a one-node cluster ({cluster_id:032x}) holding {} tasks as of index \
         {last}; old data kept in {}",
        s.state.all_tasks().count(),
        kept.iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "next: start it with fleet join (same --data-dir and --listen), then fleet join new \
         replicas with --peers {}",
        config.advertise_addr()
    );
    Ok(())
}
