//! One test (or a few) per operation and per error, against etcd v3's documented behaviour.

use concord_kv::*;

/// Applies commands at consecutive log indices.
struct Harness {
    store: KvStore,
    index: u64,
}

impl Harness {
    fn new() -> Harness {
        Harness {
            store: KvStore::new(),
            index: 0,
        }
    }

    fn apply(&mut self, cmd: Command) -> Response {
        self.index += 1;
        // Every command goes through the log encoding, as in the real node.
        let cmd = Command::decode(&cmd.encode()).expect("round trip");
        self.store.apply(self.index, cmd)
    }

    fn put(&mut self, k: &str, v: &str) -> Response {
        self.apply(Command::Put(put_req(k, v)))
    }

    fn put_lease(&mut self, k: &str, v: &str, lease: LeaseId) -> Response {
        self.apply(Command::Put(PutRequest {
            lease,
            ..put_req(k, v)
        }))
    }

    fn del(&mut self, k: &str, end: &str) -> Response {
        self.apply(Command::DeleteRange(DeleteRangeRequest {
            key: k.into(),
            range_end: end.into(),
            prev_kv: true,
        }))
    }

    fn get(&self, k: &str) -> Option<KeyValue> {
        self.store.get(k.as_bytes())
    }

    fn range(&self, req: RangeRequest) -> Result<RangeResponse, KvError> {
        self.store.range(&req)
    }

    fn grant(&mut self, id: LeaseId, ttl_secs: i64, now_ms: u64) -> Response {
        self.apply(Command::LeaseGrant {
            id,
            ttl_secs,
            now_ms,
        })
    }
}

fn put_req(k: &str, v: &str) -> PutRequest {
    PutRequest {
        key: k.into(),
        value: v.into(),
        ..Default::default()
    }
}

fn rr(k: &str, end: &str) -> RangeRequest {
    RangeRequest {
        key: k.into(),
        range_end: end.into(),
        ..Default::default()
    }
}

fn keys(resp: &RangeResponse) -> Vec<String> {
    resp.kvs
        .iter()
        .map(|kv| String::from_utf8(kv.key.clone()).unwrap())
        .collect()
}

fn ok(resp: &Response) -> &ResponseBody {
    resp.result.as_ref().expect("command succeeded")
}

#[test]
fn empty_store_starts_at_revision_one() {
    let h = Harness::new();
    assert_eq!(h.store.revision(), 1);
    assert_eq!(h.store.compact_revision(), 0);
    assert_eq!(h.store.status().key_count, 0);
    let r = h.range(rr("a", "")).unwrap();
    assert_eq!(r.count, 0);
    assert_eq!(r.header.revision, 1);
}

#[test]
fn put_sets_create_mod_version_and_bumps_revision() {
    let mut h = Harness::new();
    let r = h.put("a", "1");
    assert_eq!(r.revision, 2);
    let kv = h.get("a").unwrap();
    assert_eq!((kv.create_revision, kv.mod_revision, kv.version), (2, 2, 1));
    h.put("a", "2");
    let kv = h.get("a").unwrap();
    assert_eq!((kv.create_revision, kv.mod_revision, kv.version), (2, 3, 2));
    assert_eq!(kv.value, b"2");
    assert_eq!(h.store.revision(), 3);
}

#[test]
fn put_prev_kv_returns_previous_version() {
    let mut h = Harness::new();
    h.put("a", "1");
    let r = h.apply(Command::Put(PutRequest {
        prev_kv: true,
        ..put_req("a", "2")
    }));
    let ResponseBody::Put(p) = ok(&r) else {
        panic!("wrong body")
    };
    assert_eq!(p.prev_kv.as_ref().unwrap().value, b"1");
    assert_eq!(p.header.revision, 3);
}

#[test]
fn delete_resets_version_and_recreate_gets_new_create_revision() {
    let mut h = Harness::new();
    h.put("a", "1");
    h.put("a", "2");
    let r = h.del("a", "");
    let ResponseBody::DeleteRange(d) = ok(&r) else {
        panic!()
    };
    assert_eq!(d.deleted, 1);
    assert_eq!(d.prev_kvs[0].value, b"2");
    assert_eq!(r.revision, 4);
    assert!(h.get("a").is_none());
    h.put("a", "3");
    let kv = h.get("a").unwrap();
    assert_eq!((kv.create_revision, kv.mod_revision, kv.version), (5, 5, 1));
}

