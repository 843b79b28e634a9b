//! Peer transport: TCP with length-delimited frames.
//!
//! Each node dials one outbound connection per peer and only writes on it; it accepts
//! inbound connections from peers and only reads from them (after the handshake reply).
//! A connection starts with a handshake carrying the cluster id and both node ids; a peer of
//! another cluster, or one that dialled the wrong node, is refused with a log line naming
//! the mismatch. Every later frame is an envelope `{group, from, to, kind, payload}`.
//!
//! Queues are bounded (`peer_queue_max`, `inbound_queue_max`): when one is full the frame is
//! dropped, which consensus tolerates (it retransmits on the next heartbeat). A malformed
//! frame is logged and its connection dropped, never a panic.

use crate::config::Limits;
use bytes::{BufMut, Bytes, BytesMut};
use concord_consensus::{GroupId, NodeId};
use futures_util::{SinkExt, StreamExt};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_util::codec::{Framed, LengthDelimitedCodec};

/// First bytes of a handshake; the digit is the wire version.
pub const HANDSHAKE_MAGIC: &[u8; 8] = b"CONCORD1";
/// Handshake frame length: magic, cluster id, from, to.
const HANDSHAKE_LEN: usize = 8 + 8 + 8 + 8;
/// Envelope header: group, from, to (u64 LE each), kind (u8).
pub const FRAME_HEADER_LEN: usize = 25;
/// Most inbound peer connections served at once.
pub const INBOUND_CONNS_MAX: usize = 256;
/// Reconnect back-off bounds.
pub const BACKOFF_MIN_MS: u64 = 20;
pub const BACKOFF_MAX_MS: u64 = 2_000;
/// A handshake not completed within this time drops the connection.
pub const HANDSHAKE_TIMEOUT_MS: u64 = 3_000;
pub const CONNECT_TIMEOUT_MS: u64 = 1_000;
/// Failed connection attempts before a peer is reported unreachable.
const UNREACHABLE_REPORT_AFTER: u32 = 5;

/// What a frame carries; the group task interprets the payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// `R::encode_message` bytes.
    Consensus = 1,
    /// A client proposal forwarded to the leader: an encoded request envelope.
    Forward = 2,
    /// The leader refused a forwarded proposal.
    ForwardNack = 3,
    /// A follower asks the leader for a read index.
    ReadIndexReq = 4,
    /// The leader answers with the index a read must wait for.
    ReadIndexResp = 5,
    /// A membership change (add, remove, promote) forwarded to the leader.
    MemberReq = 6,
    /// The leader's answer to a forwarded membership change.
    MemberResp = 7,
}

