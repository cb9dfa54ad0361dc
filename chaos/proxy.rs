//! The fault-injecting TCP proxy: one listener in front of every replica.
//!
//! Every replica advertises its proxy's address (`--advertise`), so every connection to it —
//! from another replica, a worker, or the harness's own client — passes through the proxy. The
//! proxy reads the fleet handshake that opens each connection to learn who is calling
//! ([`Endpoint`]: replica N, a worker, or a client), then forwards bytes in both directions
//! under the current [`Rules`]:
//!
//! - **blocked** `(from, to)`: bytes from `from` to `to` are held, not dropped, like packets a
//!   partitioned network keeps losing while TCP retransmits. A new connection's handshake is
//!   held too, so the caller times out as it would on a real partition. When the partition
//!   heals, held bytes flow again; callers that gave up meanwhile have closed their side.
//!   Blocking one direction only is one-way loss.
//! - **delay** `(from, to)`: each chunk is forwarded that many milliseconds after it was read.
//!
//! The harness changes the rules with [`Net::set`]; pumps wait on a watch channel, so a heal
//! takes effect at once. Bound: each direction of a connection holds at most
//! [`PUMP_QUEUE_CHUNKS`] chunks of up to [`CHUNK_BYTES`]; beyond that the proxy stops reading
//! and TCP's own flow control pushes back on the sender.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use fleet::rpc::handshake::{Hello, MAGIC, MAX_HELLO_BYTES};
use fleet::rpc::Role;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

/// Chunks one direction of a connection may hold (delayed or blocked) before the proxy stops
/// reading from the sender.
pub const PUMP_QUEUE_CHUNKS: usize = 256;
/// The largest chunk read at once.
pub const CHUNK_BYTES: usize = 64 * 1024;
/// How long the proxy waits for a new connection's handshake.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Who is at one end of a proxied connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Endpoint {
    Replica(u64),
    /// Any `fleet worker` (the handshake names the role, not which worker).
    Worker,
    /// Anything else: the harness's client, a CLI.
    Client,
}

/// What the network does now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rules {
    blocked: BTreeSet<(Endpoint, Endpoint)>,
    delay_ms: BTreeMap<(Endpoint, Endpoint), u64>,
    /// Replicas whose incoming connections are cut (both directions of every connection
    /// through their proxy), while the connections they open to others work.
    inbound_cut: BTreeSet<u64>,
}

impl Rules {
    /// Holds every byte from `from` to `to`.
    pub fn block(&mut self, from: Endpoint, to: Endpoint) {
        self.blocked.insert((from, to));
    }

    /// Holds every byte between `a` and `b`, both ways.
    pub fn cut(&mut self, a: Endpoint, b: Endpoint) {
        self.block(a, b);
        self.block(b, a);
    }

    /// Holds every byte of every connection to replica `id` (opened by anyone), as a firewall
    /// dropping its port's incoming traffic does; its own outgoing connections are untouched.
    pub fn cut_inbound(&mut self, id: u64) {
        self.inbound_cut.insert(id);
    }

    /// Delays every chunk from `from` to `to`.
    pub fn delay(&mut self, from: Endpoint, to: Endpoint, ms: u64) {
        self.delay_ms.insert((from, to), ms);
    }

    fn is_blocked(&self, from: Endpoint, to: Endpoint) -> bool {
        self.blocked.contains(&(from, to))
    }

    fn delay_of(&self, from: Endpoint, to: Endpoint) -> Duration {
        Duration::from_millis(self.delay_ms.get(&(from, to)).copied().unwrap_or(0))
    }
}

/// The proxies of one run and their shared rules.
pub struct Net {
    rules: watch::Sender<Rules>,
}

impl Net {
    pub fn new() -> Net {
        Net {
            rules: watch::Sender::new(Rules::default()),
        }
    }

    /// Replaces the rules (an empty [`Rules`] heals everything).
    pub fn set(&self, rules: Rules) {
        self.rules.send_replace(rules);
    }

    pub fn heal(&self) {
        self.set(Rules::default());
    }

    /// Starts the proxy in front of replica `id`, which listens on `real`; returns the
    /// proxy's address (what the replica advertises).
    pub async fn front(&self, id: u64, real: String) -> std::io::Result<String> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?.to_string();
        let rules = self.rules.subscribe();
        tokio::spawn(async move {
            loop {
                let Ok((conn, _)) = listener.accept().await else {
                    continue;
                };
                let rules = rules.clone();
                let real = real.clone();
                tokio::spawn(async move {
                    let _ = proxy_connection(conn, id, &real, rules).await;
                });
            }
        });
        Ok(addr)
    }
}

/// Reads the caller's handshake, dials the replica and pumps both directions.
async fn proxy_connection(
    mut conn: TcpStream,
    id: u64,
    real: &str,
    rules: watch::Receiver<Rules>,
) -> std::io::Result<()> {
    conn.set_nodelay(true)?;
    let (from, first) = tokio::time::timeout(HELLO_TIMEOUT, read_hello(&mut conn))
        .await
        .map_err(|_| std::io::Error::other("no handshake"))??;
    // A replica that is down refuses the connection: the caller sees its connection closed.
    let upstream = TcpStream::connect(real).await?;
    upstream.set_nodelay(true)?;
    let to = Endpoint::Replica(id);
    let (cr, cw) = conn.into_split();
    let (ur, uw) = upstream.into_split();
    let up = tokio::spawn(pump(cr, uw, from, to, id, first, rules.clone()));
    let down = tokio::spawn(pump(ur, cw, to, from, id, Vec::new(), rules));
    let _ = up.await;
    let _ = down.await;
    Ok(())
}

