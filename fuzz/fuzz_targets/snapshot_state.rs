//! Snapshot state files: arbitrary bytes through the decoder and the checks a load runs first,
//! both as raw files and as well-formed containers (valid checksums) whose five sections hold
//! the input, so that the section parsers are reached too.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = vmm::persist::check_state(data);
    let names = ["meta", "config", "vm", "vcpus", "devices"];
    let mut parts = data.split(|&b| b == 0xff);
    let sections: Vec<(&str, Vec<u8>)> = names
        .iter()
        .map(|n| (*n, parts.next().unwrap_or(&[]).to_vec()))
        .collect();
    let _ = vmm::persist::check_state(&vmm::persist::format::encode(&sections));
});
