//! The balloon's counters, in the metrics file under `balloon`.

use crate::metrics::Counters;
use std::sync::atomic::{AtomicU64, Ordering};

/// What the balloon did and what it refused.
#[derive(Debug, Default)]
pub struct BalloonMetrics {
    /// Inflate chains served.
    pub inflate_chains: AtomicU64,
    /// Pages the guest gave up (each counted once per chain).
    pub inflated_pages: AtomicU64,
    /// Deflate chains served.
    pub deflate_chains: AtomicU64,
    /// Pages the guest took back.
    pub deflated_pages: AtomicU64,
    /// Bytes released on the host (inflation and free page reports).
    pub released_bytes: AtomicU64,
    /// Ranges the host could not release.
    pub release_failures: AtomicU64,
    /// Page numbers ignored: outside guest RAM, repeated in a chain, or beyond a chain's limit.
    pub ignored_pfns: AtomicU64,
    /// Descriptors ignored: wrong direction, unaligned, outside guest memory.
    pub bad_descriptors: AtomicU64,
    /// Statistics buffers received.
    pub stats_updates: AtomicU64,
    /// Statistics with a tag vireo does not know.
    pub unknown_stats: AtomicU64,
    /// Free page reports served.
    pub reports: AtomicU64,
    /// Bytes of free pages the guest reported.
    pub reported_bytes: AtomicU64,
    /// Bytes of free pages the guest hinted during a run.
    pub hinted_bytes: AtomicU64,
    /// Hints that arrived after their run ended (ignored).
    pub stale_hints: AtomicU64,
}

impl Counters for BalloonMetrics {
    fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            ("inflate_chains", l(&self.inflate_chains)),
            ("inflated_pages", l(&self.inflated_pages)),
            ("deflate_chains", l(&self.deflate_chains)),
            ("deflated_pages", l(&self.deflated_pages)),
            ("released_bytes", l(&self.released_bytes)),
            ("release_failures", l(&self.release_failures)),
            ("ignored_pfns", l(&self.ignored_pfns)),
            ("bad_descriptors", l(&self.bad_descriptors)),
            ("stats_updates", l(&self.stats_updates)),
            ("unknown_stats", l(&self.unknown_stats)),
            ("reports", l(&self.reports)),
            ("reported_bytes", l(&self.reported_bytes)),
            ("hinted_bytes", l(&self.hinted_bytes)),
            ("stale_hints", l(&self.stale_hints)),
        ]
    }
}
