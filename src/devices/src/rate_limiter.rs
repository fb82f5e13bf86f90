//! Rate limiting with Firecracker's `RateLimiter` shape: a bandwidth bucket (bytes) and an ops
//! bucket (requests), each `{ size, one_time_burst, refill_time }` (refill_time in ms: the time
//! an empty bucket takes to fill to `size`).
//!
//! A request that the buckets cannot pay for waits: the limiter arms a timerfd for the moment
//! they will have refilled enough, and the device's event loop resumes the queue when it fires
//! (never by polling). A request larger than a bucket goes when the bucket is full and leaves
//! it in debt, so the long-run rate holds for any request size. Time comes from a [`Clock`], so
//! the tests run on a fake one.

use serde::{Deserialize, Serialize};
use std::time::Duration;
use vmm_sys_util::timerfd::TimerFd;

/// One bucket as Firecracker's API describes it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucketConfig {
    /// Tokens the bucket holds when full (bytes or operations).
    pub size: u64,
    /// Extra tokens spent before the bucket, once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_time_burst: Option<u64>,
    /// Milliseconds an empty bucket takes to fill.
    pub refill_time: u64,
}

/// A rate limiter as Firecracker's API describes it; a missing bucket does not limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiterConfig {
    /// Bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucketConfig>,
    /// Requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucketConfig>,
}

impl TokenBucketConfig {
    /// A bucket of size 0 or refill time 0 limits nothing (Firecracker's rule).
    fn limits(&self) -> bool {
        self.size > 0 && self.refill_time > 0
    }
}

impl RateLimiterConfig {
    /// Whether any bucket limits anything.
    pub fn limits(&self) -> bool {
        self.bandwidth.is_some_and(|b| b.limits()) || self.ops.is_some_and(|b| b.limits())
    }
}

/// Where a limiter reads the time.
pub trait Clock: Send {
    /// Nanoseconds on a monotonic clock.
    fn now_ns(&self) -> u64;
}

/// CLOCK_MONOTONIC.
#[derive(Clone, Copy, Debug, Default)]
pub struct MonotonicClock;

impl Clock for MonotonicClock {
    fn now_ns(&self) -> u64 {
        static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        START
            .get_or_init(std::time::Instant::now)
            .elapsed()
            .as_nanos() as u64
    }
}

/// A throttled queue waits at least this fraction of a bucket's refill time.
const WAKE_FRACTION: u64 = 16;

/// One bucket's state. `budget` may go negative: the debt of a request larger than the bucket.
#[derive(Debug)]
struct Bucket {
    size: u64,
    refill_ns: u64,
    burst: u64,
    budget: i128,
    last_ns: u64,
}

impl Bucket {
    fn new(c: &TokenBucketConfig, now: u64) -> Option<Self> {
        c.limits().then(|| Bucket {
            size: c.size,
            refill_ns: c.refill_time.saturating_mul(1_000_000),
            burst: c.one_time_burst.unwrap_or(0),
            budget: i128::from(c.size),
            last_ns: now,
        })
    }

    fn refill(&mut self, now: u64) {
        let elapsed = now.saturating_sub(self.last_ns);
        let add = i128::from(elapsed) * i128::from(self.size) / i128::from(self.refill_ns);
        if add > 0 {
            self.budget = (self.budget + add).min(i128::from(self.size));
            // Keep the remainder of the partial token for next time.
            let used_ns = add * i128::from(self.refill_ns) / i128::from(self.size);
            self.last_ns += used_ns as u64;
            if self.budget == i128::from(self.size) {
                self.last_ns = now;
            }
        }
    }

    /// Tokens needed before a request of `tokens` may go: all of them, or a full bucket for
    /// one larger than the bucket.
    fn needed(&self, tokens: u64) -> i128 {
        i128::from(tokens.min(self.size))
    }

    fn can_pay(&self, tokens: u64) -> bool {
        i128::from(self.burst) >= i128::from(tokens) || self.budget >= self.needed(tokens)
    }

    fn pay(&mut self, tokens: u64) {
        if self.burst >= tokens {
            self.burst -= tokens;
        } else {
            self.budget -= i128::from(tokens);
        }
    }

    /// Nanoseconds until `tokens` can be paid (0 if now), but at least a sixteenth of the refill
    /// time when there is a wait at all: a throttled queue then wakes for a batch of requests
    /// rather than once per request, and the long-run rate is the same (tokens keep accruing).
    fn wait_ns(&self, tokens: u64) -> u64 {
        match self.exact_wait_ns(tokens) {
            0 => 0,
            ns => ns.max(self.refill_ns / WAKE_FRACTION),
        }
    }

