//! The client side: finds a replica among `--peers` and retries through elections.
//!
//! [`Client::call`] runs one RPC and retries it, until the client's deadline, when the replica
//! says it is not the leader (going to the leader it names), when the cluster is unavailable
//! (an election), or when the connection fails (trying the next address). Errors that a retry
//! cannot fix (a bad argument, not found) return at once. If no address answers at all within
//! [`NOTHING_REACHABLE_GIVE_UP`], the call fails with each address's reason instead of waiting
//! out the whole deadline.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::anyhow;

use crate::error::Error;
use crate::rpc::peer::{dial, is_transport_failure, LocalIdentity};
use crate::rpc::{context_with_timeout, FleetServiceClient, Role};

/// How long to keep trying when no address has answered even once.
pub const NOTHING_REACHABLE_GIVE_UP: Duration = Duration::from_secs(3);
/// How long a dial may go unanswered before the next address is dialled as well.
pub const DIAL_STAGGER: Duration = Duration::from_millis(250);
const RETRY_PAUSE_MIN: Duration = Duration::from_millis(50);
const RETRY_PAUSE_MAX: Duration = Duration::from_millis(500);

pub struct Client {
    peers: Vec<String>,
    timeout: Duration,
    /// The longest one attempt against one replica may take (the whole call's deadline when
    /// unset). A replica that does not answer in time (frozen, partitioned) is left for the next.
    attempt_timeout: Option<Duration>,
    /// Where the next connection goes first.
    prefer: Option<String>,
    identity: Arc<LocalIdentity>,
    current: Option<(String, FleetServiceClient)>,
    next_peer: usize,
    /// The oldest protocol version the calls of this client need (a replica that negotiates
    /// an older one is not sent them).
    needs: u16,
}

impl Client {
    pub fn new(
        peers: Vec<String>,
        cluster_name: &str,
        timeout: Duration,
    ) -> anyhow::Result<Client> {
        if peers.is_empty() {
            anyhow::bail!(
                "no replica address given: use --peers host:port[,host:port...], set FLEET_PEERS, \
                 or set [client] peers in the config file"
            );
        }
        Ok(Client {
            peers,
            timeout,
            identity: Arc::new(LocalIdentity::new(
                Role::Client,
                None,
                cluster_name.into(),
                None,
            )),
            current: None,
            next_peer: 0,
            attempt_timeout: None,
            prefer: None,
            needs: crate::rpc::handshake::MIN_PROTOCOL_VERSION,
        })
    }

    /// Introduces this client as `role` in every handshake (a worker says [`Role::Worker`]).
    pub fn with_role(mut self, role: Role) -> Client {
        self.identity = Arc::new(
            LocalIdentity::new(role, None, self.identity.cluster_name.clone(), None)
                .with_auth_token(self.identity.auth_token()),
        );
        self
    }

    /// Presents `token` (`node.auth_token`) in every handshake.
    pub fn with_auth_token(mut self, token: &str) -> Client {
        self.identity = Arc::new(
            LocalIdentity::new(
                self.identity.role,
                None,
                self.identity.cluster_name.clone(),
                None,
            )
            .with_auth_token(token),
        );
        self
    }

    /// Bounds each attempt against one replica (see [`Client::call`]).
    pub fn with_attempt_timeout(mut self, timeout: Duration) -> Client {
        self.attempt_timeout = Some(timeout);
        self
    }

    /// Makes calls only over connections that negotiated at least protocol `version` (for calls
    /// that version added, which an older replica cannot decode).
    pub fn with_min_protocol(mut self, version: u16) -> Client {
        self.needs = version;
        self
    }

    /// Drops the connection; the next call connects to `prefer` first, if given.
    pub fn reconnect(&mut self, prefer: Option<String>) {
        self.current = None;
        self.prefer = prefer;
    }

    /// The address of the replica this client talks to now, if connected.
    pub fn connected_to(&self) -> Option<&str> {
        self.current.as_ref().map(|(a, _)| a.as_str())
    }

