//! vsock: header parsing and the host side's connection state machine on arbitrary packets.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| devices::virtio::fuzz::vsock_packets(data));
