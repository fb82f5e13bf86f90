//! The thread an active virtio device runs on: an event loop (event-manager) over the device's
//! queue eventfds, draining each notified queue and raising the interrupt when the driver wants
//! one (EVENT_IDX aware).

use super::{ActivateContext, ActivateError, GuestMemoryMmap, Interrupt, INTERRUPT_USED_RING};
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use std::sync::Arc;
use std::thread::JoinHandle;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

/// A device's per-request logic.
pub trait QueueHandler: Send + 'static {
    /// Serves one descriptor chain from queue `queue`; returns the number of bytes written into
    /// the chain's device-writable buffers (the used-ring length).
    fn handle(
        &mut self,
        queue: usize,
        chain: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
    ) -> u32;
}

const KILL_TOKEN: u32 = u32::MAX;

struct Subscriber<H> {
    handler: H,
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    broken: Vec<bool>,
    evts: Vec<EventFd>,
    kill: EventFd,
    interrupt: Arc<Interrupt>,
    stop: bool,
}

impl<H: QueueHandler> Subscriber<H> {
    fn drain(&mut self, index: usize) -> Result<bool, virtio_queue::Error> {
        let mut used = false;
        loop {
            let queue = &mut self.queues[index];
            queue.disable_notification(&self.mem)?;
            loop {
                let chain = queue.iter(&self.mem)?.next();
                let Some(chain) = chain else { break };
                let head = chain.head_index();
                let len = self.handler.handle(index, chain, &self.mem);
                queue.add_used(&self.mem, head, len)?;
                used = true;
            }
            // Re-enable notifications, then look again: a chain made available in between
            // would otherwise wait for the next kick.
            if !queue.enable_notification(&self.mem)? {
                break;
            }
        }
        Ok(used)
    }

    fn serve(&mut self, index: usize) {
        if self.broken[index] {
            return;
        }
        let result = self
            .drain(index)
            .and_then(|used| Ok(used && self.queues[index].needs_notification(&self.mem)?));
        match result {
            Ok(true) => self.interrupt.trigger(INTERRUPT_USED_RING),
            Ok(false) => {}
            Err(e) => {
                utils::warn_limited!(
                    "virtio_broken_queue",
                    "virtio: queue {index} is broken ({e}); device needs reset"
                );
                self.broken[index] = true;
                self.interrupt.set_needs_reset();
            }
        }
    }
}

impl<H: QueueHandler> MutEventSubscriber for Subscriber<H> {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            KILL_TOKEN => self.stop = true,
            i => {
                let i = i as usize;
                if let Some(evt) = self.evts.get(i) {
                    let _ = evt.read();
                    self.serve(i);
                }
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        for (i, evt) in self.evts.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(evt, i as u32, EventSet::IN)) {
                tracing::error!("virtio: cannot watch queue {i}: {e:?}");
            }
        }
        if let Err(e) = ops.add(Events::with_data(&self.kill, KILL_TOKEN, EventSet::IN)) {
            tracing::error!("virtio: cannot watch the stop event: {e:?}");
        }
    }
}

/// A device thread's event handling: an event-manager subscriber that also says when the
/// thread should end (after its kill eventfd fired).
pub trait DeviceThread: MutEventSubscriber + Send + 'static {
    /// True once the thread should return.
    fn stopped(&self) -> bool;
}

impl<H: QueueHandler> DeviceThread for Subscriber<H> {
    fn stopped(&self) -> bool {
        self.stop
    }
}

/// A running device thread. Dropping it stops the thread.
pub struct Worker {
    kill: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Starts `handler` on a thread named `name`, serving the queues in `ctx`.
    pub fn spawn<H: QueueHandler>(
        name: &str,
        handler: H,
        ctx: ActivateContext,
    ) -> Result<Self, ActivateError> {
        let kill = EventFd::new(libc::EFD_NONBLOCK).map_err(ActivateError::Thread)?;
        let subscriber = Subscriber {
            handler,
            mem: ctx.mem,
            broken: vec![false; ctx.queues.len()],
            queues: ctx.queues,
            evts: ctx.queue_evts,
            kill: kill.try_clone().map_err(ActivateError::Thread)?,
            interrupt: ctx.interrupt,
            stop: false,
        };
        Self::run(name, kill, subscriber)
    }

    /// Runs `subscriber` on a thread named `name` until `kill` (whose clone the subscriber
    /// watches) is signalled; for devices with more to watch than their queues.
    pub fn run<S: DeviceThread>(
        name: &str,
        kill: EventFd,
        subscriber: S,
    ) -> Result<Self, ActivateError> {
        let mut manager: EventManager<S> =
            EventManager::new().map_err(|e| ActivateError::EventLoop(format!("{e:?}")))?;
        let id = manager.add_subscriber(subscriber);
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .stack_size(256 << 10)
            .spawn(move || {
                // Chains made available before activation were announced on eventfds nobody
                // watched yet; their counters are still set, so the first wait returns at once.
                loop {
                    if let Err(e) = manager.run() {
                        tracing::error!("virtio: device event loop failed: {e:?}");
                        return;
                    }
                    match manager.subscriber_mut(id) {
                        Ok(s) if s.stopped() => return,
                        Ok(_) => {}
                        Err(_) => return,
                    }
                }
            })
            .map_err(ActivateError::Thread)?;
        Ok(Self {
            kill,
            thread: Some(thread),
        })
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.kill.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
