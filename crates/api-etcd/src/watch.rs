//! `etcdserverpb.Watch`: one bidirectional stream carries many watchers.
//!
//! Each stream is served by one task that owns its watchers. A watcher is *synced* when it
//! has seen every revision up to the live event feed's position: it then takes its events
//! from the feed ([`crate::EventFeed`]), which the node fills after each apply. Otherwise
//! it is *lagging* and reads store history (`KvStore::events_from`) in bounded steps until
//! it reaches the head, then turns synced. A new watcher with a start revision starts
//! lagging; one without starts synced at the current revision.
//!
//! Why this is complete: the task subscribes to the feed before it reads the store for the
//! first time, and the node publishes a revision's events only after the store shows that
//! revision. So after a history read at head `H`, the batch for `H + 1` is still to come
//! on the feed. A batch whose revision skips ahead of a watcher's cursor, or a feed that
//! reports it lagged, sends the watcher back to history; nothing is assumed.
//!
//! Bounds: the response queue per stream ([`WATCH_STREAM_BUFFER`]), the feed
//! ([`crate::backend::EVENT_FEED_CAPACITY`]), watchers per stream
//! ([`WATCHERS_PER_STREAM_MAX`]) and history read per step ([`WATCH_CATCHUP_BATCH_EVENTS`]).

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use concord_kv as kv;
use prost::Message;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::backend::{Backend, EventBatch};
use crate::convert;
use crate::limits::{
    PROGRESS_NOTIFY_INTERVAL_MS, WATCHERS_PER_STREAM_MAX, WATCH_CATCHUP_BATCH_EVENTS,
    WATCH_FRAGMENT_BYTES, WATCH_STREAM_BUFFER,
};
use crate::proto::etcdserverpb as pb;
use crate::proto::mvccpb;

/// Watch id of responses that belong to the whole stream (progress replies), as etcd.
pub const STREAM_WATCH_ID: i64 = -1;

/// Tunables of the Watch service.
#[derive(Clone, Debug)]
pub struct WatchServiceConfig {
    /// Period of progress notifications for watchers that asked for them.
    pub progress_notify_interval: Duration,
}

impl Default for WatchServiceConfig {
    fn default() -> Self {
        WatchServiceConfig {
            progress_notify_interval: Duration::from_millis(PROGRESS_NOTIFY_INTERVAL_MS),
        }
    }
}

/// Serves the Watch service from a [`Backend`].
pub struct WatchService<B> {
    backend: Arc<B>,
    config: WatchServiceConfig,
}

