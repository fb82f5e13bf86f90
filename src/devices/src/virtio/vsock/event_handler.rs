//! The vsock device thread: queues, the listening socket and every connection's stream.

use super::muxer::{Key, Muxer, Watch};
use super::packet::{Header, HDR_LEN};
use crate::virtio::buffers::{host_iovecs, ranges, read_at, write_at, Access, IoVec, Segment};
use crate::virtio::worker::DeviceThread;
use crate::virtio::{
    ActivateContext, ActivateError, GuestMemoryMmap, Interrupt, INTERRUPT_USED_RING,
};
use event_manager::{EventOps, Events, MutEventSubscriber};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::Bytes;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

const RX_EVT: u32 = 0;
const TX_EVT: u32 = 1;
const EV_EVT: u32 = 2;
const LISTENER: u32 = 4;
/// Connection streams are watched with this plus their descriptor as data.
const CONN_BASE: u32 = 1 << 16;
/// Largest payload taken in one packet either way.
const MAX_PAYLOAD: usize = 64 * 1024;

pub(super) struct VsockThread {
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    ev: Queue,
    evts: Vec<EventFd>,
    interrupt: Arc<Interrupt>,
    muxer: Muxer,
    broken: bool,
    /// Per-packet working buffers, kept so that the packet paths do not allocate.
    segs: Vec<Segment>,
    data: Vec<u8>,
    iov: Vec<IoVec>,
}

impl VsockThread {
    pub(super) fn new(ctx: ActivateContext, muxer: Muxer) -> Result<Self, ActivateError> {
        let mut queues = ctx.queues.into_iter();
        let (Some(rx), Some(tx), Some(ev)) = (queues.next(), queues.next(), queues.next()) else {
            return Err(ActivateError::InvalidQueue(2));
        };
        let mut thread = Self {
            mem: ctx.mem,
            rx,
            tx,
            ev,
            evts: ctx.queue_evts,
            interrupt: ctx.interrupt,
            muxer,
            broken: false,
            segs: Vec::new(),
            data: Vec::new(),
            iov: Vec::new(),
        };
        if ctx.restored {
            thread.transport_reset();
        }
        Ok(thread)
    }

    /// Tells the driver that every connection it had is gone (virtio 1.2, 5.10.6.6): sent after
    /// a restore, since the host ends of the connections did not survive it.
    fn transport_reset(&mut self) {
        const VIRTIO_VSOCK_EVENT_TRANSPORT_RESET: u32 = 0;
        let sent = (|| -> Result<bool, virtio_queue::Error> {
            let Some(chain) = self.ev.iter(&self.mem)?.next() else {
                return Ok(false);
            };
            let head = chain.head_index();
            let mut len = 0;
            for d in chain {
                if d.is_write_only() && d.len() >= 4 {
                    let bytes = VIRTIO_VSOCK_EVENT_TRANSPORT_RESET.to_le_bytes();
                    if self.mem.write_slice(&bytes, d.addr()).is_ok() {
                        len = 4;
                    }
                    break;
                }
            }
            self.ev.add_used(&self.mem, head, len)?;
            Ok(len == 4)
        })();
        match sent {
            Ok(true) => self.interrupt.trigger(INTERRUPT_USED_RING),
            Ok(false) => utils::warn_limited!(
                "virtio_vsock_no_event_buffer",
                "virtio-vsock: the driver posted no event buffer; TRANSPORT_RESET not sent"
            ),
            Err(e) => self.broken(e),
        }
    }

    fn broken(&mut self, e: virtio_queue::Error) {
        utils::warn_limited!(
            "virtio_broken_queue",
            "virtio-vsock: a queue is broken ({e}); device needs reset"
        );
        self.broken = true;
        self.interrupt.set_needs_reset();
    }

