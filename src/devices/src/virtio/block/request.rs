//! Parsing and executing one virtio-blk request (virtio 1.2, 5.2.6).
//!
//! A request is a descriptor chain: device-readable header (type, sector), then data (readable
//! for writes, writable for reads), then one device-writable status byte. The chain comes from
//! the guest and is checked before anything touches the disk.

use super::disk::{Disk, Segment, SECTOR_SIZE};
use crate::virtio::buffers::read_at;
use crate::virtio::GuestMemoryMmap;
use virtio_bindings::virtio_blk::*;
use virtio_queue::DescriptorChain;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryBackend};

/// Longest drive ID returned by GET_ID.
pub const ID_BYTES: usize = 20;
const HEADER_SIZE: u32 = 16;
/// Size of one discard / write-zeroes range descriptor.
const RANGE_SIZE: u32 = 16;
/// WRITE_ZEROES flag: the device may deallocate instead of writing.
const WRITE_ZEROES_UNMAP: u32 = 1;

/// Limits the device advertises and enforces.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Most data segments in one request (seg_max).
    pub seg_max: u32,
    /// Largest data segment in bytes (size_max).
    pub size_max: u32,
    /// Most ranges in one DISCARD or WRITE_ZEROES request.
    pub max_ranges: u32,
    /// Most sectors in one range.
    pub max_range_sectors: u32,
}

/// A request's data transfer or flush, checked and ready to run on either engine.
#[derive(Clone, Copy, Debug)]
pub enum Io<'a> {
    /// Read from this byte offset of the image into the guest buffers.
    Read(u64, &'a [Segment]),
    /// Write the guest buffers at this byte offset of the image.
    Write(u64, &'a [Segment]),
    /// Make written data durable.
    Flush,
}

impl Io<'_> {
    /// The request type (VIRTIO_BLK_T_IN, _OUT or _FLUSH).
    pub fn kind(&self) -> u32 {
        match self {
            Io::Read(..) => VIRTIO_BLK_T_IN,
            Io::Write(..) => VIRTIO_BLK_T_OUT,
            Io::Flush => VIRTIO_BLK_T_FLUSH,
        }
    }

    /// Data bytes moved.
    pub fn data_len(&self) -> u64 {
        match self {
            Io::Read(_, s) | Io::Write(_, s) => total(s),
            Io::Flush => 0,
        }
    }
}

/// The status and used length of a read, write or flush (`kind`) of `len` data bytes from
/// `sector` that ended with `result`; failures are logged (rate-limited: a guest can cause them
/// at will).
pub fn outcome(kind: u32, sector: u64, len: u64, result: std::io::Result<()>) -> (u8, u32) {
    match result {
        Ok(()) if kind == VIRTIO_BLK_T_IN => (VIRTIO_BLK_S_OK as u8, len as u32 + 1),
        Ok(()) => (VIRTIO_BLK_S_OK as u8, 1),
        Err(e) => {
            let what = match kind {
                VIRTIO_BLK_T_IN => format!("read at sector {sector}"),
                VIRTIO_BLK_T_OUT => format!("write at sector {sector}"),
                _ => "flush".to_string(),
            };
            utils::warn_limited!("virtio_blk_io_error", "virtio-blk: {what} failed: {e}");
            (VIRTIO_BLK_S_IOERR as u8, 1)
        }
    }
}

/// Why a chain is not a well-formed request.
#[derive(Debug, PartialEq, Eq)]
pub enum ParseError {
    /// No device-writable status byte at the end.
    NoStatus,
    /// Fewer than 16 device-readable header bytes.
    ShortHeader,
    /// A device-readable descriptor after a device-writable one.
    ReadableAfterWritable,
    /// A descriptor points outside guest memory.
    OutsideMemory(u64),
    /// The chain ended early (a loop, or a broken indirect table).
    Truncated,
}

