//! The simulator's one source of randomness: a SplitMix64 generator seeded from the run seed.
//!
//! Every random choice of a run (network delays, faults, client operations, the seeds handed
//! to each replica) is drawn from one `SimRng`, so a seed replays the run exactly.

/// SplitMix64 (Steele, Lea, Flood 2014): tiny, fast, and good enough for fault injection.
#[derive(Clone, Debug)]
pub struct SimRng {
    state: u64,
}

impl SimRng {
    pub fn new(seed: u64) -> Self {
        // Mix the seed once so seeds 0, 1, 2... do not start from nearby states.
        let mut r = SimRng {
            state: seed ^ 0x6A09_E667_F3BC_C909,
        };
        r.next_u64();
        r
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[lo, hi)`. Returns `lo` when the range is empty rather than panicking,
    /// because callers compute bounds from run parameters.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        lo + self.next_u64() % (hi - lo)
    }

    /// Uniform index into a slice of length `len` (`len` must be non-zero).
    pub fn index(&mut self, len: usize) -> usize {
        debug_assert!(len > 0, "index into an empty slice");
        self.range(0, len as u64) as usize
    }

    /// True with probability `per_million / 1_000_000`.
    pub fn chance(&mut self, per_million: u32) -> bool {
        self.range(0, 1_000_000) < per_million as u64
    }

    /// A fresh independent stream, e.g. for a replica's own election jitter.
    pub fn fork(&mut self) -> u64 {
        self.next_u64()
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        if items.is_empty() {
            None
        } else {
            Some(&items[self.index(items.len())])
        }
    }

    /// Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.range(0, i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_stream_and_ranges_hold() {
        let mut a = SimRng::new(7);
        let mut b = SimRng::new(7);
        for _ in 0..100 {
            assert_eq!(a.next_u64(), b.next_u64());
        }
        let mut c = SimRng::new(8);
        assert_ne!(SimRng::new(7).next_u64(), c.next_u64());
        for _ in 0..1000 {
            let v = a.range(3, 9);
            assert!((3..9).contains(&v));
        }
        assert_eq!(a.range(5, 5), 5);
    }
}
