//! Data-driven Raft scenarios, in the spirit of etcd-io/raft's `testdata/*.txt`.
//!
//! Each file in `tests/raft/` is a list of blocks:
//!
//! ```text
//! # comments
//! command arg arg
//! ----
//! expected output (one or more lines, "ok" when there is nothing to say)
//! <blank line>
//! ```
//!
//! Run with `REWRITE=1` to replace the expectations with what the code prints now; review
//! the diff like any other change. The harness owns a small in-memory "persist, send,
//! apply, advance" loop, crash-restarts nodes from what they persisted, and cuts links.
//!
//! Commands:
//! - `add-nodes N [key=value...]` starts a fresh cluster of voters 1..=N. Keys: `pre_vote`, `check_quorum`,
//!   `lease` (bool), `election`, `heartbeat`, `inflight`, `batch_entries`, `batch_bytes`,
//!   `uncommitted`, `chunk`, `bug`.
//! - `add-node ID [keys]` creates a node with an empty configuration (to be added).
//! - `campaign ID` ticks ID until its election timeout fires.
//! - `tick ID N`, `tick-all N` advance logical time (messages wait for `stabilize`).
//! - `run N`: N times, tick every node once and stabilize quietly.
//! - `propose ID DATA`, `read-index ID CTX`, `transfer ID TO`, `compact ID INDEX`.
//! - `conf-change ID add-voter N | add-learner N | remove N ...`.
//! - `stabilize [quiet]` loops ready/deliver until nothing moves, printing messages.
//! - `deliver` runs one round: every node's Ready, then the messages queued so far.
//! - `isolate ID`, `cut A B`, `heal` drop messages on links; `drop` discards the queue.
//! - `crash ID` loses everything not persisted and restarts the node from its storage.
//! - `status [ID]`, `log ID`, `applied ID`, `reads ID` print state.

use concord_consensus::raft::{Body, Message, Raft};
use concord_consensus::{
    ConfChange, ConfChangeItem, ConfState, Config, Entry, EntryKind, HardState, NodeId, ReadMode,
    ReadState, Recovered, Replica, Snapshot,
};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Write as _;
use std::path::Path;

/// What a node has made durable (survives `crash`).
#[derive(Default, Clone)]
struct Storage {
    hs: HardState,
    snapshot: Option<Snapshot>,
    entries: Vec<Entry>,
}

struct Node {
    raft: Raft,
    cfg: Config,
    initial: ConfState,
    storage: Storage,
    /// The state machine: applied Normal payloads.
    sm: Vec<String>,
    reads: Vec<ReadState>,
}

#[derive(Default)]
struct Harness {
    nodes: BTreeMap<NodeId, Node>,
    queue: VecDeque<(NodeId, NodeId, Message)>,
    cut_links: BTreeSet<(NodeId, NodeId)>,
    isolated: BTreeSet<NodeId>,
}

fn parse_config(id: NodeId, args: &[&str]) -> Result<Config, String> {
    let mut c = Config::new(id);
    c.election_ticks = 10;
    c.heartbeat_ticks = 1;
    for a in args {
        let (k, v) = a.split_once('=').ok_or(format!("bad option {a}"))?;
        let b = || v == "true";
        let n = || v.parse::<usize>().map_err(|e| format!("{k}: {e}"));
        match k {
            "pre_vote" => c.pre_vote = b(),
            "check_quorum" => c.check_quorum = b(),
            "lease" => c.read_mode = if b() { ReadMode::Lease } else { ReadMode::Safe },
            "election" => c.election_ticks = n()? as u32,
            "heartbeat" => c.heartbeat_ticks = n()? as u32,
            "inflight" => c.max_inflight_msgs = n()?,
            "batch_entries" => c.max_batch_entries = n()?,
            "batch_bytes" => c.max_batch_bytes = n()?,
            "uncommitted" => {
                c.max_uncommitted_bytes = n()?;
                c.max_entry_bytes = c.max_entry_bytes.min(c.max_uncommitted_bytes);
            }
            "chunk" => c.snapshot_chunk_bytes = n()?,
            "bug" => c.inject_bug = Some(v.to_string()),
            _ => return Err(format!("unknown option {k}")),
        }
    }
    Ok(c)
}

