//! The etcd front-end's [`Backend`], implemented on the KV group, and its gRPC server.

use crate::group::{GroupHandle, MemberOp, NodeError};
use crate::kvsm::{now_ms, KvMachine};
use concord_api_etcd::{
    Backend, BackendError, EtcdApiConfig, EventFeed, HeaderStamp, MemberInfo, NodeStatus,
};
use concord_consensus::NodeId;
use concord_kv as kv;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// A member of this node's cluster, as the etcd API shows it.
pub struct NodeBackend {
    pub id: NodeId,
    pub cluster_id: u64,
    pub kv: GroupHandle<KvMachine>,
    feed: EventFeed,
}

impl NodeBackend {
    pub fn new(id: NodeId, cluster_id: u64, kv: GroupHandle<KvMachine>) -> NodeBackend {
        let feed = kv.sm.lock().expect("sm lock").feed.clone();
        NodeBackend {
            id,
            cluster_id,
            kv,
            feed,
        }
    }

    fn member_list(&self) -> Vec<MemberInfo> {
        let st = self.kv.status();
        let members = self.kv.members.lock().expect("members").clone();
        let mut ids: Vec<NodeId> = st.voters.iter().chain(&st.learners).copied().collect();
        ids.sort_unstable();
        ids.dedup();
        if ids.is_empty() {
            ids = members.keys().copied().collect();
        }
        ids.into_iter()
            .map(|id| {
                let m = members.get(&id);
                MemberInfo {
                    id,
                    name: m.map(|m| m.name.clone()).unwrap_or_default(),
                    peer_urls: m
                        .filter(|m| !m.peer_addr.is_empty())
                        .map(|m| vec![format!("http://{}", m.peer_addr)])
                        .unwrap_or_default(),
                    client_urls: m
                        .filter(|m| !m.client_addr.is_empty())
                        .map(|m| vec![format!("http://{}", m.client_addr)])
                        .unwrap_or_default(),
                    is_learner: st.learners.contains(&id),
                }
            })
            .collect()
    }
}

/// Maps runtime errors to the codes etcd clients retry on.
pub fn map_err(e: NodeError) -> BackendError {
    match e {
        NodeError::NoLeader => BackendError::NoLeader,
        NodeError::TooManyRequests => BackendError::TooManyRequests,
        NodeError::Timeout => BackendError::Timeout,
        NodeError::Stopped => BackendError::Stopped,
        NodeError::TooLarge { size, max } => {
            BackendError::Kv(kv::KvError::ValueTooLarge { size, max })
        }
        NodeError::LeaderChanged => BackendError::LeaderChanged,
        NodeError::MemberNotFound => BackendError::MemberNotFound,
        NodeError::MemberNotLearner => BackendError::MemberNotLearner,
        NodeError::LearnerNotReady => BackendError::LearnerNotReady,
        NodeError::PeerUrlExists => BackendError::PeerUrlExists,
        NodeError::Rejected(why) => BackendError::Internal(why),
    }
}

fn strip_url(u: &str) -> &str {
    let u = u.trim();
    let u = u
        .strip_prefix("http://")
        .or_else(|| u.strip_prefix("https://"))
        .unwrap_or(u);
    u.trim_end_matches('/')
}

impl Backend for NodeBackend {
    fn header(&self) -> HeaderStamp {
        HeaderStamp {
            cluster_id: self.cluster_id,
            member_id: self.id,
            raft_term: self.kv.status.lock().expect("status").term,
        }
    }

    async fn propose(&self, cmd: kv::Command) -> Result<kv::Response, BackendError> {
        self.kv.propose(cmd.encode()).await.map_err(map_err)
    }

    async fn read_barrier(&self) -> Result<(), BackendError> {
        self.kv.read_barrier().await.map(|_| ()).map_err(map_err)
    }

