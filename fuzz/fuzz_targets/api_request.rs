//! API request parsing: arbitrary method, path and body.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    const METHODS: [&str; 5] = ["GET", "PUT", "PATCH", "POST", "DELETE"];
    let Some((&m, rest)) = data.split_first() else { return };
    let split = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    let path = String::from_utf8_lossy(&rest[..split]);
    let body = rest.get(split + 1..).unwrap_or(&[]);
    let _ = api::parse_request(METHODS[m as usize % METHODS.len()], &path, body);
});
