//! A scheduler replica: storage, Raft, the RPC listener and cluster formation, wired together.
//!
//! [`Replica::start`] opens the data directory (checking that it belongs to this node and
//! cluster), starts Raft on the sled stores, binds the listener, and spawns cluster formation
//! ([`formation`]). Connections are accepted by [`Replica::serve`], which runs the handshake and
//! then serves [`crate::rpc::FleetService`] ([`service`]). Writes go through the [`crate::raft::proposer`].
//!
//! Shutdown ([`Replica::shutdown`]): a leader first hands leadership to the most up-to-date
//! voter, then Raft is shut down and the database flushed.
//!
//! Bounds: connections are admitted per role and per peer address ([`admission`]: handshaking,
//! clients, workers and replicas each have their own share, idle clients are closed), and each
//! connection runs at most [`MAX_REQUESTS_PER_CONNECTION`] requests concurrently. The process
//! raises its open-file limit to what the bounds need ([`raise_open_file_limit`]).

pub mod admission;
pub mod backup;
pub mod data_dir;
pub mod formation;
pub mod live_output;
pub mod output_calls;
pub mod recover;
pub mod schedule_calls;
pub mod service;
pub mod worker_calls;
pub mod workflow_calls;

use openraft::async_runtime::WatchReceiver;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::StreamExt;
use tarpc::server::{BaseChannel, Channel};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::Instrument;

use crate::config::Config;
use crate::raft::log_store::{Identity, LogStore};
use crate::raft::network::NetworkFactory;
use crate::raft::state_machine_store::StateMachineStore;
use crate::raft::{flusher::Flusher, NodeId, Raft};
use crate::rpc::handshake::{self, Hello, HelloReply};
use crate::rpc::peer::{LocalIdentity, PeerPool};
use crate::rpc::{FleetService, Role};

/// How often client connections idle past [`admission::Limits::client_idle_ms`] are closed.
const IDLE_SWEEP_EVERY: Duration = Duration::from_secs(5);
pub const MAX_REQUESTS_PER_CONNECTION: usize = 256;

/// A snapshot being received in chunks.
pub(crate) struct IncomingSnapshot {
    transfer_id: u64,
    buf: Vec<u8>,
}

/// One running replica.
pub struct Replica {
    pub id: NodeId,
    pub addr: String,
    pub config: Config,
    pub raft: Raft,
    pub sm: StateMachineStore,
    pub log: LogStore,
    pub identity: Arc<LocalIdentity>,
    pub pool: PeerPool,
    pub(crate) proposer: crate::raft::proposer::Proposer,
    pub scheduler: Arc<crate::scheduler::Scheduler>,
    /// The replica's clock: every time it reads (see `clock`).
    pub clock: crate::clock::Clock,
    /// The replica's random source (see `random`).
    pub random: crate::random::Random,
    /// Fired by [`Replica::shutdown`]: the replica's own loops return.
    pub(crate) stopping: crate::shutdown::Trigger,
    pub health: Arc<crate::health::monitor::Health>,
    /// What the health module works with (its monitor, `/health`, the `health` RPC).
    pub health_cx: Arc<crate::health::monitor::HealthContext>,
    /// Whether the leader this replica follows looks dead (its connection closed).
    pub(crate) leader_loss: crate::raft::leader_loss::LeaderLoss,
    pub(crate) incoming_snapshot: tokio::sync::Mutex<Option<IncomingSnapshot>>,
    /// The backup this replica serves as leader, between its pieces.
    pub(crate) backups: backup::BackupCache,
    /// Running attempts' live output streamed to this replica (soft state).
    pub(crate) live_output: Mutex<live_output::LiveOutput>,
    /// Set to true to stop the process (after `leave`, or on a fatal formation error).
    pub stop: watch::Sender<Option<String>>,
    started_at: Instant,
    shutting_down: Mutex<bool>,
    /// Held while the process runs: the data directory is this replica's alone.
    _data_lock: crate::pidlock::PidLock,
}

impl Replica {
    /// Opens the data directory, starts Raft and the listener, and begins cluster formation.
    pub async fn start(config: Config) -> anyhow::Result<Arc<Replica>> {
        Self::start_restoring(config, None).await
    }