    async fn txn(
        &self,
        req: kv::TxnRequest,
        serializable: bool,
    ) -> Result<kv::TxnResponse, BackendError> {
        if !crate::readtxn::is_read_only(&req) {
            let resp = self.propose(kv::Command::Txn(req)).await?;
            return match resp.result {
                Ok(kv::ResponseBody::Txn(r)) => Ok(r),
                Ok(other) => Err(BackendError::Internal(format!(
                    "txn answered with {other:?}"
                ))),
                Err(e) => Err(BackendError::Kv(e)),
            };
        }
        // Served like a range: a linearizable read barrier, then every compare and range
        // evaluated under one store lock, hence at one revision.
        if !serializable {
            self.read_barrier().await?;
        }
        self.with_store(|s| crate::readtxn::evaluate(s, &req))
            .map_err(BackendError::Kv)
    }

    fn with_store<R>(&self, f: impl FnOnce(&kv::KvStore) -> R) -> R {
        f(&self.kv.sm.lock().expect("sm lock").store)
    }

    fn events(&self) -> &EventFeed {
        &self.feed
    }

    async fn lease_time_to_live(
        &self,
        id: kv::LeaseId,
        keys: bool,
    ) -> Result<kv::LeaseTimeToLive, BackendError> {
        // Every node of a deployment reads the same wall clock closely enough for TTL
        // display; the barrier makes the lease's replicated deadline current.
        self.read_barrier().await?;
        self.with_store(|s| s.lease_time_to_live(id, now_ms(), keys))
            .map_err(BackendError::Kv)
    }

    async fn members(&self) -> Result<Vec<MemberInfo>, BackendError> {
        Ok(self.member_list())
    }

    async fn member_add(
        &self,
        peer_urls: Vec<String>,
        is_learner: bool,
    ) -> Result<(MemberInfo, Vec<MemberInfo>), BackendError> {
        let Some(url) = peer_urls.first() else {
            return Err(BackendError::MemberBadUrls);
        };
        let addr = strip_url(url);
        if crate::config::parse_addr("peer-urls", addr).is_err() {
            return Err(BackendError::MemberBadUrls);
        }
        // The leader (wherever it is) checks the address is free and picks the id.
        let id = self
            .kv
            .member_change(MemberOp::Add {
                peer_addr: addr.to_string(),
                learner: is_learner,
            })
            .await
            .map_err(map_err)?;
        let all = self.member_list();
        let added = all
            .iter()
            .find(|m| m.id == id)
            .cloned()
            .unwrap_or(MemberInfo {
                id,
                peer_urls: vec![format!("http://{addr}")],
                is_learner,
                ..Default::default()
            });
        Ok((added, all))
    }

    async fn member_remove(&self, id: u64) -> Result<Vec<MemberInfo>, BackendError> {
        self.kv
            .member_change(MemberOp::Remove { id })
            .await
            .map_err(map_err)?;
        Ok(self.member_list())
    }

    async fn member_update(
        &self,
        _id: u64,
        _peer_urls: Vec<String>,
    ) -> Result<Vec<MemberInfo>, BackendError> {
        Err(BackendError::Unsupported("member update"))
    }

    async fn member_promote(&self, id: u64) -> Result<Vec<MemberInfo>, BackendError> {
        // The leader checks the learner's progress (only it knows it).
        self.kv
            .member_change(MemberOp::Promote { id })
            .await
            .map_err(map_err)?;
        Ok(self.member_list())
    }

    async fn status(&self) -> Result<NodeStatus, BackendError> {
        let st = self.kv.status();
        let mut errors = Vec::new();
        if st.leader == 0 {
            errors.push("no leader".to_string());
        }
        if st.stopped {
            errors.push("node is stopping".to_string());
        }
        Ok(NodeStatus {
            leader_id: st.leader,
            raft_term: st.term,
            raft_index: st.commit,
            raft_applied_index: st.applied,
            is_learner: st.learners.contains(&self.id),
            errors,
        })
    }
}

/// Serves the etcd v3 gRPC API on `listener` until `shutdown` turns true: api-etcd's
/// router (request size limits) behind its connection layer (TCP_NODELAY and the repair
/// of etcdctl's `http://` authorities).
pub async fn serve(
    backend: Arc<NodeBackend>,
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), String> {
    concord_api_etcd::serve(backend, EtcdApiConfig::default(), listener, async move {
        let _ = shutdown.wait_for(|s| *s).await;
    })
    .await
    .map_err(|e| format!("etcd API server: {e}"))
}
