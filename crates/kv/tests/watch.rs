//! Watch hub: live delivery, history catch-up, filters, bounded queues, compaction.

use concord_kv::*;
use proptest::prelude::*;

struct Node {
    store: KvStore,
    hub: WatchHub,
    index: u64,
}

impl Node {
    fn new(cfg: WatchConfig) -> Node {
        let store = KvStore::new();
        let hub = WatchHub::new(cfg, &store);
        Node {
            store,
            hub,
            index: 0,
        }
    }

    /// Apply and publish, as the runtime does.
    fn apply(&mut self, cmd: Command) -> Vec<WatchId> {
        self.index += 1;
        let resp = self.store.apply(self.index, cmd);
        self.hub.publish(&self.store, &resp.events)
    }

    /// Apply without publishing (a runtime bug or a replaced store).
    fn apply_silently(&mut self, cmd: Command) {
        self.index += 1;
        self.store.apply(self.index, cmd);
    }

    fn put(&mut self, k: &str, v: &str) -> Vec<WatchId> {
        self.apply(put(k, v))
    }

    fn watch(&mut self, req: WatchRequest) -> Result<WatchId, KvError> {
        self.hub.watch(&self.store, req)
    }

    /// Polls until the watcher reports nothing more, collecting everything.
    fn drain(&mut self, id: WatchId) -> (Vec<Event>, Option<WatchCancelReason>) {
        let mut all = Vec::new();
        for _ in 0..10_000 {
            let p = self.hub.poll(&self.store, id, 3).unwrap();
            all.extend(p.events);
            if p.canceled.is_some() {
                return (all, p.canceled);
            }
            if !p.more {
                return (all, None);
            }
        }
        panic!("watcher {id} never drained");
    }
}

fn put(k: &str, v: &str) -> Command {
    Command::Put(PutRequest {
        key: k.into(),
        value: v.into(),
        ..Default::default()
    })
}

fn del(k: &str) -> Command {
    Command::DeleteRange(DeleteRangeRequest {
        key: k.into(),
        ..Default::default()
    })
}

fn wreq(k: &str, end: &str, start: Revision) -> WatchRequest {
    WatchRequest {
        key: k.into(),
        range_end: end.into(),
        start_revision: start,
        ..Default::default()
    }
}

fn summary(events: &[Event]) -> Vec<(EventKind, String, Revision)> {
    events
        .iter()
        .map(|e| {
            (
                e.kind,
                String::from_utf8(e.kv.key.clone()).unwrap(),
                e.revision(),
            )
        })
        .collect()
}

#[test]
fn live_events_reach_a_synced_watcher() {
    let mut n = Node::new(WatchConfig::default());
    n.put("x", "0"); // rev 2, before the watch
    let id = n.watch(wreq("a", "", 0)).unwrap();
    // The first poll finds no history after now and syncs the watcher.
    let p = n.hub.poll(&n.store, id, 10).unwrap();
    assert!(p.events.is_empty() && !p.more);
    assert_eq!(n.hub.is_synced(id), Some(true));
    assert_eq!(n.put("a", "1"), vec![id]);
    assert!(n.put("b", "1").is_empty(), "not in range, not woken");
    n.apply(del("a"));
    let (ev, _) = n.drain(id);
    assert_eq!(
        summary(&ev),
        vec![
            (EventKind::Put, "a".into(), 3),
            (EventKind::Delete, "a".into(), 5)
        ]
    );
    assert!(
        ev.iter().all(|e| e.prev_kv.is_none()),
        "prev_kv not asked for"
    );
}

#[test]
fn prev_kv_and_filters() {
    let mut n = Node::new(WatchConfig::default());
    let with_prev = n
        .watch(WatchRequest {
            prev_kv: true,
            ..wreq("a", "", 0)
        })
        .unwrap();
    let no_put = n
        .watch(WatchRequest {
            no_put: true,
            ..wreq("a", "", 0)
        })
        .unwrap();
    let no_delete = n
        .watch(WatchRequest {
            no_delete: true,
            ..wreq("a", "", 0)
        })
        .unwrap();
    for id in [with_prev, no_put, no_delete] {
        n.drain(id);
    }
    n.put("a", "1");
    n.put("a", "2");
    n.apply(del("a"));
    let (ev, _) = n.drain(with_prev);
    assert_eq!(ev.len(), 3);
    assert!(ev[0].prev_kv.is_none());
    assert_eq!(ev[1].prev_kv.as_ref().unwrap().value, b"1");
    assert_eq!(ev[2].prev_kv.as_ref().unwrap().value, b"2");
    let (ev, _) = n.drain(no_put);
    assert_eq!(summary(&ev), vec![(EventKind::Delete, "a".into(), 4)]);
    let (ev, _) = n.drain(no_delete);
    assert_eq!(ev.len(), 2);
    assert!(ev.iter().all(|e| e.kind == EventKind::Put));
}

