//! virtio-vsock (device ID 19): stream sockets between the guest and host programs, through
//! Unix sockets on the host as in Firecracker's hybrid design (see `muxer`).
//!
//! Three queues: receive (host to guest), transmit (guest to host) and events. The device
//! thread watches the queues, the listening Unix socket and every connection's stream.

mod event_handler;
mod muxer;
pub mod packet;
pub mod persist;
#[cfg(test)]
mod tests;

use super::worker::Worker;
use super::{features, ActivateContext, ActivateError, VirtioDevice};
use crate::metrics::Counters;
use event_handler::VsockThread;
pub use muxer::{Muxer, CONN_BUF, MAX_CONNS};
use std::os::unix::net::UnixListener;

/// What the vsock device thread calls: accepting host clients, connecting to the host's
/// listeners (Unix sockets only) and moving stream data.
pub const SECCOMP: utils::seccomp::Allow = utils::seccomp::Allow {
    by: "virtio-vsock",
    syscalls: &[
        libc::SYS_accept4,
        libc::SYS_connect,
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        libc::SYS_readv,
        libc::SYS_writev,
        libc::SYS_shutdown,
        libc::SYS_getsockopt,
    ],
    with_arg: &[
        utils::seccomp::ArgRule {
            syscall: libc::SYS_socket,
            arg: 0,
            value: libc::AF_UNIX as u64,
        },
        utils::seccomp::libc_ioctl(libc::FIONBIO),
    ],
};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

const QUEUE_SIZE: u16 = 256;
/// The device ID of virtio-vsock.
pub const VIRTIO_ID_VSOCK: u32 = 19;

/// Counters of the vsock device, in the metrics file under `vsock`.
#[derive(Debug, Default)]
pub struct VsockMetrics {
    /// Connections set up (either side).
    pub conns_opened: AtomicU64,
    /// Connections ended.
    pub conns_closed: AtomicU64,
    /// Resets sent to the guest.
    pub resets: AtomicU64,
    /// Bytes from the host to the guest.
    pub rx_bytes: AtomicU64,
    /// Bytes from the guest to the host.
    pub tx_bytes: AtomicU64,
    /// Packets and host clients dropped (bad CIDs, types, operations, lines, credit).
    pub dropped: AtomicU64,
}

impl Counters for VsockMetrics {
    fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            ("conns_opened", l(&self.conns_opened)),
            ("conns_closed", l(&self.conns_closed)),
            ("resets", l(&self.resets)),
            ("rx_bytes", l(&self.rx_bytes)),
            ("tx_bytes", l(&self.tx_bytes)),
            ("dropped", l(&self.dropped)),
        ]
    }
}

/// A virtio-vsock device.
pub struct Vsock {
    cid: u64,
    path: PathBuf,
    listener: UnixListener,
    config_space: [u8; 8],
    worker: Option<Worker>,
    metrics: Arc<VsockMetrics>,
}

impl Vsock {
    /// A device for guest CID `cid` whose host side listens on `listener` (bound at `path`).
    pub fn new(cid: u64, path: PathBuf, listener: UnixListener) -> Self {
        Self {
            cid,
            path,
            listener,
            config_space: cid.to_le_bytes(),
            worker: None,
            metrics: crate::metrics::register_counters("vsock".into()),
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        features::COMMON
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_image(&self.config_space, offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let listener = self.listener.try_clone().map_err(ActivateError::Thread)?;
        let muxer = Muxer::new(self.cid, self.path.clone(), listener, self.metrics.clone());
        let filter = ctx.thread_filter.clone();
        let thread = VsockThread::new(ctx, muxer)?;
        self.worker = Some(Worker::run("virtio-vsock", thread, filter)?);
        Ok(())
    }

    fn save(&self) -> serde_json::Value {
        serde_json::to_value(self.state()).unwrap_or_default()
    }

    fn restore(&mut self, state: &serde_json::Value) -> Result<(), String> {
        let state: persist::VsockState = serde_json::from_value(state.clone())
            .map_err(|e| format!("vsock: bad snapshot state: {e}"))?;
        self.check_state(&state)
    }

    fn worker(&self) -> Option<&Worker> {
        self.worker.as_ref()
    }

    fn reset(&mut self) {
        // Every connection goes with the thread; host clients see their streams close.
        self.worker = None;
    }
}
