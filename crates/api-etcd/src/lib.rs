//! concord-api-etcd: the etcd v3 gRPC front-end. See `docs/api-etcd.md`.

pub mod proto;
