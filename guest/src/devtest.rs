//! Device tests the host suite asks for on the command line:
//! * always: `@virtio` lines for every `virtio_mmio.device=` window;
//! * `vireo.blktest`: on every virtio-blk device, GET_ID, a multi-descriptor write, flush,
//!   read-back, an indirect read, discard, write-zeroes and an out-of-range read;
//! * `vireo.rngtest`: 32 bytes from every entropy device;
//! * `vireo.nettest`: the network test on the first virtio-net device (see `net`);
//! * `vireo.vsocktest`: the vsock test (see `vsock`);
//! * `vireo.blkbench`: the block benchmark on the first virtio-blk device;
//! * `vireo.blkwatch`: wait for the host to replace the first drive's image and report the new
//!   capacity;
//! * `vireo.chaos=N`: N random register accesses on every device, then a check that the first
//!   block device still works.

use crate::boot::BootInfo;
use crate::io::{peek, poke, puts};
use crate::virtio::{self, Buf, Device};
use crate::{apic, field};

const ID_BLOCK: u32 = 2;
const ID_RNG: u32 = 4;
const ID_NET: u32 = 1;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;
const F_RO: u64 = 1 << 5;
const F_DISCARD: u64 = 1 << 13;
const F_WRITE_ZEROES: u64 = 1 << 14;
const BLK_WANTED: u64 =
    (1 << 1) | (1 << 2) | F_RO | (1 << 6) | (1 << 9) | F_DISCARD | F_WRITE_ZEROES;

/// Bytes the block test writes and reads back.
pub const TEST_BYTES: usize = 16384;
/// Sector the block test writes at.
pub const TEST_SECTOR: u64 = 8;

#[repr(C, align(4096))]
struct Buffers {
    a: [u8; TEST_BYTES],
    b: [u8; TEST_BYTES],
    header: [u8; 16],
    status: [u8; 16],
    range: [u8; 16],
    table: [u8; 256],
}

static mut BUFS: Buffers = Buffers {
    a: [0; TEST_BYTES],
    b: [0; TEST_BYTES],
    header: [0; 16],
    status: [0; 16],
    range: [0; 16],
    table: [0; 256],
};

fn addr_of_bufs() -> (u64, u64, u64, u64, u64, u64) {
    // SAFETY: only addresses are taken; the BSP is the only user.
    unsafe {
        (
            core::ptr::addr_of!(BUFS.a) as u64,
            core::ptr::addr_of!(BUFS.b) as u64,
            core::ptr::addr_of!(BUFS.header) as u64,
            core::ptr::addr_of!(BUFS.status) as u64,
            core::ptr::addr_of!(BUFS.range) as u64,
            core::ptr::addr_of!(BUFS.table) as u64,
        )
    }
}

/// The byte the test writes at offset `i` for drive `seed` (the host test computes the same).
pub fn pattern(i: usize, seed: u8) -> u8 {
    ((i.wrapping_mul(31)) ^ (i >> 7)) as u8 ^ seed.wrapping_mul(0x5b)
}

fn header(hdr: u64, status: u64, kind: u32, sector: u64) {
    poke(hdr, kind);
    poke(hdr + 4, 0u32);
    poke(hdr + 8, sector);
    poke::<u8>(status, 0xaa);
}

fn line(dev: usize, what: &[u8]) {
    puts(b"@blk");
    field(b"dev", dev as u64, false);
    puts(b" ");
    puts(what);
}

/// Initialises device `slot`, or reports `@<tag> dev=<slot> error=...` and gives up.
fn init_or_report(
    tag: &[u8],
    slot: usize,
    mmio: virtio::MmioDevice,
    wanted: u64,
    bsp: u8,
) -> Option<Device> {
    match Device::init(slot, mmio, wanted, apic::VIRTIO_VECTOR, bsp) {
        Ok(d) => Some(d),
        Err(e) => {
            puts(tag);
            field(b"dev", slot as u64, false);
            puts(b" error=");
            puts(e);
            puts(b"\n");
            None
        }
    }
}

