//! Loopback ports for the processes a test or a chaos run starts (shared by `chaos` and the
//! integration tests, which include this file).
//!
//! They are taken from below the kernel's ephemeral range (`ip_local_port_range`). A port in
//! that range can be taken, between the check that it is free and the replica's `bind`, as the
//! local end of any outgoing connection (a CLI call, a replica dialling its peers), and the
//! replica then exits with "Address already in use". A CI run was lost to exactly that.

#![allow(dead_code)]

use rand::Rng;

/// `n` loopback ports that were free a moment ago, none handed out before by this process.
pub fn free_ports(n: usize) -> Vec<u16> {
    (0..n).map(|_| free_port_run(1, &[])).collect()
}

/// A base port whose `n` consecutive ports are free right now (for `fleet up`, which takes
/// consecutive ports).
pub fn free_consecutive_ports(n: u16) -> u16 {
    free_consecutive_ports_and(n, &[])
}

/// [`free_consecutive_ports`] where the `n` ports at each of `offsets` above the base are free
/// too (`fleet up` puts its HTTP ports 100 above its RPC ports).
pub fn free_consecutive_ports_and(n: u16, offsets: &[u16]) -> u16 {
    free_port_run(n, offsets)
}

/// Ports that no outgoing connection takes: from 10000 up to the kernel's ephemeral range.
pub fn listen_port_range() -> std::ops::Range<u16> {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    assert!(
        low > 12_000,
        "the ephemeral port range starts at {low}: fleet's tests and chaos runs need the ports from 10000 to \
         12000 outside it (sysctl net.ipv4.ip_local_port_range)"
    );
    10_000..low
}

/// A base port such that the `n` ports from it, and from it plus each of `offsets`, are free
/// and were not handed out before by this process.
fn free_port_run(n: u16, offsets: &[u16]) -> u16 {
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let range = listen_port_range();
    let span = n + offsets.iter().copied().max().unwrap_or(0);
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..1000 {
        let base: u16 = rand::rng().random_range(range.start..range.end - span);
        let ports: Vec<u16> = std::iter::once(0)
            .chain(offsets.iter().copied())
            .flat_map(|o| (0..n).map(move |i| base + o + i))
            .collect();
        if ports.iter().any(|p| handed_out.contains(p)) {
            continue;
        }
        let listeners: Vec<_> = ports
            .iter()
            .map_while(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).ok())
            .collect();
        if listeners.len() == ports.len() {
            handed_out.extend(&ports);
            return base;
        }
    }
    panic!("no {n} free ports (with offsets {offsets:?}) in {range:?}");
}
