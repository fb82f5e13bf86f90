//! Giving guest pages back to the host, for whatever backs them.

use crate::virtio::GuestMemoryMmap;
use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

/// mmap flags of the anonymous mapping put over released file-backed pages.
pub(super) const ANON_FIXED_FLAGS: i32 =
    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE;

const HUGE_PAGE: u64 = 2 << 20;

/// Releases `len` bytes of guest memory from `addr` on the host, and returns how many bytes
/// were released:
/// * private anonymous memory (a booted VM, a Uffd restore): `madvise(MADV_DONTNEED)`; the
///   pages read as zero afterwards, and a Uffd page-fault handler that asked for
///   UFFD_EVENT_REMOVE hears of it;
/// * a private mapping of a snapshot file: an anonymous mapping is put over the range, so the
///   pages neither keep their copies nor fall back to the file's contents;
/// * 2 MiB hugetlbfs pages: only whole huge pages inside the range can be released.
///
/// Released pages are marked dirty: their contents changed (to zeros) behind KVM's dirty log,
/// and a diff snapshot must carry them.
pub fn release_range(mem: &GuestMemoryMmap, addr: GuestAddress, len: u64) -> Result<u64, String> {
    let mut done = 0u64;
    let mut released = 0u64;
    while done < len {
        let at = addr
            .0
            .checked_add(done)
            .ok_or_else(|| format!("range at {:#x} wraps around", addr.0))?;
        let region = mem
            .find_region(GuestAddress(at))
            .ok_or_else(|| format!("{at:#x} is outside guest memory"))?;
        let offset = at - region.start_addr().0;
        let n = (len - done).min(region.len() - offset);
        released += release_in_region(region, offset, n)?;
        region.bitmap().mark_dirty(offset as usize, n as usize);
        done += n;
    }
    Ok(released)
}

fn release_in_region(
    region: &vm_memory::GuestRegionMmap<vm_memory::bitmap::AtomicBitmap>,
    offset: u64,
    len: u64,
) -> Result<u64, String> {
    let (offset, len) = if region.flags() & libc::MAP_HUGETLB != 0 {
        let start = offset.next_multiple_of(HUGE_PAGE);
        let end = (offset + len) / HUGE_PAGE * HUGE_PAGE;
        if end <= start {
            return Ok(0);
        }
        (start, end - start)
    } else {
        (offset, len)
    };
    let host = region
        .get_host_address(MemoryRegionAddress(offset))
        .map_err(|e| format!("guest range at region offset {offset:#x}: {e}"))?;
    let len_usize = len as usize;
    if region.file_offset().is_some() {
        // SAFETY: [host, host + len) lies inside one live mapping of guest memory (checked
        // above against the region's length); replacing it with an anonymous private mapping
        // of the same protection keeps it valid for every user (KVM follows through its MMU
        // notifier), and only drops contents the guest gave up.
        let p = unsafe {
            libc::mmap(
                host.cast(),
                len_usize,
                libc::PROT_READ | libc::PROT_WRITE,
                ANON_FIXED_FLAGS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(format!(
                "cannot replace {len} bytes of file-backed guest memory: {}",
                std::io::Error::last_os_error()
            ));
        }
    } else {
        // SAFETY: [host, host + len) lies inside one live private mapping of guest memory;
        // MADV_DONTNEED only drops its pages, which then read as zero.
        let r = unsafe { libc::madvise(host.cast(), len_usize, libc::MADV_DONTNEED) };
        if r != 0 {
            return Err(format!(
                "cannot release {len} bytes of guest memory: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(len)
}

/// Whether the guest page at `addr` is backed by a 2 MiB hugetlbfs page.
pub(super) fn is_huge(mem: &GuestMemoryMmap, addr: GuestAddress) -> bool {
    mem.find_region(addr)
        .is_some_and(|r| r.flags() & libc::MAP_HUGETLB != 0)
}

/// Whether any of guest memory is backed by hugetlbfs pages.
pub(super) fn any_huge(mem: &GuestMemoryMmap) -> bool {
    mem.iter().any(|r| r.flags() & libc::MAP_HUGETLB != 0)
}

/// The 4 KiB pages a guest gave up inside each 2 MiB huge page: a huge page can only be
/// released once all 512 of its pages are in the balloon, and the driver gives them a few at
/// a time (256 per chain for Linux), so they are counted across chains.
#[derive(Default)]
pub(super) struct HugePages {
    given: std::collections::HashMap<u64, [u64; 8]>,
}

const SUBPAGES: u64 = HUGE_PAGE >> 12;

impl HugePages {
    /// Records page `pfn` as given; returns the address of its huge page once all of that
    /// huge page is given.
    pub(super) fn give(&mut self, pfn: u64) -> Option<GuestAddress> {
        let huge = pfn / SUBPAGES;
        let bit = pfn % SUBPAGES;
        let bits = self.given.entry(huge).or_default();
        bits[(bit / 64) as usize] |= 1 << (bit % 64);
        if bits.iter().all(|w| *w == u64::MAX) {
            self.given.remove(&huge);
            return Some(GuestAddress(huge * HUGE_PAGE));
        }
        None
    }

    /// Forgets page `pfn` (the guest took it back).
    pub(super) fn take_back(&mut self, pfn: u64) {
        let huge = pfn / SUBPAGES;
        let bit = pfn % SUBPAGES;
        if let Some(bits) = self.given.get_mut(&huge) {
            bits[(bit / 64) as usize] &= !(1 << (bit % 64));
            if bits.iter().all(|w| *w == 0) {
                self.given.remove(&huge);
            }
        }
    }
}