/// A checked request.
#[derive(Debug)]
pub struct Request {
    kind: u32,
    sector: u64,
    /// Device-readable bytes after the header (write data, discard ranges).
    readable: Vec<Segment>,
    /// Device-writable bytes before the status byte (read data, ID).
    writable: Vec<Segment>,
    status: GuestAddress,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Header {
    kind: u32,
    _reserved: u32,
    sector: u64,
}
// SAFETY: plain integers, no padding; any bit pattern is valid.
unsafe impl ByteValued for Header {}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Range {
    sector: u64,
    num_sectors: u32,
    flags: u32,
}
// SAFETY: plain integers, no padding; any bit pattern is valid.
unsafe impl ByteValued for Range {}

/// Drops the first `n` bytes from a segment list.
fn skip(segments: &[Segment], mut n: u32) -> Vec<Segment> {
    let mut out = Vec::with_capacity(segments.len());
    for &(addr, len) in segments {
        if n >= len {
            n -= len;
            continue;
        }
        out.push((GuestAddress(addr.0 + u64::from(n)), len - n));
        n = 0;
    }
    out
}

/// Copies `buf.len()` bytes out of the front of a segment list.
fn gather(mem: &GuestMemoryMmap, segments: &[Segment], buf: &mut [u8]) -> bool {
    let segments = segments.iter().map(|&(addr, len)| (addr, len as usize));
    read_at(mem, segments, 0, buf)
}

fn total(segments: &[Segment]) -> u64 {
    segments.iter().map(|s| u64::from(s.1)).sum()
}

impl Request {
    /// Checks a chain's shape and reads its header. On failure, also returns where the status
    /// byte would be if the chain has one, so the request can fail with IOERR.
    pub fn parse(
        chain: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
    ) -> Result<Request, (ParseError, Option<GuestAddress>)> {
        let mut status = None;
        Self::parse_inner(chain, mem, &mut status).map_err(|e| (e, status))
    }

    fn parse_inner(
        chain: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
        status_out: &mut Option<GuestAddress>,
    ) -> Result<Request, ParseError> {
        // The walk is bounded by the queue size (virtio-queue stops loops and overlong chains).
        let descs: Vec<_> = chain.filter(|d| d.len() > 0).collect();
        // The status byte is the last byte of the last descriptor, which must be writable.
        let last = descs.last().ok_or(ParseError::NoStatus)?;
        if !last.is_write_only() {
            return Err(ParseError::NoStatus);
        }
        let status = last
            .addr()
            .0
            .checked_add(u64::from(last.len()) - 1)
            .map(GuestAddress)
            .filter(|&a| mem.check_range(a, 1))
            .ok_or(ParseError::OutsideMemory(last.addr().0))?;
        *status_out = Some(status);

        let mut readable = Vec::new();
        let mut writable: Vec<Segment> = Vec::new();
        for desc in &descs {
            let addr = desc.addr();
            if !mem.check_range(addr, desc.len() as usize) {
                return Err(ParseError::OutsideMemory(addr.0));
            }
            if desc.is_write_only() {
                writable.push((addr, desc.len()));
            } else if writable.is_empty() {
                readable.push((addr, desc.len()));
            } else {
                return Err(ParseError::ReadableAfterWritable);
            }
        }
        // Drop the status byte from the writable data.
        if let Some(seg) = writable.last_mut() {
            seg.1 -= 1;
            if seg.1 == 0 {
                writable.pop();
            }
        }
        if total(&readable) < u64::from(HEADER_SIZE) {
            return Err(ParseError::ShortHeader);
        }
        let mut header = Header::default();
        if !gather(mem, &readable, header.as_mut_slice()) {
            return Err(ParseError::Truncated);
        }
        Ok(Request {
            kind: header.kind,
            sector: header.sector,
            readable: skip(&readable, HEADER_SIZE),
            writable,
            status,
        })
    }

    /// The request type (VIRTIO_BLK_T_*).
    pub fn kind(&self) -> u32 {
        self.kind
    }

    /// Bytes of device-readable data after the header (the payload of a write).
    pub fn data_len(&self) -> u64 {
        total(&self.readable)
    }

    /// Bytes of device-writable data before the status byte (what a read fills).
    pub fn read_len(&self) -> u64 {
        total(&self.writable)
    }

    /// The first sector the request names.
    pub fn sector(&self) -> u64 {
        self.sector
    }

    /// Where the status byte goes.
    pub fn status_addr(&self) -> GuestAddress {
        self.status
    }

    fn data_ok(segments: &[Segment], limits: &Limits) -> bool {
        segments.len() as u64 <= u64::from(limits.seg_max)
            && segments.iter().all(|s| s.1 <= limits.size_max)
            && total(segments).is_multiple_of(SECTOR_SIZE)
    }

