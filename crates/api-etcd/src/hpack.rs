//! A small HPACK (RFC 7541) decoder and a table-free encoder, for the `:authority` relay.
//!
//! Why our own: the decoder runs on the first header block of every client connection,
//! so it has to be cheap. The maintained pure-HPACK crate we looked at (`loona-hpack`)
//! rebuilds a hash map of the Huffman code for every string and spends about 300 µs on
//! one grpc-go request block; this decoder, with `httlib-huffman`'s table-driven Huffman
//! decoder underneath, needs a few microseconds. `h2` has an excellent decoder but does
//! not export it. The representation parsing below is short, bounded and checked
//! everywhere; `loona-hpack` serves as the test oracle.

use std::collections::VecDeque;
use std::fmt;

/// The protocol's initial dynamic table size (SETTINGS_HEADER_TABLE_SIZE default).
pub const INITIAL_TABLE_BYTES: usize = 4096;
/// Per-entry overhead in dynamic table size accounting (RFC 7541, section 4.1).
pub const ENTRY_OVERHEAD_BYTES: usize = 32;
/// Integers above this are refused; nothing in a bounded header block needs more.
const INTEGER_MAX: usize = 1 << 28;

/// A decoded header list: (name, value) pairs in block order.
pub type HeaderList = Vec<(Vec<u8>, Vec<u8>)>;

/// RFC 7541, Appendix A.
const STATIC_TABLE: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

/// Why a header block could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HpackError {
    /// The block ends inside a representation.
    Truncated,
    /// An integer above 2^28 or with too many continuation bytes.
    IntegerTooLarge,
    /// Index 0, or beyond the static and dynamic tables.
    BadIndex(usize),
    /// An invalid Huffman-coded string.
    Huffman,
    /// A dynamic table size update above what the decoder allows.
    TableSizeTooLarge(usize),
    /// A dynamic table size update after the first header field of a block.
    LateSizeUpdate,
}

impl fmt::Display for HpackError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HpackError::Truncated => write!(f, "block ends inside a field"),
            HpackError::IntegerTooLarge => write!(f, "integer too large"),
            HpackError::BadIndex(i) => write!(f, "no table entry {i}"),
            HpackError::Huffman => write!(f, "invalid Huffman string"),
            HpackError::TableSizeTooLarge(n) => write!(f, "table size update to {n} bytes"),
            HpackError::LateSizeUpdate => write!(f, "table size update after a field"),
        }
    }
}

impl std::error::Error for HpackError {}

/// Decoding state of one direction of one connection: the dynamic table.
pub struct Decoder {
    /// Newest entry first (index 62 is `table[0]`).
    table: VecDeque<(Vec<u8>, Vec<u8>)>,
    table_bytes: usize,
    max_table_bytes: usize,
    /// Largest size a table size update may ask for.
    allowed_table_bytes: usize,
}

impl Decoder {
    /// A decoder with the protocol's initial table size; size updates above
    /// `allowed_table_bytes` are refused.
    pub fn new(allowed_table_bytes: usize) -> Decoder {
        Decoder {
            table: VecDeque::new(),
            table_bytes: 0,
            max_table_bytes: INITIAL_TABLE_BYTES.min(allowed_table_bytes),
            allowed_table_bytes,
        }
    }

    /// Decodes one complete header block, calling `field(name, value)` for each field in
    /// order. On error the table may hold part of the block's insertions; the caller must
    /// give the connection up.
    pub fn decode(
        &mut self,
        block: &[u8],
        mut field: impl FnMut(&[u8], &[u8]),
    ) -> Result<(), HpackError> {
        let mut pos = 0;
        let mut seen_field = false;
        while pos < block.len() {
            let first = block[pos];
            if first & 0x80 != 0 {
                let index = decode_integer(block, &mut pos, 7)?;
                let (name, value) = self.entry(index)?;
                field(name, value);
            } else if first & 0xe0 == 0x20 {
                // Dynamic table size update: only before the first field (section 4.2).
                if seen_field {
                    return Err(HpackError::LateSizeUpdate);
                }
                let size = decode_integer(block, &mut pos, 5)?;
                if size > self.allowed_table_bytes {
                    return Err(HpackError::TableSizeTooLarge(size));
                }
                self.max_table_bytes = size;
                self.evict_to(size);
                continue;
            } else {
                // Literal: with incremental indexing (01, 6-bit index), never indexed
                // (0001) or without indexing (0000), both 4-bit.
                let indexing = first & 0x40 != 0;
                let index = decode_integer(block, &mut pos, if indexing { 6 } else { 4 })?;
                let name = if index == 0 {
                    decode_string(block, &mut pos)?
                } else {
                    self.entry(index)?.0.to_vec()
                };
                let value = decode_string(block, &mut pos)?;
                field(&name, &value);
                if indexing {
                    self.insert(name, value);
                }
            }
            seen_field = true;
        }
        Ok(())
    }

