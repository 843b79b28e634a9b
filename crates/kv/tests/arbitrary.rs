//! Arbitrary commands, valid or not (empty keys, odd ranges, negative or future revisions,
//! missing leases, nested transactions, huge TTLs): `apply` must never panic, must keep
//! every invariant, must be deterministic, and snapshots must round-trip.

use concord_kv::*;
use proptest::prelude::*;

fn bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => prop::collection::vec(prop::sample::select(vec![0u8, b'a', b'b', 0xff]), 0..3),
        1 => Just(vec![0]),
        1 => Just(vec![]),
    ]
}

/// Keys: mostly valid, sometimes empty (which must be refused).
fn key() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        12 => prop::collection::vec(prop::sample::select(vec![0u8, b'a', b'b', 0xff]), 1..3),
        1 => Just(vec![]),
    ]
}

fn lease() -> impl Strategy<Value = LeaseId> {
    prop_oneof![Just(0i64), -2..4i64, any::<i64>()]
}

fn range_req() -> impl Strategy<Value = RangeRequest> {
    (
        key(),
        bytes(),
        -1..4i64,
        prop_oneof![3 => Just(0i64), 1 => -2..12i64],
        any::<bool>(),
        any::<bool>(),
        (-1..6i64, -1..6i64),
    )
        .prop_map(
            |(key, range_end, limit, revision, keys_only, count_only, f)| RangeRequest {
                key,
                range_end,
                limit,
                revision,
                keys_only,
                count_only,
                sort_order: SortOrder::Descend,
                sort_target: SortTarget::Mod,
                min_mod_revision: f.0,
                max_create_revision: f.1,
                ..Default::default()
            },
        )
}

fn put_req() -> impl Strategy<Value = PutRequest> {
    (
        key(),
        bytes(),
        prop_oneof![4 => Just(0i64), 1 => lease()],
        any::<bool>(),
        prop::bool::weighted(0.1),
        prop::bool::weighted(0.1),
    )
        .prop_map(
            |(key, value, lease, prev_kv, ignore_value, ignore_lease)| PutRequest {
                key,
                value,
                lease,
                prev_kv,
                ignore_value,
                ignore_lease,
            },
        )
}

fn del_req() -> impl Strategy<Value = DeleteRangeRequest> {
    (key(), bytes(), any::<bool>()).prop_map(|(key, range_end, prev_kv)| DeleteRangeRequest {
        key,
        range_end,
        prev_kv,
    })
}

fn compare() -> impl Strategy<Value = Compare> {
    let target = prop_oneof![
        (-1..4i64).prop_map(CompareTarget::Version),
        (-1..12i64).prop_map(CompareTarget::CreateRevision),
        (-1..12i64).prop_map(CompareTarget::ModRevision),
        bytes().prop_map(CompareTarget::Value),
        lease().prop_map(CompareTarget::Lease),
    ];
    let result = prop::sample::select(vec![
        CompareResult::Equal,
        CompareResult::NotEqual,
        CompareResult::Less,
        CompareResult::Greater,
    ]);
    (key(), bytes(), result, target).prop_map(|(key, range_end, result, target)| Compare {
        key,
        range_end,
        result,
        target,
    })
}

fn txn_req() -> impl Strategy<Value = TxnRequest> {
    let leaf = prop_oneof![
        range_req().prop_map(RequestOp::Range),
        put_req().prop_map(RequestOp::Put),
        del_req().prop_map(RequestOp::DeleteRange),
    ];
    let op = leaf.prop_recursive(3, 12, 3, |inner| {
        (
            prop::collection::vec(compare(), 0..2),
            prop::collection::vec(inner.clone(), 0..3),
            prop::collection::vec(inner, 0..3),
        )
            .prop_map(|(compare, success, failure)| {
                RequestOp::Txn(TxnRequest {
                    compare,
                    success,
                    failure,
                })
            })
    });
    (
        prop::collection::vec(compare(), 0..3),
        prop::collection::vec(op.clone(), 0..4),
        prop::collection::vec(op, 0..3),
    )
        .prop_map(|(compare, success, failure)| TxnRequest {
            compare,
            success,
            failure,
        })
}

fn command() -> impl Strategy<Value = Command> {
    prop_oneof![
        4 => put_req().prop_map(Command::Put),
        2 => del_req().prop_map(Command::DeleteRange),
        3 => txn_req().prop_map(Command::Txn),
        1 => (-2..12i64).prop_map(|revision| Command::Compact { revision }),
        2 => (lease(), prop_oneof![-5..5i64, any::<i64>()], 0..10_000u64)
            .prop_map(|(id, ttl_secs, now_ms)| Command::LeaseGrant { id, ttl_secs, now_ms }),
        1 => lease().prop_map(|id| Command::LeaseRevoke { id }),
        1 => (lease(), any::<u64>()).prop_map(|(id, now_ms)| Command::LeaseKeepAlive { id, now_ms }),
        1 => any::<u64>().prop_map(|now_ms| Command::LeaseExpire { now_ms }),
        1 => (prop::collection::vec(lease(), 0..4), any::<u64>())
            .prop_map(|(ids, now_ms)| Command::LeaseExpireIds { ids, now_ms }),
        1 => any::<u64>().prop_map(|now_ms| Command::LeasePromote { now_ms }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_commands_keep_invariants_and_determinism(
        cmds in prop::collection::vec(command(), 1..40),
        reads in prop::collection::vec(range_req(), 0..4),
    ) {
        let mut a = KvStore::new();
        let mut b = KvStore::new();
        for (i, cmd) in cmds.into_iter().enumerate() {
            let index = i as u64 + 1;
            // One replica gets the command through the log encoding, the other directly.
            let ra = a.apply_entry(index, &cmd.encode());
            let rb = b.apply(index, cmd);
            prop_assert_eq!(&ra, &rb);
            a.check_invariants();
            for r in &reads {
                prop_assert_eq!(a.range(r), b.range(r));
            }
        }
        let snap = a.snapshot();
        prop_assert_eq!(&snap, &b.snapshot());
        let restored = KvStore::restore(&snap).unwrap();
        prop_assert_eq!(restored.snapshot(), snap);
        prop_assert_eq!(restored.hash_kv(0), a.hash_kv(0));
    }
}
