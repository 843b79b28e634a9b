//! Leases against a reference model: random grants, keep-alives, revocations, expiries,
//! leader changes and puts/deletes on leased keys, with leader time moving forward.

use std::collections::BTreeMap;

use concord_kv::*;
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Act {
    Grant(LeaseId, i64),
    KeepAlive(LeaseId),
    Revoke(LeaseId),
    Expire,
    ExpireIds,
    Promote,
    Put(u8, LeaseId),
    Del(u8),
    /// Leader time moves forward by this many milliseconds.
    Tick(u64),
}

fn act() -> impl Strategy<Value = Act> {
    prop_oneof![
        2 => (1..4i64, 1..4i64).prop_map(|(id, ttl)| Act::Grant(id, ttl)),
        2 => (1..4i64).prop_map(Act::KeepAlive),
        1 => (1..4i64).prop_map(Act::Revoke),
        1 => Just(Act::Expire),
        1 => Just(Act::ExpireIds),
        1 => Just(Act::Promote),
        4 => (0..5u8, 0..4i64).prop_map(|(k, l)| Act::Put(k, l)),
        1 => (0..5u8).prop_map(Act::Del),
        3 => (0..2500u64).prop_map(Act::Tick),
    ]
}

#[derive(Default)]
struct Model {
    /// id -> (ttl_secs, deadline_ms)
    leases: BTreeMap<LeaseId, (i64, u64)>,
    /// key -> lease
    keys: BTreeMap<Vec<u8>, LeaseId>,
    rev: i64,
}

impl Model {
    fn revoke(&mut self, id: LeaseId) {
        self.leases.remove(&id);
        let before = self.keys.len();
        self.keys.retain(|_, l| *l != id);
        if self.keys.len() != before {
            self.rev += 1;
        }
    }

    fn expire(&mut self, now: u64, ids: &[LeaseId]) -> Vec<LeaseId> {
        let mut out = Vec::new();
        for &id in ids {
            if self.leases.get(&id).is_some_and(|&(_, d)| d <= now) {
                self.revoke(id);
                out.push(id);
            }
        }
        out
    }

    /// Due leases, earliest deadline first (ties by id), as `expired_leases` orders them.
    fn due(&self, now: u64) -> Vec<LeaseId> {
        let mut v: Vec<(u64, LeaseId)> = self
            .leases
            .iter()
            .filter(|(_, &(_, d))| d <= now)
            .map(|(&id, &(_, d))| (d, id))
            .collect();
        v.sort();
        v.into_iter().map(|(_, id)| id).collect()
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn leases_match_model(acts in prop::collection::vec(act(), 1..80)) {
        let mut store = KvStore::new();
        let mut m = Model { rev: 1, ..Model::default() };
        let mut now = 1_000u64;
        let mut index = 0u64;
        let mut apply = |store: &mut KvStore, cmd: Command| {
            index += 1;
            store.apply(index, cmd)
        };
        for a in acts {
            match a {
                Act::Tick(ms) => now += ms,
                Act::Grant(id, ttl) => {
                    let r = apply(&mut store, Command::LeaseGrant { id, ttl_secs: ttl, now_ms: now });
                    if let std::collections::btree_map::Entry::Vacant(e) = m.leases.entry(id) {
                        prop_assert!(r.result.is_ok());
                        e.insert((ttl, now + ttl as u64 * 1000));
                    } else {
                        prop_assert_eq!(r.result, Err(KvError::LeaseExists { id }));
                    }
                }
                Act::KeepAlive(id) => {
                    let r = apply(&mut store, Command::LeaseKeepAlive { id, now_ms: now });
                    match m.leases.get_mut(&id) {
                        Some((ttl, d)) if *d > now => {
                            prop_assert!(r.result.is_ok());
                            *d = now + *ttl as u64 * 1000;
                        }
                        _ => prop_assert_eq!(r.result, Err(KvError::LeaseNotFound { id })),
                    }
                }
                Act::Revoke(id) => {
                    let r = apply(&mut store, Command::LeaseRevoke { id });
                    if m.leases.contains_key(&id) {
                        prop_assert!(r.result.is_ok());
                        m.revoke(id);
                    } else {
                        prop_assert_eq!(r.result, Err(KvError::LeaseNotFound { id }));
                    }
                }
                Act::Expire => {
                    let r = apply(&mut store, Command::LeaseExpire { now_ms: now });
                    let due = m.due(now);
                    let want = m.expire(now, &due);
                    match r.result {
                        Ok(ResponseBody::LeaseExpire(e)) => prop_assert_eq!(e.expired, want),
                        other => prop_assert!(false, "expire answered {:?}", other),
                    }
                }
                Act::ExpireIds => {
                    // The leader's view, proposed a little later than it was taken: a
                    // keep-alive in between must win.
                    let ids = store.expired_leases(now);
                    prop_assert_eq!(&ids, &m.due(now));
                    let r = apply(&mut store, Command::LeaseExpireIds { ids: ids.clone(), now_ms: now });
                    let want = m.expire(now, &ids);
                    match r.result {
                        Ok(ResponseBody::LeaseExpire(e)) => prop_assert_eq!(e.expired, want),
                        other => prop_assert!(false, "expire answered {:?}", other),
                    }
                }
                Act::Promote => {
                    apply(&mut store, Command::LeasePromote { now_ms: now }).result.unwrap();
                    for (ttl, d) in m.leases.values_mut() {
                        *d = now + *ttl as u64 * 1000;
                    }
                }
                Act::Put(k, lease) => {
                    let key = vec![b'k', k];
                    let r = apply(&mut store, Command::Put(PutRequest { key: key.clone(), value: b"v".to_vec(), lease, ..Default::default() }));
                    if lease == 0 || m.leases.contains_key(&lease) {
                        prop_assert!(r.result.is_ok());
                        m.keys.insert(key, lease);
                        m.rev += 1;
                    } else {
                        prop_assert_eq!(r.result, Err(KvError::LeaseNotFound { id: lease }));
                    }
                }
                Act::Del(k) => {
                    let key = vec![b'k', k];
                    apply(&mut store, Command::DeleteRange(DeleteRangeRequest { key: key.clone(), ..Default::default() })).result.unwrap();
                    if m.keys.remove(&key).is_some() {
                        m.rev += 1;
                    }
                }
            }
            store.check_invariants();
            prop_assert_eq!(store.revision(), m.rev);
            prop_assert_eq!(store.lease_list(), m.leases.keys().copied().collect::<Vec<_>>());
            for (id, &(ttl, d)) in &m.leases {
                let t = store.lease_time_to_live(*id, now, true).unwrap();
                prop_assert_eq!(t.granted_ttl_secs, ttl);
                prop_assert_eq!(t.ttl_secs, (d.saturating_sub(now)).div_ceil(1000) as i64);
                let want: Vec<Vec<u8>> = m.keys.iter().filter(|(_, l)| **l == *id).map(|(k, _)| k.clone()).collect();
                prop_assert_eq!(t.keys, want);
            }
            for k in 0..5u8 {
                let key = vec![b'k', k];
                prop_assert_eq!(store.get(&key).map(|kv| kv.lease), m.keys.get(&key).copied());
            }
        }
        let restored = KvStore::restore(&store.snapshot()).unwrap();
        prop_assert_eq!(restored.lease_list(), store.lease_list());
        prop_assert_eq!(restored.expired_leases(now), store.expired_leases(now));
        prop_assert_eq!(restored.snapshot(), store.snapshot());
    }
}
