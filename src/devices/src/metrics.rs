//! Counters devices keep for the metrics file: a registry of per-device counter sets, read by
//! whoever writes metrics. Counting is a relaxed atomic add on the device's own thread.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Counters of one device.
#[derive(Debug, Default)]
pub struct DeviceMetrics {
    /// Requests served.
    pub requests: AtomicU64,
    /// Requests that failed (bad chains, I/O errors, refused writes).
    pub errors: AtomicU64,
    /// Bytes read from the backend into the guest.
    pub read_bytes: AtomicU64,
    /// Bytes written from the guest to the backend.
    pub write_bytes: AtomicU64,
    /// Flush requests.
    pub flushes: AtomicU64,
    /// Requests the rate limiter made wait.
    pub throttled: AtomicU64,
    /// Bytes a rate limiter dropped (the serial console's output).
    pub dropped: AtomicU64,
}

/// Adds `n` to `counter`.
pub fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// A device's counters as the metrics file shows them.
pub trait Counters: Send + Sync {
    /// Name and value of every counter.
    fn snapshot(&self) -> Vec<(&'static str, u64)>;
}

impl Counters for DeviceMetrics {
    fn snapshot(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("requests", self.requests.load(Ordering::Relaxed)),
            ("errors", self.errors.load(Ordering::Relaxed)),
            ("read_bytes", self.read_bytes.load(Ordering::Relaxed)),
            ("write_bytes", self.write_bytes.load(Ordering::Relaxed)),
            ("flushes", self.flushes.load(Ordering::Relaxed)),
            (
                "rate_limiter_throttled",
                self.throttled.load(Ordering::Relaxed),
            ),
            (
                "rate_limiter_dropped_bytes",
                self.dropped.load(Ordering::Relaxed),
            ),
        ]
    }
}

type Registered = (String, Arc<dyn Counters>);

static REGISTRY: Mutex<Vec<Registered>> = Mutex::new(Vec::new());

/// Creates and registers the counters of device `name` (for example `block_rootfs`).
pub fn register(name: String) -> Arc<DeviceMetrics> {
    register_counters(name)
}

/// Creates and registers a device's own kind of counters.
pub fn register_counters<T: Counters + Default + 'static>(name: String) -> Arc<T> {
    let m = Arc::new(T::default());
    crate::bus::lock(&REGISTRY).push((name, m.clone()));
    m
}

/// Every registered device's counters, by device.
pub fn all() -> Vec<(String, Vec<(&'static str, u64)>)> {
    crate::bus::lock(&REGISTRY)
        .iter()
        .map(|(name, c)| (name.clone(), c.snapshot()))
        .collect()
}