#[test]
fn delete_of_nothing_does_not_bump_revision() {
    let mut h = Harness::new();
    h.put("a", "1");
    let r = h.del("zzz", "");
    assert_eq!(r.revision, 2);
    assert!(r.events.is_empty());
}

#[test]
fn range_conventions_single_prefix_all_and_from() {
    let mut h = Harness::new();
    for k in ["a", "ab", "abc", "b", "c"] {
        h.put(k, k);
    }
    assert_eq!(keys(&h.range(rr("ab", "")).unwrap()), ["ab"]);
    let p = prefix_end(b"ab");
    assert_eq!(p, b"ac");
    let r = h
        .range(RangeRequest {
            key: b"ab".to_vec(),
            range_end: p,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(keys(&r), ["ab", "abc"]);
    assert_eq!(keys(&h.range(rr("b", "\0")).unwrap()), ["b", "c"]);
    assert_eq!(keys(&h.range(rr("\0", "\0")).unwrap()).len(), 5);
    // range_end at or below key is an empty range, not an error.
    assert_eq!(h.range(rr("c", "a")).unwrap().count, 0);
    assert_eq!(prefix_end(&[0xff, 0xff]), vec![0]);
    assert_eq!(prefix_end(&[1, 0xff]), vec![2]);
}

#[test]
fn range_limit_count_more_keys_only_count_only() {
    let mut h = Harness::new();
    for k in ["a", "b", "c", "d"] {
        h.put(k, "v");
    }
    let r = h
        .range(RangeRequest {
            limit: 2,
            ..rr("a", "\0")
        })
        .unwrap();
    assert_eq!(keys(&r), ["a", "b"]);
    assert!(r.more);
    assert_eq!(r.count, 4);
    let r = h
        .range(RangeRequest {
            limit: 4,
            ..rr("a", "\0")
        })
        .unwrap();
    assert!(!r.more);
    let r = h
        .range(RangeRequest {
            keys_only: true,
            ..rr("a", "\0")
        })
        .unwrap();
    assert!(r.kvs.iter().all(|kv| kv.value.is_empty()));
    let r = h
        .range(RangeRequest {
            count_only: true,
            ..rr("a", "\0")
        })
        .unwrap();
    assert!(r.kvs.is_empty());
    assert_eq!(r.count, 4);
}

#[test]
fn range_sorting_by_each_target() {
    let mut h = Harness::new();
    h.put("a", "3"); // rev 2
    h.put("b", "1"); // rev 3
    h.put("c", "2"); // rev 4
    h.put("b", "1"); // rev 5: b version 2, mod 5
    let sorted = |target, order| {
        keys(
            &h.range(RangeRequest {
                sort_target: target,
                sort_order: order,
                ..rr("a", "\0")
            })
            .unwrap(),
        )
    };
    assert_eq!(sorted(SortTarget::Key, SortOrder::Descend), ["c", "b", "a"]);
    assert_eq!(
        sorted(SortTarget::Value, SortOrder::Ascend),
        ["b", "c", "a"]
    );
    assert_eq!(
        sorted(SortTarget::Value, SortOrder::Descend),
        ["a", "c", "b"]
    );
    assert_eq!(sorted(SortTarget::Mod, SortOrder::Descend), ["b", "c", "a"]);
    assert_eq!(
        sorted(SortTarget::Create, SortOrder::Ascend),
        ["a", "b", "c"]
    );
    // Stable: equal versions stay in key order; NONE with a non-key target means ascending.
    assert_eq!(
        sorted(SortTarget::Version, SortOrder::None),
        ["a", "c", "b"]
    );
    assert_eq!(
        sorted(SortTarget::Version, SortOrder::Descend),
        ["b", "a", "c"]
    );
    let r = h
        .range(RangeRequest {
            sort_target: SortTarget::Mod,
            sort_order: SortOrder::Descend,
            limit: 1,
            ..rr("a", "\0")
        })
        .unwrap();
    assert_eq!(keys(&r), ["b"]);
    assert!(r.more);
    assert_eq!(r.count, 3);
}

#[test]
fn range_revision_filters() {
    let mut h = Harness::new();
    h.put("a", "1"); // 2
    h.put("b", "1"); // 3
    h.put("c", "1"); // 4
    h.put("a", "2"); // 5
    let r = h
        .range(RangeRequest {
            min_mod_revision: 4,
            ..rr("a", "\0")
        })
        .unwrap();
    assert_eq!(keys(&r), ["a", "c"]);
    assert_eq!(r.count, 3, "count ignores filters as in etcd");
    let r = h
        .range(RangeRequest {
            max_create_revision: 3,
            ..rr("a", "\0")
        })
        .unwrap();
    assert_eq!(keys(&r), ["a", "b"]);
    let r = h
        .range(RangeRequest {
            min_create_revision: 3,
            max_mod_revision: 3,
            ..rr("a", "\0")
        })
        .unwrap();
    assert_eq!(keys(&r), ["b"]);
}

#[test]
fn range_at_old_revision_and_errors() {
    let mut h = Harness::new();
    h.put("a", "1"); // 2
    h.put("a", "2"); // 3
    h.del("a", ""); // 4
    let at = |h: &Harness, rev| {
        h.range(RangeRequest {
            revision: rev,
            ..rr("a", "")
        })
    };
    assert_eq!(at(&h, 2).unwrap().kvs[0].value, b"1");
    assert_eq!(at(&h, 3).unwrap().kvs[0].value, b"2");
    assert_eq!(at(&h, 4).unwrap().count, 0);
    assert_eq!(at(&h, 1).unwrap().count, 0);
    assert_eq!(
        at(&h, 5),
        Err(KvError::FutureRevision {
            current_revision: 4
        })
    );
    h.apply(Command::Compact { revision: 3 });
    assert_eq!(
        at(&h, 2),
        Err(KvError::Compacted {
            compact_revision: 3
        })
    );
    assert_eq!(at(&h, 3).unwrap().kvs[0].value, b"2");
    assert_eq!(
        KvError::Compacted {
            compact_revision: 3
        }
        .etcd_message(),
        "mvcc: required revision has been compacted"
    );
    assert_eq!(
        KvError::FutureRevision {
            current_revision: 4
        }
        .etcd_message(),
        "mvcc: required revision is a future revision"
    );
}

#[test]
fn empty_key_is_rejected_everywhere() {
    let mut h = Harness::new();
    assert_eq!(h.put("", "x").result, Err(KvError::EmptyKey));
    assert_eq!(h.del("", "").result, Err(KvError::EmptyKey));
    assert_eq!(h.range(rr("", "")), Err(KvError::EmptyKey));
    assert_eq!(
        KvError::EmptyKey.etcd_message(),
        "etcdserver: key is not provided"
    );
    assert_eq!(h.store.revision(), 1);
}

#[test]
fn value_and_key_too_large() {
    let mut h = Harness::new();
    let max = h.store.config().value_bytes_max;
    let r = h.apply(Command::Put(PutRequest {
        key: b"k".to_vec(),
        value: vec![0; max + 1],
        ..Default::default()
    }));
    assert_eq!(r.result, Err(KvError::ValueTooLarge { size: max + 1, max }));
    let kmax = h.store.config().key_bytes_max;
    let r = h.apply(Command::Put(PutRequest {
        key: vec![1; kmax + 1],
        value: vec![],
        ..Default::default()
    }));
    assert!(matches!(r.result, Err(KvError::KeyTooLarge { .. })));
    assert_eq!(h.store.revision(), 1);
}

#[test]
fn ignore_value_and_ignore_lease() {
    let mut h = Harness::new();
    let r = h.apply(Command::Put(PutRequest {
        ignore_value: true,
        ..put_req("a", "")
    }));
    assert_eq!(r.result, Err(KvError::KeyNotFound));
    assert_eq!(
        KvError::KeyNotFound.etcd_message(),
        "etcdserver: key not found"
    );
    let r = h.apply(Command::Put(PutRequest {
        ignore_value: true,
        ..put_req("a", "x")
    }));
    assert_eq!(r.result, Err(KvError::ValueProvided));
    h.grant(7, 10, 0);
    h.put_lease("a", "v1", 7);
    // Keep the value, drop the lease.
    h.apply(Command::Put(PutRequest {
        ignore_value: true,
        ..put_req("a", "")
    }));
    let kv = h.get("a").unwrap();
    assert_eq!(
        (kv.value.as_slice(), kv.lease, kv.version),
        (&b"v1"[..], 0, 2)
    );
    // Keep the lease (none now), change the value.
    h.put_lease("a", "v2", 7);
    h.apply(Command::Put(PutRequest {
        ignore_lease: true,
        ..put_req("a", "v3")
    }));
    let kv = h.get("a").unwrap();
    assert_eq!((kv.value.as_slice(), kv.lease), (&b"v3"[..], 7));
    let r = h.apply(Command::Put(PutRequest {
        ignore_lease: true,
        lease: 7,
        ..put_req("a", "v3")
    }));
    assert_eq!(r.result, Err(KvError::LeaseProvided));
}

fn cmp(k: &str, result: CompareResult, target: CompareTarget) -> Compare {
    Compare {
        key: k.into(),
        range_end: vec![],
        result,
        target,
    }
}

fn txn(compare: Vec<Compare>, success: Vec<RequestOp>, failure: Vec<RequestOp>) -> Command {
    Command::Txn(TxnRequest {
        compare,
        success,
        failure,
    })
}

fn txn_resp(r: &Response) -> &TxnResponse {
    match ok(r) {
        ResponseBody::Txn(t) => t,
        other => panic!("not a txn: {other:?}"),
    }
}

#[test]
fn txn_compare_targets_and_branches() {
    let mut h = Harness::new();
    h.put("a", "1"); // rev 2
    let cases = [
        (
            CompareTarget::Value(b"1".to_vec()),
            CompareResult::Equal,
            true,
        ),
        (
            CompareTarget::Value(b"0".to_vec()),
            CompareResult::Greater,
            true,
        ),
        (
            CompareTarget::Value(b"2".to_vec()),
            CompareResult::Less,
            true,
        ),
        (
            CompareTarget::Value(b"1".to_vec()),
            CompareResult::NotEqual,
            false,
        ),
        (CompareTarget::Version(1), CompareResult::Equal, true),
        (CompareTarget::CreateRevision(2), CompareResult::Equal, true),
        (CompareTarget::ModRevision(3), CompareResult::Less, true),
        (CompareTarget::Lease(0), CompareResult::Equal, true),
        (CompareTarget::Lease(5), CompareResult::NotEqual, true),
    ];
    for (target, result, want) in cases {
        let r = h.apply(txn(vec![cmp("a", result, target.clone())], vec![], vec![]));
        assert_eq!(txn_resp(&r).succeeded, want, "{target:?} {result:?}");
    }
    // Missing key: version compares as 0, value compares always fail.
    let r = h.apply(txn(
        vec![cmp("zz", CompareResult::Equal, CompareTarget::Version(0))],
        vec![],
        vec![],
    ));
    assert!(txn_resp(&r).succeeded);
    let r = h.apply(txn(
        vec![cmp(
            "zz",
            CompareResult::NotEqual,
            CompareTarget::Value(b"x".to_vec()),
        )],
        vec![],
        vec![],
    ));
    assert!(!txn_resp(&r).succeeded);
    // Read-only transactions do not bump the revision.
    assert_eq!(h.store.revision(), 2);
}

#[test]
fn txn_writes_share_one_revision_and_reads_see_them() {
    let mut h = Harness::new();
    h.put("a", "1");
    let r = h.apply(txn(
        vec![cmp(
            "a",
            CompareResult::Equal,
            CompareTarget::Value(b"1".to_vec()),
        )],
        vec![
            RequestOp::Put(put_req("b", "2")),
            RequestOp::Put(put_req("c", "3")),
            RequestOp::DeleteRange(DeleteRangeRequest {
                key: b"a".to_vec(),
                ..Default::default()
            }),
            RequestOp::Range(rr("a", "\0")),
        ],
        vec![RequestOp::Put(put_req("failed", "x"))],
    ));
    let t = txn_resp(&r);
    assert!(t.succeeded);
    assert_eq!(r.revision, 3);
    let ResponseOp::Range(read) = &t.responses[3] else {
        panic!()
    };
    assert_eq!(keys(read), ["b", "c"]);
    assert_eq!(read.header.revision, 3);
    assert_eq!(h.get("b").unwrap().mod_revision, 3);
    assert_eq!(h.get("c").unwrap().mod_revision, 3);
    assert!(h.get("failed").is_none());
    // Events come ordered by key within the revision.
    let ev: Vec<_> = r
        .events
        .iter()
        .map(|e| (e.kind, e.kv.key.clone()))
        .collect();
    assert_eq!(
        ev,
        vec![
            (EventKind::Delete, b"a".to_vec()),
            (EventKind::Put, b"b".to_vec()),
            (EventKind::Put, b"c".to_vec())
        ]
    );
    // Failure branch.
    let r = h.apply(txn(
        vec![cmp("a", CompareResult::Equal, CompareTarget::Version(9))],
        vec![],
        vec![RequestOp::Put(put_req("f", "x"))],
    ));
    assert!(!txn_resp(&r).succeeded);
    assert_eq!(h.get("f").unwrap().mod_revision, 4);
}

#[test]
fn txn_compare_over_range_needs_every_key() {
    let mut h = Harness::new();
    h.put("k1", "a");
    h.put("k2", "b");
    let c = |v: i64| Compare {
        key: b"k".to_vec(),
        range_end: prefix_end(b"k"),
        result: CompareResult::Greater,
        target: CompareTarget::ModRevision(v),
    };
    assert!(txn_resp(&h.apply(txn(vec![c(1)], vec![], vec![]))).succeeded);
    assert!(!txn_resp(&h.apply(txn(vec![c(2)], vec![], vec![]))).succeeded);
}

#[test]
fn txn_nested_uses_pre_txn_state_for_compares() {
    let mut h = Harness::new();
    h.put("a", "1");
    let inner = TxnRequest {
        compare: vec![cmp("b", CompareResult::Equal, CompareTarget::Version(0))],
        success: vec![RequestOp::Put(put_req("inner", "yes"))],
        failure: vec![RequestOp::Put(put_req("inner", "no"))],
    };
    let r = h.apply(txn(
        vec![],
        vec![RequestOp::Put(put_req("b", "new")), RequestOp::Txn(inner)],
        vec![],
    ));
    let t = txn_resp(&r);
    let ResponseOp::Txn(it) = &t.responses[1] else {
        panic!()
    };
    // b did not exist before the transaction, so the nested compare holds.
    assert!(it.succeeded);
    assert_eq!(h.get("inner").unwrap().value, b"yes");
    assert_eq!(h.store.revision(), 3);
}

#[test]
fn txn_duplicate_keys_and_too_many_ops() {
    let mut h = Harness::new();
    let r = h.apply(txn(
        vec![],
        vec![
            RequestOp::Put(put_req("a", "1")),
            RequestOp::Put(put_req("a", "2")),
        ],
        vec![],
    ));
    assert_eq!(r.result, Err(KvError::DuplicateKey));
    assert_eq!(
        KvError::DuplicateKey.etcd_message(),
        "etcdserver: duplicate key given in txn request"
    );
    let r = h.apply(txn(
        vec![],
        vec![
            RequestOp::DeleteRange(DeleteRangeRequest {
                key: b"a".to_vec(),
                range_end: b"c".to_vec(),
                prev_kv: false,
            }),
            RequestOp::Put(put_req("b", "2")),
        ],
        vec![],
    ));
    assert_eq!(r.result, Err(KvError::DuplicateKey));
    // The same key in success and failure is fine: only one branch runs.
    let r = h.apply(txn(
        vec![],
        vec![RequestOp::Put(put_req("a", "1"))],
        vec![RequestOp::Put(put_req("a", "2"))],
    ));
    assert!(r.result.is_ok());
    let nested = TxnRequest {
        compare: vec![],
        success: vec![RequestOp::Put(put_req("x", "1"))],
        failure: vec![],
    };
    let r = h.apply(txn(
        vec![],
        vec![RequestOp::Put(put_req("x", "2")), RequestOp::Txn(nested)],
        vec![],
    ));
    assert_eq!(r.result, Err(KvError::DuplicateKey));
    let max = h.store.config().txn_ops_max;
    let ops = (0..=max)
        .map(|i| RequestOp::Put(put_req(&format!("k{i}"), "v")))
        .collect();
    let r = h.apply(txn(vec![], ops, vec![]));
    assert_eq!(r.result, Err(KvError::TooManyOps { max }));
    let rev = h.store.revision();
    assert_eq!(rev, 2, "failed txns change nothing");
}

#[test]
fn txn_fails_whole_when_an_op_on_the_path_fails() {
    let mut h = Harness::new();
    let r = h.apply(txn(
        vec![],
        vec![
            RequestOp::Put(put_req("a", "1")),
            RequestOp::Put(PutRequest {
                lease: 99,
                ..put_req("b", "1")
            }),
        ],
        vec![],
    ));
    assert_eq!(r.result, Err(KvError::LeaseNotFound { id: 99 }));
    assert!(h.get("a").is_none());
    let r = h.apply(txn(
        vec![],
        vec![RequestOp::Range(RangeRequest {
            revision: 50,
            ..rr("a", "")
        })],
        vec![],
    ));
    assert!(matches!(r.result, Err(KvError::FutureRevision { .. })));
}

#[test]
fn txn_nesting_depth_is_bounded() {
    let mut t = TxnRequest::default();
    for _ in 0..TXN_DEPTH_MAX {
        t = TxnRequest {
            compare: vec![],
            success: vec![RequestOp::Txn(t)],
            failure: vec![],
        };
    }
    let mut h = Harness::new();
    h.index += 1;
    let r = h.store.apply(h.index, Command::Txn(t.clone()));
    assert_eq!(r.result, Err(KvError::TxnTooDeep { max: TXN_DEPTH_MAX }));
    assert!(matches!(
        Command::decode(&Command::Txn(t).encode()),
        Err(KvError::Decode(_))
    ));
}

#[test]
fn compact_keeps_latest_and_errors() {
    let mut h = Harness::new();
    h.put("a", "1"); // 2
    h.put("a", "2"); // 3
    h.put("b", "1"); // 4
    h.del("b", ""); // 5
    h.put("c", "1"); // 6
    let before = h.store.status().version_count;
    let r = h.apply(Command::Compact { revision: 6 });
    assert!(r.result.is_ok());
    assert_eq!(r.revision, 6, "compaction does not bump the revision");
    let st = h.store.status();
    assert_eq!(st.compact_revision, 6);
    assert_eq!(st.version_count, 2, "from {before}: a@3 and c@6 remain");
    assert_eq!(h.get("a").unwrap().value, b"2");
    assert_eq!(h.get("a").unwrap().create_revision, 2);
    assert_eq!(
        h.apply(Command::Compact { revision: 6 }).result,
        Err(KvError::Compacted {
            compact_revision: 6
        })
    );
    assert_eq!(
        h.apply(Command::Compact { revision: 60 }).result,
        Err(KvError::FutureRevision {
            current_revision: 6
        })
    );
}

#[test]
fn compact_keeps_a_tombstone_exactly_at_the_compact_revision() {
    let mut h = Harness::new();
    h.put("a", "1"); // 2
    h.del("a", ""); // 3
    h.apply(Command::Compact { revision: 3 });
    let ev = h.store.events_since(b"a", b"", 3, 10).unwrap();
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].kind, EventKind::Delete);
    h.put("b", "1"); // 4
    h.apply(Command::Compact { revision: 4 });
    assert_eq!(h.store.status().version_count, 1);
}