fn status_field(ok: Option<u32>, status: u64) {
    match ok {
        Some(len) => {
            field(b"status", u64::from(peek::<u8>(status)), false);
            field(b"used", u64::from(len), false);
        }
        None => puts(b" status=timeout"),
    }
}

fn blk_test(slot: usize, mmio: virtio::MmioDevice, bsp: u8) {
    let Some(mut d) = init_or_report(b"@blk", slot, mmio, BLK_WANTED, bsp) else {
        return;
    };
    let (a, b, hdr, st, range, table) = addr_of_bufs();
    let seed = slot as u8 + 1;
    let capacity = d.config_u64(0);
    line(slot, b"config");
    field(b"capacity", capacity, false);
    field(b"size_max", u64::from(d.config_u32(8)), false);
    field(b"seg_max", u64::from(d.config_u32(12)), false);
    field(b"blk_size", u64::from(d.config_u32(20)), false);
    field(b"ro", u64::from(d.features & F_RO != 0), false);
    field(b"features", d.features, true);
    puts(b"\n");

    // GET_ID into the first 20 bytes of b.
    for i in 0..20 {
        poke::<u8>(b + i, 0);
    }
    header(hdr, st, T_GET_ID, 0);
    let r = d.run(&[(hdr, 16, false), (b, 20, true), (st, 1, true)]);
    line(slot, b"id");
    status_field(r, st);
    puts(b" id=");
    let mut n = 0;
    while n < 20 && peek::<u8>(b + n) != 0 {
        n += 1;
    }
    // SAFETY: `n` bytes of b were just written by the device.
    puts(unsafe { core::slice::from_raw_parts(b as *const u8, n as usize) });
    puts(b"\n");

    // Write TEST_BYTES at TEST_SECTOR in eight descriptors.
    for i in 0..TEST_BYTES {
        poke::<u8>(a + i as u64, pattern(i, seed));
    }
    header(hdr, st, T_OUT, TEST_SECTOR);
    let chunk = (TEST_BYTES / 8) as u64;
    let mut bufs: [Buf; 10] = [(0, 0, false); 10];
    bufs[0] = (hdr, 16, false);
    for i in 0..8u64 {
        bufs[1 + i as usize] = (a + i * chunk, chunk as u32, false);
    }
    bufs[9] = (st, 1, true);
    let r = d.run(&bufs);
    line(slot, b"write");
    status_field(r, st);
    puts(b"\n");

    header(hdr, st, T_FLUSH, 0);
    let r = d.run(&[(hdr, 16, false), (st, 1, true)]);
    line(slot, b"flush");
    status_field(r, st);
    puts(b"\n");

    // Read it back in four descriptors.
    for i in 0..TEST_BYTES as u64 {
        poke::<u8>(b + i, 0);
    }
    header(hdr, st, T_IN, TEST_SECTOR);
    let q = (TEST_BYTES / 4) as u64;
    let r = d.run(&[
        (hdr, 16, false),
        (b, q as u32, true),
        (b + q, q as u32, true),
        (b + 2 * q, q as u32, true),
        (b + 3 * q, q as u32, true),
        (st, 1, true),
    ]);
    let same = (0..TEST_BYTES as u64).all(|i| peek::<u8>(a + i) == peek::<u8>(b + i));
    line(slot, b"read");
    status_field(r, st);
    field(b"match", u64::from(same), false);
    puts(b"\n");

    // An indirect read of the first 4 KiB.
    for i in 0..4096 {
        poke::<u8>(b + i, 0);
    }
    header(hdr, st, T_IN, TEST_SECTOR);
    let r = d.run_indirect(table, &[(hdr, 16, false), (b, 4096, true), (st, 1, true)]);
    let same = (0..4096).all(|i| peek::<u8>(a + i) == peek::<u8>(b + i));
    line(slot, b"indirect");
    status_field(r, st);
    field(b"match", u64::from(same), false);
    puts(b"\n");

    for (feature, kind, sector, count, name) in [
        (F_DISCARD, T_DISCARD, 2048u64, 2048u32, &b"discard"[..]),
        (F_WRITE_ZEROES, T_WRITE_ZEROES, 64, 8, &b"zeroes"[..]),
    ] {
        if d.features & feature == 0 {
            continue;
        }
        poke(range, sector);
        poke(range + 8, count);
        poke(range + 12, 0u32);
        header(hdr, st, kind, 0);
        let r = d.run(&[(hdr, 16, false), (range, 16, false), (st, 1, true)]);
        line(slot, name);
        status_field(r, st);
        puts(b"\n");
    }

    header(hdr, st, T_IN, capacity);
    let r = d.run(&[(hdr, 16, false), (b, 512, true), (st, 1, true)]);
    line(slot, b"oob");
    status_field(r, st);
    field(b"irqs", u64::from(apic::virtio_irqs()), false);
    puts(b"\n");
}

