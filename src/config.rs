//! Configuration: one documented [`Config`], loaded from a TOML file and overridden by flags.
//!
//! Every field has a default that runs a node on a LAN; `config/fleet.example.toml` lists
//! each key with its default. Unknown keys are errors (a typo must not be silently ignored), and
//! [`Config::validate`] checks ranges once, at start, naming the key, the value and what is
//! accepted.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The whole configuration of a `fleet` process.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub node: NodeConfig,
    pub raft: RaftConfig,
    pub client: ClientConfig,
}

/// This replica: who it is, where it listens, where it keeps its data, how it finds the others.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// The node id, unique in the cluster for its lifetime. When unset, a new node draws a random
    /// id and keeps it in its data directory.
    pub id: Option<u64>,
    /// The address the replica listens on for peers and clients (`host:port`).
    pub listen: String,
    /// The address other nodes use to reach this one; defaults to `listen`. Stored in the Raft
    /// membership, so it must be reachable from every other node.
    pub advertise: Option<String>,
    /// The data directory: the sled database (Raft log, vote, markers) and the snapshot file.
    pub data_dir: PathBuf,
    /// The name of the cluster. Nodes of differently named clusters refuse to talk.
    pub cluster_name: String,
    /// Addresses of other replicas (any subset) used to form or join the cluster.
    pub peers: Vec<String>,
    /// Form a new cluster once this many replicas (this one included) can see each other.
    /// Every node of the first set must be given the same value. Unset: join an existing cluster.
    pub bootstrap_expect: Option<usize>,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            id: None,
            listen: "127.0.0.1:7101".into(),
            advertise: None,
            data_dir: PathBuf::from("/var/lib/fleet"),
            cluster_name: "fleet".into(),
            peers: Vec::new(),
            bootstrap_expect: None,
        }
    }
}

/// Raft timing and log compaction.
///
/// The defaults were chosen by measurement on a loaded 2-core machine (see docs/operations.md):
/// a heartbeat every 100 ms and an election timeout of 500-1000 ms caused no spurious elections
/// under write load, and a killed leader is replaced in about one second. `timing_multiplier`
/// scales all three for slower networks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RaftConfig {
    /// How often the leader sends heartbeats, in milliseconds (before the multiplier).
    pub heartbeat_interval_ms: u64,
    /// The shortest election timeout, in milliseconds (before the multiplier).
    pub election_timeout_min_ms: u64,
    /// The longest election timeout, in milliseconds (before the multiplier).
    pub election_timeout_max_ms: u64,
    /// Scales heartbeat and election timing together: 2.0 doubles every interval.
    pub timing_multiplier: f64,
    /// Build a snapshot after this many log entries since the last one.
    pub snapshot_every_entries: u64,
    /// Log entries to keep behind a snapshot, so a briefly lagging follower catches up from the
    /// log instead of a whole snapshot.
    pub keep_log_entries_after_snapshot: u64,
    /// How long sending one snapshot chunk may take, in milliseconds.
    pub snapshot_chunk_timeout_ms: u64,
    /// The largest snapshot this node accepts from a leader, in bytes.
    pub max_snapshot_bytes: u64,
}

impl Default for RaftConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval_ms: 100,
            election_timeout_min_ms: 500,
            election_timeout_max_ms: 1000,
            timing_multiplier: 1.0,
            snapshot_every_entries: 10_000,
            keep_log_entries_after_snapshot: 1_000,
            snapshot_chunk_timeout_ms: 10_000,
            max_snapshot_bytes: 1 << 30,
        }
    }
}

impl RaftConfig {
    fn scaled(&self, ms: u64) -> u64 {
        ((ms as f64) * self.timing_multiplier).round().max(1.0) as u64
    }
    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.scaled(self.heartbeat_interval_ms))
    }
    pub fn election_timeout_min(&self) -> Duration {
        Duration::from_millis(self.scaled(self.election_timeout_min_ms))
    }
    pub fn election_timeout_max(&self) -> Duration {
        Duration::from_millis(self.scaled(self.election_timeout_max_ms))
    }
}

