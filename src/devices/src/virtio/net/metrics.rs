//! Counters of one interface, in the metrics file under `net_<id>`.

use crate::metrics::Counters;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct NetMetrics {
    /// Frame bytes (without the header) delivered to the guest.
    pub rx_bytes: AtomicU64,
    /// Frames delivered to the guest.
    pub rx_frames: AtomicU64,
    /// Frames dropped: larger than anything the guest posts.
    pub rx_drops: AtomicU64,
    /// Malformed receive chains and TAP read errors.
    pub rx_errors: AtomicU64,
    /// Frame bytes (without the header) sent to the TAP.
    pub tx_bytes: AtomicU64,
    /// Frames sent to the TAP.
    pub tx_frames: AtomicU64,
    /// Frames dropped: shorter than the header or longer than the largest frame.
    pub tx_drops: AtomicU64,
    /// Malformed transmit chains and frames the TAP refused.
    pub tx_errors: AtomicU64,
    /// Writes the TAP could not take at once (retried when it can).
    pub tap_would_block: AtomicU64,
    /// Guest frames MMDS answered (they never reach the TAP).
    pub mmds_frames: AtomicU64,
    /// Frames the transmit rate limiter made wait.
    pub tx_throttled: AtomicU64,
    /// Times the receive rate limiter stopped reception until its timer.
    pub rx_throttled: AtomicU64,
}

impl Counters for NetMetrics {
    fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            ("rx_bytes", l(&self.rx_bytes)),
            ("rx_frames", l(&self.rx_frames)),
            ("rx_drops", l(&self.rx_drops)),
            ("rx_errors", l(&self.rx_errors)),
            ("tx_bytes", l(&self.tx_bytes)),
            ("tx_frames", l(&self.tx_frames)),
            ("tx_drops", l(&self.tx_drops)),
            ("tx_errors", l(&self.tx_errors)),
            ("tap_would_block", l(&self.tap_would_block)),
            ("mmds_frames", l(&self.mmds_frames)),
            ("tx_rate_limiter_throttled", l(&self.tx_throttled)),
            ("rx_rate_limiter_throttled", l(&self.rx_throttled)),
        ]
    }
}
