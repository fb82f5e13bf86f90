//! The device thread: waits on the queues' notifications and on the TAP, and runs the data
//! path when either has work.

use super::rxtx::NetIo;
use super::{RX_QUEUE, TX_QUEUE};
use crate::virtio::worker::DeviceThread;
use crate::virtio::Interrupt;
use event_manager::{EventOps, Events, MutEventSubscriber};
use std::sync::Arc;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

const RX_EVT: u32 = 0;
const TX_EVT: u32 = 1;
const TAP: u32 = 2;
const RX_TIMER: u32 = 3;
const TX_TIMER: u32 = 4;

/// The device thread's state.
pub(super) struct NetThread {
    io: NetIo,
    rx_evt: EventFd,
    tx_evt: EventFd,
    interrupt: Arc<Interrupt>,
    /// What the thread waits for on the TAP now.
    watch: EventSet,
    broken: bool,
}

impl NetThread {
    /// The thread's state: it starts watching the TAP for frames.
    pub(super) fn new(
        io: NetIo,
        rx_evt: EventFd,
        tx_evt: EventFd,
        interrupt: Arc<Interrupt>,
    ) -> Self {
        Self {
            io,
            rx_evt,
            tx_evt,
            interrupt,
            watch: EventSet::IN,
            broken: false,
        }
    }

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
                    self.interrupt.trigger(crate::virtio::INTERRUPT_USED_RING);
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
                    self.interrupt.trigger(crate::virtio::INTERRUPT_USED_RING);
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
            RX_TIMER => {
                if let Some(l) = &self.io.limiters {
                    crate::bus::lock(&l.rx).on_timer();
                }
                if !self.broken {
                    watch.set(EventSet::IN, self.rx());
                }
            }
            TX_TIMER => {
                if let Some(l) = &self.io.limiters {
                    crate::bus::lock(&l.tx).on_timer();
                }
                if !self.broken {
                    watch.set(EventSet::OUT, self.tx());
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
            (Events::with_data(&*tap, TAP, self.watch), "TAP"),
        ] {
            if let Err(e) = ops.add(events) {
                tracing::error!("virtio-net: cannot watch the {what}: {e:?}");
            }
        }
        if let Some(l) = &self.io.limiters {
            use std::os::fd::AsRawFd;
            for (limiter, data) in [(&l.rx, RX_TIMER), (&l.tx, TX_TIMER)] {
                let fd = crate::bus::lock(limiter).timer().as_raw_fd();
                if let Err(e) = ops.add(Events::with_data_raw(fd, data, EventSet::IN)) {
                    tracing::error!("virtio-net: cannot watch a rate limiter's timer: {e:?}");
                }
            }
        }
    }
}

impl DeviceThread for NetThread {
    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        self.io.queue_states()
    }
}
