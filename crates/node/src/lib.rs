//! concord-node: the runtime that drives replication groups on a real machine.
//!
//! - [`transport`]: TCP peer mesh with length-delimited frames and a cluster handshake.
//! - [`group`]: one task per group driving a `Replica` (persist, send, apply, advance).
//! - [`node`]: a whole node (listeners, KV group, etcd API, admin HTTP, lease timer).
//! - [`config`]: node configuration, validated at start with errors naming the field.
//!
//! See `docs/node.md` for the loop, the framing, the ports and the limits.

pub mod admin;
pub mod config;
pub mod envelope;
pub mod etcd;
pub mod group;
pub mod kvsm;
pub mod metrics;
pub mod node;
pub mod readtxn;
pub mod transport;

pub use config::{Engine, NodeConfig};
pub use node::{Node, StartError};