    /// The data transfer or flush this request asks for, checked against a disk of `sectors`
    /// sectors: `None` for other request types, `Err` with the status to report for a request
    /// that must fail without touching the disk.
    pub fn io(&self, sectors: u64, read_only: bool, limits: &Limits) -> Option<Result<Io<'_>, u8>> {
        let ioerr = Err(VIRTIO_BLK_S_IOERR as u8);
        let data = |segments: &[Segment]| {
            let len = total(segments);
            let end = self.sector.checked_add(len.div_ceil(SECTOR_SIZE))?;
            (Self::data_ok(segments, limits) && end <= sectors).then(|| self.sector * SECTOR_SIZE)
        };
        Some(match self.kind {
            VIRTIO_BLK_T_IN => match data(&self.writable) {
                Some(offset) => Ok(Io::Read(offset, &self.writable)),
                None => ioerr,
            },
            VIRTIO_BLK_T_OUT if read_only => ioerr,
            VIRTIO_BLK_T_OUT => match data(&self.readable) {
                Some(offset) => Ok(Io::Write(offset, &self.readable)),
                None => ioerr,
            },
            VIRTIO_BLK_T_FLUSH => Ok(Io::Flush),
            _ => return None,
        })
    }

    /// Runs the request against `disk`; returns the status and the number of bytes written to
    /// the guest (data plus the status byte).
    pub fn execute(
        &self,
        disk: &mut Disk,
        mem: &GuestMemoryMmap,
        read_only: bool,
        id: &[u8; ID_BYTES],
        limits: &Limits,
    ) -> (u8, u32) {
        let status = |s: u32| s as u8;
        match self.io(disk.sectors(), read_only, limits) {
            Some(Ok(io)) => {
                let result = match io {
                    Io::Read(offset, segments) => disk.read(mem, offset, segments),
                    Io::Write(offset, segments) => disk.write(mem, offset, segments),
                    Io::Flush => disk.flush(),
                };
                return outcome(io.kind(), self.sector, io.data_len(), result);
            }
            Some(Err(s)) => return (s, 1),
            None => {}
        }
        match self.kind {
            VIRTIO_BLK_T_GET_ID => {
                let mut written = 0usize;
                for &(addr, len) in &self.writable {
                    let n = (len as usize).min(ID_BYTES - written);
                    if n == 0 || mem.write_slice(&id[written..written + n], addr).is_err() {
                        break;
                    }
                    written += n;
                }
                (status(VIRTIO_BLK_S_OK), written as u32 + 1)
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                if read_only {
                    return (status(VIRTIO_BLK_S_IOERR), 1);
                }
                (self.ranges(disk, mem, limits), 1)
            }
            other => {
                tracing::debug!("virtio-blk: unsupported request type {other}");
                (status(VIRTIO_BLK_S_UNSUPP), 1)
            }
        }
    }

    fn ranges(&self, disk: &mut Disk, mem: &GuestMemoryMmap, limits: &Limits) -> u8 {
        let bytes = total(&self.readable);
        let count = bytes / u64::from(RANGE_SIZE);
        if !bytes.is_multiple_of(u64::from(RANGE_SIZE))
            || count == 0
            || count > u64::from(limits.max_ranges)
        {
            return VIRTIO_BLK_S_IOERR as u8;
        }
        let mut raw = vec![0u8; bytes as usize];
        if !gather(mem, &self.readable, &mut raw) {
            return VIRTIO_BLK_S_IOERR as u8;
        }
        for chunk in raw.chunks_exact(RANGE_SIZE as usize) {
            let mut range = Range::default();
            range.as_mut_slice().copy_from_slice(chunk);
            let end = range.sector.checked_add(u64::from(range.num_sectors));
            if range.num_sectors > limits.max_range_sectors
                || end.is_none_or(|e| e > disk.sectors())
            {
                return VIRTIO_BLK_S_IOERR as u8;
            }
            let (offset, len) = (
                range.sector * SECTOR_SIZE,
                u64::from(range.num_sectors) * SECTOR_SIZE,
            );
            let result = if self.kind == VIRTIO_BLK_T_DISCARD {
                // Discard must not claim unknown flags (spec: UNMAP is the only one, for
                // write zeroes).
                if range.flags != 0 {
                    return VIRTIO_BLK_S_UNSUPP as u8;
                }
                disk.punch_hole(offset, len)
            } else if range.flags & WRITE_ZEROES_UNMAP != 0 {
                disk.punch_hole(offset, len)
            } else {
                disk.write_zeroes(offset, len)
            };
            if let Err(e) = result {
                utils::warn_limited!(
                    "virtio_blk_io_error",
                    "virtio-blk: discard/write-zeroes at sector {} failed: {e}",
                    range.sector
                );
                return VIRTIO_BLK_S_IOERR as u8;
            }
        }
        VIRTIO_BLK_S_OK as u8
    }
}
