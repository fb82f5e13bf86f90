//! The test guest as an ELF vmlinux-style image entered at its 64-bit entry.
#![no_std]
#![no_main]

pub use vireo_guest::main;

#[no_mangle]
static VIREO_GUEST_IMAGE: &[u8] = b"elf";
