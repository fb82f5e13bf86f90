//! The thread an active virtio device runs on: an event loop (event-manager) over the device's
//! queue eventfds, draining each notified queue and raising the interrupt when the driver wants
//! one (EVENT_IDX aware).

use super::{ActivateContext, ActivateError, GuestMemoryMmap, Interrupt, INTERRUPT_USED_RING};
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use std::os::fd::AsRawFd;
use std::sync::mpsc::{channel, Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueState, QueueT};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

/// What every device thread's event loop calls: waiting on its eventfds and sockets, reading
/// and writing eventfds, and changing what it watches.
pub const SECCOMP: utils::seccomp::Allow = utils::seccomp::Allow {
    by: "device threads' event loops",
    syscalls: &[
        libc::SYS_epoll_wait,
        libc::SYS_epoll_pwait,
        libc::SYS_epoll_ctl,
        libc::SYS_read,
    ],
    with_arg: &[],
};

/// What starting a device thread asks of the VMM thread (the event loop, eventfd copies).
pub const SPAWN_SECCOMP: utils::seccomp::Allow = utils::seccomp::Allow {
    by: "starting device threads",
    syscalls: &[
        libc::SYS_epoll_create1,
        libc::SYS_eventfd2,
        libc::SYS_fcntl,
        libc::SYS_dup,
    ],
    with_arg: &[],
};

/// What became of a descriptor chain a handler was given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Served {
    /// Done: this many bytes were written into its device-writable buffers (the used-ring
    /// length).
    Used(u32),
    /// The device's rate limiter holds it back: the chain goes back to the ring, and the queue
    /// waits for the limiter's timer.
    Throttled,
    /// Started; [`QueueHandler::complete`] reports it when it ends.
    InFlight,
}

/// A chain a handler finished after [`Served::InFlight`]: queue, head index, used length.
pub type Completed = (usize, u16, u32);

/// A device's per-request logic.
pub trait QueueHandler: Send + 'static {
    /// Serves one descriptor chain from queue `queue`.
    fn handle(
        &mut self,
        queue: usize,
        chain: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
    ) -> Served;

    /// Starts what [`QueueHandler::handle`] queued: called once a notified queue is drained,
    /// so one system call can start a batch.
    fn submit(&mut self) {}

    /// An eventfd that becomes readable when requests left in flight end; watched with the
    /// queues.
    fn completions(&self) -> Option<std::os::fd::RawFd> {
        None
    }

    /// Appends the in-flight requests that have ended to `done`; with `wait`, first waits for
    /// all of them (before a pause: a snapshot holds no half-served request).
    fn complete(&mut self, mem: &GuestMemoryMmap, wait: bool, done: &mut Vec<Completed>) {
        let _ = (mem, wait, done);
    }

    /// The timerfd of the handler's rate limiter, watched with its queues.
    fn limiter_timer(&self) -> Option<std::os::fd::RawFd> {
        None
    }

    /// The limiter's timer fired; the queues are served again after this.
    fn on_limiter_timer(&mut self) {}
}

/// Event data of the rate limiter's timer (queue events carry their index).
const LIMITER_TIMER: u32 = u32::MAX;
/// Event data of the handler's completion eventfd.
const COMPLETIONS: u32 = u32::MAX - 1;