fn rng_test(slot: usize, mmio: virtio::MmioDevice, bsp: u8) {
    let Some(mut d) = init_or_report(b"@rng", slot, mmio, 0, bsp) else {
        return;
    };
    let (a, ..) = addr_of_bufs();
    for i in 0..32 {
        poke::<u8>(a + i, 0);
    }
    let r = d.run(&[(a, 32, true)]);
    puts(b"@rng");
    field(b"dev", slot as u64, false);
    field(b"used", u64::from(r.unwrap_or(0)), false);
    puts(b" bytes=");
    for i in 0..32 {
        let v = peek::<u8>(a + i);
        let hex = |n: u8| if n < 10 { b'0' + n } else { b'a' + n - 10 };
        crate::io::putc(hex(v >> 4));
        crate::io::putc(hex(v & 0xf));
    }
    puts(b"\n");
}

/// Reports capacity and config generation, waits for the host to change the drive's image
/// (a configuration-change interrupt), and reports them again.
fn blk_watch(slot: usize, mmio: virtio::MmioDevice, bsp: u8) {
    let Some(mut d) = init_or_report(b"@blk", slot, mmio, 0, bsp) else {
        return;
    };
    line(slot, b"watch");
    field(b"capacity", d.config_u64(0), false);
    field(b"generation", u64::from(d.config_generation()), false);
    puts(b"\n");
    let changed = d.wait_config_change(20_000);
    line(slot, if changed { b"resized" } else { b"unchanged" });
    field(b"capacity", d.config_u64(0), false);
    field(b"generation", u64::from(d.config_generation()), false);
    puts(b"\n");
}

const MIB: u64 = 1 << 20;
/// Most bytes each sequential benchmark phase moves.
const BENCH_BYTES: u64 = 1 << 30;
const RANDOM_READS: u32 = 20_000;
const QUEUE_DEPTH: usize = 8;

/// The benchmark's buffers live at a fixed address rather than in the image, so the image stays
/// small enough for tiny test guests; the benchmark runs with at least 32 MiB of RAM.
const BENCH_BASE: u64 = 0x100_0000;

fn phase(name: &[u8], end: Option<(u64, u64, u64)>) {
    puts(b"@bench phase=");
    puts(name);
    match end {
        None => puts(b" start\n"),
        Some((requests, bytes, errors)) => {
            puts(b" end");
            field(b"requests", requests, false);
            field(b"bytes", bytes, false);
            field(b"errors", errors, false);
            puts(b"\n");
        }
    }
}

