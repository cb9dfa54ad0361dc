//! Outgoing connections: dialling with a handshake, and [`Peer`], a client that re-dials.
//!
//! tarpc never reconnects: a broken transport stays broken. A [`Peer`] keeps one live
//! connection to one address and drops it when a call fails for a transport reason; the next
//! call dials again. Failed dials back off exponentially (from [`DIAL_BACKOFF_MIN`] to
//! [`DIAL_BACKOFF_MAX`], jittered), and a call during the backoff fails at once as unreachable,
//! so Raft backs off instead of hammering a dead peer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;

use super::handshake::{self, Hello, HelloReply};
use super::{codec, FleetServiceClient, Role};
use crate::raft::NodeId;

pub const DIAL_BACKOFF_MIN: Duration = Duration::from_millis(50);
pub const DIAL_BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How long a TCP connect plus handshake may take.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(3);
/// Requests one connection may have in flight before further ones queue (tarpc's bound).
pub const MAX_IN_FLIGHT_PER_CONNECTION: usize = 1024;

/// Who this process is, as it introduces itself in handshakes. The cluster id is learned when
/// the node forms or joins a cluster, so it can change once, from `None` to `Some`.
#[derive(Debug)]
pub struct LocalIdentity {
    pub role: Role,
    pub node_id: Option<NodeId>,
    pub cluster_name: String,
    cluster_id: Mutex<Option<u128>>,
    /// Presented in every handshake (`node.auth_token`).
    auth_token: String,
}

impl LocalIdentity {
    pub fn new(
        role: Role,
        node_id: Option<NodeId>,
        cluster_name: String,
        cluster_id: Option<u128>,
    ) -> Self {
        LocalIdentity {
            role,
            node_id,
            cluster_name,
            cluster_id: Mutex::new(cluster_id),
            auth_token: String::new(),
        }
    }
    /// This identity presenting `token` in handshakes.
    pub fn with_auth_token(mut self, token: &str) -> Self {
        self.auth_token = token.to_string();
        self
    }
    pub fn auth_token(&self) -> &str {
        &self.auth_token
    }
    pub fn cluster_id(&self) -> Option<u128> {
        *self.cluster_id.lock().expect("identity lock")
    }
    pub fn set_cluster_id(&self, id: u128) {
        *self.cluster_id.lock().expect("identity lock") = Some(id);
    }
    fn hello(&self, expect_node: Option<NodeId>) -> Hello {
        Hello {
            cluster_name: self.cluster_name.clone(),
            cluster_id: self.cluster_id(),
            role: self.role,
            from_node: self.node_id,
            expect_node,
            auth_token: self.auth_token.clone(),
        }
    }
}

/// Why a dial failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DialError {
    /// Nothing answered (refused, timed out, no route), or we are backing off.
    #[error("{addr} is unreachable: {reason}")]
    Unreachable { addr: String, reason: String },
    /// Something answered but refused us or is not a compatible fleet node.
    #[error("{addr} refused the connection: {reason}")]
    Rejected { addr: String, reason: String },
}

/// A connected client and what the callee said about itself.
pub struct Connected {
    pub client: FleetServiceClient,
    pub node_id: NodeId,
    pub cluster_id: Option<u128>,
    /// The protocol version the connection speaks (negotiated in the handshake).
    pub protocol: u16,
}

/// Dials `addr`, runs the handshake and starts a tarpc client.
pub async fn dial(
    addr: &str,
    me: &LocalIdentity,
    expect_node: Option<NodeId>,
) -> Result<Connected, DialError> {
    let unreachable = |reason: String| DialError::Unreachable {
        addr: addr.to_string(),
        reason,
    };
    let rejected = |reason: String| DialError::Rejected {
        addr: addr.to_string(),
        reason,
    };
    let mut stream = tokio::time::timeout(DIAL_TIMEOUT, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| unreachable(format!("connect timed out after {DIAL_TIMEOUT:?}")))?
        .map_err(|e| unreachable(e.to_string()))?;
    // tarpc never sets TCP_NODELAY; small RPCs would otherwise wait for Nagle's algorithm.
    stream
        .set_nodelay(true)
        .map_err(|e| unreachable(e.to_string()))?;
    handshake::write_frame(
        &mut stream,
        &me.hello(expect_node),
        handshake::PROTOCOL_VERSION,
    )
    .await
    .map_err(|e| unreachable(e.to_string()))?;
    let received = handshake::read_frame::<HelloReply>(&mut stream)
        .await
        .map_err(|e| match e {
            handshake::HandshakeError::Io(io) => {
                unreachable(format!("closed during handshake: {io}"))
            }
            handshake::HandshakeError::Timeout => unreachable(e.to_string()),
            other => rejected(other.to_string()),
        })?;
    // A reply's trailer is the version the callee chose; fleet 6 writes none (its header, 6).
    let protocol = received.trailer.min(handshake::PROTOCOL_VERSION);
    match received.body {
        HelloReply::Rejected { reason } => Err(rejected(reason)),
        HelloReply::Accepted {
            node_id,
            cluster_id,
        } => {
            if let Some(expect) = expect_node {
                if expect != node_id {
                    return Err(rejected(format!(
                        "expected node {expect}, reached node {node_id}"
                    )));
                }
            }
            let transport = codec::transport(stream, addr.to_string());
            let mut config = tarpc::client::Config::default();
            config.max_in_flight_requests = MAX_IN_FLIGHT_PER_CONNECTION;
            let client = FleetServiceClient::new(config, transport).spawn();
            Ok(Connected {
                client,
                node_id,
                cluster_id,
                protocol,
            })
        }
    }
}

