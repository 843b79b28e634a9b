//! Real `concord start` processes: ports, config files, start/kill/pause/restart, and a
//! guard that kills every child when the harness exits, panics or is interrupted.

use crate::proxy::{self, Net};
use std::fs::OpenOptions;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::process::{Child, Command};

/// Ports per node: client, peer, admin.
const PORTS_PER_NODE: u16 = 3;
/// Port window for harness runs; a run uses one block of `PORT_STRIDE` ports inside it.
/// The window ends below the kernel's ephemeral range (`ip_local_port_range`): a port in
/// that range can be handed to an outgoing connection while its node is down, and the
/// node then cannot bind it again when restarted (seen in CI: a re-added learner exited
/// with "address in use" on every restart).
const PORT_LOW: u16 = 20_000;
/// Used when `/proc/sys/net/ipv4/ip_local_port_range` cannot be read (Linux's default low
/// end).
const EPHEMERAL_LOW_DEFAULT: u16 = 32_768;
const PORT_STRIDE: u16 = 20;
/// Blocks tried before giving up on finding free ports.
const PORT_ATTEMPTS_MAX: u64 = 50;
/// Nodes listen on 127.0.0.1; their proxies on 127.0.0.2 with the same port numbers.
const NODE_IP: [u8; 4] = [127, 0, 0, 1];
const PROXY_IP: [u8; 4] = [127, 0, 0, 2];

#[derive(Clone, Copy, Debug)]
pub struct Layout {
    pub base: u16,
    pub nodes: usize,
}

impl Layout {
    fn port(&self, slot: usize, off: u16) -> u16 {
        self.base + slot as u16 * PORTS_PER_NODE + off
    }
    pub fn client(&self, slot: usize) -> SocketAddr {
        (NODE_IP, self.port(slot, 0)).into()
    }
    pub fn peer(&self, slot: usize) -> SocketAddr {
        (NODE_IP, self.port(slot, 1)).into()
    }
    pub fn admin(&self, slot: usize) -> SocketAddr {
        (NODE_IP, self.port(slot, 2)).into()
    }
    /// Where every other node reaches this slot's peer port (through the fault proxy).
    pub fn proxy(&self, slot: usize) -> SocketAddr {
        (PROXY_IP, self.port(slot, 1)).into()
    }

    /// A block of ports derived from the seed and our pid, skipping blocks where any port
    /// (node or proxy address) is taken.
    pub fn choose(nodes: usize, seed: u64, pid: u32) -> Result<Layout, String> {
        assert!(
            nodes as u16 * PORTS_PER_NODE <= PORT_STRIDE,
            "stride fits the nodes"
        );
        let start = seed
            .wrapping_mul(0x9E37_79B9)
            .wrapping_add(pid as u64 * 7919);
        let blocks = port_blocks(ephemeral_low());
        if blocks == 0 {
            return Err(format!(
                "no ports below the ephemeral range (starts at {}) above {PORT_LOW}; lower net.ipv4.ip_local_port_range's start",
                ephemeral_low()
            ));
        }
        for i in 0..PORT_ATTEMPTS_MAX {
            let block = (start.wrapping_add(i * 131)) % blocks;
            let l = Layout {
                base: PORT_LOW + block as u16 * PORT_STRIDE,
                nodes,
            };
            let free = (0..nodes).all(|s| {
                [l.client(s), l.peer(s), l.admin(s), l.proxy(s)]
                    .iter()
                    .all(|a| StdListener::bind(a).is_ok())
            });
            if free {
                return Ok(l);
            }
        }
        Err(format!(
            "no free block of ports found in {PORT_ATTEMPTS_MAX} attempts"
        ))
    }
}

/// The last line of a node's log that reports an error, so a crash report says why.
fn last_error_line(log: &Path) -> Option<String> {
    let text = std::fs::read(log).ok()?;
    let tail = &text[text.len().saturating_sub(64 * 1024)..];
    String::from_utf8_lossy(tail)
        .lines()
        .rev()
        .find(|l| l.contains("error") || l.contains("panicked"))
        .map(|l| l.trim().chars().take(300).collect())
}

/// The first port the kernel may hand out to outgoing connections.
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
        .unwrap_or(EPHEMERAL_LOW_DEFAULT)
}

/// How many whole blocks fit between `PORT_LOW` and `limit` (exclusive).
fn port_blocks(limit: u16) -> u64 {
    (limit.saturating_sub(PORT_LOW) / PORT_STRIDE) as u64
}