fn fmt_entry(e: &Entry) -> String {
    let what = match e.kind {
        EntryKind::Noop => "noop".to_string(),
        EntryKind::Normal => String::from_utf8_lossy(&e.data).into_owned(),
        EntryKind::ConfChange => match ConfChange::decode(&e.data) {
            Ok(cc) if cc.changes.is_empty() => "conf(leave-joint)".to_string(),
            Ok(cc) => {
                let items: Vec<String> = cc
                    .changes
                    .iter()
                    .map(|c| match c {
                        ConfChangeItem::AddVoter(n) => format!("+v{n}"),
                        ConfChangeItem::AddLearner(n) => format!("+l{n}"),
                        ConfChangeItem::Remove(n) => format!("-{n}"),
                    })
                    .collect();
                format!("conf({})", items.join(" "))
            }
            Err(_) => "conf(garbage)".to_string(),
        },
    };
    format!("{}@{}:{}", e.index, e.term, what)
}

fn fmt_msg(from: NodeId, to: NodeId, m: &Message) -> String {
    let t = m.term;
    let body = match &m.body {
        Body::PreVote {
            last_index,
            last_term,
        } => format!("PreVote term={t} last={last_index}@{last_term}"),
        Body::PreVoteResp { reject } => {
            format!(
                "PreVoteResp term={t} {}",
                if *reject { "reject" } else { "grant" }
            )
        }
        Body::Vote {
            last_index,
            last_term,
            transfer,
        } => format!(
            "Vote term={t} last={last_index}@{last_term}{}",
            if *transfer { " transfer" } else { "" }
        ),
        Body::VoteResp { reject } => {
            format!(
                "VoteResp term={t} {}",
                if *reject { "reject" } else { "grant" }
            )
        }
        Body::Append {
            prev_index,
            prev_term,
            entries,
            commit,
        } => {
            let es: Vec<String> = entries.iter().map(fmt_entry).collect();
            format!(
                "Append term={t} prev={prev_index}@{prev_term} commit={commit} [{}]",
                es.join(" ")
            )
        }
        Body::AppendResp {
            index,
            reject,
            hint_index,
            hint_term,
        } => {
            if *reject {
                format!("AppendResp term={t} reject index={index} hint={hint_index}@{hint_term}")
            } else {
                format!("AppendResp term={t} index={index}")
            }
        }
        Body::Heartbeat {
            commit, read_seq, ..
        } => format!("Heartbeat term={t} commit={commit} read={read_seq}"),
        Body::HeartbeatResp { read_seq, .. } => format!("HeartbeatResp term={t} read={read_seq}"),
        Body::Snapshot {
            meta,
            offset,
            data,
            done,
        } => format!(
            "Snapshot term={t} index={}@{} offset={offset} len={}{}",
            meta.index,
            meta.term,
            data.len(),
            if *done { " done" } else { "" }
        ),
        Body::SnapshotResp { index, next_offset } => {
            format!("SnapshotResp term={t} index={index} next={next_offset}")
        }
        Body::TimeoutNow => format!("TimeoutNow term={t}"),
        Body::ReadIndex { ctx } => {
            format!("ReadIndex term={t} ctx={}", String::from_utf8_lossy(ctx))
        }
        Body::ReadIndexResp { index, ctx } => format!(
            "ReadIndexResp term={t} index={index} ctx={}",
            String::from_utf8_lossy(ctx)
        ),
    };
    format!("{from}->{to} {body}")
}

impl Harness {
    fn node(&mut self, id: NodeId) -> Result<&mut Node, String> {
        self.nodes.get_mut(&id).ok_or(format!("no node {id}"))
    }

