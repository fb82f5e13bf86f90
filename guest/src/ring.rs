//! One split virtqueue as the multi-queue drivers (net, vsock) use it: descriptor table,
//! available ring and used ring in three pages from `base`, EVENT_IDX aware.

use crate::io::{peek, poke};
use core::sync::atomic::{fence, Ordering};

/// A split virtqueue of `size` entries.
pub struct Queue {
    /// Descriptor table.
    pub desc: u64,
    /// Available ring.
    pub avail: u64,
    /// Used ring.
    pub used: u64,
    /// Entries.
    pub size: u16,
    /// Next available index the driver publishes.
    pub avail_idx: u16,
    /// Used entries taken so far.
    pub used_seen: u16,
}

impl Queue {
    /// A queue of `size` entries at `base` (three pages), zeroed.
    pub fn new(base: u64, size: u16) -> Self {
        for i in 0..0x3000u64 / 8 {
            poke::<u64>(base + i * 8, 0);
        }
        Queue {
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
            size,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    /// Writes descriptor `i`.
    pub fn set_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = self.desc + u64::from(i) * 16;
        poke(d, addr);
        poke(d + 8, len);
        poke(d + 12, flags);
        poke(d + 14, next);
    }

    /// Makes chain `head` available; returns whether the device asked to be notified.
    pub fn publish(&mut self, head: u16) -> bool {
        poke::<u16>(
            self.avail + 4 + u64::from(self.avail_idx % self.size) * 2,
            head,
        );
        fence(Ordering::SeqCst);
        let old = self.avail_idx;
        self.avail_idx = old.wrapping_add(1);
        poke::<u16>(self.avail + 2, self.avail_idx);
        fence(Ordering::SeqCst);
        // EVENT_IDX: the device's avail_event sits after the used ring.
        let event: u16 = peek(self.used + 4 + u64::from(self.size) * 8);
        self.avail_idx.wrapping_sub(event).wrapping_sub(1) < self.avail_idx.wrapping_sub(old)
    }

    /// The device's used index.
    pub fn used_idx(&self) -> u16 {
        peek(self.used + 2)
    }

    /// The next used entry, if any: (id, len).
    pub fn pop_used(&mut self) -> Option<(u16, u32)> {
        if self.used_idx() == self.used_seen {
            return None;
        }
        fence(Ordering::SeqCst);
        let e = self.used + 4 + u64::from(self.used_seen % self.size) * 8;
        self.used_seen = self.used_seen.wrapping_add(1);
        Some((peek::<u32>(e) as u16, peek::<u32>(e + 4)))
    }

    /// Asks for an interrupt at the next used entry (EVENT_IDX used_event).
    pub fn arm(&self) {
        poke::<u16>(self.avail + 4 + u64::from(self.size) * 2, self.used_seen);
        fence(Ordering::SeqCst);
    }
}
