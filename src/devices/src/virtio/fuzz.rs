//! Entry points for fuzzing the guest-facing parsers with arbitrary bytes: the virtio-blk
//! request path and the MMIO transport registers. Used by the in-tree randomized tests (which
//! CI runs) and by the cargo-fuzz targets in `fuzz/` (feature `fuzzing`); not part of a
//! production build.
//!
//! Both must hold for every input: no panic, no access outside the test guest memory (which
//! vm-memory guarantees by construction), and the device keeps serving afterwards.

use super::block::{Block, BlockConfig, Handler};
use super::mmio::MmioTransport;
use super::rng::Rng;
use super::worker::QueueHandler;
use super::{GuestMemoryMmap, Interrupt};
use crate::bus::BusDevice;
use std::sync::{Arc, Mutex, OnceLock};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

const MEM: usize = 1 << 20;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const DATA: u64 = 0x8000;
const QUEUE: u16 = 16;

/// The request handlers of two real block devices on one scratch image: read-write and
/// read-only, as the device thread runs them.
fn handlers() -> &'static [Mutex<Handler>; 2] {
    static HANDLERS: OnceLock<[Mutex<Handler>; 2]> = OnceLock::new();
    HANDLERS.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("vireo-fuzz-{}.img", std::process::id()));
        std::fs::File::create(&path)
            .and_then(|f| f.set_len(64 << 10))
            .expect("fuzz disk image");
        let device = |read_only| {
            let block = Block::new(BlockConfig {
                path: path.clone(),
                id: "f".repeat(20),
                read_only,
                rate_limiter: Default::default(),
                io_engine: Default::default(),
            })
            .expect("fuzz block device");
            Mutex::new(block.handler())
        };
        let handlers = [device(false), device(true)];
        let _ = std::fs::remove_file(&path);
        handlers
    })
}

/// Lays `data` out as a descriptor table (16 entries), avail ring and buffer contents, then
/// serves every chain the ring offers with the block device's own request handler, returning
/// each to the used ring as the device thread does.
pub fn block_request(data: &[u8]) {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).expect("fuzz memory");
    let table_len = (QUEUE as usize * 16).min(data.len());
    let _ = mem.write_slice(&data[..table_len], GuestAddress(DESC));
    let rest = &data[table_len..];
    let (ring, payload) = rest.split_at(rest.len().min(2 + 2 * QUEUE as usize));
    // avail.flags = 0, avail.idx from the input, then the ring entries.
    let _ = mem.write_slice(ring, GuestAddress(AVAIL + 2));
    let _ = mem.write_slice(payload, GuestAddress(DATA));
    let mut queue = Queue::new(QUEUE).expect("queue size");
    queue.set_ready(true);
    let _ = queue.try_set_desc_table_address(GuestAddress(DESC));
    let _ = queue.try_set_avail_ring_address(GuestAddress(AVAIL));
    let _ = queue.try_set_used_ring_address(GuestAddress(USED));
    let read_only = usize::from(data.first() == Some(&1));
    let mut handler = handlers()[read_only]
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    for _ in 0..QUEUE {
        let chain = match queue.iter(&mem) {
            Ok(mut it) => it.next(),
            Err(_) => return,
        };
        let Some(chain) = chain else { return };
        let head = chain.head_index();
        let len = match handler.handle(0, chain, &mem) {
            super::worker::Served::Used(len) => len,
            _ => return,
        };
        if queue.add_used(&mem, head, len).is_err() {
            return;
        }
    }
}

