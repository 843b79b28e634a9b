//! The load generator against an in-process etcd-API server (LocalBackend) on loopback.

use std::sync::Arc;
use std::time::Duration;

use concord_api_etcd::{serve, EtcdApiConfig, LocalBackend};
use concord_bench::{run_kv, KvArgs, Op};
use tokio::net::TcpListener;

async fn server() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let backend = Arc::new(LocalBackend::new());
    tokio::spawn(serve(
        backend,
        EtcdApiConfig::default(),
        listener,
        std::future::pending(),
    ));
    addr.to_string()
}

fn args(endpoint: &str, op: Op) -> KvArgs {
    KvArgs {
        endpoints: vec![endpoint.to_string()],
        clients: 4,
        conns: 2,
        duration: Duration::from_millis(300),
        op,
        value_size: 32,
        keys: 20,
        max_ops: 1_000_000,
        serializable: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_op_runs_without_errors() {
    let ep = server().await;
    for op in [Op::Put, Op::Get, Op::Txn] {
        let r = run_kv(&args(&ep, op)).await.expect("run");
        assert!(r.ops > 0, "{op:?} did some work");
        assert_eq!(r.errors, 0, "{op:?}: {:?}", r.first_error);
        assert!(r.p50_us <= r.p99_us && r.p99_us <= r.p999_us && r.p999_us <= r.max_us);
        assert!(r
            .result_line()
            .starts_with(&format!("RESULT op={} clients=4 ", op.name())));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_ops_bounds_the_count() {
    let ep = server().await;
    let mut a = args(&ep, Op::Put);
    a.max_ops = 50;
    a.duration = Duration::from_secs(30);
    let r = run_kv(&a).await.expect("run");
    assert_eq!(r.ops, 50);
    assert!(
        r.elapsed < Duration::from_secs(30),
        "stopped by count, not time"
    );
}

#[tokio::test]
async fn unreachable_endpoint_is_a_clear_error() {
    // Port 1 on loopback has no listener.
    let err = run_kv(&args("127.0.0.1:1", Op::Put)).await.unwrap_err();
    assert!(err.contains("cannot connect to 127.0.0.1:1"), "{err}");
}