/// Throughput and IOPS of a block device, driven from the guest with the data never touched by
/// the guest CPU: 1 MiB sequential reads and writes at queue depth 1 and then 8, then 4 KiB
/// random reads at queue depth 8. The host times the phases from the `@bench` lines.
fn blk_bench(slot: usize, mmio: virtio::MmioDevice, bsp: u8) {
    let Some(mut d) = init_or_report(b"@bench", slot, mmio, 0, bsp) else {
        return;
    };
    let big = BENCH_BASE;
    let small = big + MIB;
    let headers = small + 4096 * QUEUE_DEPTH as u64;
    let status = headers + 16 * QUEUE_DEPTH as u64;
    let bytes = (d.config_u64(0) * 512).min(BENCH_BYTES) / MIB * MIB;
    for (name, kind, write) in [
        (&b"seqread"[..], T_IN, true),
        (&b"seqwrite"[..], T_OUT, false),
    ] {
        phase(name, None);
        let mut errors = 0;
        for i in 0..bytes / MIB {
            header(headers, status, kind, i * (MIB / 512));
            let r = d.run(&[
                (headers, 16, false),
                (big, MIB as u32, write),
                (status, 1, true),
            ]);
            if r.is_none() || peek::<u8>(status) != 0 {
                errors += 1;
            }
        }
        phase(name, Some((bytes / MIB, bytes, errors)));
    }
    // The same at queue depth 8, as a guest with readahead or writeback keeps its disk busy:
    // eight 1 MiB requests made available together, then waited for together.
    let deep = BENCH_BASE + 2 * MIB;
    for (name, kind, write) in [
        (&b"seqread8"[..], T_IN, true),
        (&b"seqwrite8"[..], T_OUT, false),
    ] {
        phase(name, None);
        let mut errors = 0;
        let mut i = 0;
        while i < bytes / MIB {
            let batch = (bytes / MIB - i).min(QUEUE_DEPTH as u64);
            for q in 0..batch {
                header(headers + q * 16, status + q, kind, (i + q) * (MIB / 512));
                d.submit(&[
                    (headers + q * 16, 16, false),
                    (deep + q * MIB, MIB as u32, write),
                    (status + q, 1, true),
                ]);
            }
            if d.wait(batch as u16).is_none() {
                errors += 1;
            }
            for q in 0..batch {
                if peek::<u8>(status + q) != 0 {
                    errors += 1;
                }
            }
            i += batch;
        }
        phase(name, Some((bytes / MIB, bytes, errors)));
    }
    let sectors = bytes / 512;
    let mut x: u64 = 0x2545_f491;
    let mut errors = 0;
    phase(b"randread", None);
    let mut done = 0;
    while done < RANDOM_READS {
        for q in 0..QUEUE_DEPTH as u64 {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let sector = ((x >> 33) % (sectors / 8)) * 8;
            header(headers + q * 16, status + q, T_IN, sector);
            d.submit(&[
                (headers + q * 16, 16, false),
                (small + q * 4096, 4096, true),
                (status + q, 1, true),
            ]);
        }
        if d.wait(QUEUE_DEPTH as u16).is_none() {
            errors += 1;
        }
        for q in 0..QUEUE_DEPTH as u64 {
            if peek::<u8>(status + q) != 0 {
                errors += 1;
            }
        }
        done += QUEUE_DEPTH as u32;
    }
    phase(
        b"randread",
        Some((u64::from(done), u64::from(done) * 4096, errors)),
    );
}

