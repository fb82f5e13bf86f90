//! The Async engine (Firecracker's `io_engine: "Async"`): reads, writes and flushes go to an
//! io_uring and complete while the device thread takes more requests, so one `io_uring_enter`
//! starts a whole batch and one interrupt reports all that ended together.
//!
//! The ring is made on the VMM thread (where images are opened) and restricted before it is
//! enabled: its only file is the image, registered as fixed file 0, and its only operations are
//! vectored read and write and fsync on that file. A device thread confined by seccomp to
//! `io_uring_enter` can therefore reach nothing else through it.

use super::disk::{advance, iovecs, transfer, Segment};
use super::request::Io;
use crate::virtio::buffers::{Access, IoVec, UIO_MAXIOV};
use crate::virtio::GuestMemoryMmap;
use io_uring::{opcode, register::Restriction, squeue, types, IoUring};
use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

/// What making a drive's ring calls, on the VMM thread (configuring the VM, replacing a drive's
/// image, activating the device).
pub const SETUP_SECCOMP: utils::seccomp::Allow = utils::seccomp::Allow {
    by: "creating a drive's io_uring (io_engine Async)",
    syscalls: &[libc::SYS_io_uring_setup, libc::SYS_io_uring_register],
    with_arg: &[],
};

/// A drive's io_uring, restricted to vectored I/O and fsync on the image.
pub struct Ring {
    ring: IoUring,
    /// The image (a duplicate of the device's descriptor), for finishing short transfers.
    file: File,
}

impl Ring {
    /// A ring for `file` with room for `entries` requests in flight, signalling completions on
    /// `completions`.
    pub fn new(file: &File, entries: u32, completions: &EventFd) -> std::io::Result<Ring> {
        let ring = IoUring::builder().setup_r_disabled().build(entries)?;
        let submitter = ring.submitter();
        submitter.register_files(&[file.as_raw_fd()])?;
        submitter.register_eventfd(completions.as_raw_fd())?;
        let fixed = squeue::Flags::FIXED_FILE.bits();
        submitter.register_restrictions(&mut [
            Restriction::sqe_op(opcode::Readv::CODE),
            Restriction::sqe_op(opcode::Writev::CODE),
            Restriction::sqe_op(opcode::Fsync::CODE),
            Restriction::sqe_flags_allowed(fixed),
            Restriction::sqe_flags_required(fixed),
        ])?;
        submitter.register_enable_rings()?;
        Ok(Ring {
            ring,
            file: file.try_clone()?,
        })
    }

    /// Queues one operation; the caller keeps what `entry` points to alive until it completes.
    fn push(&mut self, entry: &squeue::Entry) -> std::io::Result<()> {
        loop {
            // SAFETY: the entry's buffers (an iovec array owned by an in-flight slot, pointing
            // into guest memory the device thread keeps mapped) outlive the operation: a slot
            // is freed only after its completion is reaped, and the engine waits for every
            // completion before it is dropped.
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                return Ok(());
            }
            // The submission queue is full: hand it to the kernel and try again.
            self.ring.submit()?;
        }
    }

    #[cfg(test)]
    pub(super) fn raw(&mut self) -> &mut IoUring {
        &mut self.ring
    }
}

/// Checks that this host can run the Async engine: makes and drops a restricted ring.
pub fn probe() -> std::io::Result<()> {
    let file = File::open("/dev/null")?;
    let completions = EventFd::new(libc::EFD_NONBLOCK)?;
    Ring::new(&file, 1, &completions).map(drop)
}

/// Why the Async engine cannot be used, for an error the user can act on.
pub fn explain(err: &std::io::Error) -> String {
    match err.raw_os_error() {
        Some(libc::ENOSYS) => {
            format!("this host's kernel has no io_uring ({err}); use io_engine Sync")
        }
        Some(libc::EPERM) | Some(libc::EACCES) => format!(
            "io_uring is not permitted here ({err}; see the kernel.io_uring_disabled sysctl or \
             the caller's seccomp filter); use io_engine Sync"
        ),
        Some(libc::EINVAL) => format!(
            "this host's kernel lacks the io_uring features vireo needs (restricted rings, \
             Linux 5.10 or later): {err}; use io_engine Sync"
        ),
        _ => format!("cannot set up io_uring: {err}"),
    }
}

/// A request the kernel is working on.
struct InFlight {
    queue: usize,
    head: u16,
    sector: u64,
    status: GuestAddress,
    /// VIRTIO_BLK_T_IN, _OUT or _FLUSH.
    kind: u32,
    offset: u64,
    /// The buffers; the kernel reads this array, so it stays put until the completion.
    iov: Vec<IoVec>,
    /// Data bytes the guest asked for.
    len: u64,
}

/// A finished request, as the block handler reports it to the guest.
pub(super) struct Finished {
    pub queue: usize,
    pub head: u16,
    pub sector: u64,
    pub status: GuestAddress,
    pub kind: u32,
    pub len: u64,
    pub result: std::io::Result<()>,
}

/// The device thread's side of the engine: in-flight requests by ring `user_data`.
pub(super) struct Engine {
    ring: Ring,
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    /// Operations pushed since the last `io_uring_enter`.
    queued: usize,
    completions: EventFd,
}

impl Engine {
    /// An engine on `ring`, for at most `depth` requests in flight, whose completions are
    /// signalled on `completions`.
    pub fn new(ring: Ring, depth: usize, completions: EventFd) -> Self {
        Self {
            ring,
            slots: (0..depth).map(|_| None).collect(),
            free: (0..depth).rev().collect(),
            queued: 0,
            completions,
        }
    }

