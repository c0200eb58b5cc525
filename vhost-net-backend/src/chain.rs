//! One descriptor chain's buffers as the device uses them: checked to be
//! all readable or all writable and inside guest memory, as iovecs for
//! the tap, and read or written at a logical offset across the buffers
//! (VERSION_1 lets a driver lay a header or a command out over any
//! number of descriptors).

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// More buffers than this in one chain are refused (the tap's readv and
/// writev take at most 1024 iovecs; one is kept for the receive overflow).
pub const MAX_BUFFERS: usize = 1023;

/// A chain's buffers: (guest address, length) each, and the same as
/// iovecs over guest memory.
#[derive(Default)]
pub struct Buffers {
    pub parts: Vec<(GuestAddress, usize)>,
    pub iov: Vec<libc::iovec>,
    pub total: usize,
}

impl Buffers {
    /// Fills in the buffers of `descs` (address, length, device-writable):
    /// all writable (`write`) or all readable, else the reason why not.
    pub fn fill(
        &mut self,
        mem: &GuestMemoryMmap,
        descs: impl Iterator<Item = (GuestAddress, u32, bool)>,
        write: bool,
    ) -> Result<(), String> {
        self.parts.clear();
        self.iov.clear();
        self.total = 0;
        for (addr, len, writable) in descs {
            if writable != write {
                return Err(if write {
                    "a receive buffer the device may not write".into()
                } else {
                    "a transmit buffer the device would have to write".into()
                });
            }
            if self.parts.len() == MAX_BUFFERS {
                return Err(format!("more than {MAX_BUFFERS} buffers in one frame"));
            }
            let slice = mem
                .get_slice(addr, len as usize)
                .map_err(|e| format!("buffer at {:#x}+{len}: {e}", addr.0))?;
            self.iov.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            });
            self.parts.push((addr, len as usize));
            self.total += len as usize;
        }
        Ok(())
    }

    /// Writes `bytes` at logical offset `at` across the buffers; false if
    /// they end first.
    pub fn write_at(&self, mem: &GuestMemoryMmap, at: usize, bytes: &[u8]) -> bool {
        let mut done = 0;
        let mut start = 0;
        for &(addr, len) in &self.parts {
            let end = start + len;
            while done < bytes.len() && at + done >= start && at + done < end {
                let a = GuestAddress(addr.0 + (at + done - start) as u64);
                if mem.write_obj(bytes[done], a).is_err() {
                    return false;
                }
                done += 1;
            }
            start = end;
        }
        done == bytes.len()
    }

    /// Reads up to `out.len()` bytes from the buffers' start; how many.
    pub fn read_start(&self, mem: &GuestMemoryMmap, out: &mut [u8]) -> usize {
        let mut got = 0;
        for &(addr, len) in &self.parts {
            let n = len.min(out.len() - got);
            if n == 0 {
                break;
            }
            if mem.read_slice(&mut out[got..got + n], addr).is_err() {
                break;
            }
            got += n;
        }
        got
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logical_offsets_cross_buffers() {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 16)]).expect("memory");
        let mut b = Buffers::default();
        let descs = [(0x100u64, 6u32), (0x200, 6), (0x300, 100)];
        b.fill(
            &m,
            descs.iter().map(|&(a, l)| (GuestAddress(a), l, true)),
            true,
        )
        .expect("fill");
        assert_eq!(b.total, 112);
        assert!(b.write_at(&m, 10, &[1, 0]));
        assert_eq!(m.read_obj::<u16>(GuestAddress(0x204)).expect("r"), 1);
        assert!(b.write_at(&m, 5, &[7, 8]));
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x105)).expect("r"), 7);
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x200)).expect("r"), 8);
        assert!(!b.write_at(&m, 111, &[1, 2]));
        let mut out = [0u8; 8];
        assert_eq!(b.read_start(&m, &mut out), 8);
        assert_eq!(out[5..7], [7, 8]);
        // Mixed directions and memory that is not there are refused.
        let mixed = [(GuestAddress(0), 4, true), (GuestAddress(8), 4, false)];
        assert!(b.fill(&m, mixed.into_iter(), true).is_err());
        let outside = [(GuestAddress(1 << 20), 4, true)];
        assert!(b.fill(&m, outside.into_iter(), true).is_err());
    }
}
