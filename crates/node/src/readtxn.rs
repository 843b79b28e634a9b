//! Transactions without writes, served from the local store instead of the log.
//!
//! etcd answers a transaction whose branches hold only ranges like a range: after a read
//! barrier (unless serializable), from the member's own applied state. Going through the
//! log would cost an fsync and a quorum round for nothing: such a transaction changes no
//! key and does not bump the revision. The caller holds the store lock for the whole
//! evaluation, so every compare and every range sees one revision.
//!
//! The answers must be exactly those the state machine would give if the same transaction
//! were applied: the same shape checks (operation count, depth, empty keys), compares
//! evaluated against the current state (a missing key compares as version and revisions
//! 0, lease 0, and fails every value comparison; a ranged compare must hold for every live
//! key in the range), the same revision errors for ranges, and every header stamped with
//! the store's revision. A test checks this against `KvStore::apply`.

use concord_kv::{
    Compare, CompareResult, CompareTarget, KeyValue, KvError, KvStore, RangeRequest, RequestOp,
    ResponseHeader, ResponseOp, TxnRequest, TxnResponse, TXN_DEPTH_MAX,
};
use std::cmp::Ordering;

/// True when no branch of `req`, at any nesting level, puts or deletes. A transaction
/// nested deeper than the store allows is reported as not read-only, so it goes through
/// the log and fails there with the state machine's own error.
pub fn is_read_only(req: &TxnRequest) -> bool {
    read_only_at(req, 1)
}

fn read_only_at(req: &TxnRequest, depth: usize) -> bool {
    if depth > TXN_DEPTH_MAX {
        return false;
    }
    req.success.iter().chain(&req.failure).all(|op| match op {
        RequestOp::Range(_) => true,
        RequestOp::Put(_) | RequestOp::DeleteRange(_) => false,
        RequestOp::Txn(t) => read_only_at(t, depth + 1),
    })
}

/// Evaluates a read-only transaction against `store` at its current revision.
///
/// Panics if `req` writes (callers check [`is_read_only`] first): evaluating a write here
/// would answer success for something that never entered the log.
pub fn evaluate(store: &KvStore, req: &TxnRequest) -> Result<TxnResponse, KvError> {
    assert!(is_read_only(req), "read-only evaluation of a writing txn");
    check_shape(store, req, 1)?;
    let header = ResponseHeader {
        revision: store.revision(),
    };
    run(store, req, header)
}

/// The state-independent checks the store makes before applying a transaction.
fn check_shape(store: &KvStore, req: &TxnRequest, depth: usize) -> Result<(), KvError> {
    if depth > TXN_DEPTH_MAX {
        return Err(KvError::TxnTooDeep { max: TXN_DEPTH_MAX });
    }
    let max = store.config().txn_ops_max;
    if req.compare.len() > max || req.success.len() > max || req.failure.len() > max {
        return Err(KvError::TooManyOps { max });
    }
    if req.compare.iter().any(|c| c.key.is_empty()) {
        return Err(KvError::EmptyKey);
    }
    for op in req.success.iter().chain(&req.failure) {
        match op {
            RequestOp::Range(r) if r.key.is_empty() => return Err(KvError::EmptyKey),
            RequestOp::Txn(t) => check_shape(store, t, depth + 1)?,
            _ => {}
        }
    }
    Ok(())
}

fn run(store: &KvStore, req: &TxnRequest, header: ResponseHeader) -> Result<TxnResponse, KvError> {
    let mut ok = true;
    for c in &req.compare {
        if !compare_holds(store, c)? {
            ok = false;
            break;
        }
    }
    let branch = if ok { &req.success } else { &req.failure };
    let mut responses = Vec::with_capacity(branch.len());
    for op in branch {
        responses.push(match op {
            RequestOp::Range(r) => {
                let mut resp = store.range(r)?;
                resp.header = header;
                ResponseOp::Range(resp)
            }
            RequestOp::Txn(t) => ResponseOp::Txn(run(store, t, header)?),
            RequestOp::Put(_) | RequestOp::DeleteRange(_) => {
                unreachable!("checked read-only before evaluating")
            }
        });
    }
    Ok(TxnResponse {
        header,
        succeeded: ok,
        responses,
    })
}

fn compare_holds(store: &KvStore, c: &Compare) -> Result<bool, KvError> {
    // Only a value comparison needs the values.
    let keys_only = !matches!(c.target, CompareTarget::Value(_));
    let found = store.range(&RangeRequest {
        key: c.key.clone(),
        range_end: c.range_end.clone(),
        keys_only,
        ..Default::default()
    })?;
    if found.kvs.is_empty() {
        return Ok(compare_one(c, None));
    }
    Ok(found.kvs.iter().all(|kv| compare_one(c, Some(kv))))
}

