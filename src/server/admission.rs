//! Which connections a replica serves: bounds per role and per peer address.
//!
//! Every accepted connection is first *handshaking* (it has not said who it is yet), then one of
//! the roles of its handshake: replica, worker or client. Each class has its own bound, so a
//! flood of one kind cannot take the slots of another: a misbehaving client (or a thousand
//! idle CLI connections) never locks out the cluster's own traffic, replicas and workers.
//!
//! | class | total | per peer address | at the bound |
//! |---|---|---|---|
//! | handshaking | [`Limits::handshaking`] | [`Limits::handshaking_per_ip`] | the oldest handshaking connection (of that address, when its share is full) is closed for the new one |
//! | client | [`Limits::clients`] | [`Limits::clients_per_ip`] | the longest-idle client connection (no request in flight) is closed for the new one; none idle: refused with a reason |
//! | worker | [`Limits::workers`] | [`Limits::workers_per_ip`] | refused with a reason (the worker retries) |
//! | replica | [`Limits::replicas`] | - | refused with a reason (the peer re-dials with back-off) |
//!
//! Client connections idle for [`Limits::client_idle_ms`] are closed (a CLI client re-dials on
//! its next call). Roles are what the handshake claims: without `node.auth_token`, a hostile
//! program can claim to be a replica or a worker, so these bounds protect the cluster against
//! misbehaving clients, not against an attacker on the network; set `node.auth_token` for that.
//!
//! [`Table`] is the decision, pure and driven by the caller's clock; [`Admission`] is the thin
//! shell the accept loop uses (it holds the table and wakes evicted connections).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::rpc::Role;

/// The bounds; [`Limits::default`] is what a replica uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub handshaking: usize,
    pub handshaking_per_ip: usize,
    pub clients: usize,
    pub clients_per_ip: usize,
    pub workers: usize,
    pub workers_per_ip: usize,
    pub replicas: usize,
    pub client_idle_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits::DEFAULT
    }
}

impl Limits {
    /// What a replica uses (documented in docs/operations.md).
    pub const DEFAULT: Limits = Limits {
        handshaking: 256,
        handshaking_per_ip: 64,
        clients: 1024,
        clients_per_ip: 256,
        // A few connections per worker process (lease loop, heartbeat thread, reporter).
        workers: 8192,
        workers_per_ip: 1024,
        // Each peer opens a few (Raft, health polls, forwarded calls), re-dialling on loss.
        replicas: 256,
        client_idle_ms: 60_000,
    };

    /// The most connections these bounds admit at once.
    pub const fn total(&self) -> usize {
        self.handshaking + self.clients + self.workers + self.replicas
    }
}

/// One connection's identity in the table.
pub type ConnId = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Handshaking,
    Client,
    Worker,
    Replica,
}

#[derive(Debug, Clone)]
struct Entry {
    class: Class,
    ip: IpAddr,
    /// When it was accepted, or when its last request ended (ms, caller's clock).
    since_ms: u64,
    in_flight: u32,
}

/// The admission decisions (no IO, no clock).
#[derive(Debug, Default)]
pub struct Table {
    limits: Limits,
    conns: BTreeMap<ConnId, Entry>,
    next: ConnId,
}

/// What admitting a connection decided.
#[derive(Debug, PartialEq, Eq)]
pub struct Admitted {
    pub id: ConnId,
    /// A connection to close to make room.
    pub evict: Option<ConnId>,
}

impl Table {
    pub fn new(limits: Limits) -> Table {
        Table {
            limits,
            conns: BTreeMap::new(),
            next: 1,
        }
    }

    /// A connection was accepted from `ip`: it is handshaking. Always admitted; the oldest
    /// handshaking connection makes room when a bound is reached (it has had the longest to
    /// send a hundred bytes).
    pub fn open(&mut self, ip: IpAddr, now_ms: u64) -> Admitted {
        let evict = self.make_room(Class::Handshaking, ip, |e| e.in_flight == 0);
        let id = self.next;
        self.next += 1;
        self.conns.insert(
            id,
            Entry {
                class: Class::Handshaking,
                ip,
                since_ms: now_ms,
                in_flight: 0,
            },
        );
        Admitted { id, evict }
    }

