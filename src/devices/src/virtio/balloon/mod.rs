//! virtio-balloon (virtio 1.2, 5.5): the host asks the guest to give pages back, and releases
//! the pages the guest gives up. Also carries the guest's memory statistics and free page
//! reporting.
//!
//! Queues, in the order the driver numbers them (a queue whose feature was not negotiated takes
//! no index, as Linux's virtio-mmio driver counts): inflate, deflate, statistics (with
//! `VIRTIO_BALLOON_F_STATS_VQ`), free page hints (with `VIRTIO_BALLOON_F_FREE_PAGE_HINT`),
//! reporting (with `VIRTIO_BALLOON_F_REPORTING`).
//!
//! The VMM talks to a running balloon through its [`Handle`]: a new target, a new statistics
//! interval, the latest statistics.

mod event_handler;
pub mod metrics;
pub mod persist;
mod release;
#[cfg(test)]
mod tests;

/// The fuzz entry point's device half: serves queues laid out by the caller with the real
/// device thread's code (`features` picks which queues exist), then hands the statistics
/// buffer back as the timer would.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn fuzz_serve(
    mem: &super::GuestMemoryMmap,
    queues: Vec<virtio_queue::Queue>,
    features: u64,
) {
    // One device for every input: each new one would register its metrics again.
    static SHARED: std::sync::OnceLock<Option<Arc<Shared>>> = std::sync::OnceLock::new();
    let Some(shared) = SHARED
        .get_or_init(|| {
            Balloon::new(&BalloonConfig {
                stats_polling_interval_s: 1,
                free_page_reporting: true,
                free_page_hinting: true,
                ..Default::default()
            })
            .ok()
            .map(|b| b.shared)
        })
        .clone()
    else {
        return;
    };
    let evts: Vec<EventFd> = queues
        .iter()
        .filter_map(|_| EventFd::new(libc::EFD_NONBLOCK).ok())
        .collect();
    let Ok(irq) = EventFd::new(libc::EFD_NONBLOCK) else {
        return;
    };
    let n = queues.len();
    let ctx = ActivateContext {
        mem: mem.clone(),
        queues,
        queue_evts: evts,
        interrupt: Arc::new(super::Interrupt::new(irq)),
        acked_features: features,
        restored: false,
        thread_filter: utils::seccomp::ThreadFilter::none("fuzz"),
    };
    let Ok(mut thread) = event_handler::BalloonThread::new(ctx, shared.clone()) else {
        return;
    };
    // A hinting run in progress, so that hints are taken.
    Handle(shared.clone()).start_hinting(true);
    for q in 0..n {
        thread.serve(q);
    }
    thread.return_stats();
    let _ = Handle(shared).stats();
}

use super::{features, ActivateContext, ActivateError, VirtioDevice};
use metrics::BalloonMetrics;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use virtio_bindings::virtio_ids::VIRTIO_ID_BALLOON;
use vmm_sys_util::eventfd::EventFd;

use release::release_range;

/// What the balloon's thread calls: releasing guest pages (madvise, or an anonymous mapping
/// over a file-backed range) and its statistics timer.
pub const SECCOMP: utils::seccomp::Allow = utils::seccomp::Allow {
    by: "virtio-balloon",
    syscalls: &[libc::SYS_timerfd_settime, libc::SYS_madvise],
    with_arg: &[utils::seccomp::ArgRule {
        syscall: libc::SYS_mmap,
        arg: 3,
        value: release::ANON_FIXED_FLAGS as u64,
    }],
};

/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Pages are 4 KiB for the balloon whatever the guest's page size (virtio 1.2, 5.5.6).
pub const PAGE_SHIFT: u32 = 12;
/// Balloon pages in one MiB.
pub const PAGES_PER_MIB: u32 = 1 << (20 - PAGE_SHIFT);
/// Most page numbers read from one inflate chain; the rest are ignored and counted (Linux
/// sends at most 256).
pub const MAX_PFNS_PER_CHAIN: usize = 1024;

