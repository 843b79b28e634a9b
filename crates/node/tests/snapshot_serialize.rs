//! A slow state-machine snapshot does not stop consensus: the snapshot thread serializes
//! the state machine while the group loop keeps committing (and holds applies back), and
//! the snapshot file holds the state at exactly its index.

use concord_consensus::raft::Raft;
use concord_node::config::parse_peers;
use concord_node::group::{snapshot_stagger, spawn_group, GroupParams, MemberInfo, StateMachine};
use concord_node::transport::Transport;
use concord_node::NodeConfig;
use concord_storage::wal::{Wal, WalOptions};
use concord_storage::LogStore;
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How long `snapshot()` takes: several election timeouts' worth of the test's ticks.
const SERIALIZE: Duration = Duration::from_millis(800);

/// Counts applied commands; its snapshot is the last applied index, taken slowly.
#[derive(Default)]
struct SlowMachine {
    last: u64,
}

impl StateMachine for SlowMachine {
    type Response = u64;
    fn apply(&mut self, index: u64, _cmd: &[u8]) -> u64 {
        self.last = index;
        index
    }
    fn skip(&mut self, index: u64) {
        self.last = index;
    }
    fn snapshot(&self) -> Vec<u8> {
        std::thread::sleep(SERIALIZE);
        self.last.to_le_bytes().to_vec()
    }
    fn restore(&mut self, data: &[u8]) -> Result<(), String> {
        let b: [u8; 8] = data
            .try_into()
            .map_err(|_| "8 bytes expected".to_string())?;
        self.last = u64::from_le_bytes(b);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_serialization_does_not_stall_commits_and_snapshots_its_own_index() {
    let dir = std::env::temp_dir().join(format!("concord-snapser-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let peer = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = peer.local_addr().unwrap();
    peer.set_nonblocking(true).unwrap();
    let peer = tokio::net::TcpListener::from_std(peer).unwrap();
    let mut config = NodeConfig::new(1, parse_peers(&format!("1={addr}")).unwrap());
    config.snapshot_every_entries = 10;
    config.election_ticks = 10; // 100 ms: a stalled loop would show as lost leadership.
    let (stop, stop_rx) = watch::channel(false);
    let transport = Transport::start(
        1,
        config.cluster_id,
        peer,
        &HashMap::new(),
        config.limits.clone(),
        stop_rx.clone(),
    );
    let members = BTreeMap::from([(
        1,
        MemberInfo {
            id: 1,
            name: "n1".into(),
            peer_addr: addr.to_string(),
            client_addr: String::new(),
        },
    )]);
    let store = Wal::open(&dir, WalOptions::default()).unwrap();
    let (group, thread) = spawn_group::<Raft, _>(GroupParams {
        group: 0,
        config,
        store: Box::new(store),
        sm: SlowMachine::default(),
        transport,
        members,
        shutdown: stop_rx,
    })
    .unwrap();

    // Writes one at a time until one of them makes the group start a snapshot (a node's
    // first one may come a little after the interval: snapshots are staggered by rank).
    let first_snapshot = 10 + snapshot_stagger(0, 10);
    let t0 = Instant::now();
    let mut last = 0;
    while group.status().snapshot_index == 0 && t0.elapsed() < Duration::from_secs(10) {
        last = group.propose(b"x".to_vec()).await.expect("write");
        if last >= first_snapshot {
            break;
        }
    }
    assert!(
        last >= first_snapshot,
        "no snapshot point reached: last index {last}"
    );
    // The serialization (800 ms) has just started. A write now commits at once (the
    // loop still runs) but is applied, and answered, only once the state is captured.
    let started = Instant::now();
    let w = {
        let g = group.clone();
        tokio::spawn(async move { g.propose(b"y".to_vec()).await })
    };
    let mut committed_early = None;
    while started.elapsed() < SERIALIZE / 2 {
        let st = group.status();
        if st.commit > last && st.applied <= last {
            committed_early = Some(started.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let index = w.await.unwrap().expect("the write during serialization");
    let answered = started.elapsed();
    assert!(
        committed_early.is_some(),
        "the write did not commit while the snapshot was serialized: the loop stalled"
    );
    assert_eq!(
        group.status().role,
        "Leader",
        "leadership lost during serialization"
    );
    assert!(index > last);
    // Wait for the file, then check it holds the state at exactly its index.
    let t1 = Instant::now();
    while group.status().snapshot_index == 0 && t1.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop.send(true);
    drop(group);
    thread.join().unwrap();
    let mut store = Wal::open(&dir, WalOptions::default()).unwrap();
    let rec = store.recover().unwrap();
    let snap = rec.snapshot.expect("a snapshot was written");
    let n = u32::from_le_bytes(snap.data[..4].try_into().unwrap()) as usize;
    let sm = &snap.data[4 + n..];
    assert_eq!(
        u64::from_le_bytes(sm.try_into().unwrap()),
        snap.meta.index,
        "the snapshot's state is not the state at its index"
    );
    eprintln!(
        "committed {:?} after the serialization started, answered after {answered:?}; \
         snapshot at {}",
        committed_early.unwrap(),
        snap.meta.index
    );
    let _ = std::fs::remove_dir_all(&dir);
}
