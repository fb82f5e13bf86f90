//! virtio-blk request parsing and execution on arbitrary descriptor tables and rings.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| devices::virtio::fuzz::block_request(data));
