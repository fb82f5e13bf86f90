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
