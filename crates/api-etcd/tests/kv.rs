//! KV service over loopback: Range, Put, DeleteRange, Txn, Compact.

mod common;

use common::{prefix_end, start};
use concord_api_etcd::proto::etcdserverpb as pb;
use pb::compare::{CompareResult, CompareTarget, TargetUnion};
use pb::range_request::{SortOrder, SortTarget};
use pb::request_op::Request as Op;
use pb::response_op::Response as OpResp;
use tonic::Code;

fn keys(r: &pb::RangeResponse) -> Vec<String> {
    r.kvs
        .iter()
        .map(|kv| String::from_utf8(kv.key.clone()).unwrap())
        .collect()
}

#[tokio::test]
async fn put_then_get_with_header_and_versions() {
    let h = start().await;
    let p1 = h.put("a", "1").await;
    let header = p1.header.expect("header");
    assert_eq!(
        header.revision, 2,
        "first write of an empty store is revision 2"
    );
    assert_eq!(header.cluster_id, concord_api_etcd::local::LOCAL_CLUSTER_ID);
    assert_eq!(header.member_id, concord_api_etcd::local::LOCAL_MEMBER_ID);
    assert_eq!(header.raft_term, 1);
    h.put("a", "2").await;
    let got = h.get("a").await;
    assert_eq!(got.count, 1);
    let kv = &got.kvs[0];
    assert_eq!(kv.value, b"2");
    assert_eq!((kv.create_revision, kv.mod_revision, kv.version), (2, 3, 2));
    assert_eq!(got.header.unwrap().revision, 3);
}

