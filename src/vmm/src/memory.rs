//! Guest memory: one private mapping per RAM slot of the layout, either anonymous (a VM that
//! boots) or of a snapshot's memory file (a restored VM, copy-on-write: restoring costs page
//! tables, not I/O, and clones of one snapshot share its page cache).

use std::fs::File;
use thiserror::Error;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::{MmapRegionBuilder, NewBitmap};
use vm_memory::{FileOffset, GuestAddress, GuestRegionMmap};

/// Guest memory as vireo maps it (with the devices' dirty bitmap).
pub type GuestMemoryMmap = devices::virtio::GuestMemoryMmap;

/// Errors creating guest memory.
#[derive(Debug, Error)]
pub enum Error {
    /// The size does not fit the layout.
    #[error(transparent)]
    Layout(#[from] arch::layout::Error),
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
    /// The snapshot memory file the RAM is a private mapping of, if it was restored. Its
    /// pages the guest has not written are still read from it.
    pub backing: Option<File>,
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
        Self::map(size, None, track_dirty)
    }

    /// Maps `size` bytes of guest RAM privately from `file` (a snapshot's memory file).
    pub fn from_file(file: File, size: u64, track_dirty: bool) -> Result<Self, Error> {
        Self::map(size, Some(file), track_dirty)
    }

    fn map(size: u64, file: Option<File>, track_dirty: bool) -> Result<Self, Error> {
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
                    builder = builder.with_mmap_flags(
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                    );
                }
            }
            let region = builder.build().map_err(|e| err(e.to_string()))?;
            regions.push(
                GuestRegionMmap::new(region, addr)
                    .ok_or_else(|| err("a region ends past the address space".into()))?,
            );
        }
        let guest = GuestMemoryMmap::from_regions(regions).map_err(|e| err(e.to_string()))?;
        Ok(Self {
            guest,
            track_dirty,
            backing: file,
        })
    }
}