    /// Nanoseconds until `tokens` can be paid (0 if now).
    fn exact_wait_ns(&self, tokens: u64) -> u64 {
        let missing = self.needed(tokens) - self.budget;
        if missing <= 0 || i128::from(self.burst) >= i128::from(tokens) {
            return 0;
        }
        let size = i128::from(self.size);
        let ns = (missing * i128::from(self.refill_ns) + size - 1) / size;
        u64::try_from(ns).unwrap_or(u64::MAX)
    }
}

/// A device's limiter: its buckets, and the timerfd that says when a throttled queue may go on.
pub struct RateLimiter {
    bandwidth: Option<Bucket>,
    ops: Option<Bucket>,
    timer: TimerFd,
    clock: Box<dyn Clock>,
    throttled: bool,
    /// Requests that had to wait (for the metrics).
    pub throttled_count: u64,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("bandwidth", &self.bandwidth)
            .field("ops", &self.ops)
            .field("throttled", &self.throttled)
            .finish()
    }
}

impl RateLimiter {
    /// A limiter for `config` on the monotonic clock.
    pub fn new(config: &RateLimiterConfig) -> std::io::Result<Self> {
        Self::with_clock(config, Box::new(MonotonicClock))
    }

    /// A limiter for `config` reading time from `clock`.
    pub fn with_clock(config: &RateLimiterConfig, clock: Box<dyn Clock>) -> std::io::Result<Self> {
        let now = clock.now_ns();
        Ok(Self {
            bandwidth: config.bandwidth.as_ref().and_then(|c| Bucket::new(c, now)),
            ops: config.ops.as_ref().and_then(|c| Bucket::new(c, now)),
            timer: TimerFd::new().map_err(std::io::Error::from)?,
            clock,
            throttled: false,
            throttled_count: 0,
        })
    }

    /// New buckets (PATCH on a running VM), full; a throttled queue is re-examined at once.
    pub fn update(&mut self, config: &RateLimiterConfig) -> std::io::Result<()> {
        let now = self.clock.now_ns();
        self.bandwidth = config.bandwidth.as_ref().and_then(|c| Bucket::new(c, now));
        self.ops = config.ops.as_ref().and_then(|c| Bucket::new(c, now));
        if self.throttled {
            self.arm(1)?;
        }
        Ok(())
    }

    /// The timerfd the device's event loop watches; when it is readable, call
    /// [`RateLimiter::on_timer`] and serve the throttled queue again.
    pub fn timer(&self) -> &TimerFd {
        &self.timer
    }

    /// Whether a request is waiting for the timer.
    pub fn is_throttled(&self) -> bool {
        self.throttled
    }

    /// Takes a request of `bytes` bytes (one operation) if the buckets allow it now. If not,
    /// arms the timer for when they will, and the request must wait (returns false).
    pub fn consume(&mut self, bytes: u64) -> bool {
        if self.try_take(bytes) {
            self.throttled = false;
            return true;
        }
        let wait = self
            .bandwidth
            .as_ref()
            .map_or(0, |b| b.wait_ns(bytes))
            .max(self.ops.as_ref().map_or(0, |b| b.wait_ns(1)));
        self.throttled = true;
        self.throttled_count += 1;
        if let Err(e) = self.arm(wait.max(1)) {
            // Without a timer the queue would never resume: let the request through.
            tracing::error!("rate limiter: cannot arm its timer ({e}); not limiting");
            self.throttled = false;
            return true;
        }
        false
    }

    fn arm(&mut self, ns: u64) -> std::io::Result<()> {
        self.timer
            .reset(Duration::from_nanos(ns), None)
            .map_err(std::io::Error::from)
    }

    /// Pays for `bytes` (one operation) already spent, going into debt if need be: for data whose
    /// size is known only once it has moved (a received frame). When a bucket is left empty the
    /// limiter is throttled until the timer says it holds a token again.
    pub fn charge(&mut self, bytes: u64) {
        if !self.refill() {
            return;
        }
        self.pay(bytes);
        let wait = [&self.bandwidth, &self.ops]
            .into_iter()
            .flatten()
            .map(|b| b.wait_ns(1))
            .max()
            .unwrap_or(0);
        if wait > 0 {
            self.throttled = true;
            self.throttled_count += 1;
            if let Err(e) = self.arm(wait) {
                tracing::error!("rate limiter: cannot arm its timer ({e}); not limiting");
                self.throttled = false;
            }
        }
    }

    /// Takes `bytes` (one operation) if the buckets allow it now, without waiting or arming the
    /// timer: for output that is dropped rather than delayed (the serial console, whose vCPU
    /// must not block).
    pub fn try_take(&mut self, bytes: u64) -> bool {
        if !self.refill() {
            return true;
        }
        let ok = self.bandwidth.as_ref().is_none_or(|b| b.can_pay(bytes))
            && self.ops.as_ref().is_none_or(|b| b.can_pay(1));
        if ok {
            self.pay(bytes);
        }
        ok
    }

