//! Serde for `Vec<u8>` fields as one byte string instead of a sequence of `u8`s.
//!
//! The encoding postcard produces is the same either way (a varint length, then the bytes),
//! so messages and stored entries stay compatible; what changes is the cost: serde's default
//! for `Vec<u8>` visits every byte as an element, which showed up at ~2% of a node's CPU in
//! the put benchmark (log entries are encoded into every Append and decoded on arrival).

use std::fmt;

use serde::de::{self, SeqAccess, Visitor};
use serde::{Deserializer, Serializer};

/// Most bytes reserved up front when a self-describing format announces a sequence length
/// (postcard uses `visit_bytes`; this only bounds what a lying length can make us allocate).
const PREALLOC_BYTES_MAX: usize = 64 * 1024;

pub(crate) fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_bytes(v)
}

pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    d.deserialize_byte_buf(BytesVisitor)
}

struct BytesVisitor;

impl<'de> Visitor<'de> for BytesVisitor {
    type Value = Vec<u8>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a byte string")
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
        Ok(v.to_vec())
    }

    fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
        Ok(v)
    }

    /// Formats without a byte-string type (JSON arrays, for one) still decode.
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(PREALLOC_BYTES_MAX));
        while let Some(b) = seq.next_element::<u8>()? {
            out.push(b);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct Plain {
        a: u64,
        data: Vec<u8>,
    }

    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct AsBytes {
        a: u64,
        #[serde(with = "super")]
        data: Vec<u8>,
    }

    /// The helper must not change a single byte on the wire or on disk.
    #[test]
    fn postcard_encoding_is_unchanged() {
        for len in [0usize, 1, 127, 128, 300, 70_000] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let plain = postcard::to_allocvec(&Plain {
                a: 9,
                data: data.clone(),
            })
            .unwrap();
            let fast = postcard::to_allocvec(&AsBytes {
                a: 9,
                data: data.clone(),
            })
            .unwrap();
            assert_eq!(plain, fast, "len {len}");
            let back: AsBytes = postcard::from_bytes(&plain).unwrap();
            assert_eq!(back.data, data);
        }
    }

    #[test]
    fn a_length_beyond_the_input_is_an_error() {
        // a = 1, then a length of 200 with 3 bytes behind it.
        let bytes = [1u8, 200, 1, 1, 2, 3];
        assert!(postcard::from_bytes::<AsBytes>(&bytes).is_err());
    }
}