#[test]
fn history_then_live_without_gaps_or_duplicates() {
    let mut n = Node::new(WatchConfig::default());
    for i in 0..5 {
        n.put("k", &i.to_string()); // revs 2..=6
    }
    let id = n.watch(wreq("k", "", 3)).unwrap();
    n.put("k", "live1"); // rev 7, published while the watcher still lags
    let (ev, _) = n.drain(id);
    let revs: Vec<_> = ev.iter().map(Event::revision).collect();
    assert_eq!(revs, vec![3, 4, 5, 6, 7]);
    n.put("k", "live2");
    let (ev, _) = n.drain(id);
    assert_eq!(summary(&ev), vec![(EventKind::Put, "k".into(), 8)]);
}

#[test]
fn full_queue_turns_the_watcher_lagging_and_it_catches_up() {
    let cfg = WatchConfig {
        queue_events_max: 4,
        ..WatchConfig::default()
    };
    let mut n = Node::new(cfg);
    let id = n.watch(wreq("a", "\0", 0)).unwrap();
    n.drain(id);
    for i in 0..10 {
        n.put(&format!("k{i}"), "v");
    }
    assert_eq!(n.hub.is_synced(id), Some(false), "overflowed");
    let (ev, canceled) = n.drain(id);
    assert!(canceled.is_none());
    let revs: Vec<_> = ev.iter().map(Event::revision).collect();
    assert_eq!(revs, (2..12).collect::<Vec<_>>());
    assert_eq!(n.hub.is_synced(id), Some(true));
}

#[test]
fn one_revision_larger_than_the_queue_is_delivered_whole() {
    let cfg = WatchConfig {
        queue_events_max: 3,
        ..WatchConfig::default()
    };
    let mut n = Node::new(cfg);
    let id = n.watch(wreq("a", "\0", 0)).unwrap();
    n.drain(id);
    let ops = (0..10)
        .map(|i| {
            RequestOp::Put(PutRequest {
                key: format!("k{i}").into_bytes(),
                value: b"v".to_vec(),
                ..Default::default()
            })
        })
        .collect();
    n.apply(Command::Txn(TxnRequest {
        compare: vec![],
        success: ops,
        failure: vec![],
    }));
    let (ev, _) = n.drain(id);
    let keys: Vec<_> = summary(&ev).into_iter().map(|(_, k, r)| (k, r)).collect();
    let want: Vec<_> = (0..10).map(|i| (format!("k{i}"), 2)).collect();
    assert_eq!(keys, want);
}

#[test]
fn byte_limit_also_bounds_the_queue() {
    let cfg = WatchConfig {
        queue_bytes_max: 100,
        ..WatchConfig::default()
    };
    let mut n = Node::new(cfg);
    let id = n.watch(wreq("a", "\0", 0)).unwrap();
    n.drain(id);
    let big = "x".repeat(60);
    n.put("a", &big);
    n.put("b", &big);
    assert_eq!(n.hub.is_synced(id), Some(false));
    let (ev, _) = n.drain(id);
    assert_eq!(ev.len(), 2);
}

#[test]
fn watch_from_a_compacted_revision_fails_with_the_compact_revision() {
    let mut n = Node::new(WatchConfig::default());
    for i in 0..5 {
        n.put("k", &i.to_string());
    }
    n.apply(Command::Compact { revision: 4 });
    assert_eq!(
        n.watch(wreq("k", "", 3)),
        Err(KvError::Compacted {
            compact_revision: 4
        })
    );
    // Watching from exactly the compact revision works (etcd clients retry from it).
    let id = n.watch(wreq("k", "", 4)).unwrap();
    let (ev, _) = n.drain(id);
    assert_eq!(ev.first().map(Event::revision), Some(4));
}

