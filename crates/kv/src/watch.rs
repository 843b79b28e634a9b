//! The watch hub: turns committed changes into per-watcher event queues.
//!
//! It owns no threads, channels or clocks. The runtime calls [`WatchHub::publish`] with the
//! events of every applied command (in apply order, holding the store), and the gRPC
//! front-end calls [`WatchHub::poll`] for the watchers `publish` reported as ready.
//!
//! A watcher is either *synced* (its cursor is at the store's head and `publish` appends to
//! its queue) or *lagging* (`publish` skips it and `poll` refills its queue from MVCC
//! history, from its cursor). A new watcher starts lagging at its start revision. When a
//! synced watcher's queue is full, it turns lagging at the first event that did not fit;
//! nothing is lost unless compaction overtakes its cursor, and then it is cancelled with
//! [`WatchCancelReason::Compacted`].

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::error::KvError;
use crate::store::{key_in_range, KvStore};
use crate::types::{Event, EventKind, Revision};

/// Hub-assigned watcher id (the front-end maps its per-stream ids onto these).
pub type WatchId = u64;

/// Bounds of a [`WatchHub`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchConfig {
    /// Most watchers registered at once.
    pub watchers_max: usize,
    /// Most events queued per watcher before it turns lagging.
    pub queue_events_max: usize,
    /// Most event bytes (keys and values, with prev_kv) queued per watcher before it turns
    /// lagging; one event is always accepted into an empty queue, however large.
    pub queue_bytes_max: usize,
    /// Most recently published events the hub keeps so that a watcher lagging only a
    /// little catches up from them instead of scanning the store's history.
    pub recent_events_max: usize,
    /// Most bytes of recently published events kept (same measure as `queue_bytes_max`).
    pub recent_bytes_max: usize,
}

impl Default for WatchConfig {
    fn default() -> Self {
        WatchConfig {
            watchers_max: 100_000,
            queue_events_max: 1024,
            queue_bytes_max: 4 * 1024 * 1024,
            recent_events_max: 4096,
            recent_bytes_max: 16 * 1024 * 1024,
        }
    }
}

/// What to watch, as etcd's `WatchCreateRequest`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WatchRequest {
    /// Same `key`/`range_end` conventions as a range.
    pub key: Vec<u8>,
    pub range_end: Vec<u8>,
    /// First revision to report; 0 or below means "changes after now".
    pub start_revision: Revision,
    /// Include each change's previous version.
    pub prev_kv: bool,
    /// Filters (etcd's `NOPUT`, `NODELETE`).
    pub no_put: bool,
    pub no_delete: bool,
}

/// Why the hub cancelled a watcher.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchCancelReason {
    /// The watcher's cursor fell below the compact revision; the client must re-read and
    /// watch again from at least `compact_revision`.
    Compacted { compact_revision: Revision },
}

/// What one [`WatchHub::poll`] delivers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WatchPoll {
    /// Events in (revision, key) order, at most the requested count.
    pub events: Vec<Event>,
    /// Set once: the watcher is gone after this poll.
    pub canceled: Option<WatchCancelReason>,
    /// More events are ready now (queued, or history still to replay): poll again.
    pub more: bool,
}

struct Watcher {
    req: WatchRequest,
    /// Everything before `(cursor_rev, cursor_key)` has been queued or filtered out.
    cursor_rev: Revision,
    cursor_key: Vec<u8>,
    synced: bool,
    queue: VecDeque<Event>,
    queue_bytes: usize,
    canceled: Option<WatchCancelReason>,
}

impl Watcher {
    fn wants(&self, e: &Event) -> bool {
        if !key_in_range(&e.kv.key, &self.req.key, &self.req.range_end) {
            return false;
        }
        match e.kind {
            EventKind::Put => !self.req.no_put,
            EventKind::Delete => !self.req.no_delete,
        }
    }

    /// Whether `e` is at or after the cursor.
    fn not_before_cursor(&self, e: &Event) -> bool {
        (e.revision(), e.kv.key.as_slice()) >= (self.cursor_rev, self.cursor_key.as_slice())
    }

