//! Writing guest memory into a snapshot's memory file, and merging a diff into its base.
//!
//! A full snapshot writes only pages that can hold data: those present in the mapping or
//! swapped out (/proc/self/pagemap) and, for a VM that was itself restored, those the parent's memory file has data
//! for (SEEK_DATA), since pages the guest never wrote are still read from that file. Of these,
//! pages that are all zero are left as holes. A diff snapshot writes the pages written since
//! the previous snapshot: by the guest (KVM's dirty log) and by vireo's devices (the dirty
//! bitmap of guest memory), zero or not, so that merging it over its base is exact.

use crate::memory::{slots, Memory};
use crate::vstate::vm::Vm;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

const PAGE: usize = 4096;
/// Bytes gathered before one write.
const WRITE_CHUNK: usize = 1 << 20;

/// What a memory dump wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DumpStats {
    /// Pages written.
    pub pages: u64,
}

/// Contiguous pages written with as few calls as possible.
struct Writer<'a> {
    file: &'a File,
    buf: Vec<u8>,
    at: u64,
    pages: u64,
}

impl Writer<'_> {
    fn page(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        if self.buf.is_empty() || self.at + self.buf.len() as u64 != offset {
            self.flush()?;
            self.at = offset;
        }
        self.buf.extend_from_slice(data);
        self.pages += 1;
        if self.buf.len() >= WRITE_CHUNK {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if !self.buf.is_empty() {
            self.file.write_all_at(&self.buf, self.at)?;
            self.at += self.buf.len() as u64;
            self.buf.clear();
        }
        Ok(())
    }
}

/// Which pages of `len` bytes at host address `host` are in RAM or in swap, from
/// /proc/self/pagemap (mincore would miss pages that were swapped out).
fn touched(host: *const u8, len: usize) -> std::io::Result<Vec<bool>> {
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    let pagemap = File::open("/proc/self/pagemap")?;
    let pages = len.div_ceil(PAGE);
    let mut raw = vec![0u8; pages * 8];
    pagemap.read_exact_at(&mut raw, (host as u64 / PAGE as u64) * 8)?;
    Ok(raw
        .chunks_exact(8)
        .map(|e| u64::from_le_bytes(e.try_into().unwrap_or_default()) & (PRESENT | SWAPPED) != 0)
        .collect())
}

/// Marks in `want` (one flag per page of a slot at file offset `base`, `len` bytes) the pages
/// for which `file` holds data.
fn file_data(file: &File, base: u64, len: u64, want: &mut [bool]) -> std::io::Result<()> {
    let fd = file.as_raw_fd();
    let end = base + len;
    let mut pos = base;
    while pos < end {
        // SAFETY: lseek on a descriptor `file` owns; no memory is involved.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                return Ok(());
            }
            return Err(e);
        }
        let data = data as u64;
        if data >= end {
            return Ok(());
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
        let hole = if hole < 0 {
            end
        } else {
            (hole as u64).min(end)
        };
        for p in ((data - base) / PAGE as u64)..(hole - base).div_ceil(PAGE as u64) {
            if let Some(w) = want.get_mut(p as usize) {
                *w = true;
            }
        }
        pos = hole;
    }
    Ok(())
}

/// Writes every page of `mem` that may hold data to `file` at its slot's offset, leaving
/// holes for the rest.
pub fn write_full(mem: &Memory, file: &File) -> std::io::Result<DumpStats> {
    let size: u64 = mem.guest.iter().map(|r| r.len()).sum();
    let mut w = Writer {
        file,
        buf: Vec::with_capacity(WRITE_CHUNK),
        at: 0,
        pages: 0,
    };
    let mut page = [0u8; PAGE];
    let layout = slots(size).map_err(std::io::Error::other)?;
    for (region, &(addr, len, offset)) in mem.guest.iter().zip(&layout) {
        let mut want = touched(region.as_ptr(), len)?;
        if let Some(parent) = &mem.backing {
            file_data(parent, offset, len as u64, &mut want)?;
        }
        for (p, _) in want.iter().enumerate().filter(|(_, &w)| w) {
            let at = addr.0 + (p * PAGE) as u64;
            mem.guest
                .read_slice(&mut page, GuestAddress(at))
                .map_err(std::io::Error::other)?;
            if page.iter().all(|&b| b == 0) {
                continue;
            }
            w.page(offset + (p * PAGE) as u64, &page)?;
        }
    }
    w.flush()?;
    Ok(DumpStats { pages: w.pages })
}

/// The bitmap of the pages vireo's devices wrote in `region`.
fn own_bitmap(region: &vm_memory::GuestRegionMmap<AtomicBitmap>) -> &AtomicBitmap {
    let mapping: &vm_memory::MmapRegion<AtomicBitmap> = region;
    mapping.bitmap()
}

/// Forgets which pages were written so far (KVM's dirty log and the devices' bitmap), so that
/// the next diff snapshot holds only what is written after this point.
pub fn reset_dirty(mem: &Memory, vm: &Vm) -> std::io::Result<()> {
    for (slot, region) in mem.guest.iter().enumerate() {
        if mem.track_dirty {
            vm.dirty_pages(slot as u32, region.len() as usize)
                .map_err(|e| std::io::Error::other(format!("KVM_GET_DIRTY_LOG: {e}")))?;
        }
        own_bitmap(region).reset();
    }
    Ok(())
}

/// Writes the pages written since the last snapshot (by the guest or by vireo) to `file`.
pub fn write_diff(mem: &Memory, vm: &Vm, file: &File) -> std::io::Result<DumpStats> {
    let size: u64 = mem.guest.iter().map(|r| r.len()).sum();
    let mut w = Writer {
        file,
        buf: Vec::with_capacity(WRITE_CHUNK),
        at: 0,
        pages: 0,
    };
    let mut page = [0u8; PAGE];
    let layout = slots(size).map_err(std::io::Error::other)?;
    for (slot, (region, &(addr, len, offset))) in mem.guest.iter().zip(&layout).enumerate() {
        let kvm = vm
            .dirty_pages(slot as u32, len)
            .map_err(|e| std::io::Error::other(format!("KVM_GET_DIRTY_LOG: {e}")))?;
        let ours = own_bitmap(region).get_and_reset();
        for p in 0..len / PAGE {
            let (word, bit) = (p / 64, p % 64);
            let dirty = kvm.get(word).is_some_and(|v| v >> bit & 1 != 0)
                || ours.get(word).is_some_and(|v| v >> bit & 1 != 0);
            if !dirty {
                continue;
            }
            let at = addr.0 + (p * PAGE) as u64;
            mem.guest
                .read_slice(&mut page, GuestAddress(at))
                .map_err(std::io::Error::other)?;
            w.page(offset + (p * PAGE) as u64, &page)?;
        }
    }
    w.flush()?;
    Ok(DumpStats { pages: w.pages })
}

/// Copies the data of the diff memory file `diff` over `base` (both `size` bytes of guest
/// memory), page runs as the diff file's data extents give them.
pub fn merge(base: &File, diff: &File, size: u64) -> std::io::Result<u64> {
    let mut want = vec![false; (size as usize).div_ceil(PAGE)];
    file_data(diff, 0, size, &mut want)?;
    let mut buf = vec![0u8; PAGE];
    let mut pages = 0;
    for (p, _) in want.iter().enumerate().filter(|(_, &w)| w) {
        let at = (p * PAGE) as u64;
        diff.read_exact_at(&mut buf, at)?;
        base.write_all_at(&buf, at)?;
        pages += 1;
    }
    Ok(pages)
}
