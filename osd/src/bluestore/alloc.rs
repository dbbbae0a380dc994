//! The allocator: one bit per allocation unit of the block device (1 = allocated), next-fit.
//!
//! The same bitmap is the persisted free list (Ceph's bitmap freelist manager): groups of
//! [`FREELIST_GROUP_AUS`] bits are `freelist` rows in redb, and a commit rewrites only the groups it changed.
//! A group without a row is all free, so mkfs writes nothing and mount reads one row per group ever touched:
//! bounded by the device size, not by the data held. 10 GiB in 4 KiB units is 2.6 M bits, 320 KiB.

use std::collections::BTreeSet;

use super::records::FREELIST_GROUP_AUS;

const WORDS_PER_GROUP: u64 = FREELIST_GROUP_AUS / 64;

#[derive(Debug)]
pub struct Allocator {
    words: Vec<u64>,
    total_aus: u64,
    free_aus: u64,
    /// Where the next search starts: allocations in a row come out contiguous.
    cursor: u64,
    /// Groups changed since the last [`Allocator::take_dirty`].
    dirty: BTreeSet<u64>,
}

impl Allocator {
    /// Everything free. Bits past `total_aus` (in the last word) count as allocated forever.
    pub fn new(total_aus: u64) -> Allocator {
        let groups = total_aus.div_ceil(FREELIST_GROUP_AUS);
        let mut a = Allocator {
            words: vec![0; (groups * WORDS_PER_GROUP) as usize],
            total_aus,
            free_aus: total_aus,
            cursor: 0,
            dirty: BTreeSet::new(),
        };
        a.fence_tail();
        a
    }

    fn fence_tail(&mut self) {
        for au in self.total_aus..self.words.len() as u64 * 64 {
            self.words[(au / 64) as usize] |= 1 << (au % 64);
        }
    }

    pub fn groups(&self) -> u64 {
        self.words.len() as u64 / WORDS_PER_GROUP
    }

    pub fn total_aus(&self) -> u64 {
        self.total_aus
    }

    pub fn free_aus(&self) -> u64 {
        self.free_aus
    }

    /// Recounts free units after loading every group (cheaper than per group).
    pub fn recount(&mut self) {
        self.fence_tail();
        let allocated: u64 = self.words.iter().map(|w| w.count_ones() as u64).sum();
        let fenced = self.words.len() as u64 * 64 - self.total_aus;
        self.free_aus = self.total_aus - (allocated - fenced);
    }

    /// Installs a persisted group without recounting (call [`Allocator::recount`] after the last).
    pub fn load_group_raw(&mut self, group: u64, words: &[u64]) -> bool {
        if group >= self.groups() || words.len() as u64 != WORDS_PER_GROUP {
            return false;
        }
        let at = (group * WORDS_PER_GROUP) as usize;
        self.words[at..at + words.len()].copy_from_slice(words);
        true
    }

    pub fn is_allocated(&self, au: u64) -> bool {
        self.words[(au / 64) as usize] & (1 << (au % 64)) != 0
    }

    /// One free unit, marked allocated; `None` when the device is full.
    pub fn allocate(&mut self) -> Option<u64> {
        if self.free_aus == 0 {
            return None;
        }
        let n = self.words.len() as u64;
        let start = self.cursor / 64;
        for i in 0..=n {
            let w = (start + i) % n;
            let word = self.words[w as usize];
            if word != u64::MAX {
                // Below the cursor's bit in its own word on the first visit: search from the cursor.
                let mask = if i == 0 { (1u64 << (self.cursor % 64)) - 1 } else { 0 };
                let free = !(word | mask);
                if free == 0 {
                    continue;
                }
                let au = w * 64 + free.trailing_zeros() as u64;
                assert!(au < self.total_aus, "fenced bits are never free");
                self.set(au, true);
                self.cursor = au + 1;
                return Some(au);
            }
        }
        unreachable!("free_aus > 0 but no free bit")
    }

    fn set(&mut self, au: u64, allocated: bool) {
        let (w, bit) = ((au / 64) as usize, 1u64 << (au % 64));
        assert_eq!(
            self.words[w] & bit != 0,
            !allocated,
            "unit {au} is already {}",
            if allocated { "allocated" } else { "free" }
        );
        if allocated {
            self.words[w] |= bit;
            self.free_aus -= 1;
        } else {
            self.words[w] &= !bit;
            self.free_aus += 1;
        }
        self.dirty.insert(au / FREELIST_GROUP_AUS);
    }

    /// Returns a unit (after the commit that stopped referencing it is durable).
    pub fn release(&mut self, au: u64) {
        assert!(au < self.total_aus);
        self.set(au, false);
    }

    /// Marks a unit allocated (replaying the persisted state; fsck's repair is not done here).
    pub fn mark(&mut self, au: u64) {
        self.set(au, true);
    }

    /// The groups changed since the last call.
    pub fn take_dirty(&mut self) -> BTreeSet<u64> {
        std::mem::take(&mut self.dirty)
    }

    /// Group `group`'s words as they are once the units in `freeing` are released.
    pub fn group_words(&self, group: u64, freeing: &BTreeSet<u64>) -> Vec<u64> {
        let at = (group * WORDS_PER_GROUP) as usize;
        let mut words = self.words[at..at + WORDS_PER_GROUP as usize].to_vec();
        for &au in freeing.range(group * FREELIST_GROUP_AUS..(group + 1) * FREELIST_GROUP_AUS) {
            let i = (au - group * FREELIST_GROUP_AUS) as usize;
            words[i / 64] &= !(1 << (i % 64));
        }
        words
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_every_unit_once_then_reports_full() {
        // Goal: no unit is handed out twice, and a full device says so. Method: allocate all of an odd-sized
        // device, check distinctness and the fence, release some, allocate them again.
        let mut a = Allocator::new(1500);
        let mut seen = BTreeSet::new();
        while let Some(au) = a.allocate() {
            assert!(au < 1500 && seen.insert(au));
        }
        assert_eq!(seen.len(), 1500);
        assert_eq!(a.free_aus(), 0);
        for au in [3, 700, 1499] {
            a.release(au);
        }
        let again: BTreeSet<u64> = (0..3).map(|_| a.allocate().unwrap()).collect();
        assert_eq!(again, BTreeSet::from([3, 700, 1499]));
        assert!(a.allocate().is_none());
        let dirty = a.take_dirty();
        assert_eq!(dirty, BTreeSet::from([0, 1]));
        let words = a.group_words(1, &BTreeSet::from([1499]));
        let mut b = Allocator::new(1500);
        assert!(b.load_group_raw(0, &a.group_words(0, &BTreeSet::new())));
        assert!(b.load_group_raw(1, &words));
        b.recount();
        assert_eq!(b.free_aus(), 1);
        assert!(!b.is_allocated(1499));
    }
}
