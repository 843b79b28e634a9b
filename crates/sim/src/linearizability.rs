//! A linearizability checker for the simulator's key-value histories.
//!
//! The search is Wing & Gong's (1993): repeatedly pick an operation that may take effect
//! next (one invoked before every not-yet-linearized operation returned), step a sequential
//! model with it, and backtrack when the model disagrees with the observed output. Lowe
//! ("Testing for linearizability", 2017) made it practical by memoising each visited
//! (linearized set, model state) pair so no configuration is explored twice.
//!
//! Two further reductions keep it fast:
//! - **P-compositionality**: a key-value map is linearizable iff the history restricted to
//!   each key is (Herlihy & Wing's locality), so every key is checked on its own.
//! - **Indeterminate operations** (a client timed out, so the write may or may not have
//!   happened) get a return time of infinity and accept any output: the search may place
//!   them anywhere after their invocation, or effectively never (at the very end, where they
//!   change nothing that is checked). Reads with an unknown outcome change no state and are
//!   dropped before the search.
//!
//! The search is bounded by `step_limit` expansions per key; a key that hits the limit makes
//! the verdict [`Verdict::Inconclusive`], which callers count separately from violations.

use std::collections::HashSet;
use std::hash::{BuildHasherDefault, Hasher};

/// A fast non-cryptographic hasher for the memo table (keys are bitsets we built
/// ourselves, so hash flooding is not a concern; SipHash dominated the profile).
#[derive(Clone, Copy, Default)]
pub struct FastHasher(u64);

impl Hasher for FastHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.write_u64(u64::from_le_bytes(w));
        }
        for &b in chunks.remainder() {
            self.write_u64(b as u64);
        }
    }
    fn write_u64(&mut self, x: u64) {
        self.0 = (self.0.rotate_left(5) ^ x).wrapping_mul(0x517C_C1B7_2722_0A95);
    }
    fn write_u8(&mut self, x: u8) {
        self.write_u64(x as u64);
    }
    fn write_u32(&mut self, x: u32) {
        self.write_u64(x as u64);
    }
    fn write_usize(&mut self, x: usize) {
        self.write_u64(x as u64);
    }
    fn finish(&self) -> u64 {
        // One extra mixing round so low bits (used for bucket choice) depend on all input.
        let z = self.0;
        let z = (z ^ (z >> 33)).wrapping_mul(0xFF51_AFD7_ED55_8CCD);
        z ^ (z >> 33)
    }
}

pub type FastBuild = BuildHasherDefault<FastHasher>;

