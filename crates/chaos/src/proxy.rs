//! The fault proxy: one TCP listener in front of each node's peer port.
//!
//! Every node names the proxies (on 127.0.0.2) as its peers' addresses, so all consensus
//! traffic crosses this process. Concord's peer transport dials one connection per directed
//! link (i -> j) and opens it with a handshake frame that carries the sender's and the
//! receiver's node ids; the proxy reads that frame, so one listener per destination still
//! gives per-directed-link control:
//!
//! - **pass**: bytes are copied both ways;
//! - **drop** (partition): open connections of the link are cut, new ones are accepted and
//!   black-holed (bytes read and discarded, like packets lost on a dead path) until the
//!   link heals, then closed so the sender reconnects cleanly;
//! - **delay** (slow link): every chunk sent i -> j is held for the link's delay before it is
//!   forwarded, in order.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::time::{sleep_until, timeout, Instant};

/// Concord's peer handshake: a 4-byte big-endian frame length (32), then magic, cluster id,
/// from id and to id (u64 little-endian each).
pub const HANDSHAKE_BYTES: usize = 4 + 32;
const HANDSHAKE_MAGIC: &[u8; 8] = b"CONCORD1";
/// A connection that does not send its handshake within this time is dropped.
const HANDSHAKE_TIMEOUT_MS: u64 = 5_000;
const CONNECT_TIMEOUT_MS: u64 = 1_000;
/// Connections served at once per proxy (the mesh needs one per peer, plus reconnects).
const CONNS_PER_PROXY_MAX: usize = 64;
/// Chunks held back on one delayed link before the reader waits (back-pressure).
const DELAY_QUEUE_MAX: usize = 1024;
const CHUNK_BYTES: usize = 64 * 1024;
/// A black-holed connection is closed after this long even if the link never heals.
const BLACKHOLE_MAX_MS: u64 = 60_000;

/// The fault state of every directed link, by slot (a node's position in the cluster,
/// which survives restarts and re-adds under a new id).
#[derive(Default)]
struct NetState {
    blocked: HashSet<(usize, usize)>,
    delay_ms: HashMap<(usize, usize), u64>,
    slot_of_id: HashMap<u64, usize>,
}

/// Shared by the nemesis (which changes it) and the proxies (which obey it).
pub struct Net {
    state: Mutex<NetState>,
    changed: watch::Sender<u64>,
}

impl Net {
    pub fn new() -> Arc<Net> {
        Arc::new(Net {
            state: Mutex::new(NetState::default()),
            changed: watch::channel(0).0,
        })
    }

    fn bump(&self) {
        self.changed.send_modify(|g| *g += 1);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, NetState> {
        // A panic while holding this lock cannot leave it half-updated (single inserts).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_id(&self, id: u64, slot: usize) {
        let mut s = self.lock();
        s.slot_of_id.retain(|_, v| *v != slot);
        s.slot_of_id.insert(id, slot);
    }

    pub fn slot_of(&self, id: u64) -> Option<usize> {
        self.lock().slot_of_id.get(&id).copied()
    }

    /// Cuts the directed link `from -> to`.
    pub fn block(&self, from: usize, to: usize) {
        self.lock().blocked.insert((from, to));
        self.bump();
    }

    /// Cuts both directions between every node of `a` and every node of `b`.
    pub fn split(&self, a: &[usize], b: &[usize]) {
        {
            let mut s = self.lock();
            for &x in a {
                for &y in b {
                    s.blocked.insert((x, y));
                    s.blocked.insert((y, x));
                }
            }
        }
        self.bump();
    }

    pub fn delay(&self, from: usize, to: usize, ms: u64) {
        self.lock().delay_ms.insert((from, to), ms);
        self.bump();
    }

    /// Removes every partition and delay.
    pub fn heal(&self) {
        {
            let mut s = self.lock();
            s.blocked.clear();
            s.delay_ms.clear();
        }
        self.bump();
    }

    pub fn is_blocked(&self, from: usize, to: usize) -> bool {
        self.lock().blocked.contains(&(from, to))
    }

    fn delay_of(&self, from: usize, to: usize) -> Duration {
        Duration::from_millis(self.lock().delay_ms.get(&(from, to)).copied().unwrap_or(0))
    }
}

/// The sender's node id, if `hs` is a Concord peer handshake.
pub fn handshake_from(hs: &[u8; HANDSHAKE_BYTES]) -> Option<u64> {
    let len = u32::from_be_bytes(hs[0..4].try_into().ok()?);
    if len != 32 || &hs[4..12] != HANDSHAKE_MAGIC {
        return None;
    }
    Some(u64::from_le_bytes(hs[20..28].try_into().ok()?))
}

/// Serves the proxy for slot `to` on `listener`, forwarding to the node's real `upstream`.
/// Runs until the runtime shuts down.
pub async fn run(net: Arc<Net>, to: usize, listener: TcpListener, upstream: SocketAddr) {
    let conns = Arc::new(Semaphore::new(CONNS_PER_PROXY_MAX));
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            // Out of descriptors or similar: back off instead of spinning.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(permit) = conns.clone().try_acquire_owned() else {
            continue; // Too many connections: dropping this one makes the peer retry.
        };
        let net = net.clone();
        tokio::spawn(async move {
            serve_conn(net, to, sock, upstream).await;
            drop(permit);
        });
    }
}

