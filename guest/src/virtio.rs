//! A small virtio-mmio (version 2) driver: finds devices the way Linux does (from
//! `virtio_mmio.device=<size>@<base>:<irq>` on the command line), negotiates features, sets up
//! one split virtqueue and runs descriptor chains, waiting for completions by interrupt.

use crate::apic;
use crate::io::{peek, poke};
use core::sync::atomic::{fence, Ordering};

/// Most devices the guest drives.
pub const MAX_DEVICES: usize = 8;
/// Entries in each queue the guest sets up.
pub const QUEUE_SIZE: u16 = 64;

/// Descriptor flags.
pub const F_NEXT: u16 = 1;
/// Device-writable buffer.
pub const F_WRITE: u16 = 2;
/// Buffer holds an indirect descriptor table.
pub const F_INDIRECT: u16 = 4;

const VERSION_1: u64 = 1 << 32;
const RING_INDIRECT_DESC: u64 = 1 << 28;
const RING_EVENT_IDX: u64 = 1 << 29;

/// A device window found on the command line.
#[derive(Clone, Copy)]
pub struct MmioDevice {
    /// MMIO base.
    pub base: u64,
    /// Interrupt line.
    pub irq: u32,
}

fn parse_num(s: &[u8]) -> Option<u64> {
    let (digits, radix) = match s {
        [b'0', b'x' | b'X', rest @ ..] => (rest, 16),
        _ => (s, 10),
    };
    if digits.is_empty() {
        return None;
    }
    let mut v: u64 = 0;
    for &c in digits {
        let d = (c as char).to_digit(radix)?;
        v = v.checked_mul(u64::from(radix))?.checked_add(u64::from(d))?;
    }
    Some(v)
}

/// Parses `<size>[K|M]@<base>:<irq>[:<id>]` as Linux's virtio_mmio does.
fn parse_device(spec: &[u8]) -> Option<MmioDevice> {
    let at = spec.iter().position(|&c| c == b'@')?;
    let rest = &spec[at + 1..];
    let colon = rest.iter().position(|&c| c == b':')?;
    let base = parse_num(&rest[..colon])?;
    let irq_part = &rest[colon + 1..];
    let irq_end = irq_part
        .iter()
        .position(|&c| c == b':')
        .unwrap_or(irq_part.len());
    let irq = parse_num(&irq_part[..irq_end])? as u32;
    Some(MmioDevice { base, irq })
}

