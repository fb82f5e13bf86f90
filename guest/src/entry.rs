//! Entry points. The image's first bytes (at 1 MiB) are the PVH 32-bit entry; the 64-bit entry
//! sits at +0x200, where the Linux boot protocol expects a bzImage's `startup_64`.

use core::arch::global_asm;

global_asm!(
    r#"
    .section .text.boot, "ax"
    .code32
    .globl pvh_start32
pvh_start32:
    cli
    movl %ebx, %edi                    /* hvm_start_info (cpuid clobbers ebx) */
    /* Identity-map 4 GiB: PML4[0] -> PDPT. With 1 GiB pages (CPUID 0x80000001 EDX bit 26)
     * the PDPT maps it in four entries; otherwise four page directories of 2 MiB pages do.
     * Every instruction here may be emulated, so the short path matters. */
    movl $(boot_pdpt + 3), %eax
    movl %eax, boot_pml4
    movl $0x80000001, %eax
    cpuid
    btl $26, %edx
    jnc 5f
    movl $boot_pdpt, %edx
    movl $0x83, %eax
    movl $4, %ecx
6:  movl %eax, (%edx)
    addl $8, %edx
    addl $0x40000000, %eax
    decl %ecx
    jnz 6b
    jmp 7f
5:  movl $boot_pdpt, %edx
    movl $(boot_pd + 3), %eax
    movl $4, %ecx
1:  movl %eax, (%edx)
    addl $8, %edx
    addl $0x1000, %eax
    decl %ecx
    jnz 1b
    movl $boot_pd, %edx
    movl $0x83, %eax
    movl $2048, %ecx
2:  movl %eax, (%edx)
    addl $8, %edx
    addl $0x200000, %eax
    decl %ecx
    jnz 2b
7:
    movl $boot_pml4, %eax
    movl %eax, %cr3
    movl %cr4, %eax
    orl $0x20, %eax                    /* PAE */
    movl %eax, %cr4
    movl $0xc0000080, %ecx             /* EFER */
    rdmsr
    orl $0x100, %eax                   /* LME */
    wrmsr
    movl %cr0, %eax
    orl $0x80000001, %eax              /* PG | PE */
    movl %eax, %cr0
    lgdt boot_gdt_ptr
    ljmp $0x08, $pvh_long
    .code64
pvh_long:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    movq $boot_stack_top, %rsp
    movl %edi, %edi
    call {pvh_main}
3:  cli
    hlt
    jmp 3b

    .org 0x200
    .globl start64
start64:
    cli
    movq $boot_stack_top, %rsp
    movq %rsi, %rdi                    /* boot_params */
    call {linux_main}
4:  cli
    hlt
    jmp 4b

    .section .rodata.boot_gdt, "a"
    .balign 8
boot_gdt:
    .quad 0
    .quad 0x00af9a000000ffff           /* 0x08: 64-bit code */
    .quad 0x00cf92000000ffff           /* 0x10: flat data */
boot_gdt_ptr:
    .word 23
    .long boot_gdt

    .section .bss.boot, "aw", @nobits
    .balign 4096
    .globl boot_pml4
boot_pml4:  .skip 4096
boot_pdpt:  .skip 4096
boot_pd:    .skip 4 * 4096
boot_stack: .skip 32768
    .globl boot_stack_top
boot_stack_top:
    "#,
    pvh_main = sym pvh_main,
    linux_main = sym linux_main,
    options(att_syntax)
);

extern "C" fn pvh_main(start_info: u64) -> ! {
    crate::main(crate::boot::BootInfo::from_pvh(start_info))
}

extern "C" fn linux_main(boot_params: u64) -> ! {
    crate::main(crate::boot::BootInfo::from_linux(boot_params))
}