/// One node position. Its id changes when the membership nemesis re-adds it.
pub struct NodeProc {
    pub slot: usize,
    pub id: u64,
    pub child: Option<Child>,
    pub paused: bool,
    pub starts: u32,
}

impl NodeProc {
    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().and_then(|c| c.id()).map(|p| p as i32)
    }
    pub fn running(&self) -> bool {
        self.child.is_some()
    }
}

pub struct Cluster {
    pub bin: PathBuf,
    pub dir: PathBuf,
    pub layout: Layout,
    pub engine: String,
    pub token: String,
    pub snapshot_every: u64,
    pub net: Arc<Net>,
    pub nodes: Vec<NodeProc>,
}

impl Cluster {
    /// Binds the proxies and writes nothing else yet; `start_all` launches the nodes.
    pub async fn new(
        bin: PathBuf,
        dir: PathBuf,
        layout: Layout,
        engine: &str,
        token: String,
        snapshot_every: u64,
    ) -> Result<Cluster, String> {
        let net = Net::new();
        let mut nodes = Vec::new();
        for slot in 0..layout.nodes {
            let id = slot as u64 + 1;
            net.set_id(id, slot);
            let l = TcpListener::bind(layout.proxy(slot))
                .await
                .map_err(|e| format!("proxy for node {id} on {}: {e}", layout.proxy(slot)))?;
            tokio::spawn(proxy::run(net.clone(), slot, l, layout.peer(slot)));
            nodes.push(NodeProc {
                slot,
                id,
                child: None,
                paused: false,
                starts: 0,
            });
        }
        Ok(Cluster {
            bin,
            dir,
            layout,
            engine: engine.to_string(),
            token,
            snapshot_every,
            net,
            nodes,
        })
    }

    pub fn n(&self) -> usize {
        self.nodes.len()
    }

    pub fn data_dir(&self, slot: usize) -> PathBuf {
        self.dir
            .join(format!("data-slot{slot}-id{}", self.nodes[slot].id))
    }

    pub fn log_path(&self, slot: usize) -> PathBuf {
        self.dir.join(format!("node-slot{slot}.log"))
    }

    /// The peers list every node gets: the current ids at their proxy addresses.
    fn peers_text(&self, ids: &[(u64, usize)]) -> String {
        ids.iter()
            .map(|(id, slot)| format!("{id}={}", self.layout.proxy(*slot)))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Writes the node's TOML config. `members` are the (id, slot) pairs it starts with.
    fn write_config(&self, slot: usize, members: &[(u64, usize)]) -> Result<PathBuf, String> {
        let id = self.nodes[slot].id;
        let l = &self.layout;
        // Own entry: the proxy address (same port as the real listener, which is all the
        // node checks), so every node's member table names proxies only, and a snapshot
        // shipped between nodes never teaches anyone a real peer address.
        let text = format!(
            "id = {id}\nname = \"node{id}\"\nlisten-client = \"{}\"\nlisten-peer = \"{}\"\n\
             listen-admin = \"{}\"\npeers = \"{}\"\ndata-dir = \"{}\"\nconsensus = \"{}\"\n\
             cluster-token = \"{}\"\nsnapshot-every-entries = {}\n",
            l.client(slot),
            l.peer(slot),
            l.admin(slot),
            self.peers_text(members),
            self.data_dir(slot).display(),
            self.engine,
            self.token,
            self.snapshot_every,
        );
        let path = self.dir.join(format!("node-slot{slot}-id{id}.toml"));
        std::fs::write(&path, text).map_err(|e| format!("writing {}: {e}", path.display()))?;
        Ok(path)
    }

    fn founding(&self) -> Vec<(u64, usize)> {
        self.nodes.iter().map(|p| (p.id, p.slot)).collect()
    }

    pub fn start_all(&mut self) -> Result<(), String> {
        let members = self.founding();
        for slot in 0..self.n() {
            self.start_with(slot, &members)?;
        }
        Ok(())
    }

    /// (Re)starts the process of `slot` with its existing data (no-op if running).
    pub fn start(&mut self, slot: usize) -> Result<(), String> {
        let members = self.founding();
        self.start_with(slot, &members)
    }

    pub fn start_with(&mut self, slot: usize, members: &[(u64, usize)]) -> Result<(), String> {
        if self.nodes[slot].running() {
            return Ok(());
        }
        let cfg = self.write_config(slot, members)?;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(slot))
            .map_err(|e| format!("opening {}: {e}", self.log_path(slot).display()))?;
        let log2 = log
            .try_clone()
            .map_err(|e| format!("log of node slot {slot}: {e}"))?;
        let child = Command::new(&self.bin)
            .arg("start")
            .arg("--config")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", self.bin.display()))?;
        let p = &mut self.nodes[slot];
        p.child = Some(child);
        p.paused = false;
        p.starts += 1;
        Ok(())
    }

