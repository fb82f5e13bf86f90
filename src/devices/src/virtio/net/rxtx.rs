//! The data path of an active device: frames between the TAP and the guest's queues, without a
//! copy, and MMDS on interfaces that answer it.

use super::metrics::NetMetrics;
use super::tap::{Tap, VNET_HDR_LEN};
use super::{mmds, MAX_BUFFER, MAX_IOVECS, RX_BATCH, RX_QUEUE};
use crate::metrics::add;
use crate::rate_limiter::RateLimiter;
use crate::virtio::buffers::{host_iovecs, read_at, write_at, Access, IoVec, Segment};
use crate::virtio::GuestMemoryMmap;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use virtio_queue::{Queue, QueueOwnedT, QueueT};

/// How a receive attempt ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Rx {
    /// A frame went to the guest.
    Delivered,
    /// A frame was dropped (counted); try the next.
    Dropped,
    /// The guest has no (or not enough) buffers posted: wait for it.
    NoBuffers,
    /// The TAP has nothing to read.
    TapEmpty,
    /// The TAP failed; stop reading it until the guest posts buffers again.
    TapError,
    /// The receive rate limiter is in debt: wait for its timer.
    Throttled,
}

/// A posted receive chain: head, device-writable buffers, their total size.
struct RxChain {
    head: u16,
    segments: Vec<Segment>,
    /// Host buffers the segments map to (more than one where a segment spans regions).
    iovecs: Vec<IoVec>,
    capacity: usize,
}

/// The data path of an active device, separate from its event loop so that tests and the
/// fuzz target drive it directly.
pub struct NetIo {
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    pub(super) tap: Arc<Tap>,
    metrics: Arc<NetMetrics>,
    mrg: bool,
    /// A frame read from the TAP that did not fit the buffers posted then.
    held: Option<Vec<u8>>,
    /// Receive chains taken from the ring but not used yet, in ring order.
    stash: std::collections::VecDeque<RxChain>,
    /// The largest frame (with header) the guest can be sent: posted buffers are gathered up
    /// to this much before each read.
    rx_frame_max: usize,
    /// The MMDS endpoint, on interfaces that have one.
    mmds: Option<mmds::MmdsStack>,
    /// Where the part of a frame that does not fit the posted buffers lands.
    spill: Vec<u8>,
    /// Emptied chain records and lists, kept so that the per-frame path does not allocate.
    free_chains: Vec<RxChain>,
    chain_list: Vec<RxChain>,
    iov: Vec<IoVec>,
    tx_segments: Vec<Segment>,
    /// Receive and transmit rate limiters, when the interface has them.
    pub(super) limiters: Option<NetLimiters>,
    /// Payload bytes of the frame last delivered, for the receive limiter.
    last_rx_bytes: usize,
}

/// An interface's receive and transmit rate limiters, shared with the device so that PATCH
/// can change them while the guest runs.
#[derive(Clone)]
pub struct NetLimiters {
    /// Frames from the TAP to the guest.
    pub rx: Arc<std::sync::Mutex<RateLimiter>>,
    /// Frames from the guest to the TAP.
    pub tx: Arc<std::sync::Mutex<RateLimiter>>,
}

impl NetIo {
    /// A data path over `rx` and `tx` (already configured) and `tap`.
    pub fn new(
        mem: GuestMemoryMmap,
        rx: Queue,
        tx: Queue,
        tap: Arc<Tap>,
        metrics: Arc<NetMetrics>,
        mrg: bool,
    ) -> Self {
        Self {
            mem,
            rx,
            tx,
            tap,
            metrics,
            mrg,
            held: None,
            stash: std::collections::VecDeque::new(),
            rx_frame_max: MAX_BUFFER,
            mmds: None,
            spill: vec![0u8; MAX_BUFFER],
            free_chains: Vec::new(),
            chain_list: Vec::new(),
            iov: Vec::with_capacity(MAX_IOVECS + 1),
            tx_segments: Vec::new(),
            limiters: None,
            last_rx_bytes: 0,
        }
    }

