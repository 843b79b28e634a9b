//! Lease service over loopback, with the LocalBackend's manual clock standing in for the
//! leader's.

mod common;

use common::{start, Harness, WAIT};
use concord_api_etcd::proto::etcdserverpb as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status, Streaming};

/// LeaseGrant as sent, answered or refused.
async fn try_grant(h: &Harness, ttl: i64, id: i64) -> Result<pb::LeaseGrantResponse, Status> {
    h.lease()
        .lease_grant(pb::LeaseGrantRequest { ttl, id })
        .await
        .map(|r| r.into_inner())
}

/// Grants a lease with a server-chosen id and checks the answer.
async fn grant(h: &Harness, ttl: i64) -> i64 {
    let r = try_grant(h, ttl, 0).await.expect("grant");
    assert_eq!(r.ttl, ttl);
    assert!(r.id > 0, "server chooses a positive id");
    r.id
}

/// Puts `key` = "v" attached to `lease`.
async fn put_leased(h: &Harness, key: &str, lease: i64) -> Result<pb::PutResponse, Status> {
    h.kv()
        .put(pb::PutRequest {
            key: key.into(),
            value: "v".into(),
            lease,
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

async fn time_to_live(h: &Harness, id: i64, keys: bool) -> pb::LeaseTimeToLiveResponse {
    h.lease()
        .lease_time_to_live(pb::LeaseTimeToLiveRequest { id, keys })
        .await
        .expect("time to live")
        .into_inner()
}

async fn revoke(h: &Harness, id: i64) -> Result<pb::LeaseRevokeResponse, Status> {
    h.lease()
        .lease_revoke(pb::LeaseRevokeRequest { id })
        .await
        .map(|r| r.into_inner())
}

/// Sends one keep-alive for `id` and waits (at most [`WAIT`]) for its answer.
async fn keep_alive_once(
    tx: &mpsc::Sender<pb::LeaseKeepAliveRequest>,
    replies: &mut Streaming<pb::LeaseKeepAliveResponse>,
    id: i64,
) -> pb::LeaseKeepAliveResponse {
    tx.send(pb::LeaseKeepAliveRequest { id }).await.unwrap();
    tokio::time::timeout(WAIT, replies.message())
        .await
        .expect("keep-alive answer in time")
        .expect("keep-alive stream healthy")
        .expect("keep-alive stream open")
}

/// Asserts etcd's NotFound error for a lease that does not exist.
fn assert_lease_not_found(err: &Status) {
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(err.message(), "etcdserver: requested lease not found");
}

#[tokio::test]
async fn grant_attach_time_to_live_and_list() {
    let h = start().await;
    let id = grant(&h, 10).await;
    put_leased(&h, "leased", id).await.expect("put with lease");
    assert_eq!(h.get("leased").await.kvs[0].lease, id);
    h.backend.advance_clock_ms(3_000);
    let ttl = time_to_live(&h, id, true).await;
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
    put_leased(&h, "ka", id).await.unwrap();
    let (tx, rx) = mpsc::channel(4);
    let mut replies = h
        .lease()
        .lease_keep_alive(ReceiverStream::new(rx))
        .await
        .expect("open keep-alive stream")
        .into_inner();
    h.backend.advance_clock_ms(4_000);
    let r = keep_alive_once(&tx, &mut replies, id).await;
    assert_eq!((r.id, r.ttl), (id, 5), "renewed to the full TTL");
    // 4 s later the lease would have expired without the renewal.
    h.backend.advance_clock_ms(4_000);
    assert!(h.backend.expire_leases().is_empty());
    assert_eq!(h.get("ka").await.count, 1);
    // Past the renewed deadline it expires and takes its key along.
    h.backend.advance_clock_ms(2_000);
    assert_eq!(h.backend.expire_leases(), [id]);
    assert_eq!(h.get("ka").await.count, 0);
    let r = keep_alive_once(&tx, &mut replies, id).await;
    assert_eq!(r.ttl, 0, "an expired lease answers TTL 0");
    let ttl = time_to_live(&h, id, false).await;
    assert_eq!(ttl.ttl, -1, "an unknown lease reports TTL -1");
}

#[tokio::test]
async fn revoke_deletes_keys_and_unknown_lease_is_not_found() {
    let h = start().await;
    let id = grant(&h, 60).await;
    put_leased(&h, "r", id).await.unwrap();
    revoke(&h, id).await.expect("revoke");
    assert_eq!(h.get("r").await.count, 0);
    let err = revoke(&h, id).await.expect_err("already gone");
    assert_lease_not_found(&err);
    let err = put_leased(&h, "r", id)
        .await
        .expect_err("put with a missing lease");
    assert_lease_not_found(&err);
}

#[tokio::test]
async fn grant_with_chosen_id_and_duplicate() {
    let h = start().await;
    let r = try_grant(&h, 30, 777).await.unwrap();
    assert_eq!(r.id, 777);
    let err = try_grant(&h, 30, 777).await.expect_err("duplicate");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(err.message(), "etcdserver: lease already exists");
}
