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

mod event_handler;
mod metrics;
pub mod mmds;
pub mod persist;
mod rxtx;
pub mod tap;
#[cfg(test)]
mod tests;

use super::worker::Worker;
use super::{features, ActivateContext, ActivateError, VirtioDevice};
use crate::rate_limiter::{RateLimiter, RateLimiterConfig};
use event_handler::NetThread;
pub use metrics::NetMetrics;
pub use rxtx::{NetIo, NetLimiters, Rx};
use std::sync::Arc;
use tap::{Tap, VNET_HDR_LEN};
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::*;

/// What a network device thread calls on its TAP: vectored frame reads and writes; and its
/// rate limiters' timers.
pub const SECCOMP: utils::seccomp::Allow = utils::seccomp::Allow {
    by: "virtio-net",
    syscalls: &[libc::SYS_readv, libc::SYS_writev, libc::SYS_timerfd_settime],
    with_arg: &[],
};

/// What activating a network device calls (on the VMM thread): the TAP's offloads.
pub const ACTIVATE_SECCOMP: utils::seccomp::Allow = utils::seccomp::Allow {
    by: "virtio-net activation",
    syscalls: &[],
    with_arg: &[utils::seccomp::libc_ioctl(libc::TUNSETOFFLOAD)],
};

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
const MAX_IOVECS: usize = crate::virtio::buffers::UIO_MAXIOV - 1;

fn bit(b: u32) -> u64 {
    1 << b
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
    limiters: Option<NetLimiters>,
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
            limiters: None,
        }
    }

    /// Limits frames each way with `rx` (TAP to guest) and `tx` (guest to TAP). An interface
    /// made with limiters (even ones that limit nothing) can have them changed while it runs.
    pub fn with_rate_limiters(
        mut self,
        rx: &RateLimiterConfig,
        tx: &RateLimiterConfig,
    ) -> std::io::Result<Self> {
        self.limiters = Some(NetLimiters {
            rx: Arc::new(std::sync::Mutex::new(RateLimiter::new(rx)?)),
            tx: Arc::new(std::sync::Mutex::new(RateLimiter::new(tx)?)),
        });
        Ok(self)
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
        let filter = ctx.thread_filter.clone();
        let offloads = Self::tap_offloads(ctx.acked_features);
        if let Err(e) = self.tap.set_offload(offloads) {
            tracing::warn!(
                "virtio-net {}: TAP {} refused offloads {offloads:#x}: {e}",
                self.config.id,
                self.tap.name()
            );
        }
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
        if let Some(l) = &self.limiters {
            io.set_limiters(l.clone());
        }
        // Without receive offloads the host sends at most an MTU-sized Ethernet frame (with a
        // VLAN tag); with them, up to 64 KiB.
        if offloads & !libc::TUN_F_CSUM == 0 {
            let mtu = usize::from(self.config.mtu.unwrap_or(1500)).max(1500);
            io.set_rx_frame_max(VNET_HDR_LEN + 18 + mtu);
        }
        if let Some((store, ip)) = &self.mmds {
            io.set_mmds(mmds::MmdsStack::new(*ip, store.clone()));
        }
        let thread = NetThread::new(io, rx_evt, tx_evt, ctx.interrupt);
        self.worker = Some(Worker::run("virtio-net", thread, filter)?);
        Ok(())
    }

    fn save(&self) -> serde_json::Value {
        serde_json::to_value(self.state()).unwrap_or_default()
    }

    fn restore(&mut self, state: &serde_json::Value) -> Result<(), String> {
        let state: persist::NetState = serde_json::from_value(state.clone())
            .map_err(|e| format!("net: bad snapshot state: {e}"))?;
        self.check_state(&state)
    }

    fn update_rx_tx_rate_limiters(
        &mut self,
        rx: Option<&RateLimiterConfig>,
        tx: Option<&RateLimiterConfig>,
    ) -> Result<(), String> {
        let Some(l) = &self.limiters else {
            return Err(format!(
                "network interface '{}' has no rate limiters",
                self.config.id
            ));
        };
        for (limiter, config) in [(&l.rx, rx), (&l.tx, tx)] {
            if let Some(c) = config {
                crate::bus::lock(limiter).update(c).map_err(|e| {
                    format!(
                        "network interface '{}': cannot change its rate limiter: {e}",
                        self.config.id
                    )
                })?;
            }
        }
        Ok(())
    }

    fn worker(&self) -> Option<&Worker> {
        self.worker.as_ref()
    }

    fn reset(&mut self) {
        self.worker = None;
    }
}