    /// [`Replica::start`], first restoring the backup `restore` (if given) into the empty data
    /// directory as a new one-node cluster ([`backup::restore_into`]).
    pub async fn start_restoring(
        config: Config,
        restore: Option<&std::path::Path>,
    ) -> anyhow::Result<Arc<Replica>> {
        config.validate()?;
        let data_dir = config.node.data_dir.clone();
        // Before anything writes to the directory: a newer fleet's data is left untouched.
        let format = data_dir::check(&data_dir)?;
        if let Some(file) = restore {
            check_restore(&config, file, format)?;
        }
        std::fs::create_dir_all(&data_dir)
            .with_context(|| format!("cannot create data directory {}", data_dir.display()))?;
        raise_open_file_limit();
        let (data_lock, db) = open_data_dir(&data_dir)?;
        data_dir::stamp(&data_dir, format).with_context(|| {
            format!(
                "cannot record the format in data directory {}",
                data_dir.display()
            )
        })?;
        let clock = crate::clock::Clock::system();
        let random = crate::random::Random::from_os();
        let health = Arc::new(crate::health::monitor::Health::new(
            config.fault_injection.enabled,
            clock.clone(),
        ));
        if config.fault_injection.enabled {
            tracing::warn!(
                "fault injection is enabled ([fault_injection] enabled = true): `fleet fault` can \
                 stall this replica; never enable it in production"
            );
        }
        let flusher = Flusher::start(
            db.clone(),
            &data_dir.join("db"),
            health.faults.storage.clone(),
        )
        .map_err(|e| anyhow::anyhow!("cannot start the fsync thread: {e}"))?;
        let log = LogStore::open(db, flusher)?;

        let mut identity = load_identity(&log, &config, &random).await?;
        if let Some(file) = restore {
            let backup =
                backup::restore_into(file, &data_dir, identity.node_id, &config.advertise_addr())?;
            identity.cluster_id = Some(random.with(rand::Rng::random));
            log.save_identity(&identity).await?;
            tracing::warn!(
                backup = %file.display(),
                tasks = backup.state.all_tasks().count(),
                backup_index = backup.meta.last_log_id.map_or(0, |l| l.index()),
                cluster_id = %format!("{:032x}", identity.cluster_id.unwrap_or(0)),
                "restored a backup as a new one-node cluster; add replicas with fleet join"
            );
        }
        let id = identity.node_id;
        if config.node.id.is_none() {
            // A new node drew its id just now (`fleet join` records a configured one).
            tracing::Span::current().record("node", id);
        }
        crate::metrics::install(&config.metrics, id)?;
        let addr = config.advertise_addr();
        let local = Arc::new(
            LocalIdentity::new(
                Role::Replica,
                Some(id),
                identity.cluster_name.clone(),
                identity.cluster_id,
            )
            .with_auth_token(&config.node.auth_token),
        );
        let pool = PeerPool::new(local.clone());

        let (listener, http_listener) = bind(&config).await?;
        let sm = StateMachineStore::open(&data_dir)?;
        let raft_config = crate::raft::openraft_config(&identity.cluster_name, &config.raft)?;
        let network = NetworkFactory::new(
            pool.clone(),
            Duration::from_millis(config.raft.snapshot_chunk_timeout_ms),
            config.raft.election_timeout_max(),
        );
        let raft = Raft::new(id, raft_config, network, log.clone(), sm.clone())
            .await
            .map_err(|e| anyhow::anyhow!("cannot start raft: {e}"))?;
        let proposer = crate::raft::proposer::Proposer::start(raft.clone(), clock.clone());
        let (stop, _) = watch::channel(None);
        let (stopping, _) = crate::shutdown::channel();
        let scheduler = Arc::new(crate::scheduler::Scheduler::new(
            crate::scheduler::core::CoreConfig::from_config(&config),
        ));

        let live_output_cap = config.scheduler.live_output_bytes;
        let health_cx = Arc::new(crate::health::monitor::HealthContext {
            node_id: id,
            addr: addr.clone(),
            raft: raft.clone(),
            log: log.clone(),
            scheduler: scheduler.clone(),
            clock: clock.clone(),
            pool: pool.clone(),
            health: health.clone(),
            config: config.health.clone(),
            election_timeout_max: config.raft.election_timeout_max(),
            tick_ms: config.scheduler.tick_ms,
            worker_liveness_timeout_ms: config.scheduler.worker_liveness_timeout_ms,
        });
        let replica = Arc::new(Replica {
            id,
            addr,
            config,
            raft,
            sm,
            log,
            identity: local,
            pool,
            proposer,
            scheduler,
            clock,
            random,
            stopping,
            health,
            health_cx,
            leader_loss: Default::default(),
            incoming_snapshot: tokio::sync::Mutex::new(None),
            backups: Default::default(),
            live_output: Mutex::new(live_output::LiveOutput::new(live_output_cap)),
            stop,
            started_at: Instant::now(),
            shutting_down: Mutex::new(false),
            _data_lock: data_lock,
        });
        tracing::info!(
            node_id = id,
            listen = %replica.config.node.listen,
            advertise = %replica.addr,
            data_dir = %data_dir.display(),
            "replica started"
        );
        replica.spawn_services(listener, http_listener)?;
        Ok(replica)
    }

