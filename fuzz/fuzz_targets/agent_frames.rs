//! The guest agent's framing: lengths, versions, kinds and control messages from a hostile peer.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| agent::proto::fuzz_frames(data));