/// How CLI commands find the cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClientConfig {
    /// Replica addresses to try, in order (any subset of the cluster).
    pub peers: Vec<String>,
    /// How long a command keeps retrying (elections, unreachable replicas), in milliseconds.
    pub timeout_ms: u64,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            peers: Vec::new(),
            timeout_ms: 15_000,
        }
    }
}

impl Config {
    /// Reads a TOML file. Unknown keys and wrong types are errors naming the key.
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read config file {}: {e}", path.display()))?;
        toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("config file {} is not valid: {e}", path.display()))
    }

    /// Checks every value once, at start.
    pub fn validate(&self) -> anyhow::Result<()> {
        let n = &self.node;
        if n.id == Some(0) {
            anyhow::bail!("node.id = 0 is not valid: node ids start at 1");
        }
        parse_addr("node.listen", &n.listen)?;
        if let Some(a) = &n.advertise {
            parse_addr("node.advertise", a)?;
        }
        for p in &n.peers {
            parse_addr("node.peers", p)?;
        }
        if let Some(e) = n.bootstrap_expect {
            if !(1..=9).contains(&e) {
                anyhow::bail!(
                    "node.bootstrap_expect = {e} is not valid: use 1 to 9 (3 or 5 in production)"
                );
            }
        }
        if let Some(e) = n.bootstrap_expect {
            let mut named: Vec<&str> = n.peers.iter().map(String::as_str).collect();
            let me = self.advertise_addr();
            named.push(&me);
            named.sort();
            named.dedup();
            if named.len() < e {
                anyhow::bail!(
                    "node.bootstrap_expect = {e}, but node.peers names only {} node(s) including \
                     this one; list every node of the first set in --peers",
                    named.len()
                );
            }
        }
        if n.cluster_name.is_empty() || n.cluster_name.len() > 64 {
            anyhow::bail!(
                "node.cluster_name = {:?} is not valid: use 1 to 64 characters",
                n.cluster_name
            );
        }
        let r = &self.raft;
        if !(r.timing_multiplier.is_finite() && (0.1..=100.0).contains(&r.timing_multiplier)) {
            anyhow::bail!(
                "raft.timing_multiplier = {} is not valid: use a number from 0.1 to 100",
                r.timing_multiplier
            );
        }
        if r.heartbeat_interval_ms == 0 {
            anyhow::bail!("raft.heartbeat_interval_ms = 0 is not valid: use at least 1");
        }
        if r.election_timeout_min_ms < 3 * r.heartbeat_interval_ms {
            anyhow::bail!(
                "raft.election_timeout_min_ms = {} is not valid: it must be at least three \
                 heartbeat intervals ({} ms)",
                r.election_timeout_min_ms,
                3 * r.heartbeat_interval_ms
            );
        }
        if r.election_timeout_max_ms <= r.election_timeout_min_ms {
            anyhow::bail!(
                "raft.election_timeout_max_ms = {} is not valid: it must be greater than \
                 raft.election_timeout_min_ms ({})",
                r.election_timeout_max_ms,
                r.election_timeout_min_ms
            );
        }
        if r.snapshot_every_entries == 0 {
            anyhow::bail!("raft.snapshot_every_entries = 0 is not valid: use at least 1");
        }
        if r.snapshot_chunk_timeout_ms < 100 {
            anyhow::bail!(
                "raft.snapshot_chunk_timeout_ms = {} is not valid: use at least 100",
                r.snapshot_chunk_timeout_ms
            );
        }
        if r.max_snapshot_bytes < (1 << 20) {
            anyhow::bail!(
                "raft.max_snapshot_bytes = {} is not valid: use at least 1048576 (1 MiB)",
                r.max_snapshot_bytes
            );
        }
        if self.client.timeout_ms == 0 {
            anyhow::bail!("client.timeout_ms = 0 is not valid: use at least 1");
        }
        for p in &self.client.peers {
            parse_addr("client.peers", p)?;
        }
        Ok(())
    }

    /// The address stored in the membership for this node.
    pub fn advertise_addr(&self) -> String {
        self.node
            .advertise
            .clone()
            .unwrap_or_else(|| self.node.listen.clone())
    }
}