    /// Moves the cursor just past `e`: the same revision, the next possible key.
    fn advance_past(&mut self, e: &Event) {
        self.cursor_rev = e.revision();
        self.cursor_key.clear();
        self.cursor_key.extend_from_slice(&e.kv.key);
        self.cursor_key.push(0);
    }

    /// Queues `e` if there is room; false when full (the caller decides what that means).
    fn try_push(&mut self, cfg: &WatchConfig, e: &Event) -> bool {
        let size = event_bytes(e, self.req.prev_kv);
        let full = self.queue.len() >= cfg.queue_events_max
            || (!self.queue.is_empty() && self.queue_bytes + size > cfg.queue_bytes_max);
        if full {
            return false;
        }
        self.advance_past(e);
        if self.wants(e) {
            let mut e = e.clone();
            if !self.req.prev_kv {
                e.prev_kv = None;
            }
            self.queue.push_back(e);
            self.queue_bytes += size;
        }
        true
    }
}

fn event_bytes(e: &Event, with_prev: bool) -> usize {
    let prev = match (&e.prev_kv, with_prev) {
        (Some(p), true) => p.key.len() + p.value.len(),
        _ => 0,
    };
    e.kv.key.len() + e.kv.value.len() + prev
}

/// A bounded suffix of the published event stream: every published event at a position
/// at or after `(start_rev, start_key)` is in `events` (the stream is in position order,
/// so dropping the oldest just moves the start past it).
struct Recent {
    events: VecDeque<Event>,
    bytes: usize,
    start_rev: Revision,
    start_key: Vec<u8>,
}

impl Recent {
    /// Forgets everything; the next published revision starts the suffix again.
    fn restart(&mut self, next_rev: Revision) {
        self.events.clear();
        self.bytes = 0;
        self.start_rev = next_rev;
        self.start_key.clear();
    }

    fn push(&mut self, cfg: &WatchConfig, e: &Event) {
        self.bytes += event_bytes(e, true);
        self.events.push_back(e.clone());
        while self.events.len() > cfg.recent_events_max || self.bytes > cfg.recent_bytes_max {
            let old = self
                .events
                .pop_front()
                .expect("non-empty while over a limit");
            self.bytes -= event_bytes(&old, true);
            self.start_rev = old.revision();
            self.start_key = old.kv.key;
            self.start_key.push(0);
        }
    }

    fn covers(&self, rev: Revision, key: &[u8]) -> bool {
        (rev, key) >= (self.start_rev, self.start_key.as_slice())
    }

    /// The same answer `KvStore::events_from` gives, for a position this suffix covers.
    fn read(&self, w: &Watcher, limit: usize) -> Vec<Event> {
        self.events
            .iter()
            .filter(|e| {
                w.not_before_cursor(e) && key_in_range(&e.kv.key, &w.req.key, &w.req.range_end)
            })
            .take(limit)
            .cloned()
            .collect()
    }
}

/// Registered watchers and their bounded queues. See the module doc.
pub struct WatchHub {
    config: WatchConfig,
    watchers: BTreeMap<WatchId, Watcher>,
    /// Watchers of a single key, by key: `publish` looks these up per event.
    by_key: BTreeMap<Vec<u8>, BTreeSet<WatchId>>,
    /// Watchers of a range: `publish` checks each against every event.
    ranged: BTreeSet<WatchId>,
    recent: Recent,
    /// Lagging watchers that polled while the store was ahead of what was published, so
    /// could not finish catching up; the next `publish` reports them ready.
    wake_on_publish: BTreeSet<WatchId>,
    next_id: WatchId,
    /// The store revision up to which `publish` has delivered; a watcher may only turn
    /// synced when the store is at this revision (else it would miss what was not published).
    published_revision: Revision,
}

