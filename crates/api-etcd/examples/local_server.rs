//! Serves the etcd v3 API from a single-process `LocalBackend`, for trying etcdctl:
//!
//! ```text
//! cargo run -p concord-api-etcd --example local_server -- --listen 127.0.0.1:23790
//! ETCDCTL_API=3 etcdctl --endpoints 127.0.0.1:23790 put a 1
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use concord_api_etcd::{bind_and_serve, EtcdApiConfig, LocalBackend};

/// How often expired leases are looked for (a leader's expiry timer).
const LEASE_EXPIRY_PERIOD_MS: u64 = 200;

fn parse_args() -> Result<SocketAddr, String> {
    let mut args = std::env::args().skip(1);
    let mut listen: SocketAddr = "127.0.0.1:23790".parse().expect("valid default");
    while let Some(a) = args.next() {
        match a.as_str() {
            "--listen" => {
                let v = args.next().ok_or("--listen needs an address")?;
                listen = v
                    .parse()
                    .map_err(|e| format!("--listen {v}: not an address: {e}"))?;
            }
            other => return Err(format!("unknown argument {other}; usage: --listen ADDR")),
        }
    }
    Ok(listen)
}

#[tokio::main]
async fn main() {
    let listen = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("local_server: {e}");
            std::process::exit(2);
        }
    };
    let mut backend = LocalBackend::new();
    backend.set_client_urls(vec![format!("http://{listen}")]);
    let backend = Arc::new(backend);
    let expiry = backend.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(LEASE_EXPIRY_PERIOD_MS));
        loop {
            tick.tick().await;
            expiry.expire_leases();
        }
    });
    eprintln!("local_server: etcd API on {listen}");
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    if let Err(e) = bind_and_serve(backend, EtcdApiConfig::default(), listen, shutdown).await {
        eprintln!("local_server: {e}");
        std::process::exit(1);
    }
}
