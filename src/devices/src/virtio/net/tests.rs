//! The virtio-net data path against an in-memory guest, with a datagram socket pair standing
//! in for the TAP (one read or write is one frame, as on a TAP).

use super::tap::{socket_pair, Tap, VNET_HDR_LEN};
use super::{NetIo, NetMetrics, Rx};
use crate::virtio::GuestMemoryMmap;
use std::fs::File;
use std::io::{Read, Write};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

const SIZE: u16 = 16;
const RX: (u64, u64, u64) = (0x1000, 0x2000, 0x3000);
const TX: (u64, u64, u64) = (0x4000, 0x5000, 0x6000);
const BUFS: u64 = 0x10000;
const WRITE: u16 = 2;
const NEXT: u16 = 1;

/// A guest with both queues set up, the device's data path, and the host end of the "TAP".
struct Rig {
    pub mem: GuestMemoryMmap,
    pub io: NetIo,
    pub host: File,
    pub metrics: Arc<NetMetrics>,
    rx_avail: u16,
    tx_avail: u16,
    rx_desc: u16,
    tx_desc: u16,
    rx_used: u16,
}

fn queue((d, a, u): (u64, u64, u64)) -> Queue {
    let mut q = Queue::new(SIZE).unwrap();
    q.set_size(SIZE);
    q.set_ready(true);
    q.try_set_desc_table_address(GuestAddress(d)).unwrap();
    q.try_set_avail_ring_address(GuestAddress(a)).unwrap();
    q.try_set_used_ring_address(GuestAddress(u)).unwrap();
    q
}

impl Rig {
    pub fn new(mrg: bool) -> Rig {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let (dev, host) = socket_pair().unwrap();
        let metrics = Arc::new(NetMetrics::default());
        let io = NetIo::new(
            mem.clone(),
            queue(RX),
            queue(TX),
            Arc::new(Tap::from_file(dev, "test", false)),
            metrics.clone(),
            mrg,
        );
        Rig {
            mem,
            io,
            host,
            metrics,
            rx_avail: 0,
            tx_avail: 0,
            rx_desc: 0,
            tx_desc: 0,
            rx_used: 0,
        }
    }

    fn desc(&self, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let a = GuestAddress(table + u64::from(i) * 16);
        self.mem.write_obj(addr, a).unwrap();
        self.mem.write_obj(len, GuestAddress(a.0 + 8)).unwrap();
        self.mem.write_obj(flags, GuestAddress(a.0 + 12)).unwrap();
        self.mem.write_obj(next, GuestAddress(a.0 + 14)).unwrap();
    }

    /// Posts a chain on a queue: (addr, len, flags) each; returns its head.
    fn post(&mut self, rx: bool, bufs: &[(u64, u32, u16)]) -> u16 {
        let (ring, next, avail) = if rx {
            (RX, &mut self.rx_desc, &mut self.rx_avail)
        } else {
            (TX, &mut self.tx_desc, &mut self.tx_avail)
        };
        let head = *next;
        let mut descs = Vec::new();
        for (i, &(addr, len, flags)) in bufs.iter().enumerate() {
            let idx = (head + i as u16) % SIZE;
            let last = i + 1 == bufs.len();
            descs.push((
                idx,
                addr,
                len,
                if last { flags } else { flags | NEXT },
                (idx + 1) % SIZE,
            ));
        }
        *next = (head + bufs.len() as u16) % SIZE;
        let slot = u64::from(*avail % SIZE);
        *avail = avail.wrapping_add(1);
        let avail_now = *avail;
        for (idx, addr, len, flags, n) in descs {
            self.desc(ring.0, idx, addr, len, flags, n);
        }
        self.mem
            .write_obj(head, GuestAddress(ring.1 + 4 + slot * 2))
            .unwrap();
        self.mem
            .write_obj(avail_now, GuestAddress(ring.1 + 2))
            .unwrap();
        head
    }

    /// Posts `n` receive buffers of `size` bytes.
    pub fn post_rx(&mut self, n: u16, size: u32) {
        for _ in 0..n {
            let addr = BUFS + u64::from(self.rx_avail % SIZE) * 0x1_0000;
            self.post(true, &[(addr, size, WRITE)]);
        }
    }

    /// The receive used-ring entries since the last call: (id, len).
    fn rx_used(&mut self) -> Vec<(u16, u32)> {
        let idx: u16 = self.mem.read_obj(GuestAddress(RX.2 + 2)).unwrap();
        let mut out = Vec::new();
        while self.rx_used != idx {
            let e = RX.2 + 4 + u64::from(self.rx_used % SIZE) * 8;
            let id: u32 = self.mem.read_obj(GuestAddress(e)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(e + 4)).unwrap();
            out.push((id as u16, len));
            self.rx_used = self.rx_used.wrapping_add(1);
        }
        out
    }

