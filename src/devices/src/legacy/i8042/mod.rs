//! i8042 PS/2 controller with a keyboard: enough of the 8042 command set for Linux's i8042 and
//! atkbd drivers to find a keyboard, the reset line (command 0xfe, how Linux reboots with
//! `reboot=k`), and injected key presses (Ctrl+Alt+Del from the API).

pub mod persist;

use crate::bus::BusDevice;
use crate::EventFdTrigger;
use std::collections::VecDeque;

/// Port base (data port 0x60; command/status port 0x64).
pub const I8042_BASE: u64 = 0x60;
/// Ports 0x60..=0x64.
pub const PORT_SIZE: u64 = 5;
/// ISA IRQ of the keyboard.
pub const KBD_IRQ: u32 = 1;

const DATA: u64 = 0;
const COMMAND: u64 = 4;

const STATUS_OUT_FULL: u8 = 0x01;
const STATUS_SYSTEM: u8 = 0x04;
const STATUS_LAST_WAS_COMMAND: u8 = 0x08;

const CTR_KBD_INT: u8 = 0x01;
const CTR_SYSTEM: u8 = 0x04;
const CTR_XLATE: u8 = 0x40;

const ACK: u8 = 0xfa;
/// Bytes the output buffer holds before further ones are dropped.
const BUFFER_LIMIT: usize = 32;

/// What the next byte written to the data port means.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
enum Pending {
    None,
    WriteCtr,
    KbdArgument,
    ScancodeSet,
    WriteAux,
}

/// The controller; a reset command signals `reset`, keyboard bytes raise `irq`.
pub struct I8042 {
    reset: EventFdTrigger,
    irq: EventFdTrigger,
    buf: VecDeque<u8>,
    ctr: u8,
    status: u8,
    pending: Pending,
}

impl I8042 {
    /// A controller that writes to `reset` for a CPU reset and to `irq` when it has data for
    /// the guest.
    pub fn new(reset: EventFdTrigger, irq: EventFdTrigger) -> Self {
        Self {
            reset,
            irq,
            buf: VecDeque::new(),
            // As firmware leaves it: keyboard interrupt on, translation to set 1 on.
            ctr: CTR_KBD_INT | CTR_SYSTEM | CTR_XLATE,
            status: STATUS_SYSTEM,
            pending: Pending::None,
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.buf.len() < BUFFER_LIMIT {
                self.buf.push_back(b);
            }
        }
        if !self.buf.is_empty() {
            self.status |= STATUS_OUT_FULL;
            if self.ctr & CTR_KBD_INT != 0 {
                if let Err(e) = self.irq.0.write(1) {
                    utils::warn_limited!("i8042_irq_error", "i8042: cannot raise IRQ 1: {e}");
                }
            }
        }
    }

    /// Presses and releases Ctrl+Alt+Del, in scancode set 1 if the guest left translation on
    /// (the usual case), else in set 2.
    pub fn trigger_ctrl_alt_del(&mut self) {
        if self.ctr & CTR_XLATE != 0 {
            self.push(&[0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d]);
        } else {
            self.push(&[
                0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14,
            ]);
        }
    }

    fn command(&mut self, cmd: u8) {
        match cmd {
            0x20 => self.push(&[self.ctr]),
            0x60 => self.pending = Pending::WriteCtr,
            0xa7 | 0xa8 | 0xad | 0xae => {} // (dis|en)able aux / keyboard: accepted
            0xa9 => self.push(&[0x00]),     // aux interface test: passed
            0xaa => {
                self.status |= STATUS_SYSTEM;
                self.push(&[0x55]); // self test passed
            }
            0xab => self.push(&[0x00]), // keyboard interface test: passed
            0xd4 => self.pending = Pending::WriteAux,
            0xfe => {
                if let Err(e) = self.reset.0.write(1) {
                    tracing::error!("i8042: cannot signal reset: {e}");
                }
            }
            other => tracing::debug!("i8042: ignored controller command {other:#x}"),
        }
    }

