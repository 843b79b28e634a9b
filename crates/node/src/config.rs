//! Node configuration: parsed from TOML or flags, validated once at start-up.
//!
//! Every error names the field (or flag) that was wrong, so an operator can fix it without
//! reading code.

use concord_consensus::NodeId;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Which consensus engine drives the groups of this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    Raft,
    Paxos,
}

impl Engine {
    pub fn parse(s: &str) -> Result<Engine, ConfigError> {
        match s {
            "raft" => Ok(Engine::Raft),
            "paxos" => Ok(Engine::Paxos),
            other => Err(ConfigError::new(
                "consensus",
                format!("unknown engine {other:?}; expected `raft` or `paxos`"),
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Engine::Raft => "raft",
            Engine::Paxos => "paxos",
        }
    }
}

/// A configuration error naming the bad field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub field: String,
    pub reason: String,
}

impl ConfigError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid config `{}`: {}", self.field, self.reason)
    }
}
impl std::error::Error for ConfigError {}

/// Everything one node needs to start.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeConfig {
    pub id: NodeId,
    pub name: String,
    /// etcd v3 gRPC endpoint.
    pub listen_client: SocketAddr,
    /// Peer transport (consensus messages, forwarded requests).
    pub listen_peer: SocketAddr,
    /// Admin HTTP: /health, /metrics, /status.
    pub listen_admin: SocketAddr,
    /// Founding members' peer addresses, this node included.
    pub peers: BTreeMap<NodeId, SocketAddr>,
    /// Founding members' client addresses when known (for member list); optional.
    pub client_urls: BTreeMap<NodeId, SocketAddr>,
    pub data_dir: PathBuf,
    pub consensus: Engine,
    /// Peers refuse connections from another cluster; derived from `peers` when not set.
    pub cluster_id: u64,
    pub tick_ms: u64,
    /// Leader heartbeat interval in ticks (default 1: every 10 ms; ReadIndex rounds of the
    /// Multi-Paxos engine ride on heartbeats, so they stay frequent).
    pub heartbeat_ticks: u32,
    /// Election timeout in ticks (default 100: 1 s, etcd's default). At 100 ms a single
    /// slow fsync (hundreds of ms on a busy disk) let followers depose a healthy leader,
    /// and every leader change fails the proposals in flight.
    pub election_ticks: u32,
    /// Take a state-machine snapshot and compact the log every this many applied entries.
    pub snapshot_every_entries: u64,
    pub limits: Limits,
    /// Keep the log in memory instead of files (tests only; nothing survives a restart).
    pub in_memory: bool,
}

/// Named bounds on every queue and window the runtime owns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Client requests queued for a group task before "too many requests".
    pub request_queue_max: usize,
    /// Proposals awaiting their commit (local and forwarded) before "too many requests".
    pub pending_proposals_max: usize,
    /// Linearizable reads waiting for their barrier.
    pub pending_reads_max: usize,
    /// Frames queued per outbound peer connection; further frames are dropped (consensus
    /// tolerates loss and retransmits).
    pub peer_queue_max: usize,
    /// Inbound frames queued per group; further frames are dropped.
    pub inbound_queue_max: usize,
    /// Largest frame on the peer transport.
    pub max_frame_bytes: usize,
    /// Frames written before one flush on a peer connection.
    pub peer_write_batch_max: usize,
    /// Inputs drained per loop round before taking a Ready (bounds one round's latency).
    pub drain_per_round_max: usize,
    /// A request not answered within this time fails with "request timed out".
    pub request_timeout_ms: u64,
    /// Largest single client command.
    pub max_request_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            request_queue_max: 4096,
            pending_proposals_max: 16_384,
            pending_reads_max: 16_384,
            peer_queue_max: 8192,
            inbound_queue_max: 8192,
            max_frame_bytes: 8 << 20,
            peer_write_batch_max: 256,
            drain_per_round_max: 1024,
            request_timeout_ms: 7_000,
            max_request_bytes: 1536 * 1024,
        }
    }
}