    fn rx_buf(&self, id: u16) -> u64 {
        BUFS + u64::from(id) * 0x1_0000
    }

    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }
}

/// A frame with its header: the header zeroed but for a marker, then a pattern.
fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN];
    f[10] = 0xee; // num_buffers as the host left it: the device must overwrite it
    f.extend((0..len).map(|i| (i as u8).wrapping_mul(7) ^ seed));
    f
}

#[test]
fn a_transmitted_chain_reaches_the_tap_whole() {
    let mut r = Rig::new(true);
    let f = frame(1000, 3);
    r.mem.write_slice(&f, GuestAddress(0x20000)).unwrap();
    // Header and frame split over three descriptors, as drivers do.
    r.post(
        false,
        &[(0x20000, 12, 0), (0x2000c, 500, 0), (0x20200, 500, 0)],
    );
    let (used, full) = r.io.transmit().unwrap();
    assert!(used && !full);
    let mut got = vec![0u8; 2000];
    let n = r.host.read(&mut got).unwrap();
    assert_eq!(&got[..n], &f[..]);
    assert_eq!(r.metrics.tx_frames.load(Ordering::Relaxed), 1);
    assert_eq!(r.metrics.tx_bytes.load(Ordering::Relaxed), 1000);
}

#[test]
fn bad_transmit_chains_are_dropped_and_counted() {
    let mut r = Rig::new(true);
    r.post(false, &[(0x20000, 8, 0)]); // shorter than the header
    r.post(false, &[(0x20000, 64, WRITE)]); // device-writable
    r.post(false, &[(0xff_0000_0000, 64, 0)]); // outside guest memory
    r.post(false, &[(0x20000, 70_000, 0)]); // longer than any frame
    r.post(false, &[(0x20000, 60, 0)]); // fine
    r.io.transmit().unwrap();
    assert_eq!(r.metrics.tx_drops.load(Ordering::Relaxed), 2);
    assert_eq!(r.metrics.tx_errors.load(Ordering::Relaxed), 2);
    assert_eq!(r.metrics.tx_frames.load(Ordering::Relaxed), 1);
    let mut got = vec![0u8; 100];
    assert_eq!(r.host.read(&mut got).unwrap(), 60, "only the good frame");
}

#[test]
fn a_received_frame_lands_in_one_buffer_with_num_buffers_set() {
    // Without MRG_RXBUF as well: num_buffers is 1 in every header.
    for mrg in [false, true] {
        let mut r = Rig::new(mrg);
        r.post_rx(4, 2048);
        let f = frame(1500, 9);
        r.host.write_all(&f).unwrap();
        assert_eq!(r.io.receive().unwrap(), Rx::Delivered);
        let used = r.rx_used();
        assert_eq!(used, vec![(0, f.len() as u32)]);
        let mut want = f.clone();
        want[10..12].copy_from_slice(&1u16.to_le_bytes());
        assert_eq!(r.read(r.rx_buf(0), f.len()), want);
        assert_eq!(r.io.receive().unwrap(), Rx::TapEmpty);
    }
}

#[test]
fn without_mrg_a_frame_too_big_for_the_buffers_is_dropped_and_the_buffer_reused() {
    let mut r = Rig::new(false);
    r.post_rx(1, 2048);
    r.host.write_all(&frame(3000, 1)).unwrap();
    let small = frame(100, 2);
    r.host.write_all(&small).unwrap();
    assert_eq!(r.io.receive().unwrap(), Rx::Dropped);
    assert_eq!(r.metrics.rx_drops.load(Ordering::Relaxed), 1);
    assert_eq!(r.io.receive().unwrap(), Rx::Delivered);
    assert_eq!(r.rx_used(), vec![(0, small.len() as u32)]);
    assert_eq!(r.read(r.rx_buf(0) + 12, 100), small[12..]);
}

#[test]
fn with_mrg_a_big_frame_spans_buffers() {
    let mut r = Rig::new(true);
    r.post_rx(4, 2048);
    let f = frame(5000, 5);
    r.host.write_all(&f).unwrap();
    assert_eq!(r.io.receive().unwrap(), Rx::Delivered);
    let used = r.rx_used();
    assert_eq!(
        used,
        vec![(0, 2048), (1, 2048), (2, (f.len() - 4096) as u32)]
    );
    let mut got = Vec::new();
    for (id, len) in &used {
        got.extend(r.read(r.rx_buf(*id), *len as usize));
    }
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3);
    assert_eq!(got[12..], f[12..]);
    // The fourth buffer is still there for the next frame.
    let g = frame(10, 6);
    r.host.write_all(&g).unwrap();
    assert_eq!(r.io.receive().unwrap(), Rx::Delivered);
    assert_eq!(r.rx_used(), vec![(3, g.len() as u32)]);
}