/// Feature bits (virtio 1.2, 5.5.3).
pub mod feature {
    /// The driver reports memory statistics on a queue.
    pub const STATS_VQ: u64 = 1 << 1;
    /// The driver gives pages back when the guest runs out of memory.
    pub const DEFLATE_ON_OOM: u64 = 1 << 2;
    /// The driver hints free pages during a run the host starts.
    pub const FREE_PAGE_HINT: u64 = 1 << 3;
    /// The driver reports free pages, which the host releases.
    pub const REPORTING: u64 = 1 << 5;
}

/// Statistic tags (virtio 1.2, 5.5.6.3, and Linux's later additions).
const STAT_NAMES: [&str; 16] = [
    "swap_in",
    "swap_out",
    "major_faults",
    "minor_faults",
    "free_memory",
    "total_memory",
    "available_memory",
    "disk_caches",
    "hugetlb_allocations",
    "hugetlb_failures",
    "oom_kill",
    "alloc_stall",
    "async_scan",
    "direct_scan",
    "async_reclaim",
    "direct_reclaim",
];

/// The balloon as configured (Firecracker's `PUT /balloon` body).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonConfig {
    /// Target size in MiB.
    pub amount_mib: u32,
    /// Let the guest take pages back from the balloon when it runs out of memory.
    pub deflate_on_oom: bool,
    /// Seconds between statistics updates; 0 turns statistics off (for good: they cannot be
    /// turned on after boot).
    #[serde(default)]
    pub stats_polling_interval_s: u16,
    /// Free page hinting: during a run the host starts (`/balloon/hinting/start`), the guest
    /// hints free pages, which the host releases.
    #[serde(default)]
    pub free_page_hinting: bool,
    /// Free page reporting: the guest reports free pages and the host releases them.
    #[serde(default)]
    pub free_page_reporting: bool,
}

impl BalloonConfig {
    /// Checks the configuration against a guest of `mem_mib` MiB.
    pub fn check(&self, mem_mib: u64) -> Result<(), String> {
        check_target(self.amount_mib, mem_mib)
    }

    /// Feature bits offered for this configuration.
    pub fn features(&self) -> u64 {
        let mut f = features::COMMON;
        if self.deflate_on_oom {
            f |= feature::DEFLATE_ON_OOM;
        }
        if self.stats_polling_interval_s > 0 {
            f |= feature::STATS_VQ;
        }
        if self.free_page_hinting {
            f |= feature::FREE_PAGE_HINT;
        }
        if self.free_page_reporting {
            f |= feature::REPORTING;
        }
        f
    }
}

/// Refuses a target the guest's memory cannot hold.
pub fn check_target(amount_mib: u32, mem_mib: u64) -> Result<(), String> {
    if u64::from(amount_mib) > mem_mib {
        return Err(format!(
            "balloon: a target of {amount_mib} MiB is larger than the guest's memory ({mem_mib} MiB)"
        ));
    }
    Ok(())
}

/// The guest's latest statistics, and the balloon's target and actual size (Firecracker's
/// `GET /balloon/statistics` body).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonStats {
    /// Target size in 4 KiB pages.
    pub target_pages: u32,
    /// Pages the guest has given up.
    pub actual_pages: u32,
    /// Target size in MiB.
    pub target_mib: u32,
    /// MiB the guest has given up.
    pub actual_mib: u32,
    /// The guest's counters by name (bytes or events), as the guest last reported them.
    #[serde(flatten)]
    pub guest: std::collections::BTreeMap<String, u64>,
}

/// `free_page_hint_cmd_id` values (virtio 1.2, 5.5.6.7): the driver stops hinting.
pub const HINT_CMD_STOP: u32 = 0;
/// The host is done with the hinted pages; the driver may use them again.
pub const HINT_CMD_DONE: u32 = 1;
/// The first run's command ID; later runs count up from it.
const HINT_CMD_FIRST: u32 = 2;

/// Where free page hinting stands (Firecracker's `GET /balloon/hinting/status` body).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HintingStatus {
    /// The last command the host gave.
    pub host_cmd: u32,
    /// The last command the guest sent back, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_cmd: Option<u32>,
}