impl NodeConfig {
    /// A config with sensible defaults for node `id` of the founding set `peers`.
    pub fn new(id: NodeId, peers: BTreeMap<NodeId, SocketAddr>) -> NodeConfig {
        let cluster_id = cluster_id_for(&peers);
        NodeConfig {
            id,
            name: format!("node{id}"),
            listen_client: "127.0.0.1:2379".parse().expect("static address"),
            listen_peer: peers
                .get(&id)
                .copied()
                .unwrap_or_else(|| "127.0.0.1:2380".parse().expect("static address")),
            listen_admin: "127.0.0.1:2381".parse().expect("static address"),
            peers,
            client_urls: BTreeMap::new(),
            data_dir: PathBuf::from(format!("./concord-data/node{id}")),
            consensus: Engine::Raft,
            cluster_id,
            tick_ms: 10,
            heartbeat_ticks: 1,
            election_ticks: 100,
            snapshot_every_entries: 100_000,
            limits: Limits::default(),
            in_memory: false,
        }
    }

    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.id == 0 {
            return Err(ConfigError::new("id", "must be a positive integer"));
        }
        if self.name.is_empty() {
            return Err(ConfigError::new("name", "must not be empty"));
        }
        if self.peers.is_empty() {
            return Err(ConfigError::new(
                "peers",
                "must list the founding members, e.g. 1=127.0.0.1:2380,2=127.0.0.1:2480",
            ));
        }
        if self.peers.contains_key(&0) {
            return Err(ConfigError::new("peers", "node id 0 is not allowed"));
        }
        match self.peers.get(&self.id) {
            None => {
                return Err(ConfigError::new(
                    "peers",
                    format!("must include this node's own id {}", self.id),
                ))
            }
            Some(addr) if addr.port() != self.listen_peer.port() => {
                return Err(ConfigError::new(
                    "listen-peer",
                    format!(
                        "port {} differs from this node's entry in peers ({addr})",
                        self.listen_peer.port()
                    ),
                ))
            }
            Some(_) => {}
        }
        let ports = [
            ("listen-client", self.listen_client),
            ("listen-peer", self.listen_peer),
            ("listen-admin", self.listen_admin),
        ];
        for (i, (name, a)) in ports.iter().enumerate() {
            for (other, b) in &ports[i + 1..] {
                if a == b {
                    return Err(ConfigError::new(
                        *other,
                        format!("{b} is already used by {name}"),
                    ));
                }
            }
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(ConfigError::new("data-dir", "must not be empty"));
        }
        if !(1..=1000).contains(&self.tick_ms) {
            return Err(ConfigError::new("tick-ms", "must be in 1..=1000"));
        }
        if self.heartbeat_ticks == 0 {
            return Err(ConfigError::new("heartbeat-ticks", "must be at least 1"));
        }
        if self.election_ticks <= self.heartbeat_ticks {
            return Err(ConfigError::new(
                "election-ticks",
                "must be greater than heartbeat-ticks",
            ));
        }
        if self.snapshot_every_entries == 0 {
            return Err(ConfigError::new(
                "snapshot-every-entries",
                "must be at least 1",
            ));
        }
        let l = &self.limits;
        for (field, v) in [
            ("request_queue_max", l.request_queue_max),
            ("pending_proposals_max", l.pending_proposals_max),
            ("pending_reads_max", l.pending_reads_max),
            ("peer_queue_max", l.peer_queue_max),
            ("inbound_queue_max", l.inbound_queue_max),
            ("peer_write_batch_max", l.peer_write_batch_max),
            ("drain_per_round_max", l.drain_per_round_max),
        ] {
            if v == 0 {
                return Err(ConfigError::new(field, "must be at least 1"));
            }
        }
        if l.max_frame_bytes < 4096 {
            return Err(ConfigError::new("max_frame_bytes", "must be at least 4096"));
        }
        if l.max_request_bytes + 1024 > l.max_frame_bytes {
            return Err(ConfigError::new(
                "max_request_bytes",
                "must leave at least 1 KiB of headroom below max_frame_bytes",
            ));
        }
        if l.request_timeout_ms < 10 * self.tick_ms {
            return Err(ConfigError::new(
                "request_timeout_ms",
                "must be at least 10 ticks",
            ));
        }
        Ok(())
    }

    /// Parses a TOML file (see docs/node.md for the keys).
    pub fn from_toml(text: &str) -> Result<NodeConfig, ConfigError> {
        NodeConfig::from_toml_with(text, None, None)
    }

    /// Like [`NodeConfig::from_toml`], with `id` and `peers` given on the command line
    /// taking the place of (or overriding) the file's.
    pub fn from_toml_with(
        text: &str,
        id: Option<NodeId>,
        peers: Option<BTreeMap<NodeId, SocketAddr>>,
    ) -> Result<NodeConfig, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let field = e
                .message()
                .split('`')
                .nth(1)
                .unwrap_or("config file")
                .to_string();
            ConfigError::new(field, e.message().to_string())
        })?;
        let id = id
            .or(raw.id)
            .ok_or_else(|| ConfigError::new("id", "is required"))?;
        let peers = match (peers, raw.peers) {
            (Some(p), _) => p,
            (None, Some(p)) => parse_peers(&p)?,
            (None, None) => return Err(ConfigError::new("peers", "is required")),
        };
        let mut c = NodeConfig::new(id, peers);
        if let Some(n) = raw.name {
            c.name = n;
        }
        if let Some(a) = raw.listen_client {
            c.listen_client = parse_addr("listen-client", &a)?;
        }
        if let Some(a) = raw.listen_peer {
            c.listen_peer = parse_addr("listen-peer", &a)?;
        }
        if let Some(a) = raw.listen_admin {
            c.listen_admin = parse_addr("listen-admin", &a)?;
        }
        if let Some(d) = raw.data_dir {
            c.data_dir = PathBuf::from(d);
        }
        if let Some(e) = raw.consensus {
            c.consensus = e;
        }
        if let Some(t) = raw.cluster_token {
            c.cluster_id = hash_str(&t);
        }
        if let Some(v) = raw.tick_ms {
            c.tick_ms = v;
        }
        if let Some(v) = raw.heartbeat_ticks {
            c.heartbeat_ticks = v;
        }
        if let Some(v) = raw.election_ticks {
            c.election_ticks = v;
        }
        if let Some(v) = raw.snapshot_every_entries {
            c.snapshot_every_entries = v;
        }
        if let Some(v) = raw.request_timeout_ms {
            c.limits.request_timeout_ms = v;
        }
        c.validate()?;
        Ok(c)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawConfig {
    id: Option<NodeId>,
    name: Option<String>,
    listen_client: Option<String>,
    listen_peer: Option<String>,
    listen_admin: Option<String>,
    peers: Option<String>,
    data_dir: Option<String>,
    consensus: Option<Engine>,
    cluster_token: Option<String>,
    tick_ms: Option<u64>,
    heartbeat_ticks: Option<u32>,
    election_ticks: Option<u32>,
    snapshot_every_entries: Option<u64>,
    request_timeout_ms: Option<u64>,
}

