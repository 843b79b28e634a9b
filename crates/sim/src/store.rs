//! What the simulator needs from a node's store beyond [`LogStore`]: simulated crashes that
//! lose unsynced writes, and corruption of durable records.

use crate::rng::SimRng;
use concord_storage::faulty::FaultyStore;
use concord_storage::LogStore;

pub trait SimStore: LogStore {
    /// A new empty store (a brand-new node or one whose data was wiped).
    fn fresh() -> Self;
    /// Simulated power loss: everything written but not synced is gone (a torn prefix of
    /// it may survive, which recovery must cut off).
    fn crash(&mut self, rng: &mut SimRng);
    /// Corrupts some durable record. Returns false if there was nothing durable to corrupt.
    /// A later `recover` must fail with `StorageError::Corrupt`.
    fn corrupt(&mut self, rng: &mut SimRng) -> bool;
}

impl SimStore for FaultyStore {
    fn fresh() -> Self {
        FaultyStore::new()
    }
    fn crash(&mut self, rng: &mut SimRng) {
        self.crash_torn(rng.next_u64());
    }
    fn corrupt(&mut self, rng: &mut SimRng) -> bool {
        self.corrupt_random_record(rng.next_u64()).is_some()
    }
}
