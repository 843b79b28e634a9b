//! The KV store as a group's state machine: decodes commands, applies them and hands the
//! events of each applied command to the etcd front-end's event feed (watch streams).

use crate::group::StateMachine;
use concord_api_etcd::EventFeed;
use concord_kv::{Command, KvError, KvStore, Response};

/// Commands at most this long are decoded by the leader to stamp its clock into them
/// (lease grants and keep-alives are a few dozen bytes; big writes are never decoded twice).
const STAMP_BYTES_MAX: usize = 96;

/// Largest store (in `db_size` bytes) that a snapshot copies in memory so as to serialize it
/// without holding the state machine (see `snapshot_later`).
const SNAPSHOT_COPY_MAX_BYTES: u64 = 256 << 20;

/// The KV store and the feed its applied events go to.
pub struct KvMachine {
    pub store: KvStore,
    pub feed: EventFeed,
}

impl Default for KvMachine {
    fn default() -> Self {
        Self::new()
    }
}

impl KvMachine {
    pub fn new() -> KvMachine {
        KvMachine {
            store: KvStore::new(),
            feed: EventFeed::new(),
        }
    }
}

/// Wall-clock milliseconds; lease time is the leader's clock.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl StateMachine for KvMachine {
    type Response = Response;

    fn apply(&mut self, index: u64, cmd: &[u8]) -> Response {
        match Command::decode(cmd) {
            Ok(c) => {
                let mut resp = self.store.apply(index, c);
                // After the store shows the new revision, as the feed's contract asks. The
                // events move to the feed: the front-end answers from `result` and never
                // reads a response's events, so copying every key and value is waste.
                self.feed
                    .publish(resp.revision, std::mem::take(&mut resp.events));
                resp
            }
            Err(e) => {
                // The same bytes fail the same way on every replica: state stays identical.
                self.store.advance_applied(index);
                Response {
                    index,
                    revision: self.store.revision(),
                    result: Err(e),
                    events: Vec::new(),
                }
            }
        }
    }

    fn skip(&mut self, index: u64) {
        self.store.advance_applied(index);
    }

    fn snapshot(&self) -> Vec<u8> {
        self.store.snapshot()
    }

    /// A copy of the store up to `SNAPSHOT_COPY_MAX_BYTES`, serialized after the lock is
    /// released: copying is several times faster than serializing (postcard, checksum), so
    /// applies wait for the copy only. Bigger stores serialize under the lock, so a
    /// snapshot never holds two whole copies of a large state besides its bytes.
    fn snapshot_later(&self) -> Box<dyn FnOnce() -> Vec<u8> + Send> {
        if self.store.status().db_size_bytes <= SNAPSHOT_COPY_MAX_BYTES {
            let copy = self.store.clone();
            Box::new(move || copy.snapshot())
        } else {
            let data = self.store.snapshot();
            Box::new(move || data)
        }
    }

    fn restore(&mut self, data: &[u8]) -> Result<(), String> {
        self.store = KvStore::restore(data).map_err(|e: KvError| format!("{e:?}"))?;
        Ok(())
    }

    fn prepare(cmd: &[u8]) -> Option<Vec<u8>> {
        if cmd.len() > STAMP_BYTES_MAX {
            return None;
        }
        let stamped = match Command::decode(cmd).ok()? {
            Command::LeaseGrant {
                id,
                ttl_secs,
                now_ms: 0,
            } => Command::LeaseGrant {
                id,
                ttl_secs,
                now_ms: now_ms(),
            },
            Command::LeaseKeepAlive { id, now_ms: 0 } => Command::LeaseKeepAlive {
                id,
                now_ms: now_ms(),
            },
            _ => return None,
        };
        Some(stamped.encode())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use concord_kv::{PutRequest, RangeRequest};

    #[test]
    fn applies_snapshots_and_restores() {
        let mut m = KvMachine::new();
        let mut rx = m.feed.subscribe();
        let put = Command::Put(PutRequest {
            key: b"k".to_vec(),
            value: b"v".to_vec(),
            ..Default::default()
        });
        let r = m.apply(1, &put.encode());
        assert!(r.result.is_ok());
        assert_eq!(rx.try_recv().unwrap().revision, 2);
        let bad = m.apply(2, b"\xffgarbage");
        assert!(bad.result.is_err());
        assert_eq!(m.store.applied_index(), 2);
        m.skip(3);
        let snap = m.snapshot();
        // The copy taken now serializes to the same bytes even after more applies.
        let later = m.snapshot_later();
        m.apply(4, &put.encode());
        assert_eq!(later(), snap);
        let mut other = KvMachine::new();
        other.restore(&snap).unwrap();
        let got = other
            .store
            .range(&RangeRequest {
                key: b"k".to_vec(),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(got.kvs[0].value, b"v");
        assert_eq!(other.store.applied_index(), 3);
        let grant = Command::LeaseGrant {
            id: 7,
            ttl_secs: 5,
            now_ms: 0,
        }
        .encode();
        let stamped = Command::decode(&KvMachine::prepare(&grant).unwrap()).unwrap();
        assert!(matches!(stamped, Command::LeaseGrant { now_ms, .. } if now_ms > 0));
        assert!(KvMachine::prepare(&put.encode()).is_none());
        assert!(other.restore(b"junk").is_err());
    }
}