    /// The connection's handshake named `role`. `Err` is the reason to refuse it with.
    pub fn promote(&mut self, id: ConnId, role: Role, now_ms: u64) -> Result<Admitted, String> {
        let Some(ip) = self.conns.get(&id).map(|e| e.ip) else {
            return Err("the connection was closed".into());
        };
        let class = match role {
            Role::Client => Class::Client,
            Role::Worker => Class::Worker,
            Role::Replica => Class::Replica,
        };
        let (total, per_ip) = self.bounds(class);
        let evict = if class == Class::Client {
            // Room is made from idle clients only: one with a request in flight is working.
            self.make_room(class, ip, |e| e.in_flight == 0)
        } else {
            None
        };
        let (n_total, n_ip) = self.count(class, ip);
        if n_total >= total || n_ip >= per_ip {
            let what = match class {
                Class::Client => "client",
                Class::Worker => "worker",
                _ => "replica",
            };
            return Err(if n_ip >= per_ip {
                format!(
                    "too many {what} connections from {ip} ({n_ip}, at most {per_ip}, none \
                     idle); close some and retry"
                )
            } else {
                format!(
                    "too many {what} connections ({n_total}, at most {total}, none idle); retry \
                     later"
                )
            });
        }
        let e = self.conns.get_mut(&id).expect("checked");
        e.class = class;
        e.since_ms = now_ms;
        Ok(Admitted { id, evict })
    }

    /// A request started on the connection.
    pub fn request_started(&mut self, id: ConnId) {
        if let Some(e) = self.conns.get_mut(&id) {
            e.in_flight += 1;
        }
    }

    /// A request ended on the connection at `now_ms`.
    pub fn request_ended(&mut self, id: ConnId, now_ms: u64) {
        if let Some(e) = self.conns.get_mut(&id) {
            e.in_flight = e.in_flight.saturating_sub(1);
            e.since_ms = now_ms;
        }
    }

    pub fn close(&mut self, id: ConnId) {
        self.conns.remove(&id);
    }

    /// Client connections idle longer than the idle timeout at `now_ms`.
    pub fn idle_clients(&self, now_ms: u64) -> Vec<ConnId> {
        self.conns
            .iter()
            .filter(|(_, e)| {
                e.class == Class::Client
                    && e.in_flight == 0
                    && now_ms >= e.since_ms.saturating_add(self.limits.client_idle_ms)
            })
            .map(|(id, _)| *id)
            .collect()
    }

    /// Connections per class: handshaking, clients, workers, replicas.
    pub fn counts(&self) -> [usize; 4] {
        let mut c = [0; 4];
        for e in self.conns.values() {
            c[e.class as usize] += 1;
        }
        c
    }

    fn bounds(&self, class: Class) -> (usize, usize) {
        let l = &self.limits;
        match class {
            Class::Handshaking => (l.handshaking, l.handshaking_per_ip),
            Class::Client => (l.clients, l.clients_per_ip),
            Class::Worker => (l.workers, l.workers_per_ip),
            Class::Replica => (l.replicas, usize::MAX),
        }
    }

    fn count(&self, class: Class, ip: IpAddr) -> (usize, usize) {
        self.conns
            .values()
            .filter(|e| e.class == class)
            .fold((0, 0), |(t, i), e| (t + 1, i + usize::from(e.ip == ip)))
    }

    /// When `class` is at a bound for `ip`, removes and returns the connection that has waited
    /// longest among those `evictable` (of `ip` when its share is full, else of anyone).
    fn make_room(
        &mut self,
        class: Class,
        ip: IpAddr,
        evictable: impl Fn(&Entry) -> bool,
    ) -> Option<ConnId> {
        let (total, per_ip) = self.bounds(class);
        let (n_total, n_ip) = self.count(class, ip);
        let same_ip = n_ip >= per_ip;
        if !same_ip && n_total < total {
            return None;
        }
        let victim = self
            .conns
            .iter()
            .filter(|(_, e)| e.class == class && evictable(e) && (!same_ip || e.ip == ip))
            .min_by_key(|(id, e)| (e.since_ms, **id))
            .map(|(id, _)| *id)?;
        self.conns.remove(&victim);
        Some(victim)
    }
}

/// The shell around [`Table`]: the accept loop and each connection's task share it.
pub struct Admission {
    clock: crate::clock::Clock,
    table: Mutex<Table>,
    /// Woken to close a connection (evicted, or idle too long).
    closers: Mutex<HashMap<ConnId, Arc<Notify>>>,
}

/// A connection's place in the table; leaving it (drop) frees the place.
pub struct Ticket {
    admission: Arc<Admission>,
    pub id: ConnId,
    /// Notified when the connection must close.
    pub closed: Arc<Notify>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.admission
            .table
            .lock()
            .expect("admission lock")
            .close(self.id);
        self.admission
            .closers
            .lock()
            .expect("closers lock")
            .remove(&self.id);
    }
}

impl Admission {
    /// `clock`: idle times are measured on its monotonic clock (they must not jump with the
    /// wall clock).
    pub fn new(limits: Limits, clock: crate::clock::Clock) -> Arc<Admission> {
        Arc::new(Admission {
            clock,
            table: Mutex::new(Table::new(limits)),
            closers: Mutex::new(HashMap::new()),
        })
    }

