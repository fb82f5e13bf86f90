//! Guest buffers as devices move data through them: host iovecs for vectored I/O straight
//! between a host descriptor and guest memory, and byte copies at an offset into a chain's
//! buffers (headers that may span descriptors).

use super::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError};

/// Most buffers one vectored I/O call takes (Linux's UIO_MAXIOV).
pub const UIO_MAXIOV: usize = 1024;

/// One guest buffer of a descriptor chain: address and length.
pub type Segment = (GuestAddress, usize);

/// A host buffer as `readv`/`writev` take it: `struct iovec`'s layout, with the address kept
/// as an integer so that buffers can be remembered across calls and threads.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct IoVec {
    /// Host address of the buffer.
    pub base: usize,
    /// Its length in bytes.
    pub len: usize,
}

const _: () = assert!(
    std::mem::size_of::<IoVec>() == std::mem::size_of::<libc::iovec>()
        && std::mem::align_of::<IoVec>() == std::mem::align_of::<libc::iovec>()
);

impl IoVec {
    /// `iov` as the pointer `readv`/`writev`/`preadv`/`pwritev` take (same layout).
    pub fn as_iovec_ptr(iov: &[IoVec]) -> *const libc::iovec {
        iov.as_ptr().cast()
    }
}

/// What the host will do with guest buffers it reaches through raw addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Only read them (data leaving the guest).
    Read,
    /// Write them (data entering the guest). They are marked dirty at once, since writes
    /// through a raw address bypass vm-memory's dirty bitmap, which diff snapshots rely on.
    Write,
}

/// Appends the host addresses of `len` bytes of guest memory at `addr` to `out`, split where
/// memory regions end.
pub fn host_iovecs(
    mem: &GuestMemoryMmap,
    addr: GuestAddress,
    len: usize,
    access: Access,
    out: &mut Vec<IoVec>,
) -> Result<(), GuestMemoryError> {
    use vm_memory::bitmap::Bitmap;
    for slice in mem.get_slices(addr, len) {
        let slice = slice?;
        if access == Access::Write {
            slice.bitmap().mark_dirty(0, slice.len());
        }
        out.push(IoVec {
            base: slice.ptr_guard_mut().as_ptr() as usize,
            len: slice.len(),
        });
    }
    Ok(())
}

/// The parts of `segments` that hold bytes `offset..offset + len` of them, in order (fewer
/// bytes where the segments end first).
pub fn ranges(
    segments: impl IntoIterator<Item = Segment>,
    offset: usize,
    len: usize,
) -> impl Iterator<Item = Segment> {
    let (mut skip, mut want) = (offset, len);
    segments.into_iter().filter_map(move |(addr, l)| {
        if want == 0 {
            return None;
        }
        if skip >= l {
            skip -= l;
            return None;
        }
        let n = (l - skip).min(want);
        let part = (GuestAddress(addr.0 + skip as u64), n);
        want -= n;
        skip = 0;
        Some(part)
    })
}

/// Fills `buf` from byte `offset` of `segments`; false if they end first or memory fails.
pub fn read_at(
    mem: &GuestMemoryMmap,
    segments: impl IntoIterator<Item = Segment>,
    offset: usize,
    buf: &mut [u8],
) -> bool {
    let mut done = 0;
    for (addr, n) in ranges(segments, offset, buf.len()) {
        if mem.read_slice(&mut buf[done..done + n], addr).is_err() {
            return false;
        }
        done += n;
    }
    done == buf.len()
}

/// Writes `bytes` at byte `offset` of `segments`; false if they end first or memory fails.
pub fn write_at(
    mem: &GuestMemoryMmap,
    segments: impl IntoIterator<Item = Segment>,
    offset: usize,
    bytes: &[u8],
) -> bool {
    let mut done = 0;
    for (addr, n) in ranges(segments, offset, bytes.len()) {
        if mem.write_slice(&bytes[done..done + n], addr).is_err() {
            return false;
        }
        done += n;
    }
    done == bytes.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000), (GuestAddress(0x1000), 0x1000)])
            .unwrap()
    }

    #[test]
    fn bytes_cross_segments_at_an_offset() {
        let mem = mem();
        let segs = [(GuestAddress(0x100), 3), (GuestAddress(0x200), 4)];
        assert!(write_at(&mem, segs, 2, b"abcd"));
        let mut out = [0u8; 5];
        assert!(read_at(&mem, segs, 2, &mut out[..4]));
        assert_eq!(&out[..4], b"abcd");
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x102)).unwrap(), b'a');
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x200)).unwrap(), b'b');
        // Past the end of the segments.
        assert!(!read_at(&mem, segs, 3, &mut out));
        assert!(!write_at(&mem, segs, 6, b"xy"));
    }

    #[test]
    fn iovecs_split_where_regions_end() {
        let mem = mem();
        let mut iov = Vec::new();
        host_iovecs(&mem, GuestAddress(0xff0), 0x20, Access::Read, &mut iov).unwrap();
        assert_eq!(iov.iter().map(|v| v.len).collect::<Vec<_>>(), [0x10, 0x10]);
        assert!(host_iovecs(&mem, GuestAddress(0x1ff0), 0x20, Access::Read, &mut iov).is_err());
    }
}
