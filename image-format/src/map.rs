//! The allocation map: 2 bits of state per block, persisted a 4 KiB page at a
//! time, and only at flush (FORMAT.md, "Writes, flushes and the crash
//! contract").

use std::collections::BTreeSet;

/// Bytes of map per persisted page.
pub const MAP_PAGE: usize = 4096;
/// Blocks one map page describes.
pub const BLOCKS_PER_PAGE: u64 = MAP_PAGE as u64 * 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BlockState {
    /// Not in this layer: read the parent.
    Absent = 0,
    Data = 1,
    /// Reads zeros whatever the parent holds.
    Zero = 2,
}

/// A map byte that names the invalid state 3, or a set bit past the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("block {block} has invalid map state {value}")]
pub struct MapError {
    pub block: u64,
    pub value: u8,
}

#[derive(Debug, Clone)]
pub struct AllocationMap {
    bytes: Vec<u8>,
    blocks: u64,
    dirty_pages: BTreeSet<u64>,
}

impl AllocationMap {
    /// An all-absent map for `blocks` blocks whose on-disk region is `map_len` bytes.
    pub fn new(blocks: u64, map_len: u64) -> Self {
        AllocationMap {
            // Zeroed allocation: untouched pages cost no memory.
            bytes: vec![0u8; map_len as usize],
            blocks,
            dirty_pages: BTreeSet::new(),
        }
    }

    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// The raw map region, for loading from disk.
    pub fn raw_mut(&mut self) -> &mut [u8] {
        &mut self.bytes
    }

    pub fn raw(&self) -> &[u8] {
        &self.bytes
    }

    pub fn get(&self, block: u64) -> BlockState {
        match (self.bytes[(block / 4) as usize] >> ((block % 4) * 2)) & 3 {
            0 => BlockState::Absent,
            1 => BlockState::Data,
            2 => BlockState::Zero,
            // Refused by validate() at open; treat as absent if it ever shows.
            _ => BlockState::Absent,
        }
    }

    /// Sets `[start, start + count)` to `state` and marks the pages dirty.
    pub fn set_range(&mut self, start: u64, count: u64, state: BlockState) {
        let end = start + count;
        assert!(end <= self.blocks, "map range past the end");
        let mut b = start;
        let fill = match state {
            BlockState::Absent => 0x00,
            BlockState::Data => 0x55,
            BlockState::Zero => 0xaa,
        };
        while b < end {
            if b.is_multiple_of(4) && end - b >= 4 {
                // Whole bytes at once.
                let first = (b / 4) as usize;
                let n = ((end - b) / 4) as usize;
                self.bytes[first..first + n].fill(fill);
                b += 4 * n as u64;
            } else {
                let byte = &mut self.bytes[(b / 4) as usize];
                let shift = (b % 4) * 2;
                *byte = (*byte & !(3 << shift)) | ((state as u8) << shift);
                b += 1;
            }
        }
        for page in start / BLOCKS_PER_PAGE..=(end - 1) / BLOCKS_PER_PAGE {
            self.dirty_pages.insert(page);
        }
    }

    /// The first invalid entry, if any: state 3, or bits set past the last block.
    pub fn validate(&self) -> Result<(), MapError> {
        match self.invalid_entries(1).first() {
            Some(e) => Err(*e),
            None => Ok(()),
        }
    }

    /// Up to `limit` invalid entries.
    pub fn invalid_entries(&self, limit: usize) -> Vec<MapError> {
        let mut out = Vec::new();
        for (i, &byte) in self.bytes.iter().enumerate() {
            if byte == 0 {
                continue;
            }
            for k in 0..4u64 {
                let block = i as u64 * 4 + k;
                let v = (byte >> (k * 2)) & 3;
                if v == 3 || (v != 0 && block >= self.blocks) {
                    out.push(MapError { block, value: v });
                    if out.len() >= limit {
                        return out;
                    }
                }
            }
        }
        out
    }

    /// Resets invalid entries: to `Data` when `has_data(block)` says the
    /// data area holds something there, else `Absent`. Returns how many.
    pub fn fix_invalid(&mut self, mut has_data: impl FnMut(u64) -> bool) -> u64 {
        let bad = self.invalid_entries(usize::MAX);
        for e in &bad {
            let byte = (e.block / 4) as usize;
            let shift = (e.block % 4) * 2;
            let state = if e.block < self.blocks && has_data(e.block) {
                BlockState::Data
            } else {
                BlockState::Absent
            };
            self.bytes[byte] = (self.bytes[byte] & !(3 << shift)) | ((state as u8) << shift);
            self.dirty_pages.insert(e.block / BLOCKS_PER_PAGE);
        }
        bad.len() as u64
    }

