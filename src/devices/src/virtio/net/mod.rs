//! virtio-net (device ID 1) on a host TAP: one receive and one transmit queue.
//!
//! Frames cross without a copy: a transmitted chain goes to the TAP with one `writev` over the
//! guest's buffers, and a received frame is read with one `readv` straight into the buffers the
//! guest posted (several of them when MRG_RXBUF is negotiated). Both carry the 12-byte virtio-net
//! header, which the TAP (IFF_VNET_HDR) reads and writes itself, so checksum and segmentation
//! offloads pass through untouched: a 64 KiB TSO frame crosses as one frame.
//!
//! The device thread watches the TAP as well as the queues. It reads the TAP only while the
//! guest has buffers posted; when it has none, frames wait in the TAP (the thread stops
//! watching it until the guest posts more), so a waiting frame costs no CPU and is never lost.
//! A frame larger than the buffers posted for it is held (exactly one) until more arrive when
//! MRG_RXBUF is on, and dropped and counted when it could never fit.

pub mod mmds;
pub mod tap;
#[cfg(test)]
mod tests;

use super::worker::{DeviceThread, Worker};
use super::{features, ActivateContext, ActivateError, GuestMemoryMmap, Interrupt, VirtioDevice};
use crate::metrics::Counters;
use event_manager::{EventOps, Events, MutEventSubscriber};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tap::{Tap, VNET_HDR_LEN};
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::*;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

/// Receive queue index.
pub const RX_QUEUE: usize = 0;
/// Transmit queue index.
pub const TX_QUEUE: usize = 1;
const QUEUE_SIZE: u16 = 256;
/// Largest frame after the header: a 64 KiB segmentation-offload payload and its headers
/// (the bound Linux's virtio_net and QEMU use).
pub const MAX_FRAME: usize = 65550;
/// Largest frame with its header.
pub const MAX_BUFFER: usize = VNET_HDR_LEN + MAX_FRAME;
/// Frames received per pass before the thread looks at its other events.
const RX_BATCH: usize = 256;
/// Most buffers gathered for one frame (Linux's UIO_MAXIOV less the spill buffer).
const MAX_IOVECS: usize = 1023;

const RX_EVT: u32 = 0;
const TX_EVT: u32 = 1;
const TAP: u32 = 2;
const KILL: u32 = 3;

fn bit(b: u32) -> u64 {
    1 << b
}

/// Counters of one interface, in the metrics file under `net_<id>`.
#[derive(Debug, Default)]
pub struct NetMetrics {
    /// Frame bytes (without the header) delivered to the guest.
    pub rx_bytes: AtomicU64,
    /// Frames delivered to the guest.
    pub rx_frames: AtomicU64,
    /// Frames dropped: larger than anything the guest posts.
    pub rx_drops: AtomicU64,
    /// Malformed receive chains and TAP read errors.
    pub rx_errors: AtomicU64,
    /// Frame bytes (without the header) sent to the TAP.
    pub tx_bytes: AtomicU64,
    /// Frames sent to the TAP.
    pub tx_frames: AtomicU64,
    /// Frames dropped: shorter than the header or longer than the largest frame.
    pub tx_drops: AtomicU64,
    /// Malformed transmit chains and frames the TAP refused.
    pub tx_errors: AtomicU64,
    /// Writes the TAP could not take at once (retried when it can).
    pub tap_would_block: AtomicU64,
    /// Guest frames MMDS answered (they never reach the TAP).
    pub mmds_frames: AtomicU64,
}

impl Counters for NetMetrics {
    fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            ("rx_bytes", l(&self.rx_bytes)),
            ("rx_frames", l(&self.rx_frames)),
            ("rx_drops", l(&self.rx_drops)),
            ("rx_errors", l(&self.rx_errors)),
            ("tx_bytes", l(&self.tx_bytes)),
            ("tx_frames", l(&self.tx_frames)),
            ("tx_drops", l(&self.tx_drops)),
            ("tx_errors", l(&self.tx_errors)),
            ("tap_would_block", l(&self.tap_would_block)),
            ("mmds_frames", l(&self.mmds_frames)),
        ]
    }
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// What an interface is configured with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// Interface ID (`eth0`), for messages and metrics.
    pub id: String,
    /// MAC address offered to the guest; without one the guest picks its own.
    pub mac: Option<[u8; 6]>,
    /// MTU advertised to the guest (68 to 65535).
    pub mtu: Option<u16>,
}

