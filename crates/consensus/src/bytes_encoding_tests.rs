//! Byte fields (`Entry::data`, snapshot data, message payloads) serialize through the
//! `serde_bytes` crate as one byte string instead of a sequence of `u8`s: postcard writes
//! the same bytes either way (a varint length, then the bytes), so messages and stored
//! entries stay compatible, while serde's default visits every byte (~2% of a node's CPU
//! in the put benchmark). These tests pin that the encoding is unchanged.

use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, PartialEq, Debug)]
struct Plain {
    a: u64,
    data: Vec<u8>,
}

#[derive(Serialize, Deserialize, PartialEq, Debug)]
struct AsBytes {
    a: u64,
    #[serde(with = "serde_bytes")]
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
