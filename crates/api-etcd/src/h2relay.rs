//! Repairs the HTTP/2 `:authority` that etcdctl 3.4 sends, without IO ("sans-IO").
//!
//! etcdctl 3.4 (grpc-go underneath) puts the whole endpoint URL, `http://127.0.0.1:2379`,
//! in the `:authority` pseudo-header when an endpoint is written with a scheme (and always
//! with `--cluster`, which uses member client URLs). grpc-go servers accept that; the `h2`
//! server under tonic refuses the stream as malformed. [`Rewriter`] sits between the
//! socket and the HTTP/2 server and sees the client-to-server bytes only:
//!
//! * **Sniffing**: it checks the client preface and forwards every frame unchanged, except
//!   that it holds back the first header block (HEADERS plus CONTINUATIONs) until it is
//!   complete and decodes it. If `:authority` is absent or valid, the held bytes are
//!   released unchanged and the rewriter goes **direct**: the caller then reads the socket
//!   straight into the server with no further parsing. Anything the sniffer does not
//!   understand (no preface, a protocol error, an oversized block) also goes direct, so the
//!   HTTP/2 server answers it exactly as it would without us.
//! * **Relaying**: if the authority needs repair, every later header block of the
//!   connection is decoded with the connection's HPACK state, its `:authority` repaired,
//!   and re-encoded without the dynamic table (literals without indexing), so the server's
//!   decoder never has to know about the client's table. All other frames pass through
//!   byte for byte; errors close the connection, since a relay that lost track of the
//!   HPACK state cannot resynchronise.

use std::fmt;

use crate::hpack::{encode_block, Decoder};

use crate::limits::{
    DECODED_HEADER_LIST_BYTES_MAX, HEADER_BLOCK_BYTES_MAX, HPACK_TABLE_BYTES_MAX,
    RELAY_FRAME_PAYLOAD_BYTES_MAX,
};

/// The 24 bytes every HTTP/2 client connection starts with (RFC 9113, section 3.4).
pub const CLIENT_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

const FRAME_HEADER_BYTES: usize = 9;
const FRAME_HEADERS: u8 = 0x1;
const FRAME_PUSH_PROMISE: u8 = 0x5;
const FRAME_CONTINUATION: u8 = 0x9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;
/// Stream dependency (4 bytes) and weight (1 byte) of a HEADERS frame with PRIORITY.
const PRIORITY_BYTES: usize = 5;
/// Largest HEADERS or CONTINUATION frame accepted: a full block plus the pad-length byte,
/// at most 255 padding bytes and the priority fields.
const HEADER_FRAME_BYTES_MAX: usize = HEADER_BLOCK_BYTES_MAX + 1 + 255 + PRIORITY_BYTES;
/// Per-field overhead HTTP/2 adds when it sizes a header list (RFC 9113, section 6.5.2).
const HEADER_FIELD_OVERHEAD_BYTES: usize = 32;

/// What the [`Rewriter`] is doing with the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for the rest of the 24-byte client preface.
    Preface,
    /// Preface seen; waiting for the end of the first header block.
    Sniffing,
    /// Everything from here on goes to the server unchanged; stop feeding the rewriter.
    Direct,
    /// The connection needs its `:authority` repaired for the rest of its life.
    Relaying,
}

/// Why a relayed connection has to be closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayError {
    /// A header block larger than [`HEADER_BLOCK_BYTES_MAX`].
    HeaderBlockTooLarge { stream_id: u32, bytes: usize },
    /// A decoded header list larger than [`DECODED_HEADER_LIST_BYTES_MAX`].
    HeaderListTooLarge { stream_id: u32 },
    /// The block is not valid HPACK.
    Hpack { stream_id: u32, reason: String },
    /// A framing rule of RFC 9113 was broken.
    Protocol(String),
}

impl fmt::Display for RelayError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RelayError::HeaderBlockTooLarge { stream_id, bytes } => write!(
                f,
                "header block of stream {stream_id} exceeds {HEADER_BLOCK_BYTES_MAX} bytes \
                 ({bytes} bytes so far)"
            ),
            RelayError::HeaderListTooLarge { stream_id } => write!(
                f,
                "decoded headers of stream {stream_id} exceed {DECODED_HEADER_LIST_BYTES_MAX} bytes"
            ),
            RelayError::Hpack { stream_id, reason } => {
                write!(
                    f,
                    "bad HPACK in header block of stream {stream_id}: {reason}"
                )
            }
            RelayError::Protocol(what) => write!(f, "HTTP/2 protocol error: {what}"),
        }
    }
}