    /// Every packet the guest made available: parsed and handed to the muxer.
    fn transmit(&mut self) -> Result<bool, virtio_queue::Error> {
        let mut used = false;
        loop {
            self.tx.disable_notification(&self.mem)?;
            while let Some(chain) = self.tx.iter(&self.mem)?.next() {
                let head = chain.head_index();
                let mut segs = std::mem::take(&mut self.segs);
                segs.clear();
                segs.extend(
                    chain
                        .filter(|d| !d.is_write_only())
                        .map(|d| (d.addr(), d.len() as usize)),
                );
                let total: usize = segs.iter().map(|s| s.1).sum();
                let mut raw = [0u8; HDR_LEN];
                if !read_at(&self.mem, segs.iter().copied(), 0, &mut raw) {
                    self.muxer.dropped();
                } else {
                    let h = Header::parse(&raw);
                    let len = h.len as usize;
                    if len > MAX_PAYLOAD || HDR_LEN + len > total {
                        utils::warn_limited!(
                            "vsock_bad_len",
                            "virtio-vsock: packet claims {len} bytes in a {total}-byte chain; dropped"
                        );
                        self.muxer.dropped();
                    } else {
                        let mut data = std::mem::take(&mut self.data);
                        data.resize(len, 0);
                        if !read_at(&self.mem, segs.iter().copied(), HDR_LEN, &mut data) {
                            data.clear();
                        }
                        self.muxer.from_guest(&h, &data);
                        self.data = data;
                    }
                }
                self.segs = segs;
                self.tx.add_used(&self.mem, head, 0)?;
                used = true;
            }
            if !self.tx.enable_notification(&self.mem)? {
                return Ok(used);
            }
        }
    }

    /// Takes the next receive chain: its head, with its device-writable buffers put in
    /// `writable`; `None` if none is posted.
    fn pop_rx(&mut self, writable: &mut Vec<Segment>) -> Result<Option<u16>, virtio_queue::Error> {
        let Some(chain) = self.rx.iter(&self.mem)?.next() else {
            return Ok(None);
        };
        let head = chain.head_index();
        writable.clear();
        writable.extend(
            chain
                .filter(|d| d.is_write_only())
                .map(|d| (d.addr(), d.len() as usize)),
        );
        Ok(Some(head))
    }

    /// Fills posted receive buffers: control packets first, then data from readable streams.
    fn receive(&mut self) -> Result<bool, virtio_queue::Error> {
        let (mut writable, mut iov) = (
            std::mem::take(&mut self.segs),
            std::mem::take(&mut self.iov),
        );
        let result = self.receive_with(&mut writable, &mut iov);
        (self.segs, self.iov) = (writable, iov);
        result
    }

    /// [`Self::receive`], with working buffers for a chain's segments and its host iovecs.
    fn receive_with(
        &mut self,
        writable: &mut Vec<Segment>,
        iov: &mut Vec<IoVec>,
    ) -> Result<bool, virtio_queue::Error> {
        let mut used = false;
        loop {
            let control = self.muxer.pop_control();
            let data = if control.is_none() {
                self.muxer.next_readable()
            } else {
                None
            };
            if control.is_none() && data.is_none() {
                return Ok(used);
            }
            let Some(head) = self.pop_rx(writable)? else {
                if let Some(h) = control {
                    self.muxer.unpop_control(h);
                }
                self.rx.enable_notification(&self.mem)?;
                return Ok(used);
            };
            let room: usize = writable.iter().map(|s| s.1).sum();
            if room < HDR_LEN {
                // Nothing a packet fits in: returned empty, counted.
                self.muxer.dropped();
                self.rx.add_used(&self.mem, head, 0)?;
                used = true;
                if let Some(h) = control {
                    self.muxer.unpop_control(h);
                }
                continue;
            }
            if let Some(h) = control {
                let ok = write_at(&self.mem, writable.iter().copied(), 0, &h.bytes());
                self.rx
                    .add_used(&self.mem, head, if ok { HDR_LEN as u32 } else { 0 })?;
                used = true;
                continue;
            }
            let Some((key, credit)) = data else { continue };
            let max = (room - HDR_LEN).min(credit as usize).min(MAX_PAYLOAD);
            let result = self.read_stream(key, writable, max, iov);
            match self.muxer.read_done(key, result) {
                Some(h) => {
                    let ok = write_at(&self.mem, writable.iter().copied(), 0, &h.bytes());
                    let len = if ok { HDR_LEN as u32 + h.len } else { 0 };
                    self.rx.add_used(&self.mem, head, len)?;
                    used = true;
                }
                None => self.rx.go_to_previous_position(),
            }
        }
    }

