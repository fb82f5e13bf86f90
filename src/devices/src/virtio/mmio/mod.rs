//! The virtio-mmio transport, version 2 (virtio 1.2, 4.2.2): the register window a driver uses
//! to negotiate features, configure queues and drive the status state machine.
//!
//! Every access from the guest is untrusted: wrong widths, undefined offsets, out-of-order
//! status changes and bad queue setups are ignored or end in DEVICE_NEEDS_RESET, and logged.

pub mod persist;
#[cfg(test)]
mod tests;

use super::{features, status, ActivateContext, GuestMemoryMmap, Interrupt, VirtioDevice};
use crate::bus::BusDevice;
use std::sync::Arc;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

/// Size of one device's MMIO window.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
/// Offset of the queue notification register (where ioeventfds are registered).
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x050;

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
/// vireo's vendor ID: "VREO" read as little-endian bytes.
const VENDOR_ID: u32 = u32::from_le_bytes(*b"VREO");
const CONFIG_SPACE_OFFSET: u64 = 0x100;

// Register offsets.
const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const REG_SHM_SEL: u64 = 0x0ac;
const REG_SHM_LEN_LOW: u64 = 0x0b0;
const REG_SHM_LEN_HIGH: u64 = 0x0b4;
const REG_SHM_BASE_LOW: u64 = 0x0b8;
const REG_SHM_BASE_HIGH: u64 = 0x0bc;
const REG_QUEUE_RESET: u64 = 0x0c0;
const REG_CONFIG_GENERATION: u64 = 0x0fc;

/// The driver's view of one queue, as written through the registers.
#[derive(Clone, Copy, Debug, Default)]
struct QueueConfig {
    max_size: u16,
    size: u16,
    ready: bool,
    desc: u64,
    avail: u64,
    used: u64,
}

fn set_low(v: &mut u64, low: u32) {
    *v = (*v & !0xffff_ffff) | u64::from(low);
}

fn set_high(v: &mut u64, high: u32) {
    *v = (*v & 0xffff_ffff) | (u64::from(high) << 32);
}

/// One virtio device behind its MMIO register window.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queue_evts: Vec<EventFd>,
    queues: Vec<QueueConfig>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    shm_sel: u32,
    config_generation: u32,
    active: bool,
    /// Set while the device is paused: where its queues stood when it stopped.
    paused: Option<Vec<virtio_queue::QueueState>>,
    /// With it, DRIVER_OK only marks the device for activation and signals this eventfd: the
    /// VMM thread activates it, so device threads are never started by a vCPU thread (whose
    /// seccomp filter a new thread would inherit).
    deferred: Option<Arc<EventFd>>,
    activation_pending: bool,
    /// The filter the device's thread installs.
    thread_filter: utils::seccomp::ThreadFilter,
}