struct Subscriber<H> {
    handler: H,
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    broken: Vec<bool>,
    evts: Vec<EventFd>,
    interrupt: Arc<Interrupt>,
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
                match self.handler.handle(index, chain, &self.mem) {
                    Served::Used(len) => {
                        queue.add_used(&self.mem, head, len)?;
                        used = true;
                    }
                    Served::InFlight => {}
                    Served::Throttled => {
                        // The chain is taken again when the limiter's timer fires, and guest
                        // notifications stay off until then.
                        queue.go_to_previous_position();
                        return Ok(used);
                    }
                }
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
        let result = self.drain(index);
        self.handler.submit();
        let result =
            result.and_then(|used| Ok(used && self.queues[index].needs_notification(&self.mem)?));
        self.settle(index, result);
    }

    /// Raises the interrupt if `result` says the driver wants one, or marks the queue broken.
    fn settle(&mut self, index: usize, result: Result<bool, virtio_queue::Error>) {
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

    /// Puts the requests that ended in flight on their used rings, with one interrupt per queue
    /// for the whole batch.
    fn finish(&mut self, wait: bool) {
        let mut done = Vec::new();
        self.handler.complete(&self.mem, wait, &mut done);
        let mut touched = vec![false; self.queues.len()];
        for (index, head, len) in done {
            if self.broken.get(index) != Some(&false) {
                continue;
            }
            if let Err(e) = self.queues[index].add_used(&self.mem, head, len) {
                self.settle(index, Err(e));
                continue;
            }
            touched[index] = true;
        }
        for (index, touched) in touched.into_iter().enumerate() {
            if touched {
                let result = self.queues[index].needs_notification(&self.mem);
                self.settle(index, result);
            }
        }
    }
}

impl<H: QueueHandler> MutEventSubscriber for Subscriber<H> {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.data() == LIMITER_TIMER {
            self.handler.on_limiter_timer();
            for i in 0..self.queues.len() {
                self.serve(i);
            }
            return;
        }
        if events.data() == COMPLETIONS {
            self.finish(false);
            return;
        }
        let i = events.data() as usize;
        if let Some(evt) = self.evts.get(i) {
            let _ = evt.read();
            self.serve(i);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        for (i, evt) in self.evts.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(evt, i as u32, EventSet::IN)) {
                tracing::error!("virtio: cannot watch queue {i}: {e:?}");
            }
        }
        if let Some(fd) = self.handler.limiter_timer() {
            if let Err(e) = ops.add(Events::with_data_raw(fd, LIMITER_TIMER, EventSet::IN)) {
                tracing::error!("virtio: cannot watch the rate limiter's timer: {e:?}");
            }
        }
        if let Some(fd) = self.handler.completions() {
            if let Err(e) = ops.add(Events::with_data_raw(fd, COMPLETIONS, EventSet::IN)) {
                tracing::error!("virtio: cannot watch the device's completions: {e:?}");
            }
        }
    }
}

/// A device thread's event handling: an event-manager subscriber whose queue positions can be
/// read while the thread is paused.
pub trait DeviceThread: MutEventSubscriber + Send + 'static {
    /// Where each queue stands. Chains taken from a ring but not yet used count as not taken, so
    /// that a device restored from these positions takes them again.
    fn queue_states(&self) -> Vec<QueueState>;

    /// Ends every request still in flight, before the thread parks.
    fn quiesce(&mut self) {}
}

impl<H: QueueHandler> DeviceThread for Subscriber<H> {
    fn queue_states(&self) -> Vec<QueueState> {
        self.queues.iter().map(Queue::state).collect()
    }

    fn quiesce(&mut self) {
        self.finish(true);
    }
}

enum Command {
    Stop,
    Pause,
    Resume,
}

/// Wraps a device's subscriber with the worker's control channel: the thread stops, or parks
/// between two events (so no request is half served) until it is resumed.
struct Controlled<S> {
    inner: S,
    control: EventFd,
    commands: Receiver<Command>,
    replies: Sender<Vec<QueueState>>,
    stop: bool,
}

impl<S: DeviceThread> Controlled<S> {
    fn obey(&mut self) {
        loop {
            match self.commands.try_recv() {
                Ok(Command::Stop) | Err(TryRecvError::Disconnected) => {
                    self.stop = true;
                    return;
                }
                Ok(Command::Pause) => {
                    self.inner.quiesce();
                    let _ = self.replies.send(self.inner.queue_states());
                    loop {
                        match self.commands.recv() {
                            Ok(Command::Resume) => break,
                            Ok(Command::Pause) => {
                                let _ = self.replies.send(self.inner.queue_states());
                            }
                            Ok(Command::Stop) | Err(_) => {
                                self.stop = true;
                                return;
                            }
                        }
                    }
                }
                Ok(Command::Resume) => {}
                Err(TryRecvError::Empty) => return,
            }
        }
    }
}

