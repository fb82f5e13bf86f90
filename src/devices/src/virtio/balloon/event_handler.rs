//! The balloon's thread: serves its queues, and at each statistics interval hands the guest's
//! statistics buffer back so that the driver refills it.

use super::{release_range, QueueLayout, Shared, MAX_PFNS_PER_CHAIN, PAGE_SHIFT};
use crate::metrics::add;
use crate::virtio::worker::DeviceThread;
use crate::virtio::{ActivateContext, ActivateError, GuestMemoryMmap, Interrupt};
use event_manager::{EventOps, Events, MutEventSubscriber};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use virtio_queue::{Queue, QueueOwnedT, QueueState, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

const INFLATE: usize = 0;
const DEFLATE: usize = 1;
const TIMER: u32 = 100;
const REARM: u32 = 101;
/// One statistic: a 16-bit tag and a 64-bit value, packed.
const STAT_SIZE: usize = 10;
/// Most statistics bytes read from one buffer.
const MAX_STATS_BYTES: usize = 64 * STAT_SIZE;
const PAGE: u64 = 1 << PAGE_SHIFT;

/// One descriptor of a chain: address, length, device-writable.
type Desc = (GuestAddress, u32, bool);

pub(super) struct BalloonThread {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    evts: Vec<EventFd>,
    layout: QueueLayout,
    interrupt: Arc<Interrupt>,
    shared: Arc<Shared>,
    rearm: EventFd,
    /// The statistics buffer the device holds until the next interval.
    stats_head: Option<u16>,
    broken: bool,
    pfns: Vec<u32>,
    bytes: Vec<u8>,
    /// Given pages on 2 MiB hugetlbfs memory, until whole huge pages can be released.
    huge: super::release::HugePages,
    /// Whether any of guest memory is on hugetlbfs (then page numbers are tracked).
    huge_backed: bool,
}

impl BalloonThread {
    pub(super) fn new(ctx: ActivateContext, shared: Arc<Shared>) -> Result<Self, ActivateError> {
        let layout = QueueLayout::for_features(ctx.acked_features);
        let rearm = shared.rearm.try_clone().map_err(ActivateError::Thread)?;
        let mut thread = Self {
            mem: ctx.mem,
            queues: ctx.queues,
            evts: ctx.queue_evts,
            layout,
            interrupt: ctx.interrupt,
            shared,
            rearm,
            stats_head: None,
            broken: false,
            pfns: Vec::with_capacity(MAX_PFNS_PER_CHAIN),
            bytes: vec![0; MAX_PFNS_PER_CHAIN * 4],
            huge: Default::default(),
            huge_backed: false,
        };
        thread.huge_backed = super::release::any_huge(&thread.mem);
        thread.arm_timer(false);
        Ok(thread)
    }

    /// Arms the statistics timer at the shared interval; `now` asks for the first update at
    /// once (a new interval from the API).
    fn arm_timer(&mut self, now: bool) {
        if self.layout.stats.is_none() {
            return;
        }
        let secs = self.shared.stats_interval_s.load(Ordering::SeqCst);
        let mut timer = crate::bus::lock(&self.shared.timer);
        if secs == 0 {
            let _ = timer.clear();
            return;
        }
        let period = Duration::from_secs(u64::from(secs));
        let first = if now {
            Duration::from_millis(1)
        } else {
            period
        };
        if let Err(e) = timer.reset(first, Some(period)) {
            tracing::error!("virtio-balloon: cannot arm the statistics timer: {e}");
        }
    }

    /// Takes the next chain of queue `q` as a list of descriptors.
    fn next_chain(&mut self, q: usize) -> Result<Option<(u16, Vec<Desc>)>, virtio_queue::Error> {
        let Some(chain) = self.queues[q].iter(&self.mem)?.next() else {
            return Ok(None);
        };
        let head = chain.head_index();
        let descs = chain
            .map(|d| (d.addr(), d.len(), d.is_write_only()))
            .collect();
        Ok(Some((head, descs)))
    }

    fn drain(&mut self, q: usize) -> Result<bool, virtio_queue::Error> {
        let mut used = false;
        loop {
            self.queues[q].disable_notification(&self.mem)?;
            while let Some((head, descs)) = self.next_chain(q)? {
                if self.serve_chain(q, head, &descs)? {
                    self.queues[q].add_used(&self.mem, head, 0)?;
                    used = true;
                }
            }
            if !self.queues[q].enable_notification(&self.mem)? {
                break;
            }
        }
        Ok(used)
    }

    /// Serves one chain of queue `q`; returns whether it is used now (a statistics buffer is
    /// kept until the next interval).
    fn serve_chain(
        &mut self,
        q: usize,
        head: u16,
        descs: &[Desc],
    ) -> Result<bool, virtio_queue::Error> {
        let m = &self.shared.metrics;
        match q {
            INFLATE => {
                add(&m.inflate_chains, 1);
                self.inflate(descs);
            }
            DEFLATE => {
                add(&m.deflate_chains, 1);
                self.deflate(descs);
            }
            _ if Some(q) == self.layout.stats => {
                self.read_stats(descs);
                if let Some(old) = self.stats_head.replace(head) {
                    // A driver keeps one buffer here; an extra one goes back unread.
                    utils::warn_limited!(
                        "virtio_balloon_stats_extra",
                        "virtio-balloon: the driver posted a second statistics buffer"
                    );
                    self.queues[q].add_used(&self.mem, old, 0)?;
                    self.interrupt.trigger(crate::virtio::INTERRUPT_USED_RING);
                }
                return Ok(false);
            }
            _ if Some(q) == self.layout.hinting => self.hint(descs),
            _ if Some(q) == self.layout.reporting => self.report(descs),
            _ => {}
        }
        Ok(true)
    }

    /// Reads the page numbers of an inflate chain and releases those pages. Numbers outside
    /// guest RAM and repeats are ignored and counted.
    fn inflate(&mut self, descs: &[Desc]) {
        let m = self.shared.metrics.clone();
        self.pfns.clear();
        for &(addr, len, writable) in descs {
            if writable || len % 4 != 0 {
                add(&m.bad_descriptors, 1);
                continue;
            }
            let room = (MAX_PFNS_PER_CHAIN - self.pfns.len()) * 4;
            let take = (len as usize).min(room);
            if take < len as usize {
                add(&m.ignored_pfns, (len as usize - take) as u64 / 4);
            }
            let buf = &mut self.bytes[..take];
            if self.mem.read_slice(buf, addr).is_err() {
                add(&m.bad_descriptors, 1);
                continue;
            }
            self.pfns.extend(
                buf.chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            );
        }
        let given = self.pfns.len();
        self.pfns.sort_unstable();
        self.pfns.dedup();
        add(&m.ignored_pfns, (given - self.pfns.len()) as u64);
        let mut i = 0;
        while i < self.pfns.len() {
            let start = self.pfns[i];
            let addr = GuestAddress(u64::from(start) << PAGE_SHIFT);
            if !self.mem.check_range(addr, PAGE as usize) {
                add(&m.ignored_pfns, 1);
                i += 1;
                continue;
            }
            // The run of consecutive page numbers that are all in RAM.
            let mut n = 1;
            while i + n < self.pfns.len()
                && self.pfns[i + n] == start + n as u32
                && self.mem.check_range(
                    GuestAddress((u64::from(start) + n as u64) << PAGE_SHIFT),
                    PAGE as usize,
                )
            {
                n += 1;
            }
            add(&m.inflated_pages, n as u64);
            if self.huge_backed && super::release::is_huge(&self.mem, addr) {
                for pfn in u64::from(start)..u64::from(start) + n as u64 {
                    if let Some(huge) = self.huge.give(pfn) {
                        self.release(huge, 2 << 20);
                    }
                }
            } else {
                self.release(addr, n as u64 * PAGE);
            }
            i += n;
        }
    }

    /// Counts the pages the guest takes back; on huge pages they no longer count towards
    /// releasing theirs.
    fn deflate(&mut self, descs: &[Desc]) {
        let m = self.shared.metrics.clone();
        for &(addr, len, writable) in descs {
            if writable || len % 4 != 0 {
                add(&m.bad_descriptors, 1);
                continue;
            }
            let take = (len as usize).min(MAX_PFNS_PER_CHAIN * 4);
            if !self.huge_backed {
                // Nothing to undo on the host: the numbers need not be read.
                if self.mem.check_range(addr, take) {
                    add(&m.deflated_pages, take as u64 / 4);
                } else {
                    add(&m.bad_descriptors, 1);
                }
                continue;
            }
            let buf = &mut self.bytes[..take];
            if self.mem.read_slice(buf, addr).is_err() {
                add(&m.bad_descriptors, 1);
                continue;
            }
            add(&m.deflated_pages, take as u64 / 4);
            for c in buf.chunks_exact(4) {
                let pfn = u64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]]));
                if super::release::is_huge(&self.mem, GuestAddress(pfn << PAGE_SHIFT)) {
                    self.huge.take_back(pfn);
                }
            }
        }
    }

    /// A chain of the hinting queue: the guest's command (a 4-byte buffer it wrote: the run's
    /// ID when it starts hinting, STOP when it has finished) or hinted free blocks, released
    /// while they belong to the run in progress.
    fn hint(&mut self, descs: &[Desc]) {
        let m = self.shared.metrics.clone();
        for &(addr, len, writable) in descs {
            if !writable {
                let mut b = [0u8; 4];
                if len != 4 || self.mem.read_slice(&mut b, addr).is_err() {
                    add(&m.bad_descriptors, 1);
                    continue;
                }
                let cmd = u32::from_le_bytes(b);
                self.shared.guest_hint_cmd.store(cmd, Ordering::SeqCst);
                if cmd == super::HINT_CMD_STOP
                    && self.shared.ack_on_stop.load(Ordering::SeqCst)
                    && self.shared.hint_cmd.load(Ordering::SeqCst) >= 2
                {
                    self.shared
                        .hint_cmd
                        .store(super::HINT_CMD_DONE, Ordering::SeqCst);
                    self.interrupt.trigger(crate::virtio::INTERRUPT_CONFIG);
                }
                continue;
            }
            let run = self.shared.hint_cmd.load(Ordering::SeqCst);
            if run < 2 || self.shared.guest_hint_cmd.load(Ordering::SeqCst) != run {
                // A hint from a run that is over: the guest may be using the page again.
                add(&m.stale_hints, 1);
                continue;
            }
            if addr.0 % PAGE != 0
                || u64::from(len) % PAGE != 0
                || !self.mem.check_range(addr, len as usize)
            {
                add(&m.bad_descriptors, 1);
                continue;
            }
            add(&m.hinted_bytes, u64::from(len));
            self.release(addr, u64::from(len));
        }
    }

    /// Releases the ranges of a free page report: each descriptor is a free, page-aligned
    /// block of guest RAM.
    fn report(&mut self, descs: &[Desc]) {
        let m = self.shared.metrics.clone();
        add(&m.reports, 1);
        for &(addr, len, _) in descs {
            if addr.0 % PAGE != 0
                || u64::from(len) % PAGE != 0
                || !self.mem.check_range(addr, len as usize)
            {
                add(&m.bad_descriptors, 1);
                continue;
            }
            add(&m.reported_bytes, u64::from(len));
            self.release(addr, u64::from(len));
        }
    }

    fn release(&self, addr: GuestAddress, len: u64) {
        match release_range(&self.mem, addr, len) {
            Ok(n) => add(&self.shared.metrics.released_bytes, n),
            Err(e) => {
                add(&self.shared.metrics.release_failures, 1);
                utils::warn_limited!(
                    "virtio_balloon_release",
                    "virtio-balloon: guest range {:#x}+{len:#x}: {e}",
                    addr.0
                );
            }
        }
    }

    /// Takes the guest's statistics from a buffer; unknown tags are skipped and counted.
    fn read_stats(&mut self, descs: &[Desc]) {
        let m = self.shared.metrics.clone();
        add(&m.stats_updates, 1);
        let mut stats = crate::bus::lock(&self.shared.guest_stats);
        for &(addr, len, writable) in descs {
            if writable {
                add(&m.bad_descriptors, 1);
                continue;
            }
            let take = (len as usize).min(MAX_STATS_BYTES) / STAT_SIZE * STAT_SIZE;
            let buf = &mut self.bytes[..take];
            if self.mem.read_slice(buf, addr).is_err() {
                add(&m.bad_descriptors, 1);
                continue;
            }
            for s in buf.chunks_exact(STAT_SIZE) {
                let tag = u16::from_le_bytes([s[0], s[1]]) as usize;
                let mut v = [0u8; 8];
                v.copy_from_slice(&s[2..]);
                match stats.get_mut(tag) {
                    Some(slot) => *slot = Some(u64::from_le_bytes(v)),
                    None => add(&m.unknown_stats, 1),
                }
            }
        }
    }

    /// The interval passed: the held statistics buffer goes back, and the driver refills it.
    fn on_timer(&mut self) {
        // Only this thread arms the timer, and it is readable: the read does not block.
        let _ = crate::bus::lock(&self.shared.timer).wait();
        self.return_stats();
    }

    /// Hands the held statistics buffer back, so that the driver refills it.
    pub(super) fn return_stats(&mut self) {
        let (Some(q), Some(head)) = (self.layout.stats, self.stats_head.take()) else {
            return;
        };
        let result = self.queues[q]
            .add_used(&self.mem, head, 0)
            .and_then(|_| self.queues[q].needs_notification(&self.mem));
        match result {
            Ok(true) => self.interrupt.trigger(crate::virtio::INTERRUPT_USED_RING),
            Ok(false) => {}
            Err(e) => self.broken(e),
        }
    }

    fn broken(&mut self, e: virtio_queue::Error) {
        utils::warn_limited!(
            "virtio_broken_queue",
            "virtio-balloon: a queue is broken ({e}); device needs reset"
        );
        self.broken = true;
        self.interrupt.set_needs_reset();
    }

    pub(super) fn serve(&mut self, q: usize) {
        if self.broken {
            return;
        }
        match self
            .drain(q)
            .and_then(|used| Ok(used && self.queues[q].needs_notification(&self.mem)?))
        {
            Ok(true) => self.interrupt.trigger(crate::virtio::INTERRUPT_USED_RING),
            Ok(false) => {}
            Err(e) => self.broken(e),
        }
    }
}

