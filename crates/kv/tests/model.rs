//! Model test: the store against a deliberately naive reference that keeps a full copy of
//! the keyspace for every revision. Random put/delete/txn/compact sequences are applied to
//! both; after every step, reads at random revisions, history replay, and (at the end)
//! snapshot/restore and determinism are checked.

use std::collections::BTreeMap;

use concord_kv::*;
use proptest::prelude::*;

#[derive(Clone, Debug, PartialEq)]
struct RefKv {
    value: Vec<u8>,
    create: i64,
    modr: i64,
    version: i64,
}

type State = BTreeMap<Vec<u8>, RefKv>;

/// `states[r]` is the keyspace at revision `r` (index 0 unused).
struct Model {
    states: Vec<State>,
    compact: i64,
}

fn in_range(k: &[u8], key: &[u8], end: &[u8]) -> bool {
    if end.is_empty() {
        k == key
    } else if end == [0] {
        k >= key
    } else {
        k >= key && k < end
    }
}

impl Model {
    fn new() -> Model {
        Model {
            states: vec![State::new(), State::new()],
            compact: 0,
        }
    }

    fn rev(&self) -> i64 {
        self.states.len() as i64 - 1
    }

    fn cur(&self) -> &State {
        self.states.last().unwrap()
    }

    /// Applies writes at `rev() + 1` to a copy; pushes it when something changed.
    fn write(&mut self, ops: &[Op]) {
        let rev = self.rev() + 1;
        let mut s = self.cur().clone();
        let mut changed = false;
        for op in ops {
            match op {
                Op::Put(k, v) => {
                    let (create, version) = match s.get(k) {
                        Some(old) => (old.create, old.version + 1),
                        None => (rev, 1),
                    };
                    s.insert(
                        k.clone(),
                        RefKv {
                            value: v.clone(),
                            create,
                            modr: rev,
                            version,
                        },
                    );
                    changed = true;
                }
                Op::Del(k, end) => {
                    let before = s.len();
                    s.retain(|key, _| !in_range(key, k, end));
                    changed |= s.len() != before;
                }
            }
        }
        if changed {
            self.states.push(s);
        }
    }

    fn duplicate(ops: &[Op]) -> bool {
        let mut puts = std::collections::BTreeSet::new();
        for op in ops {
            if let Op::Put(k, _) = op {
                if !puts.insert(k.clone()) {
                    return true;
                }
            }
        }
        ops.iter().any(|op| match op {
            Op::Del(k, e) => puts.iter().any(|p| in_range(p, k, e)),
            Op::Put(..) => false,
        })
    }

    fn range(&self, key: &[u8], end: &[u8], rev: i64) -> Result<Vec<KeyValue>, KvError> {
        if rev > self.rev() {
            return Err(KvError::FutureRevision {
                current_revision: self.rev(),
            });
        }
        if rev > 0 && rev < self.compact {
            return Err(KvError::Compacted {
                compact_revision: self.compact,
            });
        }
        let s = &self.states[if rev > 0 { rev } else { self.rev() } as usize];
        Ok(s.iter()
            .filter(|(k, _)| in_range(k, key, end))
            .map(|(k, v)| KeyValue {
                key: k.clone(),
                create_revision: v.create,
                mod_revision: v.modr,
                version: v.version,
                value: v.value.clone(),
                lease: 0,
            })
            .collect())
    }

