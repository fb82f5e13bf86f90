//! Guest memory: one private mapping per RAM slot of the layout, either anonymous (a VM that
//! boots) or of a snapshot's memory file (a restored VM, copy-on-write: restoring costs page
//! tables, not I/O, and clones of one snapshot share its page cache).

use std::fs::File;
use thiserror::Error;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::{MmapRegionBuilder, NewBitmap};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestRegionMmap};

/// Guest memory as vireo maps it (with the devices' dirty bitmap).
pub type GuestMemoryMmap = devices::virtio::GuestMemoryMmap;

/// Errors creating guest memory.
#[derive(Debug, Error)]
pub enum Error {
    /// The size does not fit the layout.
    #[error(transparent)]
    Layout(#[from] arch::layout::Error),
    /// The Uffd backend could not be set up.
    #[error("{0}")]
    Uffd(String),
    /// mmap failed.
    #[error("cannot map {size} bytes of guest memory: {err}")]
    Map {
        /// Bytes asked for.
        size: u64,
        /// Cause.
        err: String,
    },
}

/// A VM's RAM and what it is backed by.
pub struct Memory {
    /// The guest's RAM.
    pub guest: GuestMemoryMmap,
    /// Whether KVM logs the pages the guest writes (for diff snapshots).
    pub track_dirty: bool,
    /// Where pages the guest has not written yet come from.
    pub backing: Backing,
    /// The memory hotplug region, if any: part of `guest` (devices reach what the guest
    /// plugs), but guest RAM only where its slots are plugged.
    pub hotplug: Option<GuestAddress>,
}

/// Where a VM's memory pages come from before the guest writes them.
pub enum Backing {
    /// Zero pages (a booted VM).
    Anonymous,
    /// A snapshot memory file mapped privately; unwritten pages are read from it.
    File(File),
    /// A page-fault handler fills pages on first touch through this userfaultfd; pages it has
    /// not filled yet exist only in the handler's source.
    Uffd(File),
}

/// Every region of `guest` in address order with where it lies in a snapshot memory file:
/// regions follow each other there (RAM, then the hotplug region).
pub fn file_layout(guest: &GuestMemoryMmap) -> Vec<(&GuestRegionMmap<AtomicBitmap>, u64)> {
    use vm_memory::GuestMemoryRegion;
    let mut offset = 0;
    guest
        .iter()
        .map(|r| {
            let at = offset;
            offset += r.len();
            (r, at)
        })
        .collect()
}

/// Where each RAM slot starts in guest physical memory, how long it is, and where it lies
/// in a snapshot memory file (slots follow each other there).
pub fn slots(size: u64) -> Result<Vec<(GuestAddress, usize, u64)>, Error> {
    let mut offset = 0;
    Ok(arch::layout::ram_regions(size)?
        .into_iter()
        .map(|(start, len)| {
            let slot = (GuestAddress(start), len as usize, offset);
            offset += len;
            slot
        })
        .collect())
}

impl Memory {
    /// Maps `size` bytes of anonymous guest RAM; pages are backed when first touched.
    pub fn anonymous(size: u64, track_dirty: bool) -> Result<Self, Error> {
        Self::anonymous_with(size, track_dirty, crate::config::HugePages::None, false)
    }

    /// [`Memory::anonymous`] on the pages `huge` asks for, mergeable by KSM with `merge`.
    pub fn anonymous_with(
        size: u64,
        track_dirty: bool,
        huge: crate::config::HugePages,
        merge: bool,
    ) -> Result<Self, Error> {
        use crate::config::HugePages;
        use vm_memory::GuestMemoryRegion;
        if huge == HugePages::Huge2M {
            check_huge_pages(size)?;
        }
        let extra = if huge == HugePages::Huge2M {
            libc::MAP_HUGETLB | libc::MAP_HUGE_2MB
        } else {
            0
        };
        let guest = Self::map(size, None, extra)?;
        let advice = [
            (
                huge == HugePages::Transparent,
                libc::MADV_HUGEPAGE,
                "MADV_HUGEPAGE",
            ),
            (merge, libc::MADV_MERGEABLE, "MADV_MERGEABLE"),
        ];
        for (wanted, advice, name) in advice {
            if !wanted {
                continue;
            }
            for region in guest.iter() {
                // SAFETY: the range is one whole guest RAM mapping that `guest` owns; the advice
                // only changes how the kernel backs it, not its contents.
                let r =
                    unsafe { libc::madvise(region.as_ptr().cast(), region.len() as usize, advice) };
                if r != 0 {
                    return Err(Error::Map {
                        size,
                        err: format!("{name}: {}", std::io::Error::last_os_error()),
                    });
                }
            }
        }
        Ok(Self {
            guest,
            track_dirty,
            backing: Backing::Anonymous,
            hotplug: None,
        })
    }

