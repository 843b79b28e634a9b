//! Unit tests of single-replica behaviour, driven with hand-written messages.

use super::*;

fn cfg(id: NodeId) -> Config {
    let mut c = Config::new(id);
    c.check_quorum = false;
    c
}

fn node(id: NodeId) -> Paxos {
    Paxos::create(cfg(id), ConfState::new([1, 2, 3]), Recovered::default()).expect("valid")
}

fn entry(index: u64, term: u64, data: &str) -> Entry {
    Entry {
        index,
        term,
        kind: EntryKind::Normal,
        data: data.as_bytes().to_vec(),
    }
}

fn accept(ballot: u64, prev: u64, entries: Vec<Entry>, commit: u64) -> Message {
    Message::Accept {
        ballot,
        prev,
        entries,
        commit,
    }
}

/// A non-forced prepare (no leadership transfer).
fn prepare(ballot: u64, commit: u64, from: u64) -> Message {
    Message::Prepare {
        ballot,
        commit,
        from,
        force: false,
    }
}

fn promise(ballot: u64, from: u64, entries: Vec<Entry>, done: bool, commit: u64) -> Message {
    Message::Promise {
        ballot,
        from,
        entries,
        done,
        commit,
    }
}

/// The first heartbeat round of ballot `b`'s leader, with nothing committed.
fn heartbeat(b: u64) -> Message {
    Message::Heartbeat {
        ballot: b,
        commit: 0,
        seq: 1,
        sent_at: 0,
    }
}

/// Runs one Ready cycle and returns it.
fn cycle(p: &mut Paxos) -> Ready<Message> {
    let rd = p.ready();
    p.advance();
    rd
}

fn sent(rd: &Ready<Message>) -> Vec<(NodeId, Message)> {
    rd.messages.iter().map(|o| (o.to, o.msg.clone())).collect()
}

#[test]
fn config_is_validated() {
    let mut c = cfg(70_000);
    assert_eq!(
        Paxos::create(c.clone(), ConfState::new([1]), Recovered::default())
            .unwrap_err()
            .field,
        "id"
    );
    c.id = 1;
    c.inject_bug = Some("nonsense".into());
    let err = Paxos::create(c, ConfState::new([1]), Recovered::default()).unwrap_err();
    assert_eq!(err.field, "inject_bug");
    let err = Paxos::create(cfg(1), ConfState::default(), Recovered::default()).unwrap_err();
    assert_eq!(err.field, "initial");
    let gap = Recovered {
        entries: vec![entry(1, 1, "a"), entry(3, 1, "c")],
        ..Recovered::default()
    };
    let err = Paxos::create(cfg(1), ConfState::new([1]), gap).unwrap_err();
    assert_eq!(err.field, "recovered");
}

#[test]
fn garbage_and_forged_messages_are_ignored() {
    assert!(Paxos::decode_message(&[0xff, 0xff, 0xff]).is_err());
    assert!(Paxos::decode_message(&[]).is_err());
    let m = prepare(ballot::make(3, 2), 0, 1);
    assert_eq!(
        Paxos::decode_message(&Paxos::encode_message(&m)).unwrap(),
        m
    );
    let mut p = node(1);
    // A prepare whose ballot belongs to another node is forged: no promise.
    p.step(3, prepare(ballot::make(5, 2), 0, 1));
    // Unknown or reserved senders never panic.
    p.step(0, m.clone());
    p.step(u64::MAX, m);
    assert_eq!(p.status().term, 0);
    assert!(!p.has_ready());
}

#[test]
fn promise_never_decreases_and_lower_ballots_are_refused() {
    let mut p = node(1);
    let high = ballot::make(4, 3);
    p.step(3, prepare(high, 0, 1));
    let rd = cycle(&mut p);
    // Durable promise before the reply leaves.
    assert_eq!(rd.hard_state.map(|h| (h.term, h.vote)), Some((high, 3)));
    assert!(rd.must_sync);
    assert!(matches!(
        sent(&rd)[0],
        (3, Message::Promise { done: true, .. })
    ));
    let low = ballot::make(2, 2);
    p.step(2, accept(low, 0, vec![entry(1, low, "x")], 0));
    let rd = cycle(&mut p);
    assert!(rd.entries.is_empty(), "accepted below the promise");
    assert_eq!(
        sent(&rd),
        vec![(
            2,
            Message::Nack {
                ballot: low,
                promised: high,
                behind: false
            }
        )]
    );
    assert_eq!(p.status().term, high);
}

