//! HTTP/2 clients that send a URL as `:authority` (etcdctl 3.4 with `http://` endpoints)
//! are served, and broken connections are closed without harming the server. These tests
//! speak raw HTTP/2 over loopback, because well-behaved client libraries cannot send such
//! an authority.

mod common;

use common::{start, WAIT};
use concord_api_etcd::h2relay::CLIENT_PREFACE;
use concord_api_etcd::hpack::{encode_block, encode_integer};
use concord_api_etcd::proto::etcdserverpb as pb;
use loona_hpack::Decoder;
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const HEADERS: u8 = 1;
const DATA: u8 = 0;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const GOAWAY: u8 = 7;
const END_STREAM: u8 = 1;
const END_HEADERS: u8 = 4;

/// Bytes etcdctl 3.4.23 sent for `endpoint status` against `http://127.0.0.1:23799`.
fn etcdctl_status_bytes() -> Vec<u8> {
    let text = include_str!("data/etcdctl-3.4.23-endpoint-status.hex");
    let digits: Vec<u8> = text.bytes().filter(u8::is_ascii_hexdigit).collect();
    digits
        .chunks(2)
        .map(|p| u8::from_str_radix(std::str::from_utf8(p).unwrap(), 16).unwrap())
        .collect()
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    v.extend_from_slice(&[kind, flags]);
    v.extend_from_slice(&stream.to_be_bytes());
    v.extend_from_slice(payload);
    v
}

/// A gRPC message frame: uncompressed flag, 4-byte length, the message.
fn grpc_message(m: &impl Message) -> Vec<u8> {
    let body = m.encode_to_vec();
    let mut v = vec![0];
    v.extend_from_slice(&(body.len() as u32).to_be_bytes());
    v.extend_from_slice(&body);
    v
}

/// What came back on one stream.
#[derive(Debug, Default)]
struct Answer {
    headers: Vec<(String, String)>,
    data: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The first gRPC message of the body.
    fn message<M: Message + Default>(&self) -> M {
        assert!(self.data.len() >= 5, "no gRPC message in {self:?}");
        let len = u32::from_be_bytes(self.data[1..5].try_into().unwrap()) as usize;
        M::decode(&self.data[5..5 + len]).expect("decodes")
    }
}

/// Reads frames until `stream` ends; decodes the server's header blocks with `decoder`,
/// which must have seen every earlier block of the connection.
async fn read_answer(sock: &mut TcpStream, decoder: &mut Decoder<'static>, stream: u32) -> Answer {
    let mut answer = Answer::default();
    loop {
        let mut h = [0u8; 9];
        sock.read_exact(&mut h).await.expect("frame header");
        let len = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
        let (kind, flags) = (h[3], h[4]);
        let id = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
        let mut payload = vec![0u8; len];
        sock.read_exact(&mut payload).await.expect("frame payload");
        match kind {
            HEADERS => {
                assert_ne!(flags & END_HEADERS, 0, "test expects one-frame blocks");
                let list = decoder.decode(&payload).expect("server HPACK");
                if id == stream {
                    for (n, v) in list {
                        answer
                            .headers
                            .push((String::from_utf8(n).unwrap(), String::from_utf8(v).unwrap()));
                    }
                }
            }
            DATA if id == stream => answer.data.extend_from_slice(&payload),
            RST_STREAM if id == stream => panic!("stream {stream} reset: {payload:?}"),
            GOAWAY => panic!("connection refused with GOAWAY: {payload:?}"),
            _ => {}
        }
        if id == stream && flags & END_STREAM != 0 {
            return answer;
        }
    }
}

/// Expects the server to close the connection (after an optional GOAWAY) within WAIT.
async fn expect_closed(sock: &mut TcpStream) {
    let mut sink = Vec::new();
    let r = tokio::time::timeout(WAIT, sock.read_to_end(&mut sink))
        .await
        .expect("server closes the connection");
    // A reset is as good as an orderly close; what matters is that it ended.
    if let Ok(n) = r {
        assert!(n < 1 << 20, "unexpectedly long answer");
    }
}

#[tokio::test]
async fn recorded_etcdctl_status_with_url_authority_is_answered() {
    let h = start().await;
    let mut sock = TcpStream::connect(h.addr).await.unwrap();
    sock.write_all(&etcdctl_status_bytes()).await.unwrap();
    let mut decoder = Decoder::new();
    let answer = tokio::time::timeout(WAIT, read_answer(&mut sock, &mut decoder, 1))
        .await
        .expect("answer in time");
    assert_eq!(answer.header(":status"), Some("200"));
    assert_eq!(answer.header("grpc-status"), Some("0"), "{answer:?}");
    let status: pb::StatusResponse = answer.message();
    assert!(!status.version.is_empty());
    assert!(status.header.is_some());
}

