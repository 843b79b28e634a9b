//! Three nodes in one process over loopback TCP, for each engine: writes through any node,
//! linearizable reads on followers, lease expiry by the leader, leader failover. Ports stay
//! below Linux's ephemeral range (32768+) so an outgoing connection cannot take one first.

use concord_api_etcd::Backend;
use concord_kv::{Command, PutRequest, RangeRequest, ResponseBody};
use concord_node::config::parse_peers;
use concord_node::{Engine, Node, NodeConfig};
use std::time::Duration;

async fn cluster(engine: Engine, base: u16) -> Vec<Node> {
    let peers = parse_peers(&format!(
        "1=127.0.0.1:{},2=127.0.0.1:{},3=127.0.0.1:{}",
        base + 1,
        base + 101,
        base + 201
    ))
    .unwrap();
    let mut nodes = Vec::new();
    for id in 1..=3u64 {
        let mut c = NodeConfig::new(id, peers.clone());
        let off = (id as u16 - 1) * 100;
        c.listen_client = format!("127.0.0.1:{}", base + off).parse().unwrap();
        c.listen_peer = format!("127.0.0.1:{}", base + off + 1).parse().unwrap();
        c.listen_admin = format!("127.0.0.1:{}", base + off + 2).parse().unwrap();
        c.in_memory = true;
        c.consensus = engine;
        c.snapshot_every_entries = 20;
        nodes.push(Node::start(c).await.expect("node starts"));
    }
    nodes
}

fn put(k: &str, v: &str) -> Command {
    Command::Put(PutRequest {
        key: k.as_bytes().to_vec(),
        value: v.as_bytes().to_vec(),
        ..Default::default()
    })
}

async fn leader_of(nodes: &[Node]) -> u64 {
    for n in nodes {
        if let Some(l) = n.wait_for_leader(Duration::from_secs(10)).await {
            return l;
        }
    }
    panic!("no leader within 10 s");
}

async fn exercise(engine: Engine, base: u16) {
    let nodes = cluster(engine, base).await;
    let leader = leader_of(&nodes).await;
    // Writes through every node, followers forward to the leader.
    for round in 0..10 {
        for n in &nodes {
            let mut tries = 0;
            loop {
                match n
                    .backend
                    .propose(put(&format!("k{}-{round}", n.config.id), "v"))
                    .await
                {
                    Ok(r) => {
                        assert!(matches!(r.result, Ok(ResponseBody::Put(_))));
                        break;
                    }
                    Err(e) => {
                        tries += 1;
                        assert!(
                            tries < 50,
                            "{engine:?}: write via node {} fails: {e}",
                            n.config.id
                        );
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }
    }
    // A linearizable read on every node sees every write acknowledged above.
    for n in &nodes {
        n.backend.read_barrier().await.expect("read barrier");
        let count = n.backend.with_store(|s| {
            s.range(&RangeRequest {
                key: b"k".to_vec(),
                range_end: b"l".to_vec(),
                count_only: true,
                ..Default::default()
            })
            .unwrap()
            .count
        });
        assert_eq!(
            count, 30,
            "{engine:?}: node {} sees all writes",
            n.config.id
        );
    }
    // Each node knew only the others' peer addresses at start; each publishes its own
    // name and client address through the log, so every member table shows all three.
    let want: Vec<(u64, String)> = nodes
        .iter()
        .map(|n| (n.config.id, n.config.listen_client.to_string()))
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    for n in &nodes {
        loop {
            let got: Vec<(u64, String)> =
                n.kv.members
                    .lock()
                    .unwrap()
                    .values()
                    .map(|m| (m.id, m.client_addr.clone()))
                    .collect();
            if got == want {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{engine:?}: node {} member table {got:?}, want {want:?}",
                n.config.id
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // Snapshots were taken (every 20 entries) without disturbing service.
    assert!(nodes.iter().all(|n| n.kv.status().snapshot_index >= 20));
    // Stop the leader; the others elect a new one and keep serving.
    let mut rest = Vec::new();
    for n in nodes {
        if n.config.id == leader {
            n.stop().await;
        } else {
            rest.push(n);
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let ls: Vec<u64> = rest.iter().map(|n| n.kv.status().leader).collect();
        if ls[0] != 0 && ls[0] != leader && ls.iter().all(|&l| l == ls[0]) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{engine:?}: no new leader"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut ok = false;
    for _ in 0..50 {
        if rest[0]
            .backend
            .propose(put("after", "failover"))
            .await
            .is_ok()
        {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "{engine:?}: writes after failover");
    rest[1]
        .backend
        .read_barrier()
        .await
        .expect("barrier after failover");
    let v = rest[1]
        .backend
        .with_store(|s| s.get(b"after").map(|kv| kv.value));
    assert_eq!(v.as_deref(), Some(&b"failover"[..]));
    for n in rest {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_cluster_in_process() {
    exercise(Engine::Raft, 29379).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paxos_cluster_in_process() {
    exercise(Engine::Paxos, 30379).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_expires_leases() {
    let nodes = cluster(Engine::Raft, 21379).await;
    leader_of(&nodes).await;
    let b = &nodes[1].backend;
    let grant = loop {
        match b
            .propose(Command::LeaseGrant {
                id: 0,
                ttl_secs: 1,
                now_ms: 0,
            })
            .await
        {
            Ok(r) => break r,
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let Ok(ResponseBody::LeaseGrant(g)) = grant.result else {
        panic!("grant failed: {grant:?}");
    };
    let mut p = PutRequest {
        key: b"leased".to_vec(),
        value: b"v".to_vec(),
        ..Default::default()
    };
    p.lease = g.id;
    b.propose(Command::Put(p)).await.unwrap().result.unwrap();
    assert!(b.with_store(|s| s.get(b"leased")).is_some());
    // TTL 1 s; the leader checks every 250 ms.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(6);
    loop {
        b.read_barrier().await.unwrap();
        if b.with_store(|s| s.get(b"leased")).is_none() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "lease never expired"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for n in nodes {
        n.stop().await;
    }
}
