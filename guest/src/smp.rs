//! Starting application processors: a real-mode trampoline copied below 1 MiB, woken by
//! INIT/SIPI, that climbs to long mode and calls [`ap_main`].

use crate::apic;
use crate::io::{poke, put_dec, puts};
use core::arch::global_asm;
use core::sync::atomic::{AtomicU32, Ordering};

/// Where the trampoline runs (SIPI vector 0x10).
const TRAMPOLINE: u64 = 0x10000;
/// Spins the BSP waits for one AP before giving up on it.
const AP_WAIT_SPINS: u32 = 2_000_000;

global_asm!(
    r#"
    .section .rodata.ap_trampoline, "a"
    .globl ap_tramp_start, ap_tramp_end, ap_tramp_data
    .code16
ap_tramp_start:
    cli
    movw %cs, %ax
    movw %ax, %ds
    lgdtl (ap_gdt_ptr - ap_tramp_start)
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $0x08, $(ap_prot - ap_tramp_start + 0x10000)
    .code32
ap_prot:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movl (ap_cr3 - ap_tramp_start + 0x10000), %eax
    movl %eax, %cr3
    movl %cr4, %eax
    orl $0x20, %eax
    movl %eax, %cr4
    movl $0xc0000080, %ecx
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl %cr0, %eax
    orl $0x80000000, %eax
    movl %eax, %cr0
    ljmp $0x18, $(ap_long - ap_tramp_start + 0x10000)
    .code64
ap_long:
    movq (ap_stack - ap_tramp_start + 0x10000), %rsp
    movq (ap_entry - ap_tramp_start + 0x10000), %rax
    call *%rax
1:  cli
    hlt
    jmp 1b
    .balign 8
ap_gdt:
    .quad 0
    .quad 0x00cf9a000000ffff           /* 0x08: 32-bit code */
    .quad 0x00cf92000000ffff           /* 0x10: flat data */
    .quad 0x00af9a000000ffff           /* 0x18: 64-bit code */
ap_gdt_ptr:
    .word 31
    .long ap_gdt - ap_tramp_start + 0x10000
    .balign 8
ap_tramp_data:
ap_cr3:   .quad 0
ap_stack: .quad 0
ap_entry: .quad 0
ap_tramp_end:

    .section .bss.ap_stack, "aw", @nobits
    .balign 16
    .skip 16384
    .globl ap_stack_top
ap_stack_top:
    "#,
    options(att_syntax)
);

extern "C" {
    static ap_tramp_start: u8;
    static ap_tramp_end: u8;
    static ap_tramp_data: u8;
    static ap_stack_top: u8;
}

static AP_DONE: AtomicU32 = AtomicU32::new(0);

/// Reports this CPU's APIC ID as its local APIC and CPUID leaf 1 see it.
pub fn report_cpu(role: &[u8]) {
    let cpuid_id = core::arch::x86_64::__cpuid(1).ebx >> 24;
    puts(b"@cpu apic=");
    put_dec(u64::from(apic::apic_id()));
    puts(b" cpuid_apic=");
    put_dec(u64::from(cpuid_id));
    puts(b" ");
    puts(role);
    // What CPU templates change: leaf 1 ECX/EDX and leaf 7 EBX.
    let l1 = core::arch::x86_64::__cpuid(1);
    let l7 = core::arch::x86_64::__cpuid_count(7, 0);
    crate::field(b"leaf1_ecx", u64::from(l1.ecx), true);
    crate::field(b"leaf1_edx", u64::from(l1.edx), true);
    crate::field(b"leaf7_ebx", u64::from(l7.ebx), true);
    puts(b"\n");
}

/// Runs on each AP once it reaches long mode: reports its identity and halts for good. APs
/// start one at a time, so they share one stack.
extern "C" fn ap_main() -> ! {
    report_cpu(b"started");
    AP_DONE.store(1, Ordering::SeqCst);
    loop {
        // SAFETY: halting with interrupts off parks this CPU.
        unsafe { core::arch::asm!("cli; hlt") };
    }
}

/// Starts each AP in `apic_ids` other than `bsp`, one after the other. Returns how many
/// reported in.
pub fn start_aps(apic_ids: &[u8], bsp: u8) -> usize {
    // Addresses of labels in the assembly above.
    let (start, end, data, stack) = {
        (
            core::ptr::addr_of!(ap_tramp_start) as u64,
            core::ptr::addr_of!(ap_tramp_end) as u64,
            core::ptr::addr_of!(ap_tramp_data) as u64,
            core::ptr::addr_of!(ap_stack_top) as u64,
        )
    };
    for i in 0..(end - start) {
        poke::<u8>(TRAMPOLINE + i, crate::io::peek(start + i));
    }
    let cr3: u64;
    // SAFETY: reading CR3 has no side effects.
    unsafe { core::arch::asm!("mov {}, cr3", out(reg) cr3, options(nomem, nostack)) };
    let slots = TRAMPOLINE + (data - start);
    poke(slots, cr3);
    poke(slots + 8, stack);
    poke(slots + 16, ap_main as *const () as u64);

    let mut started = 0;
    for &id in apic_ids {
        if id == bsp {
            continue;
        }
        AP_DONE.store(0, Ordering::SeqCst);
        apic::send_init_sipi(id, TRAMPOLINE);
        let mut spins = 0;
        while AP_DONE.load(Ordering::SeqCst) == 0 && spins < AP_WAIT_SPINS {
            core::hint::spin_loop();
            spins += 1;
        }
        if AP_DONE.load(Ordering::SeqCst) == 1 {
            started += 1;
        } else {
            puts(b"@cpu apic=");
            put_dec(u64::from(id));
            puts(b" timeout\n");
        }
    }
    started
}
