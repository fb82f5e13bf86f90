//! API request parsing: arbitrary method, path and body.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| api::parse::fuzz_request(data));
