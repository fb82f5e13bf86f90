//! The host file behind a virtio-blk device: synchronous positioned I/O straight between the
//! file and guest memory (no bounce buffer), flush, and hole punching.

use crate::virtio::GuestMemoryMmap;
use std::fs::File;
use std::io::{Seek, SeekFrom};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::fallocate::{fallocate, FallocateMode};

/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;

/// A disk image file.
pub struct Disk {
    file: File,
    sectors: u64,
}

/// A guest buffer: address and length.
pub type Segment = (GuestAddress, u32);

impl Disk {
    /// Wraps an open image; its capacity is its size in whole sectors.
    pub fn new(file: File) -> std::io::Result<Self> {
        let sectors = file.metadata()?.len() / SECTOR_SIZE;
        Ok(Self { file, sectors })
    }

    /// Capacity in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// Reads from byte `offset` of the file into the guest buffers, in order.
    pub fn read(
        &mut self,
        mem: &GuestMemoryMmap,
        offset: u64,
        segments: &[Segment],
    ) -> std::io::Result<()> {
        self.file.seek(SeekFrom::Start(offset))?;
        for &(addr, len) in segments {
            mem.read_exact_volatile_from(addr, &mut self.file, len as usize)
                .map_err(std::io::Error::other)?;
        }
        Ok(())
    }

    /// Writes the guest buffers, in order, to byte `offset` of the file.
    pub fn write(
        &mut self,
        mem: &GuestMemoryMmap,
        offset: u64,
        segments: &[Segment],
    ) -> std::io::Result<()> {
        self.file.seek(SeekFrom::Start(offset))?;
        for &(addr, len) in segments {
            mem.write_all_volatile_to(addr, &mut self.file, len as usize)
                .map_err(std::io::Error::other)?;
        }
        Ok(())
    }

    /// Makes written data durable (fdatasync).
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.file.sync_data()
    }

    /// Deallocates a byte range, which then reads as zeroes (punches a hole in the file).
    pub fn punch_hole(&mut self, offset: u64, len: u64) -> std::io::Result<()> {
        fallocate(&self.file, FallocateMode::PunchHole, true, offset, len)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }

    /// Zeroes a byte range, keeping it allocated where the filesystem allows.
    pub fn write_zeroes(&mut self, offset: u64, len: u64) -> std::io::Result<()> {
        match fallocate(&self.file, FallocateMode::ZeroRange, true, offset, len) {
            Ok(()) => Ok(()),
            // Filesystems without ZERO_RANGE still get zeroes, by deallocation.
            Err(e) if e.errno() == libc::EOPNOTSUPP => self.punch_hole(offset, len),
            Err(e) => Err(std::io::Error::from_raw_os_error(e.errno())),
        }
    }
}
