//! Stable-toolchain stand-in for the `cargo fuzz` targets in `fuzz/`: arbitrary bytes and
//! mutated valid encodings fed to the record and snapshot decoders, which must never
//! panic, and must re-encode whatever they accept to the same bytes.

use concord_consensus::{ConfState, Entry, EntryKind, HardState, Snapshot, SnapshotMeta};
use concord_storage::record::{decode, encode, frame_raw, segment_salt, Record};

/// Any segment's salt would do: the decoder's paths do not depend on its value.
const SALT_SEQ: u64 = 1;
use concord_storage::snapshot::{decode_snapshot, encode_snapshot};
use proptest::prelude::*;

fn walk(data: &[u8]) {
    let mut at = 0;
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

fn valid_records() -> Vec<u8> {
    let mut buf = Vec::new();
    for r in [
        Record::SegmentStart {
            seq: 1,
            prev_index: 0,
            prev_term: 0,
            reset: true,
            recycled: false,
        },
        Record::Entry(Entry {
            index: 1,
            term: 1,
            kind: EntryKind::Normal,
            data: b"abc".to_vec(),
        }),
        Record::HardState(HardState {
            term: 1,
            vote: 1,
            commit: 1,
        }),
        Record::Compact { index: 1, term: 1 },
        Record::BatchBegin {
            first_index: 1,
            count: 2,
        },
        Record::SyncMark {
            offset: 120,
            stretch_start: 0,
            stretch_crc: 0,
            recycled: false,
            padding: 3,
        },
        Record::Entries(vec![
            Entry {
                index: 2,
                term: 1,
                kind: EntryKind::Normal,
                data: b"de".to_vec(),
            },
            Entry {
                index: 3,
                term: 1,
                kind: EntryKind::ConfChange,
                data: b"f".to_vec(),
            },
        ]),
    ] {
        encode(&mut buf, &r, segment_salt(SALT_SEQ));
    }
    buf
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4000, ..ProptestConfig::default() })]

    #[test]
    fn record_decoder_never_panics_on_arbitrary_bytes(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        walk(&data);
    }

    #[test]
    fn record_decoder_never_panics_on_any_payload_behind_good_checksums(
        ty in 0u8..8,
        payload in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut framed = Vec::new();
        frame_raw(&mut framed, ty, &payload, segment_salt(SALT_SEQ));
        walk(&framed);
    }

    #[test]
    fn record_decoder_never_panics_on_mutated_records(
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..6),
        cut in any::<usize>(),
    ) {
        let mut buf = valid_records();
        for (at, b) in edits {
            let i = at % buf.len();
            buf[i] = b;
        }
        buf.truncate(cut % (buf.len() + 1));
        walk(&buf);
    }

    #[test]
    fn snapshot_decoder_never_panics(
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..6),
        cut in any::<usize>(),
        junk in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        let snap = Snapshot {
            meta: SnapshotMeta { index: 5, term: 2, conf: ConfState::new([1, 2]) },
            data: vec![9; 40],
        };
        let mut buf = encode_snapshot(&snap);
        for (at, b) in edits {
            let i = at % buf.len();
            buf[i] = b;
        }
        buf.truncate(cut % (buf.len() + 1));
        if let Ok(s) = decode_snapshot(&buf) {
            prop_assert_eq!(encode_snapshot(&s), buf);
        }
        let _ = decode_snapshot(&junk);
    }
}
