//! concord-kv: an etcd-v3-style MVCC key-value store as a deterministic state machine.
//!
//! The node runtime decodes committed log entries with [`Command::decode`] and feeds them
//! to [`KvStore::apply`], then passes [`Response::events`] to [`WatchHub::publish`]. Reads
//! ([`KvStore::range`], lease queries, [`KvStore::events_since`]) are local; the runtime
//! decides when a read is linearizable. Nothing here knows about consensus, gRPC, tokio or
//! clocks: time enters only as `now_ms` fields of commands proposed by the leader.
//!
//! ```
//! use concord_kv::{Command, KvStore, PutRequest, RangeRequest};
//!
//! let mut store = KvStore::new();
//! let put = Command::Put(PutRequest { key: b"a".to_vec(), value: b"1".to_vec(), ..Default::default() });
//! let entry = put.encode();
//! let resp = store.apply(1, Command::decode(&entry).unwrap());
//! assert_eq!(resp.revision, 2);
//! let got = store.range(&RangeRequest { key: b"a".to_vec(), ..Default::default() }).unwrap();
//! assert_eq!(got.kvs[0].value, b"1");
//! ```
//!
//! Design, revision rules, lease/time model, watch limits and the snapshot format are in
//! `docs/kv.md`.

mod codec;
mod error;
mod snapshot;
mod store;
mod types;
mod watch;

pub use codec::{COMMAND_BYTES_MAX, TXN_DEPTH_MAX};
pub use error::KvError;
pub use snapshot::SNAPSHOT_FORMAT_VERSION;
pub use store::{key_in_range, KvConfig, KvStore, KEY_OVERHEAD_BYTES, VERSION_OVERHEAD_BYTES};
pub use types::*;
pub use watch::{WatchCancelReason, WatchConfig, WatchHub, WatchId, WatchPoll, WatchRequest};
