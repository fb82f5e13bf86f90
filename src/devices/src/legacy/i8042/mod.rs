//! i8042 keyboard controller, present so guests can reset the machine through it
//! (command 0xfe on port 0x64), which is how Linux reboots with `reboot=k`.

use crate::bus::BusDevice;
use crate::EventFdTrigger;

/// Port base (data port 0x60; command/status port 0x64).
pub const I8042_BASE: u64 = 0x60;
/// Ports 0x60..=0x64.
pub const PORT_SIZE: u64 = 5;

/// The controller; a reset command signals the VMM through `reset`.
pub struct I8042 {
    dev: vm_superio::I8042Device<EventFdTrigger>,
}

impl I8042 {
    /// A controller that writes to `reset` when the guest asks for a CPU reset.
    pub fn new(reset: EventFdTrigger) -> Self {
        Self {
            dev: vm_superio::I8042Device::new(reset),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() != 1 {
            data.fill(0xff);
            return;
        }
        data[0] = self.dev.read(offset as u8);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() != 1 {
            return;
        }
        if let Err(e) = self.dev.write(offset as u8, data[0]) {
            tracing::error!("i8042: cannot signal reset: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_signals() {
        let evt = EventFdTrigger::new().unwrap();
        let seen = evt.try_clone().unwrap();
        let mut d = I8042::new(evt);
        d.write(4, &[0x01]);
        assert!(seen.0.read().is_err(), "no reset for other commands");
        d.write(4, &[0xfe]);
        assert_eq!(seen.0.read().unwrap(), 1);
    }
}
