//! The merged index of an open chain: which layer owns each guest block.
//!
//! One 32-bit word per chunk of [`CHUNK_BLOCKS`] blocks: either the owner of
//! the whole chunk, or (high bit set) the number of a 16-byte slab holding an
//! owner per block. A lookup is one or two array reads at any chain depth.
//! Owner 0 means "reads as zeros"; owner `k` is layer `k - 1` of the chain,
//! counted from the base.

pub const CHUNK_BLOCKS: u64 = 16;
const MIXED: u32 = 1 << 31;

pub type Owner = u8;
pub const ZERO_OWNER: Owner = 0;

#[derive(Debug, Clone, Default)]
pub struct Index {
    chunks: Vec<u32>,
    slabs: Vec<[Owner; CHUNK_BLOCKS as usize]>,
    free_slabs: Vec<u32>,
    blocks: u64,
}

impl Index {
    pub fn new(blocks: u64) -> Self {
        Index {
            // Zeroed allocation: an untouched disk costs no resident memory.
            chunks: vec![0u32; blocks.div_ceil(CHUNK_BLOCKS) as usize],
            slabs: Vec::new(),
            free_slabs: Vec::new(),
            blocks,
        }
    }

    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Heap bytes in use (what the index costs, for the memory figures).
    pub fn memory_bytes(&self) -> usize {
        self.chunks.capacity() * 4
            + self.slabs.capacity() * CHUNK_BLOCKS as usize
            + self.free_slabs.capacity() * 4
    }

    /// Returns unused capacity after a bulk build (the slab vector grows by
    /// doubling).
    pub fn shrink(&mut self) {
        self.slabs.shrink_to_fit();
        self.free_slabs.shrink_to_fit();
    }

    /// Chunks whose blocks have different owners.
    pub fn mixed_chunks(&self) -> usize {
        self.slabs.len() - self.free_slabs.len()
    }

    #[inline]
    pub fn owner(&self, block: u64) -> Owner {
        let w = self.chunks[(block / CHUNK_BLOCKS) as usize];
        if w & MIXED == 0 {
            w as Owner
        } else {
            self.slabs[(w & !MIXED) as usize][(block % CHUNK_BLOCKS) as usize]
        }
    }

    /// The owner of `block` and how many blocks from it on share that owner
    /// (at most up to `limit`).
    #[inline]
    pub fn run(&self, block: u64, limit: u64) -> (Owner, u64) {
        let owner = self.owner(block);
        let mut b = block + 1;
        while b < limit {
            let w = self.chunks[(b / CHUNK_BLOCKS) as usize];
            if w & MIXED == 0 && b.is_multiple_of(CHUNK_BLOCKS) {
                if w as Owner != owner {
                    break;
                }
                b += CHUNK_BLOCKS;
            } else {
                if self.owner(b) != owner {
                    break;
                }
                b += 1;
            }
        }
        (owner, b.min(limit) - block)
    }

    fn alloc_slab(&mut self, fill: Owner) -> u32 {
        let slab = [fill; CHUNK_BLOCKS as usize];
        match self.free_slabs.pop() {
            Some(i) => {
                self.slabs[i as usize] = slab;
                i
            }
            None => {
                self.slabs.push(slab);
                (self.slabs.len() - 1) as u32
            }
        }
    }

    /// Gives `[start, start + count)` to `owner`.
    pub fn set_range(&mut self, start: u64, count: u64, owner: Owner) {
        let end = (start + count).min(self.blocks);
        let mut b = start;
        while b < end {
            let chunk = (b / CHUNK_BLOCKS) as usize;
            let chunk_start = chunk as u64 * CHUNK_BLOCKS;
            let chunk_end = chunk_start + CHUNK_BLOCKS;
            let w = self.chunks[chunk];
            if b == chunk_start && end >= chunk_end {
                if w & MIXED != 0 {
                    self.free_slabs.push(w & !MIXED);
                }
                self.chunks[chunk] = owner as u32;
                b = chunk_end;
                continue;
            }
            let upto = end.min(chunk_end);
            if w & MIXED == 0 {
                if w as Owner == owner {
                    b = upto;
                    continue;
                }
                let slab = self.alloc_slab(w as Owner);
                self.chunks[chunk] = slab | MIXED;
            }
            let slab_no = (self.chunks[chunk] & !MIXED) as usize;
            let slab = &mut self.slabs[slab_no];
            for i in b..upto {
                slab[(i - chunk_start) as usize] = owner;
            }
            // Collapse back to one word when the chunk became uniform.
            if slab.iter().all(|&o| o == slab[0]) {
                let o = slab[0];
                self.free_slabs.push(slab_no as u32);
                self.chunks[chunk] = o as u32;
            }
            b = upto;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn matches_a_flat_array(ops in proptest::collection::vec((0u64..300, 1u64..70, 0u8..5), 0..60)) {
            let mut idx = Index::new(300);
            let mut flat = vec![0u8; 300];
            for (s, n, o) in ops {
                idx.set_range(s, n, o);
                for b in s..(s + n).min(300) { flat[b as usize] = o; }
            }
            let mut b = 0;
            while b < 300 {
                let (o, n) = idx.run(b, 300);
                prop_assert!(n >= 1);
                for k in b..b + n { prop_assert_eq!(flat[k as usize], o); }
                if b + n < 300 { prop_assert_ne!(flat[(b + n) as usize], o); }
                b += n;
            }
        }
    }

    #[test]
    fn uniform_chunks_cost_no_slab() {
        let mut idx = Index::new(1 << 20);
        idx.set_range(0, 1 << 20, 3);
        idx.set_range(5, 1, 4);
        assert_eq!(idx.mixed_chunks(), 1);
        idx.set_range(5, 1, 3);
        assert_eq!(idx.mixed_chunks(), 0);
    }
}