    /// Maps `size` bytes of guest RAM privately from `file` (a snapshot's memory file).
    pub fn from_file(file: File, size: u64, track_dirty: bool) -> Result<Self, Error> {
        let guest = Self::map(size, Some(&file), 0)?;
        Ok(Self {
            guest,
            track_dirty,
            backing: Backing::File(file),
            hotplug: None,
        })
    }

    /// Maps `size` bytes of anonymous guest RAM whose pages the page-fault handler listening
    /// on `socket` fills, as Firecracker's Uffd backend does: the RAM is registered with a
    /// userfaultfd, which is sent to the handler (SCM_RIGHTS) with a JSON list of the regions
    /// (`base_host_virt_addr`, `size`, `offset` in the memory file, `page_size`, and the older
    /// `page_size_kib`, which also holds bytes). With `remove_events` (a VM with a balloon) the
    /// handler also gets UFFD_EVENT_REMOVE for every range the balloon releases, and must read
    /// those events: the releasing thread waits until it has.
    pub fn from_uffd(
        size: u64,
        track_dirty: bool,
        socket: &std::path::Path,
        remove_events: bool,
        hotplug: Option<(GuestAddress, u64)>,
    ) -> Result<Self, Error> {
        let mut memory = Self {
            guest: Self::map(size, None, 0)?,
            track_dirty,
            backing: Backing::Anonymous,
            hotplug: None,
        };
        if let Some((addr, len)) = hotplug {
            memory.add_hotplug(addr, len, None)?;
        }
        use vm_memory::GuestMemoryRegion;
        let guest = memory.guest;
        let uffd = uffd::register(&guest, remove_events)
            .map_err(|e| Error::Uffd(format!("userfaultfd: {e}")))?;
        let mappings: Vec<serde_json::Value> = file_layout(&guest)
            .into_iter()
            .map(|(region, offset)| {
                serde_json::json!({
                    "base_host_virt_addr": region.as_ptr() as u64,
                    "size": region.len(),
                    "offset": offset,
                    "page_size": uffd::PAGE,
                    "page_size_kib": uffd::PAGE,
                })
            })
            .collect();
        let body = serde_json::to_vec(&mappings).unwrap_or_default();
        let stream = std::os::unix::net::UnixStream::connect(socket).map_err(|e| {
            Error::Uffd(format!(
                "cannot connect to the page-fault handler at {}: {e}",
                socket.display()
            ))
        })?;
        use std::os::fd::AsRawFd;
        use vmm_sys_util::sock_ctrl_msg::ScmSocket;
        stream
            .send_with_fd(&body[..], uffd.as_raw_fd())
            .map_err(|e| {
                Error::Uffd(format!(
                    "cannot send the userfaultfd to the page-fault handler at {}: {e}",
                    socket.display()
                ))
            })?;
        Ok(Self {
            guest,
            track_dirty,
            backing: Backing::Uffd(uffd),
            hotplug: memory.hotplug,
        })
    }

    /// Adds the memory hotplug region, `size` bytes at `addr`: anonymous, backed only where the
    /// guest writes, or a private mapping of `file` from `offset` (a restored VM).
    pub fn add_hotplug(
        &mut self,
        addr: GuestAddress,
        size: u64,
        file: Option<(&File, u64)>,
    ) -> Result<(), Error> {
        let err = |e: String| Error::Map { size, err: e };
        let len = usize::try_from(size).map_err(|e| err(e.to_string()))?;
        let mut builder = MmapRegionBuilder::new_with_bitmap(len, AtomicBitmap::with_len(len))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE);
        builder = match file {
            Some((f, offset)) => builder
                .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
                .with_file_offset(FileOffset::new(
                    f.try_clone().map_err(|e| err(e.to_string()))?,
                    offset,
                )),
            None => builder
                .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE),
        };
        let region = builder.build().map_err(|e| err(e.to_string()))?;
        let region = GuestRegionMmap::new(region, addr)
            .ok_or_else(|| err("the hotplug region ends past the address space".into()))?;
        self.guest = self
            .guest
            .insert_region(std::sync::Arc::new(region))
            .map_err(|e| err(e.to_string()))?;
        self.hotplug = Some(addr);
        Ok(())
    }

    /// Maps the RAM slots of a `size`-byte guest, from `file` or anonymous with `extra` mmap
    /// flags (huge pages).
    fn map(size: u64, file: Option<&File>, extra: i32) -> Result<GuestMemoryMmap, Error> {
        let err = |e: String| Error::Map { size, err: e };
        let mut regions = Vec::new();
        for (addr, len, offset) in slots(size)? {
            let mut builder = MmapRegionBuilder::new_with_bitmap(len, AtomicBitmap::with_len(len))
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE);
            match &file {
                Some(f) => {
                    let f = f.try_clone().map_err(|e| err(e.to_string()))?;
                    builder = builder.with_file_offset(FileOffset::new(f, offset));
                }
                None => {
                    // Huge pages are reserved at once (no MAP_NORESERVE): a pool too small is an
                    // error now, not a SIGBUS when the guest touches the page it lacks.
                    let flags = if extra != 0 {
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | extra
                    } else {
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE
                    };
                    builder = builder.with_mmap_flags(flags);
                }
            }
            let region = builder.build().map_err(|e| err(e.to_string()))?;
            regions.push(
                GuestRegionMmap::new(region, addr)
                    .ok_or_else(|| err("a region ends past the address space".into()))?,
            );
        }
        GuestMemoryMmap::from_regions(regions).map_err(|e| err(e.to_string()))
    }
}