#[test]
fn lease_grant_attach_revoke_deletes_keys_in_one_revision() {
    let mut h = Harness::new();
    let r = h.grant(0, 10, 1_000);
    let ResponseBody::LeaseGrant(g) = ok(&r).clone() else {
        panic!()
    };
    assert!(g.id > 0);
    assert_eq!(g.ttl_secs, 10);
    assert_eq!(r.revision, 1, "grant does not bump the revision");
    h.put_lease("a", "1", g.id);
    h.put_lease("b", "1", g.id);
    h.put("c", "1");
    let ttl = h.store.lease_time_to_live(g.id, 4_500, true).unwrap();
    assert_eq!(ttl.ttl_secs, 7, "6.5s left, rounded up");
    assert_eq!(ttl.granted_ttl_secs, 10);
    assert_eq!(ttl.keys, vec![b"a".to_vec(), b"b".to_vec()]);
    assert_eq!(h.store.lease_list(), vec![g.id]);
    let r = h.apply(Command::LeaseRevoke { id: g.id });
    assert_eq!(r.revision, 5);
    assert_eq!(r.events.len(), 2);
    assert!(r
        .events
        .iter()
        .all(|e| e.kind == EventKind::Delete && e.revision() == 5));
    assert!(h.get("a").is_none() && h.get("b").is_none() && h.get("c").is_some());
    assert_eq!(
        h.apply(Command::LeaseRevoke { id: g.id }).result,
        Err(KvError::LeaseNotFound { id: g.id })
    );
    assert_eq!(
        KvError::LeaseNotFound { id: 1 }.etcd_message(),
        "etcdserver: requested lease not found"
    );
    assert!(h.store.lease_list().is_empty());
}