#[test]
fn frames_wait_in_the_tap_until_buffers_come() {
    let mut r = Rig::new(true);
    r.host.write_all(&frame(200, 1)).unwrap();
    assert_eq!(r.io.receive().unwrap(), Rx::NoBuffers);
    assert_eq!(
        r.io.receive_batch().unwrap(),
        (false, false),
        "stop watching the TAP"
    );
    r.post_rx(1, 2048);
    assert_eq!(r.io.receive().unwrap(), Rx::Delivered);
    assert_eq!(r.read(r.rx_buf(0) + 12, 200), frame(200, 1)[12..]);
}

#[test]
fn with_mrg_a_frame_larger_than_what_is_posted_is_held_until_more_comes() {
    let mut r = Rig::new(true);
    r.post_rx(2, 2048);
    let f = frame(5000, 7);
    r.host.write_all(&f).unwrap();
    assert_eq!(r.io.receive().unwrap(), Rx::NoBuffers, "held, not dropped");
    assert!(r.rx_used().is_empty());
    r.post_rx(1, 2048);
    assert_eq!(r.io.receive().unwrap(), Rx::Delivered);
    let used = r.rx_used();
    assert_eq!(used.len(), 3);
    let mut got = Vec::new();
    for (id, len) in &used {
        got.extend(r.read(r.rx_buf(*id), *len as usize));
    }
    assert_eq!(got[12..], f[12..], "the held frame arrives intact");
    assert_eq!(r.metrics.rx_drops.load(Ordering::Relaxed), 0);
}

#[test]
fn a_malformed_receive_chain_is_returned_empty_and_the_next_used() {
    let mut r = Rig::new(true);
    r.post(true, &[(BUFS, 2048, 0)]); // read-only: not for receiving
    r.post_rx(1, 2048);
    r.host.write_all(&frame(64, 1)).unwrap();
    assert_eq!(r.io.receive().unwrap(), Rx::Delivered);
    let used = r.rx_used();
    assert_eq!(used, vec![(0, 0), (1, 76)]);
    assert_eq!(r.metrics.rx_errors.load(Ordering::Relaxed), 1);
}

/// Limiters whose buckets refill so slowly that no token comes back during a test.
/// `rx` limits received bytes, `tx` sent frames.
fn limiters(rx: Option<u64>, tx: Option<u64>) -> super::NetLimiters {
    use crate::rate_limiter::{RateLimiter, RateLimiterConfig, TokenBucketConfig};
    let make = |b: Option<u64>, ops: bool| {
        let bucket = b.map(|size| TokenBucketConfig {
            size,
            one_time_burst: None,
            refill_time: 1_000_000_000,
        });
        let config = if ops {
            RateLimiterConfig {
                bandwidth: None,
                ops: bucket,
            }
        } else {
            RateLimiterConfig {
                bandwidth: bucket,
                ops: None,
            }
        };
        Arc::new(std::sync::Mutex::new(RateLimiter::new(&config).unwrap()))
    };
    super::NetLimiters {
        rx: make(rx, false),
        tx: make(tx, true),
    }
}

#[test]
fn transmit_waits_for_its_limiter_with_the_frame_left_in_the_ring() {
    let mut r = Rig::new(true);
    // Two frames, then nothing until the (distant) refill.
    r.io.set_limiters(limiters(None, Some(2)));
    r.mem
        .write_slice(&frame(60, 1), GuestAddress(0x20000))
        .unwrap();
    for _ in 0..3 {
        r.post(false, &[(0x20000, (VNET_HDR_LEN + 60) as u32, 0)]);
    }
    let (used, full) = r.io.transmit().unwrap();
    assert!(used && !full);
    assert_eq!(r.metrics.tx_frames.load(Ordering::Relaxed), 2);
    assert_eq!(r.metrics.tx_throttled.load(Ordering::Relaxed), 1);
    // Still waiting: a kick does not send it either, and the chain stays available.
    let (used, _) = r.io.transmit().unwrap();
    assert!(!used);
    assert_eq!(r.metrics.tx_frames.load(Ordering::Relaxed), 2);
    assert_eq!(r.io.queue_states()[1].next_avail, 2);
}

#[test]
fn reception_stops_while_its_limiter_is_in_debt() {
    let mut r = Rig::new(true);
    // 1000 bytes: a 1500-byte frame goes (into debt), the next waits.
    r.io.set_limiters(limiters(Some(1000), None));
    r.post_rx(4, 2048);
    r.host.write_all(&frame(1500, 1)).unwrap();
    r.host.write_all(&frame(1500, 2)).unwrap();
    assert_eq!(r.io.receive().unwrap(), Rx::Delivered);
    assert_eq!(r.io.receive().unwrap(), Rx::Throttled);
    assert_eq!(r.metrics.rx_frames.load(Ordering::Relaxed), 1);
    assert_eq!(r.metrics.rx_throttled.load(Ordering::Relaxed), 1);
    // The batch stops and the TAP is not watched until the timer.
    assert_eq!(r.io.receive_batch().unwrap(), (false, false));
}