    /// Starts what serves and drives this replica: the RPC and HTTP listeners, the health
    /// monitor, the scheduling loop, the ticker, the metrics sampler and cluster formation.
    fn spawn_services(
        self: &Arc<Self>,
        listener: TcpListener,
        http_listener: Option<TcpListener>,
    ) -> anyhow::Result<()> {
        tokio::spawn(self.clone().serve(listener).in_current_span());
        if let Some(l) = http_listener {
            let addr = l.local_addr()?;
            self.health.set_http_addr(addr);
            tracing::info!(%addr, "serving /health over HTTP");
            let cx = self.health_cx.clone();
            tokio::spawn(crate::health::http::serve(cx, l).in_current_span());
        }
        crate::health::monitor::spawn(self.health_cx.clone());
        tokio::spawn(self.clone().watch_for_fatal().in_current_span());
        tokio::spawn(crate::scheduler::scheduling_loop::run(self.loop_context()).in_current_span());
        tokio::spawn(crate::scheduler::ticker::run(self.loop_context()).in_current_span());
        tokio::spawn(crate::metrics::sampler::run(self.sampler_context()).in_current_span());
        let r = self.clone();
        tokio::spawn(
            async move {
                if let Err(e) = formation::run(r.clone()).await {
                    let _ = r.stop.send(Some(format!("{e:#}")));
                }
            }
            .in_current_span(),
        );
        Ok(())
    }

    /// What the scheduling loop and the ticker need of this replica.
    pub fn loop_context(&self) -> crate::scheduler::scheduling_loop::LoopContext {
        crate::scheduler::scheduling_loop::LoopContext {
            node: self.id,
            raft: self.raft.clone(),
            sm: self.sm.clone(),
            proposer: self.proposer.clone(),
            scheduler: self.scheduler.clone(),
            clock: self.clock.clone(),
            random: self.random.clone(),
            stall: self.health.faults.scheduler.clone(),
            shutdown: self.stopping.subscribe(),
        }
    }

    /// What the metrics sampler needs of this replica.
    pub fn sampler_context(&self) -> crate::metrics::sampler::SamplerContext {
        crate::metrics::sampler::SamplerContext {
            node_id: self.id,
            raft: self.raft.clone(),
            identity: self.identity.clone(),
            scheduler: self.scheduler.clone(),
            sm: self.sm.clone(),
            clock: self.clock.clone(),
            stalled: self.health.stalled_watch(),
            stop: self.stop.subscribe(),
            interval: Duration::from_millis(self.config.metrics.interval_ms),
            stall_threshold_ms: self.config.health.stall_threshold_ms,
            worker_liveness_timeout_ms: self.config.scheduler.worker_liveness_timeout_ms,
        }
    }

    /// The scheduling loop's progress counter and a one-line status (for systemd).
    pub fn progress_status(&self) -> (u64, String) {
        let (iterations, _) = self.scheduler.progress();
        let m = self.raft.metrics().borrow_watched().clone();
        let applied = m.last_applied.map_or(0, |l| l.index);
        let role = match m.current_leader {
            Some(l) if l == self.id => "leader".to_string(),
            Some(l) => format!("follower of node {l}"),
            None => "no leader known".to_string(),
        };
        let stalled = if self.health.is_stalled() {
            "; SCHEDULING LOOP STALLED (see fleet health)"
        } else {
            ""
        };
        (
            iterations,
            format!(
                "{role}, term {}, applied index {applied}, scheduling loop iterations \
                 {iterations}{stalled}",
                m.current_term
            ),
        )
    }