impl WatchHub {
    /// A hub for `store` as it is now (events up to its revision count as published).
    pub fn new(config: WatchConfig, store: &KvStore) -> WatchHub {
        WatchHub {
            config,
            watchers: BTreeMap::new(),
            by_key: BTreeMap::new(),
            ranged: BTreeSet::new(),
            recent: Recent {
                events: VecDeque::new(),
                bytes: 0,
                start_rev: store.revision() + 1,
                start_key: Vec::new(),
            },
            wake_on_publish: BTreeSet::new(),
            next_id: 1,
            published_revision: store.revision(),
        }
    }

    pub fn config(&self) -> &WatchConfig {
        &self.config
    }

    pub fn watcher_count(&self) -> usize {
        self.watchers.len()
    }

    /// Registers a watcher. It starts lagging and receives history from
    /// `start_revision` on the first polls. Fails with `Compacted` when `start_revision` is
    /// below the compact revision.
    pub fn watch(&mut self, store: &KvStore, req: WatchRequest) -> Result<WatchId, KvError> {
        if req.key.is_empty() {
            return Err(KvError::EmptyKey);
        }
        if self.watchers.len() >= self.config.watchers_max {
            return Err(KvError::TooManyWatchers {
                max: self.config.watchers_max,
            });
        }
        let start = if req.start_revision > 0 {
            req.start_revision
        } else {
            store.revision() + 1
        };
        if start < store.compact_revision() {
            return Err(KvError::Compacted {
                compact_revision: store.compact_revision(),
            });
        }
        let id = self.next_id;
        self.next_id += 1;
        if req.range_end.is_empty() {
            self.by_key.entry(req.key.clone()).or_default().insert(id);
        } else {
            self.ranged.insert(id);
        }
        self.watchers.insert(
            id,
            Watcher {
                req,
                cursor_rev: start,
                cursor_key: Vec::new(),
                synced: false,
                queue: VecDeque::new(),
                queue_bytes: 0,
                canceled: None,
            },
        );
        Ok(id)
    }

    /// Removes a watcher.
    pub fn cancel(&mut self, id: WatchId) -> Result<(), KvError> {
        let w = self
            .watchers
            .remove(&id)
            .ok_or(KvError::WatchNotFound { id })?;
        self.unindex(id, &w.req);
        self.wake_on_publish.remove(&id);
        Ok(())
    }

    fn unindex(&mut self, id: WatchId, req: &WatchRequest) {
        if req.range_end.is_empty() {
            if let Some(ids) = self.by_key.get_mut(req.key.as_slice()) {
                ids.remove(&id);
                if ids.is_empty() {
                    self.by_key.remove(req.key.as_slice());
                }
            }
        } else {
            self.ranged.remove(&id);
        }
    }

    /// Whether the watcher is at the store's head (etcd sends progress notifications only
    /// to such watchers).
    pub fn is_synced(&self, id: WatchId) -> Option<bool> {
        self.watchers.get(&id).map(|w| w.synced)
    }

    /// Feeds the events of one applied command (from [`crate::Response::events`]); call it
    /// after every apply, in order, with the store that produced them. Returns the watchers
    /// that now have something to poll (new events, or newly lagging).
    pub fn publish(&mut self, store: &KvStore, events: &[Event]) -> Vec<WatchId> {
        let gap = events
            .first()
            .is_some_and(|e| e.revision() > self.published_revision + 1)
            || (events.is_empty() && store.revision() != self.published_revision);
        self.published_revision = store.revision();
        let mut ready = std::mem::take(&mut self.wake_on_publish);
        if gap {
            // Some revisions were never published (or the store was replaced): every
            // synced watcher replays from history instead of guessing.
            self.recent.restart(store.revision() + 1);
            for (&id, w) in self.watchers.iter_mut() {
                if w.canceled.is_none() && w.synced {
                    w.synced = false;
                    ready.insert(id);
                }
            }
            return ready.into_iter().collect();
        }
        for e in events {
            self.recent.push(&self.config, e);
            // Only watchers of exactly this key, and range watchers, can want it.
            let exact = self.by_key.get(e.kv.key.as_slice());
            for &id in exact.into_iter().flatten().chain(self.ranged.iter()) {
                let w = self
                    .watchers
                    .get_mut(&id)
                    .expect("indexed watcher is registered");
                if !w.synced || w.canceled.is_some() || !w.not_before_cursor(e) {
                    continue;
                }
                let before = w.queue.len();
                if !w.try_push(&self.config, e) {
                    // Queue full: fall back to history from this very event.
                    w.synced = false;
                    w.cursor_rev = e.revision();
                    w.cursor_key = e.kv.key.clone();
                    ready.insert(id);
                } else if w.queue.len() != before {
                    ready.insert(id);
                }
            }
        }
        ready.into_iter().collect()
    }

