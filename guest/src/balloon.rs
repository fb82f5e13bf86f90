//! A virtio-balloon driver and the test the host suite asks for with `vireo.balloontest=N`:
//!
//! * touch N MiB from 64 MiB up (one patterned byte per page) and report `@balloon ready`;
//! * with `vireo.balloonreport`, report the upper half of those pages free (free page
//!   reporting, 2 MiB blocks) and report `@balloon reported`;
//! * when the host starts a free page hinting run (if negotiated), hint the upper half of those
//!   pages, say STOP, wait for DONE, then write them anew and read back (`@balloon hinted`);
//! * then follow the host's target: inflate by giving the touched pages (from the bottom),
//!   checking that the pages kept still hold their bytes; deflate by taking pages back from
//!   the top, writing them anew and reading back what was written;
//! * keep a statistics buffer posted (if negotiated), refilled each time the host hands it
//!   back (`minor_faults` counts the refills);
//! * end (`@balloon done`) when the target returns to 0 after an inflation.

use crate::io::{peek, poke, puts};
use crate::ring::Queue;
use crate::{apic, field};
use core::sync::atomic::{fence, Ordering};

const QSIZE: u16 = 64;
const BASE: u64 = 0x300_0000;
const PFNS: u64 = BASE + 0x20000;
const STATS: u64 = BASE + 0x21000;
/// First page the test touches and gives away.
const TOUCH: u64 = 64 << 20;
const PAGE: u64 = 4096;
/// Page numbers per inflate or deflate chain (as Linux sends).
const PER_CHAIN: u32 = 256;

const F_STATS_VQ: u32 = 1 << 1;
const F_FREE_PAGE_HINT: u32 = 1 << 3;
const F_REPORTING: u32 = 1 << 5;

struct Balloon {
    base: u64,
    inflate: Queue,
    deflate: Queue,
    stats: Option<Queue>,
    hint: Option<Queue>,
    report: Option<Queue>,
    actual: u32,
    refills: u64,
}

fn pattern(page: u64, seed: u8) -> u8 {
    (page as u8) ^ seed
}

