//! The `concord` command: `dev` (a local cluster in one process), `start` (one node),
//! `status` (ask running nodes), `version`.

use clap::{Args, Parser, Subcommand};
use concord_node::admin::{http_get, StatusReport};
use concord_node::config::{parse_addr, parse_peers, ConfigError};
use concord_node::{Engine, Node, NodeConfig};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "concord",
    version,
    about = "Consensus-replicated services in one binary"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start a local N-node cluster in this process (ports 2379/2380/2381, +100 per node).
    Dev(DevArgs),
    /// Start one node from a TOML file or flags.
    Start(Box<StartArgs>),
    /// Show members, leader, term and commit/applied index of running nodes.
    Status(StatusArgs),
    /// Print the version.
    Version,
}

#[derive(Args)]
struct DevArgs {
    /// Number of nodes (1..=9).
    #[arg(long, default_value_t = 3)]
    nodes: u64,
    /// Consensus engine: raft or paxos.
    #[arg(long, default_value = "raft")]
    consensus: String,
    /// Data folder; node i keeps its files in DIR/node<i>.
    #[arg(long, default_value = "./concord-data")]
    data_dir: PathBuf,
    /// First client port; node i uses base+100*i (client), +1 (peer), +2 (admin).
    #[arg(long, default_value_t = 2379)]
    base_port: u16,
    /// Take a snapshot every this many applied entries.
    #[arg(long, default_value_t = 100_000)]
    snapshot_every: u64,
}

#[derive(Args)]
struct StartArgs {
    /// TOML file with the same keys as the flags (flags given too override it).
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long)]
    id: Option<u64>,
    #[arg(long)]
    name: Option<String>,
    /// etcd gRPC address, host:port.
    #[arg(long)]
    listen_client: Option<String>,
    /// Peer transport address, host:port.
    #[arg(long)]
    listen_peer: Option<String>,
    /// Admin HTTP address, host:port.
    #[arg(long)]
    listen_admin: Option<String>,
    /// Founding members: 1=127.0.0.1:2380,2=127.0.0.1:2480,...
    #[arg(long)]
    peers: Option<String>,
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// raft or paxos.
    #[arg(long)]
    consensus: Option<String>,
    /// Take a snapshot every this many applied entries.
    #[arg(long)]
    snapshot_every: Option<u64>,
    /// Milliseconds per consensus tick.
    #[arg(long)]
    tick_ms: Option<u64>,
}

#[derive(Args)]
struct StatusArgs {
    /// Admin HTTP endpoints, comma separated.
    #[arg(long, default_value = "127.0.0.1:2381,127.0.0.1:2481,127.0.0.1:2581")]
    endpoints: String,
    /// Print the raw JSON of each node.
    #[arg(long)]
    json: bool,
}