    /// etcd's range options, written out the obvious way: filter, stable sort, limit.
    fn query(&self, req: &RangeRequest) -> (Vec<KeyValue>, bool, i64) {
        let all = self.range(&req.key, &req.range_end, 0).unwrap();
        let count = all.len() as i64;
        if req.count_only {
            return (vec![], false, count);
        }
        let within = |v: i64, min: i64, max: i64| (min == 0 || v >= min) && (max == 0 || v <= max);
        let mut kvs: Vec<KeyValue> = all
            .into_iter()
            .filter(|kv| {
                within(kv.mod_revision, req.min_mod_revision, req.max_mod_revision)
                    && within(
                        kv.create_revision,
                        req.min_create_revision,
                        req.max_create_revision,
                    )
            })
            .collect();
        let order = match (req.sort_order, req.sort_target) {
            (SortOrder::None, SortTarget::Key) => SortOrder::None,
            (SortOrder::None, _) => SortOrder::Ascend,
            (o, _) => o,
        };
        if order != SortOrder::None {
            let cmp = |a: &KeyValue, b: &KeyValue| match req.sort_target {
                SortTarget::Key => a.key.cmp(&b.key),
                SortTarget::Version => a.version.cmp(&b.version),
                SortTarget::Create => a.create_revision.cmp(&b.create_revision),
                SortTarget::Mod => a.mod_revision.cmp(&b.mod_revision),
                SortTarget::Value => a.value.cmp(&b.value),
            };
            if order == SortOrder::Descend {
                kvs.sort_by(|a, b| cmp(b, a));
            } else {
                kvs.sort_by(cmp);
            }
        }
        let mut more = false;
        if req.limit > 0 && kvs.len() > req.limit as usize {
            kvs.truncate(req.limit as usize);
            more = true;
        }
        if req.keys_only {
            for kv in &mut kvs {
                kv.value.clear();
            }
        }
        (kvs, more, count)
    }

    /// Events from `from` on, derived by diffing consecutive states.
    fn events(&self, key: &[u8], end: &[u8], from: i64) -> Vec<(EventKind, Vec<u8>, i64, Vec<u8>)> {
        let mut out = Vec::new();
        for r in from.max(2)..=self.rev() {
            let (a, b) = (&self.states[r as usize - 1], &self.states[r as usize]);
            let mut keys: Vec<&Vec<u8>> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                if !in_range(k, key, end) {
                    continue;
                }
                match (a.get(k), b.get(k)) {
                    (_, Some(n)) if n.modr == r => {
                        out.push((EventKind::Put, k.clone(), r, n.value.clone()))
                    }
                    (Some(_), None) => out.push((EventKind::Delete, k.clone(), r, vec![])),
                    _ => {}
                }
            }
        }
        out
    }
}

#[derive(Clone, Debug)]
enum Op {
    Put(Vec<u8>, Vec<u8>),
    Del(Vec<u8>, Vec<u8>),
}

#[derive(Clone, Debug)]
enum Step {
    Write(Op),
    Txn {
        key: Vec<u8>,
        version: i64,
        success: Vec<Op>,
        failure: Vec<Op>,
    },
    /// Compact to `rev() - back` (clamped), possibly an invalid revision.
    Compact(i64),
    /// Read `[key, end)` at `rev() - back` (0 = current).
    Read(Vec<u8>, Vec<u8>, i64),
    /// A range with options (sort, limit, filters, keys/count only) at the current revision.
    Query(RangeRequest),
}

fn query() -> impl Strategy<Value = RangeRequest> {
    let order = prop::sample::select(vec![SortOrder::None, SortOrder::Ascend, SortOrder::Descend]);
    let target = prop::sample::select(vec![
        SortTarget::Key,
        SortTarget::Version,
        SortTarget::Create,
        SortTarget::Mod,
        SortTarget::Value,
    ]);
    let filters = (0..8i64, 0..8i64, 0..8i64, 0..8i64);
    (
        key(),
        range_end(),
        0..4i64,
        order,
        target,
        any::<bool>(),
        prop::bool::weighted(0.1),
        filters,
    )
        .prop_map(
            |(key, range_end, limit, sort_order, sort_target, keys_only, count_only, f)| {
                RangeRequest {
                    key,
                    range_end,
                    limit,
                    revision: 0,
                    sort_order,
                    sort_target,
                    keys_only,
                    count_only,
                    min_mod_revision: f.0,
                    max_mod_revision: f.1,
                    min_create_revision: f.2,
                    max_create_revision: f.3,
                }
            },
        )
}

fn key() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::sample::select(vec!["a", "b", "c", "d"]).prop_map(|s| s.as_bytes().to_vec()),
        ("[a-d]", "[a-d]").prop_map(|(x, y)| format!("{x}{y}").into_bytes()),
    ]
}