    fn add(&mut self, id: NodeId, initial: ConfState, args: &[&str]) -> Result<(), String> {
        let cfg = parse_config(id, args)?;
        let raft = Raft::create(cfg.clone(), initial.clone(), Recovered::default())
            .map_err(|e| e.to_string())?;
        self.nodes.insert(
            id,
            Node {
                raft,
                cfg,
                initial,
                storage: Storage::default(),
                sm: Vec::new(),
                reads: Vec::new(),
            },
        );
        Ok(())
    }

    /// Persist, send (queue), apply, advance: the driver loop for one node.
    fn handle_ready(&mut self, id: NodeId) -> bool {
        let n = self.nodes.get_mut(&id).expect("node exists");
        if !n.raft.has_ready() {
            return false;
        }
        let rd = n.raft.ready();
        let st = &mut n.storage;
        if let Some(s) = &rd.snapshot {
            // As LogStore::install_snapshot: keep the suffix only if the log continues from
            // the snapshot with a matching term.
            let continues = st
                .entries
                .iter()
                .any(|e| e.index == s.meta.index && e.term == s.meta.term);
            st.entries.retain(|e| continues && e.index > s.meta.index);
            st.snapshot = Some(s.clone());
            n.sm = decode_sm(&s.data);
        }
        if let Some(first) = rd.entries.first() {
            st.entries.retain(|e| e.index < first.index);
            st.entries.extend(rd.entries.iter().cloned());
        }
        if let Some(hs) = rd.hard_state {
            st.hs = hs;
        }
        for m in rd.messages {
            self.queue.push_back((id, m.to, m.msg));
        }
        for e in &rd.committed {
            if e.kind == EntryKind::Normal {
                n.sm.push(String::from_utf8_lossy(&e.data).into_owned());
            }
        }
        n.reads.extend(rd.read_states);
        n.raft.advance();
        true
    }

    fn linked(&self, from: NodeId, to: NodeId) -> bool {
        !self.isolated.contains(&from)
            && !self.isolated.contains(&to)
            && !self.cut_links.contains(&(from.min(to), from.max(to)))
    }

    fn deliver_queued(&mut self, out: &mut String, quiet: bool) -> bool {
        let batch: Vec<_> = self.queue.drain(..).collect();
        let any = !batch.is_empty();
        for (from, to, m) in batch {
            let ok = self.linked(from, to) && self.nodes.contains_key(&to);
            if !quiet {
                let _ = writeln!(
                    out,
                    "{}{}",
                    fmt_msg(from, to, &m),
                    if ok { "" } else { "  (dropped)" }
                );
            }
            if ok {
                // Round-trip through the wire encoding like a real transport.
                let bytes = Raft::encode_message(&m);
                let m = Raft::decode_message(&bytes).expect("own encoding decodes");
                self.nodes.get_mut(&to).unwrap().raft.step(from, m);
            }
        }
        any
    }

    fn round(&mut self, out: &mut String, quiet: bool) -> bool {
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        let mut any = false;
        for id in ids {
            any |= self.handle_ready(id);
        }
        any |= self.deliver_queued(out, quiet);
        any
    }

    fn crash(&mut self, id: NodeId) -> Result<(), String> {
        self.queue.retain(|(_, to, _)| *to != id);
        let n = self.node(id)?;
        let st = n.storage.clone();
        let applied = st.snapshot.as_ref().map_or(0, |s| s.meta.index);
        n.sm = st
            .snapshot
            .as_ref()
            .map_or(Vec::new(), |s| decode_sm(&s.data));
        n.reads.clear();
        let rec = Recovered {
            hard_state: st.hs,
            snapshot: st.snapshot,
            entries: st.entries,
            applied,
        };
        n.raft = Raft::create(n.cfg.clone(), n.initial.clone(), rec).map_err(|e| e.to_string())?;
        Ok(())
    }

    fn status_line(&self, id: NodeId) -> String {
        let s = self.nodes[&id].raft.status();
        let mut line = format!(
            "{id}: {:?} term={} leader={} commit={} applied={} log={}..{} voters={:?}",
            s.role,
            s.term,
            s.leader,
            s.commit,
            s.applied,
            s.first_index,
            s.last_index,
            s.conf.voters
        );
        if !s.conf.voters_outgoing.is_empty() {
            let _ = write!(line, " outgoing={:?}", s.conf.voters_outgoing);
        }
        if !s.conf.learners.is_empty() {
            let _ = write!(line, " learners={:?}", s.conf.learners);
        }
        line
    }

