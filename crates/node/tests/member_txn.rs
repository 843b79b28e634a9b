//! Membership changes through any member, learner promotion checks, fail-fast on a leader
//! change, and read-only transactions served without the log. Three (or four) nodes in one
//! process over loopback TCP, in-memory logs; every wait is bounded. Ports stay below
//! Linux's ephemeral range (32768+) so an outgoing connection cannot take one first.

use concord_api_etcd::{Backend, BackendError};
use concord_kv::{
    Command, Compare, CompareResult, CompareTarget, PutRequest, RangeRequest, RequestOp,
    ResponseOp, TxnRequest,
};
use concord_node::config::parse_peers;
use concord_node::{Engine, Node, NodeConfig};
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::time::Instant;

fn peers_text(base: u16, n: u16) -> String {
    (1..=n)
        .map(|i| format!("{i}=127.0.0.1:{}", base + (i - 1) * 100 + 1))
        .collect::<Vec<_>>()
        .join(",")
}

fn node_config(engine: Engine, base: u16, id: u64, peers: &str) -> NodeConfig {
    let peers = parse_peers(peers).unwrap();
    let mut c = NodeConfig::new(id, peers);
    let off = (id as u16 - 1) * 100;
    c.listen_client = format!("127.0.0.1:{}", base + off).parse().unwrap();
    c.listen_peer = format!("127.0.0.1:{}", base + off + 1).parse().unwrap();
    c.listen_admin = format!("127.0.0.1:{}", base + off + 2).parse().unwrap();
    c.in_memory = true;
    c.consensus = engine;
    c.snapshot_every_entries = 20;
    c
}

async fn cluster(engine: Engine, base: u16, tweak: impl Fn(&mut NodeConfig)) -> Vec<Node> {
    let peers = peers_text(base, 3);
    let mut nodes = Vec::new();
    for id in 1..=3 {
        let mut c = node_config(engine, base, id, &peers);
        tweak(&mut c);
        nodes.push(Node::start(c).await.expect("node starts"));
    }
    nodes
}

/// Waits until every node names the same leader; returns it.
async fn agreed_leader(nodes: &[Node]) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let ls: Vec<u64> = nodes.iter().map(|n| n.kv.status().leader).collect();
        if ls[0] != 0 && ls.iter().all(|&l| l == ls[0]) {
            return ls[0];
        }
        assert!(Instant::now() < deadline, "no agreed leader: {ls:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn put(k: &str, v: &str) -> Command {
    Command::Put(PutRequest {
        key: k.as_bytes().to_vec(),
        value: v.as_bytes().to_vec(),
        ..Default::default()
    })
}

