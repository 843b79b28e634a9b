//! What the simulator needs from a node's store beyond [`LogStore`]: simulated crashes that
//! lose unsynced writes, and corruption of durable records.

use crate::rng::SimRng;
use concord_consensus::{Entry, HardState, Recovered, Snapshot};
use concord_storage::{LogStore, Result, StorageError};

pub trait SimStore: LogStore {
    /// A new empty store (a brand-new node or one whose data was wiped).
    fn fresh() -> Self;
    /// Simulated power loss: everything written but not synced is gone.
    fn crash(&mut self);
    /// Corrupts some durable record. Returns false if there was nothing durable to corrupt.
    /// A later `recover` must fail with [`StorageError::Corrupt`].
    fn corrupt(&mut self, rng: &mut SimRng) -> bool;
}

/// A stand-in until `concord_storage::faulty::FaultyStore` lands: two images of the state,
/// "written" (what the node sees) and "durable" (what survives a crash).
#[derive(Clone, Debug, Default)]
struct Image {
    hs: HardState,
    snap: Option<Snapshot>,
    entries: Vec<Entry>,
}

impl Image {
    fn snap_index(&self) -> u64 {
        self.snap.as_ref().map_or(0, |s| s.meta.index)
    }
    fn last(&self) -> u64 {
        self.entries.last().map_or(self.snap_index(), |e| e.index)
    }
}

#[derive(Debug, Default)]
pub struct StandInStore {
    written: Image,
    durable: Image,
    corrupt: bool,
}

impl LogStore for StandInStore {
    fn append(&mut self, entries: &[Entry]) -> Result<()> {
        let Some(first) = entries.first() else {
            return Ok(());
        };
        let w = &mut self.written;
        if first.index <= w.snap_index() || first.index > w.last() + 1 {
            return Err(StorageError::Invalid(format!(
                "append at {} does not follow snapshot {} / last {}",
                first.index,
                w.snap_index(),
                w.last()
            )));
        }
        for pair in entries.windows(2) {
            if pair[1].index != pair[0].index + 1 {
                return Err(StorageError::Invalid("entries not contiguous".into()));
            }
        }
        let keep = (first.index - w.snap_index() - 1) as usize;
        w.entries.truncate(keep);
        w.entries.extend_from_slice(entries);
        Ok(())
    }

    fn set_hard_state(&mut self, hs: HardState) -> Result<()> {
        self.written.hs = hs;
        Ok(())
    }

    fn install_snapshot(&mut self, snap: &Snapshot) -> Result<()> {
        for img in [&mut self.written, &mut self.durable] {
            let idx = snap.meta.index;
            let continues = img
                .entries
                .iter()
                .any(|e| e.index == idx && e.term == snap.meta.term);
            if continues {
                img.entries.retain(|e| e.index > idx);
            } else {
                img.entries.clear();
            }
            img.snap = Some(snap.clone());
        }
        Ok(())
    }

    fn compact(&mut self, index: u64) -> Result<()> {
        for img in [&mut self.written, &mut self.durable] {
            img.entries.retain(|e| e.index > index);
        }
        Ok(())
    }

    fn sync(&mut self) -> Result<u64> {
        self.durable = self.written.clone();
        Ok(self.durable.last())
    }

    fn recover(&mut self) -> Result<Recovered> {
        if self.corrupt {
            return Err(StorageError::Corrupt {
                path: "sim".into(),
                offset: 0,
                detail: "checksum mismatch".into(),
            });
        }
        self.written = self.durable.clone();
        let d = &self.durable;
        Ok(Recovered {
            hard_state: d.hs,
            snapshot: d.snap.clone(),
            entries: d.entries.clone(),
            applied: d.snap_index(),
        })
    }

    fn first_index(&self) -> u64 {
        self.written.snap_index() + 1
    }
    fn last_index(&self) -> u64 {
        self.written.last()
    }
}

impl SimStore for StandInStore {
    fn fresh() -> Self {
        StandInStore::default()
    }
    fn crash(&mut self) {
        self.written = self.durable.clone();
    }
    fn corrupt(&mut self, _rng: &mut SimRng) -> bool {
        let any = !self.durable.entries.is_empty() || self.durable.snap.is_some();
        self.corrupt |= any;
        any
    }
}
