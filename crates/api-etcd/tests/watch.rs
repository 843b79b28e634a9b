//! Watch service over loopback: many watchers per stream, history, filters, cancel,
//! compaction, progress, and a slow client that forces catch-up from history.

mod common;

use std::time::Duration;

use common::{prefix_end, start, start_with_progress, WAIT};
use concord_api_etcd::proto::etcdserverpb as pb;
use concord_api_etcd::proto::mvccpb;
use pb::watch_create_request::FilterType;
use pb::watch_request::RequestUnion;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

struct Stream {
    tx: mpsc::Sender<pb::WatchRequest>,
    rx: Streaming<pb::WatchResponse>,
}

impl Stream {
    async fn open(h: &common::Harness) -> Stream {
        let (tx, rx) = mpsc::channel(16);
        let rx = h
            .watch()
            .watch(ReceiverStream::new(rx))
            .await
            .expect("open watch stream")
            .into_inner();
        Stream { tx, rx }
    }

    async fn send(&self, r: RequestUnion) {
        self.tx
            .send(pb::WatchRequest {
                request_union: Some(r),
            })
            .await
            .expect("stream open");
    }

    async fn create(&mut self, c: pb::WatchCreateRequest) -> i64 {
        self.send(RequestUnion::CreateRequest(c)).await;
        let r = self.next().await;
        assert!(r.created, "expected a created response, got {r:?}");
        r.watch_id
    }

    async fn next(&mut self) -> pb::WatchResponse {
        tokio::time::timeout(WAIT, self.rx.message())
            .await
            .expect("a watch response in time")
            .expect("stream ok")
            .expect("stream not closed")
    }

    /// Collects event responses until `n` events arrived.
    async fn events(&mut self, n: usize) -> Vec<(i64, mvccpb::Event)> {
        let mut out = Vec::new();
        while out.len() < n {
            let r = self.next().await;
            for e in r.events {
                out.push((r.watch_id, e));
            }
        }
        assert_eq!(
            out.len(),
            n,
            "no more events than expected in the last response"
        );
        out
    }
}

fn create(key: &str) -> pb::WatchCreateRequest {
    pb::WatchCreateRequest {
        key: key.into(),
        ..Default::default()
    }
}

fn key_of(e: &mvccpb::Event) -> String {
    String::from_utf8(e.kv.as_ref().unwrap().key.clone()).unwrap()
}

#[tokio::test]
async fn live_events_for_many_watchers_on_one_stream() {
    let h = start().await;
    let mut s = Stream::open(&h).await;
    let single = s.create(create("a")).await;
    let prefix = s
        .create(pb::WatchCreateRequest {
            key: "p/".into(),
            range_end: prefix_end("p/"),
            prev_kv: true,
            ..Default::default()
        })
        .await;
    assert_ne!(single, prefix);
    h.put("a", "1").await;
    h.put("p/x", "1").await;
    h.put("p/x", "2").await;
    h.put("zzz", "ignored").await;
    let got = s.events(3).await;
    assert_eq!(got[0].0, single);
    assert_eq!(key_of(&got[0].1), "a");
    assert_eq!(got[1].0, prefix);
    assert!(
        got[1].1.prev_kv.is_none(),
        "first put has no previous version"
    );
    assert_eq!(got[2].0, prefix);
    assert_eq!(got[2].1.prev_kv.as_ref().unwrap().value, b"1");
    assert_eq!(got[2].1.kv.as_ref().unwrap().value, b"2");
    // The single-key watcher did not ask for prev_kv.
    h.put("a", "2").await;
    let got = s.events(1).await;
    assert!(got[0].1.prev_kv.is_none());
}

