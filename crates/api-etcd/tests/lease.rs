//! Lease service over loopback, with the LocalBackend's manual clock standing in for the
//! leader's.

mod common;

use common::{start, WAIT};
use concord_api_etcd::proto::etcdserverpb as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

async fn grant(h: &common::Harness, ttl: i64) -> i64 {
    let r = h
        .lease()
        .lease_grant(pb::LeaseGrantRequest { ttl, id: 0 })
        .await
        .expect("grant")
        .into_inner();
    assert_eq!(r.ttl, ttl);
    assert!(r.id > 0, "server chooses a positive id");
    r.id
}

#[tokio::test]
async fn grant_attach_time_to_live_and_list() {
    let h = start().await;
    let id = grant(&h, 10).await;
    h.kv()
        .put(pb::PutRequest {
            key: "leased".into(),
            value: "v".into(),
            lease: id,
            ..Default::default()
        })
        .await
        .expect("put with lease");
    assert_eq!(h.get("leased").await.kvs[0].lease, id);
    h.backend.advance_clock_ms(3_000);
    let ttl = h
        .lease()
        .lease_time_to_live(pb::LeaseTimeToLiveRequest { id, keys: true })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((ttl.id, ttl.ttl, ttl.granted_ttl), (id, 7, 10));
    assert_eq!(ttl.keys, [b"leased".to_vec()]);
    let list = h
        .lease()
        .lease_leases(pb::LeaseLeasesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.leases, [pb::LeaseStatus { id }]);
}

#[tokio::test]
async fn keep_alive_stream_renews_and_reports_expiry() {
    let h = start().await;
    let id = grant(&h, 5).await;
    h.kv()
        .put(pb::PutRequest {
            key: "ka".into(),
            value: "v".into(),
            lease: id,
            ..Default::default()
        })
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(4);
    let mut replies = h
        .lease()
        .lease_keep_alive(ReceiverStream::new(rx))
        .await
        .expect("open keep-alive stream")
        .into_inner();
    h.backend.advance_clock_ms(4_000);
    tx.send(pb::LeaseKeepAliveRequest { id }).await.unwrap();
    let r = tokio::time::timeout(WAIT, replies.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!((r.id, r.ttl), (id, 5), "renewed to the full TTL");
    // 4 s later the lease would have expired without the renewal.
    h.backend.advance_clock_ms(4_000);
    assert!(h.backend.expire_leases().is_empty());
    assert_eq!(h.get("ka").await.count, 1);
    // Past the renewed deadline it expires and takes its key along.
    h.backend.advance_clock_ms(2_000);
    assert_eq!(h.backend.expire_leases(), [id]);
    assert_eq!(h.get("ka").await.count, 0);
    tx.send(pb::LeaseKeepAliveRequest { id }).await.unwrap();
    let r = tokio::time::timeout(WAIT, replies.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(r.ttl, 0, "an expired lease answers TTL 0");
    let ttl = h
        .lease()
        .lease_time_to_live(pb::LeaseTimeToLiveRequest { id, keys: false })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ttl.ttl, -1, "an unknown lease reports TTL -1");
}

#[tokio::test]
async fn revoke_deletes_keys_and_unknown_lease_is_not_found() {
    let h = start().await;
    let id = grant(&h, 60).await;
    h.kv()
        .put(pb::PutRequest {
            key: "r".into(),
            value: "v".into(),
            lease: id,
            ..Default::default()
        })
        .await
        .unwrap();
    h.lease()
        .lease_revoke(pb::LeaseRevokeRequest { id })
        .await
        .expect("revoke");
    assert_eq!(h.get("r").await.count, 0);
    let err = h
        .lease()
        .lease_revoke(pb::LeaseRevokeRequest { id })
        .await
        .expect_err("already gone");
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(err.message(), "etcdserver: requested lease not found");
    let err = h
        .kv()
        .put(pb::PutRequest {
            key: "r".into(),
            value: "v".into(),
            lease: id,
            ..Default::default()
        })
        .await
        .expect_err("put with a missing lease");
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(err.message(), "etcdserver: requested lease not found");
}

#[tokio::test]
async fn grant_with_chosen_id_and_duplicate() {
    let h = start().await;
    let r = h
        .lease()
        .lease_grant(pb::LeaseGrantRequest { ttl: 30, id: 777 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.id, 777);
    let err = h
        .lease()
        .lease_grant(pb::LeaseGrantRequest { ttl: 30, id: 777 })
        .await
        .expect_err("duplicate");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(err.message(), "etcdserver: lease already exists");
}