fn range_end() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => Just(vec![]),
        1 => Just(vec![0]),
        2 => key(),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (key(), prop::collection::vec(any::<u8>(), 0..4)).prop_map(|(k, v)| Op::Put(k, v)),
        1 => (key(), range_end()).prop_map(|(k, e)| Op::Del(k, e)),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => op().prop_map(Step::Write),
        2 => (key(), 0..3i64, prop::collection::vec(op(), 0..4), prop::collection::vec(op(), 0..3))
            .prop_map(|(key, version, success, failure)| Step::Txn { key, version, success, failure }),
        1 => (-1..6i64).prop_map(Step::Compact),
        4 => (key(), range_end(), -1..8i64).prop_map(|(k, e, b)| Step::Read(k, e, b)),
        2 => query().prop_map(Step::Query),
    ]
}

fn to_request(op: &Op) -> RequestOp {
    match op {
        Op::Put(k, v) => RequestOp::Put(PutRequest {
            key: k.clone(),
            value: v.clone(),
            ..Default::default()
        }),
        Op::Del(k, e) => RequestOp::DeleteRange(DeleteRangeRequest {
            key: k.clone(),
            range_end: e.clone(),
            prev_kv: false,
        }),
    }
}

fn to_command(step: &Step, model_rev: i64) -> Option<Command> {
    Some(match step {
        Step::Write(Op::Put(k, v)) => Command::Put(PutRequest {
            key: k.clone(),
            value: v.clone(),
            ..Default::default()
        }),
        Step::Write(Op::Del(k, e)) => Command::DeleteRange(DeleteRangeRequest {
            key: k.clone(),
            range_end: e.clone(),
            prev_kv: false,
        }),
        Step::Txn {
            key,
            version,
            success,
            failure,
        } => Command::Txn(TxnRequest {
            compare: vec![Compare {
                key: key.clone(),
                range_end: vec![],
                result: CompareResult::Equal,
                target: CompareTarget::Version(*version),
            }],
            success: success.iter().map(to_request).collect(),
            failure: failure.iter().map(to_request).collect(),
        }),
        Step::Compact(back) => Command::Compact {
            revision: model_rev - back,
        },
        Step::Read(..) | Step::Query(..) => return None,
    })
}