/// All `virtio_mmio.device=` entries of a command line.
pub fn find_devices(cmdline: &[u8]) -> ([Option<MmioDevice>; MAX_DEVICES], usize) {
    let mut out = [None; MAX_DEVICES];
    let mut n = 0;
    for tok in cmdline.split(|&c| c == b' ') {
        if let Some(spec) = tok.strip_prefix(b"virtio_mmio.device=") {
            if let (Some(d), true) = (parse_device(spec), n < MAX_DEVICES) {
                out[n] = Some(d);
                n += 1;
            }
        }
    }
    (out, n)
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

/// One queue's rings: descriptors at +0, available ring at +1024, used ring at +2048.
#[repr(C, align(4096))]
struct Rings {
    bytes: [u8; 4096],
}

static mut RINGS: [Rings; MAX_DEVICES] = [const { Rings { bytes: [0; 4096] } }; MAX_DEVICES];

/// An initialised device with one queue.
pub struct Device {
    /// Where it is.
    pub mmio: MmioDevice,
    /// virtio device ID.
    pub device_id: u32,
    /// Features both sides agreed on.
    pub features: u64,
    rings: u64,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

/// A buffer in a chain: address, length, device-writable.
pub type Buf = (u64, u32, bool);

impl Device {
    fn reg(&self, off: u64) -> u32 {
        peek(self.mmio.base + off)
    }

    fn set_reg(&self, off: u64, v: u32) {
        poke(self.mmio.base + off, v)
    }

    /// Waits (up to `ms`) for a configuration-change interrupt and acknowledges it; returns
    /// whether one came.
    pub fn wait_config_change(&mut self, ms: u32) -> bool {
        let expiries = apic::timer_irqs();
        apic::start_watchdog(ms);
        loop {
            let isr = self.reg(0x060);
            if isr & 2 != 0 {
                self.set_reg(0x064, isr);
                apic::stop_watchdog();
                return true;
            }
            if apic::timer_irqs() != expiries {
                return false;
            }
            // SAFETY: wait for the device (or watchdog) interrupt.
            unsafe { core::arch::asm!("sti; hlt; cli", options(nomem, nostack)) };
        }
    }

    /// The ConfigGeneration register.
    pub fn config_generation(&self) -> u32 {
        self.reg(0x0fc)
    }

    /// Reads `N` bytes of config space.
    pub fn config_u32(&self, off: u64) -> u32 {
        peek(self.mmio.base + 0x100 + off)
    }

    /// Config space u64 as two 32-bit reads.
    pub fn config_u64(&self, off: u64) -> u64 {
        u64::from(self.config_u32(off)) | (u64::from(self.config_u32(off + 4)) << 32)
    }

    /// Probes and initialises the device in slot `slot`, accepting `wanted` of its features
    /// (plus VERSION_1, indirect descriptors and EVENT_IDX). Interrupts go to `vector` on APIC
    /// `dest`.
    pub fn init(
        slot: usize,
        mmio: MmioDevice,
        wanted: u64,
        vector: u8,
        dest: u8,
    ) -> Result<Device, &'static [u8]> {
        let mut d = Device {
            mmio,
            device_id: 0,
            features: 0,
            // SAFETY: each slot's rings are used by one device only, from the BSP only.
            rings: unsafe { core::ptr::addr_of!(RINGS[slot]) } as u64,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        };
        if d.reg(0x000) != 0x7472_6976 {
            return Err(b"bad magic");
        }
        if d.reg(0x004) != 2 {
            return Err(b"not a version 2 (modern) transport");
        }
        d.device_id = d.reg(0x008);
        if d.device_id == 0 {
            return Err(b"no device behind the window");
        }
        for i in 0..4096 {
            poke::<u8>(d.rings + i, 0);
        }
        d.set_reg(0x070, 0);
        d.set_reg(0x070, 1);
        d.set_reg(0x070, 1 | 2);
        d.set_reg(0x014, 0);
        let lo = u64::from(d.reg(0x010));
        d.set_reg(0x014, 1);
        let offered = lo | (u64::from(d.reg(0x010)) << 32);
        let accept = offered & (wanted | VERSION_1 | RING_INDIRECT_DESC | RING_EVENT_IDX);
        if accept & VERSION_1 == 0 {
            return Err(b"device does not offer VERSION_1");
        }
        d.features = accept;
        d.set_reg(0x024, 0);
        d.set_reg(0x020, accept as u32);
        d.set_reg(0x024, 1);
        d.set_reg(0x020, (accept >> 32) as u32);
        d.set_reg(0x070, 1 | 2 | 8);
        if d.reg(0x070) & 8 == 0 {
            return Err(b"FEATURES_OK refused");
        }
        d.set_reg(0x030, 0);
        let max = d.reg(0x034);
        if max < u32::from(QUEUE_SIZE) {
            return Err(b"queue too small");
        }
        d.set_reg(0x038, u32::from(QUEUE_SIZE));
        let (desc, avail, used) = (d.rings, d.rings + 1024, d.rings + 2048);
        d.set_reg(0x080, desc as u32);
        d.set_reg(0x084, (desc >> 32) as u32);
        d.set_reg(0x090, avail as u32);
        d.set_reg(0x094, (avail >> 32) as u32);
        d.set_reg(0x0a0, used as u32);
        d.set_reg(0x0a4, (used >> 32) as u32);
        d.set_reg(0x044, 1);
        apic::route_irq(mmio.irq, vector, dest);
        d.set_reg(0x070, 1 | 2 | 8 | 4);
        if d.reg(0x070) & 0x40 != 0 {
            return Err(b"device needs reset after DRIVER_OK");
        }
        Ok(d)
    }

    fn write_desc(table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        poke(
            table + u64::from(i) * 16,
            Desc {
                addr,
                len,
                flags,
                next,
            },
        );
    }

    /// Runs one chain of direct descriptors; returns the used length.
    pub fn run(&mut self, bufs: &[Buf]) -> Option<u32> {
        self.submit(bufs);
        self.wait(1)
    }

    /// Runs one chain through an indirect table at `table`.
    pub fn run_indirect(&mut self, table: u64, bufs: &[Buf]) -> Option<u32> {
        for (i, &(addr, len, w)) in bufs.iter().enumerate() {
            let last = i + 1 == bufs.len();
            let flags = if w { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
            Self::write_desc(table, i as u16, addr, len, flags, i as u16 + 1);
        }
        let head = self.next_desc;
        Self::write_desc(
            self.rings,
            head,
            table,
            bufs.len() as u32 * 16,
            F_INDIRECT,
            0,
        );
        self.next_desc = (head + 1) % QUEUE_SIZE;
        self.publish_and_wait(head)
    }

    fn publish_and_wait(&mut self, head: u16) -> Option<u32> {
        self.publish(head);
        self.wait(1)
    }

    fn publish(&mut self, head: u16) {
        let avail = self.rings + 1024;
        poke::<u16>(avail + 4 + u64::from(self.avail_idx % QUEUE_SIZE) * 2, head);
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        poke::<u16>(avail + 2, self.avail_idx);
        fence(Ordering::SeqCst);
    }

    fn notify(&self) {
        self.set_reg(0x050, 0);
    }

    /// Makes a chain available without waiting for it (see [`Device::wait`]).
    pub fn submit(&mut self, bufs: &[Buf]) {
        let head = self.next_desc;
        for (i, &(addr, len, w)) in bufs.iter().enumerate() {
            let idx = (head + i as u16) % QUEUE_SIZE;
            let last = i + 1 == bufs.len();
            let flags = if w { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
            Self::write_desc(self.rings, idx, addr, len, flags, (idx + 1) % QUEUE_SIZE);
        }
        self.next_desc = (head + bufs.len() as u16) % QUEUE_SIZE;
        self.publish(head);
    }

    /// Notifies the device and waits for `count` completions (by interrupt, with a 5 s
    /// watchdog); returns the used length of the last one.
    pub fn wait(&mut self, count: u16) -> Option<u32> {
        self.notify();
        let used = self.rings + 2048;
        let target = self.used_seen.wrapping_add(count);
        let expiries = apic::timer_irqs();
        apic::start_watchdog(5_000);
        loop {
            if peek::<u16>(used + 2) == target {
                break;
            }
            if apic::timer_irqs() != expiries {
                return None;
            }
            // Interrupt me when the last one completes.
            poke::<u16>(
                self.rings + 1024 + 4 + u64::from(QUEUE_SIZE) * 2,
                target.wrapping_sub(1),
            );
            fence(Ordering::SeqCst);
            if peek::<u16>(used + 2) == target {
                break;
            }
            // SAFETY: wait for the completion interrupt (or the watchdog).
            unsafe { core::arch::asm!("sti; hlt; cli", options(nomem, nostack)) };
        }
        apic::stop_watchdog();
        // A completion seen by polling still raised its interrupt: take it now rather than at
        // some later wait.
        // SAFETY: opens a one-instruction window for pending interrupts; the handlers only
        // count.
        unsafe { core::arch::asm!("sti; nop; cli", options(nomem, nostack)) };
        let isr = self.reg(0x060);
        self.set_reg(0x064, isr);
        let slot = u64::from(target.wrapping_sub(1) % QUEUE_SIZE);
        self.used_seen = target;
        Some(peek::<u32>(used + 4 + slot * 8 + 4))
    }
}