    /// Reads up to `max` bytes from a connection's stream straight into the guest's buffers,
    /// after the header's place.
    fn read_stream(
        &self,
        key: Key,
        writable: &[Segment],
        max: usize,
        iov: &mut Vec<IoVec>,
    ) -> std::io::Result<usize> {
        let Some(stream) = self.muxer.stream(key) else {
            return Err(std::io::ErrorKind::NotConnected.into());
        };
        iov.clear();
        for (addr, n) in ranges(writable.iter().copied(), HDR_LEN, max) {
            host_iovecs(&self.mem, addr, n, Access::Write, iov).map_err(std::io::Error::other)?;
        }
        if iov.is_empty() {
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        // SAFETY: the iovecs point into guest memory that `self.mem` keeps mapped for the call,
        // each within one region and within a device-writable descriptor; readv writes at most
        // their lengths.
        let n = unsafe {
            libc::readv(
                stream.as_raw_fd(),
                IoVec::as_iovec_ptr(iov),
                iov.len() as i32,
            )
        };
        if n < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    fn apply_watches(&mut self, ops: &mut EventOps) {
        for w in std::mem::take(&mut self.muxer.watch) {
            match w {
                Watch::Add(fd) => {
                    let set = EventSet::IN
                        | EventSet::OUT
                        | EventSet::READ_HANG_UP
                        | EventSet::EDGE_TRIGGERED;
                    if ops
                        .add(Events::with_data_raw(fd, CONN_BASE + fd as u32, set))
                        .is_err()
                    {
                        utils::warn_limited!(
                            "vsock_watch_failed",
                            "virtio-vsock: cannot watch a connection"
                        );
                    }
                }
                Watch::Remove(stream) => {
                    let fd = stream.as_raw_fd();
                    let _ = ops.remove(Events::with_data_raw(
                        fd,
                        CONN_BASE + fd as u32,
                        EventSet::empty(),
                    ));
                    drop(stream);
                }
            }
        }
    }

    fn run_queues(&mut self, ops: &mut EventOps) {
        if self.broken {
            return;
        }
        let tx = self.transmit();
        self.apply_watches(ops);
        let rx = self.receive();
        self.apply_watches(ops);
        match (tx, rx) {
            (Ok(t), Ok(r)) => {
                let notify_tx = t && self.tx.needs_notification(&self.mem).unwrap_or(true);
                let notify_rx = r && self.rx.needs_notification(&self.mem).unwrap_or(true);
                if notify_tx || notify_rx {
                    self.interrupt.trigger(INTERRUPT_USED_RING);
                }
            }
            (Err(e), _) | (_, Err(e)) => self.broken(e),
        }
    }
}

impl MutEventSubscriber for VsockThread {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            RX_EVT | TX_EVT | EV_EVT => {
                if let Some(e) = self.evts.get(events.data() as usize) {
                    let _ = e.read();
                }
            }
            LISTENER => self.muxer.accept(),
            d if d >= CONN_BASE => {
                let set = events.event_set();
                self.muxer.ready(
                    (d - CONN_BASE) as i32,
                    set.contains(EventSet::IN),
                    set.contains(EventSet::OUT),
                    set.intersects(EventSet::HANG_UP | EventSet::READ_HANG_UP | EventSet::ERROR),
                );
            }
            _ => {}
        }
        self.apply_watches(ops);
        self.run_queues(ops);
    }

    fn init(&mut self, ops: &mut EventOps) {
        for (i, e) in self.evts.iter().enumerate() {
            if let Err(err) = ops.add(Events::with_data(e, i as u32, EventSet::IN)) {
                tracing::error!("virtio-vsock: cannot watch queue {i}: {err:?}");
            }
        }
        let listener = self.muxer.listener_fd();
        for (ev, what) in [(
            Events::with_data_raw(listener, LISTENER, EventSet::IN),
            "listening socket",
        )] {
            if let Err(err) = ops.add(ev) {
                tracing::error!("virtio-vsock: cannot watch the {what}: {err:?}");
            }
        }
    }
}

impl DeviceThread for VsockThread {
    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        vec![self.rx.state(), self.tx.state(), self.ev.state()]
    }
}