/// What the VMM and the device thread share.
#[derive(Debug)]
struct Shared {
    target_pages: AtomicU32,
    actual_pages: AtomicU32,
    stats_interval_s: AtomicU32,
    /// The guest's counters, by tag.
    guest_stats: Mutex<[Option<u64>; 16]>,
    /// Wakes the device thread to re-arm its statistics timer.
    rearm: EventFd,
    /// The hinting command the host gave last (`free_page_hint_cmd_id`).
    hint_cmd: AtomicU32,
    /// The last run's command ID (0: none yet).
    last_run: AtomicU32,
    /// The command the guest sent back last (`u32::MAX`: none yet).
    guest_hint_cmd: AtomicU32,
    /// Answer the guest's STOP with DONE at once.
    ack_on_stop: std::sync::atomic::AtomicBool,
    /// The statistics timer, made with the device (the VMM thread that activates it may not
    /// create timers); only the device thread arms and reads it.
    timer: Mutex<vmm_sys_util::timerfd::TimerFd>,
    metrics: Arc<BalloonMetrics>,
}

/// The VMM's side of a balloon.
#[derive(Clone, Debug)]
pub struct Handle(Arc<Shared>);

impl Handle {
    /// Sets a new target in MiB; the caller then tells the driver its configuration changed.
    pub fn set_target_mib(&self, mib: u32) {
        self.0
            .target_pages
            .store(mib.saturating_mul(PAGES_PER_MIB), Ordering::SeqCst);
    }

    /// The statistics interval in seconds (0: statistics are off).
    pub fn stats_interval_s(&self) -> u16 {
        self.0.stats_interval_s.load(Ordering::SeqCst) as u16
    }

    /// Changes the statistics interval. Statistics cannot be turned on or off once the guest
    /// runs (the queue exists or not); the next update is asked for at once.
    pub fn set_stats_interval_s(&self, secs: u16) -> Result<(), String> {
        let old = self.stats_interval_s();
        if (old == 0) != (secs == 0) {
            return Err("Cannot enable/disable the statistics after boot.".into());
        }
        self.0
            .stats_interval_s
            .store(u32::from(secs), Ordering::SeqCst);
        let _ = self.0.rearm.write(1);
        Ok(())
    }

    /// Starts a free page hinting run; the caller then tells the driver its configuration
    /// changed. With `ack_on_stop` the run ends (DONE) as soon as the guest says it stopped.
    pub fn start_hinting(&self, ack_on_stop: bool) {
        self.0.ack_on_stop.store(ack_on_stop, Ordering::SeqCst);
        let last = self.0.last_run.load(Ordering::SeqCst);
        let next = last.checked_add(1).unwrap_or(0).max(HINT_CMD_FIRST);
        self.0.last_run.store(next, Ordering::SeqCst);
        self.0.hint_cmd.store(next, Ordering::SeqCst);
    }

    /// Ends the hinting run: the guest may use the hinted pages again; the caller then tells
    /// the driver its configuration changed.
    pub fn stop_hinting(&self) {
        self.0.hint_cmd.store(HINT_CMD_DONE, Ordering::SeqCst);
    }

    /// Where hinting stands.
    pub fn hinting_status(&self) -> HintingStatus {
        let guest = self.0.guest_hint_cmd.load(Ordering::SeqCst);
        HintingStatus {
            host_cmd: self.0.hint_cmd.load(Ordering::SeqCst),
            guest_cmd: (guest != u32::MAX).then_some(guest),
        }
    }

    /// Target and actual size, and the guest's latest counters.
    pub fn stats(&self) -> BalloonStats {
        let target = self.0.target_pages.load(Ordering::SeqCst);
        let actual = self.0.actual_pages.load(Ordering::SeqCst);
        let guest = crate::bus::lock(&self.0.guest_stats)
            .iter()
            .zip(STAT_NAMES)
            .filter_map(|(v, name)| v.map(|v| (name.to_string(), v)))
            .collect();
        BalloonStats {
            target_pages: target,
            actual_pages: actual,
            target_mib: target / PAGES_PER_MIB,
            actual_mib: actual / PAGES_PER_MIB,
            guest,
        }
    }
}

/// The balloon device.
pub struct Balloon {
    config: BalloonConfig,
    shared: Arc<Shared>,
    worker: Option<super::worker::Worker>,
}

