//! A single-process [`Backend`]: commands go through the same encode/decode as log
//! entries and are applied straight to a `KvStore` behind a mutex. For tests, examples and
//! the benchmark baseline; it has no consensus and no durability.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use concord_kv as kv;

use crate::backend::{Backend, BackendError, EventFeed, HeaderStamp, MemberInfo, NodeStatus};

/// Where lease time comes from.
#[derive(Debug)]
enum Clock {
    /// Milliseconds since the backend was created.
    Real(Instant),
    /// Set by the test with [`LocalBackend::advance_clock_ms`].
    Manual(AtomicU64),
}

/// Cluster id reported by a [`LocalBackend`].
pub const LOCAL_CLUSTER_ID: u64 = 0x00c0_2c02_d000_0001;
/// Member id reported by a [`LocalBackend`].
pub const LOCAL_MEMBER_ID: u64 = 0x00c0_2c02_d000_0002;

struct State {
    store: kv::KvStore,
    /// Index of the last "log entry" applied.
    last_index: u64,
}

/// See the module doc.
pub struct LocalBackend {
    state: Mutex<State>,
    feed: EventFeed,
    clock: Clock,
    client_urls: Vec<String>,
    /// When set, proposals and read barriers fail with this error (to test error paths).
    fail_with: Mutex<Option<BackendError>>,
}

impl LocalBackend {
    /// A backend whose lease clock is the real monotonic clock.
    pub fn new() -> LocalBackend {
        Self::build(Clock::Real(Instant::now()))
    }

    /// A backend whose lease clock only moves with [`LocalBackend::advance_clock_ms`].
    pub fn with_manual_clock() -> LocalBackend {
        Self::build(Clock::Manual(AtomicU64::new(0)))
    }

    fn build(clock: Clock) -> LocalBackend {
        LocalBackend {
            state: Mutex::new(State {
                store: kv::KvStore::new(),
                last_index: 0,
            }),
            feed: EventFeed::new(),
            clock,
            client_urls: Vec::new(),
            fail_with: Mutex::new(None),
        }
    }

    /// The client URLs reported by MemberList.
    pub fn set_client_urls(&mut self, urls: Vec<String>) {
        self.client_urls = urls;
    }

    /// Makes every later proposal and read barrier fail with `err` (None restores).
    pub fn set_failure(&self, err: Option<BackendError>) {
        *self.fail_with.lock().unwrap_or_else(|p| p.into_inner()) = err;
    }

    fn failure(&self) -> Result<(), BackendError> {
        match &*self.fail_with.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    /// Current lease time in milliseconds.
    pub fn now_ms(&self) -> u64 {
        match &self.clock {
            Clock::Real(start) => u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX),
            Clock::Manual(ms) => ms.load(Ordering::SeqCst),
        }
    }