    /// Admits an accepted connection (handshaking), closing another if one must make room.
    pub fn open(self: &Arc<Self>, ip: IpAddr) -> Ticket {
        let a = self
            .table
            .lock()
            .expect("admission lock")
            .open(ip, self.clock.mono_ms());
        self.close_evicted(a.evict);
        let closed = Arc::new(Notify::new());
        self.closers
            .lock()
            .expect("closers lock")
            .insert(a.id, closed.clone());
        Ticket {
            admission: self.clone(),
            id: a.id,
            closed,
        }
    }

    /// The handshake named `role`: admitted, or the reason to refuse it.
    pub fn promote(&self, ticket: &Ticket, role: Role) -> Result<(), String> {
        let a = self.table.lock().expect("admission lock").promote(
            ticket.id,
            role,
            self.clock.mono_ms(),
        )?;
        self.close_evicted(a.evict);
        Ok(())
    }

    pub fn request_started(&self, id: ConnId) {
        self.table
            .lock()
            .expect("admission lock")
            .request_started(id);
    }

    pub fn request_ended(&self, id: ConnId) {
        self.table
            .lock()
            .expect("admission lock")
            .request_ended(id, self.clock.mono_ms());
    }

    /// Closes client connections idle too long; the accept loop calls it periodically.
    pub fn close_idle(&self) {
        let idle = self
            .table
            .lock()
            .expect("admission lock")
            .idle_clients(self.clock.mono_ms());
        for id in idle {
            self.close_evicted(Some(id));
        }
    }

    /// Connections per class: handshaking, clients, workers, replicas.
    pub fn counts(&self) -> [usize; 4] {
        self.table.lock().expect("admission lock").counts()
    }

    fn close_evicted(&self, id: Option<ConnId>) {
        if let Some(id) = id {
            if let Some(n) = self.closers.lock().expect("closers lock").get(&id) {
                // notify_one keeps a permit: a connection not waiting yet closes at its next
                // wait.
                n.notify_one();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));

    fn small() -> Limits {
        Limits {
            handshaking: 3,
            handshaking_per_ip: 2,
            clients: 3,
            clients_per_ip: 2,
            workers: 2,
            workers_per_ip: 2,
            replicas: 1,
            client_idle_ms: 100,
        }
    }

    fn client(t: &mut Table, ip: IpAddr, now: u64) -> Result<Admitted, String> {
        let id = t.open(ip, now).id;
        t.promote(id, Role::Client, now)
    }

    #[test]
    fn silent_handshakes_make_room_oldest_first_within_their_address() {
        let mut t = Table::new(small());
        let a1 = t.open(A, 1);
        let a2 = t.open(A, 2);
        assert_eq!((a1.evict, a2.evict), (None, None));
        // A's share is full: its oldest handshake goes, not B's.
        let b1 = t.open(B, 3);
        assert_eq!(b1.evict, None);
        let a3 = t.open(A, 4);
        assert_eq!(a3.evict, Some(a1.id));
        // The total is full (a2, b1, a3): B's new one takes the oldest of anyone.
        let b2 = t.open(B, 5);
        assert_eq!(b2.evict, Some(a2.id));
    }

    #[test]
    fn idle_clients_make_room_and_busy_ones_do_not() {
        let mut t = Table::new(small());
        let c1 = client(&mut t, A, 1).unwrap();
        let c2 = client(&mut t, A, 2).unwrap();
        t.request_started(c1.id);
        // A's client share is full: the idle one (c2) goes.
        let c3 = client(&mut t, A, 3).unwrap();
        assert_eq!(c3.evict, Some(c2.id));
        // Both of A's are busy now: refused, with the reason.
        t.request_started(c3.id);
        let e = client(&mut t, A, 4).unwrap_err();
        assert!(
            e.contains("too many client connections from 10.0.0.1"),
            "{e}"
        );
        // Another address still gets in.
        assert!(client(&mut t, B, 5).is_ok());
        t.request_ended(c1.id, 6);
        assert!(!t.idle_clients(105).contains(&c1.id));
        assert!(t.idle_clients(106).contains(&c1.id));
        assert!(!t.idle_clients(1_000).contains(&c3.id), "busy: never idle");
    }

    #[test]
    fn clients_cannot_take_the_slots_of_workers_and_replicas() {
        let mut t = Table::new(small());
        for i in 0..3 {
            client(&mut t, if i < 2 { A } else { B }, i).unwrap();
        }
        let w = t.open(A, 10).id;
        assert!(t.promote(w, Role::Worker, 10).is_ok());
        let r = t.open(A, 11).id;
        assert!(t.promote(r, Role::Replica, 11).is_ok());
        let r2 = t.open(A, 12).id;
        let e = t.promote(r2, Role::Replica, 12).unwrap_err();
        assert!(
            e.contains("too many replica connections (1, at most 1"),
            "{e}"
        );
        assert_eq!(t.counts(), [1, 3, 1, 1]);
        t.close(r2);
        assert_eq!(t.counts(), [0, 3, 1, 1]);
    }
}
