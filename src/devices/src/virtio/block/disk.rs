//! The host file behind a virtio-blk device: positioned vectored I/O (preadv/pwritev) straight
//! between the file and guest memory (no bounce buffer, no shared file offset), flush, and hole
//! punching. The file may be a regular file or a block device.

use crate::virtio::buffers::{host_iovecs, Access, IoVec, UIO_MAXIOV};
use crate::virtio::GuestMemoryMmap;
use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use vm_memory::GuestAddress;
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

/// The host addresses of the guest buffers, split where guest memory regions end.
pub(super) fn iovecs(
    mem: &GuestMemoryMmap,
    segments: &[Segment],
    access: Access,
) -> std::io::Result<Vec<IoVec>> {
    let mut iov = Vec::with_capacity(segments.len());
    for &(addr, len) in segments {
        host_iovecs(mem, addr, len as usize, access, &mut iov).map_err(std::io::Error::other)?;
    }
    Ok(iov)
}

/// Moves all of `iov` between the file at `offset` and memory, however many calls it takes.
pub(super) fn transfer(
    file: &File,
    mut iov: &mut [IoVec],
    mut offset: u64,
    write: bool,
) -> std::io::Result<()> {
    while !iov.is_empty() {
        let count = iov.len().min(UIO_MAXIOV) as libc::c_int;
        // SAFETY: every iovec points into guest memory that `mem` (borrowed by the caller for
        // the whole call) keeps mapped, within one region, for exactly its length; the kernel
        // only reads from or writes to those ranges.
        let n = unsafe {
            if write {
                libc::pwritev(
                    file.as_raw_fd(),
                    IoVec::as_iovec_ptr(iov),
                    count,
                    offset as libc::off_t,
                )
            } else {
                libc::preadv(
                    file.as_raw_fd(),
                    IoVec::as_iovec_ptr(iov),
                    count,
                    offset as libc::off_t,
                )
            }
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        offset += n as u64;
        iov = advance(iov, n as usize);
    }
    Ok(())
}

/// What is left of `iov` once `done` bytes of it have been moved.
pub(super) fn advance(mut iov: &mut [IoVec], mut done: usize) -> &mut [IoVec] {
    while let Some(first) = iov.first_mut() {
        if done < first.len {
            first.base += done;
            first.len -= done;
            break;
        }
        done -= first.len;
        iov = &mut iov[1..];
    }
    iov
}

impl Disk {
    /// Wraps an open image; its capacity is its size in whole sectors (a block device's size
    /// is found by seeking to its end: its metadata says 0).
    pub fn new(mut file: File) -> std::io::Result<Self> {
        let bytes = file.seek(SeekFrom::End(0))?;
        Ok(Self {
            file,
            sectors: bytes / SECTOR_SIZE,
        })
    }

    /// The open image.
    pub fn file(&self) -> &File {
        &self.file
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
        let mut iov = iovecs(mem, segments, Access::Write)?;
        transfer(&self.file, &mut iov, offset, false)
    }

    /// Writes the guest buffers, in order, to byte `offset` of the file.
    pub fn write(
        &mut self,
        mem: &GuestMemoryMmap,
        offset: u64,
        segments: &[Segment],
    ) -> std::io::Result<()> {
        let mut iov = iovecs(mem, segments, Access::Read)?;
        transfer(&self.file, &mut iov, offset, true)
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
