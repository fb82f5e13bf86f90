//! Writing guest memory into a snapshot's memory file, and merging a diff into its base.
//!
//! A full snapshot writes only pages that can hold data: those present in the mapping or
//! swapped out (/proc/self/pagemap) and, for a VM that was itself restored, those the parent's
//! memory file has data for (SEEK_DATA), since pages the guest never wrote are still read from
//! that file (a VM whose pages a userfaultfd handler fills has every page read). Of these,
//! pages that are all zero are left as holes. A diff snapshot writes the pages written since
//! the previous snapshot: by the guest (KVM's dirty log) and by vireo's devices (the dirty
//! bitmap of guest memory), zero or not, so that merging it over its base is exact.

use crate::memory::{Backing, Memory};
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

/// Writes to `file` the pages `pick` chooses in each memory slot (given the slot number, its
/// region, length and file offset), each at its slot's offset; with `skip_zero`, pages that
/// are all zero stay holes.
fn dump(
    mem: &Memory,
    file: &File,
    skip_zero: bool,
    mut pick: impl FnMut(
        usize,
        &vm_memory::GuestRegionMmap<AtomicBitmap>,
        usize,
        u64,
    ) -> std::io::Result<Vec<bool>>,
) -> std::io::Result<DumpStats> {
    let mut w = Writer {
        file,
        buf: Vec::with_capacity(WRITE_CHUNK),
        at: 0,
        pages: 0,
    };
    let mut page = [0u8; PAGE];
    for (slot, (region, offset)) in crate::memory::file_layout(&mem.guest)
        .into_iter()
        .enumerate()
    {
        let (addr, len) = (region.start_addr(), region.len() as usize);
        let want = pick(slot, region, len, offset)?;
        for (p, _) in want.iter().enumerate().filter(|(_, &w)| w) {
            let at = addr.0 + (p * PAGE) as u64;
            mem.guest
                .read_slice(&mut page, GuestAddress(at))
                .map_err(std::io::Error::other)?;
            if skip_zero && page.iter().all(|&b| b == 0) {
                continue;
            }
            w.page(offset + (p * PAGE) as u64, &page)?;
        }
    }
    w.flush()?;
    Ok(DumpStats { pages: w.pages })
}

/// Writes every page of `mem` that may hold data to `file` at its slot's offset, leaving
/// holes for the rest.
pub fn write_full(mem: &Memory, file: &File) -> std::io::Result<DumpStats> {
    dump(mem, file, true, |_, region, len, offset| {
        let mut want = match &mem.backing {
            // Pages the handler has not filled yet are only in its source: every page is read
            // (which makes the handler fill it).
            Backing::Uffd(_) => vec![true; len.div_ceil(PAGE)],
            _ => touched(region.as_ptr(), len)?,
        };
        if let Backing::File(parent) = &mem.backing {
            file_data(parent, offset, len as u64, &mut want)?;
        }
        Ok(want)
    })
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
        // The hotplug region's KVM slots come and go with plugging: diffs take its resident
        // pages instead of a dirty log.
        if mem.track_dirty && Some(region.start_addr()) != mem.hotplug {
            vm.dirty_pages(slot as u32, region.len() as usize)
                .map_err(|e| std::io::Error::other(format!("KVM_GET_DIRTY_LOG: {e}")))?;
        }
        own_bitmap(region).reset();
    }
    Ok(())
}