    /// Moves a manual clock forward. Panics on a real clock: a test that calls this on a
    /// real clock is wrong.
    pub fn advance_clock_ms(&self, ms: u64) {
        match &self.clock {
            Clock::Manual(now) => {
                now.fetch_add(ms, Ordering::SeqCst);
            }
            Clock::Real(_) => panic!("advance_clock_ms on a LocalBackend with a real clock"),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the store as it was before the command
        // (apply validates before changing anything), so the state is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies one command as the next log entry and publishes its events.
    fn apply(&self, cmd: kv::Command) -> Result<kv::Response, BackendError> {
        let cmd = self.stamp(cmd);
        // Go through the log encoding so this backend refuses what a real log would.
        let bytes = cmd.encode();
        if bytes.len() > kv::COMMAND_BYTES_MAX {
            return Err(BackendError::Kv(kv::KvError::ValueTooLarge {
                size: bytes.len(),
                max: kv::COMMAND_BYTES_MAX,
            }));
        }
        let cmd = kv::Command::decode(&bytes).map_err(BackendError::Kv)?;
        let mut st = self.lock();
        st.last_index += 1;
        let index = st.last_index;
        let resp = st.store.apply(index, cmd);
        // Published under the lock, so batches leave in apply order and only after the
        // store shows their revision.
        self.feed.publish(resp.revision, resp.events.clone());
        Ok(resp)
    }

    /// Fills the leader's clock into the commands that carry one.
    fn stamp(&self, cmd: kv::Command) -> kv::Command {
        let now = self.now_ms();
        match cmd {
            kv::Command::LeaseGrant { id, ttl_secs, .. } => kv::Command::LeaseGrant {
                id,
                ttl_secs,
                now_ms: now,
            },
            kv::Command::LeaseKeepAlive { id, .. } => {
                kv::Command::LeaseKeepAlive { id, now_ms: now }
            }
            other => other,
        }
    }

    /// Revokes the leases whose deadline has passed, as a leader's expiry timer would.
    /// Returns the revoked ids.
    pub fn expire_leases(&self) -> Vec<kv::LeaseId> {
        let now = self.now_ms();
        let ids = self.lock().store.expired_leases(now);
        if ids.is_empty() {
            return ids;
        }
        match self.apply(kv::Command::LeaseExpireIds { ids, now_ms: now }) {
            Ok(kv::Response {
                result: Ok(kv::ResponseBody::LeaseExpire(r)),
                ..
            }) => r.expired,
            _ => Vec::new(),
        }
    }

    fn member(&self) -> MemberInfo {
        MemberInfo {
            id: LOCAL_MEMBER_ID,
            name: "local".to_string(),
            peer_urls: vec!["http://127.0.0.1:2380".to_string()],
            client_urls: self.client_urls.clone(),
            is_learner: false,
        }
    }
}

impl Default for LocalBackend {
    fn default() -> Self {
        LocalBackend::new()
    }
}

impl Backend for LocalBackend {
    fn header(&self) -> HeaderStamp {
        HeaderStamp {
            cluster_id: LOCAL_CLUSTER_ID,
            member_id: LOCAL_MEMBER_ID,
            raft_term: 1,
        }
    }

    async fn propose(&self, cmd: kv::Command) -> Result<kv::Response, BackendError> {
        self.failure()?;
        self.apply(cmd)
    }

    async fn read_barrier(&self) -> Result<(), BackendError> {
        // One process, one store: everything applied is already visible.
        self.failure()
    }

    fn with_store<R>(&self, f: impl FnOnce(&kv::KvStore) -> R) -> R {
        f(&self.lock().store)
    }

    fn events(&self) -> &EventFeed {
        &self.feed
    }

    async fn lease_time_to_live(
        &self,
        id: kv::LeaseId,
        keys: bool,
    ) -> Result<kv::LeaseTimeToLive, BackendError> {
        self.failure()?;
        let now = self.now_ms();
        self.lock()
            .store
            .lease_time_to_live(id, now, keys)
            .map_err(BackendError::Kv)
    }

    async fn members(&self) -> Result<Vec<MemberInfo>, BackendError> {
        Ok(vec![self.member()])
    }

    async fn member_add(
        &self,
        _peer_urls: Vec<String>,
        _is_learner: bool,
    ) -> Result<(MemberInfo, Vec<MemberInfo>), BackendError> {
        Err(BackendError::Unsupported(
            "membership changes on a local backend",
        ))
    }

    async fn member_remove(&self, id: u64) -> Result<Vec<MemberInfo>, BackendError> {
        if id != LOCAL_MEMBER_ID {
            return Err(BackendError::MemberNotFound);
        }
        Err(BackendError::Unsupported(
            "membership changes on a local backend",
        ))
    }

    async fn member_update(
        &self,
        id: u64,
        _peer_urls: Vec<String>,
    ) -> Result<Vec<MemberInfo>, BackendError> {
        if id != LOCAL_MEMBER_ID {
            return Err(BackendError::MemberNotFound);
        }
        Err(BackendError::Unsupported(
            "membership changes on a local backend",
        ))
    }

    async fn member_promote(&self, id: u64) -> Result<Vec<MemberInfo>, BackendError> {
        if id != LOCAL_MEMBER_ID {
            return Err(BackendError::MemberNotFound);
        }
        Err(BackendError::MemberNotLearner)
    }

    async fn status(&self) -> Result<NodeStatus, BackendError> {
        let applied = self.lock().store.applied_index();
        Ok(NodeStatus {
            leader_id: LOCAL_MEMBER_ID,
            raft_term: 1,
            raft_index: applied,
            raft_applied_index: applied,
            is_learner: false,
            errors: Vec::new(),
        })
    }
}
