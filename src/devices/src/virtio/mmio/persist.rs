//! The virtio-mmio transport's snapshot state: its registers, each queue's configuration and
//! position, the interrupt status, and the device's own state.

use super::{MmioTransport, QueueConfig};
use crate::virtio::ActivateContext;
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};

/// One queue: what the driver configured and where the device stands in it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// Largest size the device offers.
    pub max_size: u16,
    /// Size the driver chose.
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// Descriptor table address.
    pub desc: u64,
    /// Available (driver) ring address.
    pub avail: u64,
    /// Used (device) ring address.
    pub used: u64,
    /// Next available-ring entry the device takes.
    pub next_avail: u16,
    /// Next used-ring entry the device fills.
    pub next_used: u16,
}

/// A virtio-mmio device as a snapshot holds it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MmioState {
    /// virtio device ID, checked on restore.
    pub device_type: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// Features the driver wrote.
    pub driver_features: u64,
    /// QueueSel.
    pub queue_sel: u32,
    /// Device status.
    pub status: u32,
    /// SHMSel.
    pub shm_sel: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// The device needed a reset.
    pub needs_reset: bool,
    /// The device was serving its queues.
    pub active: bool,
    /// Every queue.
    pub queues: Vec<QueueSnapshot>,
    /// The device's own state ([`crate::virtio::VirtioDevice::save`]).
    pub device: serde_json::Value,
}

impl MmioTransport {
    /// Parks the device's thread (if it runs) between two requests, so that its queues and the
    /// guest memory it writes hold still until [`MmioTransport::resume`].
    pub fn pause(&mut self) -> Result<(), String> {
        if self.paused.is_some() {
            return Ok(());
        }
        let states = match self.device.worker() {
            Some(w) if self.active => w.pause()?,
            _ => Vec::new(),
        };
        self.paused = Some(states);
        Ok(())
    }

    /// Lets a paused device thread run again.
    pub fn resume(&mut self) {
        if self.paused.take().is_some() {
            if let Some(w) = self.device.worker() {
                w.resume();
            }
        }
    }

    /// The state of a paused transport and its device.
    pub fn save(&self) -> Result<MmioState, String> {
        let Some(positions) = &self.paused else {
            return Err("the device is not paused".into());
        };
        let queues = self
            .queues
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let p = positions.get(i).copied().unwrap_or_default();
                QueueSnapshot {
                    max_size: c.max_size,
                    size: c.size,
                    ready: c.ready,
                    desc: c.desc,
                    avail: c.avail,
                    used: c.used,
                    next_avail: p.next_avail,
                    next_used: p.next_used,
                }
            })
            .collect();
        Ok(MmioState {
            device_type: self.device.device_type(),
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            status: self.status,
            shm_sel: self.shm_sel,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            needs_reset: self.interrupt.needs_reset(),
            active: self.active,
            queues,
            device: self.device.save(),
        })
    }

    /// Takes `state` into a transport built for the same device and never used, and starts
    /// the device where it stood if it was active. Every value is checked as if a driver had
    /// written it: a snapshot file is input like any other.
    pub fn restore(&mut self, state: &MmioState) -> Result<(), String> {
        let kind = self.device.device_type();
        if state.device_type != kind {
            return Err(format!(
                "the snapshot has a device of type {} where this VM has one of type {kind}",
                state.device_type
            ));
        }
        if state.queues.len() != self.queues.len() {
            return Err(format!(
                "device type {kind}: the snapshot has {} queues, the device {}",
                state.queues.len(),
                self.queues.len()
            ));
        }
        if state.driver_features & !self.device.features() != 0 {
            return Err(format!(
                "device type {kind}: the snapshot's driver features {:#x} include some this device does not offer ({:#x})",
                state.driver_features,
                self.device.features()
            ));
        }
        for (i, (q, c)) in state.queues.iter().zip(&self.queues).enumerate() {
            if q.max_size != c.max_size {
                return Err(format!(
                    "device type {kind}: queue {i} has maximum size {} in the snapshot, {} here",
                    q.max_size, c.max_size
                ));
            }
        }
        self.device.restore(&state.device)?;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.driver_features = state.driver_features;
        self.queue_sel = state.queue_sel;
        self.status = state.status;
        self.shm_sel = state.shm_sel;
        self.config_generation = state.config_generation;
        for (c, q) in self.queues.iter_mut().zip(&state.queues) {
            *c = QueueConfig {
                max_size: q.max_size,
                size: q.size,
                ready: q.ready,
                desc: q.desc,
                avail: q.avail,
                used: q.used,
            };
        }
        self.interrupt
            .restore(state.interrupt_status, state.needs_reset);
        if state.active {
            let event_idx = self.driver_features & crate::virtio::features::RING_EVENT_IDX != 0;
            let in_use = self.device.queues_in_use(self.driver_features);
            let mut queues = Vec::with_capacity(in_use);
            for (i, q) in state.queues.iter().enumerate().take(in_use) {
                let queue = Queue::try_from(QueueState {
                    max_size: q.max_size,
                    next_avail: q.next_avail,
                    next_used: q.next_used,
                    event_idx_enabled: event_idx,
                    size: q.size,
                    ready: q.ready,
                    desc_table: q.desc,
                    avail_ring: q.avail,
                    used_ring: q.used,
                })
                .ok()
                .filter(|queue| queue.is_valid(&self.mem))
                .ok_or_else(|| {
                    format!("device type {kind}: queue {i} in the snapshot is not usable")
                })?;
                queues.push(queue);
            }
            let mut evts = Vec::with_capacity(self.queue_evts.len());
            for e in &self.queue_evts {
                evts.push(e.try_clone().map_err(|e| e.to_string())?);
            }
            self.device
                .activate(ActivateContext {
                    mem: self.mem.clone(),
                    queues,
                    queue_evts: evts,
                    interrupt: self.interrupt.clone(),
                    acked_features: self.driver_features,
                    restored: true,
                    thread_filter: self.thread_filter.clone(),
                })
                .map_err(|e| format!("device type {kind}: cannot restart: {e}"))?;
            self.active = true;
            // Notifications the driver sent just before the snapshot were lost with the old
            // process; a spurious one is harmless.
            for e in &self.queue_evts {
                let _ = e.write(1);
            }
        }
        Ok(())
    }
}
