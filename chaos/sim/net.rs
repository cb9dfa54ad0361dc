//! The simulated network: every message between replicas, and between workers or clients and
//! replicas, goes through [`Fabric::call`], which draws its fate from the run's seed: delayed
//! (1-10 ms, sometimes far more, so messages overtake each other), lost, duplicated, or cut by
//! a partition (per direction, so one-way partitions exist). A lost request or reply costs the
//! caller its timeout, as on a real network.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::io::Cursor;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleet::raft::{NodeId, TypeConfig, Vote};
use openraft::error::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::{OptionalSend, RaftNetworkV2};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::node::Node;
use super::trace::Trace;

/// A network address: replicas are their node ids; workers and the client have their own.
pub type Endpoint = u64;

/// What the network does to messages right now.
#[derive(Debug, Clone, Copy)]
pub struct Weather {
    pub loss: f64,
    pub duplicate: f64,
    /// Chance that a message is held far longer than usual (reordering).
    pub slow: f64,
}

impl Weather {
    pub const CALM: Weather = Weather {
        loss: 0.0,
        duplicate: 0.0,
        slow: 0.0,
    };
}

#[derive(Debug, Default, Clone, Copy)]
pub struct NetStats {
    pub messages: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub cut: u64,
}

struct State {
    rng: StdRng,
    nodes: BTreeMap<NodeId, Arc<Node>>,
    /// Directed pairs that cannot talk (from, to).
    cut: BTreeSet<(Endpoint, Endpoint)>,
    weather: Weather,
    stats: NetStats,
}

/// The network of one simulated run.
pub struct Fabric {
    s: Mutex<State>,
    trace: Arc<Trace>,
}

/// How one message fares.
struct Fate {
    request: Option<u64>,
    duplicate: Option<u64>,
    reply: Option<u64>,
}

/// Why a call failed.
#[derive(Debug, Clone)]
pub enum Failure {
    /// The target is down (connection refused: known at once).
    Down,
    /// No answer within the timeout (lost, cut, or slow).
    Timeout,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Down => write!(f, "connection refused"),
            Failure::Timeout => write!(f, "timed out"),
        }
    }
}

impl Fabric {
    pub fn new(seed: u64, trace: Arc<Trace>) -> Arc<Fabric> {
        Arc::new(Fabric {
            s: Mutex::new(State {
                rng: StdRng::seed_from_u64(seed),
                nodes: BTreeMap::new(),
                cut: BTreeSet::new(),
                weather: Weather::CALM,
                stats: NetStats::default(),
            }),
            trace,
        })
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.s.lock().expect("fabric lock"))
    }

    pub fn up(&self, node: Arc<Node>) {
        self.with(|s| s.nodes.insert(node.id, node));
    }

    pub fn down(&self, id: NodeId) {
        self.with(|s| s.nodes.remove(&id));
    }

    pub fn node(&self, id: NodeId) -> Option<Arc<Node>> {
        self.with(|s| s.nodes.get(&id).cloned())
    }

    pub fn nodes(&self) -> Vec<Arc<Node>> {
        self.with(|s| s.nodes.values().cloned().collect())
    }

    pub fn set_weather(&self, w: Weather) {
        self.with(|s| s.weather = w);
    }

    /// Cuts `from` -> `to` (one way).
    pub fn cut(&self, from: Endpoint, to: Endpoint) {
        self.with(|s| s.cut.insert((from, to)));
    }

    pub fn heal(&self) {
        self.with(|s| s.cut.clear());
    }

    pub fn stats(&self) -> NetStats {
        self.with(|s| s.stats)
    }

    fn fate(&self, from: Endpoint, to: Endpoint) -> Fate {
        self.with(|s| {
            s.stats.messages += 1;
            let w = s.weather;
            let delay = |rng: &mut StdRng| {
                if w.slow > 0.0 && rng.random_bool(w.slow) {
                    rng.random_range(50..400)
                } else {
                    rng.random_range(1..10)
                }
            };
            let request = if s.cut.contains(&(from, to)) {
                s.stats.cut += 1;
                None
            } else if w.loss > 0.0 && s.rng.random_bool(w.loss) {
                s.stats.lost += 1;
                None
            } else {
                Some(delay(&mut s.rng))
            };
            let duplicate = (request.is_some()
                && w.duplicate > 0.0
                && s.rng.random_bool(w.duplicate))
            .then(|| {
                s.stats.duplicated += 1;
                delay(&mut s.rng)
            });
            let reply = if s.cut.contains(&(to, from)) {
                s.stats.cut += 1;
                None
            } else if w.loss > 0.0 && s.rng.random_bool(w.loss) {
                s.stats.lost += 1;
                None
            } else {
                Some(delay(&mut s.rng))
            };
            Fate {
                request,
                duplicate,
                reply,
            }
        })
    }

    /// Sends `req` from `from` to replica `to`, which handles it with `handle`; the reply
    /// comes back through the network too. `timeout` bounds the whole call.
    pub async fn call<Req, Resp, F, Fut>(
        self: &Arc<Self>,
        kind: &'static str,
        from: Endpoint,
        to: NodeId,
        timeout: Duration,
        req: Req,
        handle: F,
    ) -> Result<Resp, Failure>
    where
        Req: Clone + Send + 'static,
        Resp: Send + 'static,
        F: Fn(Arc<Node>, Req) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Resp> + Send + 'static,
    {
        let fate = self.fate(from, to);
        self.trace.event(format_args!(
            "msg {kind} {from}->{to} {:?}/{:?}/{:?}",
            fate.request, fate.duplicate, fate.reply
        ));
        let handle = Arc::new(handle);
        let call = async {
            let Some(delay) = fate.request else {
                std::future::pending::<()>().await;
                unreachable!()
            };
            if let Some(d) = fate.duplicate {
                // The copy is delivered too; its answer goes nowhere.
                let (fabric, h, r) = (self.clone(), handle.clone(), req.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(d)).await;
                    if let Some(n) = fabric.node(to) {
                        h(n, r).await;
                    }
                });
            }
            tokio::time::sleep(Duration::from_millis(delay)).await;
            let node = self.node(to).ok_or(Failure::Down)?;
            let resp = handle(node, req).await;
            match fate.reply {
                Some(d) => {
                    tokio::time::sleep(Duration::from_millis(d)).await;
                    Ok(resp)
                }
                None => std::future::pending().await,
            }
        };
        match tokio::time::timeout(timeout, call).await {
            Ok(r) => r,
            Err(_) => Err(Failure::Timeout),
        }
    }
}

