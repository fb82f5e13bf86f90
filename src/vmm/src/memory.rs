//! Guest memory: anonymous private mappings, one per RAM slot of the layout.

use thiserror::Error;
use vm_memory::GuestAddress;

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
        err: vm_memory::mmap::FromRangesError,
    },
}

/// Maps `size` bytes of guest RAM following [`arch::layout::ram_regions`]. Pages are only
/// backed when the guest first touches them.
pub fn create(size: u64) -> Result<GuestMemoryMmap, Error> {
    let ranges: Vec<(GuestAddress, usize)> = arch::layout::ram_regions(size)?
        .into_iter()
        .map(|(start, len)| (GuestAddress(start), len as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(|err| Error::Map { size, err })
}
