//! The WAL record decoder must never panic, whatever the bytes, and whatever it accepts
//! must re-encode to exactly the bytes it consumed.
//!
//! Input byte 0 picks a mode: odd = the rest is raw bytes (a damaged segment); even = the
//! rest is a record type and payload framed with correct checksums, so the fuzzer reaches
//! the payload parsing that the checksums otherwise guard.
#![no_main]

use concord_storage::record::{decode, encode, frame_raw, segment_salt};

/// Any segment's salt would do: the decoder's paths do not depend on its value.
const SALT_SEQ: u64 = 1;
use libfuzzer_sys::fuzz_target;

fn walk(data: &[u8]) {
    let mut at = 0;
    // Walk the input as a segment would be walked, record after record.
    while at < data.len() {
        match decode(&data[at..], segment_salt(SALT_SEQ)) {
            Ok((record, n)) => {
                assert!(n > 0 && at + n <= data.len());
                let mut again = Vec::new();
                encode(&mut again, &record, segment_salt(SALT_SEQ));
                assert_eq!(&again[..], &data[at..at + n]);
                at += n;
            }
            Err(_) => break,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    match data {
        [mode, rest @ ..] if mode % 2 == 1 => walk(rest),
        [_, ty, payload @ ..] => {
            let mut framed = Vec::new();
            frame_raw(&mut framed, *ty, payload, segment_salt(SALT_SEQ));
            walk(&framed);
        }
        _ => walk(data),
    }
});