/// openraft's network for one replica.
#[derive(Clone)]
pub struct SimNetworkFactory {
    pub from: NodeId,
    pub fabric: Arc<Fabric>,
}

impl RaftNetworkFactory<TypeConfig> for SimNetworkFactory {
    type Network = SimNetwork;

    async fn new_client(&mut self, target: NodeId, _node: &fleet::raft::Node) -> SimNetwork {
        SimNetwork {
            from: self.from,
            target,
            fabric: self.fabric.clone(),
        }
    }
}

pub struct SimNetwork {
    from: NodeId,
    target: NodeId,
    fabric: Arc<Fabric>,
}

type Snapshot = openraft::type_config::alias::SnapshotOf<TypeConfig, Cursor<Vec<u8>>>;

fn rpc_err<E: std::fmt::Display>(f: Failure, _: Option<E>) -> RPCError<TypeConfig> {
    match f {
        Failure::Down => RPCError::Unreachable(Unreachable::from_string(f.to_string())),
        Failure::Timeout => RPCError::Network(NetworkError::from_string(f.to_string())),
    }
}

/// A Raft error from the target (it stopped): unreachable, as the real network maps it.
fn remote<T, E: std::fmt::Display>(r: Result<T, E>) -> Result<T, RPCError<TypeConfig>> {
    r.map_err(|e| RPCError::Unreachable(Unreachable::from_string(e.to_string())))
}

/// The least time an append may take: openraft's heartbeat TTL is shorter than one round trip
/// plus a slow fsync (see `fleet::raft::network`).
const APPEND_TIMEOUT: Duration = Duration::from_millis(300);

impl SimNetwork {
    /// One Raft message to the target through the fabric; a failure or an error of the target
    /// is `Unreachable`, as the real network maps it.
    async fn raft_call<Req, Resp, F, Fut>(
        &self,
        kind: &'static str,
        ttl: Duration,
        req: Req,
        handle: F,
    ) -> Result<Resp, RPCError<TypeConfig>>
    where
        Req: Clone + Send + 'static,
        Resp: Send + 'static,
        F: Fn(Arc<Node>, Req) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Resp, String>> + Send + 'static,
    {
        let r = self
            .fabric
            .call(kind, self.from, self.target, ttl, req, handle)
            .await
            .map_err(|f| rpc_err::<String>(f, None))?;
        remote(r)
    }
}

impl RaftNetworkV2<TypeConfig> for SimNetwork {
    type SnapshotData = Cursor<Vec<u8>>;

    async fn append_entries(
        &mut self,
        req: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        let ttl = option.soft_ttl().max(APPEND_TIMEOUT);
        self.raft_call("append", ttl, req, |n, req| async move {
            n.raft.append_entries(req).await.map_err(|e| e.to_string())
        })
        .await
    }

    async fn vote(
        &mut self,
        req: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.raft_call("vote", option.soft_ttl(), req, |n, req| async move {
            n.raft.vote(req).await.map_err(|e| e.to_string())
        })
        .await
    }

    async fn pre_vote(
        &mut self,
        req: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.raft_call("pre_vote", option.soft_ttl(), req, |n, req| async move {
            n.raft.pre_vote(req).await.map_err(|e| e.to_string())
        })
        .await
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.raft_call("transfer", option.soft_ttl(), req, |n, req| async move {
            n.raft
                .handle_transfer_leader(req)
                .await
                .map_err(|e| e.to_string())
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
        let (meta, data) = (snapshot.meta, snapshot.snapshot.into_inner());
        let send = self.fabric.call(
            "snapshot",
            self.from,
            self.target,
            Duration::from_secs(5),
            (vote, meta, data),
            |n, (vote, meta, data)| async move {
                let s = Snapshot {
                    meta,
                    snapshot: Cursor::new(data),
                };
                n.raft
                    .install_full_snapshot(vote, s)
                    .await
                    .map_err(|e| e.to_string())
            },
        );
        tokio::pin!(cancel);
        let r = tokio::select! {
            biased;
            closed = &mut cancel => return Err(StreamingError::Closed(closed)),
            r = send => r,
        };
        match r {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => Err(StreamingError::Unreachable(Unreachable::from_string(e))),
            Err(f) => Err(StreamingError::Network(NetworkError::from_string(
                f.to_string(),
            ))),
        }
    }
}
