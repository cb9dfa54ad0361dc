//! Cluster formation the way operators expect (Consul/Nomad style).
//!
//! Three cases, decided once at start:
//! - **Restart**: the data directory has Raft state. Nothing to form; the node rejoins from its
//!   log. Reachable peers are asked which cluster they belong to, and a node whose data
//!   directory belongs to another cluster stops with an error saying so.
//! - **Bootstrap** (`--bootstrap-expect N`): the node asks every peer in `--peers` about itself
//!   ([`discover`](crate::rpc::FleetService::discover)), retrying with backoff for as long as it
//!   takes. Once N uninitialized nodes (this one included) see each other, the one with the
//!   lowest node id initializes Raft with all of them as voters; the others wait to be contacted
//!   by its leader. A peer that is already in a cluster makes this node join that cluster
//!   instead. Disagreeing `--bootstrap-expect` values and two nodes claiming one id stop the
//!   node with an error naming both.
//! - **Join** (no `--bootstrap-expect`): the node asks any peer to add it; the leader adds it as
//!   a learner, waits until it caught up, then makes it a voter.
//!
//! Caveat: with the same `--peers` list on every node of the first set, every node sees the same
//! N nodes and exactly one initializes. Peer lists that name more than N fresh nodes could let
//! two disjoint groups bootstrap; list exactly the first servers.

use openraft::async_runtime::WatchReceiver;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;

use super::Replica;
use crate::error::Error;
use crate::raft::{Node, NodeId};
use crate::rpc::peer::{dial, DialError};
use crate::rpc::{context_with_timeout, NodeInfo};

