//! virtio-balloon: inflate, deflate, statistics and free page reporting chains, served by the
//! device thread's own code.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| devices::virtio::fuzz::balloon_queues(data));