    fn keyboard(&mut self, byte: u8) {
        match byte {
            0xff => self.push(&[ACK, 0xaa]), // reset: ack, self-test passed
            0xf2 => self.push(&[ACK, 0xab, 0x83]), // identify: MF2 keyboard
            0xed | 0xf3 => {
                self.pending = Pending::KbdArgument;
                self.push(&[ACK]);
            }
            0xf0 => {
                self.pending = Pending::ScancodeSet;
                self.push(&[ACK]);
            }
            _ => self.push(&[ACK]),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() != 1 {
            data.fill(0xff);
            return;
        }
        data[0] = match offset {
            DATA => {
                let b = self.buf.pop_front().unwrap_or(0);
                if self.buf.is_empty() {
                    self.status &= !STATUS_OUT_FULL;
                } else if self.ctr & CTR_KBD_INT != 0 {
                    // More bytes waiting: another edge for the next one.
                    let _ = self.irq.0.write(1);
                }
                b
            }
            COMMAND => self.status,
            _ => 0xff,
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let [byte] = *data else { return };
        match offset {
            COMMAND => {
                self.status |= STATUS_LAST_WAS_COMMAND;
                self.command(byte);
            }
            DATA => {
                self.status &= !STATUS_LAST_WAS_COMMAND;
                match std::mem::replace(&mut self.pending, Pending::None) {
                    Pending::WriteCtr => self.ctr = byte,
                    Pending::KbdArgument => self.push(&[ACK]),
                    Pending::ScancodeSet => {
                        if byte == 0 {
                            self.push(&[ACK, 2]);
                        } else {
                            self.push(&[ACK]);
                        }
                    }
                    // No mouse: the aux device does not answer.
                    Pending::WriteAux => {}
                    Pending::None => self.keyboard(byte),
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev() -> (I8042, EventFdTrigger, EventFdTrigger) {
        let reset = EventFdTrigger::new().unwrap();
        let irq = EventFdTrigger::new().unwrap();
        let d = I8042::new(reset.try_clone().unwrap(), irq.try_clone().unwrap());
        (d, reset, irq)
    }

    fn read(d: &mut I8042, offset: u64) -> u8 {
        let mut b = [0u8];
        d.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn reset_command_signals() {
        let (mut d, reset, _) = dev();
        d.write(COMMAND, &[0x01]);
        assert!(reset.0.read().is_err(), "no reset for other commands");
        d.write(COMMAND, &[0xfe]);
        assert_eq!(reset.0.read().unwrap(), 1);
    }

    #[test]
    fn linux_probe_sequence() {
        let (mut d, _, irq) = dev();
        d.write(COMMAND, &[0xaa]);
        assert_eq!(read(&mut d, COMMAND) & STATUS_OUT_FULL, STATUS_OUT_FULL);
        assert_eq!(read(&mut d, DATA), 0x55);
        assert_eq!(read(&mut d, COMMAND) & STATUS_OUT_FULL, 0);
        d.write(COMMAND, &[0x20]);
        let ctr = read(&mut d, DATA);
        d.write(COMMAND, &[0x60]);
        d.write(DATA, &[ctr & !CTR_XLATE]);
        d.write(COMMAND, &[0x20]);
        assert_eq!(read(&mut d, DATA), ctr & !CTR_XLATE);
        d.write(DATA, &[0xf2]);
        assert_eq!(
            [read(&mut d, DATA), read(&mut d, DATA), read(&mut d, DATA)],
            [ACK, 0xab, 0x83]
        );
        assert!(irq.0.read().unwrap() >= 1);
    }

    #[test]
    fn ctrl_alt_del_in_either_scancode_set() {
        let (mut d, _, irq) = dev();
        d.trigger_ctrl_alt_del();
        assert_eq!(irq.0.read().unwrap(), 1);
        let got: Vec<u8> = (0..8).map(|_| read(&mut d, DATA)).collect();
        assert_eq!(got, [0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d]);
        d.write(COMMAND, &[0x60]);
        d.write(DATA, &[CTR_KBD_INT]);
        d.trigger_ctrl_alt_del();
        assert_eq!(read(&mut d, DATA), 0x14);
    }

    #[test]
    fn buffer_is_bounded() {
        let (mut d, _, _) = dev();
        for _ in 0..100 {
            d.trigger_ctrl_alt_del();
        }
        assert_eq!(d.buf.len(), BUFFER_LIMIT);
    }
}