#[test]
fn a_lagging_watcher_overtaken_by_compaction_is_cancelled() {
    let cfg = WatchConfig {
        queue_events_max: 2,
        // No recent-event buffer: catch-up must read store history, which is compacted.
        recent_events_max: 0,
        ..WatchConfig::default()
    };
    let mut n = Node::new(cfg);
    let id = n.watch(wreq("k", "", 0)).unwrap();
    n.drain(id);
    for i in 0..6 {
        n.put("k", &i.to_string()); // revs 2..=7
    }
    n.apply(Command::Compact { revision: 7 });
    let (ev, canceled) = n.drain(id);
    assert_eq!(
        ev.len(),
        2,
        "what was queued before the overflow is still delivered"
    );
    assert_eq!(
        canceled,
        Some(WatchCancelReason::Compacted {
            compact_revision: 7
        })
    );
    assert_eq!(n.hub.watcher_count(), 0);
    assert_eq!(
        n.hub.poll(&n.store, id, 1),
        Err(KvError::WatchNotFound { id })
    );
}

#[test]
fn recent_events_carry_a_small_lag_across_compaction() {
    let cfg = WatchConfig {
        queue_events_max: 2,
        ..WatchConfig::default()
    };
    let mut n = Node::new(cfg);
    let id = n.watch(wreq("k", "", 0)).unwrap();
    n.drain(id);
    for i in 0..6 {
        n.put("k", &i.to_string()); // revs 2..=7
    }
    n.apply(Command::Compact { revision: 7 });
    let (ev, canceled) = n.drain(id);
    assert!(canceled.is_none());
    let revs: Vec<_> = ev.iter().map(Event::revision).collect();
    assert_eq!(revs, (2..=7).collect::<Vec<_>>());
}

#[test]
fn unpublished_revisions_are_replayed_from_history() {
    let mut n = Node::new(WatchConfig::default());
    let id = n.watch(wreq("a", "\0", 0)).unwrap();
    n.drain(id);
    n.apply_silently(put("a", "1"));
    // A new watcher cannot finish catching up while the store is ahead of what was
    // published: it says so instead of asking to be polled in a loop...
    let late = n.watch(wreq("a", "\0", 0)).unwrap();
    let p = n.hub.poll(&n.store, late, 10).unwrap();
    assert!(p.events.is_empty() && !p.more);
    // ...and the next publish wakes it, together with the watcher that missed revision 2.
    let ready = n.put("b", "1");
    assert!(ready.contains(&late) && ready.contains(&id), "{ready:?}");
    let (ev, _) = n.drain(late);
    assert_eq!(summary(&ev), vec![(EventKind::Put, "b".into(), 3)]);
    let (ev, _) = n.drain(id);
    assert_eq!(
        summary(&ev),
        vec![
            (EventKind::Put, "a".into(), 2),
            (EventKind::Put, "b".into(), 3)
        ]
    );
}

#[test]
fn restore_resets_watchers_to_replay() {
    let mut n = Node::new(WatchConfig::default());
    let id = n.watch(wreq("a", "\0", 0)).unwrap();
    n.drain(id);
    let mut other = KvStore::new();
    other.apply(1, put("a", "1"));
    other.apply(2, put("b", "1"));
    n.store = KvStore::restore(&other.snapshot()).unwrap();
    n.hub.reset(&n.store);
    let (ev, _) = n.drain(id);
    assert_eq!(ev.len(), 2);
}

#[test]
fn watcher_limit_cancel_and_empty_key() {
    let cfg = WatchConfig {
        watchers_max: 2,
        ..WatchConfig::default()
    };
    let mut n = Node::new(cfg);
    let a = n.watch(wreq("a", "", 0)).unwrap();
    n.watch(wreq("b", "", 0)).unwrap();
    assert_eq!(
        n.watch(wreq("c", "", 0)),
        Err(KvError::TooManyWatchers { max: 2 })
    );
    n.hub.cancel(a).unwrap();
    assert_eq!(n.hub.cancel(a), Err(KvError::WatchNotFound { id: a }));
    n.watch(wreq("c", "", 0)).unwrap();
    assert_eq!(n.watch(wreq("", "", 0)), Err(KvError::EmptyKey));
}

#[derive(Clone, Debug)]
enum Act {
    Put(u8),
    Del(u8),
    Txn(Vec<u8>),
    Poll(usize, usize),
    Watch(u8, u8, i64),
    Compact,
}

