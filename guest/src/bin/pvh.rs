//! The test guest as an ELF image with a PVH entry note.
#![no_std]
#![no_main]

pub use vireo_guest::main;

#[no_mangle]
static VIREO_GUEST_IMAGE: &[u8] = b"pvh";

core::arch::global_asm!(
    r#"
    .section .note.Xen, "a", @note
    .balign 4
    .long 4                            /* name size */
    .long 4                            /* descriptor size */
    .long 18                           /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .balign 4
    .long pvh_start32
    "#,
    options(att_syntax)
);