impl Balloon {
    fn init(base: u64, irq: u32, bsp: u8) -> Result<Balloon, &'static [u8]> {
        let reg = |o: u64| peek::<u32>(base + o);
        let set = |o: u64, v: u32| poke::<u32>(base + o, v);
        set(0x70, 0);
        set(0x70, 1);
        set(0x70, 3);
        set(0x14, 0);
        let lo = reg(0x10);
        set(0x14, 1);
        let hi = reg(0x10);
        if hi & 1 == 0 {
            return Err(b"no VERSION_1");
        }
        let accept = lo & (F_STATS_VQ | F_FREE_PAGE_HINT | F_REPORTING);
        set(0x24, 0);
        set(0x20, accept);
        set(0x24, 1);
        set(0x20, 1);
        set(0x70, 11);
        if reg(0x70) & 8 == 0 {
            return Err(b"FEATURES_OK refused");
        }
        // Queues are numbered without the ones whose feature was not negotiated.
        let mut n = 0;
        let mut next = || {
            let q = Queue::new(BASE + n * 0x4000, QSIZE);
            set(0x30, n as u32);
            set(0x38, u32::from(QSIZE));
            for (off, a) in [(0x80, q.desc), (0x90, q.avail), (0xa0, q.used)] {
                set(off, a as u32);
                set(off + 4, (a >> 32) as u32);
            }
            set(0x44, 1);
            n += 1;
            q
        };
        let inflate = next();
        let deflate = next();
        let stats = (accept & F_STATS_VQ != 0).then(&mut next);
        let hint = (accept & F_FREE_PAGE_HINT != 0).then(&mut next);
        let report = (accept & F_REPORTING != 0).then(&mut next);
        apic::route_irq(irq, apic::VIRTIO_VECTOR, bsp);
        set(0x70, 15);
        if reg(0x70) & 0x40 != 0 {
            return Err(b"device needs reset after DRIVER_OK");
        }
        Ok(Balloon {
            base,
            inflate,
            deflate,
            stats,
            hint,
            report,
            actual: 0,
            refills: 0,
        })
    }

    fn notify(&self, q: u32) {
        poke::<u32>(self.base + 0x50, q);
    }

    /// Writes this guest's statistics and posts the buffer on the statistics queue.
    fn post_stats(&mut self, touched_pages: u64) {
        let Some(q) = self.stats.as_mut() else {
            return;
        };
        let stats: [(u16, u64); 3] = [
            (3, self.refills),
            (4, (128 << 20) - touched_pages * PAGE),
            (5, 128 << 20),
        ];
        for (i, (tag, v)) in stats.iter().enumerate() {
            let at = STATS + i as u64 * 10;
            poke::<u16>(at, *tag);
            for b in 0..8 {
                poke::<u8>(at + 2 + b, (v >> (b * 8)) as u8);
            }
        }
        q.set_desc(0, STATS, 30, 0, 0);
        q.publish(0);
        self.refills += 1;
        self.notify(2);
    }

    /// Runs one chain on `q` (its queue index `index`) and waits for it to come back.
    fn run(&mut self, which: u8, addr: u64, len: u32, write: bool) -> bool {
        let base = self.base;
        let (q, index) = match which {
            0 => (&mut self.inflate, 0),
            1 => (&mut self.deflate, 1),
            3 => match self.hint.as_mut() {
                Some(h) => (h, 2 + u32::from(self.stats.is_some())),
                None => return false,
            },
            _ => match self.report.as_mut() {
                Some(r) => (
                    r,
                    2 + u32::from(self.stats.is_some()) + u32::from(self.hint.is_some()),
                ),
                None => return false,
            },
        };
        q.set_desc(0, addr, len, if write { 2 } else { 0 }, 0);
        q.publish(0);
        poke::<u32>(base + 0x50, index);
        let expiries = apic::timer_irqs();
        apic::start_watchdog(5_000);
        loop {
            if q.pop_used().is_some() {
                apic::stop_watchdog();
                return true;
            }
            if apic::timer_irqs() != expiries {
                return false;
            }
            q.arm();
            if q.used_idx() != q.used_seen {
                continue;
            }
            // SAFETY: wait for the device (or watchdog) interrupt.
            unsafe { core::arch::asm!("sti; hlt; cli", options(nomem, nostack)) };
            let isr = peek::<u32>(base + 0x60);
            poke::<u32>(base + 0x64, isr);
        }
    }

    /// Gives or takes back `count` pages from touched page `first` on queue `which`.
    fn pages(&mut self, which: u8, first: u64, count: u32) -> bool {
        let mut done = 0;
        while done < count {
            let n = (count - done).min(PER_CHAIN);
            for i in 0..n {
                let pfn = (TOUCH / PAGE) + first + u64::from(done + i);
                poke::<u32>(PFNS + u64::from(i) * 4, pfn as u32);
            }
            if !self.run(which, PFNS, n * 4, false) {
                return false;
            }
            done += n;
        }
        true
    }

    /// Sleeps until an interrupt or `ms`; hands a returned statistics buffer back refilled.
    fn idle(&mut self, ms: u32, touched_pages: u64) {
        let expiries = apic::timer_irqs();
        apic::start_watchdog(ms);
        if let Some(q) = self.stats.as_ref() {
            q.arm();
        }
        // SAFETY: wait for the device (or watchdog) interrupt.
        unsafe { core::arch::asm!("sti; hlt; cli", options(nomem, nostack)) };
        if apic::timer_irqs() == expiries {
            apic::stop_watchdog();
        }
        let isr = peek::<u32>(self.base + 0x60);
        poke::<u32>(self.base + 0x64, isr);
        if self.stats.as_mut().is_some_and(|q| q.pop_used().is_some()) {
            self.post_stats(touched_pages);
        }
    }
}

/// One free page hinting run: the run's ID, the upper half of the touched pages in 2 MiB
/// blocks, STOP; then, once the host says DONE, the pages are the guest's again: it writes them
/// and reads back what it wrote.
fn hint_run(b: &mut Balloon, base: u64, cmd: u32, mib: u64, pages: u64) {
    poke::<u32>(PFNS, cmd);
    let mut ok = b.run(3, PFNS, 4, false);
    let first = pages / 2 / 512 * 512;
    let mut at = TOUCH + first * PAGE;
    let mut hinted = 0;
    while at + (2 << 20) <= TOUCH + (mib << 20) {
        ok &= b.run(3, at, 2 << 20, true);
        at += 2 << 20;
        hinted += 2;
    }
    poke::<u32>(PFNS, 0);
    ok &= b.run(3, PFNS, 4, false);
    let mut waited = 0;
    while peek::<u32>(base + 0x108) != 1 && waited < 30 {
        b.idle(1000, pages);
        waited += 1;
    }
    let done = peek::<u32>(base + 0x108) == 1;
    for p in first..pages {
        poke::<u8>(TOUCH + p * PAGE, pattern(p, 0x33));
    }
    puts(b"@balloon hinted");
    field(b"run", u64::from(cmd), false);
    field(b"mib", hinted, false);
    field(b"ok", u64::from(ok), false);
    field(b"done", u64::from(done), false);
    field(b"rewritten", u64::from(check(first, pages, 0x33)), false);
    puts(b"\n");
}

