//! An address bus (port I/O or MMIO) that routes guest accesses to devices.

use std::sync::{Arc, Mutex};
use thiserror::Error;

/// A device reachable on a [`Bus`]. Offsets are relative to the device's base address.
pub trait BusDevice: Send {
    /// Guest read of `data.len()` bytes at `offset`; unimplemented registers read as all ones.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors placing a device on a bus.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum Error {
    /// The new range overlaps a device already on the bus.
    #[error("bus range {base:#x}+{len:#x} overlaps a device at {other:#x}")]
    Overlap {
        /// Base of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
        /// Base of the device already there.
        other: u64,
    },
    /// A zero-length or wrapping range.
    #[error("bus range {base:#x}+{len:#x} is empty or wraps around")]
    InvalidRange {
        /// Base of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
}

struct Entry {
    base: u64,
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// Devices indexed by address range. Built before the vCPUs start, then shared read-only.
#[derive(Default)]
pub struct Bus {
    entries: Vec<Entry>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `device` at `[base, base + len)`.
    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), Error> {
        if len == 0 || base.checked_add(len).is_none() {
            return Err(Error::InvalidRange { base, len });
        }
        if let Some(e) = self
            .entries
            .iter()
            .find(|e| base < e.base + e.len && e.base < base + len)
        {
            return Err(Error::Overlap {
                base,
                len,
                other: e.base,
            });
        }
        let pos = self.entries.partition_point(|e| e.base < base);
        self.entries.insert(pos, Entry { base, len, device });
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(&Entry, u64)> {
        let pos = self.entries.partition_point(|e| e.base <= addr);
        let e = self.entries.get(pos.checked_sub(1)?)?;
        let offset = addr - e.base;
        // An access must lie wholly inside one device; a straddling access reaches nobody.
        (offset.checked_add(size as u64)? <= e.len).then_some((e, offset))
    }

    /// Routes a read; returns false (and fills `data` with ones) when no device answers.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((e, offset)) => {
                lock(&e.device).read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Routes a write; returns false when no device answers.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((e, offset)) => {
                lock(&e.device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device even if a thread panicked while holding it: device state stays usable and
/// one failed access must not take the whole VM down.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0 + offset as u8);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn routes_by_range_and_rejects_overlap() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Echo(0x10))), 0x3f8, 8)
            .unwrap();
        bus.insert(Arc::new(Mutex::new(Echo(0x20))), 0x60, 5)
            .unwrap();
        assert_eq!(
            bus.insert(Arc::new(Mutex::new(Echo(0))), 0x3fc, 8),
            Err(Error::Overlap {
                base: 0x3fc,
                len: 8,
                other: 0x3f8
            })
        );
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fa, &mut b));
        assert_eq!(b[0], 0x12);
        assert!(bus.read(0x64, &mut b));
        assert_eq!(b[0], 0x24);
        assert!(!bus.read(0x65, &mut b));
        assert_eq!(b[0], 0xff);
        let mut w = [0u8; 2];
        assert!(
            !bus.read(0x3ff, &mut w),
            "straddling access must not reach a device"
        );
        assert!(bus.write(0x60, &[0x7]));
        assert!(bus.read(0x60, &mut b));
        assert_eq!(b[0], 0x7);
    }

    #[test]
    fn rejects_empty_and_wrapping_ranges() {
        let mut bus = Bus::new();
        let d = Arc::new(Mutex::new(Echo(0)));
        assert!(bus.insert(d.clone(), 0x10, 0).is_err());
        assert!(bus.insert(d, u64::MAX, 2).is_err());
    }
}