/// Lays `data` out as both virtio-net queues (descriptor tables, avail rings, buffer contents)
/// and a few frames waiting in the "TAP" (a datagram socket pair), then runs the device's own
/// transmit and receive paths over them.
pub fn net_chains(data: &[u8]) {
    use super::net::tap::{socket_pair, Tap};
    use super::net::{NetIo, NetMetrics};
    use std::io::{Read, Write};
    const RX: [u64; 3] = [0x1000, 0x2000, 0x3000];
    const TX: [u64; 3] = [0x4000, 0x5000, 0x6000];
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).expect("fuzz memory");
    let Some((&flags, data)) = data.split_first() else {
        return;
    };
    let mut rest = data;
    let mut take = |n: usize| {
        let (a, b) = rest.split_at(rest.len().min(n));
        rest = b;
        a
    };
    let queue = |ring: [u64; 3], table: &[u8], avail: &[u8]| {
        let _ = mem.write_slice(table, GuestAddress(ring[0]));
        let _ = mem.write_slice(avail, GuestAddress(ring[1] + 2));
        let mut q = Queue::new(QUEUE).expect("queue size");
        q.set_ready(true);
        let _ = q.try_set_desc_table_address(GuestAddress(ring[0]));
        let _ = q.try_set_avail_ring_address(GuestAddress(ring[1]));
        let _ = q.try_set_used_ring_address(GuestAddress(ring[2]));
        q
    };
    let rx = queue(RX, take(QUEUE as usize * 16), take(2 + 2 * QUEUE as usize));
    let tx = queue(TX, take(QUEUE as usize * 16), take(2 + 2 * QUEUE as usize));
    let _ = mem.write_slice(take(4096), GuestAddress(DATA));
    let Ok((dev, mut host)) = socket_pair() else {
        return;
    };
    // Frames from the host: lengths from the input, contents the input's remainder.
    for chunk in rest.chunks(97).take(4) {
        let len = usize::from(chunk[0]) * 300 % 70_000;
        let mut frame = chunk.repeat(len / chunk.len() + 1);
        frame.truncate(len);
        let _ = host.write_all(&frame);
    }
    let tap = Arc::new(Tap::from_file(dev, "fuzz", false));
    let mut io = NetIo::new(
        mem,
        rx,
        tx,
        tap,
        Arc::new(NetMetrics::default()),
        flags & 1 != 0,
    );
    let _ = io.transmit();
    let _ = io.receive_batch();
    let _ = io.receive_batch();
    let mut sink = vec![0u8; 70_000];
    while matches!(host.read(&mut sink), Ok(n) if n > 0) {}
}

/// Feeds `data`, cut into frames, to an MMDS endpoint (V2 on odd first bytes): ARP, IPv4 and
/// TCP parsing and the HTTP behind it.
pub fn mmds_frames(data: &[u8]) {
    use super::net::mmds::{Mmds, MmdsStack, Version};
    let mut store = Mmds::new(4096);
    let _ = store.put(serde_json::json!({"latest": {"meta-data": {"id": "i-1"}}}));
    if data.first().is_some_and(|b| b & 1 == 1) {
        store.configure(Version::V2, false);
    }
    let mut stack = MmdsStack::new([169, 254, 169, 254], Arc::new(Mutex::new(store)));
    let mut rest = data.get(1..).unwrap_or(&[]);
    while let Some((&len, tail)) = rest.split_first() {
        let (frame, next) = tail.split_at(tail.len().min(usize::from(len) * 2));
        let _ = stack.is_for_mmds(frame);
        stack.handle(frame);
        while stack.pop().is_some() {}
        rest = next;
    }
}

/// Feeds `data`, cut into packets (a 44-byte header and up to 255 bytes of payload each), to
/// a vsock host side with a listener on `PATH_6000`, pumping its packets for the guest after
/// each: the header parser and the connection state machine, credit included.
pub fn vsock_packets(data: &[u8]) {
    use super::vsock::packet::{Header, HDR_LEN};
    use super::vsock::{Muxer, VsockMetrics};
    static DIR: OnceLock<std::path::PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("vireo-fuzz-vsock-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&d);
        d
    });
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = dir.join(format!("v{n}.sock"));
    let Ok(listener) = std::os::unix::net::UnixListener::bind(&path) else {
        return;
    };
    let peer = std::os::unix::net::UnixListener::bind(format!("{}_6000", path.display()));
    let mut mux = Muxer::new(3, path.clone(), listener, Arc::new(VsockMetrics::default()));
    let mut rest = data;
    while rest.len() > HDR_LEN {
        let raw: [u8; HDR_LEN] = rest[..HDR_LEN].try_into().unwrap_or([0; HDR_LEN]);
        let mut h = Header::parse(&raw);
        // Mostly well-addressed packets, so that the state machine gets past the CID checks.
        if rest[HDR_LEN] & 1 == 0 {
            h.src_cid = 3;
            h.dst_cid = 2;
            h.kind = 1;
            h.dst_port = 6000 + u32::from(rest[HDR_LEN] & 2);
        }
        let len = usize::from(rest[HDR_LEN]).min(rest.len() - HDR_LEN - 1);
        let payload = &rest[HDR_LEN + 1..HDR_LEN + 1 + len];
        mux.from_guest(&h, payload);
        while mux.pop_control().is_some() {}
        mux.watch.clear();
        rest = &rest[HDR_LEN + 1 + len..];
    }
    drop(peer);
    let _ = std::fs::remove_file(format!("{}_6000", path.display()));
    let _ = std::fs::remove_file(&path);
}