/// A virtio-net device.
pub struct Net {
    config: NetConfig,
    tap: Arc<Tap>,
    features: u64,
    config_space: Vec<u8>,
    worker: Option<Worker>,
    metrics: Arc<NetMetrics>,
    mmds: Option<(mmds::SharedMmds, [u8; 4])>,
}

impl Net {
    /// A device for `config` on the open `tap`.
    pub fn new(config: NetConfig, tap: Tap) -> Self {
        let mut features = features::COMMON
            | bit(VIRTIO_NET_F_CSUM)
            | bit(VIRTIO_NET_F_GUEST_CSUM)
            | bit(VIRTIO_NET_F_GUEST_TSO4)
            | bit(VIRTIO_NET_F_GUEST_TSO6)
            | bit(VIRTIO_NET_F_GUEST_UFO)
            | bit(VIRTIO_NET_F_HOST_TSO4)
            | bit(VIRTIO_NET_F_HOST_TSO6)
            | bit(VIRTIO_NET_F_HOST_UFO)
            | bit(VIRTIO_NET_F_MRG_RXBUF)
            | bit(VIRTIO_NET_F_STATUS);
        if tap.supports_uso() {
            features |= bit(VIRTIO_NET_F_GUEST_USO4)
                | bit(VIRTIO_NET_F_GUEST_USO6)
                | bit(VIRTIO_NET_F_HOST_USO);
        }
        if config.mac.is_some() {
            features |= bit(VIRTIO_NET_F_MAC);
        }
        if config.mtu.is_some() {
            features |= bit(VIRTIO_NET_F_MTU);
        }
        // virtio 1.2, 5.1.4: mac, status, max_virtqueue_pairs, mtu.
        let mut c = vec![0u8; 12];
        if let Some(mac) = config.mac {
            c[..6].copy_from_slice(&mac);
        }
        c[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        c[8..10].copy_from_slice(&1u16.to_le_bytes());
        c[10..12].copy_from_slice(&config.mtu.unwrap_or(0).to_le_bytes());
        let metrics = crate::metrics::register_counters(format!("net_{}", config.id));
        Self {
            config,
            tap: Arc::new(tap),
            features,
            config_space: c,
            worker: None,
            metrics,
            mmds: None,
        }
    }

    /// Answers MMDS at `ip` from `store` on this interface.
    pub fn with_mmds(mut self, store: mmds::SharedMmds, ip: [u8; 4]) -> Self {
        self.mmds = Some((store, ip));
        self
    }

    /// The interface's counters.
    pub fn metrics(&self) -> Arc<NetMetrics> {
        self.metrics.clone()
    }

    /// The TAP's receive offloads for what the driver accepted (virtio 1.2, 5.1.6.4: the
    /// guest takes partial checksums and each segmentation kind it acknowledged).
    fn tap_offloads(acked: u64) -> u32 {
        if acked & bit(VIRTIO_NET_F_GUEST_CSUM) == 0 {
            return 0;
        }
        let mut f = libc::TUN_F_CSUM;
        for (feature, flag) in [
            (VIRTIO_NET_F_GUEST_TSO4, libc::TUN_F_TSO4),
            (VIRTIO_NET_F_GUEST_TSO6, libc::TUN_F_TSO6),
            (VIRTIO_NET_F_GUEST_UFO, libc::TUN_F_UFO),
            (VIRTIO_NET_F_GUEST_USO4, libc::TUN_F_USO4),
            (VIRTIO_NET_F_GUEST_USO6, libc::TUN_F_USO6),
        ] {
            if acked & bit(feature) != 0 {
                f |= flag;
            }
        }
        f
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_image(&self.config_space, offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let offloads = Self::tap_offloads(ctx.acked_features);
        if let Err(e) = self.tap.set_offload(offloads) {
            tracing::warn!(
                "virtio-net {}: TAP {} refused offloads {offloads:#x}: {e}",
                self.config.id,
                self.tap.name()
            );
        }
        let kill = EventFd::new(libc::EFD_NONBLOCK).map_err(ActivateError::Thread)?;
        let mut queues = ctx.queues.into_iter();
        let mut evts = ctx.queue_evts.into_iter();
        let (Some(rx), Some(tx), Some(rx_evt), Some(tx_evt)) =
            (queues.next(), queues.next(), evts.next(), evts.next())
        else {
            return Err(ActivateError::InvalidQueue(TX_QUEUE));
        };
        let mut io = NetIo::new(
            ctx.mem,
            rx,
            tx,
            self.tap.clone(),
            self.metrics.clone(),
            ctx.acked_features & bit(VIRTIO_NET_F_MRG_RXBUF) != 0,
        );
        // Without receive offloads the host sends at most an MTU-sized Ethernet frame (with a
        // VLAN tag); with them, up to 64 KiB.
        if offloads & !libc::TUN_F_CSUM == 0 {
            let mtu = usize::from(self.config.mtu.unwrap_or(1500)).max(1500);
            io.set_rx_frame_max(VNET_HDR_LEN + 18 + mtu);
        }
        if let Some((store, ip)) = &self.mmds {
            io.set_mmds(mmds::MmdsStack::new(*ip, store.clone()));
        }
        let thread = NetThread {
            io,
            rx_evt,
            tx_evt,
            kill: kill.try_clone().map_err(ActivateError::Thread)?,
            interrupt: ctx.interrupt,
            watch: EventSet::IN,
            broken: false,
            stop: false,
        };
        self.worker = Some(Worker::run("virtio-net", kill, thread)?);
        Ok(())
    }

    fn reset(&mut self) {
        self.worker = None;
    }
}

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
}

/// A posted receive chain: head, device-writable buffers, their total size.
struct RxChain {
    head: u16,
    segments: Vec<(GuestAddress, usize)>,
    /// Host addresses and lengths the segments map to (more than one where a segment spans
    /// regions); kept as integers so the chain can move between threads.
    iovecs: Vec<(usize, usize)>,
    capacity: usize,
}

/// The data path of an active device, separate from its event loop so that tests and the
/// fuzz target drive it directly.
pub struct NetIo {
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    tap: Arc<Tap>,
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
}

/// Host addresses of `len` bytes of guest memory at `addr`, split where regions end.
fn guest_iovecs(
    mem: &GuestMemoryMmap,
    addr: GuestAddress,
    len: usize,
    out: &mut Vec<libc::iovec>,
) -> Option<()> {
    for slice in mem.get_slices(addr, len) {
        let slice = slice.ok()?;
        out.push(libc::iovec {
            iov_base: slice.ptr_guard_mut().as_ptr().cast(),
            iov_len: slice.len(),
        });
    }
    Some(())
}

/// Writes `bytes` at byte `offset` of a chain's buffers (a header may span descriptors).
fn write_at(
    mem: &GuestMemoryMmap,
    segments: &[(GuestAddress, usize)],
    offset: usize,
    bytes: &[u8],
) {
    for (i, b) in bytes.iter().enumerate() {
        let mut target = offset + i;
        for &(addr, len) in segments {
            if target < len {
                let _ = mem.write_obj(*b, GuestAddress(addr.0 + target as u64));
                break;
            }
            target -= len;
        }
    }
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
        }
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
    fn divert_to_mmds(&mut self, segments: &[(GuestAddress, usize)], len: usize) -> bool {
        let Some(stack) = self.mmds.as_mut() else {
            return false;
        };
        let gather = |want: usize| {
            let mut buf = Vec::with_capacity(want);
            for &(addr, l) in segments {
                let n = l.min(want - buf.len());
                let start = buf.len();
                buf.resize(start + n, 0);
                let _ = self.mem.read_slice(&mut buf[start..], addr);
                if buf.len() == want {
                    break;
                }
            }
            buf
        };
        let head = gather(len.min(VNET_HDR_LEN + 42));
        if head.len() <= VNET_HDR_LEN || !stack.is_for_mmds(&head[VNET_HDR_LEN..]) {
            return false;
        }
        let frame = gather(len);
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
            let mut c = RxChain {
                head,
                segments: Vec::new(),
                iovecs: Vec::new(),
                capacity: 0,
            };
            let mut ok = true;
            let mut iov = Vec::new();
            for d in chain {
                let len = d.len() as usize;
                if !d.is_write_only() || guest_iovecs(&self.mem, d.addr(), len, &mut iov).is_none()
                {
                    ok = false;
                    break;
                }
                c.segments.push((d.addr(), len));
                c.capacity += len;
            }
            c.iovecs = iov
                .iter()
                .map(|v| (v.iov_base as usize, v.iov_len))
                .collect();
            if ok && c.capacity > 0 && c.iovecs.len() <= MAX_IOVECS {
                return Ok(Some(c));
            }
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
        let mut chains: Vec<RxChain> = Vec::new();
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
    fn unget(&mut self, chains: Vec<RxChain>) {
        for c in chains.into_iter().rev() {
            self.stash.push_front(c);
        }
    }

    /// Returns the first chains, holding `len` bytes in order, to the guest with
    /// `num_buffers` set; gives the rest back to the ring.
    fn complete(
        &mut self,
        mut chains: Vec<RxChain>,
        len: usize,
    ) -> Result<(), virtio_queue::Error> {
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
            &chains[0].segments,
            10,
            &(used as u16).to_le_bytes(),
        );
        let rest = chains.split_off(used);
        self.unget(rest);
        let mut left = len;
        for c in &chains {
            let n = left.min(c.capacity);
            self.rx.add_used(&self.mem, c.head, n as u32)?;
            left -= n;
        }
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
        let mut pos = 0;
        'copy: for c in &chains {
            for &(addr, len) in &c.segments {
                let n = len.min(frame.len() - pos);
                if self.mem.write_slice(&frame[pos..pos + n], addr).is_err() {
                    add(&self.metrics.rx_errors, 1);
                }
                pos += n;
                if pos == frame.len() {
                    break 'copy;
                }
            }
        }
        self.complete(chains, frame.len())?;
        Ok(Rx::Delivered)
    }

    /// Moves one frame from the TAP to the guest.
    pub fn receive(&mut self) -> Result<Rx, virtio_queue::Error> {
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
        let mut iov: Vec<libc::iovec> = chains
            .iter()
            .flat_map(|c| &c.iovecs)
            .map(|&(base, len)| libc::iovec {
                iov_base: base as *mut libc::c_void,
                iov_len: len,
            })
            .collect();
        iov.push(libc::iovec {
            iov_base: self.spill.as_mut_ptr().cast(),
            iov_len: self.spill.len(),
        });
        // SAFETY: the iovecs point into guest memory (kept mapped by `self.mem` for the whole
        // call, each within one region and within its descriptor's length) and into `spill`,
        // which we own; readv writes at most their lengths.
        let n = unsafe { libc::readv(self.tap.as_raw_fd(), iov.as_ptr(), iov.len() as i32) };
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
        let mut pos = 0;
        for c in &chains {
            for &(addr, len) in &c.segments {
                let _ = self.mem.read_slice(&mut frame[pos..pos + len], addr);
                pos += len;
            }
        }
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
                let mut iov = Vec::new();
                let mut segments = Vec::new();
                let mut len = 0usize;
                let mut ok = true;
                for d in chain {
                    len += d.len() as usize;
                    segments.push((d.addr(), d.len() as usize));
                    if d.is_write_only()
                        || len > MAX_BUFFER
                        || iov.len() >= MAX_IOVECS
                        || guest_iovecs(&self.mem, d.addr(), d.len() as usize, &mut iov).is_none()
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
                    self.tx.add_used(&self.mem, head, 0)?;
                    used = true;
                    continue;
                }
                if self.divert_to_mmds(&segments, len) {
                    self.tx.add_used(&self.mem, head, 0)?;
                    used = true;
                    continue;
                }
                // SAFETY: the iovecs point into guest memory that `self.mem` keeps mapped for
                // the call, each within one region and one descriptor; writev only reads them.
                let n =
                    unsafe { libc::writev(self.tap.as_raw_fd(), iov.as_ptr(), iov.len() as i32) };
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

/// The device thread's state.
struct NetThread {
    io: NetIo,
    rx_evt: EventFd,
    tx_evt: EventFd,
    kill: EventFd,
    interrupt: Arc<Interrupt>,
    /// What the thread waits for on the TAP now.
    watch: EventSet,
    broken: bool,
    stop: bool,
}

impl NetThread {
    fn broken(&mut self, e: virtio_queue::Error) {
        utils::warn_limited!(
            "virtio_broken_queue",
            "virtio-net: a queue is broken ({e}); device needs reset"
        );
        self.broken = true;
        self.interrupt.set_needs_reset();
    }

    fn rx(&mut self) -> bool {
        match self.io.receive_batch() {
            Ok((used, watch)) => {
                if used && self.io.needs_notification(RX_QUEUE).unwrap_or(true) {
                    self.interrupt.trigger(super::INTERRUPT_USED_RING);
                }
                watch
            }
            Err(e) => {
                self.broken(e);
                false
            }
        }
    }

    fn tx(&mut self) -> bool {
        match self.io.transmit() {
            Ok((used, full)) => {
                if used && self.io.needs_notification(TX_QUEUE).unwrap_or(true) {
                    self.interrupt.trigger(super::INTERRUPT_USED_RING);
                }
                full
            }
            Err(e) => {
                self.broken(e);
                false
            }
        }
    }
}

impl MutEventSubscriber for NetThread {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut watch = self.watch;
        match events.data() {
            KILL => {
                self.stop = true;
                return;
            }
            RX_EVT => {
                let _ = self.rx_evt.read();
                if !self.broken {
                    watch.set(EventSet::IN, self.rx());
                }
            }
            TX_EVT => {
                let _ = self.tx_evt.read();
                if !self.broken {
                    watch.set(EventSet::OUT, self.tx());
                    if self.io.mmds_pending() {
                        watch.set(EventSet::IN, self.rx());
                    }
                }
            }
            TAP => {
                let set = events.event_set();
                if set.intersects(EventSet::ERROR | EventSet::HANG_UP) {
                    utils::warn_limited!(
                        "virtio_net_tap_gone",
                        "virtio-net: TAP {} reported an error or hang-up; no longer watched",
                        self.io.tap.name()
                    );
                    watch = EventSet::empty();
                } else if !self.broken {
                    if set.contains(EventSet::OUT) {
                        watch.set(EventSet::OUT, self.tx());
                    }
                    if set.contains(EventSet::IN) {
                        watch.set(EventSet::IN, self.rx());
                    }
                }
            }
            _ => {}
        }
        if watch != self.watch {
            let tap = self.io.tap.clone();
            if ops.modify(Events::with_data(&*tap, TAP, watch)).is_ok() {
                self.watch = watch;
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let tap = self.io.tap.clone();
        for (events, what) in [
            (
                Events::with_data(&self.rx_evt, RX_EVT, EventSet::IN),
                "receive queue",
            ),
            (
                Events::with_data(&self.tx_evt, TX_EVT, EventSet::IN),
                "transmit queue",
            ),
            (
                Events::with_data(&self.kill, KILL, EventSet::IN),
                "stop event",
            ),
            (Events::with_data(&*tap, TAP, self.watch), "TAP"),
        ] {
            if let Err(e) = ops.add(events) {
                tracing::error!("virtio-net: cannot watch the {what}: {e:?}");
            }
        }
    }
}

impl DeviceThread for NetThread {
    fn stopped(&self) -> bool {
        self.stop
    }
}