impl std::error::Error for RelayError {}

/// What to do with one `:authority` value.
#[derive(Debug, PartialEq, Eq)]
pub enum AuthorityFix {
    /// Valid as it is.
    Keep,
    /// Replace with this (the URL with scheme and path removed).
    Replace(Vec<u8>),
    /// Nothing valid is left: drop the field (HTTP/2 allows a request without it).
    Drop,
}

/// Whether `value` is an authority the `h2` server accepts (it parses `:authority` with
/// the same `http` crate function).
pub fn is_valid_authority(value: &[u8]) -> bool {
    http::uri::Authority::try_from(value).is_ok()
}

/// Decides how to repair an `:authority` value: strip a leading `scheme://` and anything
/// from the first `/`, `?` or `#` on; keep the rest if it is a valid authority.
pub fn fix_authority(value: &[u8]) -> AuthorityFix {
    if is_valid_authority(value) {
        return AuthorityFix::Keep;
    }
    let mut rest = value;
    if let Some(at) = find(rest, b"://") {
        let scheme = &rest[..at];
        // RFC 3986: scheme = ALPHA *( ALPHA / DIGIT / "+" / "-" / "." )
        let is_scheme = scheme.first().is_some_and(u8::is_ascii_alphabetic)
            && scheme
                .iter()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'-' | b'.'));
        if is_scheme {
            rest = &rest[at + 3..];
        }
    }
    if let Some(end) = rest.iter().position(|c| matches!(c, b'/' | b'?' | b'#')) {
        rest = &rest[..end];
    }
    if is_valid_authority(rest) {
        AuthorityFix::Replace(rest.to_vec())
    } else {
        AuthorityFix::Drop
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

pub use crate::hpack::HeaderList;

/// Applies [`fix_authority`] to the `:authority` fields of `headers`; returns whether
/// anything changed.
pub fn repair_headers(headers: &mut HeaderList) -> bool {
    let mut changed = false;
    headers.retain_mut(|(name, value)| {
        if name.as_slice() != b":authority" {
            return true;
        }
        match fix_authority(value) {
            AuthorityFix::Keep => true,
            AuthorityFix::Replace(fixed) => {
                *value = fixed;
                changed = true;
                true
            }
            AuthorityFix::Drop => {
                changed = true;
                false
            }
        }
    });
    changed
}

/// Decodes one complete header block with `decoder`, whose dynamic table the block may
/// read and update.
pub fn decode_block(
    decoder: &mut Decoder,
    stream_id: u32,
    block: &[u8],
) -> Result<HeaderList, RelayError> {
    let mut headers = Vec::new();
    let mut list_bytes = 0usize;
    let mut overflow = false;
    decoder
        .decode(block, |name, value| {
            // The decoder must run to the end of the block to keep its table in step, so
            // an oversized list stops being collected rather than stopping the decode.
            list_bytes += name.len() + value.len() + HEADER_FIELD_OVERHEAD_BYTES;
            if list_bytes > DECODED_HEADER_LIST_BYTES_MAX {
                overflow = true;
            } else {
                headers.push((name.to_vec(), value.to_vec()));
            }
        })
        .map_err(|e| RelayError::Hpack {
            stream_id,
            reason: e.to_string(),
        })?;
    if overflow {
        return Err(RelayError::HeaderListTooLarge { stream_id });
    }
    Ok(headers)
}

/// A new HPACK decoder with the protocol's initial table size and our upper bound on
/// table size updates.
pub fn new_decoder() -> Decoder {
    Decoder::new(HPACK_TABLE_BYTES_MAX)
}

fn push_frame_header(len: usize, kind: u8, flags: u8, stream_id: u32, out: &mut Vec<u8>) {
    assert!(
        len <= RELAY_FRAME_PAYLOAD_BYTES_MAX,
        "relay frame over the size limit"
    );
    out.extend_from_slice(&(len as u32).to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&(stream_id & 0x7fff_ffff).to_be_bytes());
}

/// Writes `block` as one HEADERS frame followed by as many CONTINUATION frames as the
/// frame size limit requires, END_HEADERS on the last. Padding is not reproduced.
pub fn push_header_frames(
    stream_id: u32,
    end_stream: bool,
    priority: Option<[u8; PRIORITY_BYTES]>,
    block: &[u8],
    out: &mut Vec<u8>,
) {
    let prio_len = if priority.is_some() {
        PRIORITY_BYTES
    } else {
        0
    };
    let first_len = block.len().min(RELAY_FRAME_PAYLOAD_BYTES_MAX - prio_len);
    let (first, mut rest) = block.split_at(first_len);
    let mut flags = 0;
    if end_stream {
        flags |= FLAG_END_STREAM;
    }
    if priority.is_some() {
        flags |= FLAG_PRIORITY;
    }
    if rest.is_empty() {
        flags |= FLAG_END_HEADERS;
    }
    push_frame_header(prio_len + first.len(), FRAME_HEADERS, flags, stream_id, out);
    if let Some(p) = priority {
        out.extend_from_slice(&p);
    }
    out.extend_from_slice(first);
    while !rest.is_empty() {
        let n = rest.len().min(RELAY_FRAME_PAYLOAD_BYTES_MAX);
        let (chunk, tail) = rest.split_at(n);
        let flags = if tail.is_empty() { FLAG_END_HEADERS } else { 0 };
        push_frame_header(n, FRAME_CONTINUATION, flags, stream_id, out);
        out.extend_from_slice(chunk);
        rest = tail;
    }
}

/// A header block being collected from HEADERS and CONTINUATION frames.
struct OpenBlock {
    stream_id: u32,
    end_stream: bool,
    priority: Option<[u8; PRIORITY_BYTES]>,
    fragment: Vec<u8>,
}

#[derive(Clone, Copy)]
struct FrameHeader {
    len: usize,
    kind: u8,
    flags: u8,
    stream_id: u32,
}

impl FrameHeader {
    fn parse(b: &[u8]) -> FrameHeader {
        FrameHeader {
            len: (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]),
            kind: b[3],
            flags: b[4],
            stream_id: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
        }
    }
}