#[test]
fn lease_errors() {
    let mut h = Harness::new();
    assert_eq!(
        h.put_lease("a", "1", 5).result,
        Err(KvError::LeaseNotFound { id: 5 })
    );
    h.grant(5, 10, 0);
    assert_eq!(
        h.grant(5, 10, 0).result,
        Err(KvError::LeaseExists { id: 5 })
    );
    let max = h.store.config().lease_ttl_max_secs;
    assert!(matches!(
        h.grant(6, max + 1, 0).result,
        Err(KvError::LeaseTtlTooLarge { .. })
    ));
    // TTL below the minimum is raised to it.
    let r = h.grant(8, 0, 0);
    let ResponseBody::LeaseGrant(g) = ok(&r) else {
        panic!()
    };
    assert_eq!(g.ttl_secs, h.store.config().lease_ttl_min_secs);
    assert_eq!(
        h.store.lease_time_to_live(77, 0, false),
        Err(KvError::LeaseNotFound { id: 77 })
    );
    assert_eq!(
        h.apply(Command::LeaseKeepAlive { id: 77, now_ms: 0 })
            .result,
        Err(KvError::LeaseNotFound { id: 77 })
    );
}

#[test]
fn lease_moving_a_key_between_leases() {
    let mut h = Harness::new();
    h.grant(1, 10, 0);
    h.grant(2, 10, 0);
    h.put_lease("a", "1", 1);
    h.put_lease("a", "2", 2);
    assert!(h
        .store
        .lease_time_to_live(1, 0, true)
        .unwrap()
        .keys
        .is_empty());
    h.apply(Command::LeaseRevoke { id: 1 });
    assert!(h.get("a").is_some());
    h.put("a", "3"); // detach
    h.apply(Command::LeaseRevoke { id: 2 });
    assert!(h.get("a").is_some());
}