/// Writes through `n`, retrying while an election settles (bounded).
async fn write(n: &Node, k: &str, v: &str) {
    for _ in 0..50 {
        if let Ok(r) = n.backend.propose(put(k, v)).await {
            r.result.expect("put applies");
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("write of {k} via node {} never succeeded", n.config.id);
}

async fn stop_all(nodes: Vec<Node>) {
    for n in nodes {
        n.stop().await;
    }
}

async fn membership_via_followers(engine: Engine, base: u16) {
    let nodes = cluster(engine, base, |_| {}).await;
    let leader = agreed_leader(&nodes).await;
    let (li, fi) = match nodes.iter().position(|n| n.config.id == leader).unwrap() {
        0 => (0, 1),
        i => (i, 0),
    };
    let (l, f) = (&nodes[li], &nodes[fi]);
    for i in 0..5 {
        write(f, &format!("m{i}"), "v").await;
    }
    // Add a learner through a follower. Nothing listens at its address, so it never
    // catches up.
    let ghost = format!("http://127.0.0.1:{}", base + 50);
    let (added, list) = f
        .backend
        .member_add(vec![ghost.clone()], true)
        .await
        .unwrap_or_else(|e| panic!("{engine:?}: member add via a follower: {e}"));
    assert!(added.is_learner, "{added:?}");
    assert_eq!(added.peer_urls, vec![ghost.clone()]);
    assert_eq!(list.len(), 4, "{list:?}");
    assert!(list.iter().any(|m| m.id == added.id && m.is_learner));
    // The same address again: refused by the leader, answered through the follower.
    assert_eq!(
        f.backend.member_add(vec![ghost.clone()], false).await,
        Err(BackendError::PeerUrlExists)
    );
    // Promotion checks, through the follower and on the leader.
    assert_eq!(
        f.backend.member_promote(added.id).await,
        Err(BackendError::LearnerNotReady),
        "{engine:?}: a learner that never caught up"
    );
    assert_eq!(
        l.backend.member_promote(added.id).await,
        Err(BackendError::LearnerNotReady)
    );
    assert_eq!(
        f.backend.member_promote(f.config.id).await,
        Err(BackendError::MemberNotLearner)
    );
    assert_eq!(
        f.backend.member_promote(999).await,
        Err(BackendError::MemberNotFound)
    );
    assert_eq!(
        f.backend.member_remove(999).await,
        Err(BackendError::MemberNotFound)
    );
    // Remove it through the follower; the answer carries the remaining members.
    let rest = f
        .backend
        .member_remove(added.id)
        .await
        .unwrap_or_else(|e| panic!("{engine:?}: member remove via a follower: {e}"));
    let mut ids: Vec<u64> = rest.iter().map(|m| m.id).collect();
    ids.sort_unstable();
    assert_eq!(ids, vec![1, 2, 3]);
    stop_all(nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_membership_changes_via_followers() {
    membership_via_followers(Engine::Raft, 24379).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paxos_membership_changes_via_followers() {
    membership_via_followers(Engine::Paxos, 25379).await;
}

/// A learner that really runs catches up (through a snapshot: the log is compacted every
/// 20 entries) and is then promoted through a follower.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caught_up_learner_is_promoted_via_a_follower() {
    let base = 26379;
    let mut nodes = cluster(Engine::Raft, base, |_| {}).await;
    let leader = agreed_leader(&nodes).await;
    let fi = nodes.iter().position(|n| n.config.id != leader).unwrap();
    for i in 0..30 {
        write(&nodes[fi], &format!("p{i}"), "v").await;
    }
    let addr = format!("http://127.0.0.1:{}", base + 301);
    let (added, _) = nodes[fi]
        .backend
        .member_add(vec![addr], true)
        .await
        .expect("add learner");
    assert_eq!(added.id, 4);
    let mut c = node_config(Engine::Raft, base, 4, &peers_text(base, 4));
    c.cluster_id = nodes[0].config.cluster_id;
    nodes.push(Node::start(c).await.expect("learner starts"));
    // Wait until the learner applied everything the leader had committed.
    let target = nodes
        .iter()
        .find(|n| n.config.id == leader)
        .unwrap()
        .kv
        .status()
        .commit;
    let deadline = Instant::now() + Duration::from_secs(15);
    while nodes[3].kv.status().applied < target {
        assert!(Instant::now() < deadline, "learner never caught up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut promoted = None;
    for _ in 0..50 {
        match nodes[fi].backend.member_promote(4).await {
            Ok(list) => {
                promoted = Some(list);
                break;
            }
            // Its progress reaches the leader with the next acknowledgement.
            Err(BackendError::LearnerNotReady) => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("promote: {e}"),
        }
    }
    let list = promoted.expect("caught-up learner promoted");
    assert!(list.iter().all(|m| !m.is_learner), "{list:?}");
    assert_eq!(list.len(), 4);
    write(&nodes[3], "after-promote", "v").await;
    stop_all(nodes).await;
}

/// A write and a read on a follower, sent towards a leader that then dies, are answered
/// soon after the new leader is known, not after the (here 30 s) request timeout: the
/// write with etcd's "leader changed" (its outcome is unknown), the read re-issued to the
/// new leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_requests_through_a_dead_leader_fail_fast() {
    dead_leader(Engine::Raft, 27379).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paxos_requests_through_a_dead_leader_fail_fast() {
    dead_leader(Engine::Paxos, 20379).await;
}

async fn dead_leader(engine: Engine, base: u16) {
    let nodes = cluster(engine, base, |c| {
        c.limits.request_timeout_ms = 30_000;
        // A wide election timeout (0.5-1 s) so the follower still names the dead leader
        // when the requests go out.
        c.election_ticks = 50;
    })
    .await;
    let leader = agreed_leader(&nodes).await;
    write(&nodes[0], "warm", "up").await;
    let mut rest = Vec::new();
    for n in nodes {
        if n.config.id == leader {
            n.stop().await;
        } else {
            rest.push(n);
        }
    }
    let f = &rest[0];
    assert_eq!(
        f.kv.status().leader,
        leader,
        "follower still names the old leader"
    );
    let t = Instant::now();
    let (w, r) = tokio::join!(
        f.backend.propose(put("lost", "?")),
        f.backend.read_barrier()
    );
    let took = t.elapsed();
    assert!(
        took < Duration::from_secs(8),
        "answered after {took:?}: write {w:?}, read {r:?}"
    );
    match w {
        Err(BackendError::LeaderChanged) => {}
        other => panic!("{engine:?}: write through a dead leader: {other:?}"),
    }
    r.expect("read re-issued to the new leader");
    assert_ne!(f.kv.status().leader, leader);
    stop_all(rest).await;
}

fn range(k: &str) -> RequestOp {
    RequestOp::Range(RangeRequest {
        key: k.as_bytes().to_vec(),
        ..Default::default()
    })
}

/// A transaction with only ranges (and compares) is served from the local store after a
/// read barrier, never proposed, and still sees every write acknowledged before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_txn_skips_the_log() {
    let nodes = cluster(Engine::Raft, 28379, |_| {}).await;
    let leader = agreed_leader(&nodes).await;
    let f = nodes.iter().find(|n| n.config.id != leader).unwrap();
    let other = nodes
        .iter()
        .find(|n| n.config.id != leader && n.config.id != f.config.id)
        .unwrap();
    write(other, "a", "1").await;
    let txn = TxnRequest {
        compare: vec![Compare {
            key: b"a".to_vec(),
            range_end: Vec::new(),
            result: CompareResult::Equal,
            target: CompareTarget::Value(b"1".to_vec()),
        }],
        success: vec![
            range("a"),
            RequestOp::Txn(TxnRequest {
                success: vec![range("b")],
                ..Default::default()
            }),
        ],
        failure: vec![range("b")],
    };
    let proposals = f.kv.metrics.proposals_total.load(Ordering::Relaxed);
    let reads = f.kv.metrics.reads_total.load(Ordering::Relaxed);
    // The node that made the write has applied it; the follower may not have yet.
    let revision = other.backend.with_store(|s| s.revision());
    let r = f
        .backend
        .txn(txn.clone(), false)
        .await
        .expect("read-only txn");
    assert!(r.succeeded, "saw the write made through another node");
    let ResponseOp::Range(got) = &r.responses[0] else {
        panic!("{r:?}")
    };
    assert_eq!(got.kvs[0].value, b"1");
    assert_eq!(
        r.header.revision, revision,
        "answered at the current revision"
    );
    assert!(matches!(&r.responses[1], ResponseOp::Txn(t) if t.header.revision == revision));
    assert_eq!(
        f.kv.metrics.proposals_total.load(Ordering::Relaxed),
        proposals,
        "a read-only txn was proposed"
    );
    assert_eq!(
        f.kv.metrics.reads_total.load(Ordering::Relaxed),
        reads + 1,
        "one read barrier"
    );
    // Serializable: no barrier either.
    let r = f
        .backend
        .txn(txn.clone(), true)
        .await
        .expect("serializable");
    assert!(r.succeeded);
    assert_eq!(f.kv.metrics.reads_total.load(Ordering::Relaxed), reads + 1);
    // A transaction that writes still goes through the log.
    let mut w = txn;
    w.success.push(RequestOp::Put(PutRequest {
        key: b"c".to_vec(),
        value: b"3".to_vec(),
        ..Default::default()
    }));
    let r = f.backend.txn(w, false).await.expect("writing txn");
    assert!(r.succeeded);
    assert_eq!(
        f.kv.metrics.proposals_total.load(Ordering::Relaxed),
        proposals + 1
    );
    assert!(f.backend.with_store(|s| s.get(b"c")).is_some());
    stop_all(nodes).await;
}

/// Leadership moves twice while eight clients write through a follower. The fail-fast
/// rule must not fail writes that still commit under the new leader: a transfer waits
/// until the new leader holds every entry (both engines), so every write must succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_leader_transfer_under_load_fails_no_write() {
    transfer_under_load(Engine::Raft, 23379).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paxos_leader_transfer_under_load_fails_no_write() {
    transfer_under_load(Engine::Paxos, 19379).await;
}

async fn transfer_under_load(engine: Engine, base: u16) {
    let nodes = cluster(engine, base, |_| {}).await;
    let first = agreed_leader(&nodes).await;
    let ids: Vec<u64> = nodes.iter().map(|n| n.config.id).collect();
    let others: Vec<u64> = ids.iter().copied().filter(|&i| i != first).collect();
    let (writer_id, target) = (others[0], others[1]);
    let writer = nodes.iter().find(|n| n.config.id == writer_id).unwrap();
    write(writer, "warm", "up").await;
    let backend = writer.backend.clone();
    let mut tasks = Vec::new();
    for c in 0..8 {
        let b = backend.clone();
        tasks.push(tokio::spawn(async move {
            let mut errors = Vec::new();
            for i in 0..100 {
                if let Err(e) = b.propose(put(&format!("t{c}-{i}"), "v")).await {
                    errors.push(e);
                }
            }
            errors
        }));
    }
    let handle = |id: u64| &nodes.iter().find(|n| n.config.id == id).unwrap().kv;
    // Move leadership to `target`, then back to `first`, while the writes run.
    for (from, to) in [(first, target), (target, first)] {
        tokio::time::sleep(Duration::from_millis(50)).await;
        handle(from).transfer_leader(to).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while handle(to).status().leader != to {
            assert!(
                Instant::now() < deadline,
                "{engine:?}: transfer to {to} did not happen"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    for t in tasks {
        let errors = t.await.unwrap();
        assert!(
            errors.is_empty(),
            "writes failed across a transfer: {errors:?}"
        );
    }
    writer.backend.read_barrier().await.unwrap();
    let count = writer.backend.with_store(|s| {
        s.range(&RangeRequest {
            key: b"t".to_vec(),
            range_end: b"u".to_vec(),
            count_only: true,
            ..Default::default()
        })
        .unwrap()
        .count
    });
    assert_eq!(count, 800);
    stop_all(nodes).await;
}