/// Parses `host:port` (a name such as `localhost` is resolved once, now).
pub fn parse_addr(field: &str, s: &str) -> Result<SocketAddr, ConfigError> {
    let s = s.trim();
    let s = s
        .strip_prefix("http://")
        .or_else(|| s.strip_prefix("tcp://"))
        .unwrap_or(s);
    if let Ok(a) = s.parse() {
        return Ok(a);
    }
    use std::net::ToSocketAddrs;
    match s.to_socket_addrs() {
        Ok(mut it) => it
            .next()
            .ok_or_else(|| ConfigError::new(field, format!("{s:?} resolves to no address"))),
        Err(e) => Err(ConfigError::new(
            field,
            format!("{s:?} is not host:port ({e})"),
        )),
    }
}

/// Parses `1=127.0.0.1:2380,2=127.0.0.1:2480`.
pub fn parse_peers(s: &str) -> Result<BTreeMap<NodeId, SocketAddr>, ConfigError> {
    let mut out = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part
            .split_once('=')
            .ok_or_else(|| ConfigError::new("peers", format!("{part:?} is not ID=HOST:PORT")))?;
        let id: NodeId = id.trim().parse().map_err(|_| {
            ConfigError::new("peers", format!("{id:?} in {part:?} is not a node id"))
        })?;
        if id == 0 {
            return Err(ConfigError::new("peers", "node id 0 is not allowed"));
        }
        let addr = parse_addr("peers", addr)?;
        if out.insert(id, addr).is_some() {
            return Err(ConfigError::new(
                "peers",
                format!("node id {id} is listed twice"),
            ));
        }
    }
    Ok(out)
}