/// Value `0` means "absent": puts and CAS always write non-zero values.
pub type Value = u64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvOp {
    Put {
        value: Value,
    },
    Get,
    /// Writes `new` iff the current value equals `expect` (`0` = key absent).
    Cas {
        expect: Value,
        new: Value,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvOut {
    Ok,
    Value(Value),
    Cas(bool),
}

/// One client operation on one key, with its logical invoke and return times.
///
/// Times are positions in one global event order (strictly increasing, never shared), so
/// "returned before invoked" is unambiguous.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Operation {
    pub client: u32,
    pub key: u8,
    pub op: KvOp,
    pub invoke: u64,
    /// `None` when the outcome is unknown (indeterminate).
    pub ret: Option<(u64, KvOut)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Linearizable,
    /// No order of the operations on `key` explains what the clients saw.
    Violation {
        key: u8,
        ops: usize,
        detail: String,
    },
    /// The search hit `step_limit` on `key` before deciding.
    Inconclusive {
        key: u8,
        ops: usize,
    },
}

/// Default bound on search expansions per key.
pub const DEFAULT_STEP_LIMIT: u64 = 2_000_000;

/// Steps the sequential model; `None` if `out` is impossible from `state`.
/// An unknown output (`None`) is accepted, and the operation still takes its effect.
fn step(state: Value, op: KvOp, out: Option<KvOut>) -> Option<Value> {
    match op {
        KvOp::Put { value } => match out {
            None | Some(KvOut::Ok) => Some(value),
            _ => None,
        },
        KvOp::Get => match out {
            None => Some(state),
            Some(KvOut::Value(v)) if v == state => Some(state),
            _ => None,
        },
        KvOp::Cas { expect, new } => {
            let succeeds = state == expect;
            match out {
                None => Some(if succeeds { new } else { state }),
                Some(KvOut::Cas(b)) if b == succeeds => Some(if succeeds { new } else { state }),
                _ => None,
            }
        }
    }
}

/// Checks a whole history, key by key, in key order (deterministic).
pub fn check_history(ops: &[Operation], step_limit: u64) -> Verdict {
    let mut keys: Vec<u8> = ops.iter().map(|o| o.key).collect();
    keys.sort_unstable();
    keys.dedup();
    let mut inconclusive = None;
    for key in keys {
        let per_key: Vec<&Operation> = ops
            .iter()
            .filter(|o| o.key == key)
            // A read whose outcome is unknown changes nothing and constrains nothing.
            .filter(|o| !(o.op == KvOp::Get && o.ret.is_none()))
            .collect();
        match check_key(&per_key, step_limit) {
            KeyVerdict::Ok => {}
            KeyVerdict::Bad { deepest } => {
                return Verdict::Violation {
                    key,
                    ops: per_key.len(),
                    detail: format!(
                        "no linearization of the {} operations on key {key}; the longest \
                         explainable prefix has {deepest} operations",
                        per_key.len()
                    ),
                }
            }
            KeyVerdict::Limit => {
                inconclusive.get_or_insert(Verdict::Inconclusive {
                    key,
                    ops: per_key.len(),
                });
            }
        }
    }
    inconclusive.unwrap_or(Verdict::Linearizable)
}

enum KeyVerdict {
    Ok,
    Bad { deepest: usize },
    Limit,
}

fn check_key(ops: &[&Operation], step_limit: u64) -> KeyVerdict {
    let mut ops: Vec<&Operation> = ops.to_vec();
    ops.sort_by_key(|o| o.invoke);
    let n = ops.len();
    let ret: Vec<u64> = ops
        .iter()
        .map(|o| o.ret.map_or(u64::MAX, |(t, _)| t))
        .collect();
    for (o, &r) in ops.iter().zip(&ret) {
        assert!(
            o.invoke < r,
            "operation returned before it was invoked: {o:?}"
        );
    }
    let must: Vec<bool> = ops.iter().map(|o| o.ret.is_some()).collect();
    let need = must.iter().filter(|m| **m).count();
    let words = n.div_ceil(64).max(1);

    // Depth-first search over (linearized set, state); `seen` memoises configurations.
    let mut seen: HashSet<(Vec<u64>, Value), FastBuild> = HashSet::default();
    let mut stack: Vec<(Vec<u64>, Value, usize, usize)> = vec![(vec![0; words], 0, 0, 0)];
    seen.insert((vec![0; words], 0));
    let mut steps = 0u64;
    let mut deepest = 0usize;
    let mut candidates: Vec<usize> = Vec::new();
    let is_set = |bits: &[u64], i: usize| bits[i / 64] & (1 << (i % 64)) != 0;
    while let Some((bits, state, done, depth)) = stack.pop() {
        steps += 1;
        if steps > step_limit {
            return KeyVerdict::Limit;
        }
        deepest = deepest.max(depth);
        if done == need {
            return KeyVerdict::Ok;
        }
        // An operation may go next only if it was invoked before every pending operation
        // returned; otherwise that earlier-returning operation would be ordered after it.
        let min_ret = (0..n)
            .filter(|&i| !is_set(&bits, i))
            .map(|i| ret[i])
            .min()
            .unwrap_or(u64::MAX);
        candidates.clear();
        for (i, o) in ops.iter().enumerate() {
            if o.invoke >= min_ret {
                break; // sorted by invoke: nothing later qualifies either
            }
            if !is_set(&bits, i) {
                candidates.push(i);
            }
        }
        // The stack pops the last push first: push indeterminate operations first and
        // the earliest-returning operation last, so the search first tries the order
        // most likely to succeed (real time order, lost writes late).
        candidates.sort_by_key(|&i| std::cmp::Reverse(ret[i]));
        for &i in &candidates {
            if let Some(next) = step(state, ops[i].op, ops[i].ret.map(|(_, o)| o)) {
                let mut nb = bits.clone();
                nb[i / 64] |= 1 << (i % 64);
                if seen.insert((nb.clone(), next)) {
                    stack.push((nb, next, done + must[i] as usize, depth + 1));
                }
            }
        }
    }
    KeyVerdict::Bad { deepest }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(client: u32, op: KvOp, invoke: u64, ret: u64, out: KvOut) -> Operation {
        Operation {
            client,
            key: 1,
            op,
            invoke,
            ret: Some((ret, out)),
        }
    }
    fn lost(client: u32, op: KvOp, invoke: u64) -> Operation {
        Operation {
            client,
            key: 1,
            op,
            invoke,
            ret: None,
        }
    }
    const fn put(v: u64) -> KvOp {
        KvOp::Put { value: v }
    }
    const GET: KvOp = KvOp::Get;
    fn check(ops: &[Operation]) -> Verdict {
        check_history(ops, DEFAULT_STEP_LIMIT)
    }

    #[test]
    fn sequential_history_is_linearizable() {
        let h = [
            op(1, put(5), 1, 2, KvOut::Ok),
            op(1, GET, 3, 4, KvOut::Value(5)),
            op(2, KvOp::Cas { expect: 5, new: 6 }, 5, 6, KvOut::Cas(true)),
            op(2, KvOp::Cas { expect: 5, new: 7 }, 7, 8, KvOut::Cas(false)),
            op(1, GET, 9, 10, KvOut::Value(6)),
        ];
        assert_eq!(check(&h), Verdict::Linearizable);
    }

    #[test]
    fn empty_history_and_initial_absent_read() {
        assert_eq!(check(&[]), Verdict::Linearizable);
        assert_eq!(
            check(&[op(1, GET, 1, 2, KvOut::Value(0))]),
            Verdict::Linearizable
        );
        assert!(matches!(
            check(&[op(1, GET, 1, 2, KvOut::Value(3))]),
            Verdict::Violation { .. }
        ));
    }

    #[test]
    fn concurrent_ops_may_take_effect_in_either_order() {
        // The read overlaps both writes, so it may see either value.
        let h = [
            op(1, put(1), 1, 5, KvOut::Ok),
            op(2, put(2), 2, 6, KvOut::Ok),
            op(3, GET, 3, 7, KvOut::Value(1)),
            op(3, GET, 8, 9, KvOut::Value(1)),
        ];
        assert_eq!(check(&h), Verdict::Linearizable);
    }

    #[test]
    fn stale_read_is_a_violation() {
        // put(2) returned before the read began, yet the read saw the older value.
        let h = [
            op(1, put(1), 1, 2, KvOut::Ok),
            op(1, put(2), 3, 4, KvOut::Ok),
            op(2, GET, 5, 6, KvOut::Value(1)),
        ];
        assert!(matches!(check(&h), Verdict::Violation { key: 1, .. }));
    }

    #[test]
    fn lost_acknowledged_write_is_a_violation() {
        let h = [
            op(1, put(1), 1, 2, KvOut::Ok),
            op(2, GET, 3, 4, KvOut::Value(0)),
        ];
        assert!(matches!(check(&h), Verdict::Violation { .. }));
    }

    #[test]
    fn reading_a_value_before_its_write_was_invoked_is_a_violation() {
        let h = [
            op(2, GET, 1, 2, KvOut::Value(9)),
            op(1, put(9), 3, 4, KvOut::Ok),
        ];
        assert!(matches!(check(&h), Verdict::Violation { .. }));
    }

    #[test]
    fn indeterminate_write_may_have_happened_or_not() {
        // Seen by a later read: fine.
        let seen = [
            lost(1, put(4), 1),
            op(2, GET, 5, 6, KvOut::Value(4)),
            op(2, GET, 7, 8, KvOut::Value(4)),
        ];
        assert_eq!(check(&seen), Verdict::Linearizable);
        // Never seen: also fine.
        let unseen = [lost(1, put(4), 1), op(2, GET, 5, 6, KvOut::Value(0))];
        assert_eq!(check(&unseen), Verdict::Linearizable);
        // Seen, then un-seen without another write: not fine (it took effect only once).
        let flicker = [
            lost(1, put(4), 1),
            op(2, GET, 5, 6, KvOut::Value(4)),
            op(2, GET, 7, 8, KvOut::Value(0)),
        ];
        assert!(matches!(check(&flicker), Verdict::Violation { .. }));
        // Seen before it was invoked: not fine.
        let early = [op(2, GET, 1, 2, KvOut::Value(4)), lost(1, put(4), 3)];
        assert!(matches!(check(&early), Verdict::Violation { .. }));
    }

    #[test]
    fn indeterminate_read_is_ignored_and_indeterminate_cas_takes_effect_by_the_model() {
        let h = [
            op(1, put(1), 1, 2, KvOut::Ok),
            lost(2, GET, 3),
            lost(3, KvOp::Cas { expect: 1, new: 2 }, 4),
            op(1, GET, 10, 11, KvOut::Value(2)),
        ];
        assert_eq!(check(&h), Verdict::Linearizable);
        // A CAS whose expectation cannot hold never writes, even if indeterminate.
        let h = [
            op(1, put(1), 1, 2, KvOut::Ok),
            lost(3, KvOp::Cas { expect: 7, new: 2 }, 4),
            op(1, GET, 10, 11, KvOut::Value(2)),
        ];
        assert!(matches!(check(&h), Verdict::Violation { .. }));
    }

    #[test]
    fn cas_results_must_match_the_state() {
        let h = [
            op(1, put(1), 1, 2, KvOut::Ok),
            op(2, KvOp::Cas { expect: 1, new: 3 }, 3, 4, KvOut::Cas(true)),
            op(3, KvOp::Cas { expect: 1, new: 5 }, 5, 6, KvOut::Cas(true)),
        ];
        assert!(matches!(check(&h), Verdict::Violation { .. }));
    }

    #[test]
    fn keys_are_checked_independently() {
        let mut a = op(1, put(1), 1, 2, KvOut::Ok);
        a.key = 1;
        let mut b = op(2, GET, 3, 4, KvOut::Value(0));
        b.key = 2; // key 2 was never written: absent is right
        assert_eq!(check(&[a.clone(), b]), Verdict::Linearizable);
        let mut c = op(2, GET, 3, 4, KvOut::Value(1));
        c.key = 2; // key 2 cannot see key 1's value
        assert!(matches!(check(&[a, c]), Verdict::Violation { key: 2, .. }));
    }

    #[test]
    fn many_concurrent_writes_with_a_bad_read_hit_the_limit_or_fail_never_pass() {
        // 14 fully concurrent puts and a read of a value nobody wrote: the search must
        // explore many orders; with a tiny limit it reports inconclusive, never "ok".
        let mut h: Vec<Operation> = (0..14)
            .map(|i| op(i, put(i as u64 + 1), i as u64, 100 + i as u64, KvOut::Ok))
            .collect();
        h.push(op(99, GET, 200, 201, KvOut::Value(77)));
        assert!(matches!(
            check_history(&h, 50),
            Verdict::Inconclusive { .. }
        ));
        assert!(matches!(check(&h), Verdict::Violation { .. }));
        // The same with a plausible read passes quickly thanks to memoisation.
        h.pop();
        h.push(op(99, GET, 200, 201, KvOut::Value(3)));
        assert_eq!(check(&h), Verdict::Linearizable);
    }
}