impl FrameKind {
    fn from_u8(b: u8) -> Option<FrameKind> {
        Some(match b {
            1 => FrameKind::Consensus,
            2 => FrameKind::Forward,
            3 => FrameKind::ForwardNack,
            4 => FrameKind::ReadIndexReq,
            5 => FrameKind::ReadIndexResp,
            6 => FrameKind::MemberReq,
            7 => FrameKind::MemberResp,
            _ => return None,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub group: GroupId,
    pub from: NodeId,
    pub to: NodeId,
    pub kind: FrameKind,
    pub payload: Bytes,
}

impl Frame {
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(FRAME_HEADER_LEN + self.payload.len());
        b.put_u64_le(self.group);
        b.put_u64_le(self.from);
        b.put_u64_le(self.to);
        b.put_u8(self.kind as u8);
        b.extend_from_slice(&self.payload);
        b.freeze()
    }

    /// Decodes an envelope. Never panics on bad input.
    pub fn decode(mut b: Bytes) -> Result<Frame, String> {
        if b.len() < FRAME_HEADER_LEN {
            return Err(format!(
                "frame of {} bytes is shorter than the {FRAME_HEADER_LEN}-byte header",
                b.len()
            ));
        }
        let u = |s: &[u8]| u64::from_le_bytes(s.try_into().expect("8 bytes"));
        let group = u(&b[0..8]);
        let from = u(&b[8..16]);
        let to = u(&b[16..24]);
        let kind =
            FrameKind::from_u8(b[24]).ok_or_else(|| format!("unknown frame kind {}", b[24]))?;
        let payload = b.split_off(FRAME_HEADER_LEN);
        Ok(Frame {
            group,
            from,
            to,
            kind,
            payload,
        })
    }
}

fn encode_handshake(cluster: u64, from: NodeId, to: NodeId) -> Bytes {
    let mut b = BytesMut::with_capacity(HANDSHAKE_LEN);
    b.extend_from_slice(HANDSHAKE_MAGIC);
    b.put_u64_le(cluster);
    b.put_u64_le(from);
    b.put_u64_le(to);
    b.freeze()
}

fn decode_handshake(b: &[u8]) -> Result<(u64, NodeId, NodeId), String> {
    if b.len() != HANDSHAKE_LEN || &b[..8] != HANDSHAKE_MAGIC {
        return Err("not a Concord peer handshake (wrong magic or length)".into());
    }
    let u = |s: &[u8]| u64::from_le_bytes(s.try_into().expect("8 bytes"));
    Ok((u(&b[8..16]), u(&b[16..24]), u(&b[24..32])))
}

/// Counters exported on /metrics.
#[derive(Default, Debug)]
pub struct TransportStats {
    pub frames_sent: AtomicU64,
    pub frames_dropped: AtomicU64,
    pub frames_received: AtomicU64,
    pub connects: AtomicU64,
    pub handshake_rejects: AtomicU64,
}

/// Inbound frames for each group, by group id.
type Routes = RwLock<HashMap<GroupId, mpsc::Sender<Frame>>>;

struct PeerLink {
    addr: SocketAddr,
    tx: mpsc::Sender<Bytes>,
}

/// One node's side of the peer mesh.
pub struct Transport {
    id: NodeId,
    cluster_id: u64,
    limits: Limits,
    peers: Mutex<HashMap<NodeId, PeerLink>>,
    routes: Arc<Routes>,
    pub stats: Arc<TransportStats>,
    shutdown: watch::Receiver<bool>,
    /// The networking runtime captured in `start`. Peers can be added later from a group's
    /// own thread (on a membership change), whose runtime has no IO driver, so connection
    /// tasks must always be spawned here rather than on the caller's runtime.
    net: tokio::runtime::Handle,
}

impl Transport {
    /// Starts accepting peer connections on `listener` and dials every peer in `peers`
    /// (this node's own entry is skipped).
    pub fn start(
        id: NodeId,
        cluster_id: u64,
        listener: TcpListener,
        peers: &HashMap<NodeId, SocketAddr>,
        limits: Limits,
        shutdown: watch::Receiver<bool>,
    ) -> Arc<Transport> {
        let t = Arc::new(Transport {
            id,
            cluster_id,
            limits,
            peers: Mutex::new(HashMap::new()),
            routes: Arc::new(RwLock::new(HashMap::new())),
            stats: Arc::new(TransportStats::default()),
            shutdown,
            net: tokio::runtime::Handle::current(),
        });
        for (&peer, &addr) in peers {
            t.add_peer(peer, addr);
        }
        tokio::spawn(accept_loop(
            listener,
            id,
            cluster_id,
            t.limits.clone(),
            t.routes.clone(),
            t.stats.clone(),
            t.shutdown.clone(),
        ));
        t
    }

    pub fn id(&self) -> NodeId {
        self.id
    }

    /// Registers where a group's inbound frames go.
    pub fn register_group(&self, group: GroupId, tx: mpsc::Sender<Frame>) {
        self.routes.write().expect("routes lock").insert(group, tx);
    }

    /// Adds (or re-addresses) a peer and starts its outbound connection task.
    pub fn add_peer(&self, peer: NodeId, addr: SocketAddr) {
        if peer == self.id {
            return;
        }
        let mut peers = self.peers.lock().expect("peers lock");
        if peers.get(&peer).map(|l| l.addr) == Some(addr) {
            return;
        }
        // Dropping an old link's sender ends its task.
        let (tx, rx) = mpsc::channel(self.limits.peer_queue_max);
        peers.insert(peer, PeerLink { addr, tx });
        self.net.spawn(outbound_loop(
            self.id,
            self.cluster_id,
            peer,
            addr,
            rx,
            self.limits.clone(),
            self.stats.clone(),
            self.shutdown.clone(),
        ));
    }

    pub fn remove_peer(&self, peer: NodeId) {
        self.peers.lock().expect("peers lock").remove(&peer);
    }

    pub fn peer_addr(&self, peer: NodeId) -> Option<SocketAddr> {
        self.peers
            .lock()
            .expect("peers lock")
            .get(&peer)
            .map(|l| l.addr)
    }

    /// Queues a frame for its peer. Returns false when it was dropped (unknown peer or a
    /// full queue); callers rely on consensus retransmission or their request timeouts.
    pub fn send(&self, frame: Frame) -> bool {
        debug_assert_eq!(frame.from, self.id, "frames leave with our own id");
        let peers = self.peers.lock().expect("peers lock");
        let ok = match peers.get(&frame.to) {
            Some(link) => link.tx.try_send(frame.encode()).is_ok(),
            None => false,
        };
        if ok {
            self.stats.frames_sent.fetch_add(1, Ordering::Relaxed);
        } else {
            self.stats.frames_dropped.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }
}

fn codec(limits: &Limits) -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_type::<u32>()
        .max_frame_length(limits.max_frame_bytes)
        .new_codec()
}

#[allow(clippy::too_many_arguments)] // One task's whole context, passed once at spawn.
async fn outbound_loop(
    me: NodeId,
    cluster: u64,
    peer: NodeId,
    addr: SocketAddr,
    mut rx: mpsc::Receiver<Bytes>,
    limits: Limits,
    stats: Arc<TransportStats>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff_ms = BACKOFF_MIN_MS;
    // Peers start in any order: only report a peer unreachable after a few attempts.
    let mut failures = 0u32;
    loop {
        if *shutdown.borrow() {
            return;
        }
        match dial(me, cluster, peer, addr, &limits).await {
            Ok(mut framed) => {
                stats.connects.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(node = me, peer, %addr, "connected to peer");
                backoff_ms = BACKOFF_MIN_MS;
                failures = 0;
                loop {
                    let first = tokio::select! {
                        m = rx.recv() => m,
                        _ = shutdown.changed() => return,
                    };
                    let Some(first) = first else {
                        return; // The link was removed or replaced.
                    };
                    // Batch whatever else is already queued into one flush.
                    let mut res = framed.feed(first).await;
                    let mut n = 1;
                    while res.is_ok() && n < limits.peer_write_batch_max {
                        match rx.try_recv() {
                            Ok(m) => {
                                res = framed.feed(m).await;
                                n += 1;
                            }
                            Err(_) => break,
                        }
                    }
                    if res.is_ok() {
                        res = SinkExt::<Bytes>::flush(&mut framed).await;
                    }
                    if let Err(e) = res {
                        tracing::debug!(node = me, peer, %addr, "peer write failed: {e}");
                        break;
                    }
                }
            }
            Err(DialError::Rejected(why)) => {
                stats.handshake_rejects.fetch_add(1, Ordering::Relaxed);
                tracing::error!(node = me, peer, %addr, "peer refused our handshake: {why}");
                backoff_ms = BACKOFF_MAX_MS;
            }
            Err(DialError::Io(e)) => {
                failures += 1;
                if failures == UNREACHABLE_REPORT_AFTER {
                    tracing::info!(node = me, peer, %addr, "cannot reach peer ({e}); retrying with back-off");
                }
            }
        }
        // Frames queued while the peer was unreachable are stale; consensus resends what
        // still matters, so drop them rather than replay a burst.
        while rx.try_recv().is_ok() {
            stats.frames_dropped.fetch_add(1, Ordering::Relaxed);
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(backoff_ms)) => {}
            _ = shutdown.changed() => return,
        }
        backoff_ms = (backoff_ms * 2).min(BACKOFF_MAX_MS);
    }
}

enum DialError {
    Io(String),
    Rejected(String),
}

async fn dial(
    me: NodeId,
    cluster: u64,
    peer: NodeId,
    addr: SocketAddr,
    limits: &Limits,
) -> Result<Framed<TcpStream, LengthDelimitedCodec>, DialError> {
    let stream = tokio::time::timeout(
        Duration::from_millis(CONNECT_TIMEOUT_MS),
        TcpStream::connect(addr),
    )
    .await
    .map_err(|_| DialError::Io("connect timed out".into()))?
    .map_err(|e| DialError::Io(e.to_string()))?;
    let _ = stream.set_nodelay(true);
    let mut framed = Framed::new(stream, codec(limits));
    framed
        .send(encode_handshake(cluster, me, peer))
        .await
        .map_err(|e| DialError::Io(e.to_string()))?;
    let reply = tokio::time::timeout(Duration::from_millis(HANDSHAKE_TIMEOUT_MS), framed.next())
        .await
        .map_err(|_| DialError::Io("handshake reply timed out".into()))?;
    match reply {
        Some(Ok(b)) if b.first() == Some(&0) => Ok(framed),
        Some(Ok(b)) if !b.is_empty() => Err(DialError::Rejected(
            String::from_utf8_lossy(&b[1..]).into_owned(),
        )),
        Some(Ok(_)) => Err(DialError::Rejected("empty handshake reply".into())),
        Some(Err(e)) => Err(DialError::Io(e.to_string())),
        None => Err(DialError::Io("peer closed during handshake".into())),
    }
}

async fn accept_loop(
    listener: TcpListener,
    me: NodeId,
    cluster: u64,
    limits: Limits,
    routes: Arc<Routes>,
    stats: Arc<TransportStats>,
    mut shutdown: watch::Receiver<bool>,
) {
    let conns = Arc::new(Semaphore::new(INBOUND_CONNS_MAX));
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => return,
        };
        let (stream, remote) = match accepted {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(node = me, "peer accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = conns.clone().try_acquire_owned() else {
            tracing::warn!(node = me, %remote, "too many inbound peer connections ({INBOUND_CONNS_MAX}); refusing");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (limits, routes, stats, shutdown) = (
            limits.clone(),
            routes.clone(),
            stats.clone(),
            shutdown.clone(),
        );
        tokio::spawn(async move {
            let _permit = permit;
            serve_inbound(stream, remote, me, cluster, limits, routes, stats, shutdown).await;
        });
    }
}

#[allow(clippy::too_many_arguments)] // One task's whole context, passed once at spawn.
async fn serve_inbound(
    stream: TcpStream,
    remote: SocketAddr,
    me: NodeId,
    cluster: u64,
    limits: Limits,
    routes: Arc<Routes>,
    stats: Arc<TransportStats>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut framed = Framed::new(stream, codec(&limits));
    let first =
        tokio::time::timeout(Duration::from_millis(HANDSHAKE_TIMEOUT_MS), framed.next()).await;
    let hs = match first {
        Ok(Some(Ok(b))) => decode_handshake(&b),
        Ok(Some(Err(e))) => Err(format!("bad first frame: {e}")),
        Ok(None) => return,
        Err(_) => Err("no handshake within the timeout".into()),
    };
    let refuse = |why: String| {
        let mut b = BytesMut::new();
        b.put_u8(1);
        b.extend_from_slice(why.as_bytes());
        b.freeze()
    };
    let peer = match hs {
        Ok((c, _, _)) if c != cluster => {
            let why = format!(
                "cluster id mismatch: peer says {c:016x}, this node is in {cluster:016x} \
                 (check --peers / cluster-token on both sides)"
            );
            tracing::error!(node = me, %remote, "refusing peer: {why}");
            stats.handshake_rejects.fetch_add(1, Ordering::Relaxed);
            let _ = framed.send(refuse(why)).await;
            return;
        }
        Ok((_, _, to)) if to != me => {
            let why = format!("peer dialled node {to} but this is node {me}");
            tracing::error!(node = me, %remote, "refusing peer: {why}");
            stats.handshake_rejects.fetch_add(1, Ordering::Relaxed);
            let _ = framed.send(refuse(why)).await;
            return;
        }
        Ok((_, from, _)) if from == 0 || from == me => {
            let why = format!("peer claims node id {from}, which is invalid here");
            tracing::error!(node = me, %remote, "refusing peer: {why}");
            let _ = framed.send(refuse(why)).await;
            return;
        }
        Ok((_, from, _)) => from,
        Err(why) => {
            tracing::warn!(node = me, %remote, "dropping connection: {why}");
            return;
        }
    };
    if framed.send(Bytes::from_static(&[0])).await.is_err() {
        return;
    }
    loop {
        let next = tokio::select! {
            n = framed.next() => n,
            _ = shutdown.changed() => return,
        };
        let bytes = match next {
            None => return,
            Some(Ok(b)) => b.freeze(),
            Some(Err(e)) => {
                tracing::warn!(node = me, peer, %remote, "dropping peer connection: bad frame: {e}");
                return;
            }
        };
        let frame = match Frame::decode(bytes) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(node = me, peer, %remote, "dropping peer connection: {e}");
                return;
            }
        };
        if frame.from != peer || frame.to != me {
            tracing::warn!(
                node = me, peer, %remote,
                "dropping peer connection: frame addressed {}->{} on a {peer}->{me} link",
                frame.from, frame.to
            );
            return;
        }
        stats.frames_received.fetch_add(1, Ordering::Relaxed);
        let tx = routes
            .read()
            .expect("routes lock")
            .get(&frame.group)
            .cloned();
        match tx {
            Some(tx) => {
                if tx.try_send(frame).is_err() {
                    stats.frames_dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
            None => {
                tracing::debug!(
                    node = me,
                    peer,
                    group = frame.group,
                    "frame for unknown group dropped"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_round_trips_and_rejects_garbage() {
        let f = Frame {
            group: 7,
            from: 1,
            to: 2,
            kind: FrameKind::Forward,
            payload: Bytes::from_static(b"hello"),
        };
        assert_eq!(Frame::decode(f.encode()).unwrap(), f);
        assert!(Frame::decode(Bytes::from_static(b"short")).is_err());
        let mut bad = BytesMut::from(&f.encode()[..]);
        bad[24] = 99;
        assert!(Frame::decode(bad.freeze()).is_err());
        assert!(decode_handshake(b"CONCORD1").is_err());
        let hs = encode_handshake(5, 1, 2);
        assert_eq!(decode_handshake(&hs).unwrap(), (5, 1, 2));
    }

    async fn pair(
        cluster_b: u64,
    ) -> (
        Arc<Transport>,
        Arc<Transport>,
        mpsc::Receiver<Frame>,
        watch::Sender<bool>,
    ) {
        let la = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let lb = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (aa, ab) = (la.local_addr().unwrap(), lb.local_addr().unwrap());
        let peers: HashMap<NodeId, SocketAddr> = [(1, aa), (2, ab)].into_iter().collect();
        let (stop, rx) = watch::channel(false);
        let a = Transport::start(1, 42, la, &peers, Limits::default(), rx.clone());
        let b = Transport::start(2, cluster_b, lb, &peers, Limits::default(), rx);
        let (tx, inbox) = mpsc::channel(16);
        b.register_group(0, tx);
        (a, b, inbox, stop)
    }

    fn frame(payload: &'static [u8]) -> Frame {
        Frame {
            group: 0,
            from: 1,
            to: 2,
            kind: FrameKind::Consensus,
            payload: Bytes::from_static(payload),
        }
    }

    #[tokio::test]
    async fn delivers_frames_between_nodes() {
        let (a, _b, mut inbox, _stop) = pair(42).await;
        // The first frames may be dropped while the link connects: keep sending until one
        // arrives, bounded in time.
        let got = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                a.send(frame(b"ping"));
                if let Ok(Some(f)) =
                    tokio::time::timeout(Duration::from_millis(50), inbox.recv()).await
                {
                    return f;
                }
            }
        })
        .await
        .expect("a frame within 5 s");
        assert_eq!(&got.payload[..], b"ping");
        assert_eq!(got.from, 1);
    }

    #[tokio::test]
    async fn refuses_another_cluster() {
        let (a, b, mut inbox, _stop) = pair(43).await;
        for _ in 0..20 {
            a.send(frame(b"ping"));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(inbox.try_recv().is_err(), "no frame crosses clusters");
        assert!(b.stats.handshake_rejects.load(Ordering::Relaxed) >= 1);
    }

    #[tokio::test]
    async fn garbage_drops_the_connection_without_panic() {
        use tokio::io::AsyncWriteExt;
        let (a, _b, _inbox, _stop) = pair(42).await;
        // Connect to node 2's listener directly and send a frame that is no handshake.
        let lb = a.peer_addr(2).unwrap();
        let mut s = TcpStream::connect(lb).await.unwrap();
        s.write_all(&[0, 0, 0, 4, 1, 2, 3, 4]).await.unwrap();
        let mut buf = [0u8; 16];
        use tokio::io::AsyncReadExt;
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("closed promptly")
            .unwrap_or(0);
        assert_eq!(n, 0, "server closes a connection that sent garbage");
    }
}