fn act() -> impl Strategy<Value = Act> {
    prop_oneof![
        4 => (0..6u8).prop_map(Act::Put),
        1 => (0..6u8).prop_map(Act::Del),
        1 => prop::collection::btree_set(0..6u8, 1..5).prop_map(|s| Act::Txn(s.into_iter().collect())),
        4 => (0..4usize, 1..5usize).prop_map(|(w, n)| Act::Poll(w, n)),
        1 => (0..6u8, 0..3u8, 0..6i64).prop_map(|(k, span, back)| Act::Watch(k, span, back)),
        1 => Just(Act::Compact),
    ]
}

fn k(i: u8) -> String {
    format!("k{i}")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Whatever the interleaving of writes, polls and overflows, each watcher receives
    /// exactly the history of its range from its start revision: in order, no gaps, no
    /// duplicates (or it is cancelled because compaction overtook it).
    #[test]
    fn every_watcher_sees_exactly_its_history(
        acts in prop::collection::vec(act(), 1..80),
        qmax in 1..5usize,
        recent in prop_oneof![Just(0usize), 1..8usize, Just(4096usize)],
    ) {
        // `recent` 0 forces every catch-up through store history; 4096 through the hub's
        // recent-event suffix; small values mix the two.
        let cfg = WatchConfig { queue_events_max: qmax, recent_events_max: recent, ..WatchConfig::default() };
        let mut n = Node::new(cfg);
        // (id, key, range_end, start revision, received, cancelled)
        let mut watchers: Vec<(WatchId, String, String, Revision, Vec<Event>, bool)> = Vec::new();
        let mut n_log: Vec<Command> = Vec::new();
        for a in acts {
            match a {
                Act::Put(i) => { n_log.push(put(&k(i), "v")); n.put(&k(i), "v"); }
                Act::Del(i) => { n_log.push(del(&k(i))); n.apply(del(&k(i))); }
                Act::Txn(keys) => {
                    let ops = keys.iter().map(|&i| RequestOp::Put(PutRequest {
                        key: k(i).into_bytes(), value: b"t".to_vec(), ..Default::default()
                    })).collect();
                    let cmd = Command::Txn(TxnRequest { compare: vec![], success: ops, failure: vec![] });
                    n_log.push(cmd.clone());
                    n.apply(cmd);
                }
                Act::Poll(w, max) => {
                    if let Some(entry) = watchers.get_mut(w) {
                        if !entry.5 {
                            let p = n.hub.poll(&n.store, entry.0, max).unwrap();
                            prop_assert!(p.events.len() <= max);
                            entry.4.extend(p.events);
                            entry.5 = p.canceled.is_some();
                        }
                    }
                }
                Act::Watch(key, span, back) => {
                    let end = if span == 0 { String::new() } else { k(key + span) };
                    let start = (n.store.revision() - back).max(1);
                    if let Ok(id) = n.watch(wreq(&k(key), &end, start)) {
                        watchers.push((id, k(key), end, start, Vec::new(), false));
                    }
                }
                Act::Compact => {
                    // Compact to a few revisions back, sometimes overtaking lagging watchers.
                    let rev = n.store.revision() - 2;
                    n.apply(Command::Compact { revision: rev });
                }
            }
        }
        for entry in watchers.iter_mut() {
            if entry.5 { continue; }
            let (more, canceled) = n.drain(entry.0);
            entry.4.extend(more);
            entry.5 = canceled.is_some();
        }
        // The reference is a replica that applied the same writes but never compacted
        // (compaction does not change revisions), so its history is complete.
        let mut reference = KvStore::new();
        for (i, cmd) in n_log.iter().enumerate() {
            reference.apply(i as u64 + 1, cmd.clone());
        }
        prop_assert_eq!(reference.revision(), n.store.revision());
        for (id, key, end, start, got, cancelled) in &watchers {
            let got: Vec<_> = got.iter().map(|e| (e.revision(), e.kv.key.clone(), e.kind)).collect();
            let want: Vec<_> = reference
                .events_since(key.as_bytes(), end.as_bytes(), *start, usize::MAX)
                .unwrap()
                .into_iter()
                .map(|e| (e.revision(), e.kv.key, e.kind))
                .collect();
            if *cancelled {
                prop_assert!(want.starts_with(&got), "cancelled watcher {} got a non-prefix", id);
            } else {
                prop_assert_eq!(&got, &want, "watcher {} from {}", id, start);
            }
        }
    }
}