    fn run(&mut self, cmd: &str) -> Result<String, String> {
        let words: Vec<&str> = cmd.split_whitespace().collect();
        let arg = |i: usize| -> Result<&str, String> {
            words
                .get(i)
                .copied()
                .ok_or(format!("{cmd}: missing argument {i}"))
        };
        let num = |i: usize| -> Result<u64, String> {
            arg(i)?.parse::<u64>().map_err(|e| format!("{cmd}: {e}"))
        };
        let mut out = String::new();
        match words[0] {
            "add-nodes" => {
                // A fresh cluster: forget every node, message and cut link.
                *self = Harness::default();
                let n = num(1)?;
                let conf = ConfState::new(1..=n);
                for id in 1..=n {
                    self.add(id, conf.clone(), &words[2..])?;
                }
            }
            "add-node" => {
                let id = num(1)?;
                self.add(id, ConfState::default(), &words[2..])?;
            }
            "campaign" => {
                let id = num(1)?;
                let n = self.node(id)?;
                let term = n.raft.status().term;
                let role = n.raft.status().role;
                for i in 1..=1000 {
                    n.raft.tick();
                    let s = n.raft.status();
                    if s.role != role || s.term != term {
                        let _ = writeln!(out, "{id} timed out after {i} ticks: {:?}", s.role);
                        break;
                    }
                }
            }
            "tick" => {
                let id = num(1)?;
                let n = self.node(id)?;
                for _ in 0..num(2)? {
                    n.raft.tick();
                }
            }
            "tick-all" => {
                for _ in 0..num(1)? {
                    for n in self.nodes.values_mut() {
                        n.raft.tick();
                    }
                }
            }
            "run" => {
                // N rounds of: every node ticks once, then everything settles.
                for _ in 0..num(1)? {
                    for n in self.nodes.values_mut() {
                        n.raft.tick();
                    }
                    for _ in 0..1000 {
                        if !self.round(&mut out, true) {
                            break;
                        }
                    }
                }
            }
            "propose" => {
                let id = num(1)?;
                let data = arg(2)?.as_bytes().to_vec();
                if let Err(e) = self.node(id)?.raft.propose(data) {
                    let _ = writeln!(out, "error: {e}");
                }
            }
            "read-index" => {
                let id = num(1)?;
                let ctx = arg(2)?.as_bytes().to_vec();
                if let Err(e) = self.node(id)?.raft.read_index(ctx) {
                    let _ = writeln!(out, "error: {e}");
                }
            }
            "conf-change" => {
                let id = num(1)?;
                let mut changes = Vec::new();
                let mut i = 2;
                while i + 1 < words.len() {
                    let n = num(i + 1)?;
                    changes.push(match words[i] {
                        "add-voter" => ConfChangeItem::AddVoter(n),
                        "add-learner" => ConfChangeItem::AddLearner(n),
                        "remove" => ConfChangeItem::Remove(n),
                        w => return Err(format!("unknown change {w}")),
                    });
                    i += 2;
                }
                if let Err(e) = self
                    .node(id)?
                    .raft
                    .propose_conf_change(ConfChange { changes })
                {
                    let _ = writeln!(out, "error: {e}");
                }
            }
            "transfer" => {
                let to = num(2)?;
                self.node(num(1)?)?.raft.transfer_leader(to);
            }
            "compact" => {
                let id = num(1)?;
                let index = num(2)?;
                let n = self.node(id)?;
                // The harness's state machine: everything applied so far, as its snapshot.
                let data = n.sm.join(",").into_bytes();
                n.raft.compact(index, data);
                let s = n.raft.status();
                let _ = writeln!(out, "{id}: log={}..{}", s.first_index, s.last_index);
            }
            "stabilize" => {
                let quiet = words.get(1) == Some(&"quiet");
                for _ in 0..1000 {
                    if !self.round(&mut out, quiet) {
                        break;
                    }
                }
            }
            "deliver" => {
                self.round(&mut out, false);
            }
            "isolate" => {
                self.isolated.insert(num(1)?);
            }
            "cut" => {
                let (a, b) = (num(1)?, num(2)?);
                self.cut_links.insert((a.min(b), a.max(b)));
            }
            "heal" => {
                self.isolated.clear();
                self.cut_links.clear();
            }
            "drop" => self.queue.clear(),
            "crash" => self.crash(num(1)?)?,
            "status" => {
                let ids: Vec<NodeId> = match words.get(1) {
                    Some(_) => vec![num(1)?],
                    None => self.nodes.keys().copied().collect(),
                };
                for id in ids {
                    let _ = writeln!(out, "{}", self.status_line(id));
                }
            }
            "log" => {
                let id = num(1)?;
                let r = &self.node(id)?.raft;
                let s = r.status();
                let es: Vec<String> = r
                    .log_entries(s.first_index, s.last_index)
                    .iter()
                    .map(fmt_entry)
                    .collect();
                let _ = writeln!(out, "{id}: commit={} [{}]", s.commit, es.join(" "));
            }
            "applied" => {
                let id = num(1)?;
                let n = self.node(id)?;
                let _ = writeln!(out, "{id}: [{}]", n.sm.join(" "));
            }
            "reads" => {
                let id = num(1)?;
                let n = self.node(id)?;
                let rs: Vec<String> = n
                    .reads
                    .iter()
                    .map(|r| format!("{}@{}", String::from_utf8_lossy(&r.ctx), r.index))
                    .collect();
                let _ = writeln!(out, "{id}: [{}]", rs.join(" "));
            }
            other => return Err(format!("unknown command {other}")),
        }
        Ok(out)
    }
}

