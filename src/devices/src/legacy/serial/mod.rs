//! 16550A-compatible UART (COM1 at 0x3f8, IRQ 4) on top of vm-superio's model.

pub mod persist;

use crate::bus::BusDevice;
use crate::EventFdTrigger;
use std::io::Write;

/// COM1 port base.
pub const COM1_BASE: u64 = 0x3f8;
/// Number of UART registers.
pub const PORT_SIZE: u64 = 8;
/// ISA IRQ of COM1.
pub const COM1_IRQ: u32 = 4;

type Uart = vm_superio::Serial<EventFdTrigger, vm_superio::serial::NoEvents, Box<dyn Write + Send>>;

/// The console's output under a rate limiter: bytes beyond the rate are dropped (and counted)
/// rather than delayed, since the vCPU that writes them must not wait, and a guest must not
/// fill the host's disk through its console.
pub struct LimitedOutput {
    out: Box<dyn Write + Send>,
    limiter: crate::rate_limiter::RateLimiter,
    metrics: std::sync::Arc<crate::metrics::DeviceMetrics>,
}

impl LimitedOutput {
    /// `out` limited by `config` (output is counted in the `serial` metrics either way).
    pub fn new(
        out: Box<dyn Write + Send>,
        config: &crate::rate_limiter::RateLimiterConfig,
    ) -> std::io::Result<Self> {
        Ok(Self {
            out,
            limiter: crate::rate_limiter::RateLimiter::new(config)?,
            metrics: crate::metrics::register("serial".into()),
        })
    }
}

impl Write for LimitedOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.limiter.try_take(buf.len() as u64) {
            crate::metrics::add(&self.metrics.write_bytes, buf.len() as u64);
            self.out.write(buf)
        } else {
            crate::metrics::add(&self.metrics.dropped, buf.len() as u64);
            utils::warn_limited!(
                "serial_rate_limited",
                "serial: guest output beyond the console's rate limit dropped"
            );
            Ok(buf.len())
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// A UART whose transmitted bytes go to `out` and whose receive FIFO the host fills.
pub struct Serial {
    uart: Uart,
    /// Set after the first failed write to the output, so a closed sink is reported once
    /// rather than once per guest byte.
    output_failed: bool,
}

impl Serial {
    /// A UART that raises its interrupt through `irq` and writes what the guest sends to `out`.
    pub fn new(irq: EventFdTrigger, out: Box<dyn Write + Send>) -> Self {
        Self {
            uart: vm_superio::Serial::new(irq, out),
            output_failed: false,
        }
    }

    /// Queues host input for the guest; returns how many bytes fitted in the receive FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        match self.uart.enqueue_raw_bytes(bytes) {
            Ok(n) => n,
            Err(vm_superio::serial::Error::FullFifo) => 0,
            Err(e) => {
                utils::warn_limited!(
                    "serial_input_error",
                    "serial: cannot queue guest input: {e}"
                );
                0
            }
        }
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // The UART has byte-wide registers only; wider accesses read as open bus.
        if data.len() != 1 || offset >= PORT_SIZE {
            data.fill(0xff);
            return;
        }
        data[0] = self.uart.read(offset as u8);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() != 1 || offset >= PORT_SIZE {
            return;
        }
        if let Err(e) = self.uart.write(offset as u8, data[0]) {
            // A closed or full output sink must not stop the guest; the byte is dropped.
            if !self.output_failed {
                self.output_failed = true;
                utils::warn_limited!(
                    "serial_output_lost",
                    "serial: guest output is being lost: {e}"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn transmits_and_receives() {
        let sink = Sink::default();
        let irq = EventFdTrigger::new().unwrap();
        let irq_read = irq.try_clone().unwrap();
        let mut s = Serial::new(irq, Box::new(sink.clone()));
        // Enable the received-data interrupt (IER bit 0).
        s.write(1, &[1]);
        for b in b"hi" {
            s.write(0, &[*b]);
        }
        assert_eq!(&sink.0.lock().unwrap()[..], b"hi");
        assert_eq!(s.enqueue_input(b"ok"), 2);
        assert_eq!(irq_read.0.read().unwrap(), 1);
        let mut lsr = [0u8];
        s.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data ready");
        let mut c = [0u8];
        s.read(0, &mut c);
        assert_eq!(c[0], b'o');
    }

    #[test]
    fn wide_access_is_ignored() {
        let sink = Sink::default();
        let mut s = Serial::new(EventFdTrigger::new().unwrap(), Box::new(sink.clone()));
        s.write(0, b"ab");
        let mut w = [0u8; 2];
        s.read(0, &mut w);
        assert_eq!(w, [0xff, 0xff]);
        assert!(sink.0.lock().unwrap().is_empty());
    }
}
