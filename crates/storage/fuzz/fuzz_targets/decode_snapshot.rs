//! The snapshot decoder must never panic, whatever the bytes.
#![no_main]

use concord_storage::snapshot::{decode_snapshot, encode_snapshot};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(snap) = decode_snapshot(data) {
        assert_eq!(encode_snapshot(&snap), data);
    }
});
