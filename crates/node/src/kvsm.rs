//! The KV store as a group's state machine: decodes commands, applies them, feeds the
//! watch hub and wakes watchers.

use crate::group::StateMachine;
use concord_kv::{Command, KvError, KvStore, Response, WatchConfig, WatchHub};
use tokio::sync::watch;

/// The KV store, its watch hub and a signal that fires after every applied revision.
pub struct KvMachine {
    pub store: KvStore,
    pub hub: WatchHub,
    /// Latest applied store revision; watcher tasks wait on it and then poll the hub.
    revision_tx: watch::Sender<i64>,
}

impl Default for KvMachine {
    fn default() -> Self {
        Self::new()
    }
}

impl KvMachine {
    pub fn new() -> KvMachine {
        let store = KvStore::new();
        let hub = WatchHub::new(WatchConfig::default(), &store);
        let (revision_tx, _) = watch::channel(store.revision());
        KvMachine {
            store,
            hub,
            revision_tx,
        }
    }

    /// A receiver that changes whenever the store's revision moves (or it is replaced).
    pub fn subscribe(&self) -> watch::Receiver<i64> {
        self.revision_tx.subscribe()
    }

    fn notify(&self) {
        self.revision_tx.send_replace(self.store.revision());
    }
}

impl StateMachine for KvMachine {
    type Response = Response;

    fn apply(&mut self, index: u64, cmd: &[u8]) -> Response {
        match Command::decode(cmd) {
            Ok(c) => {
                let resp = self.store.apply(index, c);
                if !resp.events.is_empty() {
                    self.hub.publish(&self.store, &resp.events);
                    self.notify();
                }
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

    fn restore(&mut self, data: &[u8]) -> Result<(), String> {
        self.store = KvStore::restore(data).map_err(|e: KvError| format!("{e:?}"))?;
        self.hub.reset(&self.store);
        self.notify();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use concord_kv::{PutRequest, RangeRequest};

    #[test]
    fn applies_snapshots_and_restores() {
        let mut m = KvMachine::new();
        let mut rx = m.subscribe();
        let put = Command::Put(PutRequest {
            key: b"k".to_vec(),
            value: b"v".to_vec(),
            ..Default::default()
        });
        let r = m.apply(1, &put.encode());
        assert!(r.result.is_ok());
        assert!(rx.has_changed().unwrap());
        let bad = m.apply(2, b"\xffgarbage");
        assert!(bad.result.is_err());
        assert_eq!(m.store.applied_index(), 2);
        m.skip(3);
        let snap = m.snapshot();
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
        rx.mark_unchanged();
        assert!(other.restore(b"junk").is_err());
    }
}