fn parse(v: &[u8]) -> u64 {
    v.iter()
        .take_while(|c| c.is_ascii_digit())
        .fold(0u64, |n, c| n * 10 + u64::from(c - b'0'))
}

/// Whether touched pages [from, to) hold the bytes written with `seed`.
fn check(from: u64, to: u64, seed: u8) -> bool {
    (from..to).all(|p| peek::<u8>(TOUCH + p * PAGE) == pattern(p, seed))
}

pub fn test(info: &crate::boot::BootInfo, base: u64, irq: u32, bsp: u8) {
    let mib = info.option_value(b"vireo.balloontest").map_or(0, parse);
    let mut b = match Balloon::init(base, irq, bsp) {
        Ok(b) => b,
        Err(e) => {
            puts(b"@balloon error=");
            puts(e);
            puts(b"\n");
            return;
        }
    };
    let pages = mib * 256;
    for p in 0..pages {
        poke::<u8>(TOUCH + p * PAGE, pattern(p, 0));
    }
    b.post_stats(pages);
    puts(b"@balloon ready");
    field(b"touched_mib", mib, false);
    field(b"stats", u64::from(b.stats.is_some()), false);
    field(b"hinting", u64::from(b.hint.is_some()), false);
    field(b"reporting", u64::from(b.report.is_some()), false);
    puts(b"\n");
    if info.has_option(b"vireo.balloonreport") {
        // The upper half, in 2 MiB blocks (as Linux reports whole free blocks).
        let mut reported = 0;
        let mut at = TOUCH + ((mib / 2 / 2 * 2) << 20);
        let mut ok = true;
        while at + (2 << 20) <= TOUCH + (mib << 20) {
            ok &= b.run(2, at, 2 << 20, true);
            at += 2 << 20;
            reported += 2;
        }
        puts(b"@balloon reported");
        field(b"mib", reported, false);
        field(b"ok", u64::from(ok), false);
        puts(b"\n");
    }
    let mut inflated = false;
    let mut quiet = 0;
    let mut last_run = 1;
    loop {
        let cmd = peek::<u32>(base + 0x108);
        if b.hint.is_some() && cmd >= 2 && cmd != last_run {
            last_run = cmd;
            hint_run(&mut b, base, cmd, mib, pages);
            quiet = 0;
            continue;
        }
        let target = peek::<u32>(base + 0x100);
        let actual = b.actual;
        let want = (u64::from(target).min(pages) as u32).saturating_sub(actual);
        if want > 0 {
            let ok = b.pages(0, u64::from(actual), want);
            b.actual += if ok { want } else { 0 };
            poke::<u32>(base + 0x104, b.actual);
            fence(Ordering::SeqCst);
            inflated |= ok;
            puts(b"@balloon inflated");
            field(b"actual", u64::from(b.actual), false);
            field(b"ok", u64::from(ok), false);
            // The pages not given keep their bytes.
            field(
                b"kept_intact",
                u64::from(check(u64::from(b.actual), pages, 0)),
                false,
            );
            puts(b"\n");
            quiet = 0;
        } else if target < actual {
            let give_back = actual - target;
            let first = u64::from(target);
            let ok = b.pages(1, first, give_back);
            b.actual = target;
            poke::<u32>(base + 0x104, b.actual);
            let end = first + u64::from(give_back);
            for p in first..end {
                poke::<u8>(TOUCH + p * PAGE, pattern(p, 0x5a));
            }
            puts(b"@balloon deflated");
            field(b"actual", u64::from(b.actual), false);
            field(b"ok", u64::from(ok), false);
            field(b"rewritten", u64::from(check(first, end, 0x5a)), false);
            puts(b"\n");
            quiet = 0;
        } else if inflated && target == 0 {
            puts(b"@balloon done\n");
            return;
        } else {
            b.idle(1000, pages);
            quiet += 1;
            if quiet > 120 {
                puts(b"@balloon timeout\n");
                return;
            }
        }
    }
}
