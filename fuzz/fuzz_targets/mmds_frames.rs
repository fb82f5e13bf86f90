//! MMDS: ARP, IPv4, TCP and HTTP handling on arbitrary guest frames.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| devices::virtio::fuzz::mmds_frames(data));