fn run(steps: &[Step]) -> Result<(KvStore, Vec<Command>), TestCaseError> {
    let mut store = KvStore::new();
    let mut model = Model::new();
    let mut log = Vec::new();
    for step in steps {
        if let Step::Query(req) = step {
            let got = store.range(req).unwrap();
            let (kvs, more, count) = model.query(req);
            prop_assert_eq!(
                (got.kvs, got.more, got.count),
                (kvs, more, count),
                "{:?}",
                req
            );
            continue;
        }
        if let Step::Read(k, e, back) = step {
            let rev = if *back < 0 {
                0
            } else {
                (model.rev() - back).max(1)
            };
            let want = model.range(k, e, rev);
            let got = store
                .range(&RangeRequest {
                    key: k.clone(),
                    range_end: e.clone(),
                    revision: rev,
                    ..Default::default()
                })
                .map(|r| {
                    assert_eq!(r.count as usize, r.kvs.len());
                    r.kvs
                });
            prop_assert_eq!(got, want, "range {:?}..{:?} at {}", k, e, rev);
            // History replay from the same revision matches the model's diffs.
            if rev >= model.compact && rev > 0 {
                let got: Vec<_> = store
                    .events_since(k, e, rev, usize::MAX)
                    .unwrap()
                    .into_iter()
                    .map(|ev| (ev.kind, ev.kv.key, ev.kv.mod_revision, ev.kv.value))
                    .collect();
                prop_assert_eq!(got, model.events(k, e, rev));
            }
            continue;
        }
        let cmd = to_command(step, model.rev()).unwrap();
        log.push(cmd.clone());
        let resp = store.apply(log.len() as u64, cmd);
        match step {
            Step::Write(op) => {
                prop_assert!(resp.result.is_ok());
                model.write(std::slice::from_ref(op));
            }
            Step::Txn {
                key,
                version,
                success,
                failure,
            } => {
                if Model::duplicate(success) || Model::duplicate(failure) {
                    prop_assert_eq!(resp.result, Err(KvError::DuplicateKey));
                } else {
                    let holds = model.cur().get(key).map_or(0, |v| v.version) == *version;
                    match &resp.result {
                        Ok(ResponseBody::Txn(t)) => prop_assert_eq!(t.succeeded, holds),
                        other => prop_assert!(false, "txn answered {:?}", other),
                    }
                    model.write(if holds { success } else { failure });
                }
            }
            Step::Compact(back) => {
                let rev = model.rev() - back;
                if rev > model.rev() {
                    prop_assert!(
                        matches!(resp.result, Err(KvError::FutureRevision { .. })),
                        "compact answered {:?}",
                        resp.result
                    );
                } else if rev <= model.compact {
                    prop_assert!(
                        matches!(resp.result, Err(KvError::Compacted { .. })),
                        "compact answered {:?}",
                        resp.result
                    );
                } else {
                    prop_assert!(resp.result.is_ok());
                    model.compact = rev;
                }
            }
            Step::Read(..) | Step::Query(..) => unreachable!(),
        }
        prop_assert_eq!(store.revision(), model.rev());
        prop_assert_eq!(store.status().key_count as usize, model.cur().len());
        store.check_invariants();
    }
    Ok((store, log))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn store_matches_reference_model(steps in prop::collection::vec(step(), 1..60)) {
        run(&steps)?;
    }

    #[test]
    fn snapshot_restore_round_trips_and_replicas_agree(steps in prop::collection::vec(step(), 1..40)) {
        let (store, log) = run(&steps)?;
        let snap = store.snapshot();
        let restored = KvStore::restore(&snap).unwrap();
        prop_assert_eq!(restored.snapshot(), snap.clone());
        prop_assert_eq!(restored.status(), store.status());
        for rev in store.compact_revision().max(1)..=store.revision() {
            let req = RangeRequest { key: vec![0], range_end: vec![0], revision: rev, ..Default::default() };
            prop_assert_eq!(restored.range(&req), store.range(&req));
        }
        // A second replica applying the same log ends byte-identical.
        let mut other = KvStore::new();
        for (i, cmd) in log.into_iter().enumerate() {
            other.apply(i as u64 + 1, cmd);
        }
        prop_assert_eq!(other.snapshot(), snap);
        prop_assert_eq!(other.hash_kv(0), store.hash_kv(0));
        prop_assert_eq!(restored.hash_kv(0), store.hash_kv(0));
    }

    #[test]
    fn decode_of_random_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = Command::decode(&bytes);
        let mut framed = vec![1u8];
        framed.extend_from_slice(&bytes);
        let _ = Command::decode(&framed);
    }

    #[test]
    fn decode_of_damaged_commands_never_panics(
        steps in prop::collection::vec(step(), 1..8),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        for cmd in steps.iter().filter_map(|s| to_command(s, 5)) {
            let mut bytes = cmd.encode();
            let decoded = Command::decode(&bytes);
            prop_assert_eq!(decoded, Ok(cmd.clone()));
            for (ix, b) in &flips {
                let i = ix.index(bytes.len());
                bytes[i] ^= b;
            }
            let _ = Command::decode(&bytes);
        }
    }

    #[test]
    fn damaged_snapshots_are_rejected_not_panicked_on(
        steps in prop::collection::vec(step(), 1..20),
        ix in any::<prop::sample::Index>(),
        xor in 1..=255u8,
        cut in any::<prop::sample::Index>(),
    ) {
        let (store, _) = run(&steps)?;
        let mut snap = store.snapshot();
        let i = ix.index(snap.len());
        snap[i] ^= xor;
        let r = KvStore::restore(&snap);
        prop_assert!(matches!(r, Err(KvError::CorruptSnapshot(_))), "restore of damaged snapshot: {:?}", r.map(|s| s.status()));
        let snap = store.snapshot();
        let n = cut.index(snap.len());
        prop_assert!(KvStore::restore(&snap[..n]).is_err());
        let _ = KvStore::restore(&snap[n..]);
    }
}
