//! `vireo.count=N`: the snapshot tests' workload. Counts expiries of the local APIC timer
//! (one-shot, re-armed every `vireo.tickms` milliseconds, 20 by default) and prints
//! `@tick n=K` for each, N ticks in all (0: forever). The count lives in guest memory, so a
//! restored guest goes on from the snapshot's value. When the DSDT has a VM generation ID,
//! each tick line also shows its first 8 bytes (`genid=`), which change on every restore, and
//! the Generic Event Device's interrupt (which announces a new ID) wakes the guest at once to
//! print `@genid irqs=N genid=..` before the next tick.
//!
//! With `vireo.blktick` and a virtio-blk device, it first writes a 512-byte pattern at sector
//! 8 (`@ticker wrote status=..`), and at every tick writes the tick number at sector
//! 64 + K % 8 and reads sector 8 back: the tick line gains `blk=ok` when both requests
//! completed exactly once (one used entry each, no more) and the data read back matched.

use crate::io::{peek, poke, puts};
use crate::virtio::{self, Device};
use crate::{apic, field};

const ID_BLOCK: u32 = 2;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const PATTERN_SECTOR: u64 = 8;
const TICK_SECTOR_BASE: u64 = 64;

#[repr(C, align(4096))]
struct Bufs {
    hdr: [u8; 16],
    st: [u8; 16],
    data: [u8; 512],
    back: [u8; 512],
}

static mut BUFS: Bufs = Bufs {
    hdr: [0; 16],
    st: [0; 16],
    data: [0; 512],
    back: [0; 512],
};

/// Ticks counted so far (in guest memory, so snapshots carry it).
static mut TICKS: u64 = 0;

fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(7) ^ 0xa5) as u8
}

fn addrs() -> (u64, u64, u64, u64) {
    // SAFETY: only addresses are taken; the BSP is the only user.
    unsafe {
        (
            core::ptr::addr_of!(BUFS.hdr) as u64,
            core::ptr::addr_of!(BUFS.st) as u64,
            core::ptr::addr_of!(BUFS.data) as u64,
            core::ptr::addr_of!(BUFS.back) as u64,
        )
    }
}

fn request(d: &mut Device, kind: u32, sector: u64, buf: u64) -> bool {
    let (hdr, st, _, _) = addrs();
    poke(hdr, kind);
    poke(hdr + 4, 0u32);
    poke(hdr + 8, sector);
    poke::<u8>(st, 0xff);
    let r = d.run(&[(hdr, 16, false), (buf, 512, kind == T_IN), (st, 1, true)]);
    r.is_some() && peek::<u8>(st) == 0
}

fn parse(v: &[u8]) -> u64 {
    v.iter().fold(0u64, |n, &c| {
        n.saturating_mul(10)
            .saturating_add(u64::from(c.wrapping_sub(b'0')).min(9))
    })
}

/// Runs the counter the command line asks for.
pub fn run(
    info: &crate::boot::BootInfo,
    cmdline: &[u8],
    bsp: u8,
    vmgenid: u64,
    ged_irq: Option<u32>,
) {
    let Some(limit) = info.option_value(b"vireo.count") else {
        return;
    };
    let limit = parse(limit);
    let ms = info.option_value(b"vireo.tickms").map_or(20, parse).max(1) as u32;
    let mut blk = None;
    if info.has_option(b"vireo.blktick") {
        let (devs, n) = virtio::find_devices(cmdline);
        for (i, dev) in devs[..n].iter().enumerate() {
            let Some(dev) = dev else { continue };
            if peek::<u32>(dev.base + 8) == ID_BLOCK {
                match Device::init(i, *dev, 0, apic::VIRTIO_VECTOR, bsp) {
                    Ok(d) => blk = Some(d),
                    Err(e) => {
                        puts(b"@ticker error=");
                        puts(e);
                        puts(b"\n");
                    }
                }
                break;
            }
        }
        if let Some(d) = blk.as_mut() {
            let (_, st, data, _) = addrs();
            for i in 0..512 {
                poke::<u8>(data + i, pattern(i));
            }
            let ok = request(d, T_OUT, PATTERN_SECTOR, data);
            puts(b"@ticker wrote");
            field(b"status", u64::from(peek::<u8>(st)), false);
            field(b"ok", u64::from(ok), false);
            puts(b"\n");
        }
    }
    if let Some(pin) = ged_irq {
        apic::route_irq(pin, apic::GED_VECTOR, bsp);
    }
    let mut ged_seen = apic::ged_irqs();
    puts(b"@ticker start\n");
    loop {
        // SAFETY: only the BSP touches the counter.
        let n = unsafe { TICKS };
        if limit != 0 && n >= limit {
            break;
        }
        let before = apic::timer_irqs();
        apic::start_watchdog(ms);
        loop {
            let ged = apic::ged_irqs();
            if ged != ged_seen {
                ged_seen = ged;
                puts(b"@genid");
                field(b"irqs", u64::from(ged), false);
                field(b"genid", peek::<u64>(vmgenid), true);
                puts(b"\n");
            }
            if apic::timer_irqs() != before {
                break;
            }
            // SAFETY: wait for the timer or the GED (handlers only count).
            unsafe { core::arch::asm!("sti; hlt; cli", options(nomem, nostack)) };
        }
        // SAFETY: as above.
        let n = unsafe {
            TICKS += 1;
            TICKS
        };
        puts(b"@tick");
        field(b"n", n, false);
        if vmgenid != 0 {
            field(b"genid", peek::<u64>(vmgenid), true);
        }
        if let Some(d) = blk.as_mut() {
            let (_, _, data, back) = addrs();
            poke(data, n);
            let wrote = request(d, T_OUT, TICK_SECTOR_BASE + n % 8, data);
            for i in 0..512 {
                poke::<u8>(back + i, 0);
            }
            let read = request(d, T_IN, PATTERN_SECTOR, back);
            let same = (0..512).all(|i| peek::<u8>(back + i) == pattern(i));
            puts(if wrote && read && same {
                b" blk=ok" as &[u8]
            } else {
                b" blk=bad"
            });
        }
        puts(b"\n");
    }
    puts(b"@ticker done\n");
}
