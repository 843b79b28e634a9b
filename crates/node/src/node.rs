//! One Concord node: listeners, peer transport, the KV group, the etcd API, admin HTTP and
//! the leader's lease-expiry timer, started together and stopped together.

use crate::admin::{self, AdminState};
use crate::config::{ConfigError, Engine, NodeConfig};
use crate::etcd::{self, NodeBackend};
use crate::group::{spawn_group, GroupHandle, GroupParams, MemberInfo, NodeError};
use crate::kvsm::{now_ms, KvMachine};
use crate::transport::Transport;
use concord_consensus::{GroupId, NodeId};
use concord_kv as kv;
use concord_storage::{mem::MemStore, wal::Wal, wal::WalOptions, LogStore};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Group 0 holds the metadata and the KV keyspace for now.
pub const KV_GROUP: GroupId = 0;
/// How often the leader looks for expired leases.
pub const LEASE_CHECK_MS: u64 = 250;

/// A running node.
pub struct Node {
    pub config: NodeConfig,
    pub kv: GroupHandle<KvMachine>,
    pub transport: Arc<Transport>,
    pub backend: Arc<NodeBackend>,
    shutdown: watch::Sender<bool>,
    group_threads: Vec<std::thread::JoinHandle<()>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Why a node could not start; names the flag/field where that applies.
#[derive(Debug)]
pub enum StartError {
    Config(ConfigError),
    Other(String),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::Config(e) => write!(f, "{e}"),
            StartError::Other(s) => f.write_str(s),
        }
    }
}
impl std::error::Error for StartError {}

async fn bind(field: &str, addr: std::net::SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr).await.map_err(|e| {
        StartError::Config(ConfigError::new(
            field,
            format!("cannot listen on {addr}: {e}"),
        ))
    })
}

impl Node {
    /// Starts every part of the node. Returns once all listeners are bound and the group
    /// recovered its state (not once a leader is elected).
    pub async fn start(config: NodeConfig) -> Result<Node, StartError> {
        config.validate().map_err(StartError::Config)?;
        let peer_l = bind("listen-peer", config.listen_peer).await?;
        let client_l = bind("listen-client", config.listen_client).await?;
        let admin_l = bind("listen-admin", config.listen_admin).await?;
        let store: Box<dyn LogStore + Send> = if config.in_memory {
            Box::new(MemStore::new())
        } else {
            std::fs::create_dir_all(&config.data_dir).map_err(|e| {
                StartError::Config(ConfigError::new(
                    "data-dir",
                    format!("cannot create {}: {e}", config.data_dir.display()),
                ))
            })?;
            Box::new(
                Wal::open(&config.data_dir, WalOptions::default())
                    .map_err(|e| StartError::Other(format!("opening the log: {e}")))?,
            )
        };
        let (shutdown, shutdown_rx) = watch::channel(false);
        let peers: HashMap<NodeId, std::net::SocketAddr> =
            config.peers.iter().map(|(k, v)| (*k, *v)).collect();
        let transport = Transport::start(
            config.id,
            config.cluster_id,
            peer_l,
            &peers,
            config.limits.clone(),
            shutdown_rx.clone(),
        );
        let members: BTreeMap<NodeId, MemberInfo> = config
            .peers
            .iter()
            .map(|(&id, addr)| {
                let (name, client) = if id == config.id {
                    (config.name.clone(), config.listen_client.to_string())
                } else {
                    (
                        format!("node{id}"),
                        config
                            .client_urls
                            .get(&id)
                            .map(|a| a.to_string())
                            .unwrap_or_default(),
                    )
                };
                (
                    id,
                    MemberInfo {
                        id,
                        name,
                        peer_addr: addr.to_string(),
                        client_addr: client,
                    },
                )
            })
            .collect();
        let params = GroupParams {
            group: KV_GROUP,
            config: config.clone(),
            store,
            sm: KvMachine::new(),
            transport: transport.clone(),
            members,
            shutdown: shutdown_rx.clone(),
        };
        let (kv, thread) = match config.consensus {
            Engine::Raft => spawn_group::<concord_consensus::raft::Raft, _>(params),
            Engine::Paxos => spawn_group::<concord_consensus::paxos::Paxos, _>(params),
        }
        .map_err(StartError::Other)?;
        let backend = Arc::new(NodeBackend::new(config.id, config.cluster_id, kv.clone()));
        let mut tasks = Vec::new();
        {
            let b = backend.clone();
            let rx = shutdown_rx.clone();
            let id = config.id;
            tasks.push(tokio::spawn(async move {
                if let Err(e) = etcd::serve(b, client_l, rx).await {
                    tracing::error!(node = id, "{e}");
                }
            }));
        }
        let state = Arc::new(AdminState {
            id: config.id,
            name: config.name.clone(),
            cluster_id: config.cluster_id,
            consensus: config.consensus.name().to_string(),
            client_addr: config.listen_client,
            peer_addr: config.listen_peer,
            admin_addr: config.listen_admin,
            kv: kv.clone(),
            transport: transport.stats.clone(),
        });
        tasks.push(tokio::spawn(admin::serve(
            state,
            admin_l,
            shutdown_rx.clone(),
        )));
        tasks.push(tokio::spawn(lease_timer(
            config.id,
            kv.clone(),
            shutdown_rx.clone(),
        )));
        Ok(Node {
            config,
            kv,
            transport,
            backend,
            shutdown,
            group_threads: vec![thread],
            tasks,
        })
    }

    /// Stops the node: the group finishes the round (and fsync) it is in, in-flight
    /// requests fail with "node is stopping", listeners close.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        let threads = self.group_threads;
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
        }
    }

    /// Waits until this node knows a leader, or the timeout passes.
    pub async fn wait_for_leader(&self, timeout: Duration) -> Option<NodeId> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let st = self.kv.status();
            if st.leader != 0 {
                return Some(st.leader);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Only the leader expires leases, with its own clock. A new leader first restarts every
/// lease's TTL (`LeasePromote`) so a leader change never expires a lease early.
async fn lease_timer(id: NodeId, kv: GroupHandle<KvMachine>, mut shutdown: watch::Receiver<bool>) {
    let mut promoted_term = 0;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(LEASE_CHECK_MS)) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        let st = kv.status();
        if st.leader != id {
            continue;
        }
        if promoted_term != st.term {
            let res = kv
                .propose(kv::Command::LeasePromote { now_ms: now_ms() }.encode())
                .await;
            match res {
                Ok(_) => promoted_term = st.term,
                Err(e) => {
                    log_lease_error(id, "promote", &e);
                    continue;
                }
            }
        }
        let now = now_ms();
        let expired = kv.sm.lock().expect("sm lock").store.expired_leases(now);
        if expired.is_empty() {
            continue;
        }
        let cmd = kv::Command::LeaseExpireIds {
            ids: expired,
            now_ms: now,
        };
        if let Err(e) = kv.propose(cmd.encode()).await {
            log_lease_error(id, "expire", &e);
        }
    }
}

fn log_lease_error(id: NodeId, what: &str, e: &NodeError) {
    tracing::debug!(node = id, "lease {what} not proposed: {e}");
}