    /// Runs of equal state in `[start, end)`: `(first_block, count, state)`.
    /// Skips all-absent stretches a word at a time.
    pub fn runs(&self, start: u64, end: u64) -> MapRuns<'_> {
        MapRuns {
            map: self,
            at: start,
            end: end.min(self.blocks),
        }
    }

    /// Marks every page dirty (after a bulk change through `raw_mut`).
    pub fn mark_all_dirty(&mut self) {
        let pages = (self.bytes.len() / MAP_PAGE) as u64;
        self.dirty_pages.extend(0..pages);
    }

    pub fn has_dirty_pages(&self) -> bool {
        !self.dirty_pages.is_empty()
    }

    /// Takes a copy of every dirty page and clears the dirty set. The copy is
    /// taken *before* the data sync, so the pages written after it name only
    /// data that sync made durable.
    pub fn take_dirty(&mut self) -> Vec<(u64, Vec<u8>)> {
        let pages = std::mem::take(&mut self.dirty_pages);
        pages
            .into_iter()
            .map(|p| {
                let s = p as usize * MAP_PAGE;
                (p, self.bytes[s..s + MAP_PAGE].to_vec())
            })
            .collect()
    }

    /// Puts pages back on the dirty set after a failed write.
    pub fn redirty(&mut self, pages: impl IntoIterator<Item = u64>) {
        self.dirty_pages.extend(pages);
    }

    /// Blocks in each state: (data, zero).
    pub fn counts(&self) -> (u64, u64) {
        let (mut data, mut zero) = (0, 0);
        for (_, n, s) in self.runs(0, self.blocks) {
            match s {
                BlockState::Data => data += n,
                BlockState::Zero => zero += n,
                BlockState::Absent => {}
            }
        }
        (data, zero)
    }
}

pub struct MapRuns<'a> {
    map: &'a AllocationMap,
    at: u64,
    end: u64,
}

impl Iterator for MapRuns<'_> {
    type Item = (u64, u64, BlockState);

    fn next(&mut self) -> Option<Self::Item> {
        let bytes = &self.map.bytes;
        loop {
            if self.at >= self.end {
                return None;
            }
            // Fast skip over absent bytes (4 blocks each), 8 bytes at a time.
            if self.at.is_multiple_of(4) {
                let mut i = (self.at / 4) as usize;
                let last = self.end.div_ceil(4) as usize;
                while i + 8 <= last && bytes[i..i + 8] == [0u8; 8] {
                    i += 8;
                }
                while i < last && bytes[i] == 0 {
                    i += 1;
                }
                let skipped_to = (i as u64 * 4).min(self.end);
                if skipped_to > self.at {
                    self.at = skipped_to;
                    continue;
                }
            }
            let start = self.at;
            let state = self.map.get(start);
            let mut b = start + 1;
            while b < self.end && self.map.get(b) == state {
                // Whole bytes of the same state at once.
                if b.is_multiple_of(4) {
                    let fill = match state {
                        BlockState::Absent => 0x00,
                        BlockState::Data => 0x55,
                        BlockState::Zero => 0xaa,
                    };
                    while b + 4 <= self.end && bytes[(b / 4) as usize] == fill {
                        b += 4;
                    }
                    if b >= self.end || self.map.get(b) != state {
                        break;
                    }
                }
                b += 1;
            }
            self.at = b;
            if state == BlockState::Absent {
                continue;
            }
            return Some((start, b - start, state));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn set_and_runs() {
        let mut m = AllocationMap::new(100, 4096);
        m.set_range(3, 10, BlockState::Data);
        m.set_range(8, 2, BlockState::Zero);
        m.set_range(50, 50, BlockState::Data);
        let runs: Vec<_> = m.runs(0, 100).collect();
        assert_eq!(
            runs,
            vec![
                (3, 5, BlockState::Data),
                (8, 2, BlockState::Zero),
                (10, 3, BlockState::Data),
                (50, 50, BlockState::Data)
            ]
        );
        assert_eq!(m.counts(), (58, 2));
        assert!(m.validate().is_ok());
    }

    #[test]
    fn invalid_states_are_found_and_fixed() {
        let mut m = AllocationMap::new(10, 4096);
        m.raw_mut()[1] = 0b1100_0000; // block 7 = 3
        m.raw_mut()[5] = 1; // block 20, past the end
        assert_eq!(m.validate().unwrap_err(), MapError { block: 7, value: 3 });
        assert_eq!(m.invalid_entries(10).len(), 2);
        assert_eq!(m.fix_invalid(|b| b == 7), 2);
        assert_eq!(m.get(7), BlockState::Data);
        assert!(m.validate().is_ok());
    }

    proptest! {
        #[test]
        fn arbitrary_map_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096), blocks in 0u64..16384) {
            let mut m = AllocationMap::new(blocks, 4096);
            m.raw_mut()[..bytes.len()].copy_from_slice(&bytes);
            let _ = m.validate();
            let total: u64 = m.runs(0, blocks).map(|r| r.1).sum();
            prop_assert!(total <= blocks);
            m.fix_invalid(|b| b % 2 == 0);
            prop_assert!(m.validate().is_ok());
        }

        #[test]
        fn runs_agree_with_get(ops in proptest::collection::vec((0u64..500, 1u64..64, 0u8..3), 0..40)) {
            let mut m = AllocationMap::new(600, 4096);
            for (s, n, st) in ops {
                let st = [BlockState::Absent, BlockState::Data, BlockState::Zero][st as usize];
                m.set_range(s, n.min(600 - s), st);
            }
            let mut expect = Vec::new();
            for b in 0..600 { if m.get(b) != BlockState::Absent { expect.push((b, m.get(b))); } }
            let mut got = Vec::new();
            for (s, n, st) in m.runs(0, 600) { for b in s..s + n { got.push((b, st)); } }
            prop_assert_eq!(got, expect);
        }
    }
}
