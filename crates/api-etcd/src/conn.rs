//! Accepted client connections, as handed to tonic.
//!
//! [`EtcdConn`] wraps a `TcpStream`. Its read side starts by running the bytes through the
//! [`Rewriter`](crate::h2relay::Rewriter), which watches for etcdctl's malformed
//! `:authority`; for the usual client it steps aside after the first header block and
//! every later read goes straight to the socket. Writes always go straight to the socket.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::{Stream, StreamExt};
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::h2relay::{Phase, Rewriter};
use crate::limits::{PREFACE_TIMEOUT_MS, RELAY_FRAME_PAYLOAD_BYTES_MAX};

/// Bytes read from the socket at a time while the rewriter is in the path.
const REWRITE_READ_BYTES: usize = RELAY_FRAME_PAYLOAD_BYTES_MAX;

/// The accepted connections of `listener`, with TCP_NODELAY set and the `:authority`
/// sniffer in place, ready for `serve_with_incoming*`.
pub fn incoming(listener: TcpListener) -> impl Stream<Item = io::Result<EtcdConn>> {
    TcpListenerStream::new(listener).map(|conn| {
        conn.map(|tcp| {
            // Small request/response exchanges must not wait for Nagle's algorithm to
            // meet the peer's delayed ACK (about 40 ms per round trip otherwise).
            let _ = tcp.set_nodelay(true);
            EtcdConn::new(tcp)
        })
    })
}

/// One client connection of the etcd API. See the module documentation.
pub struct EtcdConn {
    tcp: TcpStream,
    /// `None` once the rewriter has stepped aside: reads go to the socket directly.
    rewrite: Option<Box<Rewriting>>,
}

struct Rewriting {
    rewriter: Rewriter,
    /// Bytes for the server that it has not read yet.
    out: Vec<u8>,
    out_pos: usize,
    scratch: Box<[u8]>,
    accepted_at: Instant,
    /// Created on the first read that has to wait; dropped once the preface is in.
    preface_timer: Option<Pin<Box<Sleep>>>,
    peer: Option<SocketAddr>,
}

impl EtcdConn {
    pub fn new(tcp: TcpStream) -> EtcdConn {
        let peer = tcp.peer_addr().ok();
        EtcdConn {
            tcp,
            rewrite: Some(Box::new(Rewriting {
                rewriter: Rewriter::new(),
                out: Vec::new(),
                out_pos: 0,
                scratch: vec![0; REWRITE_READ_BYTES].into_boxed_slice(),
                accepted_at: Instant::now(),
                preface_timer: None,
                peer,
            })),
        }
    }

    /// Whether this connection's reads are being rewritten (sniffing or relaying).
    pub fn is_rewriting(&self) -> bool {
        self.rewrite.is_some()
    }

    /// The rewriter's phase; `Direct` once it has stepped aside.
    pub fn phase(&self) -> Phase {
        self.rewrite
            .as_ref()
            .map_or(Phase::Direct, |r| r.rewriter.phase())
    }
}

impl Connected for EtcdConn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.tcp.connect_info()
    }
}

impl AsyncRead for EtcdConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            let Some(r) = this.rewrite.as_mut() else {
                return Pin::new(&mut this.tcp).poll_read(cx, buf);
            };
            if r.out_pos < r.out.len() {
                let n = buf.remaining().min(r.out.len() - r.out_pos);
                buf.put_slice(&r.out[r.out_pos..r.out_pos + n]);
                r.out_pos += n;
                if r.out_pos == r.out.len() {
                    r.out.clear();
                    r.out_pos = 0;
                    if r.rewriter.phase() == Phase::Direct {
                        this.rewrite = None;
                    }
                }
                return Poll::Ready(Ok(()));
            }
            if r.rewriter.phase() == Phase::Direct {
                this.rewrite = None;
                continue;
            }
            let mut chunk = ReadBuf::new(&mut r.scratch);
            match Pin::new(&mut this.tcp).poll_read(cx, &mut chunk) {
                Poll::Ready(Ok(())) if chunk.filled().is_empty() => {
                    // End of input: let the server see whatever the sniffer still held,
                    // then the end of the stream.
                    r.rewriter.finish(&mut r.out);
                    if r.out.is_empty() {
                        return Poll::Ready(Ok(()));
                    }
                }
                Poll::Ready(Ok(())) => {
                    let n = chunk.filled().len();
                    if let Err(e) = r.rewriter.feed(&r.scratch[..n], &mut r.out) {
                        tracing::warn!(
                            "etcd API: closing relayed connection from {}: {e}",
                            display_peer(r.peer)
                        );
                        return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e)));
                    }
                    if r.rewriter.phase() != Phase::Preface {
                        r.preface_timer = None;
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    if r.rewriter.phase() != Phase::Preface {
                        return Poll::Pending;
                    }
                    let deadline = r.accepted_at + Duration::from_millis(PREFACE_TIMEOUT_MS);
                    let timer = r
                        .preface_timer
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                    ready!(timer.as_mut().poll(cx));
                    tracing::debug!(
                        "etcd API: closing connection from {}: no HTTP/2 preface within {} ms",
                        display_peer(r.peer),
                        PREFACE_TIMEOUT_MS
                    );
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no HTTP/2 client preface in time",
                    )));
                }
            }
        }
    }
}

fn display_peer(peer: Option<SocketAddr>) -> String {
    peer.map_or_else(|| "an unknown peer".to_string(), |p| p.to_string())
}

impl AsyncWrite for EtcdConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::h2relay::CLIENT_PREFACE;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn pair() -> (TcpStream, EtcdConn) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (server, _) = l.accept().await.unwrap();
        (client, EtcdConn::new(server))
    }

    #[tokio::test(start_paused = true)]
    async fn silent_connection_times_out_before_the_preface() {
        let (_client, mut conn) = pair().await;
        let mut buf = [0u8; 64];
        // Paused time jumps to the preface deadline once everything is idle.
        let err = conn.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_connection_after_the_preface_is_not_timed_out() {
        let (mut client, mut conn) = pair().await;
        client.write_all(CLIENT_PREFACE).await.unwrap();
        let mut buf = [0u8; 64];
        let n = conn.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], CLIENT_PREFACE);
        assert_eq!(conn.phase(), Phase::Sniffing);
        let waited = tokio::time::timeout(
            Duration::from_millis(10 * PREFACE_TIMEOUT_MS),
            conn.read(&mut buf),
        )
        .await;
        assert!(waited.is_err(), "still waiting, no error: {waited:?}");
    }

    #[tokio::test]
    async fn partial_preface_then_close_is_passed_on() {
        let (mut client, mut conn) = pair().await;
        client.write_all(&CLIENT_PREFACE[..10]).await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        conn.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, &CLIENT_PREFACE[..10]);
    }
}