#[test]
fn overwriting_a_slot_re_emits_later_accepted_slots() {
    let mut p = node(1);
    let b1 = ballot::make(1, 2);
    p.step(
        2,
        accept(
            b1,
            0,
            vec![entry(1, b1, "a"), entry(2, b1, "b"), entry(3, b1, "c")],
            0,
        ),
    );
    assert_eq!(cycle(&mut p).entries.len(), 3);
    // A new leader re-proposes slot 1 and 2 with its own values; slot 3 must survive the
    // driver's truncation from slot 1.
    let b2 = ballot::make(2, 3);
    p.step(
        3,
        accept(b2, 0, vec![entry(1, b2, "a"), entry(2, b2, "z")], 0),
    );
    let rd = cycle(&mut p);
    let got: Vec<(u64, u64)> = rd.entries.iter().map(|e| (e.index, e.term)).collect();
    assert_eq!(got, vec![(1, b2), (2, b2), (3, b1)]);
    assert!(matches!(
        sent(&rd)[0],
        (3, Message::Accepted { matched: 2, .. })
    ));
}

#[test]
fn accept_leaving_a_hole_is_rejected_with_a_hint() {
    let mut p = node(1);
    let b = ballot::make(1, 2);
    p.step(2, accept(b, 4, vec![entry(5, b, "e")], 0));
    let rd = cycle(&mut p);
    assert!(rd.entries.is_empty());
    assert_eq!(
        sent(&rd),
        vec![(
            2,
            Message::Reject {
                ballot: b,
                matched: 0
            }
        )]
    );
}

#[test]
fn new_leader_reproposes_highest_ballot_values_page_by_page() {
    let mut p = node(1);
    let old = ballot::make(1, 2);
    let newer = ballot::make(1, 3);
    // Node 1 accepted `a` in slot 1 from the old leader 2.
    p.step(2, accept(old, 0, vec![entry(1, old, "a")], 0));
    cycle(&mut p);
    p.campaign_now();
    let b = p.status().term;
    assert!(newer < b);
    let rd = cycle(&mut p);
    assert_eq!(rd.hard_state.map(|h| h.term), Some(b));
    let prepares = sent(&rd)
        .iter()
        .filter(|(_, m)| matches!(m, Message::Prepare { from: 1, .. }))
        .count();
    assert_eq!(prepares, 2);
    // Node 2 reports slot 1 = "x" under a higher ballot than ours, one page at a time.
    p.step(2, promise(b, 1, vec![entry(1, newer, "x")], false, 0));
    let rd = cycle(&mut p);
    assert!(matches!(
        sent(&rd)[0],
        (2, Message::Prepare { from: 2, .. })
    ));
    // A duplicate of the first page changes nothing.
    p.step(2, promise(b, 1, vec![entry(1, newer, "x")], true, 0));
    assert_eq!(p.status().role, Role::Candidate);
    p.step(2, promise(b, 2, vec![entry(2, old, "y")], true, 0));
    assert_eq!(p.status().role, Role::Leader);
    let rd = cycle(&mut p);
    let got: Vec<(u64, String, u64)> = rd
        .entries
        .iter()
        .map(|e| {
            (
                e.index,
                String::from_utf8_lossy(&e.data).into_owned(),
                e.term,
            )
        })
        .collect();
    assert_eq!(got, vec![(1, "x".into(), b), (2, "y".into(), b)]);
    // Chosen once a quorum has them; then the leader's commit advances.
    p.step(
        2,
        Message::Accepted {
            ballot: b,
            matched: 2,
        },
    );
    let rd = cycle(&mut p);
    assert_eq!(rd.committed.len(), 2);
    assert_eq!(p.status().commit, 2);
}

#[test]
fn candidate_resends_prepares_to_silent_acceptors() {
    let mut p = node(1);
    p.campaign_now();
    cycle(&mut p);
    p.tick();
    p.tick();
    let again = sent(&cycle(&mut p))
        .iter()
        .filter(|(_, m)| matches!(m, Message::Prepare { .. }))
        .count();
    assert_eq!(again, 2);
}