struct PeerState {
    /// The connection and the protocol version it negotiated.
    client: Option<(FleetServiceClient, u16)>,
    failures: u32,
    retry_at: Option<Instant>,
    last_error: Option<DialError>,
}

/// A reconnecting client to one address (and, for Raft, one expected node id).
pub struct Peer {
    pub addr: String,
    expect_node: Option<NodeId>,
    me: Arc<LocalIdentity>,
    state: tokio::sync::Mutex<PeerState>,
}

impl Peer {
    pub fn new(addr: String, expect_node: Option<NodeId>, me: Arc<LocalIdentity>) -> Peer {
        Peer {
            addr,
            expect_node,
            me,
            state: tokio::sync::Mutex::new(PeerState {
                client: None,
                failures: 0,
                retry_at: None,
                last_error: None,
            }),
        }
    }

    /// The live client, dialling if there is none (unless backing off).
    pub async fn client(&self) -> Result<FleetServiceClient, DialError> {
        Ok(self.connected().await?.0)
    }

    /// The live client and the protocol version its connection speaks, dialling if there is
    /// none (unless backing off).
    pub async fn connected(&self) -> Result<(FleetServiceClient, u16), DialError> {
        let mut st = self.state.lock().await;
        if let Some(c) = &st.client {
            return Ok(c.clone());
        }
        if let Some(at) = st.retry_at {
            if Instant::now() < at {
                let reason = st
                    .last_error
                    .as_ref()
                    .map(|e| format!("backing off after: {e}"))
                    .unwrap_or_else(|| "backing off".into());
                return Err(DialError::Unreachable {
                    addr: self.addr.clone(),
                    reason,
                });
            }
        }
        match dial(&self.addr, &self.me, self.expect_node).await {
            Ok(c) => {
                st.client = Some((c.client.clone(), c.protocol));
                st.failures = 0;
                st.retry_at = None;
                st.last_error = None;
                Ok((c.client, c.protocol))
            }
            Err(e) => {
                st.failures = st.failures.saturating_add(1);
                let exp = DIAL_BACKOFF_MIN.saturating_mul(1u32 << st.failures.min(8));
                let backoff = exp.min(DIAL_BACKOFF_MAX);
                let jitter = rand::rng().random_range(0..=backoff.as_millis() as u64 / 4);
                st.retry_at = Some(Instant::now() + backoff + Duration::from_millis(jitter));
                if st.failures == 1 || st.failures % 20 == 0 {
                    tracing::warn!(peer = %self.addr, failures = st.failures, error = %e, "cannot reach peer");
                }
                st.last_error = Some(e.clone());
                Err(e)
            }
        }
    }

    /// Drops the connection after a transport failure; the next call re-dials.
    pub async fn reset(&self) {
        self.state.lock().await.client = None;
    }
}

/// A peer's expected node id (none for a client-style dial) and address.
type PeerKey = (Option<NodeId>, String);

/// Shared peers, keyed by (expected node id, address), so every Raft replication stream and
/// every forwarded request to one node reuses one connection.
#[derive(Clone)]
pub struct PeerPool {
    me: Arc<LocalIdentity>,
    peers: Arc<Mutex<HashMap<PeerKey, Arc<Peer>>>>,
}

impl PeerPool {
    pub fn new(me: Arc<LocalIdentity>) -> PeerPool {
        PeerPool {
            me,
            peers: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    pub fn get(&self, node: Option<NodeId>, addr: &str) -> Arc<Peer> {
        let mut peers = self.peers.lock().expect("peer pool lock");
        peers
            .entry((node, addr.to_string()))
            .or_insert_with(|| Arc::new(Peer::new(addr.to_string(), node, self.me.clone())))
            .clone()
    }

    pub fn identity(&self) -> &Arc<LocalIdentity> {
        &self.me
    }
}

/// Whether a tarpc error means the connection is unusable (so the peer should re-dial).
pub fn is_transport_failure(e: &tarpc::client::RpcError) -> bool {
    !matches!(
        e,
        tarpc::client::RpcError::DeadlineExceeded | tarpc::client::RpcError::Server(_)
    )
}