/// The client-to-server half of a connection, rewritten frame by frame. See the module
/// documentation for the phases.
pub struct Rewriter {
    phase: Phase,
    decoder: Decoder,
    /// Input received but not yet consumed (a partial frame header or header frame).
    pending: Vec<u8>,
    /// Payload bytes of the current pass-through frame still to be copied.
    copy_left: usize,
    block: Option<OpenBlock>,
    /// While sniffing: the raw frames of the open first header block, held back.
    held: Vec<u8>,
}

impl Default for Rewriter {
    fn default() -> Self {
        Self::new()
    }
}

impl Rewriter {
    pub fn new() -> Rewriter {
        Rewriter {
            phase: Phase::Preface,
            decoder: new_decoder(),
            pending: Vec::new(),
            copy_left: 0,
            block: None,
            held: Vec::new(),
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Consumes `input` (the next bytes from the client) and appends what the server
    /// should read to `out`. In [`Phase::Direct`] the input is copied as it is; the caller
    /// normally stops feeding at that point. An error can only happen while relaying; the
    /// connection must then be closed.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<(), RelayError> {
        if self.phase == Phase::Direct {
            out.extend_from_slice(input);
            return Ok(());
        }
        self.pending.extend_from_slice(input);
        let mut pos = 0;
        let result = self.run(&mut pos, out);
        match result {
            Err(e) if self.phase != Phase::Relaying => {
                // Not ours to judge: the HTTP/2 server sees the bytes exactly as sent and
                // answers them as it would without the sniffer.
                tracing::debug!("etcd API: :authority sniffer steps aside: {e}");
                self.go_direct(&mut pos, out);
                Ok(())
            }
            other => {
                self.pending.drain(..pos);
                other
            }
        }
    }

    /// The client closed its side. Releases whatever the sniffer still held so that the
    /// server sees the same truncated input it would have seen without us.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if matches!(self.phase, Phase::Preface | Phase::Sniffing) {
            let mut pos = 0;
            self.go_direct(&mut pos, out);
        }
    }

    fn go_direct(&mut self, pos: &mut usize, out: &mut Vec<u8>) {
        debug_assert!(self.phase != Phase::Relaying, "a relay cannot step aside");
        out.append(&mut self.held);
        out.extend_from_slice(&self.pending[*pos..]);
        self.pending = Vec::new();
        *pos = 0;
        self.block = None;
        self.phase = Phase::Direct;
    }

    fn run(&mut self, pos: &mut usize, out: &mut Vec<u8>) -> Result<(), RelayError> {
        loop {
            let avail = &self.pending[*pos..];
            match self.phase {
                Phase::Direct => {
                    out.extend_from_slice(avail);
                    *pos = self.pending.len();
                    return Ok(());
                }
                Phase::Preface => {
                    let n = avail.len().min(CLIENT_PREFACE.len());
                    if avail[..n] != CLIENT_PREFACE[..n] {
                        return Err(RelayError::Protocol("no HTTP/2 client preface".into()));
                    }
                    if n < CLIENT_PREFACE.len() {
                        return Ok(());
                    }
                    out.extend_from_slice(CLIENT_PREFACE);
                    *pos += CLIENT_PREFACE.len();
                    self.phase = Phase::Sniffing;
                }
                Phase::Sniffing | Phase::Relaying => {
                    if self.copy_left > 0 {
                        let n = avail.len().min(self.copy_left);
                        if n == 0 {
                            return Ok(());
                        }
                        out.extend_from_slice(&avail[..n]);
                        *pos += n;
                        self.copy_left -= n;
                        continue;
                    }
                    if avail.len() < FRAME_HEADER_BYTES {
                        return Ok(());
                    }
                    let h = FrameHeader::parse(avail);
                    if let Some(open) = &self.block {
                        if h.kind != FRAME_CONTINUATION || h.stream_id != open.stream_id {
                            return Err(RelayError::Protocol(format!(
                                "frame type {} on stream {} inside the header block of stream {}",
                                h.kind, h.stream_id, open.stream_id
                            )));
                        }
                    }
                    match h.kind {
                        FRAME_HEADERS | FRAME_CONTINUATION => {
                            if h.len > HEADER_FRAME_BYTES_MAX {
                                return Err(RelayError::HeaderBlockTooLarge {
                                    stream_id: h.stream_id,
                                    bytes: h.len,
                                });
                            }
                            if avail.len() < FRAME_HEADER_BYTES + h.len {
                                return Ok(());
                            }
                            let frame_end = *pos + FRAME_HEADER_BYTES + h.len;
                            let frame = self.pending[*pos..frame_end].to_vec();
                            *pos = frame_end;
                            if self.phase == Phase::Sniffing {
                                self.held.extend_from_slice(&frame);
                            }
                            self.header_frame(h, &frame[FRAME_HEADER_BYTES..], out)?;
                        }
                        FRAME_PUSH_PROMISE => {
                            return Err(RelayError::Protocol(
                                "PUSH_PROMISE sent by a client".into(),
                            ));
                        }
                        _ => {
                            // Unchanged; the payload is copied as it arrives, never held.
                            out.extend_from_slice(&avail[..FRAME_HEADER_BYTES]);
                            *pos += FRAME_HEADER_BYTES;
                            self.copy_left = h.len;
                        }
                    }
                }
            }
        }
    }

    /// Takes one complete HEADERS or CONTINUATION frame (payload only).
    fn header_frame(
        &mut self,
        h: FrameHeader,
        payload: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), RelayError> {
        let fragment = if h.kind == FRAME_HEADERS {
            if h.stream_id == 0 {
                return Err(RelayError::Protocol("HEADERS on stream 0".into()));
            }
            let mut body = payload;
            let mut pad = 0;
            if h.flags & FLAG_PADDED != 0 {
                let (&p, tail) = body.split_first().ok_or_else(|| {
                    RelayError::Protocol("PADDED HEADERS without pad length".into())
                })?;
                pad = usize::from(p);
                body = tail;
            }
            let mut priority = None;
            if h.flags & FLAG_PRIORITY != 0 {
                if body.len() < PRIORITY_BYTES {
                    return Err(RelayError::Protocol(
                        "HEADERS too short for PRIORITY".into(),
                    ));
                }
                let (p, tail) = body.split_at(PRIORITY_BYTES);
                priority = Some(p.try_into().expect("split at PRIORITY_BYTES"));
                body = tail;
            }
            if pad > body.len() {
                return Err(RelayError::Protocol(
                    "HEADERS padding exceeds payload".into(),
                ));
            }
            debug_assert!(self.block.is_none(), "checked by the caller");
            self.block = Some(OpenBlock {
                stream_id: h.stream_id,
                end_stream: h.flags & FLAG_END_STREAM != 0,
                priority,
                fragment: Vec::new(),
            });
            &body[..body.len() - pad]
        } else {
            if self.block.is_none() {
                return Err(RelayError::Protocol(format!(
                    "CONTINUATION on stream {} without a HEADERS frame",
                    h.stream_id
                )));
            }
            payload
        };
        let open = self.block.as_mut().expect("opened above or before");
        if open.fragment.len() + fragment.len() > HEADER_BLOCK_BYTES_MAX {
            return Err(RelayError::HeaderBlockTooLarge {
                stream_id: open.stream_id,
                bytes: open.fragment.len() + fragment.len(),
            });
        }
        open.fragment.extend_from_slice(fragment);
        if h.flags & FLAG_END_HEADERS != 0 {
            let open = self.block.take().expect("open block");
            self.finish_block(open, out)?;
        }
        Ok(())
    }

    fn finish_block(&mut self, open: OpenBlock, out: &mut Vec<u8>) -> Result<(), RelayError> {
        let mut headers = decode_block(&mut self.decoder, open.stream_id, &open.fragment)?;
        let changed = repair_headers(&mut headers);
        if self.phase == Phase::Sniffing {
            if !changed {
                // The common case: release the block as the client sent it and get out
                // of the way for the rest of the connection.
                out.append(&mut self.held);
                self.phase = Phase::Direct;
                return Ok(());
            }
            // Debug, not info: etcdctl health loops would otherwise log every connection.
            tracing::debug!(
                "etcd API: client sent a malformed :authority; relaying this connection \
                 with the authority repaired"
            );
            self.held.clear();
            self.phase = Phase::Relaying;
        }
        let mut block = Vec::with_capacity(open.fragment.len() * 2);
        encode_block(&headers, &mut block);
        push_header_frames(open.stream_id, open.end_stream, open.priority, &block, out);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hpack::{encode_integer, encode_string};

    /// What etcdctl 3.4.23 sent for `--endpoints=http://127.0.0.1:23799 endpoint status`
    /// on the connection that carried the request, captured on this machine: preface,
    /// SETTINGS, SETTINGS ACK, HEADERS (Huffman-coded strings, `:authority` is the URL)
    /// and a DATA frame holding an empty StatusRequest.
    const ETCDCTL_STATUS: &str = include_str!("../tests/data/etcdctl-3.4.23-endpoint-status.hex");

    fn hex(s: &str) -> Vec<u8> {
        let digits: Vec<u8> = s.bytes().filter(u8::is_ascii_hexdigit).collect();
        digits
            .chunks(2)
            .map(|p| u8::from_str_radix(std::str::from_utf8(p).unwrap(), 16).unwrap())
            .collect()
    }

    /// Splits a byte stream into frames (after the preface): (type, flags, stream, payload).
    fn frames(mut b: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
        let mut v = Vec::new();
        while !b.is_empty() {
            let h = FrameHeader::parse(b);
            v.push((h.kind, h.flags, h.stream_id, b[9..9 + h.len].to_vec()));
            b = &b[9 + h.len..];
        }
        v
    }

    fn find_header<'a>(h: &'a HeaderList, name: &str) -> Option<&'a [u8]> {
        h.iter()
            .find(|(n, _)| n.as_slice() == name.as_bytes())
            .map(|(_, v)| v.as_slice())
    }

    #[test]
    fn fix_authority_strips_scheme_and_path() {
        assert_eq!(fix_authority(b"127.0.0.1:2379"), AuthorityFix::Keep);
        assert_eq!(fix_authority(b"[::1]:2379"), AuthorityFix::Keep);
        assert_eq!(
            fix_authority(b"http://127.0.0.1:2379"),
            AuthorityFix::Replace(b"127.0.0.1:2379".to_vec())
        );
        assert_eq!(
            fix_authority(b"https://etcd-0.example:2379/"),
            AuthorityFix::Replace(b"etcd-0.example:2379".to_vec())
        );
        assert_eq!(
            fix_authority(b"http://[::1]:2379/v3?x#y"),
            AuthorityFix::Replace(b"[::1]:2379".to_vec())
        );
        assert_eq!(
            fix_authority(b"host:2379/path"),
            AuthorityFix::Replace(b"host:2379".to_vec())
        );
        // Nothing usable left: unix sockets, an empty value, spaces.
        assert_eq!(fix_authority(b"unix:///tmp/etcd.sock"), AuthorityFix::Drop);
        assert_eq!(fix_authority(b""), AuthorityFix::Drop);
        assert_eq!(fix_authority(b"http://a b"), AuthorityFix::Drop);
        // Only a real scheme is stripped; the rest is still cut at the first '/'.
        assert_eq!(
            fix_authority(b"1http://x"),
            AuthorityFix::Replace(b"1http:".to_vec())
        );
    }

    #[test]
    fn integers_follow_rfc7541_examples() {
        // RFC 7541, C.1.1-C.1.3.
        let mut out = Vec::new();
        encode_integer(10, 5, 0, &mut out);
        assert_eq!(out, [0x0a]);
        out.clear();
        encode_integer(1337, 5, 0, &mut out);
        assert_eq!(out, [0x1f, 0x9a, 0x0a]);
        out.clear();
        encode_integer(42, 8, 0, &mut out);
        assert_eq!(out, [0x2a]);
        out.clear();
        encode_integer(127, 7, 0x80, &mut out);
        assert_eq!(out, [0xff, 0x00]);
    }

    #[test]
    fn huffman_and_dynamic_table_across_two_blocks() {
        // RFC 7541, C.4.1 and C.4.2: Huffman-coded strings; the second block refers to the
        // dynamic-table entry the first one added (index 62).
        let mut d = new_decoder();
        let first = decode_block(&mut d, 1, &hex("828684418cf1e3c2e5f23a6ba0ab90f4ff")).unwrap();
        assert_eq!(
            find_header(&first, ":authority"),
            Some(&b"www.example.com"[..])
        );
        let second = decode_block(&mut d, 3, &hex("828684be5886a8eb10649cbf")).unwrap();
        assert_eq!(
            find_header(&second, ":authority"),
            Some(&b"www.example.com"[..])
        );
        assert_eq!(
            find_header(&second, "cache-control"),
            Some(&b"no-cache"[..])
        );
        // Re-encoded, the block reads the same with a fresh decoder: it needs no table.
        let mut enc = Vec::new();
        encode_block(&second, &mut enc);
        assert_eq!(decode_block(&mut new_decoder(), 3, &enc).unwrap(), second);
    }

    #[test]
    fn bad_hpack_is_an_error_not_a_panic() {
        let mut d = new_decoder();
        // Index 70 does not exist in an empty table.
        assert!(matches!(
            decode_block(&mut d, 1, &[0x80 | 70]),
            Err(RelayError::Hpack { .. })
        ));
        // A string longer than the block.
        assert!(decode_block(&mut d, 1, &[0x00, 0x7f, 0x10, b'a']).is_err());
        // A table size update beyond the allowed maximum.
        let mut huge = Vec::new();
        encode_integer(HPACK_TABLE_BYTES_MAX + 1, 5, 0x20, &mut huge);
        huge.push(0x82);
        assert!(decode_block(&mut d, 1, &huge).is_err());
    }

    #[test]
    fn decoded_list_is_bounded() {
        // One 4000-byte entry in the dynamic table, then a block of 200 references to it:
        // 800 kB decoded from a 200-byte block.
        let mut d = new_decoder();
        let mut add = vec![0x40];
        encode_string(b"x-big", &mut add);
        encode_string(&[b'v'; 4000], &mut add);
        decode_block(&mut d, 1, &add).unwrap();
        let refs = vec![0x80 | 62; 200];
        assert_eq!(
            decode_block(&mut d, 3, &refs),
            Err(RelayError::HeaderListTooLarge { stream_id: 3 })
        );
    }

    #[test]
    fn etcdctl_connection_is_relayed_with_the_authority_repaired() {
        let input = hex(ETCDCTL_STATUS);
        // Feed one byte at a time: every partial state must be handled.
        let mut r = Rewriter::new();
        let mut out = Vec::new();
        for b in &input {
            r.feed(std::slice::from_ref(b), &mut out).unwrap();
        }
        assert_eq!(r.phase(), Phase::Relaying);
        assert_eq!(&out[..24], CLIENT_PREFACE);
        let f = frames(&out[24..]);
        let kinds: Vec<u8> = f.iter().map(|x| x.0).collect();
        assert_eq!(
            kinds,
            [4, 4, FRAME_HEADERS, 0],
            "SETTINGS, ACK, HEADERS, DATA"
        );
        let (_, flags, stream, block) = &f[2];
        assert_eq!((*flags, *stream), (FLAG_END_HEADERS, 1));
        let headers = decode_block(&mut new_decoder(), 1, block).unwrap();
        assert_eq!(
            find_header(&headers, ":authority"),
            Some(&b"127.0.0.1:23799"[..])
        );
        assert_eq!(
            find_header(&headers, ":path"),
            Some(&b"/etcdserverpb.Maintenance/Status"[..])
        );
        assert_eq!(
            find_header(&headers, "content-type"),
            Some(&b"application/grpc"[..])
        );
        // The DATA frame is untouched.
        assert_eq!(f[3], (0, FLAG_END_STREAM, 1, vec![0; 5]));
    }

    fn headers_frame(stream: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
        v.push(FRAME_HEADERS);
        v.push(flags);
        v.extend_from_slice(&stream.to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    fn request_block(authority: &[u8], indexing: bool) -> Vec<u8> {
        let mut b = vec![0x83, 0x86]; // :method POST, :scheme http
        b.push(0x04); // :path, literal without indexing, static name 4
        encode_string(b"/etcdserverpb.KV/Range", &mut b);
        b.push(if indexing { 0x41 } else { 0x01 }); // :authority (static name 1)
        encode_string(authority, &mut b);
        b
    }

    #[test]
    fn valid_authority_goes_direct_and_bytes_are_unchanged() {
        let mut input = CLIENT_PREFACE.to_vec();
        input.extend(headers_frame(
            1,
            FLAG_END_HEADERS,
            &request_block(b"localhost:2379", true),
        ));
        input.extend_from_slice(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00tail bytes, unparsed");
        let mut r = Rewriter::new();
        let mut out = Vec::new();
        r.feed(&input, &mut out).unwrap();
        assert_eq!(r.phase(), Phase::Direct);
        assert_eq!(out, input);
    }

    #[test]
    fn relayed_blocks_follow_the_dynamic_table_and_padding_and_priority() {
        let mut input = CLIENT_PREFACE.to_vec();
        // First block adds `:authority: http://h:1` to the client's table (index 62).
        input.extend(headers_frame(
            1,
            FLAG_END_HEADERS,
            &request_block(b"http://h:1", true),
        ));
        // Second block: padded, with priority, split over a CONTINUATION, and refers to
        // entry 62 for its authority.
        let block2 = [0x83, 0x86, 0x84, 0x80 | 62];
        let mut p = vec![3]; // pad length
        p.extend_from_slice(&[0, 0, 0, 1, 15]); // depends on stream 1, weight 16
        p.extend_from_slice(&block2[..2]);
        p.extend_from_slice(&[0, 0, 0]);
        input.extend(headers_frame(
            3,
            FLAG_PADDED | FLAG_PRIORITY | FLAG_END_STREAM,
            &p,
        ));
        input.extend_from_slice(&[0, 0, 2, FRAME_CONTINUATION, FLAG_END_HEADERS, 0, 0, 0, 3]);
        input.extend_from_slice(&block2[2..]);
        let mut r = Rewriter::new();
        let mut out = Vec::new();
        r.feed(&input, &mut out).unwrap();
        assert_eq!(r.phase(), Phase::Relaying);
        let f = frames(&out[24..]);
        assert_eq!(
            f.len(),
            2,
            "the CONTINUATION is merged into one HEADERS frame"
        );
        let mut server = new_decoder();
        for (i, (kind, flags, stream, payload)) in f.iter().enumerate() {
            assert_eq!(*kind, FRAME_HEADERS);
            let block = if i == 1 {
                assert_eq!(*flags, FLAG_END_HEADERS | FLAG_PRIORITY | FLAG_END_STREAM);
                assert_eq!(*stream, 3);
                assert_eq!(&payload[..5], &[0, 0, 0, 1, 15]);
                &payload[5..]
            } else {
                &payload[..]
            };
            let h = decode_block(&mut server, *stream, block).unwrap();
            assert_eq!(find_header(&h, ":authority"), Some(&b"h:1"[..]));
        }
    }

    #[test]
    fn large_blocks_are_split_at_the_frame_size_limit() {
        let mut headers: HeaderList = vec![(b":authority".to_vec(), b"h:1".to_vec())];
        for i in 0..5 {
            headers.push((format!("x-{i}").into_bytes(), vec![b'v'; 10_000]));
        }
        let mut block = Vec::new();
        encode_block(&headers, &mut block);
        let mut out = Vec::new();
        push_header_frames(5, true, Some([0, 0, 0, 0, 1]), &block, &mut out);
        let f = frames(&out);
        assert!(f.len() >= 4);
        assert_eq!(f[0].0, FRAME_HEADERS);
        assert_eq!(f[0].1, FLAG_END_STREAM | FLAG_PRIORITY);
        let mut joined = f[0].3[5..].to_vec();
        for (i, (kind, flags, stream, payload)) in f.iter().enumerate().skip(1) {
            assert_eq!((*kind, *stream), (FRAME_CONTINUATION, 5));
            let last = i == f.len() - 1;
            assert_eq!(*flags, if last { FLAG_END_HEADERS } else { 0 });
            joined.extend_from_slice(payload);
        }
        for (_, _, _, payload) in &f {
            assert!(payload.len() <= RELAY_FRAME_PAYLOAD_BYTES_MAX);
        }
        assert_eq!(joined, block);
    }

    #[test]
    fn sniffer_steps_aside_on_what_it_does_not_understand() {
        // Not HTTP/2 at all.
        let mut r = Rewriter::new();
        let mut out = Vec::new();
        r.feed(b"GET / HTTP/1.1\r\n\r\n", &mut out).unwrap();
        assert_eq!(
            (r.phase(), out.as_slice()),
            (Phase::Direct, &b"GET / HTTP/1.1\r\n\r\n"[..])
        );
        // A first block with bad HPACK goes to the server as sent.
        let mut input = CLIENT_PREFACE.to_vec();
        input.extend(headers_frame(1, FLAG_END_HEADERS, &[0x80 | 99]));
        let mut r = Rewriter::new();
        let mut out = Vec::new();
        r.feed(&input, &mut out).unwrap();
        assert_eq!((r.phase(), &out), (Phase::Direct, &input));
        // A DATA frame in the middle of the first block.
        let mut input = CLIENT_PREFACE.to_vec();
        input.extend(headers_frame(1, 0, &[0x82]));
        input.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 1]);
        let mut r = Rewriter::new();
        let mut out = Vec::new();
        r.feed(&input, &mut out).unwrap();
        assert_eq!((r.phase(), &out), (Phase::Direct, &input));
        // A truncated connection releases what was held.
        let mut r = Rewriter::new();
        let mut out = Vec::new();
        r.feed(&input[..30], &mut out).unwrap();
        r.finish(&mut out);
        assert_eq!(out, &input[..30]);
    }

    #[test]
    fn relay_errors_close_the_connection() {
        let mut start = CLIENT_PREFACE.to_vec();
        start.extend(headers_frame(
            1,
            FLAG_END_HEADERS,
            &request_block(b"http://h:1", false),
        ));
        // Bad HPACK in a later block.
        let mut r = Rewriter::new();
        let mut out = Vec::new();
        r.feed(&start, &mut out).unwrap();
        assert_eq!(r.phase(), Phase::Relaying);
        let err = r
            .feed(&headers_frame(3, FLAG_END_HEADERS, &[0x80 | 99]), &mut out)
            .unwrap_err();
        assert!(
            matches!(err, RelayError::Hpack { stream_id: 3, .. }),
            "{err}"
        );
        // An oversized block.
        let mut r = Rewriter::new();
        r.feed(&start, &mut out).unwrap();
        let mut big = [0u8; 9];
        big[..3].copy_from_slice(&((HEADER_FRAME_BYTES_MAX + 1) as u32).to_be_bytes()[1..]);
        big[3] = FRAME_HEADERS;
        big[8] = 3;
        let err = r.feed(&big, &mut out).unwrap_err();
        assert!(matches!(
            err,
            RelayError::HeaderBlockTooLarge { stream_id: 3, .. }
        ));
        // A block made of many CONTINUATIONs that together exceed the limit.
        let mut r = Rewriter::new();
        r.feed(&start, &mut out).unwrap();
        r.feed(&headers_frame(3, 0, &[0x82]), &mut out).unwrap();
        let chunk = vec![0x82; 16_000];
        let mut err = None;
        for _ in 0..10 {
            let mut f = vec![0, 0x3e, 0x80, FRAME_CONTINUATION, 0, 0, 0, 0, 3];
            f.extend_from_slice(&chunk);
            if let Err(e) = r.feed(&f, &mut out) {
                err = Some(e);
                break;
            }
        }
        assert!(matches!(err, Some(RelayError::HeaderBlockTooLarge { .. })));
    }

    #[test]
    fn data_frames_are_copied_as_they_arrive() {
        let mut start = CLIENT_PREFACE.to_vec();
        start.extend(headers_frame(
            1,
            FLAG_END_HEADERS,
            &request_block(b"http://h:1", false),
        ));
        let mut r = Rewriter::new();
        let mut out = Vec::new();
        r.feed(&start, &mut out).unwrap();
        out.clear();
        // A 100 kB DATA frame header, then only part of its payload: the part is
        // forwarded at once, not held until the frame is complete.
        let header = [0x01, 0x86, 0xa0, 0, 0, 0, 0, 0, 1];
        r.feed(&header, &mut out).unwrap();
        r.feed(&[7; 1000], &mut out).unwrap();
        assert_eq!(out.len(), 9 + 1000);
        assert!(r.pending.is_empty());
    }
}