/// Lays `data` out as the balloon's queues (a features byte, then per queue a 16-entry
/// descriptor table and its avail ring) and the buffers they point at (page-number arrays,
/// statistics, free ranges), and serves them with the balloon thread's own code: page numbers
/// are checked, pages in the scratch guest memory released, statistics parsed.
pub fn balloon_queues(data: &[u8]) {
    use super::balloon::feature;
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).expect("fuzz memory");
    let Some((&pick, mut rest)) = data.split_first() else {
        return;
    };
    let features = super::features::COMMON
        | if pick & 1 != 0 { feature::STATS_VQ } else { 0 }
        | if pick & 2 != 0 { feature::REPORTING } else { 0 }
        | if pick & 4 != 0 {
            feature::FREE_PAGE_HINT
        } else {
            0
        };
    let count = 2 + (pick & 7).count_ones() as usize;
    let ring_bytes = QUEUE as usize * 16 + 4 + 2 * QUEUE as usize;
    let mut queues = Vec::new();
    for q in 0..count {
        let desc = 0x1000 * (q as u64 + 1);
        let (ring, next) = rest.split_at(rest.len().min(ring_bytes));
        let _ = mem.write_slice(ring, GuestAddress(desc));
        rest = next;
        let mut queue = Queue::new(QUEUE).expect("queue");
        queue.set_size(QUEUE);
        queue.set_ready(true);
        queue.set_desc_table_address(Some(desc as u32), Some(0));
        queue.set_avail_ring_address(Some((desc + 0x100) as u32), Some(0));
        queue.set_used_ring_address(Some((desc + 0x200) as u32), Some(0));
        queues.push(queue);
    }
    let _ = mem.write_slice(rest, GuestAddress(DATA));
    super::balloon::fuzz_serve(&mem, queues, features);
}