#[test]
fn single_node_commits_after_persisting_and_answers_reads() {
    let mut p = Paxos::create(cfg(1), ConfState::new([1]), Recovered::default()).expect("valid");
    p.campaign_now();
    assert_eq!(p.status().role, Role::Leader);
    p.propose(b"a".to_vec()).unwrap();
    let rd = p.ready();
    assert_eq!(rd.entries.len(), 1);
    assert!(rd.committed.is_empty(), "committed before durable");
    p.advance();
    let rd = cycle(&mut p);
    assert_eq!(rd.committed.len(), 1);
    p.read_index(b"r".to_vec()).unwrap();
    let rd = cycle(&mut p);
    assert_eq!(
        rd.read_states,
        vec![ReadState {
            index: 1,
            ctx: b"r".to_vec()
        }]
    );
    assert_eq!(
        p.propose(vec![0; 2 << 20]),
        Err(ProposeError::TooLarge {
            size: 2 << 20,
            max: 1536 * 1024
        })
    );
}

#[test]
fn restart_restores_promise_log_and_redelivers_after_applied() {
    let b = ballot::make(3, 2);
    let rec = Recovered {
        hard_state: HardState {
            term: b,
            vote: 2,
            commit: 2,
        },
        snapshot: None,
        entries: vec![entry(1, b, "a"), entry(2, b, "b"), entry(3, b, "c")],
        applied: 1,
    };
    let mut p = Paxos::create(cfg(1), ConfState::new([1, 2, 3]), rec).expect("valid");
    let st = p.status();
    assert_eq!(
        (st.term, st.commit, st.applied, st.last_index),
        (b, 2, 1, 3)
    );
    let rd = cycle(&mut p);
    assert_eq!(
        rd.committed.iter().map(|e| e.index).collect::<Vec<_>>(),
        vec![2]
    );
    // A lower ballot is still refused after the restart.
    p.step(3, prepare(ballot::make(2, 3), 0, 1));
    assert!(matches!(sent(&cycle(&mut p))[0], (3, Message::Nack { .. })));
}

#[test]
fn lease_guard_ignores_prepares_while_a_leader_is_alive() {
    let mut c = Config::new(1);
    c.check_quorum = true;
    let mut p = Paxos::create(c, ConfState::new([1, 2, 3]), Recovered::default()).unwrap();
    let b = ballot::make(1, 2);
    p.step(2, heartbeat(b));
    cycle(&mut p);
    let prep = prepare(ballot::make(2, 3), 0, 1);
    p.step(3, prep.clone());
    assert_eq!(
        p.status().term,
        b,
        "promised while the leader's lease may hold"
    );
    for _ in 0..10 {
        p.step(2, heartbeat(b));
        cycle(&mut p);
    }
    // Silence for an election timeout: the guard lapses.
    for _ in 0..10 {
        p.tick();
    }
    p.step(3, prep);
    assert_eq!(p.status().term, ballot::make(2, 3));
}

/// Random, mostly nonsensical messages with extreme field values never panic a replica,
/// whatever its role.
#[test]
fn random_garbage_never_panics() {
    let mut rng = Prng::new(7);
    let pick = |rng: &mut Prng| -> u64 {
        match rng.range(0, 6) {
            0 => 0,
            1 => u64::MAX,
            2 => u64::MAX - 1,
            3 => rng.range(0, 8),
            4 => ballot::make(rng.range(0, 4), rng.range(1, 4)),
            _ => rng.next_u64(),
        }
    };
    for round in 0..3000 {
        let mut p = node(1);
        match round % 3 {
            0 => {}
            1 => p.campaign_now(),
            _ => {
                p.campaign_now();
                for from in [2, 3] {
                    p.step(from, promise(p.status().term, 1, vec![], true, 0));
                }
                let _ = p.propose(b"x".to_vec());
            }
        }
        for _ in 0..40 {
            let from = rng.range(0, 5);
            let b = pick(&mut rng);
            let (x, y) = (pick(&mut rng), pick(&mut rng));
            let entries = (0..rng.range(0, 3))
                .map(|k| entry(x.wrapping_add(k), pick(&mut rng), "g"))
                .collect::<Vec<_>>();
            let msg = match rng.range(0, 11) {
                0 => Message::Prepare {
                    ballot: b,
                    commit: x,
                    from: y,
                    force: rng.range(0, 2) == 0,
                },
                1 => promise(b, x, entries, rng.range(0, 2) == 0, y),
                2 => Message::Nack {
                    ballot: b,
                    promised: x,
                    behind: rng.range(0, 2) == 0,
                },
                3 => accept(b, x, entries, y),
                4 => Message::Accepted {
                    ballot: b,
                    matched: x,
                },
                5 => Message::Reject {
                    ballot: b,
                    matched: x,
                },
                6 => Message::Heartbeat {
                    ballot: b,
                    commit: x,
                    seq: y,
                    sent_at: x,
                },
                7 => Message::HeartbeatAck {
                    ballot: b,
                    seq: x,
                    sent_at: y,
                    matched: x,
                },
                8 => Message::Snapshot {
                    ballot: b,
                    meta: SnapshotMeta {
                        index: x,
                        term: y,
                        conf: ConfState::new([1, 2, 3]),
                    },
                    total: y,
                    offset: pick(&mut rng),
                    data: vec![1, 2, 3],
                },
                9 => Message::SnapshotAck {
                    ballot: b,
                    index: x,
                    next_offset: y,
                },
                _ => Message::TimeoutNow { ballot: b },
            };
            p.step(from, msg);
            p.tick();
            if p.has_ready() {
                cycle(&mut p);
            }
        }
    }
}