    fn entry(&self, index: usize) -> Result<(&[u8], &[u8]), HpackError> {
        match index {
            0 => Err(HpackError::BadIndex(0)),
            1..=61 => {
                let (n, v) = STATIC_TABLE[index - 1];
                Ok((n.as_bytes(), v.as_bytes()))
            }
            _ => self
                .table
                .get(index - 62)
                .map(|(n, v)| (n.as_slice(), v.as_slice()))
                .ok_or(HpackError::BadIndex(index)),
        }
    }

    fn insert(&mut self, name: Vec<u8>, value: Vec<u8>) {
        let size = name.len() + value.len() + ENTRY_OVERHEAD_BYTES;
        if size > self.max_table_bytes {
            // An entry larger than the table empties it and is not added (section 4.4).
            self.evict_to(0);
            return;
        }
        self.evict_to(self.max_table_bytes - size);
        self.table.push_front((name, value));
        self.table_bytes += size;
        debug_assert!(self.table_bytes <= self.max_table_bytes);
    }

    fn evict_to(&mut self, bytes: usize) {
        while self.table_bytes > bytes {
            let (n, v) = self.table.pop_back().expect("non-empty while size > 0");
            self.table_bytes -= n.len() + v.len() + ENTRY_OVERHEAD_BYTES;
        }
    }

    /// Bytes the dynamic table currently holds, by HPACK's accounting.
    pub fn table_bytes(&self) -> usize {
        self.table_bytes
    }
}

/// Reads an integer with an N-bit prefix at `*pos` (section 5.1).
fn decode_integer(buf: &[u8], pos: &mut usize, prefix_bits: u8) -> Result<usize, HpackError> {
    debug_assert!((1..=8).contains(&prefix_bits));
    let max_prefix = (1usize << prefix_bits) - 1;
    let first = *buf.get(*pos).ok_or(HpackError::Truncated)?;
    *pos += 1;
    let mut value = usize::from(first) & max_prefix;
    if value < max_prefix {
        return Ok(value);
    }
    let mut shift = 0;
    loop {
        let b = *buf.get(*pos).ok_or(HpackError::Truncated)?;
        *pos += 1;
        value += usize::from(b & 0x7f) << shift;
        if value > INTEGER_MAX {
            return Err(HpackError::IntegerTooLarge);
        }
        if b & 0x80 == 0 {
            return Ok(value);
        }
        shift += 7;
        if shift > 28 {
            return Err(HpackError::IntegerTooLarge);
        }
    }
}

/// Reads a string literal at `*pos` (section 5.2), Huffman-decoding it if flagged.
fn decode_string(buf: &[u8], pos: &mut usize) -> Result<Vec<u8>, HpackError> {
    let huffman = *buf.get(*pos).ok_or(HpackError::Truncated)? & 0x80 != 0;
    let len = decode_integer(buf, pos, 7)?;
    let end = pos.checked_add(len).ok_or(HpackError::Truncated)?;
    let raw = buf.get(*pos..end).ok_or(HpackError::Truncated)?;
    *pos = end;
    if !huffman {
        return Ok(raw.to_vec());
    }
    // Huffman codes are 5 to 30 bits long, so the decoded string is at most 8/5 longer.
    let mut out = Vec::with_capacity(raw.len() * 8 / 5 + 1);
    httlib_huffman::decode(raw, &mut out, httlib_huffman::DecoderSpeed::FiveBits)
        .map_err(|_| HpackError::Huffman)?;
    Ok(out)
}

/// Appends the integer representation (section 5.1) of `value` with an N-bit prefix;
/// `flags` holds the bits of the first byte above the prefix.
pub fn encode_integer(value: usize, prefix_bits: u8, flags: u8, out: &mut Vec<u8>) {
    assert!(
        (1..=8).contains(&prefix_bits),
        "HPACK prefixes are 1..=8 bits"
    );
    let max_prefix = (1usize << prefix_bits) - 1;
    if value < max_prefix {
        out.push(flags | value as u8);
        return;
    }
    out.push(flags | max_prefix as u8);
    let mut rest = value - max_prefix;
    while rest >= 0x80 {
        out.push((rest & 0x7f) as u8 | 0x80);
        rest >>= 7;
    }
    out.push(rest as u8);
}