    /// kill -9, then reap the process.
    pub async fn kill(&mut self, slot: usize) {
        let p = &mut self.nodes[slot];
        if let Some(mut c) = p.child.take() {
            let _ = c.start_kill();
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), c.wait()).await;
        }
        p.paused = false;
    }

    pub fn pause(&mut self, slot: usize) {
        let p = &mut self.nodes[slot];
        if let Some(pid) = p.pid() {
            signal(pid, libc::SIGSTOP);
            p.paused = true;
        }
    }

    pub fn resume(&mut self, slot: usize) {
        let p = &mut self.nodes[slot];
        if let Some(pid) = p.pid() {
            signal(pid, libc::SIGCONT);
        }
        p.paused = false;
    }

    /// Notes processes that died on their own (a crash is a finding, and must be restarted).
    pub fn reap_exited(&mut self) -> Vec<(usize, String)> {
        let mut out = Vec::new();
        for slot in 0..self.nodes.len() {
            let p = &mut self.nodes[slot];
            if let Some(c) = &mut p.child {
                if let Ok(Some(st)) = c.try_wait() {
                    p.child = None;
                    let why = match last_error_line(&self.log_path(slot)) {
                        Some(l) => format!("{st}; its log says: {l}"),
                        None => st.to_string(),
                    };
                    out.push((slot, why));
                }
            }
        }
        out
    }

    /// Heals everything: links pass, paused nodes continue, dead nodes restart.
    pub fn heal_all(&mut self) -> Result<(), String> {
        self.net.heal();
        for slot in 0..self.n() {
            if self.nodes[slot].paused {
                self.resume(slot);
            }
        }
        for slot in 0..self.n() {
            if !self.nodes[slot].running() {
                self.start(slot)?;
            }
        }
        Ok(())
    }

    /// Moves `slot` to a brand-new node id with an empty data folder (membership nemesis).
    pub fn renumber(&mut self, slot: usize, new_id: u64) -> Result<(), String> {
        self.nodes[slot].id = new_id;
        self.net.set_id(new_id, slot);
        let d = self.data_dir(slot);
        if d.exists() {
            std::fs::remove_dir_all(&d).map_err(|e| format!("removing {}: {e}", d.display()))?;
        }
        Ok(())
    }

    pub fn members(&self) -> Vec<(u64, usize)> {
        self.founding()
    }
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) with a pid we spawned and still own (not yet reaped); no memory is
    // shared with the callee.
    unsafe {
        libc::kill(pid, sig);
    }
}

impl Drop for Cluster {
    /// Every child dies with the harness: SIGKILL works on stopped processes too.
    fn drop(&mut self) {
        for p in &mut self.nodes {
            if let Some(c) = &mut p.child {
                let _ = c.start_kill();
            }
        }
    }
}

/// The default `concord` binary: next to the harness binary (both built by cargo into
/// the same `target/<profile>/`), falling back to `target/release/concord`.
pub fn default_bin() -> PathBuf {
    if let Ok(me) = std::env::current_exe() {
        if let Some(dir) = me.parent() {
            let p = dir.join("concord");
            if p.exists() {
                return p;
            }
        }
    }
    Path::new("target/release/concord").to_path_buf()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_blocks_stay_below_the_ephemeral_range() {
        assert_eq!(port_blocks(32_768), 638);
        assert_eq!(port_blocks(PORT_LOW), 0);
        assert_eq!(port_blocks(1024), 0);
        let limit = ephemeral_low();
        for seed in 0..200 {
            if let Ok(l) = Layout::choose(5, seed, 4242) {
                let top = l.port(4, PORTS_PER_NODE - 1);
                assert!(
                    top < limit,
                    "port {top} reaches the ephemeral range at {limit}"
                );
            }
        }
    }

    #[test]
    fn crash_reports_quote_the_nodes_error() {
        let dir = std::env::temp_dir().join(format!("chaos-log-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("n.log");
        std::fs::write(&p, "starting\nerror: binding 127.0.0.1:1: Address in use\n").unwrap();
        assert_eq!(
            last_error_line(&p).as_deref(),
            Some("error: binding 127.0.0.1:1: Address in use")
        );
        std::fs::write(&p, "all fine\n").unwrap();
        assert_eq!(last_error_line(&p), None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