#[tokio::test]
async fn history_from_start_revision_then_live() {
    let h = start().await;
    h.put("k", "1").await; // rev 2
    h.put("k", "2").await; // rev 3
    h.kv()
        .delete_range(pb::DeleteRangeRequest {
            key: "k".into(),
            ..Default::default()
        })
        .await
        .unwrap(); // rev 4
    let mut s = Stream::open(&h).await;
    s.create(pb::WatchCreateRequest {
        key: "k".into(),
        start_revision: 3,
        ..Default::default()
    })
    .await;
    let got = s.events(2).await;
    assert_eq!(got[0].1.kv.as_ref().unwrap().mod_revision, 3);
    assert_eq!(got[1].1.r#type, mvccpb::event::EventType::Delete as i32);
    h.put("k", "3").await; // rev 5, live
    let got = s.events(1).await;
    assert_eq!(got[0].1.kv.as_ref().unwrap().mod_revision, 5);
}

#[tokio::test]
async fn filters_and_cancel() {
    let h = start().await;
    let mut s = Stream::open(&h).await;
    let id = s
        .create(pb::WatchCreateRequest {
            key: "f".into(),
            filters: vec![FilterType::Noput as i32],
            ..Default::default()
        })
        .await;
    h.put("f", "1").await;
    h.kv()
        .delete_range(pb::DeleteRangeRequest {
            key: "f".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let got = s.events(1).await;
    assert_eq!(got[0].1.r#type, mvccpb::event::EventType::Delete as i32);
    s.send(RequestUnion::CancelRequest(pb::WatchCancelRequest {
        watch_id: id,
    }))
    .await;
    let r = s.next().await;
    assert!(r.canceled);
    assert_eq!(r.watch_id, id);
    // Nothing more arrives for it; a new watcher proves the stream still works.
    h.put("f", "2").await;
    let other = s.create(create("g")).await;
    h.put("g", "1").await;
    let got = s.events(1).await;
    assert_eq!(got[0].0, other);
}

#[tokio::test]
async fn compacted_start_revision_cancels_with_compact_revision() {
    let h = start().await;
    for i in 0..5 {
        h.put("c", &i.to_string()).await;
    }
    h.kv()
        .compact(pb::CompactionRequest {
            revision: 5,
            physical: false,
        })
        .await
        .unwrap();
    let mut s = Stream::open(&h).await;
    let id = s
        .create(pb::WatchCreateRequest {
            key: "c".into(),
            start_revision: 2,
            ..Default::default()
        })
        .await;
    let r = s.next().await;
    assert_eq!(r.watch_id, id);
    assert!(r.canceled);
    assert_eq!(r.compact_revision, 5);
}

#[tokio::test]
async fn explicit_ids_and_duplicates() {
    let h = start().await;
    let mut s = Stream::open(&h).await;
    let id = s
        .create(pb::WatchCreateRequest {
            key: "x".into(),
            watch_id: 42,
            ..Default::default()
        })
        .await;
    assert_eq!(id, 42);
    s.send(RequestUnion::CreateRequest(pb::WatchCreateRequest {
        key: "y".into(),
        watch_id: 42,
        ..Default::default()
    }))
    .await;
    let r = s.next().await;
    assert!(r.created && r.canceled, "duplicate id is refused: {r:?}");
    assert_eq!(
        r.cancel_reason,
        "mvcc: duplicate watch ID provided on the WatchStream"
    );
}

#[tokio::test]
async fn progress_request_reports_current_revision() {
    let h = start().await;
    let mut s = Stream::open(&h).await;
    s.create(create("quiet")).await;
    h.put("elsewhere", "1").await;
    let rev = h.put("elsewhere", "2").await.header.unwrap().revision;
    s.send(RequestUnion::ProgressRequest(pb::WatchProgressRequest {}))
        .await;
    let r = s.next().await;
    assert_eq!(r.watch_id, -1);
    assert!(r.events.is_empty());
    assert_eq!(r.header.unwrap().revision, rev);
}

#[tokio::test]
async fn periodic_progress_notify() {
    let h = start_with_progress(Duration::from_millis(50)).await;
    let mut s = Stream::open(&h).await;
    let id = s
        .create(pb::WatchCreateRequest {
            key: "n".into(),
            progress_notify: true,
            ..Default::default()
        })
        .await;
    let rev = h.put("other", "1").await.header.unwrap().revision;
    // Notifications keep coming; one of them soon reports the write's revision.
    loop {
        let r = s.next().await;
        assert_eq!(r.watch_id, id);
        assert!(r.events.is_empty());
        if r.header.unwrap().revision == rev {
            break;
        }
    }
}

#[tokio::test]
async fn slow_reader_catches_up_from_history_in_order() {
    let h = start().await;
    let mut s = Stream::open(&h).await;
    s.create(pb::WatchCreateRequest {
        key: "s/".into(),
        range_end: prefix_end("s/"),
        ..Default::default()
    })
    .await;
    // More writes than the event feed holds, while nobody reads the stream: the stream
    // task must fall back to history without losing or reordering anything.
    const WRITES: usize = 3000;
    let mut kv = h.kv();
    for i in 0..WRITES {
        kv.put(pb::PutRequest {
            key: format!("s/{:05}", i % 50).into_bytes(),
            // 4 KiB values fill the transport's flow-control window quickly too.
            value: vec![b'v'; 4096],
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let got = s.events(WRITES).await;
    let revs: Vec<i64> = got
        .iter()
        .map(|(_, e)| e.kv.as_ref().unwrap().mod_revision)
        .collect();
    let expected: Vec<i64> = (2..2 + WRITES as i64).collect();
    assert_eq!(revs, expected);
}

#[tokio::test]
async fn large_revision_is_fragmented_when_asked() {
    let h = start().await;
    let big = vec![b'b'; 1024 * 1024];
    for k in ["big/1", "big/2"] {
        h.kv()
            .put(pb::PutRequest {
                key: k.into(),
                value: big.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let mut s = Stream::open(&h).await;
    let whole = s
        .create(pb::WatchCreateRequest {
            key: "big/".into(),
            range_end: prefix_end("big/"),
            prev_kv: true,
            ..Default::default()
        })
        .await;
    let split = s
        .create(pb::WatchCreateRequest {
            key: "big/".into(),
            range_end: prefix_end("big/"),
            prev_kv: true,
            fragment: true,
            ..Default::default()
        })
        .await;
    // One deletion revision whose events carry 2 MiB of previous values.
    h.kv()
        .delete_range(pb::DeleteRangeRequest {
            key: "big/".into(),
            range_end: prefix_end("big/"),
            prev_kv: false,
        })
        .await
        .unwrap();
    let mut whole_responses = Vec::new();
    let mut split_responses = Vec::new();
    while whole_responses
        .iter()
        .map(|r: &pb::WatchResponse| r.events.len())
        .sum::<usize>()
        < 2
        || split_responses
            .iter()
            .map(|r: &pb::WatchResponse| r.events.len())
            .sum::<usize>()
            < 2
    {
        let r = s.next().await;
        if r.watch_id == whole {
            whole_responses.push(r);
        } else {
            assert_eq!(r.watch_id, split);
            split_responses.push(r);
        }
    }
    assert_eq!(
        whole_responses.len(),
        1,
        "without fragment the revision is one response"
    );
    assert!(!whole_responses[0].fragment);
    assert_eq!(split_responses.len(), 2);
    assert!(split_responses[0].fragment, "more fragments follow");
    assert!(
        !split_responses[1].fragment,
        "the last fragment ends the revision"
    );
}