/// Writes the pages written since the last snapshot (by the guest or by vireo) to `file`.
pub fn write_diff(mem: &Memory, vm: &Vm, file: &File) -> std::io::Result<DumpStats> {
    dump(mem, file, false, |slot, region, len, _| {
        if Some(region.start_addr()) == mem.hotplug {
            own_bitmap(region).reset();
            return touched(region.as_ptr(), len);
        }
        let kvm = vm
            .dirty_pages(slot as u32, len)
            .map_err(|e| std::io::Error::other(format!("KVM_GET_DIRTY_LOG: {e}")))?;
        let ours = own_bitmap(region).get_and_reset();
        let dirty =
            |words: &[u64], p: usize| words.get(p / 64).is_some_and(|v| v >> (p % 64) & 1 != 0);
        Ok((0..len / PAGE)
            .map(|p| dirty(&kvm, p) || dirty(&ours, p))
            .collect())
    })
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

#[cfg(test)]
mod tests {
    use super::*;
    use devices::virtio::buffers::{host_iovecs, Access};

    fn scratch(name: &str) -> (File, std::path::PathBuf) {
        let p = std::env::temp_dir().join(format!("vireo-mem-{}-{name}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        (f, p)
    }

    fn data_pages(f: &File, size: u64) -> Vec<usize> {
        let mut want = vec![false; size as usize / PAGE];
        file_data(f, 0, size, &mut want).unwrap();
        want.iter()
            .enumerate()
            .filter(|(_, &w)| w)
            .map(|(i, _)| i)
            .collect()
    }

    /// Pages vireo writes (through vm-memory, or through raw addresses handed to the kernel)
    /// are in the next diff even though KVM's dirty log never sees them.
    #[test]
    fn a_diff_holds_the_pages_vireo_wrote() {
        let size = 4u64 << 20;
        let mut vm = Vm::new().unwrap();
        let mem = Memory::anonymous(size, true).unwrap();
        vm.register_memory(&mem.guest, true, None).unwrap();
        reset_dirty(&mem, &vm).unwrap();
        mem.guest.write_obj(0xabu8, GuestAddress(0x3004)).unwrap();
        let mut iov = Vec::new();
        host_iovecs(
            &mem.guest,
            GuestAddress(0x5ff0),
            0x20,
            Access::Write,
            &mut iov,
        )
        .unwrap();
        let mut read_only = Vec::new();
        host_iovecs(
            &mem.guest,
            GuestAddress(0x9000),
            16,
            Access::Read,
            &mut read_only,
        )
        .unwrap();
        let (f, p) = scratch("diff");
        f.set_len(size).unwrap();
        let stats = write_diff(&mem, &vm, &f).unwrap();
        assert_eq!(
            stats.pages, 3,
            "0x3000, and 0x5000 and 0x6000 (the write spans both)"
        );
        assert_eq!(data_pages(&f, size), [3, 5, 6]);
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, 0x3004).unwrap();
        assert_eq!(b[0], 0xab);
        // Nothing written since: the next diff is empty.
        let (g, q) = scratch("diff2");
        g.set_len(size).unwrap();
        assert_eq!(write_diff(&mem, &vm, &g).unwrap().pages, 0);
        let _ = std::fs::remove_file(p);
        let _ = std::fs::remove_file(q);
    }

    /// A full dump skips untouched and all-zero pages, and merging a diff over it gives the
    /// later memory.
    #[test]
    fn full_dumps_are_sparse_and_a_merged_diff_updates_them() {
        let size = 4u64 << 20;
        let mut vm = Vm::new().unwrap();
        let mem = Memory::anonymous(size, true).unwrap();
        vm.register_memory(&mem.guest, true, None).unwrap();
        mem.guest.write_obj(7u64, GuestAddress(0x1000)).unwrap();
        mem.guest.write_obj(0u64, GuestAddress(0x2000)).unwrap();
        mem.guest.write_obj(9u64, GuestAddress(0x30_0000)).unwrap();
        let (full, p) = scratch("full");
        full.set_len(size).unwrap();
        assert_eq!(write_full(&mem, &full).unwrap().pages, 2);
        assert_eq!(data_pages(&full, size), [1, 0x300]);
        reset_dirty(&mem, &vm).unwrap();
        mem.guest.write_obj(8u64, GuestAddress(0x1000)).unwrap();
        mem.guest.write_obj(5u64, GuestAddress(0x2000)).unwrap();
        let (diff, q) = scratch("merge-diff");
        diff.set_len(size).unwrap();
        assert_eq!(write_diff(&mem, &vm, &diff).unwrap().pages, 2);
        assert_eq!(merge(&full, &diff, size).unwrap(), 2);
        let read = |at: u64| {
            let mut b = [0u8; 8];
            full.read_exact_at(&mut b, at).unwrap();
            u64::from_le_bytes(b)
        };
        assert_eq!((read(0x1000), read(0x2000), read(0x30_0000)), (8, 5, 9));
        let _ = std::fs::remove_file(p);
        let _ = std::fs::remove_file(q);
    }
}