    /// A `Fatal` error means the Raft core stopped and will not recover: take the node out of
    /// service (the process exits non-zero; systemd restarts it from its data directory).
    async fn watch_for_fatal(self: Arc<Self>) {
        let mut rx = self.raft.metrics();
        loop {
            let fatal = rx.borrow_watched().running_state.clone().err();
            if let Some(f) = fatal {
                if !*self.shutting_down.lock().expect("shutdown lock") {
                    tracing::error!(error = %f, "raft stopped with a fatal error; stopping the replica");
                    let _ = self
                        .stop
                        .send(Some(format!("raft stopped with a fatal error: {f}")));
                }
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Accepts connections until the process exits. Admission ([`admission`]) bounds them per
    /// role and per peer address; the kernel's accept queue is always drained, so a flood of
    /// connections makes room among its own kind instead of waiting in front of everyone.
    async fn serve(self: Arc<Self>, listener: TcpListener) {
        let admission = admission::Admission::new(admission::Limits::default(), self.clock.clone());
        let sweeper = admission.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(IDLE_SWEEP_EVERY).await;
                sweeper.close_idle();
            }
        });
        loop {
            let (stream, remote) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors, most likely: pace the retries.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let ticket = admission.open(remote.ip());
            let me = self.clone();
            let admission = admission.clone();
            tokio::spawn(
                async move {
                    let closed = ticket.closed.clone();
                    tokio::select! {
                        _ = me.serve_connection(stream, remote, &admission, &ticket) => {}
                        _ = closed.notified() => {
                            tracing::debug!(%remote, "connection closed to make room, or idle");
                        }
                    }
                }
                .in_current_span(),
            );
        }
    }

    async fn serve_connection(
        self: Arc<Self>,
        mut stream: TcpStream,
        remote: SocketAddr,
        admission: &Arc<admission::Admission>,
        ticket: &admission::Ticket,
    ) {
        let _ = stream.set_nodelay(true);
        let received = handshake::read_frame::<Hello>(&mut stream)
            .await
            .and_then(|r| handshake::negotiate(r.oldest, r.trailer).map(|v| (r.body, v)));
        let (hello, protocol) = match received {
            Ok(h) => h,
            Err(e @ handshake::HandshakeError::Version(..)) => {
                tracing::warn!(%remote, error = %e, "refused connection: incompatible protocol version");
                let reason = format!("incompatible protocol version: {e}");
                let reply = HelloReply::Rejected { reason };
                let _ =
                    handshake::write_frame(&mut stream, &reply, handshake::PROTOCOL_VERSION).await;
                return;
            }
            Err(e) => {
                tracing::warn!(%remote, error = %e, "refused connection: bad handshake");
                return;
            }
        };
        let verdict = match self.accept_hello(&hello).await {
            Ok(()) => admission.promote(ticket, hello.role),
            Err(reason) => Err(reason),
        };
        let reply = match verdict {
            Ok(()) => HelloReply::Accepted {
                node_id: self.id,
                cluster_id: self.identity.cluster_id(),
            },
            Err(reason) => {
                tracing::warn!(%remote, ?hello.from_node, %reason, "refused connection");
                HelloReply::Rejected { reason }
            }
        };
        let accepted = matches!(reply, HelloReply::Accepted { .. });
        if handshake::write_frame(&mut stream, &reply, protocol)
            .await
            .is_err()
            || !accepted
        {
            return;
        }
        let transport = crate::rpc::codec::transport(stream, remote.to_string());
        tracing::debug!(%remote, protocol, "connection accepted");
        let conn = service::Connection {
            replica: self.clone(),
            role: hello.role,
            remote,
        };
        let id = ticket.id;
        BaseChannel::with_defaults(transport)
            .max_concurrent_requests(MAX_REQUESTS_PER_CONNECTION)
            .execute(conn.serve())
            .for_each_concurrent(None, |response| async move {
                // In-flight requests keep a client connection from counting as idle.
                admission.request_started(id);
                response.await;
                admission.request_ended(id);
            })
            .await;
        if let (Role::Replica, Some(from)) = (hello.role, hello.from_node) {
            self.replica_connection_closed(from);
        }
    }

    /// A connection from replica `from` ended: if `from` is the leader, it may have died; stand
    /// for election when its lease ends (see [`crate::raft::leader_loss`]).
    fn replica_connection_closed(self: Arc<Self>, from: NodeId) {
        use crate::raft::leader_loss::{View, RETRY};
        let m = self.raft.metrics().borrow_watched().clone();
        let view = View {
            me: self.id,
            from,
            leader: m.current_leader,
            voters: m.membership_config.membership().voter_ids().collect(),
            lease: self.config.raft.election_timeout_max(),
            election_timeout_min: self.config.raft.election_timeout_min(),
        };
        let Some(c) = self.leader_loss.connection_closed(&view, Instant::now()) else {
            return;
        };
        tracing::info!(
            leader = from,
            in_ms = c.at.saturating_duration_since(Instant::now()).as_millis() as u64,
            "the leader's connection closed: standing for election when its lease ends"
        );
        tokio::spawn(
            async move {
                tokio::time::sleep_until(c.at.into()).await;
                // A protocol timer: retried while another voter may still hold the lease.
                while Instant::now() < c.until {
                    let m = self.raft.metrics().borrow_watched().clone();
                    if !self.leader_loss.is_suspected(from)
                        || m.current_leader != Some(from)
                        || !self.health.standing_for_election()
                    {
                        return;
                    }
                    if self.raft.trigger().elect(true).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(RETRY).await;
                }
            }
            .in_current_span(),
        );
    }

