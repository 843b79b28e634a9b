//! concord-api-etcd: the etcd v3 gRPC front-end of Concord's KV service.
//!
//! The wire types come from our own `.proto` files (`proto/`), compiled at build time
//! without a system `protoc`. Services translate requests into calls on a [`Backend`]
//! (implemented by the node runtime, and by [`LocalBackend`] for tests) and map errors to
//! the codes and messages etcd clients expect. See `docs/api-etcd.md`.

pub mod backend;
pub mod cluster;
pub mod conn;
pub mod convert;
pub mod error;
pub mod h2relay;
pub mod hpack;
pub mod kv;
pub mod lease;
pub mod limits;
pub mod local;
pub mod maintenance;
pub mod proto;
pub mod server;
pub mod watch;

pub use backend::{
    Backend, BackendError, EventBatch, EventFeed, HeaderStamp, MemberInfo, NodeStatus,
};
pub use local::LocalBackend;
pub use server::{bind_and_serve, router, serve, EtcdApiConfig};