    /// To call after the store was replaced by a restored snapshot: every watcher replays
    /// from its cursor (or is cancelled if the snapshot's compaction passed it).
    pub fn reset(&mut self, store: &KvStore) {
        self.published_revision = store.revision();
        self.recent.restart(store.revision() + 1);
        for w in self.watchers.values_mut() {
            w.synced = false;
        }
    }

    /// Takes up to `max_events` events for watcher `id`, first refilling its queue from
    /// history if it is lagging. A cancelled watcher reports its reason once and is removed.
    pub fn poll(
        &mut self,
        store: &KvStore,
        id: WatchId,
        max_events: usize,
    ) -> Result<WatchPoll, KvError> {
        let published = self.published_revision;
        let cfg = &self.config;
        let recent = &self.recent;
        let w = self
            .watchers
            .get_mut(&id)
            .ok_or(KvError::WatchNotFound { id })?;
        if w.canceled.is_none() && !w.synced {
            catch_up(cfg, store, recent, published, w);
        }
        let mut poll = WatchPoll::default();
        let n = max_events.min(w.queue.len());
        for e in w.queue.drain(..n) {
            w.queue_bytes -= event_bytes(&e, true).min(w.queue_bytes);
            poll.events.push(e);
        }
        if w.queue.is_empty() {
            w.queue_bytes = 0;
        }
        if let Some(reason) = w.canceled.clone() {
            if w.queue.is_empty() {
                poll.canceled = Some(reason);
                self.cancel(id).expect("watcher is registered");
                return Ok(poll);
            }
        }
        // A lagging watcher can make progress now unless the store is ahead of what was
        // published; then polling again would spin, so it waits for the next publish.
        let can_catch_up = !w.synced && store.revision() == published;
        if !w.synced && !can_catch_up && w.queue.is_empty() {
            self.wake_on_publish.insert(id);
        }
        poll.more = !w.queue.is_empty() || can_catch_up || w.canceled.is_some();
        Ok(poll)
    }
}

/// Refills a lagging watcher's queue from history, and marks it synced once it has
/// reached the head of a fully published store.
fn catch_up(
    cfg: &WatchConfig,
    store: &KvStore,
    recent: &Recent,
    published: Revision,
    w: &mut Watcher,
) {
    let room = cfg.queue_events_max.saturating_sub(w.queue.len());
    if room == 0 {
        return;
    }
    // Recently published events answer a small lag without scanning the store; they are
    // only trusted while the hub is in step with the store.
    let fetched = if store.revision() == published && recent.covers(w.cursor_rev, &w.cursor_key) {
        Ok(recent.read(w, room))
    } else {
        store.events_from(
            &w.req.key,
            &w.req.range_end,
            w.cursor_rev,
            &w.cursor_key,
            room,
        )
    };
    let fetched = match fetched {
        Ok(events) => events,
        Err(KvError::Compacted { compact_revision }) => {
            w.canceled = Some(WatchCancelReason::Compacted { compact_revision });
            return;
        }
        Err(other) => unreachable!("events_from only fails with Compacted: {other}"),
    };
    let complete = fetched.len() < room;
    for e in &fetched {
        if !w.try_push(cfg, e) {
            return;
        }
    }
    if complete && store.revision() == published {
        w.synced = true;
        // Nothing at or below the head is missing; live events start after it.
        if w.cursor_rev <= store.revision() {
            w.cursor_rev = store.revision() + 1;
            w.cursor_key.clear();
        }
    }
}