/// FNV-1a, stable across builds and platforms (the cluster id goes on the wire).
pub fn hash_str(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The cluster id every founding member derives from the same peer list.
pub fn cluster_id_for(peers: &BTreeMap<NodeId, SocketAddr>) -> u64 {
    let text: Vec<String> = peers.iter().map(|(id, a)| format!("{id}={a}")).collect();
    hash_str(&text.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peers3() -> BTreeMap<NodeId, SocketAddr> {
        parse_peers("1=127.0.0.1:2380,2=127.0.0.1:2480,3=127.0.0.1:2580").unwrap()
    }

    #[test]
    fn defaults_validate() {
        assert!(NodeConfig::new(1, peers3()).validate().is_ok());
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(parse_peers("1=x").unwrap_err().field, "peers");
        assert_eq!(parse_peers("a=127.0.0.1:1").unwrap_err().field, "peers");
        assert_eq!(
            parse_peers("1=127.0.0.1:1,1=127.0.0.1:2")
                .unwrap_err()
                .field,
            "peers"
        );
        let c = NodeConfig::new(4, peers3());
        assert_eq!(c.validate().unwrap_err().field, "peers");
        let mut c = NodeConfig::new(1, peers3());
        c.listen_admin = c.listen_client;
        assert_eq!(c.validate().unwrap_err().field, "listen-admin");
        let mut c = NodeConfig::new(1, peers3());
        c.election_ticks = 1;
        assert_eq!(c.validate().unwrap_err().field, "election-ticks");
        assert_eq!(Engine::parse("zab").unwrap_err().field, "consensus");
    }

    #[test]
    fn toml_round_trip_and_unknown_key() {
        let c = NodeConfig::from_toml(
            "id = 2\nname = \"b\"\npeers = \"1=127.0.0.1:2380,2=127.0.0.1:2480\"\n\
             listen-peer = \"127.0.0.1:2480\"\nlisten-client = \"127.0.0.1:2479\"\n\
             listen-admin = \"127.0.0.1:2481\"\nconsensus = \"raft\"\n",
        )
        .unwrap();
        assert_eq!(c.id, 2);
        assert_eq!(c.name, "b");
        let e = NodeConfig::from_toml("id = 1\nbogus = 3\n").unwrap_err();
        assert!(e.reason.contains("bogus"), "{e}");
        let e = NodeConfig::from_toml("name = \"x\"").unwrap_err();
        assert_eq!(e.field, "id");
    }

    #[test]
    fn flags_fill_in_what_the_file_leaves_out() {
        let c =
            NodeConfig::from_toml_with("election-ticks = 50\n", Some(3), Some(peers3())).unwrap();
        assert_eq!((c.id, c.election_ticks), (3, 50));
        assert_eq!(c.peers, peers3());
        let e = NodeConfig::from_toml_with("election-ticks = 50\n", Some(3), None).unwrap_err();
        assert_eq!(e.field, "peers");
        // The flag wins over the file.
        let c = NodeConfig::from_toml_with("id = 1\n", Some(2), Some(peers3())).unwrap();
        assert_eq!(c.id, 2);
    }

    #[test]
    fn cluster_id_is_stable() {
        assert_eq!(cluster_id_for(&peers3()), cluster_id_for(&peers3()));
        let mut other = peers3();
        other.remove(&3);
        assert_ne!(cluster_id_for(&peers3()), cluster_id_for(&other));
    }
}
