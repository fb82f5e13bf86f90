//! virtio 1.2 devices and their MMIO transport.
//!
//! A device ([`VirtioDevice`]) knows its features, config space and queues; the transport
//! ([`mmio::MmioTransport`]) speaks the register protocol to the driver and activates the device
//! once the driver sets DRIVER_OK. An active device runs on its own thread ([`worker`]): queue
//! notifications arrive as eventfds (KVM ioeventfds, so the vCPU never leaves the kernel for
//! them) and interrupts leave as an eventfd (a KVM irqfd).

pub mod balloon;
pub mod block;
pub mod buffers;
#[doc(hidden)]
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzz;
pub mod mem;
pub mod mmio;
pub mod net;
pub mod rng;
#[cfg(test)]
mod test_utils;
pub mod vsock;
pub mod worker;

use std::sync::atomic::{AtomicU32, Ordering};
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

/// Guest memory as devices see it. Every write vireo makes through it is recorded in a dirty
/// bitmap (one bit per page), which diff snapshots combine with KVM's dirty log of the guest's
/// own writes.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;

/// Device status bits (virtio 1.2, 2.1).
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready: the device may be used.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 128;
}

/// Feature bits every vireo device offers (virtio 1.2, 6).
pub mod features {
    /// Indirect descriptors.
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
    /// used_event / avail_event notification suppression.
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    /// A modern (virtio 1.x) device; required, legacy is not offered.
    pub const VERSION_1: u64 = 1 << 32;
    /// The features every device offers on top of its own.
    pub const COMMON: u64 = RING_INDIRECT_DESC | RING_EVENT_IDX | VERSION_1;
}

/// Interrupt status bits (MMIO InterruptStatus register).
pub const INTERRUPT_USED_RING: u32 = 1;
/// The device configuration changed (or the device needs a reset).
pub const INTERRUPT_CONFIG: u32 = 2;

/// The interrupt line of one device: a status word the driver reads and acknowledges, and an
/// eventfd that raises the line (wired to KVM as an irqfd). It also carries the device's
/// "needs reset" condition, which the transport reports in the status register.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    evt: EventFd,
    needs_reset: std::sync::atomic::AtomicBool,
}

impl Interrupt {
    /// A line raised through `evt`.
    pub fn new(evt: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            evt,
            needs_reset: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Marks the device broken until the driver resets it (virtio 1.2, 2.1.2) and tells the
    /// driver through a configuration-change interrupt.
    pub fn set_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::SeqCst);
        self.trigger(INTERRUPT_CONFIG);
    }

    /// Whether [`Interrupt::set_needs_reset`] was called since the last reset.
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    /// Forgets pending status bits and the needs-reset condition (device reset).
    pub fn reset(&self) {
        self.status.store(0, Ordering::SeqCst);
        self.needs_reset.store(false, Ordering::SeqCst);
    }

    /// Sets `bits` in the status word and raises the line.
    pub fn trigger(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        if let Err(e) = self.evt.write(1) {
            tracing::error!("virtio: cannot raise interrupt: {e}");
        }
    }

    /// The status word.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Takes back the status word and needs-reset condition of a snapshot, and raises the line
    /// if anything is pending: an edge that was in flight when the snapshot was taken is not
    /// in the interrupt controller's state, and a spurious one is harmless.
    pub fn restore(&self, status: u32, needs_reset: bool) {
        self.status.store(status, Ordering::SeqCst);
        self.needs_reset.store(needs_reset, Ordering::SeqCst);
        if status != 0 {
            let _ = self.evt.write(1);
        }
    }

    /// Clears `bits` (the driver's acknowledgement).
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }
}

/// Why a device could not be activated.
#[derive(Debug, Error)]
pub enum ActivateError {
    /// A queue the device needs is not ready or does not fit in guest memory.
    #[error("queue {0} is not ready or lies outside guest memory")]
    InvalidQueue(usize),
    /// The worker thread could not be started.
    #[error("cannot start the device thread: {0}")]
    Thread(std::io::Error),
    /// Setting up the worker's event loop failed.
    #[error("cannot set up the device event loop: {0}")]
    EventLoop(String),
}

/// The device half of a virtio device.
pub trait VirtioDevice: Send {
    /// virtio device ID (2 = block, 4 = entropy).
    fn device_type(&self) -> u32;
    /// Largest size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// How many queues the driver sets up once it accepted `acked_features`: the first ones
    /// of [`VirtioDevice::queue_max_sizes`] (a device whose queues depend on features has
    /// fewer when they are declined; the rest need not be ready).
    fn queues_in_use(&self, acked_features: u64) -> usize {
        let _ = acked_features;
        self.queue_max_sizes().len()
    }
    /// Features offered (including [`features::COMMON`]).
    fn features(&self) -> u64;
    /// Reads device config space at `offset`; out-of-range bytes read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device config space; vireo's devices have no writable config fields.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        tracing::debug!(
            "virtio: ignored write of {} bytes to read-only config offset {offset:#x}",
            data.len()
        );
    }
    /// Starts serving `queues` with the negotiated `acked_features`.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;
    /// Stops serving (driver reset). The device is activated again after renegotiation.
    fn reset(&mut self);
    /// The thread serving the device's queues while it is active, for pausing it.
    fn worker(&self) -> Option<&worker::Worker>;
    /// The device's own state for a snapshot (what its configuration does not already say).
    fn save(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
    /// Checks and takes the state [`VirtioDevice::save`] returned, before the device is
    /// activated again.
    fn restore(&mut self, state: &serde_json::Value) -> Result<(), String> {
        let _ = state;
        Ok(())
    }
    /// Changes the device's rate limiter while the guest runs.
    fn update_rate_limiter(
        &mut self,
        _config: &crate::rate_limiter::RateLimiterConfig,
    ) -> Result<(), String> {
        Err(format!(
            "device type {} has no rate limiter",
            self.device_type()
        ))
    }

    /// Changes the receive and/or transmit rate limiters while the guest runs (network
    /// devices).
    fn update_rx_tx_rate_limiters(
        &mut self,
        _rx: Option<&crate::rate_limiter::RateLimiterConfig>,
        _tx: Option<&crate::rate_limiter::RateLimiterConfig>,
    ) -> Result<(), String> {
        Err(format!(
            "device type {} has no receive or transmit rate limiters",
            self.device_type()
        ))
    }

    /// Switches to a new backing file while the guest runs (block devices only).
    fn replace_backing(&mut self, path: &std::path::Path) -> Result<(), String> {
        Err(format!(
            "device type {} has no backing file to replace with {}",
            self.device_type(),
            path.display()
        ))
    }
}

/// What a device is given when the driver sets DRIVER_OK.
pub struct ActivateContext {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// Configured queues, one per [`VirtioDevice::queue_max_sizes`] entry.
    pub queues: Vec<virtio_queue::Queue>,
    /// Notification eventfd of each queue.
    pub queue_evts: Vec<EventFd>,
    /// The device's interrupt line.
    pub interrupt: std::sync::Arc<Interrupt>,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// The device is being restored from a snapshot: its queues resume where they stood, and
    /// host-side state that did not survive (vsock connections) is reported gone.
    pub restored: bool,
    /// The seccomp filter the device's thread installs before it serves a queue.
    pub thread_filter: utils::seccomp::ThreadFilter,
}

/// Reads `data.len()` bytes of a little-endian config image at `offset`, zero-filling what
/// lies beyond it.
pub fn read_config_image(image: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| image.get(o))
            .copied()
            .unwrap_or(0);
    }
}
