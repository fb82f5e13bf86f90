//! Snapshot state files: arbitrary bytes through the decoder and checks a load runs first.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = vmm::persist::check_state(data);
});