/// A hostile driver: `count` pseudo-random register accesses (random widths, offsets and
/// values, reads and writes) on every virtio window and on the legacy ports that neither end
/// the VM nor carry the report (so not 0x64, 0x3f8-0x3ff, 0x501, 0x600-0x602). Ring addresses
/// are kept inside a scratch area so a device that goes live writes only there. Afterwards the
/// first block device must still work after a reset.
fn chaos(devs: &[Option<virtio::MmioDevice>], count: u32, bsp: u8) {
    const SCRATCH: u64 = 0x80_0000;
    let mut x: u64 = 0x1234_5678_9abc_def1 ^ u64::from(count).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..count {
        let r = next();
        let value = next() as u32;
        if r % 4 == 0 {
            let port = 0x60 + (next() % 0x3a0) as u16;
            if port == 0x64 || (0x3f8..=0x3ff).contains(&port) {
                continue;
            }
            if r & 0x10 != 0 {
                crate::io::outb(port, value as u8);
            } else {
                crate::io::inb(port);
            }
            continue;
        }
        let Some(Some(dev)) = devs.get((next() % devs.len().max(1) as u64) as usize) else {
            continue;
        };
        let offset = next() % 0x180;
        let value = if (0x80..0xa8).contains(&offset) {
            // Queue addresses: somewhere in the scratch area.
            if offset % 8 == 0 {
                (SCRATCH + (u64::from(value) % 0x8000)) as u32 & !0xf
            } else {
                0
            }
        } else {
            value
        };
        let addr = dev.base + offset;
        match (r >> 8) % 6 {
            0 => poke::<u8>(addr, value as u8),
            1 => poke::<u16>(addr & !1, value as u16),
            2 | 3 => poke::<u32>(addr & !3, value),
            4 => {
                let _ = peek::<u32>(addr & !3);
            }
            _ => {
                let _ = peek::<u8>(addr);
            }
        }
    }
    puts(b"@chaos accesses=");
    crate::io::put_dec(u64::from(count));
    puts(b"\n");
    // The first block device, reset and set up again, still serves requests.
    let (a, _, hdr, st, _, _) = addr_of_bufs();
    for (i, dev) in devs.iter().enumerate() {
        let Some(dev) = dev else { continue };
        if peek::<u32>(dev.base + 8) != ID_BLOCK {
            continue;
        }
        match Device::init(i, *dev, 0, apic::VIRTIO_VECTOR, bsp) {
            Ok(mut d) => {
                header(hdr, st, T_GET_ID, 0);
                let r = d.run(&[(hdr, 16, false), (a, 20, true), (st, 1, true)]);
                line(i, b"after-chaos");
                status_field(r, st);
                puts(b"\n");
            }
            Err(e) => {
                line(i, b"after-chaos error=");
                puts(e);
                puts(b"\n");
            }
        }
        break;
    }
}

/// Lists the virtio windows and runs the tests the command line asks for.
pub fn run(info: &BootInfo, cmdline: &[u8], bsp: u8) {
    let (devs, n) = virtio::find_devices(cmdline);
    if let Some(count) = info.option_value(b"vireo.chaos") {
        let count = count.iter().fold(0u32, |v, &c| {
            v.saturating_mul(10)
                .saturating_add(u32::from(c.wrapping_sub(b'0')).min(9))
        });
        chaos(&devs[..n], count, bsp);
        return;
    }
    for (i, dev) in devs[..n].iter().enumerate() {
        let Some(dev) = dev else { continue };
        puts(b"@virtio");
        field(b"index", i as u64, false);
        field(b"base", dev.base, true);
        field(b"irq", u64::from(dev.irq), false);
        field(b"magic", u64::from(peek::<u32>(dev.base)), true);
        field(b"version", u64::from(peek::<u32>(dev.base + 4)), false);
        field(b"device_id", u64::from(peek::<u32>(dev.base + 8)), false);
        puts(b"\n");
        let id = peek::<u32>(dev.base + 8);
        if id == ID_BLOCK && info.has_option(b"vireo.blkwatch") {
            blk_watch(i, *dev, bsp);
            return;
        } else if id == ID_BLOCK && info.has_option(b"vireo.blkbench") {
            blk_bench(i, *dev, bsp);
            return;
        } else if id == ID_BLOCK && info.has_option(b"vireo.blktest") {
            blk_test(i, *dev, bsp);
        } else if id == ID_RNG && info.has_option(b"vireo.rngtest") {
            rng_test(i, *dev, bsp);
        } else if id == 24 && info.has_option(b"vireo.memtest") {
            crate::mem::test(i, *dev, bsp);
            return;
        } else if id == 5 && info.has_option(b"vireo.balloontest") {
            crate::balloon::test(info, dev.base, dev.irq, bsp);
            return;
        } else if id == 19 && info.has_option(b"vireo.vsocktest") {
            crate::vsock::test(info, dev.base, dev.irq, bsp);
            return;
        } else if id == ID_NET && info.has_option(b"vireo.nettest") {
            crate::net::test(info, i, dev.base, dev.irq, bsp);
            return;
        }
    }
}
