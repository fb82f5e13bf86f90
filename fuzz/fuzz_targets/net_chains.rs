//! virtio-net transmit and receive on arbitrary descriptor tables, rings and host frames.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| devices::virtio::fuzz::net_chains(data));
