//! The serial port's snapshot state: the UART's registers and the input not yet read.

use super::{Serial, Uart};
use serde::{Deserialize, Serialize};

/// The 16550's registers and receive FIFO, as vm-superio keeps them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// IER.
    pub interrupt_enable: u8,
    /// IIR.
    pub interrupt_identification: u8,
    /// LCR.
    pub line_control: u8,
    /// LSR.
    pub line_status: u8,
    /// MCR.
    pub modem_control: u8,
    /// MSR.
    pub modem_status: u8,
    /// SCR.
    pub scratch: u8,
    /// Received bytes the guest has not read.
    pub in_buffer: Vec<u8>,
}

impl Serial {
    /// The port's state.
    pub fn save(&self) -> SerialState {
        let s = self.uart.state();
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// Takes `state` into a port that has not been used yet (its interrupt line and output stay).
    pub fn restore(&mut self, state: &SerialState) -> Result<(), String> {
        let s = vm_superio::serial::SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let placeholder = Uart::new(
            self.uart
                .interrupt_evt()
                .try_clone()
                .map_err(|e| e.to_string())?,
            Box::new(std::io::sink()),
        );
        let old = std::mem::replace(&mut self.uart, placeholder);
        let irq = old.interrupt_evt().try_clone().map_err(|e| e.to_string())?;
        let out = old.into_writer();
        self.uart = Uart::from_state(&s, irq, vm_superio::serial::NoEvents, out)
            .map_err(|e| format!("serial port: bad snapshot state: {e:?}"))?;
        Ok(())
    }
}
