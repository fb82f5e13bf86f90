//! virtio-mmio transport registers under arbitrary access sequences.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| devices::virtio::fuzz::mmio_registers(data));