    /// Limits what goes each way.
    pub fn set_limiters(&mut self, limiters: NetLimiters) {
        self.limiters = Some(limiters);
    }

    /// Where the receive and transmit queues stand; stashed receive chains count as not taken.
    pub fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        let mut rx = self.rx.state();
        rx.next_avail = rx.next_avail.wrapping_sub(self.stash.len() as u16);
        vec![rx, self.tx.state()]
    }

    /// Answers MMDS on this interface.
    pub fn set_mmds(&mut self, stack: mmds::MmdsStack) {
        self.mmds = Some(stack);
    }

    /// Whether MMDS has frames waiting for the guest.
    pub fn mmds_pending(&self) -> bool {
        self.mmds.as_ref().is_some_and(|m| m.pending())
    }

    /// Hands a transmitted chain to MMDS if it is for MMDS; returns whether it was.
    fn divert_to_mmds(&mut self, segments: &[Segment], len: usize) -> bool {
        let Some(stack) = self.mmds.as_mut() else {
            return false;
        };
        let gather = |want: usize| {
            let mut buf = vec![0u8; want];
            // The segments hold `len` bytes: a read fails only on memory the chain was
            // checked against, and then the frame is not for MMDS.
            read_at(&self.mem, segments.iter().copied(), 0, &mut buf).then_some(buf)
        };
        let Some(head) = gather(len.min(VNET_HDR_LEN + 42)) else {
            return false;
        };
        if head.len() <= VNET_HDR_LEN || !stack.is_for_mmds(&head[VNET_HDR_LEN..]) {
            return false;
        }
        let Some(frame) = gather(len) else {
            return false;
        };
        stack.handle(&frame[VNET_HDR_LEN..]);
        add(&self.metrics.mmds_frames, 1);
        true
    }

    /// Limits the frames the guest can be sent to `len` bytes with the header (no receive
    /// segmentation offload accepted: an MTU-sized frame), so that no more buffers than that
    /// are gathered per frame. A longer frame still arrives, through the spill buffer.
    pub fn set_rx_frame_max(&mut self, len: usize) {
        self.rx_frame_max = len.clamp(VNET_HDR_LEN + 60, MAX_BUFFER);
    }

    /// Takes the next posted receive chain that is well formed: one popped earlier and not
    /// used, else the next from the ring, returning malformed ones to the guest empty
    /// (counted). `None` when the guest has posted nothing more.
    fn pop_rx(&mut self) -> Result<Option<RxChain>, virtio_queue::Error> {
        if let Some(c) = self.stash.pop_front() {
            return Ok(Some(c));
        }
        loop {
            let Some(chain) = self.rx.iter(&self.mem)?.next() else {
                return Ok(None);
            };
            let head = chain.head_index();
            let mut c = self.free_chains.pop().unwrap_or(RxChain {
                head,
                segments: Vec::new(),
                iovecs: Vec::new(),
                capacity: 0,
            });
            c.head = head;
            let mut ok = true;
            for d in chain {
                let len = d.len() as usize;
                if !d.is_write_only()
                    || host_iovecs(&self.mem, d.addr(), len, Access::Write, &mut c.iovecs).is_err()
                {
                    ok = false;
                    break;
                }
                c.segments.push((d.addr(), len));
                c.capacity += len;
            }
            if ok && c.capacity > 0 && c.iovecs.len() <= MAX_IOVECS {
                return Ok(Some(c));
            }
            self.recycle(c);
            add(&self.metrics.rx_errors, 1);
            utils::warn_limited!(
                "virtio_net_bad_rx_chain",
                "virtio-net: receive chain {head} is malformed (read-only or outside guest memory); returned empty"
            );
            self.rx.add_used(&self.mem, head, 0)?;
        }
    }

    /// Pops chains until they hold `want` bytes (one chain without MRG_RXBUF) or the guest
    /// has no more; returns them and whether the whole ring was posted.
    fn gather(&mut self, want: usize) -> Result<(Vec<RxChain>, bool), virtio_queue::Error> {
        let mut chains = std::mem::take(&mut self.chain_list);
        let mut capacity = 0;
        let mut iovecs = 0;
        while capacity < want && (self.mrg || chains.is_empty()) {
            let Some(c) = self.pop_rx()? else {
                break;
            };
            if iovecs + c.iovecs.len() > MAX_IOVECS {
                self.stash.push_front(c);
                break;
            }
            capacity += c.capacity;
            iovecs += c.iovecs.len();
            chains.push(c);
        }
        let whole_ring = chains.len() + self.stash.len() >= usize::from(self.rx.size());
        Ok((chains, whole_ring))
    }

    /// Keeps chains that were not used, in ring order, for the next frame.
    fn unget(&mut self, mut chains: Vec<RxChain>) {
        for c in chains.drain(..).rev() {
            self.stash.push_front(c);
        }
        self.chain_list = chains;
    }

    /// Keeps a used chain's record for the next chain.
    fn recycle(&mut self, mut c: RxChain) {
        c.segments.clear();
        c.iovecs.clear();
        c.capacity = 0;
        self.free_chains.push(c);
    }

    /// Returns the first chains, holding `len` bytes in order, to the guest with
    /// `num_buffers` set; gives the rest back to the ring.
    fn complete(
        &mut self,
        mut chains: Vec<RxChain>,
        len: usize,
    ) -> Result<(), virtio_queue::Error> {
        self.last_rx_bytes = len - VNET_HDR_LEN;
        let mut left = len;
        let mut used = 0;
        for c in &chains {
            if left == 0 {
                break;
            }
            used += 1;
            left -= left.min(c.capacity);
        }
        // Written in every header, with or without MRG_RXBUF (virtio 1.2, 5.1.6.4.2).
        write_at(
            &self.mem,
            chains[0].segments.iter().copied(),
            10,
            &(used as u16).to_le_bytes(),
        );
        for c in chains.drain(used..).rev() {
            self.stash.push_front(c);
        }
        let mut left = len;
        for c in &chains {
            let n = left.min(c.capacity);
            self.rx.add_used(&self.mem, c.head, n as u32)?;
            left -= n;
        }
        for c in chains.drain(..) {
            self.recycle(c);
        }
        self.chain_list = chains;
        add(&self.metrics.rx_frames, 1);
        add(&self.metrics.rx_bytes, (len - VNET_HDR_LEN) as u64);
        Ok(())
    }

    /// Tries to deliver the held frame by copying it into posted buffers.
    fn deliver_held(&mut self, frame: Vec<u8>) -> Result<Rx, virtio_queue::Error> {
        let (chains, whole_ring) = self.gather(frame.len())?;
        let capacity: usize = chains.iter().map(|c| c.capacity).sum();
        if capacity < frame.len() {
            self.unget(chains);
            if whole_ring {
                add(&self.metrics.rx_drops, 1);
                return Ok(Rx::Dropped);
            }
            self.held = Some(frame);
            return Ok(Rx::NoBuffers);
        }
        let segments = chains.iter().flat_map(|c| c.segments.iter().copied());
        if !write_at(&self.mem, segments, 0, &frame) {
            add(&self.metrics.rx_errors, 1);
        }
        self.complete(chains, frame.len())?;
        Ok(Rx::Delivered)
    }

    /// Moves one frame from the TAP to the guest.
    pub fn receive(&mut self) -> Result<Rx, virtio_queue::Error> {
        // A frame's size is known only once it is read, so received frames are charged after
        // the fact and reception waits while the limiter is in debt.
        if let Some(l) = &self.limiters {
            if crate::bus::lock(&l.rx).is_throttled() {
                add(&self.metrics.rx_throttled, 1);
                return Ok(Rx::Throttled);
            }
        }
        let rx = self.receive_one()?;
        if let (Rx::Delivered, Some(l)) = (&rx, &self.limiters) {
            crate::bus::lock(&l.rx).charge(self.last_rx_bytes as u64);
        }
        Ok(rx)
    }

    fn receive_one(&mut self) -> Result<Rx, virtio_queue::Error> {
        if let Some(frame) = self.held.take() {
            return self.deliver_held(frame);
        }
        // MMDS answers go before frames from the TAP.
        if let Some(frame) = self.mmds.as_mut().and_then(|m| m.pop()) {
            return self.deliver_held(frame);
        }
        let (chains, whole_ring) = self.gather(self.rx_frame_max)?;
        if chains.is_empty() {
            return Ok(Rx::NoBuffers);
        }
        let capacity: usize = chains.iter().map(|c| c.capacity).sum();
        // Mapped when the chain was taken; guest memory does not move while `mem` lives.
        let mut iov = std::mem::take(&mut self.iov);
        iov.clear();
        for c in &chains {
            iov.extend_from_slice(&c.iovecs);
        }
        iov.push(IoVec {
            base: self.spill.as_mut_ptr() as usize,
            len: self.spill.len(),
        });
        // SAFETY: IoVec has iovec's layout; the buffers are guest memory (kept mapped by
        // `self.mem` for the whole call, each within one region and within its descriptor's
        // length) and `spill`, which we own; readv writes at most their lengths.
        let n = unsafe {
            libc::readv(
                self.tap.as_raw_fd(),
                IoVec::as_iovec_ptr(&iov),
                iov.len() as i32,
            )
        };
        self.iov = iov;
        if n < 0 {
            let e = std::io::Error::last_os_error();
            self.unget(chains);
            if e.kind() == std::io::ErrorKind::WouldBlock {
                return Ok(Rx::TapEmpty);
            }
            add(&self.metrics.rx_errors, 1);
            utils::warn_limited!(
                "virtio_net_tap_read",
                "virtio-net: reading TAP {} failed: {e}",
                self.tap.name()
            );
            return Ok(Rx::TapError);
        }
        let n = n as usize;
        if n < VNET_HDR_LEN {
            self.unget(chains);
            add(&self.metrics.rx_errors, 1);
            return Ok(Rx::Dropped);
        }
        if n <= capacity {
            self.complete(chains, n)?;
            return Ok(Rx::Delivered);
        }
        // Part of the frame is in the spill buffer: the buffers posted cannot hold it.
        if !self.mrg || whole_ring {
            self.unget(chains);
            add(&self.metrics.rx_drops, 1);
            utils::warn_limited!(
                "virtio_net_rx_too_big",
                "virtio-net: a {n}-byte frame does not fit the receive buffers the guest posts; dropped"
            );
            return Ok(Rx::Dropped);
        }
        let mut frame = vec![0u8; n];
        let segments = chains.iter().flat_map(|c| c.segments.iter().copied());
        let _ = read_at(&self.mem, segments, 0, &mut frame[..capacity]);
        let pos = capacity;
        frame[pos..].copy_from_slice(&self.spill[..n - pos]);
        self.unget(chains);
        self.held = Some(frame);
        Ok(Rx::NoBuffers)
    }

    /// Sends every chain the guest has made available to the TAP. Returns whether any went
    /// back to the used ring, and whether the TAP was full (retry when it is writable).
    pub fn transmit(&mut self) -> Result<(bool, bool), virtio_queue::Error> {
        let mut used = false;
        loop {
            self.tx.disable_notification(&self.mem)?;
            while let Some(chain) = self.tx.iter(&self.mem)?.next() {
                let head = chain.head_index();
                let mut iov = std::mem::take(&mut self.iov);
                let mut segments = std::mem::take(&mut self.tx_segments);
                iov.clear();
                segments.clear();
                let mut len = 0usize;
                let mut ok = true;
                for d in chain {
                    len += d.len() as usize;
                    segments.push((d.addr(), d.len() as usize));
                    if d.is_write_only()
                        || len > MAX_BUFFER
                        || iov.len() >= MAX_IOVECS
                        || host_iovecs(
                            &self.mem,
                            d.addr(),
                            d.len() as usize,
                            Access::Read,
                            &mut iov,
                        )
                        .is_err()
                    {
                        ok = false;
                        break;
                    }
                }
                if !ok || len < VNET_HDR_LEN {
                    let counter = if ok || len > MAX_BUFFER {
                        &self.metrics.tx_drops
                    } else {
                        &self.metrics.tx_errors
                    };
                    add(counter, 1);
                    utils::warn_limited!(
                        "virtio_net_bad_tx_chain",
                        "virtio-net: transmit chain {head} ({len} bytes) is malformed or not a frame; dropped"
                    );
                    (self.iov, self.tx_segments) = (iov, segments);
                    self.tx.add_used(&self.mem, head, 0)?;
                    used = true;
                    continue;
                }
                let to_mmds = self.divert_to_mmds(&segments, len);
                self.tx_segments = segments;
                if to_mmds {
                    self.iov = iov;
                    self.tx.add_used(&self.mem, head, 0)?;
                    used = true;
                    continue;
                }
                if let Some(l) = &self.limiters {
                    if !crate::bus::lock(&l.tx).consume((len - VNET_HDR_LEN) as u64) {
                        // Taken again when the limiter's timer fires; guest notifications stay
                        // off until then.
                        self.iov = iov;
                        add(&self.metrics.tx_throttled, 1);
                        self.tx.go_to_previous_position();
                        return Ok((used, false));
                    }
                }
                // SAFETY: IoVec has iovec's layout; the buffers are guest memory that
                // `self.mem` keeps mapped for the call, each within one region and one
                // descriptor; writev only reads them.
                let n = unsafe {
                    libc::writev(
                        self.tap.as_raw_fd(),
                        IoVec::as_iovec_ptr(&iov),
                        iov.len() as i32,
                    )
                };
                self.iov = iov;
                if n < 0 {
                    let e = std::io::Error::last_os_error();
                    if e.kind() == std::io::ErrorKind::WouldBlock {
                        add(&self.metrics.tap_would_block, 1);
                        self.tx.go_to_previous_position();
                        return Ok((used, true));
                    }
                    add(&self.metrics.tx_errors, 1);
                    utils::warn_limited!(
                        "virtio_net_tap_write",
                        "virtio-net: TAP {} refused a {len}-byte frame: {e}",
                        self.tap.name()
                    );
                } else {
                    add(&self.metrics.tx_frames, 1);
                    add(&self.metrics.tx_bytes, (len - VNET_HDR_LEN) as u64);
                }
                self.tx.add_used(&self.mem, head, 0)?;
                used = true;
            }
            if !self.tx.enable_notification(&self.mem)? {
                return Ok((used, false));
            }
        }
    }

    /// Receives frames while the guest has buffers and the TAP has frames, at most a batch.
    /// Returns whether any chain was used and whether the TAP should still be watched.
    pub fn receive_batch(&mut self) -> Result<(bool, bool), virtio_queue::Error> {
        let mut used = false;
        self.rx.disable_notification(&self.mem)?;
        for _ in 0..RX_BATCH {
            match self.receive()? {
                Rx::Delivered => used = true,
                Rx::Dropped => {}
                Rx::TapEmpty => return Ok((used, true)),
                Rx::TapError => return Ok((used, false)),
                // The limiter's timer resumes reception.
                Rx::Throttled => return Ok((used, false)),
                Rx::NoBuffers => {
                    // Ask for a kick when buffers arrive; look again in case some just did.
                    if self.rx.enable_notification(&self.mem)? {
                        self.rx.disable_notification(&self.mem)?;
                        continue;
                    }
                    return Ok((used, false));
                }
            }
        }
        // A full batch: more may wait; the TAP stays watched and level-triggered.
        Ok((used, true))
    }

    /// Whether the driver wants an interrupt for what went to `queue`'s used ring.
    pub fn needs_notification(&mut self, queue: usize) -> Result<bool, virtio_queue::Error> {
        match queue {
            RX_QUEUE => self.rx.needs_notification(&self.mem),
            _ => self.tx.needs_notification(&self.mem),
        }
    }
}