/// Refuses a 2 MiB-page guest of `size` bytes the host's free huge pages cannot hold, saying
/// how many it has and how to get more.
fn check_huge_pages(size: u64) -> Result<(), Error> {
    const HUGE: u64 = 2 << 20;
    if !size.is_multiple_of(HUGE) {
        return Err(Error::Map {
            size,
            err: "huge_pages 2M: the memory size must be a multiple of 2 MiB".into(),
        });
    }
    let info = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| -> Option<u64> {
        info.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
    };
    let need = size / HUGE;
    let free = field("HugePages_Free:").unwrap_or(0);
    let page_kib = field("Hugepagesize:").unwrap_or(2048);
    if page_kib != 2048 {
        return Err(Error::Map {
            size,
            err: format!("huge_pages 2M: this host's default huge page size is {page_kib} KiB"),
        });
    }
    if free < need {
        return Err(Error::Map {
            size,
            err: format!(
                "huge_pages 2M: the guest needs {need} free 2 MiB huge pages and the host has {free} (raise /proc/sys/vm/nr_hugepages)"
            ),
        });
    }
    Ok(())
}

/// The userfaultfd calls (linux/userfaultfd.h), which no crate vireo uses wraps.
mod uffd {
    use super::GuestMemoryMmap;
    use std::fs::File;
    use std::os::fd::FromRawFd;
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

    /// Page size the handler fills in.
    pub const PAGE: usize = 4096;
    const UFFD_API: u64 = 0xaa;
    const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
    const UFFD_FEATURE_EVENT_REMOVE: u64 = 1 << 3;

    #[repr(C)]
    struct UffdioApi {
        api: u64,
        features: u64,
        ioctls: u64,
    }

    #[repr(C)]
    struct UffdioRegister {
        start: u64,
        len: u64,
        mode: u64,
        ioctls: u64,
    }

    vmm_sys_util::ioctl_iowr_nr!(UFFDIO_API, 0xaa, 0x3f, UffdioApi);
    vmm_sys_util::ioctl_iowr_nr!(UFFDIO_REGISTER, 0xaa, 0x00, UffdioRegister);

    /// A userfaultfd with every region of `mem` registered for missing-page faults, and
    /// remove events if asked for.
    pub fn register(mem: &GuestMemoryMmap, remove_events: bool) -> std::io::Result<File> {
        // SAFETY: the syscall takes only flags and returns a new descriptor or -1.
        let fd =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor nothing else owns.
        let file = unsafe { File::from_raw_fd(fd as i32) };
        let mut api = UffdioApi {
            api: UFFD_API,
            features: if remove_events {
                UFFD_FEATURE_EVENT_REMOVE
            } else {
                0
            },
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes exactly one `UffdioApi`, which outlives the call.
        let r = unsafe { vmm_sys_util::ioctl::ioctl_with_mut_ref(&file, UFFDIO_API(), &mut api) };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        for region in mem.iter() {
            let mut reg = UffdioRegister {
                start: region.as_ptr() as u64,
                len: region.len(),
                mode: UFFDIO_REGISTER_MODE_MISSING,
                ioctls: 0,
            };
            // SAFETY: the range is one live mapping of guest memory that `mem` owns; the ioctl
            // reads and writes exactly one `UffdioRegister`.
            let r = unsafe {
                vmm_sys_util::ioctl::ioctl_with_mut_ref(&file, UFFDIO_REGISTER(), &mut reg)
            };
            if r < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(file)
    }
}
