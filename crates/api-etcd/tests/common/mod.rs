//! A LocalBackend served over a real loopback socket, with clients generated from our own
//! protos.
#![allow(dead_code)] // each test file uses a different part

use std::sync::Arc;
use std::time::Duration;

use concord_api_etcd::proto::etcdserverpb as pb;
use concord_api_etcd::watch::WatchServiceConfig;
use concord_api_etcd::{serve, EtcdApiConfig, LocalBackend};
use pb::cluster_client::ClusterClient;
use pb::kv_client::KvClient;
use pb::lease_client::LeaseClient;
use pb::maintenance_client::MaintenanceClient;
use pb::watch_client::WatchClient;
use tokio::net::TcpListener;
use tonic::transport::Channel;

/// Longest a test waits for one expected message before failing.
pub const WAIT: Duration = Duration::from_secs(10);

pub struct Harness {
    pub backend: Arc<LocalBackend>,
    pub channel: Channel,
    pub addr: std::net::SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

pub async fn start() -> Harness {
    start_with(EtcdApiConfig::default()).await
}

pub async fn start_with_progress(every: Duration) -> Harness {
    start_with(EtcdApiConfig {
        watch: WatchServiceConfig {
            progress_notify_interval: every,
        },
    })
    .await
}

pub async fn start_with(config: EtcdApiConfig) -> Harness {
    let backend = Arc::new(LocalBackend::with_manual_clock());
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let served = backend.clone();
    tokio::spawn(async move {
        serve(served, config, listener, async {
            let _ = rx.await;
        })
        .await
        .expect("server runs");
    });
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect to loopback server");
    Harness {
        backend,
        channel,
        addr,
        shutdown: Some(tx),
    }
}

impl Harness {
    pub fn kv(&self) -> KvClient<Channel> {
        KvClient::new(self.channel.clone())
    }
    pub fn watch(&self) -> WatchClient<Channel> {
        WatchClient::new(self.channel.clone())
    }
    pub fn lease(&self) -> LeaseClient<Channel> {
        LeaseClient::new(self.channel.clone())
    }
    pub fn cluster(&self) -> ClusterClient<Channel> {
        ClusterClient::new(self.channel.clone())
    }
    pub fn maintenance(&self) -> MaintenanceClient<Channel> {
        MaintenanceClient::new(self.channel.clone())
    }

    pub async fn put(&self, key: &str, value: &str) -> pb::PutResponse {
        self.kv()
            .put(pb::PutRequest {
                key: key.into(),
                value: value.into(),
                ..Default::default()
            })
            .await
            .expect("put")
            .into_inner()
    }

    pub async fn get(&self, key: &str) -> pb::RangeResponse {
        self.kv()
            .range(pb::RangeRequest {
                key: key.into(),
                ..Default::default()
            })
            .await
            .expect("range")
            .into_inner()
    }
}

/// The range end that selects every key with `prefix`.
pub fn prefix_end(prefix: &str) -> Vec<u8> {
    concord_kv::prefix_end(prefix.as_bytes())
}
