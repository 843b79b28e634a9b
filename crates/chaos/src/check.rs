//! The checks run after healing. Pure functions over recorded histories, so each one is
//! unit-tested with a planted problem (a lost write, a watch gap, a stale read).

use concord_sim::linearizability::{check_history, KvOp, KvOut, Operation, Verdict};
use std::collections::{BTreeMap, BTreeSet};

/// How an operation ended, as the client saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Acknowledged with a result.
    Ok,
    /// Definitely had no effect (a read that failed).
    Fail,
    /// Unknown: timed out or failed in a way that may have taken effect.
    Info,
}

impl Status {
    pub fn name(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Fail => "fail",
            Status::Info => "info",
        }
    }
}

/// One register operation (get / put / compare-and-set on key `r/<key>`).
#[derive(Clone, Debug)]
pub struct RegOp {
    pub client: u32,
    pub node: usize,
    pub key: u8,
    pub op: KvOp,
    /// Logical times from one counter shared by all clients: strictly increasing, so
    /// "returned before invoked" is exact.
    pub invoke: u64,
    pub ret: u64,
    pub status: Status,
    pub out: Option<KvOut>,
    pub error: Option<String>,
}

impl RegOp {
    pub fn to_json(&self) -> serde_json::Value {
        let (op, a, b) = match self.op {
            KvOp::Get => ("get", None, None),
            KvOp::Put { value } => ("put", Some(value), None),
            KvOp::Cas { expect, new } => ("cas", Some(expect), Some(new)),
        };
        let out = match self.out {
            None => serde_json::Value::Null,
            Some(KvOut::Ok) => serde_json::json!("ok"),
            Some(KvOut::Value(v)) => serde_json::json!(v),
            Some(KvOut::Cas(b)) => serde_json::json!(b),
        };
        serde_json::json!({
            "client": self.client, "node": self.node, "key": self.key, "op": op,
            "arg": a, "new": b, "invoke": self.invoke, "ret": self.ret,
            "status": self.status.name(), "out": out, "error": self.error,
        })
    }
}

/// The checker's view of a register history: acknowledged operations with their outputs,
/// indeterminate writes with no return (they may take effect any time after invocation),
/// failed reads left out (they had no effect and returned nothing).
pub fn to_operations(ops: &[RegOp]) -> Vec<Operation> {
    ops.iter()
        .filter_map(|o| {
            let ret = match (o.status, o.out) {
                (Status::Ok, Some(out)) => Some((o.ret, out)),
                (Status::Fail, _) if o.op == KvOp::Get => return None,
                _ => None,
            };
            Some(Operation {
                client: o.client,
                key: o.key,
                op: o.op,
                invoke: o.invoke,
                ret,
            })
        })
        .collect()
}

/// Checks the register history with the simulator's Wing–Gong–Lowe checker.
pub fn check_register(ops: &[RegOp], step_limit: u64) -> Verdict {
    check_history(&to_operations(ops), step_limit)
}

/// One write of the append workload: a unique key written once with a unique value.
#[derive(Clone, Debug)]
pub struct AppendOp {
    pub client: u32,
    pub node: usize,
    pub key: String,
    pub value: String,
    pub status: Status,
    pub invoke_ms: u64,
    pub ret_ms: u64,
    pub error: Option<String>,
}

impl AppendOp {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "client": self.client, "node": self.node, "key": self.key, "value": self.value,
            "status": self.status.name(), "invoke_ms": self.invoke_ms, "ret_ms": self.ret_ms,
            "error": self.error,
        })
    }
}

/// A key as the final read saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FinalKv {
    pub value: String,
    pub mod_revision: i64,
    pub version: i64,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct AppendReport {
    pub acked: usize,
    /// Acknowledged writes missing from the final read.
    pub lost: Vec<String>,
    /// Keys whose final value differs from the one written (or written more than once).
    pub corrupt: Vec<String>,
    /// Keys present that no client ever tried to write.
    pub phantom: Vec<String>,
    /// Indeterminate writes that did take effect (allowed; reported for information).
    pub info_present: usize,
}