    /// Connects to `prefer`, then the peers in turn. Dials overlap: when an address has not
    /// answered within [`DIAL_STAGGER`], the next one is dialled too, and the first to complete
    /// the handshake wins; so a frozen replica (whose kernel still accepts connections) costs a
    /// fraction of a second, not a handshake timeout.
    async fn connect(
        &mut self,
        prefer: Option<&str>,
        errors: &mut Vec<String>,
    ) -> Option<FleetServiceClient> {
        use futures::stream::{FuturesUnordered, StreamExt};
        if let Some((_, c)) = &self.current {
            return Some(c.clone());
        }
        let mut order: Vec<String> = Vec::new();
        if let Some(p) = prefer {
            order.push(p.to_string());
        }
        for i in 0..self.peers.len() {
            let p = &self.peers[(self.next_peer + i) % self.peers.len()];
            if !order.contains(p) {
                order.push(p.clone());
            }
        }
        let identity = self.identity.clone();
        let mut order = order.into_iter();
        let mut dials = FuturesUnordered::new();
        loop {
            if let Some(addr) = order.next() {
                let identity = identity.clone();
                dials.push(async move {
                    let r = dial(&addr, &identity, None).await;
                    (addr, r)
                });
            }
            if dials.is_empty() {
                return None;
            }
            let more = !order.as_slice().is_empty();
            tokio::select! {
                Some((addr, r)) = dials.next() => match r {
                    Ok(c) if c.protocol < self.needs => errors.push(format!(
                        "{addr} speaks fleet protocol {}, and this call needs {}: upgrade that \
                         replica first",
                        c.protocol, self.needs
                    )),
                    Ok(c) => {
                        self.current = Some((addr, c.client.clone()));
                        return Some(c.client);
                    }
                    Err(e) => errors.push(e.to_string()),
                },
                _ = tokio::time::sleep(DIAL_STAGGER), if more => {}
            }
        }
    }

    /// Runs `f` against a replica, retrying as the module docs describe.
    pub async fn call<T, F, Fut>(&mut self, f: F) -> anyhow::Result<T>
    where
        F: Fn(FleetServiceClient, tarpc::context::Context) -> Fut,
        Fut: Future<Output = Result<Result<T, Error>, tarpc::client::RpcError>>,
    {
        let started = Instant::now();
        let deadline = started + self.timeout;
        let mut prefer: Option<String> = self.prefer.take();
        let mut ever_connected = false;
        let mut last_error: String;
        let mut pause = RETRY_PAUSE_MIN;
        // Retries made at once in a row: a redirect or a broken connection moves to another
        // replica without a pause, but never more times in a row than there are replicas
        // (two replicas with stale views must not bounce a call between them in a busy loop).
        let mut quick = 0usize;
        // Replicas passed over because their protocol is too old for this call: said at the
        // end, since the replicas that do answer only point back at them.
        let mut too_old: Option<String> = None;
        loop {
            // Whether the next attempt goes to another replica at once (no pause).
            let mut elsewhere = false;
            let mut dial_errors = Vec::new();
            let connected = self.connect(prefer.as_deref(), &mut dial_errors).await;
            if let Some(e) = dial_errors
                .iter()
                .find(|e| e.contains("speaks fleet protocol"))
            {
                too_old = Some(e.clone());
            }
            match connected {
                None => {
                    dial_errors.dedup();
                    last_error = format!("no fleet replica reachable ({})", dial_errors.join("; "));
                    if !ever_connected && started.elapsed() >= NOTHING_REACHABLE_GIVE_UP {
                        return Err(anyhow!("{last_error}"));
                    }
                }
                Some(client) => {
                    ever_connected = true;
                    let remaining = deadline.saturating_duration_since(Instant::now());
                    let attempt = self.attempt_timeout.map_or(remaining, |a| a.min(remaining));
                    match f(
                        client,
                        context_with_timeout(attempt.max(Duration::from_millis(1))),
                    )
                    .await
                    {
                        Ok(Ok(v)) => return Ok(v),
                        Ok(Err(e)) if e.is_retryable() => {
                            if let Error::NotLeader {
                                leader_addr: Some(addr),
                                ..
                            } = &e
                            {
                                if self.connected_to() != Some(addr) {
                                    prefer = Some(addr.clone());
                                    self.current = None;
                                }
                                // A redirect, or the contacted replica naming itself (it has
                                // just been elected): retry at once.
                                elsewhere = true;
                            }
                            last_error = e.to_string();
                        }
                        Ok(Err(e)) => return Err(e.into()),
                        Err(e) => {
                            let addr = self.connected_to().unwrap_or("?").to_string();
                            last_error = format!("{addr}: {e}");
                            // A broken connection, or a replica that did not answer in time
                            // (frozen, cut off): the next attempt goes to the next address.
                            if is_transport_failure(&e)
                                || matches!(e, tarpc::client::RpcError::DeadlineExceeded)
                            {
                                self.current = None;
                                self.next_peer = (self.next_peer + 1) % self.peers.len();
                                elsewhere = true;
                            }
                        }
                    }
                }
            }
            if Instant::now() + pause >= deadline {
                let why = too_old
                    .filter(|e| !last_error.contains(e.as_str()))
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default();
                return Err(anyhow!(
                    "gave up after {:.1}s: {last_error}{why}",
                    started.elapsed().as_secs_f64()
                ));
            }
            if elsewhere && quick < self.peers.len() {
                quick += 1;
            } else {
                quick = 0;
                // A retry pause after a failure (an election, a dead replica), not
                // synchronization. A redirect, or a first failure of one replica, goes on at once.
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(RETRY_PAUSE_MAX);
            }
        }
    }
}