#[test]
fn leader_reports_match_index() {
    let mut p = Paxos::create(cfg(1), ConfState::new([1]), Recovered::default()).expect("valid");
    assert_eq!(p.match_index(1), None, "not leader yet");
    p.campaign_now();
    p.propose(b"a".to_vec()).unwrap();
    cycle(&mut p);
    cycle(&mut p);
    assert_eq!(p.match_index(1), Some(1));
    assert_eq!(p.match_index(2), None, "not a member");
    let mut q = node(2);
    assert_eq!(q.match_index(1), None);
    // A three-member leader knows nothing of a peer that has not answered yet.
    q.campaign_now();
    let _ = cycle(&mut q);
    assert_eq!(q.match_index(3), None, "still a candidate");
}

/// A peer that lies about a chosen slot (same ballot, other value) must not crash us or
/// change the slot: the whole accept is dropped and counted.
#[test]
fn forged_accept_contradicting_a_chosen_slot_is_dropped() {
    let mut p = node(1);
    let b = ballot::make(1, 2);
    p.step(2, accept(b, 0, vec![entry(1, b, "chosen")], 1));
    cycle(&mut p);
    assert_eq!(p.status().commit, 1, "slot 1 is chosen");
    let dropped = p.bad_messages();
    for forged_ballot in [b, ballot::make(5, 2)] {
        p.step(
            2,
            accept(
                forged_ballot,
                0,
                vec![entry(1, b, "forged"), entry(2, forged_ballot, "x")],
                2,
            ),
        );
    }
    assert_eq!(p.bad_messages(), dropped + 2);
    assert_eq!(
        p.log.get(1).map(|e| e.data.as_slice()),
        Some(&b"chosen"[..])
    );
    assert_eq!(
        p.log.last_index(),
        1,
        "nothing of the forged accepts was taken"
    );
    assert_eq!(
        p.status().term,
        b,
        "the forged higher ballot was not promised"
    );
    assert_eq!(p.status().commit, 1);
}

/// A leader's accepts leave before its own acceptance is durable (`send_before_persist`),
/// and it counts itself only after `advance`: one acceptor's answer alone does not choose
/// a slot the leader has not yet made durable.
#[test]
fn leader_sends_accepts_before_its_fsync_and_counts_itself_after() {
    let mut p = node(1);
    p.campaign_now();
    let rd = cycle(&mut p);
    assert_eq!(
        rd.send_before_persist, 0,
        "a prepare waits for the durable promise"
    );
    let b = p.status().term;
    p.step(2, promise(b, 1, vec![], true, 0));
    while p.has_ready() {
        cycle(&mut p);
    }
    assert_eq!(p.status().role, Role::Leader);
    let before = p.status().commit;
    p.propose(b"x".to_vec()).unwrap();
    let rd = p.ready();
    let slot = rd.entries.last().expect("the proposal is persisted").index;
    let early = &rd.messages[..rd.send_before_persist];
    assert!(
        early
            .iter()
            .any(|o| o.to == 2 && matches!(o.msg, Message::Accept { .. })),
        "the accept should leave before the fsync: {early:?}"
    );
    p.step(
        2,
        Message::Accepted {
            ballot: b,
            matched: slot,
        },
    );
    assert_eq!(
        p.status().commit,
        before,
        "counted its own unpersisted acceptance"
    );
    p.advance();
    assert_eq!(p.status().commit, slot);
}