#[test]
fn lease_keepalive_and_expiry_by_leader_time() {
    let mut h = Harness::new();
    h.grant(1, 5, 0); // deadline 5_000
    h.grant(2, 10, 0); // deadline 10_000
    h.put_lease("a", "1", 1);
    h.put_lease("b", "1", 2);
    assert_eq!(h.store.expired_leases(4_999), Vec::<LeaseId>::new());
    assert_eq!(h.store.expired_leases(5_000), vec![1]);
    assert_eq!(h.store.next_lease_deadline_ms(), Some(5_000));
    let r = h.apply(Command::LeaseKeepAlive {
        id: 1,
        now_ms: 4_000,
    });
    assert!(r.result.is_ok());
    assert_eq!(h.store.expired_leases(8_999), Vec::<LeaseId>::new());
    // Keep-alive on an expired lease is refused (its revocation is due).
    assert_eq!(
        h.apply(Command::LeaseKeepAlive {
            id: 1,
            now_ms: 9_000
        })
        .result,
        Err(KvError::LeaseNotFound { id: 1 })
    );
    // An expire proposed with a stale view skips leases renewed in the meantime.
    let r = h.apply(Command::LeaseExpireIds {
        ids: vec![1, 2, 42],
        now_ms: 9_500,
    });
    let ResponseBody::LeaseExpire(e) = ok(&r) else {
        panic!()
    };
    assert_eq!(e.expired, vec![1]);
    assert!(h.get("a").is_none() && h.get("b").is_some());
    let r = h.apply(Command::LeaseExpire { now_ms: 20_000 });
    let ResponseBody::LeaseExpire(e) = ok(&r) else {
        panic!()
    };
    assert_eq!(e.expired, vec![2]);
    assert!(h.get("b").is_none());
}

