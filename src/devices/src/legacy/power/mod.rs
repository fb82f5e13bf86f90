//! vireo's power-off port: the simplest way for a guest without ACPI to turn itself off.
//!
//! Writing any byte to I/O port 0x501 powers the VM off; vireo then exits with status 0.
//! The port and width match QEMU's `isa-debug-exit` device, so guest code written for one works
//! with the other (QEMU derives its exit status from the byte; vireo treats every write as a
//! clean power-off and logs the byte).

pub mod acpi;

pub use acpi::AcpiPmDevice;

use crate::bus::BusDevice;
use crate::EventFdTrigger;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

/// The power-off port.
pub const POWER_PORT: u64 = 0x501;
/// One port.
pub const PORT_SIZE: u64 = 1;

/// The power-off device.
pub struct PowerDevice {
    off: EventFdTrigger,
    last_value: Arc<AtomicU8>,
}

impl PowerDevice {
    /// A device that writes to `off` when the guest powers off, recording the byte written in
    /// `last_value`.
    pub fn new(off: EventFdTrigger, last_value: Arc<AtomicU8>) -> Self {
        Self { off, last_value }
    }
}

impl BusDevice for PowerDevice {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if data.len() != 1 {
            return;
        }
        self.last_value.store(data[0], Ordering::SeqCst);
        if let Err(e) = self.off.0.write(1) {
            tracing::error!("power device: cannot signal power-off: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_powers_off() {
        let evt = EventFdTrigger::new().unwrap();
        let seen = evt.try_clone().unwrap();
        let value = Arc::new(AtomicU8::new(0));
        let mut d = PowerDevice::new(evt, value.clone());
        let mut r = [0u8];
        d.read(0, &mut r);
        assert!(seen.0.read().is_err());
        d.write(0, &[7]);
        assert_eq!(seen.0.read().unwrap(), 1);
        assert_eq!(value.load(Ordering::SeqCst), 7);
    }
}
