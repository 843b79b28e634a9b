//! Cluster and Maintenance services over loopback.

mod common;

use common::start;
use concord_api_etcd::local::LOCAL_MEMBER_ID;
use concord_api_etcd::proto::etcdserverpb as pb;
use tonic::Code;

#[tokio::test]
async fn member_list_and_unsupported_changes() {
    let h = start().await;
    let list = h
        .cluster()
        .member_list(pb::MemberListRequest { linearizable: true })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.members.len(), 1);
    let m = &list.members[0];
    assert_eq!(m.id, LOCAL_MEMBER_ID);
    assert_eq!(m.name, "local");
    assert!(!m.is_learner);
    assert_eq!(list.header.unwrap().member_id, LOCAL_MEMBER_ID);

    let add = h
        .cluster()
        .member_add(pb::MemberAddRequest {
            peer_ur_ls: vec!["http://127.0.0.1:1".into()],
            is_learner: true,
        })
        .await
        .expect_err("local backend has no membership changes");
    assert_eq!(add.code(), Code::Unimplemented);
    let promote = h
        .cluster()
        .member_promote(pb::MemberPromoteRequest {
            id: LOCAL_MEMBER_ID,
        })
        .await
        .expect_err("a voter is not a learner");
    assert_eq!(promote.code(), Code::FailedPrecondition);
    assert_eq!(
        promote.message(),
        "etcdserver: can only promote a learner member"
    );
    let remove = h
        .cluster()
        .member_remove(pb::MemberRemoveRequest { id: 12345 })
        .await
        .expect_err("unknown member");
    assert_eq!(remove.code(), Code::NotFound);
    assert_eq!(remove.message(), "etcdserver: member not found");
}

#[tokio::test]
async fn status_alarm_hash_defragment() {
    let h = start().await;
    h.put("a", "1").await;
    let st = h
        .maintenance()
        .status(pb::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.version, "3.5.0");
    assert_eq!(st.leader, LOCAL_MEMBER_ID);
    assert_eq!(st.raft_applied_index, 1);
    assert!(st.db_size > 0);
    assert_eq!(st.header.unwrap().revision, 2);

    let alarms = h
        .maintenance()
        .alarm(pb::AlarmRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(alarms.alarms.is_empty());

    let h1 = h
        .maintenance()
        .hash_kv(pb::HashKvRequest { revision: 0 })
        .await
        .unwrap()
        .into_inner();
    let h2 = h
        .maintenance()
        .hash_kv(pb::HashKvRequest { revision: 2 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(h1.hash, h2.hash, "same revision, same hash");
    assert_eq!(h1.hash_revision, 2);
    h.put("a", "2").await;
    let h3 = h
        .maintenance()
        .hash_kv(pb::HashKvRequest { revision: 0 })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(h1.hash, h3.hash, "a write changes the hash");

    h.maintenance()
        .defragment(pb::DefragmentRequest {})
        .await
        .expect("defragment is a no-op");
    let snap = h
        .maintenance()
        .snapshot(pb::SnapshotRequest {})
        .await
        .expect_err("snapshot download is not offered");
    assert_eq!(snap.code(), Code::Unimplemented);
}
