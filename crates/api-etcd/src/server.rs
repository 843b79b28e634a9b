//! Assembles the etcd services into one tonic server.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tonic::transport::server::Router;
use tonic::transport::Server;

use crate::backend::Backend;
use crate::cluster::ClusterService;
use crate::kv::KvService;
use crate::lease::LeaseService;
use crate::limits::{GRPC_OVERHEAD_BYTES, MAX_REQUEST_BYTES};
use crate::maintenance::MaintenanceService;
use crate::proto::etcdserverpb::{
    cluster_server::ClusterServer, kv_server::KvServer, lease_server::LeaseServer,
    maintenance_server::MaintenanceServer, watch_server::WatchServer,
};
use crate::watch::{WatchService, WatchServiceConfig};

/// Largest gRPC message the server decodes. Above [`MAX_REQUEST_BYTES`] so that a request
/// that is slightly too large still reaches the handler and gets etcd's own error.
pub const MAX_DECODING_BYTES: usize = MAX_REQUEST_BYTES + GRPC_OVERHEAD_BYTES;

/// Configuration of the etcd front-end.
#[derive(Clone, Debug, Default)]
pub struct EtcdApiConfig {
    pub watch: WatchServiceConfig,
}

/// A tonic router serving KV, Watch, Lease, Cluster and Maintenance from `backend`. Other
/// etcd services (Auth, Election, Lock) are answered with Unimplemented by tonic.
pub fn router<B: Backend>(backend: Arc<B>, config: EtcdApiConfig) -> Router {
    Server::builder()
        .add_service(
            KvServer::new(KvService::new(backend.clone()))
                .max_decoding_message_size(MAX_DECODING_BYTES),
        )
        .add_service(
            WatchServer::new(WatchService::new(backend.clone(), config.watch))
                .max_decoding_message_size(MAX_DECODING_BYTES),
        )
        .add_service(
            LeaseServer::new(LeaseService::new(backend.clone()))
                .max_decoding_message_size(MAX_DECODING_BYTES),
        )
        .add_service(
            ClusterServer::new(ClusterService::new(backend.clone()))
                .max_decoding_message_size(MAX_DECODING_BYTES),
        )
        .add_service(
            MaintenanceServer::new(MaintenanceService::new(backend))
                .max_decoding_message_size(MAX_DECODING_BYTES),
        )
}

/// Serves the etcd API on `listener` until `shutdown` resolves. Accepted sockets get
/// TCP_NODELAY and the `:authority` repair of [`crate::conn`]; a caller that serves
/// [`router`] on its own listener should pass [`crate::conn::incoming`] the same way.
pub async fn serve<B: Backend>(
    backend: Arc<B>,
    config: EtcdApiConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    // `incoming` sets TCP_NODELAY and puts the `:authority` sniffer in front of tonic.
    router(backend, config)
        .serve_with_incoming_shutdown(crate::conn::incoming(listener), shutdown)
        .await
}

/// Binds `addr` and serves until `shutdown` resolves; the error names the address when
/// binding fails.
pub async fn bind_and_serve<B: Backend>(
    backend: Arc<B>,
    config: EtcdApiConfig,
    addr: SocketAddr,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    serve(backend, config, listener, shutdown).await?;
    Ok(())
}