fn init_logging() {
    let level = match std::env::var("CONCORD_LOG").as_deref() {
        Ok("error") => tracing::Level::ERROR,
        Ok("warn") => tracing::Level::WARN,
        Ok("debug") => tracing::Level::DEBUG,
        Ok("trace") => tracing::Level::TRACE,
        _ => tracing::Level::INFO,
    };
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Cmd::Version = cli.cmd {
        println!("concord {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    init_logging();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let res = rt.block_on(async move {
        match cli.cmd {
            Cmd::Dev(a) => dev(a).await,
            Cmd::Start(a) => start(*a).await,
            Cmd::Status(a) => status(a).await,
            Cmd::Version => Ok(()),
        }
    });
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM.
async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn dev_configs(a: &DevArgs) -> Result<Vec<NodeConfig>, String> {
    if !(1..=9).contains(&a.nodes) {
        return Err(format!("--nodes must be in 1..=9 (got {})", a.nodes));
    }
    let engine = Engine::parse(&a.consensus).map_err(|e| flag_error(&e))?;
    let port = |i: u64, off: u64| -> Result<u16, String> {
        u16::try_from(a.base_port as u64 + 100 * (i - 1) + off)
            .map_err(|_| "--base-port too high for this many nodes".to_string())
    };
    let addr = |p: u16| -> std::net::SocketAddr { ([127, 0, 0, 1], p).into() };
    let mut peers = BTreeMap::new();
    let mut clients = BTreeMap::new();
    for i in 1..=a.nodes {
        peers.insert(i, addr(port(i, 1)?));
        clients.insert(i, addr(port(i, 0)?));
    }
    let mut out = Vec::new();
    for i in 1..=a.nodes {
        let mut c = NodeConfig::new(i, peers.clone());
        c.name = format!("node{i}");
        c.listen_client = addr(port(i, 0)?);
        c.listen_peer = addr(port(i, 1)?);
        c.listen_admin = addr(port(i, 2)?);
        c.client_urls = clients.clone();
        c.data_dir = a.data_dir.join(format!("node{i}"));
        c.consensus = engine;
        c.snapshot_every_entries = a.snapshot_every;
        c.validate().map_err(|e| flag_error(&e))?;
        out.push(c);
    }
    Ok(out)
}

fn flag_error(e: &ConfigError) -> String {
    format!("invalid --{}: {}", e.field.replace('_', "-"), e.reason)
}

async fn dev(a: DevArgs) -> Result<(), String> {
    let configs = dev_configs(&a)?;
    let mut nodes = Vec::new();
    for c in configs {
        let id = c.id;
        match Node::start(c).await {
            Ok(n) => nodes.push(n),
            Err(e) => {
                for n in nodes {
                    n.stop().await;
                }
                return Err(format!("node {id}: {e}"));
            }
        }
    }
    let endpoints: Vec<String> = nodes
        .iter()
        .map(|n| n.config.listen_client.to_string())
        .collect();
    println!(
        "concord dev: {} node(s), consensus {}, data in {}",
        nodes.len(),
        a.consensus,
        a.data_dir.display()
    );
    for n in &nodes {
        println!(
            "  node {} ({}): client {}  peer {}  admin http://{}",
            n.config.id,
            n.config.name,
            n.config.listen_client,
            n.config.listen_peer,
            n.config.listen_admin
        );
    }
    let eps = endpoints.join(",");
    println!("try:");
    println!("  etcdctl --endpoints={eps} put greeting hello");
    println!("  etcdctl --endpoints={eps} get greeting");
    println!("  etcdctl --endpoints={eps} watch greeting   # in another terminal");
    println!("  etcdctl --endpoints={eps} member list -w table");
    println!(
        "  concord status --endpoints {}",
        nodes
            .iter()
            .map(|n| n.config.listen_admin.to_string())
            .collect::<Vec<_>>()
            .join(",")
    );
    let all_know_leader = async {
        loop {
            let leaders: Vec<u64> = nodes.iter().map(|n| n.kv.status().leader).collect();
            if leaders.iter().all(|&l| l != 0 && l == leaders[0]) {
                return leaders[0];
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::select! {
        leader = all_know_leader => {
            println!("ready: leader is node {leader} (Ctrl-C to stop)");
        }
        _ = stop_signal() => {
            println!("stopping before a leader was elected");
            for n in nodes { n.stop().await; }
            return Ok(());
        }
    }
    stop_signal().await;
    println!("stopping...");
    for n in nodes {
        n.stop().await;
    }
    println!("stopped");
    Ok(())
}

fn start_config(a: StartArgs) -> Result<NodeConfig, String> {
    let peers = match &a.peers {
        Some(p) => Some(parse_peers(p).map_err(|e| flag_error(&e))?),
        None => None,
    };
    let base = match &a.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("--config {}: {e}", path.display()))?;
            Some(
                NodeConfig::from_toml_with(&text, a.id, peers.clone())
                    .map_err(|e| format!("{}: {e}", path.display()))?,
            )
        }
        None => None,
    };
    let mut c = match (base, a.id, peers.clone()) {
        (Some(c), _, _) => c,
        (None, Some(id), Some(peers)) => NodeConfig::new(id, peers),
        (None, None, _) => return Err("--id is required (or --config FILE)".into()),
        (None, Some(_), None) => return Err("--peers is required (or --config FILE)".into()),
    };
    if let Some(id) = a.id {
        c.id = id;
    }
    if let Some(p) = peers {
        c.cluster_id = concord_node::config::cluster_id_for(&p);
        c.peers = p;
        if a.listen_peer.is_none() {
            if let Some(addr) = c.peers.get(&c.id) {
                c.listen_peer = *addr;
            }
        }
    }
    if a.config.is_none() {
        c.name = format!("node{}", c.id);
        c.data_dir = PathBuf::from(format!("./concord-data/node{}", c.id));
    }
    if let Some(n) = a.name {
        c.name = n;
    }
    let addr = |flag: &str, v: &str| parse_addr(flag, v).map_err(|e| flag_error(&e));
    if let Some(v) = &a.listen_client {
        c.listen_client = addr("listen-client", v)?;
    }
    if let Some(v) = &a.listen_peer {
        c.listen_peer = addr("listen-peer", v)?;
    }
    if let Some(v) = &a.listen_admin {
        c.listen_admin = addr("listen-admin", v)?;
    }
    if let Some(d) = a.data_dir {
        c.data_dir = d;
    }
    if let Some(e) = &a.consensus {
        c.consensus = Engine::parse(e).map_err(|e| flag_error(&e))?;
    }
    if let Some(n) = a.snapshot_every {
        c.snapshot_every_entries = n;
    }
    if let Some(t) = a.tick_ms {
        c.tick_ms = t;
    }
    c.validate().map_err(|e| flag_error(&e))?;
    Ok(c)
}

async fn start(a: StartArgs) -> Result<(), String> {
    let c = start_config(a)?;
    let node = Node::start(c).await.map_err(|e| match e {
        concord_node::StartError::Config(e) => flag_error(&e),
        other => other.to_string(),
    })?;
    println!(
        "concord node {} ({}) consensus {}: client {} peer {} admin http://{} data {}",
        node.config.id,
        node.config.name,
        node.config.consensus.name(),
        node.config.listen_client,
        node.config.listen_peer,
        node.config.listen_admin,
        node.config.data_dir.display()
    );
    tokio::select! {
        l = node.wait_for_leader(Duration::from_secs(3600)) => {
            if let Some(l) = l {
                println!("ready: leader is node {l}");
            }
            stop_signal().await;
        }
        _ = stop_signal() => {}
    }
    println!("stopping...");
    node.stop().await;
    println!("stopped");
    Ok(())
}

async fn status(a: StatusArgs) -> Result<(), String> {
    let mut failed = 0;
    let mut reports = Vec::new();
    for ep in a
        .endpoints
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        let ep = ep
            .strip_prefix("http://")
            .unwrap_or(ep)
            .trim_end_matches('/');
        match http_get(ep, "/status", Duration::from_secs(3)).await {
            Ok((200, body)) => {
                if a.json {
                    println!("{body}");
                }
                match serde_json::from_str::<StatusReport>(&body) {
                    Ok(r) => reports.push((ep.to_string(), r)),
                    Err(e) => {
                        failed += 1;
                        eprintln!("{ep}: unexpected /status body: {e}");
                    }
                }
            }
            Ok((code, body)) => {
                failed += 1;
                eprintln!("{ep}: HTTP {code}: {}", body.trim());
            }
            Err(e) => {
                failed += 1;
                eprintln!("{ep}: unreachable: {e}");
            }
        }
    }
    if !a.json {
        println!(
            "{:<22} {:>4} {:<8} {:<10} {:>6} {:>6} {:>8} {:>8} {:>8}  HEALTH",
            "ENDPOINT", "ID", "NAME", "ROLE", "LEADER", "TERM", "COMMIT", "APPLIED", "REV"
        );
        for (ep, r) in &reports {
            println!(
                "{:<22} {:>4} {:<8} {:<10} {:>6} {:>6} {:>8} {:>8} {:>8}  {}",
                ep,
                r.id,
                r.name,
                r.role,
                r.leader,
                r.term,
                r.commit,
                r.applied,
                r.kv_revision,
                if r.healthy { "ok" } else { "UNHEALTHY" }
            );
        }
        if let Some((_, r)) = reports.first() {
            println!("members ({} {}):", r.consensus, r.cluster_id);
            for m in &r.members {
                let role = if r.learners.contains(&m.id) {
                    "learner"
                } else {
                    "voter"
                };
                println!(
                    "  {:>4} {:<8} peer {:<21} client {:<21} {role}",
                    m.id, m.name, m.peer_addr, m.client_addr
                );
            }
        }
    }
    if failed > 0 {
        return Err(format!("{failed} endpoint(s) did not answer"));
    }
    Ok(())
}