impl MmioTransport {
    /// Wraps `device`. `queue_evts` has one eventfd per queue (registered by the VMM as
    /// ioeventfds on [`QUEUE_NOTIFY_OFFSET`] with the queue index as data); `interrupt` raises
    /// the device's interrupt line.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        queue_evts: Vec<EventFd>,
    ) -> Self {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max_size| QueueConfig {
                max_size,
                size: max_size,
                ..Default::default()
            })
            .collect();
        Self {
            device,
            mem,
            interrupt,
            queue_evts,
            queues,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            shm_sel: 0,
            config_generation: 0,
            active: false,
            paused: None,
            deferred: None,
            activation_pending: false,
            thread_filter: utils::seccomp::ThreadFilter::none("device"),
        }
    }

    /// Activation on DRIVER_OK is left to whoever watches `evt` and then calls
    /// [`MmioTransport::activate_pending`].
    pub fn defer_activation(&mut self, evt: Arc<EventFd>) {
        self.deferred = Some(evt);
    }

    /// The seccomp filter the device's thread installs when it starts.
    pub fn set_thread_filter(&mut self, filter: utils::seccomp::ThreadFilter) {
        self.thread_filter = filter;
    }

    /// Activates the device if the driver set DRIVER_OK since the last call (and has not reset
    /// it since).
    pub fn activate_pending(&mut self) {
        if std::mem::take(&mut self.activation_pending)
            && self.status & status::DRIVER_OK != 0
            && !self.active
        {
            self.activate();
        }
    }

    /// Switches the device to a new backing file and tells the driver its configuration
    /// changed (a new generation and a configuration interrupt).
    pub fn replace_backing(&mut self, path: &std::path::Path) -> Result<(), String> {
        self.device.replace_backing(path)?;
        self.config_changed();
        Ok(())
    }

    /// Tells the driver the device's configuration changed: a new generation, and a
    /// configuration interrupt once the driver is live.
    pub fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        if self.active {
            self.interrupt.trigger(super::INTERRUPT_CONFIG);
        }
    }

    /// Changes the device's rate limiter.
    pub fn update_rate_limiter(
        &mut self,
        config: &crate::rate_limiter::RateLimiterConfig,
    ) -> Result<(), String> {
        self.device.update_rate_limiter(config)
    }

    /// Changes the device's receive and/or transmit rate limiters.
    pub fn update_rx_tx_rate_limiters(
        &mut self,
        rx: Option<&crate::rate_limiter::RateLimiterConfig>,
        tx: Option<&crate::rate_limiter::RateLimiterConfig>,
    ) -> Result<(), String> {
        self.device.update_rx_tx_rate_limiters(rx, tx)
    }

    /// The device's status register as the driver reads it.
    pub fn status(&self) -> u32 {
        if self.interrupt.needs_reset() {
            self.status | status::DEVICE_NEEDS_RESET
        } else {
            self.status
        }
    }

    fn selected_queue(&mut self) -> Option<&mut QueueConfig> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Queue registers may only change while the queue is off and the device not yet live.
    fn queue_writable(&mut self) -> Option<&mut QueueConfig> {
        let live = self.status & status::DRIVER_OK != 0;
        match self.queues.get_mut(self.queue_sel as usize) {
            Some(q) if !q.ready && !live => Some(q),
            Some(_) => {
                utils::warn_limited!(
                    "virtio_mmio_queue_live",
                    "virtio-mmio: queue register written while the queue is live"
                );
                None
            }
            None => {
                utils::warn_limited!(
                    "virtio_mmio_absent_queue",
                    "virtio-mmio: queue register written for absent queue"
                );
                None
            }
        }
    }

    fn reset(&mut self) {
        self.activation_pending = false;
        if self.active {
            self.device.reset();
            self.active = false;
        }
        for q in &mut self.queues {
            *q = QueueConfig {
                max_size: q.max_size,
                size: q.max_size,
                ..Default::default()
            };
        }
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.status = 0;
        self.interrupt.reset();
    }

    fn build_queues(&self) -> Result<Vec<Queue>, usize> {
        let event_idx = self.driver_features & features::RING_EVENT_IDX != 0;
        let in_use = self.device.queues_in_use(self.driver_features);
        let mut out = Vec::with_capacity(in_use);
        for (i, c) in self.queues.iter().enumerate().take(in_use) {
            let mut q = Queue::new(c.max_size).map_err(|_| i)?;
            if !c.ready {
                return Err(i);
            }
            q.try_set_size(c.size).map_err(|_| i)?;
            q.try_set_desc_table_address(GuestAddress(c.desc))
                .map_err(|_| i)?;
            q.try_set_avail_ring_address(GuestAddress(c.avail))
                .map_err(|_| i)?;
            q.try_set_used_ring_address(GuestAddress(c.used))
                .map_err(|_| i)?;
            q.set_event_idx(event_idx);
            q.set_ready(true);
            if !q.is_valid(&self.mem) {
                return Err(i);
            }
            out.push(q);
        }
        Ok(out)
    }

    /// Builds the queues the driver set up and starts the device on them.
    fn activate(&mut self) {
        let queues = match self.build_queues() {
            Ok(q) => q,
            Err(i) => {
                utils::warn_limited!("virtio_mmio_bad_queue", 
                    "virtio-mmio: device type {}: queue {i} is not usable (not ready, bad size or outside guest memory); device needs reset",
                    self.device.device_type()
                );
                self.interrupt.set_needs_reset();
                return;
            }
        };
        let mut evts = Vec::with_capacity(self.queue_evts.len());
        for e in &self.queue_evts {
            match e.try_clone() {
                Ok(e) => evts.push(e),
                Err(err) => {
                    tracing::error!("virtio-mmio: cannot clone a queue eventfd: {err}");
                    self.interrupt.set_needs_reset();
                    return;
                }
            }
        }
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            queues,
            queue_evts: evts,
            interrupt: self.interrupt.clone(),
            acked_features: self.driver_features,
            restored: false,
            thread_filter: self.thread_filter.clone(),
        };
        match self.device.activate(ctx) {
            Ok(()) => self.active = true,
            Err(e) => {
                tracing::error!(
                    "virtio-mmio: device type {} failed to activate: {e}",
                    self.device.device_type()
                );
                self.interrupt.set_needs_reset();
            }
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        // Bits are only ever added (until a reset); anything else is a driver bug.
        if v & self.status != self.status {
            utils::warn_limited!(
                "virtio_mmio_bad_status",
                "virtio-mmio: status {v:#x} drops bits of {:#x}; ignored",
                self.status
            );
            return;
        }
        let added = v & !self.status;
        let mut new = v;
        if added & status::FEATURES_OK != 0 {
            let offered = self.device.features();
            let ok = self.driver_features & !offered == 0
                && self.driver_features & features::VERSION_1 != 0
                && self.status & status::DRIVER != 0;
            if !ok {
                utils::warn_limited!("virtio_mmio_bad_features", 
                    "virtio-mmio: driver features {:#x} refused (offered {offered:#x}, VERSION_1 required)",
                    self.driver_features
                );
                new &= !status::FEATURES_OK;
            }
        }
        if added & status::DRIVER_OK != 0 && new & status::FEATURES_OK == 0 {
            utils::warn_limited!(
                "virtio_mmio_bad_status",
                "virtio-mmio: DRIVER_OK without FEATURES_OK; ignored"
            );
            new &= !status::DRIVER_OK;
        }
        self.status = new;
        if added & status::DRIVER_OK != 0 && new & status::DRIVER_OK != 0 && !self.active {
            match &self.deferred {
                Some(evt) => {
                    self.activation_pending = true;
                    let _ = evt.write(1);
                }
                None => self.activate(),
            }
        }
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            REG_MAGIC => MAGIC_VALUE,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size)),
            REG_QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready)),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.status(),
            // No shared memory regions: length and base read as all ones (-1).
            REG_SHM_LEN_LOW | REG_SHM_LEN_HIGH | REG_SHM_BASE_LOW | REG_SHM_BASE_HIGH => u32::MAX,
            REG_QUEUE_RESET => 0,
            REG_CONFIG_GENERATION => self.config_generation,
            _ => {
                tracing::debug!(
                    "virtio-mmio: read of write-only or undefined register {offset:#x}"
                );
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, v: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            REG_DRIVER_FEATURES => {
                if self.status & status::DRIVER == 0 || self.status & status::FEATURES_OK != 0 {
                    utils::warn_limited!(
                        "virtio_mmio_bad_features",
                        "virtio-mmio: driver features written outside negotiation; ignored"
                    );
                    return;
                }
                match self.driver_features_sel {
                    0 => set_low(&mut self.driver_features, v),
                    1 => set_high(&mut self.driver_features, v),
                    sel => tracing::debug!("virtio-mmio: driver features page {sel} ignored"),
                }
            }
            REG_QUEUE_SEL => self.queue_sel = v,
            REG_QUEUE_NUM => {
                if let Some(q) = self.queue_writable() {
                    // Checked at activation: a size that is zero, too big or not a power of two
                    // makes the device refuse DRIVER_OK.
                    q.size = u16::try_from(v).unwrap_or(0);
                }
            }
            REG_QUEUE_READY => {
                let live = self.status & status::DRIVER_OK != 0;
                match self.queues.get_mut(self.queue_sel as usize) {
                    Some(q) if !live => q.ready = v == 1,
                    _ => utils::warn_limited!(
                        "virtio_mmio_bad_queue",
                        "virtio-mmio: QueueReady write ignored"
                    ),
                }
            }
            REG_QUEUE_DESC_LOW => {
                if let Some(q) = self.queue_writable() {
                    set_low(&mut q.desc, v)
                }
            }
            REG_QUEUE_DESC_HIGH => {
                if let Some(q) = self.queue_writable() {
                    set_high(&mut q.desc, v)
                }
            }
            REG_QUEUE_DRIVER_LOW => {
                if let Some(q) = self.queue_writable() {
                    set_low(&mut q.avail, v)
                }
            }
            REG_QUEUE_DRIVER_HIGH => {
                if let Some(q) = self.queue_writable() {
                    set_high(&mut q.avail, v)
                }
            }
            REG_QUEUE_DEVICE_LOW => {
                if let Some(q) = self.queue_writable() {
                    set_low(&mut q.used, v)
                }
            }
            REG_QUEUE_DEVICE_HIGH => {
                if let Some(q) = self.queue_writable() {
                    set_high(&mut q.used, v)
                }
            }
            QUEUE_NOTIFY_OFFSET => {
                // Notifications normally end in the ioeventfd; one that reaches vireo names a
                // queue that does not exist, or came before the eventfds were registered.
                match self.queue_evts.get(v as usize) {
                    Some(evt) if self.active => {
                        let _ = evt.write(1);
                    }
                    _ => tracing::debug!("virtio-mmio: notification for queue {v} ignored"),
                }
            }
            REG_INTERRUPT_ACK => self.interrupt.ack(v),
            REG_STATUS => self.write_status(v),
            REG_SHM_SEL => self.shm_sel = v,
            REG_QUEUE_RESET => tracing::debug!("virtio-mmio: queue reset not offered; ignored"),
            _ => {
                tracing::debug!("virtio-mmio: write to read-only or undefined register {offset:#x}")
            }
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            self.device.read_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            utils::warn_limited!(
                "virtio_mmio_bad_access",
                "virtio-mmio: {}-byte read at {offset:#x}: registers are 32-bit",
                data.len()
            );
            data.fill(0xff);
            return;
        }
        data.copy_from_slice(&self.read_register(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            self.device.write_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            utils::warn_limited!(
                "virtio_mmio_bad_access",
                "virtio-mmio: {}-byte write at {offset:#x}: registers are 32-bit",
                data.len()
            );
            return;
        };
        if !offset.is_multiple_of(4) {
            utils::warn_limited!(
                "virtio_mmio_bad_access",
                "virtio-mmio: unaligned write at {offset:#x}"
            );
            return;
        }
        self.write_register(offset, u32::from_le_bytes(bytes));
    }
}