    /// Decides whether to talk to the caller. Adopts the caller's cluster id when this node
    /// has none yet (it is new, and the caller is a member of the cluster it is joining).
    async fn accept_hello(&self, hello: &Hello) -> Result<(), String> {
        if !tokens_match(self.identity.auth_token(), &hello.auth_token) {
            return Err(if hello.auth_token.is_empty() {
                "this cluster requires an auth token: set node.auth_token (or auth_token_file, \
                 auth_token_cmd, FLEET__NODE__AUTH_TOKEN) to the cluster's token"
                    .to_string()
            } else {
                "the auth token does not match this cluster's node.auth_token".to_string()
            });
        }
        if hello.cluster_name != self.identity.cluster_name {
            return Err(format!(
                "the caller belongs to cluster {:?}, this node (node {}) to cluster {:?}",
                hello.cluster_name, self.id, self.identity.cluster_name
            ));
        }
        if let Some(expect) = hello.expect_node {
            if expect != self.id {
                return Err(format!("this is node {}, not node {expect}", self.id));
            }
        }
        match (hello.cluster_id, self.identity.cluster_id()) {
            (Some(theirs), Some(ours)) if theirs != ours => Err(format!(
                "cluster id mismatch: the caller (node {:?}) belongs to cluster {theirs:032x}, \
                 this node (node {}) to cluster {ours:032x}; a data directory from another \
                 cluster?",
                hello.from_node, self.id
            )),
            (Some(theirs), None) if hello.role == Role::Replica => self
                .adopt_cluster_id(theirs)
                .await
                .map_err(|e| e.to_string()),
            _ => Ok(()),
        }
    }

    /// Records the cluster this node now belongs to.
    pub async fn adopt_cluster_id(&self, cluster_id: u128) -> std::io::Result<()> {
        if self.identity.cluster_id().is_some() {
            return Ok(());
        }
        let identity = Identity {
            node_id: self.id,
            cluster_name: self.identity.cluster_name.clone(),
            cluster_id: Some(cluster_id),
        };
        self.log.save_identity(&identity).await?;
        self.identity.set_cluster_id(cluster_id);
        tracing::info!(cluster_id = %format!("{cluster_id:032x}"), "joined cluster");
        Ok(())
    }

    /// Stops the replica gracefully: a leader hands over leadership first.
    pub async fn shutdown(&self) {
        {
            let mut s = self.shutting_down.lock().expect("shutdown lock");
            if *s {
                return;
            }
            *s = true;
        }
        if self.raft.is_leader() {
            self.hand_over_leadership(Duration::from_secs(3), &Default::default())
                .await;
        }
        self.stopping.fire();
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
        tracing::info!(
            uptime_s = self.started_at.elapsed().as_secs(),
            "replica stopped"
        );
    }

    /// Hands leadership to another voter (see [`crate::raft::hand_over_leadership`]).
    pub async fn hand_over_leadership(
        &self,
        wait: Duration,
        prefer: &std::collections::BTreeSet<NodeId>,
    ) -> bool {
        crate::raft::hand_over_leadership(&self.raft, self.id, wait, prefer).await
    }
}

/// Whether a caller's token is acceptable: any token when this node has none, else the same
/// bytes, compared in time independent of where they differ.
fn tokens_match(ours: &str, theirs: &str) -> bool {
    if ours.is_empty() {
        return true;
    }
    let (a, b) = (ours.as_bytes(), theirs.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Raises the soft limit on open files to the hard limit (at most [`OPEN_FILES_WANTED`]): the
/// connection bounds of [`admission::Limits`] need more than the usual soft default of 1024,
/// and without it a flood of connections would make `accept` fail for everyone.
fn raise_open_file_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        let want = lim.rlim_max.min(OPEN_FILES_WANTED);
        if lim.rlim_cur < want {
            let before = lim.rlim_cur;
            lim.rlim_cur = want;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
                tracing::debug!(before, after = want, "raised the open-file limit");
            }
        }
        if lim.rlim_cur < OPEN_FILES_NEEDED {
            tracing::warn!(
                limit = lim.rlim_cur,
                needed = OPEN_FILES_NEEDED,
                "the open-file limit is below what the connection bounds need; raise LimitNOFILE"
            );
        }
    }
}