/// Appends a string literal without Huffman coding (section 5.2).
pub fn encode_string(s: &[u8], out: &mut Vec<u8>) {
    encode_integer(s.len(), 7, 0x00, out);
    out.extend_from_slice(s);
}

/// Encodes `headers` as a block that touches no dynamic table: every field is a literal
/// without indexing with a literal name (section 6.2.2), so any decoder, whatever its
/// table holds, reads the same list. Fields the client marked "never indexed" lose the
/// mark; the server is the last hop and indexes nothing sent this way either.
pub fn encode_block(headers: &[(Vec<u8>, Vec<u8>)], out: &mut Vec<u8>) {
    for (name, value) in headers {
        out.push(0x00);
        encode_string(name, out);
        encode_string(value, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn decode_all(d: &mut Decoder, block: &[u8]) -> Result<HeaderList, HpackError> {
        let mut v = Vec::new();
        d.decode(block, |n, val| v.push((n.to_vec(), val.to_vec())))?;
        Ok(v)
    }

    fn huffman(s: &[u8]) -> Vec<u8> {
        let mut coded = Vec::new();
        httlib_huffman::encode(s, &mut coded).unwrap();
        let mut out = Vec::new();
        encode_integer(coded.len(), 7, 0x80, &mut out);
        out.extend(coded);
        out
    }

    /// A tiny deterministic generator (xorshift64) for the randomised tests.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn static_table_matches_the_reference_decoder() {
        let mut ours = Decoder::new(INITIAL_TABLE_BYTES);
        let mut oracle = loona_hpack::Decoder::new();
        for i in 1..=61u8 {
            let block = [0x80 | i];
            assert_eq!(
                decode_all(&mut ours, &block).unwrap(),
                oracle.decode(&block).unwrap(),
                "static entry {i}"
            );
        }
        assert_eq!(
            decode_all(&mut ours, &[0x80 | 62]),
            Err(HpackError::BadIndex(62))
        );
        assert_eq!(decode_all(&mut ours, &[0x80]), Err(HpackError::BadIndex(0)));
    }

    #[test]
    fn rfc7541_request_examples_with_huffman_and_eviction() {
        // Appendix C.4 (Huffman) and C.3 (the same requests without it): three blocks
        // on one connection, each referring to entries the earlier ones added.
        let c4 = [
            "828684418cf1e3c2e5f23a6ba0ab90f4ff",
            "828684be5886a8eb10649cbf",
            "828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf",
        ];
        let c3 = [
            "828684410f7777772e6578616d706c652e636f6d",
            "828684be58086e6f2d6361636865",
            "828785bf400a637573746f6d2d6b65790c637573746f6d2d76616c7565",
        ];
        for blocks in [c4, c3] {
            let mut d = Decoder::new(INITIAL_TABLE_BYTES);
            let mut third = Vec::new();
            for b in blocks {
                third = decode_all(&mut d, &hex(b)).unwrap();
            }
            let names: Vec<&[u8]> = third.iter().map(|(n, _)| n.as_slice()).collect();
            assert_eq!(
                names,
                [
                    &b":method"[..],
                    b":scheme",
                    b":path",
                    b":authority",
                    b"custom-key"
                ]
            );
            assert_eq!(third[2].1, b"/index.html");
            assert_eq!(third[3].1, b"www.example.com");
            assert_eq!(third[4].1, b"custom-value");
            // Table after C.4.3/C.3.3: 164 bytes in three entries.
            assert_eq!(d.table_bytes(), 164);
        }
    }

    #[test]
    fn size_updates_evict_and_are_bounded() {
        let mut d = Decoder::new(8192);
        let mut block = vec![0x40];
        encode_string(b"x-a", &mut block);
        encode_string(b"1", &mut block);
        decode_all(&mut d, &block).unwrap();
        assert_eq!(d.table_bytes(), 3 + 1 + 32);
        // Size 0 empties the table, so index 62 is gone.
        let mut b = Vec::new();
        encode_integer(0, 5, 0x20, &mut b);
        b.push(0x82);
        decode_all(&mut d, &b).unwrap();
        assert_eq!(d.table_bytes(), 0);
        assert_eq!(
            decode_all(&mut d, &[0x80 | 62]),
            Err(HpackError::BadIndex(62))
        );
        // Above the allowed size, and after a field.
        let mut b = Vec::new();
        encode_integer(8193, 5, 0x20, &mut b);
        assert_eq!(
            decode_all(&mut d, &b),
            Err(HpackError::TableSizeTooLarge(8193))
        );
        assert_eq!(
            decode_all(&mut d, &[0x82, 0x20]),
            Err(HpackError::LateSizeUpdate)
        );
    }

    #[test]
    fn malformed_input_is_an_error() {
        let mut d = Decoder::new(INITIAL_TABLE_BYTES);
        for bad in [
            &[0x40][..],                                 // literal, no name
            &[0x00, 0x03, b'a'],                         // name shorter than its length
            &[0x01],                                     // indexed name, no value
            &[0xff, 0xff, 0xff, 0xff, 0xff, 0x0f],       // index beyond 2^28
            &[0xff, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01], // too many continuation bytes
            &[0x00, 0x81, 0xff, 0x00],                   // Huffman: EOS-prefix longer than 7 bits
        ] {
            assert!(decode_all(&mut d, bad).is_err(), "{bad:02x?}");
        }
    }

    #[test]
    fn agrees_with_the_reference_decoder_on_random_blocks() {
        // Random header lists, encoded with random representations (indexed, the three
        // literal kinds, Huffman or not, occasional size updates), decoded by both.
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..300 {
            let mut ours = Decoder::new(INITIAL_TABLE_BYTES);
            let mut oracle = loona_hpack::Decoder::new();
            let mut entries = 0usize; // upper bound on dynamic entries, for valid refs
            for _ in 0..4 {
                let mut block = Vec::new();
                if rng.below(4) == 0 {
                    encode_integer(1024 + rng.below(3072), 5, 0x20, &mut block);
                }
                for _ in 0..1 + rng.below(8) {
                    match rng.below(5) {
                        0 => encode_integer(1 + rng.below(61), 7, 0x80, &mut block),
                        kind => {
                            let (flags, prefix) = match kind {
                                1 => (0x40, 6),
                                2 => (0x10, 4),
                                _ => (0x00, 4),
                            };
                            let name_index = rng.below(62);
                            encode_integer(name_index, prefix, flags, &mut block);
                            let text = |rng: &mut Rng| -> Vec<u8> {
                                (0..rng.below(40)).map(|_| rng.below(256) as u8).collect()
                            };
                            if name_index == 0 {
                                let n = text(&mut rng);
                                if rng.below(2) == 0 {
                                    block.extend(huffman(&n));
                                } else {
                                    encode_string(&n, &mut block);
                                }
                            }
                            let v = text(&mut rng);
                            if rng.below(2) == 0 {
                                block.extend(huffman(&v));
                            } else {
                                encode_string(&v, &mut block);
                            }
                            if kind == 1 {
                                entries += 1;
                            }
                        }
                    }
                }
                if entries > 0 && rng.below(2) == 0 {
                    encode_integer(62 + rng.below(entries.min(3)), 7, 0x80, &mut block);
                }
                let theirs = oracle.decode(&block);
                let mine = decode_all(&mut ours, &block);
                match theirs {
                    Ok(list) => assert_eq!(mine.unwrap(), list, "block {block:02x?}"),
                    // An index past an evicted entry: both must refuse, then stop.
                    Err(_) => {
                        assert!(mine.is_err(), "oracle refused {block:02x?}, we did not");
                        break;
                    }
                }
            }
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = Rng(42);
        for _ in 0..20_000 {
            let len = rng.below(48);
            let block: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            let mut d = Decoder::new(INITIAL_TABLE_BYTES);
            let _ = decode_all(&mut d, &block);
            // Also as a Huffman string of that length.
            let mut s = Vec::new();
            encode_integer(block.len(), 7, 0x80, &mut s);
            s.extend_from_slice(&block);
            let mut lit = vec![0x00];
            lit.extend_from_slice(&s);
            lit.extend_from_slice(&s);
            let _ = decode_all(&mut d, &lit);
        }
    }

    #[test]
    fn encoded_blocks_need_no_table() {
        let headers = vec![
            (b":authority".to_vec(), b"127.0.0.1:2379".to_vec()),
            (b"x-long".to_vec(), vec![b'z'; 300]),
        ];
        let mut block = Vec::new();
        encode_block(&headers, &mut block);
        let mut d = Decoder::new(0);
        assert_eq!(decode_all(&mut d, &block).unwrap(), headers);
        assert_eq!(d.table_bytes(), 0);
    }
}