/// Parses `host:port`, resolving names; the error names the key and the value.
pub fn parse_addr(key: &str, value: &str) -> anyhow::Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    let bad = |why: String| {
        anyhow::anyhow!("{key}: {value:?} is not a valid address ({why}); expected host:port, e.g. 127.0.0.1:7101")
    };
    let (host, port) = value
        .rsplit_once(':')
        .ok_or_else(|| bad("no port".into()))?;
    if host.is_empty() {
        return Err(bad("no host".into()));
    }
    port.parse::<u16>()
        .map_err(|_| bad(format!("port {port:?} is not a number from 0 to 65535")))?;
    value
        .to_socket_addrs()
        .map_err(|e| bad(e.to_string()))?
        .next()
        .ok_or_else(|| bad("the name resolves to no address".into()))
}

/// Splits a comma-separated peer list, validating each address.
pub fn parse_peer_list(key: &str, value: &str) -> anyhow::Result<Vec<String>> {
    let peers: Vec<String> = value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    if peers.is_empty() {
        anyhow::bail!("{key}: {value:?} names no address; expected host:port[,host:port...]");
    }
    for p in &peers {
        parse_addr(key, p)?;
    }
    Ok(peers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_key_is_an_error_naming_it() {
        let err = toml::from_str::<Config>("[raft]\nheartbeat_interval = 5\n").unwrap_err();
        assert!(err.to_string().contains("heartbeat_interval"), "{err}");
    }

    #[test]
    fn bad_values_are_named() {
        let mut c = Config::default();
        c.raft.election_timeout_min_ms = 100;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("raft.election_timeout_min_ms = 100"), "{e}");
        let e = parse_addr("node.peers", "localhost")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("\"localhost\"") && e.contains("host:port"),
            "{e}"
        );
        let e = parse_addr("node.peers", "127.0.0.1:99999")
            .unwrap_err()
            .to_string();
        assert!(e.contains("99999"), "{e}");
    }

    #[test]
    fn multiplier_scales_all_timing() {
        let r = RaftConfig {
            timing_multiplier: 2.0,
            ..Default::default()
        };
        assert_eq!(r.heartbeat_interval(), Duration::from_millis(200));
        assert_eq!(r.election_timeout_min(), Duration::from_millis(1000));
        assert_eq!(r.election_timeout_max(), Duration::from_millis(2000));
    }
}

#[cfg(test)]
mod example_file_tests {
    use super::*;

    /// config/fleet.example.toml must parse (no stale keys) and mention every key of
    /// [`Config`] (no undocumented ones).
    #[test]
    fn example_config_documents_every_key() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/fleet.example.toml");
        let text = std::fs::read_to_string(path).unwrap();
        let parsed: Config = toml::from_str(&text).expect("example config parses");
        parsed.validate().expect("example config is valid");
        let defaults = toml::Value::try_from(Config::default()).unwrap();
        for (section, table) in defaults.as_table().unwrap() {
            assert!(
                text.contains(&format!("[{section}]")),
                "section [{section}] missing"
            );
            for key in table.as_table().unwrap().keys() {
                assert!(
                    text.contains(&format!("{key} =")),
                    "{section}.{key} missing from the example"
                );
            }
        }
        for key in ["id", "advertise", "bootstrap_expect"] {
            assert!(
                text.contains(&format!("# {key} =")),
                "optional node.{key} missing"
            );
        }
    }
}