impl<B: Backend> WatchService<B> {
    pub fn new(backend: Arc<B>, config: WatchServiceConfig) -> Self {
        WatchService { backend, config }
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl<B: Backend> pb::watch_server::Watch for WatchService<B> {
    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<Streaming<pb::WatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(WATCH_STREAM_BUFFER);
        let task = StreamTask {
            feed: self.backend.events().subscribe(),
            backend: self.backend.clone(),
            tx,
            watchers: BTreeMap::new(),
            next_id: 0,
            seen_head: 0,
            progress_pending: false,
        };
        let interval = self.config.progress_notify_interval;
        tokio::spawn(task.run(inbound, interval));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// One watcher of a stream.
struct Watcher {
    key: Vec<u8>,
    range_end: Vec<u8>,
    prev_kv: bool,
    no_put: bool,
    no_delete: bool,
    progress_notify: bool,
    fragment: bool,
    /// Next revision to deliver. Every event before (`cursor`, `after_key`) was delivered
    /// or filtered out.
    cursor: i64,
    /// Within `cursor`, events on keys `<= after_key` were delivered; empty for none. Only
    /// set when one revision was too large for one history step.
    after_key: Vec<u8>,
    /// Takes events from the live feed (else from history).
    synced: bool,
}

impl Watcher {
    fn wants(&self, e: &kv::Event) -> bool {
        if !kv::key_in_range(&e.kv.key, &self.key, &self.range_end) {
            return false;
        }
        match e.kind {
            kv::EventKind::Put => !self.no_put,
            kv::EventKind::Delete => !self.no_delete,
        }
    }

    /// The highest revision this watcher is known to have fully delivered.
    fn delivered_through(&self) -> i64 {
        self.cursor - 1
    }
}

/// Outcome of a step that may have to stop the stream.
enum Flow {
    Continue,
    /// The client went away or the stream failed: end the task.
    Stop,
}

struct StreamTask<B> {
    backend: Arc<B>,
    feed: broadcast::Receiver<Arc<EventBatch>>,
    tx: mpsc::Sender<Result<pb::WatchResponse, Status>>,
    watchers: BTreeMap<i64, Watcher>,
    next_id: i64,
    /// Highest revision this stream has seen applied (feed batches and history reads).
    seen_head: i64,
    /// A progress request arrived while some watcher was lagging: answer it once all are
    /// synced.
    progress_pending: bool,
}

impl<B: Backend> StreamTask<B> {
    async fn run(mut self, mut inbound: Streaming<pb::WatchRequest>, interval: Duration) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await; // the first tick is immediate
        loop {
            let lagging = self.watchers.values().any(|w| !w.synced);
            let flow = tokio::select! {
                biased;
                req = inbound.next() => match req {
                    Some(Ok(req)) => self.on_request(req).await,
                    // The client closed its side or the transport failed: either way
                    // nobody will read further responses.
                    Some(Err(_)) | None => Flow::Stop,
                },
                batch = self.feed.recv() => match batch {
                    Ok(batch) => self.on_batch(&batch).await,
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        self.all_lagging();
                        Flow::Continue
                    }
                    Err(broadcast::error::RecvError::Closed) => {
                        let _ = self.tx.send(Err(Status::unavailable("etcdserver: server stopped"))).await;
                        Flow::Stop
                    }
                },
                _ = ticker.tick() => self.progress_notify().await,
                _ = std::future::ready(()), if lagging => self.catch_up_step().await,
            };
            if let Flow::Stop = flow {
                return;
            }
            if self.progress_pending && self.watchers.values().all(|w| w.synced) {
                self.progress_pending = false;
                if let Flow::Stop = self.send_stream_progress().await {
                    return;
                }
            }
        }
    }

    async fn send(&self, resp: pb::WatchResponse) -> Flow {
        match self.tx.send(Ok(resp)).await {
            Ok(()) => Flow::Continue,
            Err(_) => Flow::Stop,
        }
    }

    fn header(&self, revision: i64) -> Option<pb::ResponseHeader> {
        self.backend.header().header(revision)
    }

    fn all_lagging(&mut self) {
        for w in self.watchers.values_mut() {
            w.synced = false;
        }
    }

    async fn on_request(&mut self, req: pb::WatchRequest) -> Flow {
        use pb::watch_request::RequestUnion;
        match req.request_union {
            Some(RequestUnion::CreateRequest(c)) => self.create(c).await,
            Some(RequestUnion::CancelRequest(c)) => {
                // etcd answers only cancels of watchers that exist.
                if self.watchers.remove(&c.watch_id).is_some() {
                    let header = self.header(self.backend.with_store(|s| s.revision()));
                    return self
                        .send(pb::WatchResponse {
                            header,
                            watch_id: c.watch_id,
                            canceled: true,
                            ..Default::default()
                        })
                        .await;
                }
                Flow::Continue
            }
            Some(RequestUnion::ProgressRequest(_)) => {
                if let Flow::Stop = self.drain_feed().await {
                    return Flow::Stop;
                }
                if self.watchers.values().all(|w| w.synced) {
                    self.send_stream_progress().await
                } else {
                    self.progress_pending = true;
                    Flow::Continue
                }
            }
            None => Flow::Continue,
        }
    }

    /// Answers a create that cannot be served: created and cancelled at once, as etcd.
    async fn refuse(&self, watch_id: i64, reason: &str) -> Flow {
        let header = self.header(self.backend.with_store(|s| s.revision()));
        self.send(pb::WatchResponse {
            header,
            watch_id,
            created: true,
            canceled: true,
            cancel_reason: reason.to_string(),
            ..Default::default()
        })
        .await
    }

    async fn create(&mut self, c: pb::WatchCreateRequest) -> Flow {
        if self.watchers.len() >= WATCHERS_PER_STREAM_MAX {
            return self
                .refuse(
                    STREAM_WATCH_ID,
                    "etcdserver: too many watchers on this stream",
                )
                .await;
        }
        let id = if c.watch_id != 0 {
            if self.watchers.contains_key(&c.watch_id) || c.watch_id < 0 {
                return self
                    .refuse(
                        c.watch_id,
                        "mvcc: duplicate watch ID provided on the WatchStream",
                    )
                    .await;
            }
            c.watch_id
        } else {
            // Ids are chosen in order; one given by the client is skipped over. The
            // per-stream limit guarantees a free id within that many steps.
            while self.watchers.contains_key(&self.next_id) {
                self.next_id += 1;
            }
            let id = self.next_id;
            self.next_id += 1;
            id
        };
        let mut no_put = false;
        let mut no_delete = false;
        for f in &c.filters {
            match pb::watch_create_request::FilterType::try_from(*f) {
                Ok(pb::watch_create_request::FilterType::Noput) => no_put = true,
                Ok(pb::watch_create_request::FilterType::Nodelete) => no_delete = true,
                Err(_) => {
                    return self
                        .refuse(id, &format!("etcdserver: invalid watch filter {f}"))
                        .await
                }
            }
        }
        // etcd treats an empty key as the smallest key, "\0".
        let key = if c.key.is_empty() { vec![0] } else { c.key };
        let head = self.backend.with_store(|s| s.revision());
        self.seen_head = self.seen_head.max(head);
        let (cursor, synced) = if c.start_revision > 0 {
            (c.start_revision, false)
        } else {
            (head + 1, true)
        };
        self.watchers.insert(
            id,
            Watcher {
                key,
                range_end: c.range_end,
                prev_kv: c.prev_kv,
                no_put,
                no_delete,
                progress_notify: c.progress_notify,
                fragment: c.fragment,
                cursor,
                after_key: Vec::new(),
                synced,
            },
        );
        self.send(pb::WatchResponse {
            header: self.header(head),
            watch_id: id,
            created: true,
            ..Default::default()
        })
        .await
    }

    /// Delivers one live batch to every synced watcher.
    async fn on_batch(&mut self, batch: &EventBatch) -> Flow {
        self.seen_head = self.seen_head.max(batch.revision);
        let mut out = Vec::new();
        for (&id, w) in self.watchers.iter_mut() {
            if !w.synced || batch.revision < w.cursor {
                continue;
            }
            if batch.revision > w.cursor || !w.after_key.is_empty() {
                // A revision this watcher needs was never seen on the feed.
                w.synced = false;
                continue;
            }
            let events: Vec<kv::Event> = batch
                .events
                .iter()
                .filter(|e| w.wants(e))
                .cloned()
                .collect();
            w.cursor = batch.revision + 1;
            if !events.is_empty() {
                out.push((id, w.prev_kv, w.fragment, events));
            }
        }
        for (id, prev_kv, fragment, events) in out {
            if let Flow::Stop = self
                .send_events(id, batch.revision, events, prev_kv, fragment)
                .await
            {
                return Flow::Stop;
            }
        }
        Flow::Continue
    }

    /// Processes every batch already waiting on the feed, so a progress answer reflects
    /// the newest revision this stream can vouch for.
    async fn drain_feed(&mut self) -> Flow {
        loop {
            match self.feed.try_recv() {
                Ok(batch) => {
                    if let Flow::Stop = self.on_batch(&batch).await {
                        return Flow::Stop;
                    }
                }
                Err(broadcast::error::TryRecvError::Lagged(_)) => self.all_lagging(),
                Err(_) => return Flow::Continue,
            }
        }
    }

    /// One bounded history read for every lagging watcher.
    async fn catch_up_step(&mut self) -> Flow {
        let lagging: Vec<i64> = self
            .watchers
            .iter()
            .filter(|(_, w)| !w.synced)
            .map(|(&id, _)| id)
            .collect();
        for id in lagging {
            let Some(w) = self.watchers.get(&id) else {
                continue;
            };
            let (found, head) = self.backend.with_store(|s| {
                (
                    s.events_from(
                        &w.key,
                        &w.range_end,
                        w.cursor,
                        &w.after_key,
                        WATCH_CATCHUP_BATCH_EVENTS,
                    ),
                    s.revision(),
                )
            });
            self.seen_head = self.seen_head.max(head);
            let events = match found {
                Ok(events) => events,
                Err(kv::KvError::Compacted { compact_revision }) => {
                    self.watchers.remove(&id);
                    let resp = pb::WatchResponse {
                        header: self.header(head),
                        watch_id: id,
                        canceled: true,
                        compact_revision,
                        cancel_reason: "mvcc: required revision has been compacted".into(),
                        ..Default::default()
                    };
                    if let Flow::Stop = self.send(resp).await {
                        return Flow::Stop;
                    }
                    continue;
                }
                Err(other) => {
                    self.watchers.remove(&id);
                    let resp = pb::WatchResponse {
                        header: self.header(head),
                        watch_id: id,
                        canceled: true,
                        cancel_reason: other.etcd_message().to_string(),
                        ..Default::default()
                    };
                    if let Flow::Stop = self.send(resp).await {
                        return Flow::Stop;
                    }
                    continue;
                }
            };
            let w = self.watchers.get_mut(&id).expect("looked up above");
            let complete = events.len() < WATCH_CATCHUP_BATCH_EVENTS;
            let (deliver, through) = if complete {
                // Everything up to the head has been read.
                w.cursor = w.cursor.max(head + 1);
                w.after_key.clear();
                w.synced = true;
                (events, head)
            } else {
                let first = events.first().map(|e| e.revision()).unwrap_or(w.cursor);
                let last = events.last().map(|e| e.revision()).unwrap_or(w.cursor);
                if first == last {
                    // One revision larger than a step: deliver it in pieces, remembering
                    // the last key delivered.
                    w.cursor = last;
                    w.after_key = events.last().map(|e| e.kv.key.clone()).unwrap_or_default();
                    (events, last - 1)
                } else {
                    // Keep every revision whole: stop before the last (maybe cut) one.
                    let keep: Vec<kv::Event> =
                        events.into_iter().filter(|e| e.revision() < last).collect();
                    w.cursor = last;
                    w.after_key.clear();
                    (keep, last - 1)
                }
            };
            let deliver: Vec<kv::Event> = deliver.into_iter().filter(|e| w.wants(e)).collect();
            let (prev_kv, fragment) = (w.prev_kv, w.fragment);
            if !deliver.is_empty() {
                if let Flow::Stop = self
                    .send_events(id, through.max(1), deliver, prev_kv, fragment)
                    .await
                {
                    return Flow::Stop;
                }
            }
        }
        Flow::Continue
    }

    /// Sends events for one watcher, split into fragments when the client allowed it and
    /// the response would be large.
    async fn send_events(
        &self,
        watch_id: i64,
        revision: i64,
        events: Vec<kv::Event>,
        prev_kv: bool,
        fragment: bool,
    ) -> Flow {
        let events: Vec<mvccpb::Event> = events
            .into_iter()
            .map(|e| convert::event(e, prev_kv))
            .collect();
        let header = self.header(revision);
        let total: usize = events.iter().map(|e| e.encoded_len()).sum();
        if !fragment || total <= WATCH_FRAGMENT_BYTES {
            return self
                .send(pb::WatchResponse {
                    header,
                    watch_id,
                    events,
                    ..Default::default()
                })
                .await;
        }
        let mut pieces: Vec<Vec<mvccpb::Event>> = vec![Vec::new()];
        let mut size = 0;
        for e in events {
            let len = e.encoded_len();
            let current = pieces.last_mut().expect("never empty");
            if !current.is_empty() && size + len > WATCH_FRAGMENT_BYTES {
                pieces.push(Vec::new());
                size = 0;
            }
            size += len;
            pieces.last_mut().expect("never empty").push(e);
        }
        let n = pieces.len();
        for (i, events) in pieces.into_iter().enumerate() {
            let resp = pb::WatchResponse {
                header,
                watch_id,
                events,
                fragment: i + 1 < n,
                ..Default::default()
            };
            if let Flow::Stop = self.send(resp).await {
                return Flow::Stop;
            }
        }
        Flow::Continue
    }

    /// The revision this stream can vouch for: every event at or below it has been sent.
    fn progress_revision(&self) -> i64 {
        let through = self
            .watchers
            .values()
            .map(Watcher::delivered_through)
            .min()
            .unwrap_or(i64::MAX);
        through.min(self.seen_head)
    }

    async fn send_stream_progress(&mut self) -> Flow {
        if self.watchers.is_empty() {
            self.seen_head = self
                .seen_head
                .max(self.backend.with_store(|s| s.revision()));
        }
        let resp = pb::WatchResponse {
            header: self.header(self.progress_revision()),
            watch_id: STREAM_WATCH_ID,
            ..Default::default()
        };
        self.send(resp).await
    }

    /// Periodic notifications for synced watchers created with `progress_notify`.
    async fn progress_notify(&mut self) -> Flow {
        if let Flow::Stop = self.drain_feed().await {
            return Flow::Stop;
        }
        let due: Vec<(i64, i64)> = self
            .watchers
            .iter()
            .filter(|(_, w)| w.progress_notify && w.synced)
            .map(|(&id, w)| (id, w.delivered_through().min(self.seen_head)))
            .collect();
        for (id, revision) in due {
            let resp = pb::WatchResponse {
                header: self.header(revision),
                watch_id: id,
                ..Default::default()
            };
            if let Flow::Stop = self.send(resp).await {
                return Flow::Stop;
            }
        }
        Flow::Continue
    }
}
