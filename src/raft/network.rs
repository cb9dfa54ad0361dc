//! openraft's `RaftNetworkV2` over fleet's RPC layer.
//!
//! Each target node gets a [`PeerNetwork`] that shares one reconnecting [`Peer`] per (node id,
//! address) from the [`PeerPool`]. Every call carries a deadline from openraft's `RPCOption`.
//! A peer that cannot be reached is reported as `Unreachable`, so openraft backs off. The
//! handshake names the node id we meant to reach, so a message never lands on a different node
//! that now holds an old address.
//!
//! Snapshots are sent in chunks of [`SNAPSHOT_CHUNK_BYTES`]: never one unbounded message.

use std::future::Future;
use std::io::Cursor;
use std::sync::Arc;
use std::time::Duration;

use openraft::errors::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::v2::RaftNetworkV2;
use openraft::network::{RPCOption, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::OptionalSend;

use super::{Node, NodeId, TypeConfig, Vote};
use crate::error::Error;
use crate::rpc::peer::{is_transport_failure, Peer, PeerPool};
use crate::rpc::{context_with_timeout, FleetServiceClient, SnapshotChunk, SNAPSHOT_CHUNK_BYTES};

type Snapshot = openraft::type_config::alias::SnapshotOf<TypeConfig, Cursor<Vec<u8>>>;

/// Creates a [`PeerNetwork`] per replication target.
#[derive(Clone)]
pub struct NetworkFactory {
    pool: PeerPool,
    snapshot_chunk_timeout: Duration,
    append_timeout: Duration,
}

impl NetworkFactory {
    /// `append_timeout` is the least deadline of one AppendEntries (see
    /// [`PeerNetwork::append_entries`]); the server passes the maximum election timeout (the
    /// leader lease).
    pub fn new(pool: PeerPool, snapshot_chunk_timeout: Duration, append_timeout: Duration) -> Self {
        NetworkFactory {
            pool,
            snapshot_chunk_timeout,
            append_timeout,
        }
    }
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerNetwork;

    async fn new_client(&mut self, target: NodeId, node: &Node) -> PeerNetwork {
        PeerNetwork {
            target,
            peer: self.pool.get(Some(target), &node.addr),
            snapshot_chunk_timeout: self.snapshot_chunk_timeout,
            append_timeout: self.append_timeout,
        }
    }
}

/// The connection to one target node.
pub struct PeerNetwork {
    target: NodeId,
    peer: Arc<Peer>,
    snapshot_chunk_timeout: Duration,
    append_timeout: Duration,
}

impl PeerNetwork {
    /// Runs one call with the peer's client, mapping failures to openraft's error kinds.
    async fn call<T, F, Fut>(&self, timeout: Duration, f: F) -> Result<T, RPCError<TypeConfig>>
    where
        F: FnOnce(FleetServiceClient, tarpc::context::Context) -> Fut,
        Fut: Future<Output = Result<Result<T, Error>, tarpc::client::RpcError>>,
    {
        let client = self
            .peer
            .client()
            .await
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?;
        match f(client, context_with_timeout(timeout)).await {
            Ok(Ok(v)) => Ok(v),
            // The remote Raft has stopped (or refused the call): treat it as unreachable so
            // replication backs off.
            Ok(Err(e)) => Err(RPCError::Unreachable(Unreachable::new(&e))),
            Err(e) => {
                if is_transport_failure(&e) {
                    self.peer.reset().await;
                    Err(RPCError::Unreachable(Unreachable::new(&e)))
                } else {
                    Err(RPCError::Network(NetworkError::new(&e)))
                }
            }
        }
    }
}

impl RaftNetworkV2<TypeConfig> for PeerNetwork {
    type SnapshotData = Cursor<Vec<u8>>;

    /// The deadline is openraft's `soft_ttl` or `append_timeout`, whichever is longer.
    /// openraft gives an append the heartbeat interval as its time to live (50 ms by
    /// default, so 37 ms of soft TTL), but one append is a round trip *plus the follower's
    /// fsync*: on a link with 40 ms of latency each way, or a disk whose fsync takes 80 ms,
    /// every append missed its deadline, nothing committed, and the stalled scheduling loop
    /// handed leadership around (found by the chaos harness's latency scenario). An append that
    /// arrives late is still useful, because the request itself resets the follower's election
    /// timer; a dead peer is still noticed at once through its transport error.
    async fn append_entries(
        &mut self,
        req: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(
            option.soft_ttl().max(self.append_timeout),
            |c, ctx| async move { c.raft_append(ctx, req).await },
        )
        .await
    }

    async fn vote(
        &mut self,
        req: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(option.soft_ttl(), |c, ctx| async move {
            c.raft_vote(ctx, req).await
        })
        .await
    }

    async fn pre_vote(
        &mut self,
        req: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(option.soft_ttl(), |c, ctx| async move {
            c.raft_pre_vote(ctx, req).await
        })
        .await
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(option.soft_ttl(), |c, ctx| async move {
            c.raft_transfer_leader(ctx, req).await
        })
        .await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let data = snapshot.snapshot.into_inner();
        let total_len = data.len() as u64;
        let transfer_id: u64 = rand::random();
        tracing::info!(
            target = self.target,
            bytes = total_len,
            "sending a snapshot"
        );
        tokio::pin!(cancel);
        let mut offset = 0usize;
        loop {
            let end = (offset + SNAPSHOT_CHUNK_BYTES).min(data.len());
            let chunk = SnapshotChunk {
                transfer_id,
                vote,
                meta: snapshot.meta.clone(),
                total_len,
                offset: offset as u64,
                data: data[offset..end].to_vec(),
                done: end == data.len(),
            };
            let send = self.call(self.snapshot_chunk_timeout, |c, ctx| async move {
                c.raft_snapshot_chunk(ctx, chunk).await
            });
            let reply = tokio::select! {
                closed = &mut cancel => return Err(StreamingError::Closed(closed)),
                r = send => r,
            };
            match reply {
                Ok(Some(resp)) if end == data.len() => return Ok(resp),
                Ok(_) if end < data.len() => offset = end,
                Ok(_) => {
                    return Err(StreamingError::Network(NetworkError::from_string(
                        "the receiver did not confirm the last snapshot chunk",
                    )))
                }
                Err(RPCError::Unreachable(e)) => return Err(StreamingError::Unreachable(e)),
                Err(RPCError::Timeout(e)) => return Err(StreamingError::Timeout(e)),
                Err(RPCError::Network(e)) => return Err(StreamingError::Network(e)),
                Err(RPCError::RemoteError(e)) => {
                    return Err(StreamingError::Network(NetworkError::new(&e)))
                }
            }
        }
    }
}