fn decode_sm(data: &[u8]) -> Vec<String> {
    let s = String::from_utf8_lossy(data);
    if s.is_empty() {
        Vec::new()
    } else {
        s.split(',').map(str::to_string).collect()
    }
}

/// Runs one script; returns the rewritten text and whether it matched.
fn run_file(text: &str) -> (String, bool) {
    let mut h = Harness::default();
    let mut out = String::new();
    let mut ok = true;
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        if line.trim().is_empty() || line.starts_with('#') {
            out.push_str(line);
            out.push('\n');
            continue;
        }
        let cmd = line.trim();
        // Expected output: after "----", up to a blank line.
        let mut expected = Vec::new();
        if lines.peek() == Some(&"----") {
            lines.next();
            while let Some(l) = lines.next_if(|l| !l.trim().is_empty()) {
                expected.push(l.to_string());
            }
        }
        let actual = match h.run(cmd) {
            Ok(s) if s.is_empty() => "ok\n".to_string(),
            Ok(s) => s,
            Err(e) => format!("harness error: {e}\n"),
        };
        let actual_lines: Vec<String> = actual.lines().map(str::to_string).collect();
        if actual_lines != expected {
            ok = false;
            eprintln!(
                "--- command `{cmd}`\n--- expected:\n{}\n--- actual:\n{}",
                expected.join("\n"),
                actual_lines.join("\n")
            );
        }
        let _ = write!(out, "{cmd}\n----\n{actual}");
        if lines.peek().is_some_and(|l| !l.trim().is_empty()) {
            out.push('\n');
        }
    }
    (out, ok)
}

#[test]
fn raft_scenarios() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/raft");
    let rewrite = std::env::var_os("REWRITE").is_some();
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("tests/raft exists")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "txt"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no scenarios found in {}", dir.display());
    let mut failed = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).expect("readable scenario");
        let (new_text, ok) = run_file(&text);
        if rewrite {
            std::fs::write(&f, new_text).expect("writable scenario");
        } else if !ok {
            failed.push(f.display().to_string());
        }
    }
    assert!(
        failed.is_empty(),
        "scenarios differ (rerun with REWRITE=1 and review the diff): {failed:?}"
    );
}