    /// The eventfd the device thread watches.
    pub fn completions_fd(&self) -> RawFd {
        self.completions.as_raw_fd()
    }

    /// Makes the device thread look at completions (ones the engine reaped itself).
    pub fn poke(&self) {
        let _ = self.completions.write(1);
    }

    fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Starts `io` for the chain `head` of `queue`. `Err` carries the result of an I/O that
    /// could not be started and ran (or failed) at once instead.
    pub fn start(
        &mut self,
        mem: &GuestMemoryMmap,
        queue: usize,
        head: u16,
        sector: u64,
        status: GuestAddress,
        io: Io<'_>,
    ) -> Result<(), std::io::Result<()>> {
        let kind = io.kind();
        let (offset, segments): (u64, &[Segment]) = match io {
            Io::Read(offset, s) | Io::Write(offset, s) => (offset, s),
            Io::Flush => (0, &[]),
        };
        let write = kind == VIRTIO_BLK_T_OUT;
        let access = if write { Access::Read } else { Access::Write };
        let iov = iovecs(mem, segments, access).map_err(Err)?;
        // A request split into more buffers than one vectored call takes, or arriving with
        // every slot taken (the queue's size bounds requests, so only a misbehaving driver),
        // runs at once.
        let Some(slot) = self.free.pop().filter(|_| iov.len() <= UIO_MAXIOV) else {
            let mut iov = iov;
            return Err(match kind {
                VIRTIO_BLK_T_FLUSH => self.ring.file.sync_data(),
                _ => transfer(&self.ring.file, &mut iov, offset, write),
            });
        };
        let request = InFlight {
            queue,
            head,
            sector,
            status,
            kind,
            offset,
            iov,
            len: io.data_len(),
        };
        let file = types::Fixed(0);
        let ptr = IoVec::as_iovec_ptr(&request.iov);
        let count = request.iov.len() as u32;
        let entry = match kind {
            VIRTIO_BLK_T_IN => opcode::Readv::new(file, ptr, count).offset(offset).build(),
            VIRTIO_BLK_T_OUT => opcode::Writev::new(file, ptr, count).offset(offset).build(),
            _ => opcode::Fsync::new(file)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
        }
        .flags(squeue::Flags::FIXED_FILE)
        .user_data(slot as u64);
        self.slots[slot] = Some(request);
        if let Err(e) = self.ring.push(&entry) {
            self.slots[slot] = None;
            self.free.push(slot);
            return Err(Err(e));
        }
        self.queued += 1;
        Ok(())
    }

    /// Hands what [`Engine::start`] queued to the kernel, in one system call.
    pub fn submit(&mut self) {
        if self.queued == 0 {
            return;
        }
        match self.ring.ring.submit() {
            Ok(_) => self.queued = 0,
            // Left queued: the next submit or wait hands them over.
            Err(e) => utils::warn_limited!(
                "virtio_blk_uring_submit",
                "virtio-blk: io_uring submission failed: {e}"
            ),
        }
    }

    /// Reaps ended requests into `done`; with `wait`, first waits until none is in flight.
    pub fn reap(&mut self, wait: bool, done: &mut Vec<Finished>) {
        let _ = self.completions.read();
        loop {
            // The completion queue is shared memory: only waiting, or entries not yet handed
            // over, need the system call.
            let want = if wait { self.in_flight() } else { 0 };
            if want > 0 || self.queued > 0 {
                self.queued = 0;
                if let Err(e) = self.ring.ring.submit_and_wait(want) {
                    if e.kind() != std::io::ErrorKind::Interrupted {
                        utils::warn_limited!(
                            "virtio_blk_uring_wait",
                            "virtio-blk: waiting on io_uring failed: {e}"
                        );
                        return;
                    }
                }
            }
            let ended: Vec<(u64, i32)> = self
                .ring
                .ring
                .completion()
                .map(|c| (c.user_data(), c.result()))
                .collect();
            for (slot, result) in ended {
                if let Some(f) = self.finish(slot as usize, result) {
                    done.push(f);
                }
            }
            if !wait || self.in_flight() == 0 {
                return;
            }
        }
    }

    fn finish(&mut self, slot: usize, result: i32) -> Option<Finished> {
        let mut r = self.slots.get_mut(slot)?.take()?;
        self.free.push(slot);
        let file = &self.ring.file;
        let write = r.kind == VIRTIO_BLK_T_OUT;
        let result = match result {
            // The kernel gave up on an operation that may be retried: run it here.
            e if e == -libc::EAGAIN || e == -libc::EINTR => match r.kind {
                VIRTIO_BLK_T_FLUSH => file.sync_data(),
                _ => transfer(file, &mut r.iov, r.offset, write),
            },
            e if e < 0 => Err(std::io::Error::from_raw_os_error(-e)),
            n if r.kind == VIRTIO_BLK_T_FLUSH || n as u64 >= r.len => Ok(()),
            // A short transfer: move the rest here.
            n => transfer(
                file,
                advance(&mut r.iov, n as usize),
                r.offset + n as u64,
                write,
            ),
        };
        Some(Finished {
            queue: r.queue,
            head: r.head,
            sector: r.sector,
            status: r.status,
            kind: r.kind,
            len: r.len,
            result,
        })
    }

    /// Switches to `ring` (a replaced image) once every request on the old one has ended;
    /// those go to `done`.
    pub fn replace(&mut self, ring: Ring, done: &mut Vec<Finished>) {
        self.reap(true, done);
        self.ring = ring;
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // The kernel may still be writing into guest buffers; a reset driver reuses them.
        let mut done = Vec::new();
        self.reap(true, &mut done);
    }
}
