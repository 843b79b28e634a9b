//! Unit tests of the Raft core through a tiny in-memory network. The readable scenario
//! tests live in `crates/consensus/tests/raft/*.txt`.

use super::*;
use std::collections::{BTreeSet, VecDeque};

struct Net {
    nodes: BTreeMap<NodeId, Raft>,
    applied: BTreeMap<NodeId, Vec<Entry>>,
    reads: BTreeMap<NodeId, Vec<ReadState>>,
    queue: VecDeque<(NodeId, Outgoing<Message>)>,
    cut: BTreeSet<NodeId>,
}

fn cfg(id: NodeId) -> Config {
    let mut c = Config::new(id);
    c.election_ticks = 10;
    c.heartbeat_ticks = 1;
    c
}

impl Net {
    fn new(n: u64, tweak: impl Fn(&mut Config)) -> Net {
        let conf = ConfState::new(1..=n);
        let mut nodes = BTreeMap::new();
        for id in 1..=n {
            let mut c = cfg(id);
            tweak(&mut c);
            nodes.insert(
                id,
                Raft::create(c, conf.clone(), Recovered::default()).unwrap(),
            );
        }
        Net {
            nodes,
            applied: BTreeMap::new(),
            reads: BTreeMap::new(),
            queue: VecDeque::new(),
            cut: BTreeSet::new(),
        }
    }

    fn node(&mut self, id: NodeId) -> &mut Raft {
        self.nodes.get_mut(&id).unwrap()
    }

    /// Processes readies and delivers messages until quiet (bounded).
    fn stabilize(&mut self) {
        for _ in 0..10_000 {
            let mut busy = false;
            let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
            for id in ids {
                let r = self.nodes.get_mut(&id).unwrap();
                if r.has_ready() {
                    busy = true;
                    let rd = r.ready();
                    for m in rd.messages {
                        self.queue.push_back((id, m));
                    }
                    self.applied.entry(id).or_default().extend(rd.committed);
                    self.reads.entry(id).or_default().extend(rd.read_states);
                    r.advance();
                }
            }
            while let Some((from, m)) = self.queue.pop_front() {
                busy = true;
                if self.cut.contains(&from) || self.cut.contains(&m.to) {
                    continue;
                }
                if let Some(r) = self.nodes.get_mut(&m.to) {
                    // Every message also goes through the wire encoding.
                    let bytes = Raft::encode_message(&m.msg);
                    r.step(from, Raft::decode_message(&bytes).unwrap());
                }
            }
            if !busy {
                return;
            }
        }
        panic!("network did not stabilize");
    }

    fn elect(&mut self, id: NodeId) {
        for _ in 0..100 {
            self.node(id).tick();
            self.stabilize();
            if self.node(id).status().role == Role::Leader {
                return;
            }
        }
        panic!("{id} was not elected");
    }