const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(2);
const DISCOVER_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one join call may take: the leader waits for the new node to catch up.
const JOIN_CALL_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a node that found a formation conflict (duplicate id, disagreeing
/// `--bootstrap-expect`) stays reachable before stopping, so that the other party, which retries
/// discovery at least every `RETRY_MAX`, sees the same conflict instead of waiting for a peer
/// that is gone.
const CONFLICT_LINGER: Duration = Duration::from_secs(5);

/// Reports a formation conflict, lingers (see [`CONFLICT_LINGER`]), then fails.
async fn conflict(message: String) -> anyhow::Result<()> {
    tracing::error!(%message, "cluster formation conflict; stopping in {CONFLICT_LINGER:?}");
    tokio::time::sleep(CONFLICT_LINGER).await;
    Err(anyhow::anyhow!(message))
}

pub async fn run(r: Arc<Replica>) -> anyhow::Result<()> {
    let peers: Vec<String> = r
        .config
        .node
        .peers
        .iter()
        .filter(|p| **p != r.addr && **p != r.config.node.listen)
        .cloned()
        .collect();
    if r.log.has_raft_state()? {
        tracing::info!("data directory has raft state: rejoining from it");
        return check_peers_cluster(&r, &peers).await;
    }
    match r.config.node.bootstrap_expect {
        Some(n) => bootstrap(&r, &peers, n).await,
        None if peers.is_empty() => {
            bail!("nothing to join: give --peers with at least one member, or --bootstrap-expect to form a new cluster")
        }
        None => join(&r, &peers).await,
    }
}

async fn discover(r: &Replica, addr: &str) -> Result<NodeInfo, DialError> {
    let c = dial(addr, &r.identity, None).await?;
    c.client
        .discover(context_with_timeout(DISCOVER_TIMEOUT))
        .await
        .map_err(|e| DialError::Unreachable {
            addr: addr.to_string(),
            reason: e.to_string(),
        })
}

async fn discover_all(r: &Replica, peers: &[String]) -> Vec<(String, Result<NodeInfo, DialError>)> {
    let calls = peers
        .iter()
        .map(|p| async move { (p.clone(), discover(r, p).await) });
    futures::future::join_all(calls).await
}

/// A restarted node: refuse to run with a data directory of another cluster.
async fn check_peers_cluster(r: &Replica, peers: &[String]) -> anyhow::Result<()> {
    for (addr, res) in discover_all(r, peers).await {
        match res {
            Err(DialError::Rejected { reason, .. }) if reason.contains("cluster id mismatch") => {
                bail!(
                "data directory {} belongs to another cluster than the peer at {addr}: {reason}; \
                 point --data-dir at this node's own data, or at an empty directory to join as a \
                 new node",
                r.config.node.data_dir.display()
            )
            }
            Ok(info) if info.node_id == r.id && info.addr != r.addr => bail!(
                "node id {} is claimed by both this node ({}) and the node at {}",
                r.id,
                r.addr,
                info.addr
            ),
            _ => {}
        }
    }
    Ok(())
}

fn backoff(attempt: u32) -> Duration {
    RETRY_MIN.saturating_mul(1 << attempt.min(4)).min(RETRY_MAX)
}

fn initialized(r: &Replica) -> bool {
    r.raft
        .metrics()
        .borrow_watched()
        .membership_config
        .membership()
        .voter_ids()
        .next()
        .is_some()
}

async fn bootstrap(r: &Replica, peers: &[String], expect: usize) -> anyhow::Result<()> {
    tracing::info!(expect, peers = ?peers, "forming a new cluster");
    let mut attempt = 0u32;
    loop {
        if initialized(r) {
            tracing::info!("cluster formed; this node is a member");
            return Ok(());
        }
        let mut found: BTreeMap<NodeId, String> = BTreeMap::from([(r.id, r.addr.clone())]);
        let mut missing: Vec<String> = Vec::new();
        let mut ids: HashMap<NodeId, String> = HashMap::from([(r.id, r.addr.clone())]);
        for (addr, res) in discover_all(r, peers).await {
            match res {
                Ok(info) => {
                    if let Some(other) = ids.get(&info.node_id) {
                        if *other != info.addr {
                            return conflict(format!(
                                "node id {} is claimed by both {} and {}; give every node its own --node-id",
                                info.node_id, other, info.addr
                            ))
                            .await;
                        }
                        continue; // ourselves, listed under another spelling
                    }
                    ids.insert(info.node_id, info.addr.clone());
                    if info.initialized {
                        tracing::info!(peer = %addr, "a peer already belongs to a cluster: joining it");
                        return join(r, peers).await;
                    }
                    if info.bootstrap_expect != Some(expect) {
                        return conflict(format!(
                            "--bootstrap-expect disagrees: node {} at {addr} has {}, this node has {expect}; \
                             give every node of the first set the same value",
                            info.node_id,
                            info.bootstrap_expect.map(|n| n.to_string()).unwrap_or_else(|| "none".into())
                        ))
                        .await;
                    }
                    found.insert(info.node_id, info.addr);
                }
                Err(DialError::Rejected { reason, .. }) => {
                    bail!("peer {addr} refused this node: {reason}")
                }
                Err(e) => missing.push(e.to_string()),
            }
        }
        if found.len() >= expect {
            let lowest = *found.keys().next().expect("non-empty");
            if lowest == r.id {
                let cluster_id: u128 = r.random.with(rand::Rng::random);
                r.adopt_cluster_id(cluster_id).await?;
                let members: BTreeMap<NodeId, Node> = found
                    .iter()
                    .map(|(id, addr)| (*id, Node { addr: addr.clone() }))
                    .collect();
                tracing::info!(members = ?found, cluster_id = %format!("{cluster_id:032x}"), "initializing the cluster");
                match r.raft.initialize(members).await {
                    Ok(()) => return Ok(()),
                    Err(e) if initialized(r) => {
                        tracing::info!(error = %e, "already initialized");
                        return Ok(());
                    }
                    Err(e) => bail!("cannot initialize the cluster: {e}"),
                }
            } else if attempt % 10 == 0 {
                tracing::info!(
                    initializer = lowest,
                    "all {} nodes found; waiting for node {lowest} to initialize",
                    found.len()
                );
            }
        } else if attempt % 5 == 0 {
            tracing::info!(
                found = found.len(),
                expect,
                unreachable = ?missing,
                "waiting for peers"
            );
        }
        attempt += 1;
        tokio::time::sleep(backoff(attempt)).await;
    }
}

async fn join(r: &Replica, peers: &[String]) -> anyhow::Result<()> {
    tracing::info!(peers = ?peers, "joining a running cluster");
    let mut attempt = 0u32;
    loop {
        let voter = r
            .raft
            .metrics()
            .borrow_watched()
            .membership_config
            .membership()
            .voter_ids()
            .any(|v| v == r.id);
        if voter {
            tracing::info!("this node is a voter");
            return Ok(());
        }
        for addr in peers {
            let conn = match dial(addr, &r.identity, None).await {
                Ok(c) => c,
                Err(DialError::Rejected { reason, .. }) => {
                    bail!("peer {addr} refused this node: {reason}")
                }
                Err(e) => {
                    if attempt % 5 == 0 {
                        tracing::info!(error = %e, "cannot reach peer; will retry");
                    }
                    continue;
                }
            };
            if let Some(cid) = conn.cluster_id {
                r.adopt_cluster_id(cid).await?;
            }
            let call = conn
                .client
                .add_member(
                    context_with_timeout(JOIN_CALL_TIMEOUT),
                    r.id,
                    r.addr.clone(),
                    0,
                )
                .await;
            match call {
                Ok(Ok(())) => {
                    tracing::info!(via = %addr, "joined the cluster as a voter");
                    return Ok(());
                }
                Ok(Err(Error::InvalidArgument(msg))) => bail!("cannot join: {msg}"),
                Ok(Err(e)) => {
                    tracing::info!(via = %addr, error = %e, "join not accepted yet; will retry")
                }
                Err(e) => tracing::info!(via = %addr, error = %e, "join call failed; will retry"),
            }
        }
        attempt += 1;
        tokio::time::sleep(backoff(attempt)).await;
    }
}
