//! The ACPI sleep and reset registers of a hardware-reduced ACPI platform (ACPI 6.5, 4.8.3.7
//! and 4.8.3.6), in I/O space: how an ACPI guest such as Linux powers off (`poweroff` enters S5)
//! and resets.
//!
//! | port | register | |
//! |---|---|---|
//! | base + 0 | sleep control | write `SLP_TYP << 2 \| SLP_EN`; S5 powers off |
//! | base + 1 | sleep status | reads 0 (the guest never wakes from S5) |
//! | base + 2 | reset | writing [`RESET_VALUE`] resets the machine |

use crate::bus::BusDevice;
use crate::EventFdTrigger;

/// First port of the block.
pub const ACPI_PM_BASE: u64 = 0x600;
/// Three one-byte registers.
pub const PORT_SIZE: u64 = 3;
/// Offset of the sleep control register.
pub const SLEEP_CONTROL: u64 = 0;
/// Offset of the sleep status register.
pub const SLEEP_STATUS: u64 = 1;
/// Offset of the reset register.
pub const RESET: u64 = 2;
/// Value the FADT tells the guest to write to the reset register.
pub const RESET_VALUE: u8 = 1;
/// SLP_TYP value the DSDT's `_S5_` object gives for soft-off.
pub const S5_SLEEP_TYPE: u8 = 5;
const SLP_EN: u8 = 1 << 5;

/// The register block.
pub struct AcpiPmDevice {
    off: EventFdTrigger,
    reset: EventFdTrigger,
}

impl AcpiPmDevice {
    /// Signals `off` on entry to S5 and `reset` on a reset-register write.
    pub fn new(off: EventFdTrigger, reset: EventFdTrigger) -> Self {
        Self { off, reset }
    }
}

impl BusDevice for AcpiPmDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 1 && offset == SLEEP_STATUS {
            data[0] = 0;
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let [value] = *data else { return };
        let evt = match offset {
            SLEEP_CONTROL if value & SLP_EN != 0 && (value >> 2) & 0x7 == S5_SLEEP_TYPE => {
                &self.off
            }
            // S1-S4 are not offered (the DSDT defines only _S5_); other values are ignored.
            SLEEP_CONTROL => return,
            RESET if value == RESET_VALUE => &self.reset,
            _ => return,
        };
        if let Err(e) = evt.0.write(1) {
            tracing::error!("ACPI PM: cannot signal the VMM: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> (AcpiPmDevice, EventFdTrigger, EventFdTrigger) {
        let off = EventFdTrigger::new().unwrap();
        let reset = EventFdTrigger::new().unwrap();
        let d = AcpiPmDevice::new(off.try_clone().unwrap(), reset.try_clone().unwrap());
        (d, off, reset)
    }

    #[test]
    fn s5_powers_off() {
        let (mut d, off, reset) = device();
        d.write(SLEEP_CONTROL, &[S5_SLEEP_TYPE << 2]); // no SLP_EN
        d.write(SLEEP_CONTROL, &[(3 << 2) | SLP_EN]); // S3: not offered
        d.write(SLEEP_CONTROL, &[S5_SLEEP_TYPE << 2, 0]); // wrong width
        assert!(off.0.read().is_err());
        d.write(SLEEP_CONTROL, &[(S5_SLEEP_TYPE << 2) | SLP_EN]);
        assert_eq!(off.0.read().unwrap(), 1);
        assert!(reset.0.read().is_err());
    }

    #[test]
    fn reset_register_resets() {
        let (mut d, off, reset) = device();
        d.write(RESET, &[0x2]);
        assert!(reset.0.read().is_err());
        d.write(RESET, &[RESET_VALUE]);
        assert_eq!(reset.0.read().unwrap(), 1);
        assert!(off.0.read().is_err());
        let mut b = [9u8];
        d.read(SLEEP_STATUS, &mut b);
        assert_eq!(b[0], 0);
    }
}
