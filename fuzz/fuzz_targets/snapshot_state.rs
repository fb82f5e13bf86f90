//! Snapshot state files: arbitrary bytes through the decoder and the checks a load runs first
//! (see `vmm::persist::fuzz_state`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm::persist::fuzz_state(data));
