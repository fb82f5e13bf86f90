//! The test guest as a bzImage with a boot-protocol 2.15 setup header.
#![no_std]
#![no_main]

pub use vireo_guest::main;

#[no_mangle]
static VIREO_GUEST_IMAGE: &[u8] = b"bzimage";

// The setup header (Linux boot protocol 2.15), at file offset 0x1f1 of the one setup sector.
// cmdline_size is deliberately smaller than Linux's 2047 so tests can see vireo honour it.
core::arch::global_asm!(
    r#"
    .section .setup, "a"
    .org 0x1f1
    .byte 1                            /* setup_sects */
    .word 0                            /* root_flags */
    .long _syssize
    .word 0, 0, 0                      /* ram_size, vid_mode, root_dev */
    .word 0xaa55                       /* boot_flag */
    .byte 0xeb, 0x66                   /* jump */
    .ascii "HdrS"
    .word 0x020f                       /* version */
    .long 0                            /* realmode_swtch */
    .word 0x1000                       /* start_sys_seg */
    .word 0                            /* kernel_version */
    .byte 0                            /* type_of_loader */
    .byte 0x01                         /* loadflags: LOADED_HIGH */
    .word 0                            /* setup_move_size */
    .long 0x100000                     /* code32_start */
    .long 0, 0                         /* ramdisk_image, ramdisk_size */
    .long 0                            /* bootsect_kludge */
    .word 0                            /* heap_end_ptr */
    .byte 0, 0                         /* ext_loader_ver, ext_loader_type */
    .long 0                            /* cmd_line_ptr */
    .long 0x7fffffff                   /* initrd_addr_max */
    .long 0x200000                     /* kernel_alignment */
    .byte 0                            /* relocatable_kernel */
    .byte 21                           /* min_alignment */
    .word 0x1                          /* xloadflags: XLF_KERNEL_64 */
    .long 1023                         /* cmdline_size */
    .long 0                            /* hardware_subarch */
    .quad 0                            /* hardware_subarch_data */
    .long 0, 0                         /* payload_offset, payload_length */
    .quad 0                            /* setup_data */
    .quad 0x100000                     /* pref_address */
    .long _init_size                   /* init_size */
    .long 0                            /* handover_offset */
    .long 0                            /* kernel_info_offset */
    .org 0x400
    "#,
    options(att_syntax)
);