#[test]
fn lease_promote_restarts_every_ttl() {
    let mut h = Harness::new();
    h.grant(1, 5, 0);
    h.apply(Command::LeasePromote { now_ms: 100_000 });
    assert_eq!(
        h.store
            .lease_time_to_live(1, 100_000, false)
            .unwrap()
            .ttl_secs,
        5
    );
    assert!(h.store.expired_leases(104_999).is_empty());
}

#[test]
fn lease_ids_chosen_deterministically_from_index() {
    let mut a = Harness::new();
    let mut b = Harness::new();
    let ga = a.grant(0, 10, 0);
    let gb = b.grant(0, 10, 0);
    assert_eq!(ga, gb);
}

#[test]
fn apply_is_idempotent_by_index() {
    let mut h = Harness::new();
    h.put("a", "1");
    let r = h.store.apply(1, Command::Put(put_req("a", "2")));
    assert_eq!(
        r.result,
        Err(KvError::AlreadyApplied {
            index: 1,
            applied_index: 1
        })
    );
    assert_eq!(h.get("a").unwrap().value, b"1");
    assert!(h.store.advance_applied(5));
    assert!(!h.store.advance_applied(5));
    assert_eq!(h.store.applied_index(), 5);
}

#[test]
fn failed_commands_still_advance_applied_index() {
    let mut h = Harness::new();
    let r = h.put("", "x");
    assert!(r.result.is_err());
    assert_eq!(h.store.applied_index(), 1);
}