#[tokio::test]
async fn later_requests_on_a_relayed_connection_use_the_client_table() {
    let h = start().await;
    h.put("k", "v1").await;
    let mut sock = TcpStream::connect(h.addr).await.unwrap();
    let authority = format!("http://{}", h.addr);
    let mut out = CLIENT_PREFACE.to_vec();
    out.extend(frame(SETTINGS, 0, 0, &[]));
    // Request 1 adds `:authority: http://...` to the client's dynamic table (index 62)...
    let mut block = vec![0x83, 0x86]; // :method POST, :scheme http
    block.push(0x41); // :authority with incremental indexing (static name 1)
    encode_integer(authority.len(), 7, 0, &mut block);
    block.extend_from_slice(authority.as_bytes());
    encode_block(
        &[
            (b":path".to_vec(), b"/etcdserverpb.KV/Range".to_vec()),
            (b"content-type".to_vec(), b"application/grpc".to_vec()),
            (b"te".to_vec(), b"trailers".to_vec()),
        ],
        &mut block,
    );
    out.extend(frame(HEADERS, END_HEADERS, 1, &block));
    let range = pb::RangeRequest {
        key: b"k".to_vec(),
        ..Default::default()
    };
    out.extend(frame(DATA, END_STREAM, 1, &grpc_message(&range)));
    sock.write_all(&out).await.unwrap();
    let mut decoder = Decoder::new();
    let first = tokio::time::timeout(WAIT, read_answer(&mut sock, &mut decoder, 1))
        .await
        .expect("first answer");
    assert_eq!(first.header("grpc-status"), Some("0"), "{first:?}");
    let r: pb::RangeResponse = first.message();
    assert_eq!(r.kvs[0].value, b"v1");

    // ...and request 2 refers to that entry instead of repeating it.
    h.put("k", "v2").await;
    let mut block = vec![0x83, 0x86, 0x80 | 62];
    encode_block(
        &[
            (b":path".to_vec(), b"/etcdserverpb.KV/Range".to_vec()),
            (b"content-type".to_vec(), b"application/grpc".to_vec()),
        ],
        &mut block,
    );
    let mut out = frame(HEADERS, END_HEADERS, 3, &block);
    out.extend(frame(DATA, END_STREAM, 3, &grpc_message(&range)));
    sock.write_all(&out).await.unwrap();
    let second = tokio::time::timeout(WAIT, read_answer(&mut sock, &mut decoder, 3))
        .await
        .expect("second answer");
    assert_eq!(second.header("grpc-status"), Some("0"), "{second:?}");
    let r: pb::RangeResponse = second.message();
    assert_eq!(r.kvs[0].value, b"v2");
}

#[tokio::test]
async fn garbage_instead_of_a_preface_is_closed_and_the_server_lives_on() {
    let h = start().await;
    let mut sock = TcpStream::connect(h.addr).await.unwrap();
    sock.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    expect_closed(&mut sock).await;
    assert!(h.put("after", "garbage").await.header.is_some());
}

#[tokio::test]
async fn malformed_first_header_block_is_closed_and_the_server_lives_on() {
    let h = start().await;
    let mut sock = TcpStream::connect(h.addr).await.unwrap();
    let mut out = CLIENT_PREFACE.to_vec();
    out.extend(frame(SETTINGS, 0, 0, &[]));
    // Index 99 is in neither table: the sniffer steps aside and h2 refuses it.
    out.extend(frame(HEADERS, END_HEADERS, 1, &[0x80 | 99]));
    sock.write_all(&out).await.unwrap();
    expect_closed(&mut sock).await;
    assert!(h.get("x").await.header.is_some());
}

#[tokio::test]
async fn malformed_block_on_a_relayed_connection_is_closed() {
    let h = start().await;
    let mut sock = TcpStream::connect(h.addr).await.unwrap();
    let mut raw = etcdctl_status_bytes();
    // After the recorded request, a second block the relay cannot decode.
    raw.extend(frame(HEADERS, END_HEADERS | END_STREAM, 3, &[0x80 | 99]));
    sock.write_all(&raw).await.unwrap();
    expect_closed(&mut sock).await;
    assert!(h.get("x").await.header.is_some());
}

#[tokio::test]
async fn a_normal_client_is_handed_to_the_socket_after_its_first_header_block() {
    use concord_api_etcd::conn::EtcdConn;
    use concord_api_etcd::h2relay::Phase;
    use pb::kv_client::KvClient;
    use tonic::transport::Channel;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let client = tokio::spawn(async move {
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .expect("connect");
        // No server answers; only the request's bytes matter here.
        let _ = KvClient::new(channel)
            .range(pb::RangeRequest::default())
            .await;
    });
    let (tcp, _) = listener.accept().await.unwrap();
    let mut conn = EtcdConn::new(tcp);
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(WAIT, async {
        while conn.is_rewriting() {
            let n = conn.read(&mut buf).await.expect("read");
            assert!(n > 0, "client closed early");
            seen.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("sniffer steps aside");
    assert_eq!(conn.phase(), Phase::Direct);
    assert!(seen.starts_with(CLIENT_PREFACE));
    client.abort();
}