impl Balloon {
    /// A balloon configured as `config` (checked by the caller).
    pub fn new(config: &BalloonConfig) -> std::io::Result<Self> {
        let metrics = crate::metrics::register_counters::<BalloonMetrics>("balloon".into());
        Ok(Self {
            shared: Arc::new(Shared {
                target_pages: AtomicU32::new(config.amount_mib.saturating_mul(PAGES_PER_MIB)),
                actual_pages: AtomicU32::new(0),
                stats_interval_s: AtomicU32::new(u32::from(config.stats_polling_interval_s)),
                guest_stats: Mutex::new([None; 16]),
                rearm: EventFd::new(libc::EFD_NONBLOCK)?,
                hint_cmd: AtomicU32::new(HINT_CMD_DONE),
                last_run: AtomicU32::new(0),
                guest_hint_cmd: AtomicU32::new(u32::MAX),
                ack_on_stop: std::sync::atomic::AtomicBool::new(false),
                timer: Mutex::new(vmm_sys_util::timerfd::TimerFd::new()?),
                metrics,
            }),
            config: config.clone(),
            worker: None,
        })
    }

    /// The VMM's handle on this balloon.
    pub fn handle(&self) -> Handle {
        Handle(self.shared.clone())
    }

    fn config_image(&self) -> [u8; 12] {
        let mut image = [0u8; 12];
        image[..4].copy_from_slice(
            &self
                .shared
                .target_pages
                .load(Ordering::SeqCst)
                .to_le_bytes(),
        );
        image[4..8].copy_from_slice(
            &self
                .shared
                .actual_pages
                .load(Ordering::SeqCst)
                .to_le_bytes(),
        );
        image[8..].copy_from_slice(&self.shared.hint_cmd.load(Ordering::SeqCst).to_le_bytes());
        image
    }
}

/// Which of the driver's queues serves what, for the features it accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct QueueLayout {
    pub stats: Option<usize>,
    pub hinting: Option<usize>,
    pub reporting: Option<usize>,
}

impl QueueLayout {
    pub(crate) fn for_features(acked: u64) -> Self {
        let mut next = 2;
        let mut take = |on: bool| {
            on.then(|| {
                next += 1;
                next - 1
            })
        };
        let stats = take(acked & feature::STATS_VQ != 0);
        let hinting = take(acked & feature::FREE_PAGE_HINT != 0);
        let reporting = take(acked & feature::REPORTING != 0);
        Self {
            stats,
            hinting,
            reporting,
        }
    }

    pub(crate) fn count(self) -> usize {
        2 + usize::from(self.stats.is_some())
            + usize::from(self.hinting.is_some())
            + usize::from(self.reporting.is_some())
    }
}

const QUEUE_SIZES: [u16; 5] = [QUEUE_SIZE; 5];

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BALLOON
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES[..QueueLayout::for_features(self.config.features()).count()]
    }

    fn queues_in_use(&self, acked_features: u64) -> usize {
        QueueLayout::for_features(acked_features).count()
    }

    fn features(&self) -> u64 {
        self.config.features()
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_image(&self.config_image(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` (offset 4, 4 bytes) is the driver's to write.
        if offset == 4 && data.len() == 4 {
            let mut b = [0u8; 4];
            b.copy_from_slice(data);
            self.shared
                .actual_pages
                .store(u32::from_le_bytes(b), Ordering::SeqCst);
        } else {
            utils::warn_limited!(
                "virtio_balloon_config_write",
                "virtio-balloon: ignored write of {} bytes at config offset {offset:#x}",
                data.len()
            );
        }
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let filter = ctx.thread_filter.clone();
        let thread = event_handler::BalloonThread::new(ctx, self.shared.clone())?;
        self.worker = Some(super::worker::Worker::run(
            "virtio-balloon",
            thread,
            filter,
        )?);
        Ok(())
    }

    fn worker(&self) -> Option<&super::worker::Worker> {
        self.worker.as_ref()
    }

    fn reset(&mut self) {
        self.worker = None;
    }

    fn save(&self) -> serde_json::Value {
        serde_json::to_value(self.state()).unwrap_or(serde_json::Value::Null)
    }

    fn restore(&mut self, state: &serde_json::Value) -> Result<(), String> {
        let state: persist::BalloonState = serde_json::from_value(state.clone())
            .map_err(|e| format!("balloon: bad state: {e}"))?;
        self.set_state(&state)
    }
}
