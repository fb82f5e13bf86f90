//! virtio-rng / entropy device (virtio 1.2, 5.4): fills the driver's buffers from the host's
//! getrandom(2).

use super::worker::{QueueHandler, Worker};
use super::{features, ActivateContext, ActivateError, GuestMemoryMmap, VirtioDevice};
use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestMemoryBackend};

/// What the entropy device thread calls: getrandom(2).
pub const SECCOMP: utils::seccomp::Allow = utils::seccomp::Allow {
    by: "virtio-rng",
    syscalls: &[libc::SYS_getrandom],
    with_arg: &[],
};

/// Request queue size.
pub const QUEUE_SIZE: u16 = 256;
/// Most bytes served per request: a guest asking for more gets this many (the driver loops).
pub const MAX_REQUEST_BYTES: u32 = 64 << 10;

/// The entropy device.
pub struct Rng {
    worker: Option<Worker>,
    metrics: std::sync::Arc<crate::metrics::DeviceMetrics>,
}

impl Default for Rng {
    fn default() -> Self {
        Self::new()
    }
}

impl Rng {
    /// A new entropy device.
    pub fn new() -> Self {
        Self {
            worker: None,
            metrics: crate::metrics::register("entropy".into()),
        }
    }
}

struct Handler {
    buf: Vec<u8>,
    metrics: std::sync::Arc<crate::metrics::DeviceMetrics>,
}

impl QueueHandler for Handler {
    fn handle(
        &mut self,
        _queue: usize,
        chain: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
    ) -> Option<u32> {
        let mut written: u32 = 0;
        for desc in chain.writable() {
            let len = desc.len().min(MAX_REQUEST_BYTES - written);
            if len == 0 {
                break;
            }
            if !mem.check_range(desc.addr(), len as usize) {
                utils::warn_limited!(
                    "virtio_rng_bad_buffer",
                    "virtio-rng: buffer outside guest memory"
                );
                break;
            }
            let buf = &mut self.buf[..len as usize];
            if let Err(e) = getrandom::fill(buf) {
                tracing::error!("virtio-rng: getrandom failed: {e}");
                break;
            }
            if mem.write_slice(buf, desc.addr()).is_err() {
                break;
            }
            written += len;
        }
        crate::metrics::add(&self.metrics.requests, 1);
        crate::metrics::add(&self.metrics.read_bytes, u64::from(written));
        Some(written)
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        features::COMMON
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let handler = Handler {
            buf: vec![0; MAX_REQUEST_BYTES as usize],
            metrics: self.metrics.clone(),
        };
        self.worker = Some(Worker::spawn("virtio-rng", handler, ctx)?);
        Ok(())
    }

    fn worker(&self) -> Option<&Worker> {
        self.worker.as_ref()
    }

    fn reset(&mut self) {
        self.worker = None;
    }
}