    /// Brings the buckets up to now; false when there is no bucket (nothing limits, and the
    /// clock need not be read).
    fn refill(&mut self) -> bool {
        if self.bandwidth.is_none() && self.ops.is_none() {
            return false;
        }
        let now = self.clock.now_ns();
        for b in [&mut self.bandwidth, &mut self.ops].into_iter().flatten() {
            b.refill(now);
        }
        true
    }

    /// Takes `bytes` from the bandwidth bucket and one operation from the ops bucket.
    fn pay(&mut self, bytes: u64) {
        if let Some(b) = &mut self.bandwidth {
            b.pay(bytes);
        }
        if let Some(b) = &mut self.ops {
            b.pay(1);
        }
    }

    #[cfg(test)]
    fn on_timer_for_test(&mut self) {
        self.throttled = false;
    }

    /// The timer fired: the throttled request may be tried again.
    pub fn on_timer(&mut self) {
        // The timerfd is readable, so this read does not block.
        let _ = self.timer.wait();
        self.throttled = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    /// A clock the test moves by hand.
    #[derive(Clone, Default)]
    struct FakeClock(Arc<AtomicU64>);

    impl FakeClock {
        fn advance_ms(&self, ms: u64) {
            self.0.fetch_add(ms * 1_000_000, Ordering::SeqCst);
        }
    }

    impl Clock for FakeClock {
        fn now_ns(&self) -> u64 {
            self.0.load(Ordering::SeqCst)
        }
    }

    fn bucket(size: u64, refill_time: u64, burst: Option<u64>) -> Option<TokenBucketConfig> {
        Some(TokenBucketConfig {
            size,
            one_time_burst: burst,
            refill_time,
        })
    }

    fn limiter(cfg: RateLimiterConfig) -> (RateLimiter, FakeClock) {
        let clock = FakeClock::default();
        (
            RateLimiter::with_clock(&cfg, Box::new(clock.clone())).unwrap(),
            clock,
        )
    }

    /// How long the armed timer waits, in ms (rounded up).
    fn armed_ms(l: &RateLimiter) -> u64 {
        assert!(l.timer().is_armed().unwrap());
        let mut spec = std::mem::MaybeUninit::<libc::itimerspec>::uninit();
        // SAFETY: timerfd_gettime writes one itimerspec into the buffer we own.
        let r = unsafe {
            libc::timerfd_gettime(
                std::os::fd::AsRawFd::as_raw_fd(l.timer()),
                spec.as_mut_ptr(),
            )
        };
        assert_eq!(r, 0);
        // SAFETY: initialised by the successful call above.
        let v = unsafe { spec.assume_init() }.it_value;
        (v.tv_sec as u64 * 1000) + (v.tv_nsec as u64).div_ceil(1_000_000)
    }

    #[test]
    fn bandwidth_refills_at_its_rate_and_the_timer_says_when() {
        // 1000 bytes per 100 ms.
        let (mut l, clock) = limiter(RateLimiterConfig {
            bandwidth: bucket(1000, 100, None),
            ops: None,
        });
        assert!(l.consume(600));
        assert!(l.consume(400));
        assert!(!l.consume(500), "the bucket is empty");
        assert!(l.is_throttled());
        // 500 bytes take 50 ms to come back; the timer is armed for that, not polled.
        let ms = armed_ms(&l);
        assert!((49..=51).contains(&ms), "armed for {ms} ms");
        clock.advance_ms(49);
        assert!(!l.consume(500), "one ms early");
        clock.advance_ms(1);
        assert!(l.consume(500));
        assert!(!l.is_throttled());
        // Never more than a bucket: a long pause does not save up.
        clock.advance_ms(10_000);
        assert!(l.consume(1000));
        assert!(!l.consume(1));
        assert_eq!(l.throttled_count, 3);
    }

    #[test]
    fn ops_bucket_and_one_time_burst() {
        // 10 requests per second, plus a one-time burst of 5.
        let (mut l, clock) = limiter(RateLimiterConfig {
            bandwidth: None,
            ops: bucket(10, 1000, Some(5)),
        });
        for n in 0..15 {
            assert!(l.consume(1 << 20), "request {n}");
        }
        assert!(!l.consume(0));
        assert_eq!(armed_ms(&l), 100);
        clock.advance_ms(100);
        assert!(l.consume(0));
        assert!(!l.consume(0));
    }

    #[test]
    fn a_request_larger_than_the_bucket_goes_when_it_is_full_and_leaves_a_debt() {
        let (mut l, clock) = limiter(RateLimiterConfig {
            bandwidth: bucket(1000, 100, None),
            ops: None,
        });
        // 3000 bytes: 300 ms of tokens. It goes at once (the bucket is full) ...
        assert!(l.consume(3000));
        // ... and nothing else goes until the debt is paid and a request's worth is back.
        assert!(!l.consume(100));
        assert_eq!(armed_ms(&l), 210);
        clock.advance_ms(209);
        assert!(!l.consume(100));
        clock.advance_ms(1);
        assert!(l.consume(100));
    }

    #[test]
    fn the_timer_fires_and_updates_take_effect_on_a_throttled_queue() {
        let (mut l, clock) = limiter(RateLimiterConfig {
            bandwidth: bucket(100, 1000, None),
            ops: None,
        });
        assert!(l.consume(100));
        assert!(!l.consume(100));
        // PATCH: a bigger bucket, full; the waiting queue is told to look again at once.
        l.update(&RateLimiterConfig {
            bandwidth: bucket(1_000_000, 1000, None),
            ops: None,
        })
        .unwrap();
        // The event loop sees the timerfd readable (armed to fire at once), then calls on_timer.
        let mut fds = [libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(l.timer()),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: poll(2) on one pollfd we own; the timer was armed for 1 ns.
        assert_eq!(unsafe { libc::poll(fds.as_mut_ptr(), 1, 5000) }, 1);
        l.on_timer();
        assert!(!l.is_throttled());
        assert!(l.consume(100));
        clock.advance_ms(1);
        // No bucket at all (or a zero one) limits nothing.
        l.update(&RateLimiterConfig {
            bandwidth: bucket(0, 100, None),
            ops: None,
        })
        .unwrap();
        for _ in 0..1000 {
            assert!(l.consume(u64::MAX));
        }
    }

    #[test]
    fn output_beyond_the_rate_is_refused_without_a_timer() {
        // 100 bytes per second.
        let (mut l, clock) = limiter(RateLimiterConfig {
            bandwidth: bucket(100, 1000, None),
            ops: None,
        });
        let taken = (0..150).filter(|_| l.try_take(1)).count();
        assert_eq!(taken, 100);
        assert!(!l.timer().is_armed().unwrap());
        clock.advance_ms(500);
        let taken = (0..150).filter(|_| l.try_take(1)).count();
        assert_eq!(taken, 50);
    }

    #[test]
    fn charges_after_the_fact_throttle_until_a_token_is_back() {
        // 1000 bytes per 100 ms: a 1500-byte frame already received leaves 500 bytes of debt.
        let (mut l, clock) = limiter(RateLimiterConfig {
            bandwidth: bucket(1000, 100, None),
            ops: None,
        });
        l.charge(600);
        assert!(!l.is_throttled());
        l.charge(900);
        assert!(l.is_throttled());
        // Debt of 500 plus one token: 51 ms (rounded up).
        assert_eq!(armed_ms(&l), 51);
        clock.advance_ms(51);
        l.on_timer_for_test();
        assert!(l.consume(1));
    }

    #[test]
    fn a_throttled_queue_wakes_for_a_batch_not_per_request() {
        // 1000 bytes per 160 ms: the next 100-byte request could go in 16 ms, and that is
        // also the shortest wait (a sixteenth of the refill time) ...
        let (mut l, clock) = limiter(RateLimiterConfig {
            bandwidth: bucket(1000, 160, None),
            ops: None,
        });
        assert!(l.consume(1000));
        assert!(!l.consume(100));
        assert_eq!(armed_ms(&l), 16);
        // ... but a 10-byte one, due in 1.6 ms, waits the 10 ms minimum too, and then finds
        // tokens for several.
        clock.advance_ms(16);
        assert!(l.consume(100));
        assert!(!l.consume(10));
        assert_eq!(armed_ms(&l), 10);
        clock.advance_ms(10);
        for _ in 0..6 {
            assert!(l.consume(10));
        }
    }

    #[test]
    fn firecracker_json() {
        let c: RateLimiterConfig = serde_json::from_str(
            r#"{"bandwidth":{"size":1048576,"one_time_burst":0,"refill_time":100},
                "ops":{"size":100,"refill_time":1000}}"#,
        )
        .unwrap();
        assert!(c.limits());
        assert_eq!(c.ops.unwrap().one_time_burst, None);
        assert!(serde_json::from_str::<RateLimiterConfig>(r#"{"bandwidth":{"size":1}}"#).is_err());
        assert!(serde_json::from_str::<RateLimiterConfig>(r#"{"colour":1}"#).is_err());
        assert!(!RateLimiterConfig::default().limits());
    }
}