async fn serve_conn(net: Arc<Net>, to: usize, mut client: TcpStream, upstream: SocketAddr) {
    let _ = client.set_nodelay(true);
    let mut hs = [0u8; HANDSHAKE_BYTES];
    match timeout(
        Duration::from_millis(HANDSHAKE_TIMEOUT_MS),
        client.read_exact(&mut hs),
    )
    .await
    {
        Ok(Ok(_)) => {}
        _ => return,
    }
    // An unknown sender (not a Concord handshake, or an id we never started) is refused.
    let Some(from) = handshake_from(&hs).and_then(|id| net.slot_of(id)) else {
        return;
    };
    let mut changed = net.changed.subscribe();
    if net.is_blocked(from, to) {
        blackhole(&net, from, to, client, changed).await;
        return;
    }
    let Ok(Ok(mut up)) = timeout(
        Duration::from_millis(CONNECT_TIMEOUT_MS),
        TcpStream::connect(upstream),
    )
    .await
    else {
        return; // The node is down: the sender sees a closed connection and retries.
    };
    let _ = up.set_nodelay(true);
    if up.write_all(&hs).await.is_err() {
        return;
    }
    let (mut cr, mut cw) = client.into_split();
    let (mut ur, mut uw) = up.into_split();
    let back = tokio::io::copy(&mut ur, &mut cw);
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(DELAY_QUEUE_MAX);
    let net2 = net.clone();
    let forward_read = async move {
        let mut buf = vec![0u8; CHUNK_BYTES];
        let mut last = Instant::now();
        loop {
            let n = match cr.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            // Never release a chunk before an earlier one: a delay that shrinks must not
            // reorder the byte stream.
            let at = (Instant::now() + net2.delay_of(from, to)).max(last);
            last = at;
            if tx.send((at, buf[..n].to_vec())).await.is_err() {
                return;
            }
        }
    };
    let forward_write = async move {
        while let Some((at, chunk)) = rx.recv().await {
            sleep_until(at).await;
            if uw.write_all(&chunk).await.is_err() {
                return;
            }
        }
    };
    let cut = async {
        loop {
            if changed.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
            if net.is_blocked(from, to) {
                return;
            }
        }
    };
    // Whichever ends first (either side closed, or the link was cut) closes both sockets.
    tokio::select! {
        _ = async { tokio::join!(forward_read, forward_write) } => {}
        _ = back => {}
        _ = cut => {}
    }
}

/// Reads and discards until the link heals (or a bound passes), then closes.
async fn blackhole(
    net: &Net,
    from: usize,
    to: usize,
    mut client: TcpStream,
    mut changed: watch::Receiver<u64>,
) {
    let deadline = Instant::now() + Duration::from_millis(BLACKHOLE_MAX_MS);
    let mut buf = vec![0u8; CHUNK_BYTES];
    loop {
        tokio::select! {
            r = client.read(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            },
            r = changed.changed() => {
                if r.is_err() || !net.is_blocked(from, to) {
                    return;
                }
            }
            _ = sleep_until(deadline) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handshake(from: u64, to: u64) -> [u8; HANDSHAKE_BYTES] {
        let mut hs = [0u8; HANDSHAKE_BYTES];
        hs[0..4].copy_from_slice(&32u32.to_be_bytes());
        hs[4..12].copy_from_slice(HANDSHAKE_MAGIC);
        hs[12..20].copy_from_slice(&7u64.to_le_bytes());
        hs[20..28].copy_from_slice(&from.to_le_bytes());
        hs[28..36].copy_from_slice(&to.to_le_bytes());
        hs
    }

    #[test]
    fn reads_the_sender_from_a_handshake() {
        assert_eq!(handshake_from(&handshake(3, 1)), Some(3));
        let mut bad = handshake(3, 1);
        bad[5] = b'X';
        assert_eq!(handshake_from(&bad), None);
        let mut bad = handshake(3, 1);
        bad[3] = 31;
        assert_eq!(handshake_from(&bad), None);
    }

    /// A real round trip through the proxy: bytes pass, then a cut closes the link and new
    /// connections are black-holed, and after healing traffic passes again.
    #[tokio::test]
    async fn passes_cuts_and_heals() {
        let net = Net::new();
        net.set_id(1, 0);
        net.set_id(2, 1);
        let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up_addr = upstream.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = upstream.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    loop {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                if s.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let p_addr = proxy.local_addr().unwrap();
        tokio::spawn(run(net.clone(), 1, proxy, up_addr));

        let mut c = TcpStream::connect(p_addr).await.unwrap();
        c.write_all(&handshake(1, 2)).await.unwrap();
        let mut echo = [0u8; HANDSHAKE_BYTES];
        c.read_exact(&mut echo).await.unwrap();
        assert_eq!(echo, handshake(1, 2));

        net.block(0, 1);
        let mut buf = [0u8; 8];
        let r = timeout(Duration::from_secs(2), c.read(&mut buf))
            .await
            .unwrap();
        assert!(matches!(r, Ok(0) | Err(_)), "a cut closes the connection");

        let mut c = TcpStream::connect(p_addr).await.unwrap();
        c.write_all(&handshake(1, 2)).await.unwrap();
        let r = timeout(Duration::from_millis(300), c.read(&mut buf)).await;
        assert!(r.is_err(), "a cut link answers nothing");
        net.heal();
        let r = timeout(Duration::from_secs(2), c.read(&mut buf))
            .await
            .unwrap();
        assert!(
            matches!(r, Ok(0) | Err(_)),
            "healing closes black-holed connections"
        );

        net.delay(0, 1, 200);
        let mut c = TcpStream::connect(p_addr).await.unwrap();
        c.write_all(&handshake(1, 2)).await.unwrap();
        c.read_exact(&mut echo).await.unwrap();
        // The handshake goes straight through; frames after it are held back.
        let t0 = Instant::now();
        c.write_all(b"payload!").await.unwrap();
        c.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"payload!");
        assert!(
            t0.elapsed() >= Duration::from_millis(200),
            "slow link holds bytes"
        );
    }
}