/// The open files the connection bounds can take, plus storage and margin.
const OPEN_FILES_NEEDED: u64 = admission::Limits::DEFAULT.total() as u64 + 256;
/// What the replica raises its soft limit to, when the hard limit allows.
const OPEN_FILES_WANTED: u64 = 65_536;

/// Refuses `--restore` into a directory that holds data or with flags that form a cluster.
fn check_restore(
    config: &Config,
    file: &std::path::Path,
    format: data_dir::Found,
) -> anyhow::Result<()> {
    if format != data_dir::Found::Empty {
        anyhow::bail!(
            "--restore needs an empty data directory, and {} holds data; give a new --data-dir",
            config.node.data_dir.display()
        );
    }
    if config.node.bootstrap_expect.is_some() {
        anyhow::bail!(
            "--restore starts a one-node cluster from the backup; leave out --bootstrap-expect \
             and join the other replicas to it afterwards"
        );
    }
    // Checked before anything is created, so a bad file leaves no data directory behind.
    backup::read_backup(file)?;
    Ok(())
}

/// Locks the data directory for this process and opens its database.
fn open_data_dir(
    data_dir: &std::path::Path,
) -> anyhow::Result<(crate::pidlock::PidLock, sled::Db)> {
    // Before sled: a second process on this directory is told who holds it.
    let data_lock = crate::pidlock::PidLock::acquire(&data_dir.join("fleet.pid")).map_err(|e| {
        anyhow::anyhow!(
            "data directory {} is {e}; stop that process first",
            data_dir.display()
        )
    })?;
    let db = sled::Config::new()
        .path(data_dir.join("db"))
        .open()
        .map_err(|e| match e {
            sled::Error::Io(io)
                if io.kind() == std::io::ErrorKind::WouldBlock
                    || io.to_string().contains("lock") =>
            {
                anyhow::anyhow!(
                    "data directory {} is in use by another fleet process ({io})",
                    data_dir.display()
                )
            }
            other => anyhow::anyhow!(
                "cannot open the database in {}: {other}",
                data_dir.display()
            ),
        })?;
    Ok((data_lock, db))
}

/// This node's identity from its data directory, checked against the configuration; a new
/// node's is drawn and saved (fsynced) here.
async fn load_identity(
    log: &LogStore,
    config: &Config,
    random: &crate::random::Random,
) -> anyhow::Result<Identity> {
    let data_dir = &config.node.data_dir;
    let identity = match log.identity()? {
        Some(stored) => {
            if let Some(id) = config.node.id {
                if id != stored.node_id {
                    anyhow::bail!(
                        "data directory {} belongs to node {}, but node id {id} was given; \
                         use --node-id {} or an empty data directory",
                        data_dir.display(),
                        stored.node_id,
                        stored.node_id
                    );
                }
            }
            if stored.cluster_name != config.node.cluster_name {
                anyhow::bail!(
                    "data directory {} belongs to cluster {:?}, but cluster name {:?} was \
                     given; use an empty data directory for a new cluster",
                    data_dir.display(),
                    stored.cluster_name,
                    config.node.cluster_name
                );
            }
            stored
        }
        None => {
            // Ids up to 2^53 survive JSON tools that read numbers as doubles.
            let node_id = config
                .node
                .id
                .unwrap_or_else(|| random.range(1..(1u64 << 53)));
            let fresh = Identity {
                node_id,
                cluster_name: config.node.cluster_name.clone(),
                cluster_id: None,
            };
            log.save_identity(&fresh).await?;
            fresh
        }
    };
    Ok(identity)
}

/// The RPC listener and, unless turned off, the HTTP one.
async fn bind(config: &Config) -> anyhow::Result<(TcpListener, Option<TcpListener>)> {
    let listener = TcpListener::bind(&config.node.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.node.listen))?;
    if config.node.http_listen.is_empty() {
        return Ok((listener, None));
    }
    let http = TcpListener::bind(&config.node.http_listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen for HTTP on {} (node.http_listen, --http-listen; port 0 picks a \
                 free port, an empty value turns HTTP off)",
                config.node.http_listen
            )
        })?;
    Ok((listener, Some(http)))
}