fn compare_one(c: &Compare, kv: Option<&KeyValue>) -> bool {
    let ord: Ordering = match (&c.target, kv) {
        (CompareTarget::Value(_), None) => return false,
        (CompareTarget::Value(want), Some(kv)) => kv.value.as_slice().cmp(want.as_slice()),
        (CompareTarget::Version(want), kv) => kv.map_or(0, |kv| kv.version).cmp(want),
        (CompareTarget::CreateRevision(want), kv) => {
            kv.map_or(0, |kv| kv.create_revision).cmp(want)
        }
        (CompareTarget::ModRevision(want), kv) => kv.map_or(0, |kv| kv.mod_revision).cmp(want),
        (CompareTarget::Lease(want), kv) => kv.map_or(0, |kv| kv.lease).cmp(want),
    };
    match c.result {
        CompareResult::Equal => ord == Ordering::Equal,
        CompareResult::NotEqual => ord != Ordering::Equal,
        CompareResult::Less => ord == Ordering::Less,
        CompareResult::Greater => ord == Ordering::Greater,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use concord_kv::{Command, DeleteRangeRequest, PutRequest, ResponseBody};

    /// A small deterministic generator so the comparison covers many shapes reproducibly.
    struct Gen(u64);
    impl Gen {
        fn next(&mut self, n: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) % n
        }
        fn key(&mut self) -> Vec<u8> {
            format!("k{}", self.next(6)).into_bytes()
        }
        fn compare(&mut self) -> Compare {
            let key = self.key();
            let range_end = if self.next(4) == 0 {
                b"k9".to_vec()
            } else {
                Vec::new()
            };
            let target = match self.next(5) {
                0 => CompareTarget::Version(self.next(4) as i64),
                1 => CompareTarget::CreateRevision(self.next(12) as i64),
                2 => CompareTarget::ModRevision(self.next(12) as i64),
                3 => CompareTarget::Value(format!("v{}", self.next(4)).into_bytes()),
                _ => CompareTarget::Lease(0),
            };
            let result = match self.next(4) {
                0 => CompareResult::Equal,
                1 => CompareResult::NotEqual,
                2 => CompareResult::Less,
                _ => CompareResult::Greater,
            };
            Compare {
                key,
                range_end,
                result,
                target,
            }
        }
        fn txn(&mut self, depth: usize) -> TxnRequest {
            let branch = |g: &mut Gen| {
                (0..g.next(3))
                    .map(|_| {
                        if depth < 3 && g.next(5) == 0 {
                            RequestOp::Txn(g.txn(depth + 1))
                        } else {
                            let key = g.key();
                            RequestOp::Range(RangeRequest {
                                key,
                                range_end: if g.next(3) == 0 {
                                    b"k9".to_vec()
                                } else {
                                    Vec::new()
                                },
                                // Sometimes a future or compacted revision: both must
                                // fail the same way.
                                revision: g.next(16) as i64,
                                ..Default::default()
                            })
                        }
                    })
                    .collect()
            };
            TxnRequest {
                compare: (0..self.next(3)).map(|_| self.compare()).collect(),
                success: branch(self),
                failure: branch(self),
            }
        }
    }

    fn put(k: &[u8], v: &str) -> Command {
        Command::Put(PutRequest {
            key: k.to_vec(),
            value: v.as_bytes().to_vec(),
            ..Default::default()
        })
    }

    #[test]
    fn answers_exactly_as_applying_the_txn_would() {
        let mut store = KvStore::new();
        let mut index = 0;
        let mut g = Gen(7);
        // (errors, took success, took failure): every kind of outcome must be covered.
        let mut seen = (0, 0, 0);
        for round in 0..400 {
            // Mutate a little, sometimes compact, then compare answers.
            index += 1;
            let cmd = match g.next(6) {
                0 => Command::DeleteRange(DeleteRangeRequest {
                    key: g.key(),
                    ..Default::default()
                }),
                1 if round > 50 => Command::Compact {
                    revision: store.revision() - 3,
                },
                _ => {
                    let k = g.key();
                    put(&k, &format!("v{}", g.next(4)))
                }
            };
            store.apply(index, cmd);
            let txn = g.txn(1);
            assert!(is_read_only(&txn));
            let before = store.revision();
            let mine = evaluate(&store, &txn);
            index += 1;
            let applied = store.apply(index, Command::Txn(txn.clone()));
            assert_eq!(store.revision(), before, "a read-only txn wrote");
            let applied = applied.result.map(|b| match b {
                ResponseBody::Txn(t) => t,
                other => panic!("txn answered with {other:?}"),
            });
            match &mine {
                Err(_) => seen.0 += 1,
                Ok(t) if t.succeeded => seen.1 += 1,
                Ok(_) => seen.2 += 1,
            }
            assert_eq!(mine, applied, "round {round}: {txn:?}");
        }
        assert!(seen.0 > 20 && seen.1 > 20 && seen.2 > 20, "{seen:?}");
    }

    #[test]
    fn refuses_what_the_store_refuses_and_spots_writes() {
        let store = KvStore::new();
        let empty_key = TxnRequest {
            success: vec![RequestOp::Range(RangeRequest::default())],
            ..Default::default()
        };
        assert_eq!(evaluate(&store, &empty_key), Err(KvError::EmptyKey));
        let mut deep = TxnRequest::default();
        for _ in 0..TXN_DEPTH_MAX {
            deep = TxnRequest {
                success: vec![RequestOp::Txn(deep)],
                ..Default::default()
            };
        }
        assert!(!is_read_only(&deep), "too deep: left to the log");
        let nested_write = TxnRequest {
            failure: vec![RequestOp::Txn(TxnRequest {
                success: vec![RequestOp::Put(PutRequest {
                    key: b"a".to_vec(),
                    ..Default::default()
                })],
                ..Default::default()
            })],
            ..Default::default()
        };
        assert!(!is_read_only(&nested_write));
        assert!(is_read_only(&TxnRequest::default()));
    }
}
