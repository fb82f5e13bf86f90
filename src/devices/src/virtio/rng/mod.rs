//! virtio-rng / entropy device (virtio 1.2, 5.4): fills the driver's buffers from the host's
//! getrandom(2).

use super::worker::{QueueHandler, Served, Worker};
use super::{features, ActivateContext, ActivateError, GuestMemoryMmap, VirtioDevice};
use crate::rate_limiter::{RateLimiter, RateLimiterConfig};
use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestMemoryBackend};

/// What the entropy device thread calls: getrandom(2), and its rate limiter's timer.
pub const SECCOMP: utils::seccomp::Allow = utils::seccomp::Allow {
    by: "virtio-rng",
    syscalls: &[libc::SYS_getrandom, libc::SYS_timerfd_settime],
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
    limiter: Option<std::sync::Arc<std::sync::Mutex<RateLimiter>>>,
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
            limiter: None,
        }
    }

    /// A new entropy device whose bytes and requests `config` limits.
    pub fn with_rate_limiter(config: &RateLimiterConfig) -> std::io::Result<Self> {
        let mut rng = Self::new();
        if config.limits() {
            rng.limiter = Some(std::sync::Arc::new(std::sync::Mutex::new(
                RateLimiter::new(config)?,
            )));
        }
        Ok(rng)
    }
}

struct Handler {
    buf: Vec<u8>,
    metrics: std::sync::Arc<crate::metrics::DeviceMetrics>,
    limiter: Option<std::sync::Arc<std::sync::Mutex<RateLimiter>>>,
}

impl QueueHandler for Handler {
    fn handle(
        &mut self,
        _queue: usize,
        chain: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
    ) -> Served {
        if let Some(limiter) = &self.limiter {
            let asked = chain
                .clone()
                .writable()
                .fold(0u64, |n, d| n + u64::from(d.len()))
                .min(u64::from(MAX_REQUEST_BYTES));
            if !crate::bus::lock(limiter).consume(asked) {
                crate::metrics::add(&self.metrics.throttled, 1);
                return Served::Throttled;
            }
        }
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
        Served::Used(written)
    }

    fn limiter_timer(&self) -> Option<std::os::fd::RawFd> {
        let limiter = self.limiter.as_ref()?;
        Some(std::os::fd::AsRawFd::as_raw_fd(
            crate::bus::lock(limiter).timer(),
        ))
    }

    fn on_limiter_timer(&mut self) {
        if let Some(limiter) = &self.limiter {
            crate::bus::lock(limiter).on_timer();
        }
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
            limiter: self.limiter.clone(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rate_limiter::TokenBucketConfig;
    use crate::virtio::test_utils::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn a_throttled_request_waits_for_the_limiter_timer_then_is_served() {
        // One request per second.
        let rng = Rng::with_rate_limiter(&RateLimiterConfig {
            bandwidth: None,
            ops: Some(TokenBucketConfig {
                size: 1,
                one_time_burst: None,
                refill_time: 1000,
            }),
        })
        .unwrap();
        let metrics = rng.metrics.clone();
        let mut d = Driver::new(Box::new(rng));
        d.activate();
        d.submit(&[(DATA, 16, F_WRITE)]);
        assert_eq!(d.wait_used(), Some((0, 16)));
        // The second finds the bucket empty: it waits in the ring until the timer fires, and
        // is then served by the device thread without another notification.
        d.submit(&[(DATA + 64, 16, F_WRITE)]);
        assert_eq!(d.wait_used(), Some((1, 16)));
        assert_eq!(metrics.throttled.load(Ordering::Relaxed), 1);
    }
}