/// Compares every acknowledged write with the final state of the keyspace.
pub fn check_appends(ops: &[AppendOp], fin: &BTreeMap<String, FinalKv>) -> AppendReport {
    let mut r = AppendReport::default();
    let mut attempted = BTreeSet::new();
    for o in ops {
        attempted.insert(o.key.as_str());
        let got = fin.get(&o.key);
        match (o.status, got) {
            (Status::Ok, None) => r.lost.push(o.key.clone()),
            (_, Some(kv)) if kv.value != o.value || kv.version != 1 => {
                r.corrupt.push(format!(
                    "{} = {:?} version {} (wrote {:?} once)",
                    o.key, kv.value, kv.version, o.value
                ));
            }
            (Status::Info, Some(_)) => r.info_present += 1,
            _ => {}
        }
        if o.status == Status::Ok {
            r.acked += 1;
        }
    }
    for k in fin.keys() {
        if !attempted.contains(k.as_str()) {
            r.phantom.push(k.clone());
        }
    }
    r
}

/// One event as a watcher received it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchEvent {
    pub revision: i64,
    pub key: String,
    pub put: bool,
}

/// Checks that every watcher saw exactly the history the final read implies, in revision
/// order, with no gap, duplicate or reordering. `expected` is the final state's keys as put
/// events ordered by mod revision (append keys are written once and never deleted, so the
/// final state is the whole event history of the prefix). Events after the last expected
/// revision are ignored (an indeterminate write may still commit after the final read).
/// Returns one line per problem, at most one per watcher.
pub fn check_watchers(expected: &[WatchEvent], watchers: &[Vec<WatchEvent>]) -> Vec<String> {
    let last = expected.last().map_or(0, |e| e.revision);
    let mut problems = Vec::new();
    for (w, seen) in watchers.iter().enumerate() {
        if let Some(p) = seen.windows(2).find(|p| p[1].revision < p[0].revision) {
            problems.push(format!(
                "watcher {w}: revision went back from {} ({}) to {} ({})",
                p[0].revision, p[0].key, p[1].revision, p[1].key
            ));
            continue;
        }
        let upto: Vec<&WatchEvent> = seen.iter().filter(|e| e.revision <= last).collect();
        let mut i = 0;
        let mut problem = None;
        while i < expected.len().max(upto.len()) {
            match (expected.get(i), upto.get(i)) {
                (Some(e), Some(g)) if e == *g => {}
                (Some(e), Some(g)) if g.revision > e.revision => {
                    problem = Some(format!(
                        "gap: missed revision {} ({}) and went on at {} ({})",
                        e.revision, e.key, g.revision, g.key
                    ));
                }
                (Some(e), Some(g)) => {
                    problem = Some(format!(
                        "at position {i} expected revision {} ({}), got {} ({}{})",
                        e.revision,
                        e.key,
                        g.revision,
                        g.key,
                        if g.put { "" } else { ", delete" }
                    ));
                }
                (Some(e), None) => {
                    problem = Some(format!(
                        "stopped after {i} of {} events; first missing revision {} ({})",
                        expected.len(),
                        e.revision,
                        e.key
                    ));
                }
                (None, Some(g)) => {
                    problem = Some(format!(
                        "extra event at revision {} ({}) not in the final state",
                        g.revision, g.key
                    ));
                }
                (None, None) => unreachable!("loop bound"),
            }
            if problem.is_some() {
                break;
            }
            i += 1;
        }
        if let Some(p) = problem {
            problems.push(format!("watcher {w}: {p}"));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(
        client: u32,
        op: KvOp,
        invoke: u64,
        ret: u64,
        status: Status,
        out: Option<KvOut>,
    ) -> RegOp {
        RegOp {
            client,
            node: 0,
            key: 0,
            op,
            invoke,
            ret,
            status,
            out,
            error: None,
        }
    }

    #[test]
    fn register_checker_accepts_a_good_history_and_catches_a_stale_read() {
        let good = vec![
            reg(0, KvOp::Put { value: 1 }, 1, 2, Status::Ok, Some(KvOut::Ok)),
            reg(1, KvOp::Get, 3, 4, Status::Ok, Some(KvOut::Value(1))),
            reg(0, KvOp::Cas { expect: 1, new: 2 }, 5, 8, Status::Info, None),
            reg(1, KvOp::Get, 6, 7, Status::Fail, None),
            reg(1, KvOp::Get, 9, 10, Status::Ok, Some(KvOut::Value(2))),
        ];
        assert_eq!(check_register(&good, 100_000), Verdict::Linearizable);
        // Planted: after the put of 2 was acknowledged, a later read still sees 1.
        let stale = vec![
            reg(0, KvOp::Put { value: 1 }, 1, 2, Status::Ok, Some(KvOut::Ok)),
            reg(0, KvOp::Put { value: 2 }, 3, 4, Status::Ok, Some(KvOut::Ok)),
            reg(1, KvOp::Get, 5, 6, Status::Ok, Some(KvOut::Value(1))),
        ];
        assert!(matches!(
            check_register(&stale, 100_000),
            Verdict::Violation { .. }
        ));
    }

    fn app(key: &str, status: Status) -> AppendOp {
        AppendOp {
            client: 0,
            node: 0,
            key: key.into(),
            value: format!("v-{key}"),
            status,
            invoke_ms: 0,
            ret_ms: 1,
            error: None,
        }
    }

    fn kv(key: &str, rev: i64) -> (String, FinalKv) {
        (
            key.to_string(),
            FinalKv {
                value: format!("v-{key}"),
                mod_revision: rev,
                version: 1,
            },
        )
    }

    #[test]
    fn append_checker_finds_a_planted_lost_write() {
        let ops = vec![
            app("a/1", Status::Ok),
            app("a/2", Status::Ok),
            app("a/3", Status::Info),
            app("a/4", Status::Info),
        ];
        let fin: BTreeMap<_, _> = [kv("a/1", 5), kv("a/2", 6), kv("a/3", 7)].into();
        let r = check_appends(&ops, &fin);
        assert_eq!(r.acked, 2);
        assert!(r.lost.is_empty() && r.corrupt.is_empty() && r.phantom.is_empty());
        assert_eq!(r.info_present, 1);
        // Planted: the acknowledged a/2 vanished, and a key nobody wrote appeared.
        let fin: BTreeMap<_, _> = [kv("a/1", 5), kv("a/3", 7), kv("a/9", 8)].into();
        let r = check_appends(&ops, &fin);
        assert_eq!(r.lost, vec!["a/2".to_string()]);
        assert_eq!(r.phantom, vec!["a/9".to_string()]);
        // Planted: a write applied twice.
        let mut fin: BTreeMap<_, _> = [kv("a/1", 5), kv("a/2", 6)].into();
        fin.get_mut("a/2").unwrap().version = 2;
        assert_eq!(check_appends(&ops, &fin).corrupt.len(), 1);
    }

    fn ev(rev: i64, key: &str) -> WatchEvent {
        WatchEvent {
            revision: rev,
            key: key.into(),
            put: true,
        }
    }

    #[test]
    fn watch_checker_finds_gaps_reorders_and_early_stops() {
        let expected = vec![ev(2, "a"), ev(4, "b"), ev(5, "c")];
        let good = vec![ev(2, "a"), ev(4, "b"), ev(5, "c"), ev(9, "late")];
        assert!(check_watchers(&expected, &[good.clone(), good.clone()]).is_empty());
        let gap = vec![ev(2, "a"), ev(5, "c")];
        let swapped = vec![ev(4, "b"), ev(2, "a"), ev(5, "c")];
        let short = vec![ev(2, "a")];
        let dup = vec![ev(2, "a"), ev(2, "a"), ev(4, "b"), ev(5, "c")];
        let p = check_watchers(&expected, &[good, gap, swapped, short, dup]);
        assert_eq!(p.len(), 4, "{p:?}");
        assert!(p[0].starts_with("watcher 1: gap"), "{p:?}");
        assert!(p[1].contains("went back"), "{p:?}");
        assert!(p[2].contains("stopped after 1"), "{p:?}");
        assert!(p[3].starts_with("watcher 4"), "{p:?}");
    }
}