#[test]
fn decode_rejects_garbage_with_clear_errors() {
    assert!(matches!(Command::decode(&[]), Err(KvError::Decode(_))));
    assert!(matches!(Command::decode(&[9, 0]), Err(KvError::Decode(_))));
    let mut enc = Command::Compact { revision: 3 }.encode();
    enc.push(0);
    let err = Command::decode(&enc).unwrap_err();
    assert!(err.to_string().contains("trailing"), "{err}");
    let enc = Command::Put(put_req("abc", "def")).encode();
    assert!(Command::decode(&enc[..enc.len() - 1]).is_err());
}

#[test]
fn status_counts_and_size_estimate() {
    let mut h = Harness::new();
    h.put("a", "xxxx");
    h.put("a", "yyyy");
    h.put("b", "z");
    let st = h.store.status();
    assert_eq!(st.key_count, 2);
    assert_eq!(st.version_count, 3);
    assert_eq!(st.revision, 4);
    assert_eq!(
        st.db_size_bytes,
        (2 + 9) + 2 * KEY_OVERHEAD_BYTES + 3 * VERSION_OVERHEAD_BYTES
    );
}

#[test]
fn events_since_replays_history_with_prev_kv() {
    let mut h = Harness::new();
    h.put("a", "1"); // 2
    h.put("b", "1"); // 3
    h.put("a", "2"); // 4
    h.del("a", ""); // 5
    let ev = h.store.events_since(b"a", b"", 0, 100).unwrap();
    let got: Vec<_> = ev.iter().map(|e| (e.kind, e.revision())).collect();
    assert_eq!(
        got,
        vec![
            (EventKind::Put, 2),
            (EventKind::Put, 4),
            (EventKind::Delete, 5)
        ]
    );
    assert_eq!(ev[1].prev_kv.as_ref().unwrap().value, b"1");
    assert_eq!(ev[2].prev_kv.as_ref().unwrap().value, b"2");
    let ev = h.store.events_since(b"a", b"\0", 3, 2).unwrap();
    let got: Vec<_> = ev.iter().map(|e| e.revision()).collect();
    assert_eq!(got, vec![3, 4]);
}