    fn applied_data(&self, id: NodeId) -> Vec<Vec<u8>> {
        self.applied
            .get(&id)
            .map(|v| {
                v.iter()
                    .filter(|e| e.kind == EntryKind::Normal)
                    .map(|e| e.data.clone())
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[test]
fn elects_and_replicates() {
    let mut net = Net::new(3, |_| {});
    net.elect(1);
    net.node(1).propose(b"a".to_vec()).unwrap();
    net.node(1).propose(b"b".to_vec()).unwrap();
    net.stabilize();
    // Followers learn the commit index from the next append or heartbeat.
    net.node(1).tick();
    net.stabilize();
    for id in 1..=3 {
        assert_eq!(
            net.applied_data(id),
            vec![b"a".to_vec(), b"b".to_vec()],
            "node {id}"
        );
        assert_eq!(net.node(id).status().commit, 3);
    }
    assert_eq!(
        net.node(2).propose(b"x".to_vec()),
        Err(ProposeError::NotLeader { leader: 1 })
    );
}

#[test]
fn single_node_commits_after_advance() {
    let mut net = Net::new(1, |_| {});
    net.elect(1);
    net.node(1).propose(b"a".to_vec()).unwrap();
    let r = net.node(1);
    let rd = r.ready();
    assert_eq!(rd.entries.len(), 1);
    assert!(rd.committed.iter().all(|e| e.kind == EntryKind::Noop));
    assert!(rd.must_sync);
    r.advance();
    // Only now is the entry durable and counted.
    let rd = r.ready();
    assert_eq!(rd.committed.len(), 1);
    assert_eq!(rd.committed[0].data, b"a".to_vec());
    r.advance();
}

#[test]
fn propose_limits() {
    let mut net = Net::new(3, |c| {
        c.max_entry_bytes = 100;
        c.max_uncommitted_bytes = 250;
    });
    net.elect(1);
    assert_eq!(
        net.node(1).propose(vec![0; 101]),
        Err(ProposeError::TooLarge {
            size: 101,
            max: 100
        })
    );
    net.cut.insert(2);
    net.cut.insert(3);
    net.node(1).propose(vec![0; 100]).unwrap();
    net.node(1).propose(vec![0; 100]).unwrap();
    assert_eq!(net.node(1).propose(vec![0; 100]), Err(ProposeError::Busy));
    net.cut.clear();
    net.stabilize();
    net.node(1).tick();
    net.stabilize();
    net.node(1).propose(vec![0; 100]).unwrap();
}

#[test]
fn read_index_on_leader_and_follower() {
    let mut net = Net::new(3, |_| {});
    net.elect(1);
    net.node(1).read_index(b"r1".to_vec()).unwrap();
    net.node(2).read_index(b"r2".to_vec()).unwrap();
    net.stabilize();
    assert_eq!(
        net.reads[&1],
        vec![ReadState {
            index: 1,
            ctx: b"r1".to_vec()
        }]
    );
    assert_eq!(
        net.reads[&2],
        vec![ReadState {
            index: 1,
            ctx: b"r2".to_vec()
        }]
    );
    let mut net = Net::new(3, |c| c.max_pending_reads = 1);
    net.elect(1);
    net.cut.insert(2);
    net.cut.insert(3);
    net.node(1).read_index(b"a".to_vec()).unwrap();
    assert_eq!(
        net.node(1).read_index(b"b".to_vec()),
        Err(ProposeError::Busy)
    );
    assert_eq!(
        Net::new(3, |_| {}).node(2).read_index(vec![]),
        Err(ProposeError::NotLeader { leader: 0 })
    );
}

#[test]
fn garbage_and_strangers_are_ignored() {
    let mut net = Net::new(3, |_| {});
    net.elect(1);
    assert!(Raft::decode_message(&[]).is_err());
    assert!(Raft::decode_message(&[0xff; 40]).is_err());
    let mut seed = 7u64;
    for len in 0..200 {
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                (seed >> 33) as u8
            })
            .collect();
        if let Ok(m) = Raft::decode_message(&bytes) {
            // Whatever decodes is stepped into every node without panicking.
            for id in 1..=3 {
                net.node(id).step(2, m.clone());
                net.node(id).step(99, m.clone());
            }
        }
    }
    // Absurd indices from a known peer.
    let term = net.node(1).status().term;
    net.node(2).step(
        1,
        Message {
            term,
            body: Body::Append {
                prev_index: u64::MAX - 1,
                prev_term: 1,
                entries: vec![],
                commit: u64::MAX,
            },
        },
    );
    net.node(1).step(
        2,
        Message {
            term,
            body: Body::AppendResp {
                index: u64::MAX,
                reject: false,
                hint_index: 0,
                hint_term: 0,
            },
        },
    );
    net.stabilize();
}

#[test]
fn config_is_validated() {
    let mut c = cfg(1);
    c.inject_bug = Some("nope".into());
    let err = Raft::create(c, ConfState::new([1]), Recovered::default())
        .err()
        .unwrap();
    assert_eq!(err.field, "inject_bug");
    let mut c = cfg(1);
    c.heartbeat_ticks = 0;
    assert!(Raft::create(c, ConfState::new([1]), Recovered::default()).is_err());
    for b in KNOWN_BUGS {
        assert!(Bug::parse(b).is_some());
    }
}

#[test]
fn restart_redelivers_committed_after_applied() {
    let entries: Vec<Entry> = (1..=5)
        .map(|i| Entry {
            index: i,
            term: 1,
            kind: EntryKind::Normal,
            data: vec![i as u8],
        })
        .collect();
    let rec = Recovered {
        hard_state: HardState {
            term: 1,
            vote: 1,
            commit: 4,
        },
        snapshot: None,
        entries,
        applied: 2,
    };
    let mut r = Raft::create(cfg(1), ConfState::new([1, 2, 3]), rec).unwrap();
    let rd = r.ready();
    let idx: Vec<u64> = rd.committed.iter().map(|e| e.index).collect();
    assert_eq!(idx, vec![3, 4]);
    assert!(rd.entries.is_empty() && rd.hard_state.is_none());
    r.advance();
    assert_eq!(r.status().applied, 4);
    let bad = Recovered {
        entries: vec![Entry {
            index: 3,
            term: 1,
            kind: EntryKind::Normal,
            data: vec![],
        }],
        ..Recovered::default()
    };
    assert_eq!(
        Raft::create(cfg(1), ConfState::new([1]), bad)
            .err()
            .unwrap()
            .field,
        "recovered.entries"
    );
}

fn conf_entry(index: u64, term: u64, changes: Vec<ConfChangeItem>) -> Entry {
    Entry {
        index,
        term,
        kind: EntryKind::ConfChange,
        data: ConfChange { changes }.encode(),
    }
}

#[test]
fn restart_recomputes_configuration_from_snapshot_and_log() {
    // Snapshot at 5 with voters 1..3; then AddVoter(4) at 6 and a joint swap at 7.
    let snap = Snapshot {
        meta: SnapshotMeta {
            index: 5,
            term: 2,
            conf: ConfState::new([1, 2, 3]),
        },
        data: vec![],
    };
    let entries = vec![
        conf_entry(6, 2, vec![ConfChangeItem::AddVoter(4)]),
        conf_entry(
            7,
            2,
            vec![ConfChangeItem::Remove(1), ConfChangeItem::Remove(2)],
        ),
    ];
    let rec = Recovered {
        hard_state: HardState {
            term: 2,
            vote: 0,
            commit: 6,
        },
        snapshot: Some(snap),
        entries,
        applied: 5,
    };
    // `initial` is ignored: the snapshot carries the configuration.
    let r = Raft::create(cfg(3), ConfState::new([9]), rec).unwrap();
    let c = r.status().conf;
    assert_eq!(c.voters, vec![3, 4]);
    assert_eq!(c.voters_outgoing, vec![1, 2, 3, 4]);
    assert_eq!(r.status().first_index, 6);
}

#[test]
fn recovered_hard_state_older_than_log_adopts_the_log_term() {
    // A crash kept a Ready's entries but not its hard state.
    let rec = Recovered {
        hard_state: HardState {
            term: 1,
            vote: 2,
            commit: 0,
        },
        entries: vec![Entry {
            index: 1,
            term: 3,
            kind: EntryKind::Noop,
            data: vec![],
        }],
        ..Recovered::default()
    };
    let mut r = Raft::create(cfg(1), ConfState::new([1, 2]), rec).unwrap();
    assert_eq!(r.status().term, 3);
    // The adopted term is persisted with the first Ready.
    assert_eq!(
        r.ready().hard_state,
        Some(HardState {
            term: 3,
            vote: 0,
            commit: 0
        })
    );
}

/// Node 1 asks for a vote in term 1 with an empty log.
fn first_vote_request() -> Message {
    Message {
        term: 1,
        body: Body::Vote {
            last_index: 0,
            last_term: 0,
            transfer: false,
        },
    }
}

#[test]
fn vote_is_in_the_same_ready_as_its_response() {
    let mut r = Raft::create(cfg(2), ConfState::new([1, 2, 3]), Recovered::default()).unwrap();
    r.step(1, first_vote_request());
    let rd = r.ready();
    assert_eq!(
        rd.hard_state,
        Some(HardState {
            term: 1,
            vote: 1,
            commit: 0
        })
    );
    assert!(rd.must_sync);
    assert!(matches!(
        rd.messages[0].msg.body,
        Body::VoteResp { reject: false }
    ));
    r.advance();
    // The planted bug hides the vote from the hard state.
    let mut c = cfg(2);
    c.inject_bug = Some("vote_without_persist".into());
    let mut r = Raft::create(c, ConfState::new([1, 2, 3]), Recovered::default()).unwrap();
    r.step(1, first_vote_request());
    assert_eq!(r.ready().hard_state.map(|h| h.vote), Some(0));
}

#[test]
fn leader_counts_own_entries_only_after_advance() {
    let mut net = Net::new(3, |_| {});
    net.elect(1);
    net.node(1).tick();
    net.stabilize();
    net.node(1).propose(b"x".to_vec()).unwrap();
    let rd = net.node(1).ready();
    let index = rd.entries[0].index;
    // Only node 2 takes part: the quorum must include the leader's own copy.
    let to2 = rd
        .messages
        .into_iter()
        .find(|m| m.to == 2)
        .expect("append to 2");
    net.node(2).step(1, to2.msg);
    let rd2 = net.node(2).ready();
    net.node(2).advance();
    for m in rd2.messages {
        net.node(1).step(2, m.msg);
    }
    // Node 2 holds the entry durably, the leader has not confirmed its own write yet.
    assert!(net.node(1).status().commit < index);
    net.node(1).advance();
    assert_eq!(net.node(1).status().commit, index);
}

/// A follower whose append was still in flight when a faster follower's answer moved the
/// commit index learns it as soon as its own answer arrives, not a heartbeat later (a
/// write forwarded through that follower waits for it to apply).
#[test]
fn slower_follower_learns_the_commit_without_waiting_for_a_tick() {
    let mut net = Net::new(3, |_| {});
    net.elect(1);
    net.node(1).propose(b"x".to_vec()).unwrap();
    let rd = net.node(1).ready();
    let index = rd.entries[0].index;
    net.node(1).advance();
    let (mut to2, mut to3) = (None, None);
    for m in rd.messages {
        match m.to {
            2 => to2 = Some(m.msg),
            3 => to3 = Some(m.msg),
            _ => {}
        }
    }
    // Both followers persist the entry; node 2 answers first and commits it.
    let answer = |net: &mut Net, id: NodeId, msg: Message| {
        net.node(id).step(1, msg);
        let rd = net.node(id).ready();
        net.node(id).advance();
        rd.messages
    };
    let from2 = answer(&mut net, 2, to2.expect("append to 2"));
    let from3 = answer(&mut net, 3, to3.expect("append to 3"));
    for m in from2 {
        net.node(1).step(2, m.msg);
    }
    assert_eq!(net.node(1).status().commit, index);
    let rd = net.node(1).ready();
    net.node(1).advance();
    assert!(
        rd.messages.iter().all(|m| m.to != 3),
        "node 3 still has an append in flight"
    );
    // Node 3's answer arrives: the next Ready tells it the commit index. No tick.
    for m in from3 {
        net.node(1).step(3, m.msg);
    }
    let rd = net.node(1).ready();
    net.node(1).advance();
    let to3 = rd
        .messages
        .into_iter()
        .find(|m| m.to == 3)
        .expect("an append telling node 3 the commit index");
    net.node(3).step(1, to3.msg);
    assert_eq!(net.node(3).status().commit, index);
    // Only the commit index moved: written with the hard state, but no fsync needed.
    let rd = net.node(3).ready();
    assert_eq!(rd.hard_state.map(|hs| hs.commit), Some(index));
    assert!(rd.entries.is_empty());
    assert!(
        !rd.must_sync,
        "a commit-only hard state change needs no fsync"
    );
    assert_eq!(rd.committed.last().map(|e| e.index), Some(index));
    net.node(3).advance();
}

#[test]
fn transfer_refuses_proposals_and_times_out() {
    let mut net = Net::new(3, |_| {});
    net.elect(1);
    net.cut.insert(3);
    net.node(1).transfer_leader(3);
    assert_eq!(net.node(1).transferee(), 3);
    assert_eq!(
        net.node(1).propose(b"x".to_vec()),
        Err(ProposeError::Transferring)
    );
    for _ in 0..10 {
        net.node(1).tick();
    }
    assert_eq!(net.node(1).transferee(), NO_NODE);
    net.stabilize();
    assert!(net.node(1).propose(b"x".to_vec()).is_ok());
}

#[test]
fn conf_change_rules() {
    let mut net = Net::new(3, |_| {});
    net.elect(1);
    net.node(1).tick();
    net.stabilize();
    let add4 = ConfChange {
        changes: vec![ConfChangeItem::AddVoter(4)],
    };
    let committed = net.node(1).status().commit;
    net.node(1).propose_conf_change(add4.clone()).unwrap();
    // Applied on append: the leader already counts 4.
    assert_eq!(net.node(1).conf().voters, vec![1, 2, 3, 4]);
    // ...but a snapshot at the commit index must record the membership as of there.
    assert_eq!(net.node(1).status().conf.voters, vec![1, 2, 3, 4]);
    assert_eq!(net.node(1).conf_at(committed).voters, vec![1, 2, 3]);
    assert!(matches!(
        net.node(1).propose_conf_change(add4),
        Err(ProposeError::ConfChangeRejected(_))
    ));
    assert!(matches!(
        net.node(1)
            .propose_conf_change(ConfChange { changes: vec![] }),
        Err(ProposeError::ConfChangeRejected(_))
    ));
    assert_eq!(
        net.node(2).propose_conf_change(ConfChange {
            changes: vec![ConfChangeItem::Remove(3)]
        }),
        Err(ProposeError::NotLeader { leader: 1 })
    );
}

#[test]
fn forwarded_reads_are_bounded_and_expire() {
    let mut c = cfg(2);
    c.max_pending_reads = 2;
    let mut r = Raft::create(c, ConfState::new([1, 2, 3]), Recovered::default()).unwrap();
    let heartbeat = Message {
        term: 1,
        body: Body::Heartbeat {
            commit: 0,
            read_seq: 0,
            sent_tick: 1,
        },
    };
    r.step(1, heartbeat.clone());
    // The leader never answers: the follower's bound fills up...
    r.read_index(b"a".to_vec()).unwrap();
    r.read_index(b"b".to_vec()).unwrap();
    assert_eq!(r.read_index(b"c".to_vec()), Err(ProposeError::Busy));
    // ...and frees itself once the forwards are presumed lost (two election timeouts),
    // while the leader keeps the follower from campaigning.
    for _ in 0..19 {
        r.tick();
        r.step(1, heartbeat.clone());
    }
    assert_eq!(r.read_index(b"d".to_vec()), Err(ProposeError::Busy));
    r.tick();
    assert_eq!(r.status().role, Role::Follower);
    assert_eq!(r.read_index(b"d".to_vec()), Ok(()));
}

#[test]
fn leader_reports_match_index_of_each_peer() {
    let mut net = Net::new(3, |_| {});
    net.elect(1);
    net.node(1).propose(b"a".to_vec()).unwrap();
    net.stabilize();
    let last = net.node(1).status().last_index;
    assert_eq!(net.node(1).match_index(1), Some(last));
    assert_eq!(net.node(1).match_index(2), Some(last));
    assert_eq!(net.node(1).match_index(9), None, "not a member");
    assert_eq!(net.node(2).match_index(2), None, "only the leader knows");
    // A cut-off follower's match index stays behind while the others advance.
    net.cut.insert(3);
    for i in 0..5u8 {
        net.node(1).propose(vec![i]).unwrap();
    }
    net.stabilize();
    assert_eq!(net.node(1).match_index(2), Some(last + 5));
    assert_eq!(net.node(1).match_index(3), Some(last));
}

/// A leader's appends leave before its own entries are durable (`send_before_persist`),
/// and it counts its own copy only after `advance`: one follower's acknowledgement alone
/// does not commit an entry the leader has not yet made durable.
#[test]
fn leader_sends_appends_before_its_fsync_and_counts_itself_after() {
    let mut net = Net::new(3, |_| {});
    // Until it leads, nothing of node 1's leaves early (pre-votes, votes wait).
    for _ in 0..100 {
        if net.node(1).status().role == Role::Leader {
            break;
        }
        net.node(1).tick();
        while net.node(1).has_ready() {
            let rd = net.node(1).ready();
            if net.node(1).status().role != Role::Leader {
                assert_eq!(rd.send_before_persist, 0, "{:?}", rd.messages);
            }
            net.node(1).advance();
            for m in rd.messages {
                net.queue.push_back((1, m));
            }
            net.stabilize();
        }
    }
    assert_eq!(net.node(1).status().role, Role::Leader);
    net.stabilize();
    let before = net.node(1).status().commit;
    net.node(1).propose(b"x".to_vec()).unwrap();
    let rd = net.node(1).ready();
    let index = rd.entries.last().expect("the proposal is persisted").index;
    let early: Vec<_> = rd.messages[..rd.send_before_persist].to_vec();
    assert!(
        early
            .iter()
            .any(|o| o.to == 2 && matches!(o.msg.body, Body::Append { .. })),
        "the append should leave before the fsync: {early:?}"
    );
    for o in early.into_iter().filter(|o| o.to == 2) {
        net.node(2).step(1, o.msg);
    }
    let rd2 = net.node(2).ready();
    net.node(2).advance();
    for o in rd2.messages.into_iter().filter(|o| o.to == 1) {
        net.node(1).step(2, o.msg);
    }
    assert_eq!(
        net.node(1).status().commit,
        before,
        "counted its own unpersisted copy"
    );
    net.node(1).advance();
    assert_eq!(net.node(1).status().commit, index);
}
