//! Rate-limited log lines for events that a guest or a client can trigger at will.
//!
//! A hostile guest that pokes a device register in a loop, or a client that opens sockets
//! until the process runs out of descriptors, must not be able to flood the host's log. Each
//! kind of event gets a [`LogLimiter`]: a few lines per window pass, the rest are counted, and
//! every kind's counts are readable for the metrics file.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines of one kind let through per window.
pub const BURST: u64 = 5;
/// Length of a window.
pub const WINDOW: Duration = Duration::from_secs(5);

/// Counts one kind of event and decides which of them get a log line.
pub struct LogLimiter {
    kind: &'static str,
    events: AtomicU64,
    suppressed: AtomicU64,
    registered: AtomicBool,
    window: Mutex<Option<(Instant, u64)>>,
}

static REGISTRY: Mutex<Vec<&'static LogLimiter>> = Mutex::new(Vec::new());

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl LogLimiter {
    /// A limiter for events of `kind` (the name the metrics show).
    pub const fn new(kind: &'static str) -> Self {
        Self {
            kind,
            events: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
            registered: AtomicBool::new(false),
            window: Mutex::new(None),
        }
    }

    /// Counts one event. Returns `Some(n)` when it may be logged, `n` being how many lines of
    /// this kind were suppressed since the last one logged; `None` when it must stay silent.
    pub fn admit(&'static self) -> Option<u64> {
        self.admit_at(Instant::now())
    }

    fn admit_at(&'static self, now: Instant) -> Option<u64> {
        if !self.registered.swap(true, Ordering::Relaxed) {
            lock(&REGISTRY).push(self);
        }
        self.events.fetch_add(1, Ordering::Relaxed);
        let mut w = lock(&self.window);
        let (start, shown) = w.get_or_insert((now, 0));
        if now.duration_since(*start) >= WINDOW {
            *start = now;
            *shown = 0;
        }
        if *shown >= BURST {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *shown += 1;
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }

    /// Events counted so far.
    pub fn events(&self) -> u64 {
        self.events.load(Ordering::Relaxed)
    }
}

/// `(kind, events)` for every kind that has happened at least once.
pub fn counts() -> Vec<(&'static str, u64)> {
    lock(&REGISTRY)
        .iter()
        .map(|l| (l.kind, l.events()))
        .collect()
}

/// Events of `kind` so far (0 if it never happened).
pub fn count(kind: &str) -> u64 {
    lock(&REGISTRY)
        .iter()
        .filter(|l| l.kind == kind)
        .map(|l| l.events())
        .sum()
}

/// Logs at `warn` level at most [`BURST`] times per [`WINDOW`] for this call site's `kind`,
/// counting every occurrence: `warn_limited!("virtio_mmio_bad_write", "... {x}")`.
#[macro_export]
macro_rules! warn_limited {
    ($kind:expr, $($arg:tt)+) => {{
        static LIMITER: $crate::ratelimit::LogLimiter = $crate::ratelimit::LogLimiter::new($kind);
        if let Some(suppressed) = LIMITER.admit() {
            if suppressed > 0 {
                tracing::warn!("{} ({} similar message(s) suppressed)", format_args!($($arg)+), suppressed);
            } else {
                tracing::warn!($($arg)+);
            }
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_lines_are_counted_not_logged() {
        static L: LogLimiter = LogLimiter::new("test_burst");
        let t0 = Instant::now();
        let admitted = (0..100).filter(|_| L.admit_at(t0).is_some()).count();
        assert_eq!(admitted as u64, BURST);
        assert_eq!(L.events(), 100);
        // The next window lets lines through again and reports how many were held back.
        assert_eq!(L.admit_at(t0 + WINDOW), Some(100 - BURST));
        assert_eq!(L.admit_at(t0 + WINDOW), Some(0));
        assert_eq!(count("test_burst"), 102);
        assert!(counts().contains(&("test_burst", 102)));
    }
}
