//! A minimal virtio driver for unit tests: programs an [`MmioTransport`] through its registers,
//! lays out a split virtqueue in test guest memory and submits descriptor chains, as a guest
//! driver would.

use super::mmio::MmioTransport;
use super::{status, GuestMemoryMmap, Interrupt, VirtioDevice};
use crate::bus::BusDevice;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

pub const MEM_SIZE: usize = 16 << 20;
pub const DESC: u64 = 0x10000;
pub const AVAIL: u64 = 0x20000;
pub const USED: u64 = 0x30000;
/// Where tests put data buffers.
pub const DATA: u64 = 0x100000;

pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;

pub fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

pub struct Driver {
    pub transport: MmioTransport,
    pub mem: GuestMemoryMmap,
    pub irq: EventFd,
    pub size: u16,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl Driver {
    pub fn new(device: Box<dyn VirtioDevice>) -> Self {
        let mem = mem();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(Interrupt::new(irq.try_clone().unwrap()));
        let evts = device
            .queue_max_sizes()
            .iter()
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect();
        let transport = MmioTransport::new(device, mem.clone(), interrupt, evts);
        Self {
            transport,
            mem,
            irq,
            size: 16,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    pub fn read(&mut self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.transport.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn write(&mut self, offset: u64, v: u32) {
        self.transport.write(offset, &v.to_le_bytes());
    }

    pub fn device_features(&mut self) -> u64 {
        self.write(0x14, 0);
        let lo = self.read(0x10);
        self.write(0x14, 1);
        let hi = self.read(0x10);
        (u64::from(hi) << 32) | u64::from(lo)
    }

    /// Negotiates `features` and stops before DRIVER_OK; returns the status read back.
    pub fn negotiate(&mut self, features: u64) -> u32 {
        self.write(0x70, 0);
        self.write(0x70, status::ACKNOWLEDGE);
        self.write(0x70, status::ACKNOWLEDGE | status::DRIVER);
        self.write(0x24, 0);
        self.write(0x20, features as u32);
        self.write(0x24, 1);
        self.write(0x20, (features >> 32) as u32);
        self.write(
            0x70,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        self.read(0x70)
    }

    /// Programs queue 0 at the standard test addresses.
    pub fn setup_queue(&mut self, size: u16, desc: u64, avail: u64, used: u64) {
        self.size = size;
        self.write(0x30, 0);
        self.write(0x38, u32::from(size));
        self.write(0x80, desc as u32);
        self.write(0x84, (desc >> 32) as u32);
        self.write(0x90, avail as u32);
        self.write(0x94, (avail >> 32) as u32);
        self.write(0xa0, used as u32);
        self.write(0xa4, (used >> 32) as u32);
        self.write(0x44, 1);
    }

    pub fn driver_ok(&mut self) -> u32 {
        let s = self.read(0x70);
        self.write(0x70, s | status::DRIVER_OK);
        self.read(0x70)
    }

    /// Full bring-up with every offered feature.
    pub fn activate(&mut self) {
        let f = self.device_features();
        let s = self.negotiate(f);
        assert_ne!(s & status::FEATURES_OK, 0);
        self.setup_queue(64, DESC, AVAIL, USED);
        let s = self.driver_ok();
        assert_eq!(
            s & (status::DRIVER_OK | status::DEVICE_NEEDS_RESET),
            status::DRIVER_OK
        );
    }

    pub fn write_desc(&self, table: u64, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let a = GuestAddress(table + u64::from(index) * 16);
        self.mem.write_obj(addr, a).unwrap();
        self.mem.write_obj(len, GuestAddress(a.0 + 8)).unwrap();
        self.mem.write_obj(flags, GuestAddress(a.0 + 12)).unwrap();
        self.mem.write_obj(next, GuestAddress(a.0 + 14)).unwrap();
    }

    /// Publishes the chain starting at `head` and notifies queue 0.
    pub fn publish(&mut self, head: u16) {
        self.make_available(&[head]);
    }

    /// Puts `heads` in the available ring, then moves its index once and notifies queue 0.
    fn make_available(&mut self, heads: &[u16]) {
        for &head in heads {
            let slot = u64::from(self.avail_idx % self.size);
            self.mem
                .write_obj(head, GuestAddress(AVAIL + 4 + slot * 2))
                .unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
        }
        self.mem
            .write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
            .unwrap();
        self.write(0x50, 0);
    }

    /// Writes `descs` (addr, len, flags) as a chain in the descriptor table, publishes it and
    /// returns its head.
    pub fn submit(&mut self, descs: &[(u64, u32, u16)]) -> u16 {
        let head = self.write_chain(descs);
        self.publish(head);
        head
    }

    /// Writes `descs` as a chain in the descriptor table; returns its head.
    fn write_chain(&mut self, descs: &[(u64, u32, u16)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let idx = (self.next_desc + i as u16) % self.size;
            let last = i + 1 == descs.len();
            let next = (idx + 1) % self.size;
            let f = if last { flags } else { flags | F_NEXT };
            self.write_desc(DESC, idx, addr, len, f, if last { 0 } else { next });
        }
        self.next_desc = (self.next_desc + descs.len() as u16) % self.size;
        head
    }

    /// Makes every chain of `chains` available at once, with one notification, as a driver
    /// with many requests queued does.
    pub fn submit_batch(&mut self, chains: &[Vec<(u64, u32, u16)>]) {
        let heads: Vec<u16> = chains.iter().map(|d| self.write_chain(d)).collect();
        self.make_available(&heads);
    }

    /// Waits for the next used-ring entry; returns (id, len).
    pub fn wait_used(&mut self) -> Option<(u32, u32)> {
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            let idx: u16 = self.mem.read_obj(GuestAddress(USED + 2)).unwrap();
            if idx != self.used_seen {
                let slot = u64::from(self.used_seen % self.size);
                let id: u32 = self
                    .mem
                    .read_obj(GuestAddress(USED + 4 + slot * 8))
                    .unwrap();
                let len: u32 = self
                    .mem
                    .read_obj(GuestAddress(USED + 4 + slot * 8 + 4))
                    .unwrap();
                self.used_seen = self.used_seen.wrapping_add(1);
                return Some((id, len));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        None
    }

    /// Forgets ring positions (after the driver reset the device).
    pub fn reset_counters(&mut self) {
        self.next_desc = 0;
        self.avail_idx = 0;
        self.used_seen = 0;
    }

    /// Continues allocating descriptors after ones a test wrote by hand.
    pub fn reset_counters_keep_ring(&mut self) {
        self.next_desc = 0;
    }

    /// Waits until the device reports DEVICE_NEEDS_RESET.
    pub fn wait_needs_reset(&mut self) -> bool {
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            if self.read(0x70) & status::DEVICE_NEEDS_RESET != 0 {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }
}
