//! The balloon through its MMIO transport, against an in-memory guest, as a driver drives it.

use super::*;
use crate::bus::BusDevice;
use crate::virtio::mmio::MmioTransport;
use crate::virtio::{status, GuestMemoryMmap, Interrupt};
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

const MEM: usize = 16 << 20;
const SIZE: u16 = 16;
/// Where the test writes page-number arrays and statistics.
const BUFS: u64 = 0x80000;
/// Guest pages the tests give up: 8 MiB up.
const VICTIM: u64 = 8 << 20;

fn rings(q: usize) -> (u64, u64, u64) {
    let base = 0x10000 + q as u64 * 0x10000;
    (base, base + 0x4000, base + 0x8000)
}

struct Rig {
    t: MmioTransport,
    mem: GuestMemoryMmap,
    handle: Handle,
    metrics: Arc<BalloonMetrics>,
    next_desc: [u16; 5],
    avail: [u16; 5],
    used: [u16; 5],
}

impl Rig {
    /// A balloon configured as `config`, its driver accepting `accept` of what it offers.
    fn new(config: BalloonConfig, accept: u64) -> Rig {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
        let balloon = Balloon::new(&config).unwrap();
        let handle = balloon.handle();
        let metrics = balloon.shared.metrics.clone();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let evts = balloon
            .queue_max_sizes()
            .iter()
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect();
        let t = MmioTransport::new(
            Box::new(balloon),
            mem.clone(),
            Arc::new(Interrupt::new(irq)),
            evts,
        );
        let mut rig = Rig {
            t,
            mem,
            handle,
            metrics,
            next_desc: [0; 5],
            avail: [0; 5],
            used: [0; 5],
        };
        let offered = rig.features();
        let features = offered & (accept | features::COMMON);
        rig.write(0x70, status::ACKNOWLEDGE);
        rig.write(0x70, status::ACKNOWLEDGE | status::DRIVER);
        rig.write(0x24, 0);
        rig.write(0x20, features as u32);
        rig.write(0x24, 1);
        rig.write(0x20, (features >> 32) as u32);
        rig.write(
            0x70,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        let n = QueueLayout::for_features(features).count();
        for q in 0..n {
            let (d, a, u) = rings(q);
            rig.write(0x30, q as u32);
            rig.write(0x38, u32::from(SIZE));
            for (off, addr) in [(0x80, d), (0x90, a), (0xa0, u)] {
                rig.write(off, addr as u32);
                rig.write(off + 4, 0);
            }
            rig.write(0x44, 1);
        }
        rig.write(0x70, 0xf);
        assert_eq!(rig.read(0x70) & 0x4f, 0xf, "the device went live");
        rig
    }

    fn read(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn write(&mut self, off: u64, v: u32) {
        self.t.write(off, &v.to_le_bytes());
    }

    fn features(&mut self) -> u64 {
        self.write(0x14, 0);
        let lo = self.read(0x10);
        self.write(0x14, 1);
        (u64::from(self.read(0x10)) << 32) | u64::from(lo)
    }

    /// Posts one chain of (addr, len, device-writable) on queue `q` and notifies.
    fn post(&mut self, q: usize, bufs: &[(u64, u32, bool)]) {
        let (d, a, _) = rings(q);
        let head = self.next_desc[q];
        for (i, &(addr, len, w)) in bufs.iter().enumerate() {
            let idx = (head + i as u16) % SIZE;
            let last = i + 1 == bufs.len();
            let flags: u16 = if w { 2 } else { 0 } | if last { 0 } else { 1 };
            let at = GuestAddress(d + u64::from(idx) * 16);
            self.mem.write_obj(addr, at).unwrap();
            self.mem.write_obj(len, GuestAddress(at.0 + 8)).unwrap();
            self.mem.write_obj(flags, GuestAddress(at.0 + 12)).unwrap();
            self.mem
                .write_obj((idx + 1) % SIZE, GuestAddress(at.0 + 14))
                .unwrap();
        }
        self.next_desc[q] = (head + bufs.len() as u16) % SIZE;
        let slot = u64::from(self.avail[q] % SIZE);
        self.mem
            .write_obj(head, GuestAddress(a + 4 + slot * 2))
            .unwrap();
        self.avail[q] = self.avail[q].wrapping_add(1);
        self.mem
            .write_obj(self.avail[q], GuestAddress(a + 2))
            .unwrap();
        self.write(0x50, q as u32);
    }

    /// Waits up to `ms` for the next used entry of queue `q`.
    fn used(&mut self, q: usize, ms: u64) -> Option<u32> {
        let (_, _, u) = rings(q);
        let end = Instant::now() + Duration::from_millis(ms);
        while Instant::now() < end {
            let idx: u16 = self.mem.read_obj(GuestAddress(u + 2)).unwrap();
            if idx != self.used[q] {
                let slot = u64::from(self.used[q] % SIZE);
                self.used[q] = self.used[q].wrapping_add(1);
                return Some(self.mem.read_obj(GuestAddress(u + 4 + slot * 8)).unwrap());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        None
    }

    fn inflate(&mut self, pfns: &[u32]) {
        let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
        self.mem.write_slice(&bytes, GuestAddress(BUFS)).unwrap();
        self.post(0, &[(BUFS, bytes.len() as u32, false)]);
        assert!(self.used(0, 5000).is_some(), "the inflate chain comes back");
    }
}

fn fill(mem: &GuestMemoryMmap, addr: u64, len: usize, byte: u8) {
    mem.write_slice(&vec![byte; len], GuestAddress(addr))
        .unwrap();
}

fn all(mem: &GuestMemoryMmap, addr: u64, len: usize, byte: u8) -> bool {
    let mut buf = vec![0u8; len];
    mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
    buf.iter().all(|&b| b == byte)
}

fn config(amount_mib: u32) -> BalloonConfig {
    BalloonConfig {
        amount_mib,
        ..Default::default()
    }
}

#[test]
fn the_driver_reads_the_target_and_writes_what_it_gave() {
    let mut rig = Rig::new(config(4), 0);
    assert_eq!(rig.read(0x100), 4 * PAGES_PER_MIB);
    rig.handle.set_target_mib(6);
    assert_eq!(rig.read(0x100), 6 * PAGES_PER_MIB);
    rig.write(0x104, 512);
    let s = rig.handle.stats();
    assert_eq!(
        (s.target_pages, s.actual_pages, s.target_mib, s.actual_mib),
        (6 * 256, 512, 6, 2)
    );
    // `num_pages` is the device's: a driver's write is ignored.
    rig.write(0x100, 1);
    assert_eq!(rig.read(0x100), 6 * PAGES_PER_MIB);
}

#[test]
fn inflated_pages_are_released_and_bad_page_numbers_ignored() {
    let mut rig = Rig::new(config(1), 0);
    fill(&rig.mem, VICTIM, 64 << 10, 0xaa);
    let first = (VICTIM >> 12) as u32;
    // Eight pages given (one twice), plus two beyond guest RAM.
    let mut pfns: Vec<u32> = (first..first + 8).collect();
    pfns.push(first + 3);
    pfns.push((MEM >> 12) as u32);
    pfns.push(u32::MAX);
    rig.inflate(&pfns);
    assert!(
        all(&rig.mem, VICTIM, 32 << 10, 0),
        "given pages read as zero"
    );
    assert!(
        all(&rig.mem, VICTIM + (32 << 10), 32 << 10, 0xaa),
        "the next pages are kept"
    );
    assert_eq!(rig.metrics.inflated_pages.load(Ordering::Relaxed), 8);
    assert_eq!(rig.metrics.ignored_pfns.load(Ordering::Relaxed), 3);
    assert_eq!(rig.metrics.released_bytes.load(Ordering::Relaxed), 32 << 10);

    // Deflate: the chain comes back and the guest may write the pages again.
    rig.post(1, &[(BUFS, 8 * 4, false)]);
    assert!(rig.used(1, 5000).is_some());
    assert_eq!(rig.metrics.deflated_pages.load(Ordering::Relaxed), 8);
    fill(&rig.mem, VICTIM, 32 << 10, 0x55);
    assert!(all(&rig.mem, VICTIM, 32 << 10, 0x55));
}

#[test]
fn a_malformed_inflate_chain_is_returned_and_counted() {
    let mut rig = Rig::new(config(1), 0);
    // Writable, unaligned and outside-memory descriptors.
    rig.post(
        0,
        &[
            (BUFS, 8, true),
            (BUFS, 6, false),
            ((MEM as u64) - 2, 4, false),
        ],
    );
    assert!(rig.used(0, 5000).is_some());
    assert_eq!(rig.metrics.bad_descriptors.load(Ordering::Relaxed), 3);
    assert_eq!(rig.metrics.inflated_pages.load(Ordering::Relaxed), 0);
    // A chain longer than the limit: the excess is ignored.
    let n = MAX_PFNS_PER_CHAIN + 10;
    let first = (VICTIM >> 12) as u32;
    let pfns: Vec<u32> = (0..n as u32).map(|i| first + (i % 1024)).collect();
    let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
    rig.mem.write_slice(&bytes, GuestAddress(BUFS)).unwrap();
    rig.post(0, &[(BUFS, bytes.len() as u32, false)]);
    assert!(rig.used(0, 5000).is_some());
    assert_eq!(rig.metrics.ignored_pfns.load(Ordering::Relaxed), 10);
    assert_eq!(rig.metrics.inflated_pages.load(Ordering::Relaxed), 1024);
}

fn stats_buffer(mem: &GuestMemoryMmap, at: u64, stats: &[(u16, u64)]) -> u32 {
    let bytes: Vec<u8> = stats
        .iter()
        .flat_map(|(t, v)| t.to_le_bytes().into_iter().chain(v.to_le_bytes()))
        .collect();
    mem.write_slice(&bytes, GuestAddress(at)).unwrap();
    bytes.len() as u32
}

#[test]
fn statistics_reach_the_handle_and_the_buffer_returns_at_each_interval() {
    let cfg = BalloonConfig {
        stats_polling_interval_s: 1,
        ..config(0)
    };
    let mut rig = Rig::new(cfg, feature::STATS_VQ);
    let len = stats_buffer(&rig.mem, BUFS, &[(4, 1 << 20), (5, 16 << 20), (99, 7)]);
    rig.post(2, &[(BUFS, len, false)]);
    let end = Instant::now() + Duration::from_secs(5);
    while rig.handle.stats().guest.is_empty() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(1));
    }
    let s = rig.handle.stats();
    assert_eq!(s.guest.get("free_memory"), Some(&(1 << 20)));
    assert_eq!(s.guest.get("total_memory"), Some(&(16 << 20)));
    assert_eq!(s.guest.len(), 2, "{s:?}");
    assert_eq!(rig.metrics.unknown_stats.load(Ordering::Relaxed), 1);
    let json = serde_json::to_value(&s).unwrap();
    assert_eq!(json["free_memory"], 1 << 20);
    assert_eq!(json["target_pages"], 0);
    // The device keeps the buffer until the interval passes.
    assert_eq!(rig.used(2, 300), None);
    assert!(rig.used(2, 3000).is_some(), "the buffer comes back");
    // A new interval asks at once; statistics cannot be turned off.
    rig.post(2, &[(BUFS, len, false)]);
    std::thread::sleep(Duration::from_millis(50));
    rig.handle.set_stats_interval_s(30).unwrap();
    assert!(rig.used(2, 500).is_some(), "a new interval asks at once");
    let e = rig.handle.set_stats_interval_s(0).unwrap_err();
    assert!(e.contains("Cannot enable/disable"), "{e}");
}

#[test]
fn reported_free_ranges_are_released_on_the_queue_after_the_ones_declined() {
    let cfg = BalloonConfig {
        stats_polling_interval_s: 5,
        free_page_reporting: true,
        ..config(0)
    };
    // The driver declines statistics: the reporting queue is the third.
    let mut rig = Rig::new(cfg, feature::REPORTING);
    fill(&rig.mem, VICTIM, 4 << 20, 0x77);
    rig.post(
        2,
        &[
            (VICTIM, 2 << 20, true),
            (VICTIM + (2 << 20) + 1, 4096, true),
        ],
    );
    assert!(rig.used(2, 5000).is_some());
    assert!(all(&rig.mem, VICTIM, 2 << 20, 0));
    assert!(all(&rig.mem, VICTIM + (2 << 20), 2 << 20, 0x77));
    assert_eq!(rig.metrics.reported_bytes.load(Ordering::Relaxed), 2 << 20);
    assert_eq!(rig.metrics.bad_descriptors.load(Ordering::Relaxed), 1);
}

#[test]
fn features_follow_the_configuration() {
    let f = BalloonConfig {
        deflate_on_oom: true,
        ..config(0)
    }
    .features();
    assert_eq!(f & 0xff, feature::DEFLATE_ON_OOM);
    let c = BalloonConfig {
        stats_polling_interval_s: 1,
        free_page_reporting: true,
        ..config(0)
    };
    assert_eq!(c.features() & 0xff, feature::STATS_VQ | feature::REPORTING);
    assert_eq!(
        QueueLayout::for_features(c.features()),
        QueueLayout {
            stats: Some(2),
            hinting: None,
            reporting: Some(3)
        }
    );
    assert!(config(65)
        .check(64)
        .unwrap_err()
        .contains("larger than the guest's memory (64 MiB)"));
    assert!(config(64).check(64).is_ok());
    let h = BalloonConfig {
        free_page_hinting: true,
        free_page_reporting: true,
        ..config(0)
    };
    assert_eq!(
        QueueLayout::for_features(h.features()),
        QueueLayout {
            stats: None,
            hinting: Some(2),
            reporting: Some(3)
        }
    );
}

#[test]
fn state_round_trips_and_a_mismatch_is_refused() {
    let cfg = BalloonConfig {
        stats_polling_interval_s: 2,
        ..config(3)
    };
    let a = Balloon::new(&cfg).unwrap();
    a.shared.actual_pages.store(77, Ordering::SeqCst);
    crate::bus::lock(&a.shared.guest_stats)[4] = Some(9);
    let saved = a.save();
    let mut b = Balloon::new(&cfg).unwrap();
    b.restore(&saved).unwrap();
    assert_eq!(b.state(), a.state());
    assert_eq!(b.handle().stats().guest.get("free_memory"), Some(&9));
    let mut c = Balloon::new(&config(3)).unwrap();
    let e = c.restore(&saved).unwrap_err();
    assert!(e.contains("statistics are on in the snapshot"), "{e}");
    let mut bad = saved.clone();
    bad["guest_stats"] = serde_json::json!(vec![1; 17]);
    assert!(b.restore(&bad).unwrap_err().contains("at most 16"));
}

#[test]
fn a_file_backed_range_is_replaced_by_zeros_and_the_file_is_untouched() {
    use std::io::{Read, Seek, Write};
    use vm_memory::mmap::{MmapRegionBuilder, NewBitmap};
    let mut file = tempfile_in_tmp();
    file.write_all(&vec![0x33u8; 1 << 20]).unwrap();
    let region = MmapRegionBuilder::new_with_bitmap(
        1 << 20,
        vm_memory::bitmap::AtomicBitmap::with_len(1 << 20),
    )
    .with_file_offset(vm_memory::FileOffset::new(file.try_clone().unwrap(), 0))
    .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
    .with_mmap_flags(libc::MAP_PRIVATE)
    .build()
    .unwrap();
    let mem = GuestMemoryMmap::from_regions(vec![vm_memory::GuestRegionMmap::new(
        region,
        GuestAddress(0),
    )
    .unwrap()])
    .unwrap();
    fill(&mem, 0, 8192, 0x44);
    assert_eq!(release_range(&mem, GuestAddress(4096), 8192), Ok(8192));
    assert!(all(&mem, 0, 4096, 0x44));
    assert!(all(&mem, 4096, 8192, 0));
    assert!(all(&mem, 12288, 4096, 0x33));
    let mut back = vec![0u8; 16384];
    file.rewind().unwrap();
    file.read_exact(&mut back).unwrap();
    assert!(
        back.iter().all(|&b| b == 0x33),
        "the snapshot file keeps its bytes"
    );
    // Released pages count as written for diff snapshots.
    let region = mem.find_region(GuestAddress(0)).unwrap();
    use vm_memory::bitmap::Bitmap;
    assert!(region.bitmap().dirty_at(4096));
    assert!(region.bitmap().dirty_at(8192));
    assert!(release_range(&mem, GuestAddress(1 << 20), 4096)
        .unwrap_err()
        .contains("outside guest memory"));
}

fn tempfile_in_tmp() -> std::fs::File {
    let path = std::env::temp_dir().join(format!(
        "vireo-balloon-test-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    let _ = std::fs::remove_file(&path);
    f
}

use std::sync::atomic::Ordering;

#[test]
fn a_huge_page_is_released_once_all_its_pages_are_given() {
    let mut h = release::HugePages::default();
    let base = 3 * 512;
    for pfn in base..base + 511 {
        assert_eq!(h.give(pfn), None);
    }
    // One taken back and given again: still one short until the last.
    h.take_back(base + 7);
    assert_eq!(h.give(base + 511), None);
    assert_eq!(h.give(base + 7), Some(GuestAddress(3 << 21)));
    // Given twice counts once; a new round starts empty.
    assert_eq!(h.give(base), None);
    assert_eq!(h.give(base), None);
}

#[test]
fn hinted_pages_are_released_during_a_run_and_stop_is_acknowledged() {
    let cfg = BalloonConfig {
        free_page_hinting: true,
        ..config(0)
    };
    let mut rig = Rig::new(cfg, feature::FREE_PAGE_HINT);
    assert_eq!(rig.read(0x108), HINT_CMD_DONE, "no run yet");
    fill(&rig.mem, VICTIM, 4 << 20, 0x66);
    rig.handle.start_hinting(true);
    assert_eq!(rig.read(0x108), 2, "the first run's command ID");
    // The guest starts: its command, then a hinted block.
    rig.mem.write_obj(2u32, GuestAddress(BUFS)).unwrap();
    rig.post(2, &[(BUFS, 4, false)]);
    assert!(rig.used(2, 5000).is_some());
    rig.post(2, &[(VICTIM, 2 << 20, true)]);
    assert!(rig.used(2, 5000).is_some());
    assert!(
        all(&rig.mem, VICTIM, 2 << 20, 0),
        "the hinted block is released"
    );
    // STOP: acknowledged with DONE at once.
    rig.mem
        .write_obj(HINT_CMD_STOP, GuestAddress(BUFS))
        .unwrap();
    rig.post(2, &[(BUFS, 4, false)]);
    assert!(rig.used(2, 5000).is_some());
    assert_eq!(
        rig.handle.hinting_status(),
        HintingStatus {
            host_cmd: HINT_CMD_DONE,
            guest_cmd: Some(HINT_CMD_STOP)
        }
    );
    assert_eq!(rig.read(0x108), HINT_CMD_DONE);
    // A hint that comes after the run: the page may be in use again, so it is kept.
    rig.post(2, &[(VICTIM + (2 << 20), 2 << 20, true)]);
    assert!(rig.used(2, 5000).is_some());
    assert!(all(&rig.mem, VICTIM + (2 << 20), 2 << 20, 0x66));
    assert_eq!(rig.metrics.stale_hints.load(Ordering::Relaxed), 1);
    assert_eq!(rig.metrics.hinted_bytes.load(Ordering::Relaxed), 2 << 20);
    // The next run counts up.
    rig.handle.start_hinting(false);
    assert_eq!(rig.read(0x108), 3);
    rig.handle.stop_hinting();
    assert_eq!(rig.read(0x108), HINT_CMD_DONE);
}
