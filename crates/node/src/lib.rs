//! concord-node: the runtime that drives replication groups on a real machine.
//!
//! - [`transport`]: TCP peer mesh with length-delimited frames and a cluster handshake.
//! - [`group`]: one task per group driving a `Replica` (persist, send, apply, advance).
//! - [`config`]: node configuration, validated at start with errors naming the field.
//!
//! See `docs/node.md` for the loop, the framing, the ports and the limits.

pub mod config;
pub mod envelope;
pub mod group;
pub mod kvsm;
pub mod metrics;
pub mod transport;