#[test]
fn hash_kv_tracks_history_up_to_a_revision() {
    let mut a = Harness::new();
    let mut b = Harness::new();
    a.put("a", "1");
    b.put("a", "1");
    assert_eq!(a.store.hash_kv(0), b.store.hash_kv(0));
    a.put("a", "2");
    b.put("a", "3");
    assert_ne!(
        a.store.hash_kv(0).unwrap().hash,
        b.store.hash_kv(0).unwrap().hash
    );
    // Up to revision 2 they still agree.
    assert_eq!(a.store.hash_kv(2), b.store.hash_kv(2));
    assert_eq!(a.store.hash_kv(2).unwrap().revision, 2);
    assert!(matches!(
        a.store.hash_kv(9),
        Err(KvError::FutureRevision { .. })
    ));
}

#[test]
fn apply_entry_decodes_and_counts_undecodable_entries_as_applied() {
    let mut store = KvStore::new();
    let r = store.apply_entry(1, &Command::Put(put_req("a", "1")).encode());
    assert!(r.result.is_ok());
    assert_eq!(store.get(b"a").unwrap().value, b"1");
    let r = store.apply_entry(2, &[1, 200, 200]);
    assert!(matches!(r.result, Err(KvError::Decode(_))));
    assert_eq!(store.applied_index(), 2);
    assert_eq!(store.revision(), 2);
    let r = store.apply_entry(2, &[1, 200, 200]);
    assert!(matches!(r.result, Err(KvError::AlreadyApplied { .. })));
}