/// The handshake frame's bytes (forwarded as they are) and who sent it. Bytes that are not a
/// fleet handshake are forwarded as a client's, for the replica to refuse.
async fn read_hello(conn: &mut TcpStream) -> std::io::Result<(Endpoint, Vec<u8>)> {
    let mut head = [0u8; 12];
    conn.read_exact(&mut head).await?;
    if &head[..6] != MAGIC {
        return Ok((Endpoint::Client, head.to_vec()));
    }
    let len = u32::from_be_bytes(head[8..12].try_into().expect("4 bytes"));
    if len > MAX_HELLO_BYTES {
        return Ok((Endpoint::Client, head.to_vec()));
    }
    let mut frame = head.to_vec();
    frame.resize(12 + len as usize, 0);
    conn.read_exact(&mut frame[12..]).await?;
    let from = match bincode::serde::decode_from_slice::<Hello, _>(
        &frame[12..],
        bincode::config::standard(),
    ) {
        Ok((h, _)) => match (h.role, h.from_node) {
            (Role::Replica, Some(n)) => Endpoint::Replica(n),
            (Role::Worker, _) => Endpoint::Worker,
            _ => Endpoint::Client,
        },
        Err(_) => Endpoint::Client,
    };
    Ok((from, frame))
}

/// Forwards `r` to `w` (after `first`), delaying and holding chunks as the rules say.
async fn pump(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    from: Endpoint,
    to: Endpoint,
    via: u64,
    first: Vec<u8>,
    mut rules: watch::Receiver<Rules>,
) {
    let (tx, mut rx) = mpsc::channel::<(tokio::time::Instant, Vec<u8>)>(PUMP_QUEUE_CHUNKS);
    let reader_rules = rules.clone();
    let reader = tokio::spawn(async move {
        let delay = |rules: &watch::Receiver<Rules>| rules.borrow().delay_of(from, to);
        if !first.is_empty()
            && tx
                .send((tokio::time::Instant::now() + delay(&reader_rules), first))
                .await
                .is_err()
        {
            return;
        }
        let mut buf = vec![0u8; CHUNK_BYTES];
        loop {
            let n = match r.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let at = tokio::time::Instant::now() + delay(&reader_rules);
            if tx.send((at, buf[..n].to_vec())).await.is_err() {
                return;
            }
        }
    });
    while let Some((at, data)) = rx.recv().await {
        tokio::time::sleep_until(at).await;
        loop {
            let held = {
                let r = rules.borrow_and_update();
                r.is_blocked(from, to) || r.inbound_cut.contains(&via)
            };
            if !held {
                break;
            }
            if rules.changed().await.is_err() {
                return;
            }
        }
        if w.write_all(&data).await.is_err() {
            break;
        }
    }
    reader.abort();
    let _ = w.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A byte echo server; returns its address.
    async fn echo_server() -> String {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    fn worker_hello() -> Vec<u8> {
        let hello = Hello {
            cluster_name: "fleet".into(),
            cluster_id: None,
            role: Role::Worker,
            from_node: None,
            expect_node: None,
            auth_token: String::new(),
        };
        fleet::rpc::handshake::frame(&hello, fleet::rpc::handshake::PROTOCOL_VERSION).unwrap()
    }

    /// Real sockets on loopback: a blocked direction holds bytes until healed; nothing is lost
    /// or reordered.
    #[tokio::test]
    async fn blocked_bytes_are_held_until_the_partition_heals() {
        let net = Net::new();
        let front = net.front(1, echo_server().await).await.unwrap();
        let mut rules = Rules::default();
        rules.block(Endpoint::Worker, Endpoint::Replica(1));
        net.set(rules);
        let mut s = TcpStream::connect(&front).await.unwrap();
        let hello = worker_hello();
        s.write_all(&hello).await.unwrap();
        s.write_all(b"ping").await.unwrap();
        let mut buf = vec![0u8; hello.len() + 4];
        let held = tokio::time::timeout(Duration::from_millis(300), s.read_exact(&mut buf)).await;
        assert!(held.is_err(), "nothing crosses a partition");
        net.heal();
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut buf))
            .await
            .expect("healed")
            .unwrap();
        assert_eq!(&buf[hello.len()..], b"ping");
        assert_eq!(&buf[..hello.len()], &hello[..]);
    }

    #[tokio::test]
    async fn a_client_is_not_affected_by_a_worker_partition() {
        let net = Net::new();
        let front = net.front(1, echo_server().await).await.unwrap();
        let mut rules = Rules::default();
        rules.cut(Endpoint::Worker, Endpoint::Replica(1));
        net.set(rules);
        let mut s = TcpStream::connect(&front).await.unwrap();
        // Not a fleet handshake: treated as a client's bytes.
        s.write_all(b"0123456789ab-hello").await.unwrap();
        let mut buf = [0u8; 18];
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut buf))
            .await
            .expect("not held")
            .unwrap();
        assert_eq!(&buf, b"0123456789ab-hello");
    }
}