impl MutEventSubscriber for BalloonThread {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            TIMER => self.on_timer(),
            REARM => {
                let _ = self.rearm.read();
                self.arm_timer(true);
            }
            q => {
                let q = q as usize;
                if let Some(evt) = self.evts.get(q) {
                    let _ = evt.read();
                    if q < self.queues.len() {
                        self.serve(q);
                    }
                }
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        for (i, evt) in self.evts.iter().enumerate().take(self.queues.len()) {
            if let Err(e) = ops.add(Events::with_data(evt, i as u32, EventSet::IN)) {
                tracing::error!("virtio-balloon: cannot watch queue {i}: {e:?}");
            }
        }
        if self.layout.stats.is_some() {
            let timer = std::os::fd::AsRawFd::as_raw_fd(&*crate::bus::lock(&self.shared.timer));
            for (fd, data) in [
                (timer, TIMER),
                (std::os::fd::AsRawFd::as_raw_fd(&self.rearm), REARM),
            ] {
                if let Err(e) = ops.add(Events::with_data_raw(fd, data, EventSet::IN)) {
                    tracing::error!("virtio-balloon: cannot watch its statistics timer: {e:?}");
                }
            }
        }
    }
}

impl DeviceThread for BalloonThread {
    fn queue_states(&self) -> Vec<QueueState> {
        let mut states: Vec<QueueState> = self.queues.iter().map(Queue::state).collect();
        // The held statistics buffer was the last one taken: a restored device takes it
        // again from the ring.
        if let (Some(q), Some(_)) = (self.layout.stats, self.stats_head) {
            states[q].next_avail = states[q].next_avail.wrapping_sub(1);
        }
        states
    }
}