impl<S: DeviceThread> MutEventSubscriber for Controlled<S> {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.control.as_raw_fd() {
            let _ = self.control.read();
            self.obey();
        } else {
            self.inner.process(events, ops);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.control, EventSet::IN)) {
            tracing::error!("virtio: cannot watch the device thread's control event: {e:?}");
        }
        self.inner.init(ops);
    }
}

/// How long [`Worker::pause`] waits for the thread to finish the event it is serving.
const PAUSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// A running device thread. Dropping it stops the thread.
pub struct Worker {
    control: EventFd,
    commands: Sender<Command>,
    replies: Receiver<Vec<QueueState>>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Starts `handler` on a thread named `name`, serving the queues in `ctx`.
    pub fn spawn<H: QueueHandler>(
        name: &str,
        handler: H,
        ctx: ActivateContext,
    ) -> Result<Self, ActivateError> {
        let subscriber = Subscriber {
            handler,
            mem: ctx.mem,
            broken: vec![false; ctx.queues.len()],
            queues: ctx.queues,
            evts: ctx.queue_evts,
            interrupt: ctx.interrupt,
        };
        Self::run(name, subscriber, ctx.thread_filter)
    }

    /// Runs `subscriber` on a thread named `name` confined by `filter`; for devices with more
    /// to watch than their queues.
    pub fn run<S: DeviceThread>(
        name: &str,
        subscriber: S,
        filter: utils::seccomp::ThreadFilter,
    ) -> Result<Self, ActivateError> {
        let control = EventFd::new(libc::EFD_NONBLOCK).map_err(ActivateError::Thread)?;
        let (commands, commands_rx) = channel();
        let (replies_tx, replies) = channel();
        let mut manager: EventManager<Controlled<S>> =
            EventManager::new().map_err(|e| ActivateError::EventLoop(format!("{e:?}")))?;
        let id = manager.add_subscriber(Controlled {
            inner: subscriber,
            control: control.try_clone().map_err(ActivateError::Thread)?,
            commands: commands_rx,
            replies: replies_tx,
            stop: false,
        });
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .stack_size(256 << 10)
            .spawn(move || {
                filter.install();
                // Chains made available before activation were announced on eventfds nobody
                // watched yet; their counters are still set, so the first wait returns at once.
                loop {
                    if let Err(e) = manager.run() {
                        tracing::error!("virtio: device event loop failed: {e:?}");
                        return;
                    }
                    match manager.subscriber_mut(id) {
                        Ok(s) if s.stop => return,
                        Ok(_) => {}
                        Err(_) => return,
                    }
                }
            })
            .map_err(ActivateError::Thread)?;
        Ok(Self {
            control,
            commands,
            replies,
            thread: Some(thread),
        })
    }

    /// Parks the thread once it has finished the event it is serving, and returns where its
    /// queues stand. Notifications that arrive meanwhile wait for [`Worker::resume`].
    pub fn pause(&self) -> Result<Vec<QueueState>, String> {
        // A reply left over from an earlier pause that timed out is stale.
        while self.replies.try_recv().is_ok() {}
        self.commands
            .send(Command::Pause)
            .map_err(|_| "the device thread has ended".to_string())?;
        let _ = self.control.write(1);
        self.replies
            .recv_timeout(PAUSE_TIMEOUT)
            .map_err(|_| format!("the device thread did not pause within {PAUSE_TIMEOUT:?}"))
    }

    /// Lets a paused thread run again.
    pub fn resume(&self) {
        let _ = self.commands.send(Command::Resume);
        let _ = self.control.write(1);
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Stop);
        let _ = self.control.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
