//! virtio-mem: plug, unplug and state requests against the device's block map.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| devices::virtio::fuzz::mem_requests(data));