#[tokio::test]
async fn range_prefix_limit_revision_keys_only_count_only_sort() {
    let h = start().await;
    for (k, v) in [("p/a", "3"), ("p/b", "1"), ("p/c", "2"), ("q", "x")] {
        h.put(k, v).await;
    }
    let mut kv = h.kv();
    let all = kv
        .range(pb::RangeRequest {
            key: "p/".into(),
            range_end: prefix_end("p/"),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(keys(&all), ["p/a", "p/b", "p/c"]);
    assert_eq!(all.count, 3);
    assert!(!all.more);

    let limited = kv
        .range(pb::RangeRequest {
            key: "p/".into(),
            range_end: prefix_end("p/"),
            limit: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(keys(&limited), ["p/a", "p/b"]);
    assert!(limited.more);
    assert_eq!(limited.count, 3);

    // Revision 3 is after the second put: only p/a and p/b existed.
    let old = kv
        .range(pb::RangeRequest {
            key: "p/".into(),
            range_end: prefix_end("p/"),
            revision: 3,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(keys(&old), ["p/a", "p/b"]);

    let keys_only = kv
        .range(pb::RangeRequest {
            key: "p/".into(),
            range_end: prefix_end("p/"),
            keys_only: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(keys_only.kvs.iter().all(|kv| kv.value.is_empty()));
    assert_eq!(keys_only.kvs.len(), 3);

    let count_only = kv
        .range(pb::RangeRequest {
            key: vec![0],
            range_end: vec![0],
            count_only: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(count_only.kvs.is_empty());
    assert_eq!(count_only.count, 4);

    let by_value_desc = kv
        .range(pb::RangeRequest {
            key: "p/".into(),
            range_end: prefix_end("p/"),
            sort_order: SortOrder::Descend as i32,
            sort_target: SortTarget::Value as i32,
            serializable: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(keys(&by_value_desc), ["p/a", "p/c", "p/b"]);
}

#[tokio::test]
async fn put_and_delete_return_prev_kv() {
    let h = start().await;
    h.put("k", "old").await;
    let mut kv = h.kv();
    let put = kv
        .put(pb::PutRequest {
            key: "k".into(),
            value: "new".into(),
            prev_kv: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(put.prev_kv.expect("prev kv").value, b"old");
    h.put("k2", "v").await;
    let del = kv
        .delete_range(pb::DeleteRangeRequest {
            key: "k".into(),
            range_end: prefix_end("k"),
            prev_kv: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(del.deleted, 2);
    let prev: Vec<_> = del.prev_kvs.iter().map(|kv| kv.value.clone()).collect();
    assert_eq!(prev, [b"new".to_vec(), b"v".to_vec()]);
    assert_eq!(h.get("k").await.count, 0);
}

#[tokio::test]
async fn errors_carry_etcd_codes_and_messages() {
    let h = start().await;
    let mut kv = h.kv();
    let empty = kv
        .put(pb::PutRequest::default())
        .await
        .expect_err("empty key");
    assert_eq!(empty.code(), Code::InvalidArgument);
    assert_eq!(empty.message(), "etcdserver: key is not provided");

    let huge = kv
        .put(pb::PutRequest {
            key: "big".into(),
            value: vec![b'x'; 1024 * 1024 + 600 * 1024],
            ..Default::default()
        })
        .await
        .expect_err("too large");
    assert_eq!(huge.code(), Code::InvalidArgument);
    assert_eq!(huge.message(), "etcdserver: request is too large");

    h.put("a", "1").await;
    h.put("a", "2").await;
    h.put("a", "3").await;
    kv.compact(pb::CompactionRequest {
        revision: 3,
        physical: true,
    })
    .await
    .expect("compact");
    let compacted = kv
        .range(pb::RangeRequest {
            key: "a".into(),
            revision: 2,
            ..Default::default()
        })
        .await
        .expect_err("compacted");
    assert_eq!(compacted.code(), Code::OutOfRange);
    assert_eq!(
        compacted.message(),
        "mvcc: required revision has been compacted"
    );
    let at_compaction = kv
        .range(pb::RangeRequest {
            key: "a".into(),
            revision: 3,
            ..Default::default()
        })
        .await
        .expect("revision at the compaction point stays readable")
        .into_inner();
    assert_eq!(at_compaction.kvs[0].value, b"2");
    let future = kv
        .range(pb::RangeRequest {
            key: "a".into(),
            revision: 100,
            ..Default::default()
        })
        .await
        .expect_err("future");
    assert_eq!(future.code(), Code::OutOfRange);
    assert_eq!(
        future.message(),
        "mvcc: required revision is a future revision"
    );
    let bad_sort = kv
        .range(pb::RangeRequest {
            key: "a".into(),
            sort_order: 9,
            ..Default::default()
        })
        .await
        .expect_err("bad enum");
    assert_eq!(bad_sort.code(), Code::InvalidArgument);
}

fn cmp(key: &str, target: CompareTarget, result: CompareResult, v: TargetUnion) -> pb::Compare {
    pb::Compare {
        result: result as i32,
        target: target as i32,
        key: key.into(),
        target_union: Some(v),
        range_end: Vec::new(),
    }
}

fn put_op(key: &str, value: &str) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(Op::RequestPut(pb::PutRequest {
            key: key.into(),
            value: value.into(),
            ..Default::default()
        })),
    }
}

fn get_op(key: &str) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(Op::RequestRange(pb::RangeRequest {
            key: key.into(),
            ..Default::default()
        })),
    }
}

#[tokio::test]
async fn txn_compare_and_swap_both_ways() {
    let h = start().await;
    h.put("cas", "v1").await; // revision 2
    let mut kv = h.kv();
    let swap = |expect: &str, new: &str| pb::TxnRequest {
        compare: vec![cmp(
            "cas",
            CompareTarget::Value,
            CompareResult::Equal,
            TargetUnion::Value(expect.into()),
        )],
        success: vec![put_op("cas", new)],
        failure: vec![get_op("cas")],
    };
    let ok = kv.txn(swap("v1", "v2")).await.unwrap().into_inner();
    assert!(ok.succeeded);
    assert!(matches!(
        ok.responses[0].response,
        Some(OpResp::ResponsePut(_))
    ));
    let lost = kv.txn(swap("v1", "v3")).await.unwrap().into_inner();
    assert!(!lost.succeeded);
    match &lost.responses[0].response {
        Some(OpResp::ResponseRange(r)) => assert_eq!(r.kvs[0].value, b"v2"),
        other => panic!("expected the failure branch's range, got {other:?}"),
    }
    assert_eq!(h.get("cas").await.kvs[0].value, b"v2");

    // Version, create, mod revision and lease compares.
    let checks = vec![
        cmp(
            "cas",
            CompareTarget::Version,
            CompareResult::Equal,
            TargetUnion::Version(2),
        ),
        cmp(
            "cas",
            CompareTarget::Create,
            CompareResult::Equal,
            TargetUnion::CreateRevision(2),
        ),
        cmp(
            "cas",
            CompareTarget::Mod,
            CompareResult::Greater,
            TargetUnion::ModRevision(2),
        ),
        cmp(
            "cas",
            CompareTarget::Lease,
            CompareResult::Equal,
            TargetUnion::Lease(0),
        ),
        cmp(
            "missing",
            CompareTarget::Version,
            CompareResult::Equal,
            TargetUnion::Version(0),
        ),
    ];
    let all = kv
        .txn(pb::TxnRequest {
            compare: checks,
            success: vec![put_op("all", "true")],
            failure: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(all.succeeded, "every compare holds");
    let one_fails = kv
        .txn(pb::TxnRequest {
            compare: vec![cmp(
                "cas",
                CompareTarget::Mod,
                CompareResult::Less,
                TargetUnion::ModRevision(3),
            )],
            success: vec![put_op("never", "x")],
            failure: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!one_fails.succeeded);
    assert_eq!(h.get("never").await.count, 0);
}

#[tokio::test]
async fn txn_limits_are_enforced() {
    let h = start().await;
    let mut kv = h.kv();
    let too_many = pb::TxnRequest {
        compare: vec![],
        success: (0..129).map(|i| put_op(&format!("k{i}"), "v")).collect(),
        failure: vec![],
    };
    let err = kv.txn(too_many).await.expect_err("129 ops");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        err.message(),
        "etcdserver: too many operations in txn request"
    );
    let max = pb::TxnRequest {
        compare: vec![],
        success: (0..128).map(|i| put_op(&format!("k{i}"), "v")).collect(),
        failure: vec![],
    };
    assert!(kv.txn(max).await.expect("128 ops").into_inner().succeeded);
    let dup = pb::TxnRequest {
        compare: vec![],
        success: vec![put_op("d", "1"), put_op("d", "2")],
        failure: vec![],
    };
    let err = kv.txn(dup).await.expect_err("duplicate key");
    assert_eq!(
        err.message(),
        "etcdserver: duplicate key given in txn request"
    );
}

#[tokio::test]
async fn backend_failures_map_to_unavailable() {
    use concord_api_etcd::BackendError;
    let h = start().await;
    for (err, msg) in [
        (BackendError::NoLeader, "etcdserver: no leader"),
        (BackendError::LeaderChanged, "etcdserver: leader changed"),
        (BackendError::Timeout, "etcdserver: request timed out"),
    ] {
        h.backend.set_failure(Some(err));
        let st = h
            .kv()
            .put(pb::PutRequest {
                key: "a".into(),
                value: "b".into(),
                ..Default::default()
            })
            .await
            .expect_err("backend down");
        assert_eq!(st.code(), Code::Unavailable);
        assert_eq!(st.message(), msg);
        // Linearizable reads need the barrier and fail too; serializable ones do not.
        let lin = h
            .kv()
            .range(pb::RangeRequest {
                key: "a".into(),
                ..Default::default()
            })
            .await
            .expect_err("barrier fails");
        assert_eq!(lin.code(), Code::Unavailable);
        h.kv()
            .range(pb::RangeRequest {
                key: "a".into(),
                serializable: true,
                ..Default::default()
            })
            .await
            .expect("serializable read skips the barrier");
    }
    h.backend.set_failure(None);
    h.put("a", "b").await;
}