/// Serves `data`, cut into 24-byte virtio-mem requests, against a block map whose requested
/// size is set from the first two bytes; the backend refuses every seventh call, as a host
/// that cannot map or release memory might.
pub fn mem_requests(data: &[u8]) {
    use super::mem::{Backend, BlockState, MemLayout, Request, REQUEST_SIZE};
    struct Flaky(u32);
    impl Backend for Flaky {
        fn plug(&mut self, _offset: u64, _len: u64) -> Result<(), String> {
            self.0 += 1;
            if self.0.is_multiple_of(7) {
                Err("refused".into())
            } else {
                Ok(())
            }
        }
        fn unplug(&mut self, offset: u64, len: u64) -> Result<(), String> {
            self.plug(offset, len)
        }
    }
    let Some((head, rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let layout = MemLayout {
        addr: 1 << 32,
        region_size: 256 << 20,
        block_size: 2 << 20,
        slot_size: 128 << 20,
    };
    let mut state = BlockState::new(layout);
    let _ = state.set_requested_size(u64::from(u16::from_le_bytes(*head) % 129) * (2 << 20));
    let mut backend = Flaky(0);
    for chunk in rest.chunks_exact(REQUEST_SIZE) {
        let mut raw = [0u8; REQUEST_SIZE];
        raw.copy_from_slice(chunk);
        // Addresses mostly inside the region, so that the block map is reached.
        let mut r = Request::parse(&raw);
        if raw[23] & 1 == 0 {
            r.addr = layout.addr + (r.addr % layout.region_size);
        }
        let _ = state.handle(&r, &mut backend);
        assert!(state.plugged_size() <= layout.region_size);
    }
    let _ = state.config_image();
}

/// Replays `data` as register accesses on an entropy device's MMIO window (7 bytes each:
/// kind, offset, value) interleaved with writes to guest memory where the rings live.
pub fn mmio_registers(data: &[u8]) {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).expect("fuzz memory");
    let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    let evt = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    let interrupt = Arc::new(Interrupt::new(irq));
    let mut t = MmioTransport::new(Box::new(Rng::new()), mem.clone(), interrupt, vec![evt]);
    for op in data.chunks(7) {
        let [kind, o1, o2, v @ ..] = op else { break };
        let offset = u64::from(u16::from_le_bytes([*o1, *o2]) & 0x1ff);
        let mut value = [0u8; 4];
        value[..v.len()].copy_from_slice(v);
        let width = [1usize, 2, 4, 8][(*kind as usize >> 1) & 3];
        match kind & 1 {
            0 => {
                let mut buf = vec![0u8; width];
                t.read(offset, &mut buf);
            }
            _ if kind & 0x80 != 0 => {
                // Scribble on the rings, as a hostile driver might at any time.
                let _ = mem.write_slice(&value, GuestAddress(DESC + offset * 8));
            }
            _ => {
                let bytes: Vec<u8> = value.iter().copied().cycle().take(width).collect();
                t.write(offset, &bytes);
            }
        }
    }
    // Reset stops any worker the input started.
    t.write(0x70, &0u32.to_le_bytes());
}

#[cfg(test)]
mod tests {
    /// xorshift64*: deterministic, so a failure names its seed.
    fn inputs(seed: u64, count: usize, max_len: usize) -> impl Iterator<Item = (u64, Vec<u8>)> {
        let mut x = seed;
        let mut next = move || {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            x.wrapping_mul(0x2545_f491_4f6c_dd1d)
        };
        (0..count).map(move |i| {
            let len = (next() as usize) % max_len;
            let v: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            (seed.wrapping_add(i as u64), v)
        })
    }

    fn iterations() -> usize {
        std::env::var("VIREO_FUZZ_ITERATIONS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(3000)
    }

    /// Every input kept in the repository for each device target runs without a panic.
    #[test]
    fn fuzz_corpora_replay() {
        type Entry = fn(&[u8]);
        let targets: [(&str, Entry); 7] = [
            ("block_request", super::block_request),
            ("net_chains", super::net_chains),
            ("mmds_frames", super::mmds_frames),
            ("vsock_packets", super::vsock_packets),
            ("balloon_queues", super::balloon_queues),
            ("mem_requests", super::mem_requests),
            ("mmio_registers", super::mmio_registers),
        ];
        for (target, run) in targets {
            for (name, data) in utils::fuzz_corpus(target) {
                let r = std::panic::catch_unwind(|| run(&data));
                assert!(r.is_ok(), "{target}: panic on corpus input {name}");
            }
        }
    }

    #[test]
    fn block_request_survives_random_input() {
        for (seed, data) in inputs(0x5eed_b10c, iterations(), 1024) {
            let r = std::panic::catch_unwind(|| super::block_request(&data));
            assert!(r.is_ok(), "panic on input #{seed}: {data:?}");
        }
    }

    #[test]
    fn block_request_survives_structured_chains() {
        // Random inputs rarely form valid chains; these start from a valid one and mutate it.
        let mut base = vec![0u8; 16 * 16];
        let descs: [(u64, u32, u16, u16); 3] =
            [(0x8000, 16, 1, 1), (0x9000, 512, 3, 2), (0x9800, 1, 2, 0)];
        for (i, (a, l, f, n)) in descs.iter().enumerate() {
            base[i * 16..i * 16 + 8].copy_from_slice(&a.to_le_bytes());
            base[i * 16 + 8..i * 16 + 12].copy_from_slice(&l.to_le_bytes());
            base[i * 16 + 12..i * 16 + 14].copy_from_slice(&f.to_le_bytes());
            base[i * 16 + 14..i * 16 + 16].copy_from_slice(&n.to_le_bytes());
        }
        base.extend_from_slice(&1u16.to_le_bytes()); // avail.idx
        base.extend_from_slice(&[0u8; 32]); // ring: head 0
        base.extend_from_slice(&0u32.to_le_bytes()); // header: IN
        base.extend_from_slice(&[0u8; 12]);
        for (seed, noise) in inputs(0xc4a1_5eed, iterations(), 64) {
            let mut data = base.clone();
            for pair in noise.chunks(2) {
                if let [pos, val] = pair {
                    let i = *pos as usize % data.len();
                    data[i] = *val;
                }
            }
            let r = std::panic::catch_unwind(|| super::block_request(&data));
            assert!(r.is_ok(), "panic on mutation #{seed}: {noise:?}");
        }
    }

    fn unhex(parts: &[&str]) -> Vec<u8> {
        let h: String = parts.concat();
        (0..h.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap())
            .collect()
    }

    /// Inputs cargo-fuzz found: a status descriptor whose address + length overflows.
    #[test]
    fn block_request_regressions() {
        let crashes = [
            unhex(&[
                "afaf0100ffffffffffffffff7a0c0c0c0c0c260c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c",
                "0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c03000000001000000000000c0c00000c0cafaf0100",
                "0000000000000000000000000000000000ffffffffffffffffffffff0c0c0c0c0c0c0c0c0c0c0c0c",
                "0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c000000000010",
                "00000000000c0000fc00000c0cafaf01000000000000000000000000000000000000ffffffffffff",
                "ffffffffff0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c",
                "0c0c0c0c0c0c0c0c0c0c0c00000000001000000000000c0c00000000fc0000ffffffffffffffff0c",
                "0c0c0c0c0c0c0c0c0c0c0c0cffffff0c",
            ]),
            unhex(&[
                "afaf01000000000052010000010007000000000000000000000000000000000000c9c9c900fff100",
                "000000000000000000000000000000000000017a0000000000000000000000000000000000000000",
                "000000000000000000000000000000000000000000000000000000000000000000ffffffffffffff",
                "f601070063fffffff6000001000000000000fffffff60000000000000000000000000c0c0c0c0c04",
                "0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c00000000fcff0000000000000000000000000000",
                "0500000000000000000000000000000000000000000000000000000000000001000000630000000c",
                "0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c4c0c000100070000000000000000003a000000000000000000",
                "000000000000000000000000000000000000000000000000c9c9c900fffe00000000000000000000",
                "000000000000000049",
            ]),
        ];
        for data in crashes {
            super::block_request(&data);
        }
    }

    #[test]
    fn net_chains_survive_random_input() {
        for (seed, data) in inputs(0x00e7_c4a1, iterations() / 3, 8192) {
            let r = std::panic::catch_unwind(|| super::net_chains(&data));
            assert!(r.is_ok(), "panic on input #{seed}: {data:?}");
        }
    }

    #[test]
    fn net_chains_survive_structured_chains() {
        // Valid rings to start from: RX chains of writable 2 KiB buffers, TX chains of a header
        // and a frame, with random bytes flipped.
        let mut base = vec![1u8];
        for q in 0..2u64 {
            let mut table = vec![0u8; 16 * 16];
            for i in 0..16u64 {
                let e = &mut table[i as usize * 16..i as usize * 16 + 16];
                e[..8].copy_from_slice(&(0x8000 + i * 0x800 + q * 0x10000).to_le_bytes());
                e[8..12].copy_from_slice(&(if q == 0 { 2048u32 } else { 74 }).to_le_bytes());
                e[12..14].copy_from_slice(&(if q == 0 { 2u16 } else { 0 }).to_le_bytes());
            }
            base.extend_from_slice(&table);
            base.extend_from_slice(&16u16.to_le_bytes());
            for i in 0..16u16 {
                base.extend_from_slice(&i.to_le_bytes());
            }
        }
        base.extend_from_slice(&[0x40u8; 4096]);
        base.extend_from_slice(&[5u8; 97 * 3]);
        for (seed, noise) in inputs(0x07e5_70e7, iterations() / 3, 48) {
            let mut data = base.clone();
            for pair in noise.chunks(2) {
                if let [pos, val] = pair {
                    let i = (*pos as usize * 37) % data.len();
                    data[i] = *val;
                }
            }
            let r = std::panic::catch_unwind(|| super::net_chains(&data));
            assert!(r.is_ok(), "panic on mutation #{seed}: {noise:?}");
        }
    }

    #[test]
    fn mmds_frames_survive_random_and_structured_input() {
        for (seed, data) in inputs(0x0d5_f00d, iterations() / 3, 512) {
            let r = std::panic::catch_unwind(|| super::mmds_frames(&data));
            assert!(r.is_ok(), "panic on input #{seed}: {data:?}");
        }
        // A valid SYN and request to mutate: Ethernet, IPv4, TCP to 169.254.169.254:80.
        let mut syn = vec![
            6, 1, 0x23, 0x45, 0x67, 1, 2, 0, 0, 0, 0, 2, 8, 0, 0x45, 0, 0, 40,
        ];
        syn.extend_from_slice(&[0, 1, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 2, 169, 254, 169, 254]);
        syn.extend_from_slice(&[
            0x0f, 0xa0, 0, 80, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 2, 0xff, 0xff,
        ]);
        syn.extend_from_slice(&[0, 0, 0, 0]);
        let mut get = syn.clone();
        get[47] = 0x18;
        get[41] = 2;
        let req = b"GET /latest/meta-data/id HTTP/1.1\r\nX-metadata-token: x\r\n\r\n";
        get.extend_from_slice(req);
        get[17] = (40 + req.len()) as u8;
        let mut base = vec![0u8, (syn.len() / 2) as u8];
        base.extend_from_slice(&syn);
        base.push(get.len().div_ceil(2) as u8);
        base.extend_from_slice(&get);
        for (seed, noise) in inputs(0x0d5_beef, iterations() / 3, 24) {
            let mut data = base.clone();
            for pair in noise.chunks(2) {
                if let [pos, val] = pair {
                    let i = *pos as usize % data.len();
                    data[i] = *val;
                }
            }
            let r = std::panic::catch_unwind(|| super::mmds_frames(&data));
            assert!(r.is_ok(), "panic on mutation #{seed}: {noise:?}");
        }
    }

    #[test]
    fn vsock_packets_survive_random_input() {
        for (seed, data) in inputs(0x0050_c4e7, iterations() / 10, 1024) {
            let r = std::panic::catch_unwind(|| super::vsock_packets(&data));
            assert!(r.is_ok(), "panic on input #{seed}: {data:?}");
        }
    }

    #[test]
    fn balloon_queues_survive_random_and_structured_input() {
        for (seed, data) in inputs(0x00ba_1100, iterations() / 3, 2048) {
            let r = std::panic::catch_unwind(|| super::balloon_queues(&data));
            assert!(r.is_ok(), "panic on input #{seed}: {data:?}");
        }
        // Valid chains on every queue, then mutated: an inflate chain of page numbers, a
        // deflate chain, a statistics buffer and a free range.
        let ring = 16 * 16 + 4 + 2 * 16;
        let mut base = vec![3u8];
        for (addr, len, flags) in [
            (0x8000u64, 64u32, 0u16),
            (0x8000, 16, 0),
            (0x8100, 30, 0),
            (0x0, 4096, 2),
        ] {
            let mut r = vec![0u8; ring];
            r[..8].copy_from_slice(&addr.to_le_bytes());
            r[8..12].copy_from_slice(&len.to_le_bytes());
            r[12..14].copy_from_slice(&flags.to_le_bytes());
            // avail: flags 0, idx 1, ring[0] = 0.
            r[256 + 2] = 1;
            base.extend_from_slice(&r);
        }
        let pfns: Vec<u8> = (0..16u32).flat_map(|p| (p * 3).to_le_bytes()).collect();
        base.extend_from_slice(&pfns);
        for (seed, noise) in inputs(0x00ba_1101, iterations() / 3, 24) {
            let mut data = base.clone();
            for pair in noise.chunks(2) {
                if let [pos, val] = pair {
                    let i = *pos as usize * 7 % data.len();
                    data[i] = *val;
                }
            }
            let r = std::panic::catch_unwind(|| super::balloon_queues(&data));
            assert!(r.is_ok(), "panic on input #{seed}: {data:?}");
        }
    }

    #[test]
    fn mem_requests_survive_random_input() {
        for (seed, data) in inputs(0x0000_3e3e, iterations(), 1024) {
            let r = std::panic::catch_unwind(|| super::mem_requests(&data));
            assert!(r.is_ok(), "panic on input #{seed}: {data:?}");
        }
    }

    #[test]
    fn mmio_registers_survive_random_input() {
        for (seed, data) in inputs(0x0dd_c0de, iterations() / 3, 512) {
            let r = std::panic::catch_unwind(|| super::mmio_registers(&data));
            assert!(r.is_ok(), "panic on input #{seed}: {data:?}");
        }
    }
}
