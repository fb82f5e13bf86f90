//! Local APIC and IOAPIC (xAPIC MMIO), the 8259 PICs, and the IDT.

use crate::io::{outb, peek, poke};
use core::arch::global_asm;
use core::sync::atomic::{AtomicU32, Ordering};

const LAPIC: u64 = 0xfee0_0000;
const LAPIC_ID: u64 = 0x20;
const LAPIC_EOI: u64 = 0xb0;
const LAPIC_SVR: u64 = 0xf0;
const LAPIC_ICR_LO: u64 = 0x300;
const LAPIC_ICR_HI: u64 = 0x310;
const LAPIC_LVT_TIMER: u64 = 0x320;
const LAPIC_TIMER_INIT: u64 = 0x380;
const LAPIC_TIMER_DIV: u64 = 0x3e0;
const IOAPIC: u64 = 0xfec0_0000;

/// Vector the serial port's IRQ is routed to.
pub const SERIAL_VECTOR: u8 = 0x24;
/// Vector the keyboard (IRQ 1) is routed to.
pub const KBD_VECTOR: u8 = 0x27;
/// Vector virtio devices interrupt on.
pub const VIRTIO_VECTOR: u8 = 0x26;
/// Vector of the watchdog timer.
pub const TIMER_VECTOR: u8 = 0x30;
/// Vector the ACPI Generic Event Device (VM generation ID changes) is routed to.
pub const GED_VECTOR: u8 = 0x28;
const SPURIOUS_VECTOR: u8 = 0xff;

/// Serial interrupts seen.
#[no_mangle]
pub static SERIAL_IRQS: AtomicU32 = AtomicU32::new(0);
/// Keyboard interrupts seen.
#[no_mangle]
pub static KBD_IRQS: AtomicU32 = AtomicU32::new(0);
/// virtio interrupts seen.
#[no_mangle]
pub static VIRTIO_IRQS: AtomicU32 = AtomicU32::new(0);
/// Watchdog expiries seen.
#[no_mangle]
pub static TIMER_IRQS: AtomicU32 = AtomicU32::new(0);
/// Generic Event Device interrupts seen.
#[no_mangle]
pub static GED_IRQS: AtomicU32 = AtomicU32::new(0);

global_asm!(
    r#"
    .section .text.isr, "ax"
    .code64
serial_isr:
    lock incl SERIAL_IRQS
    jmp eoi_and_return
virtio_isr:
    lock incl VIRTIO_IRQS
    jmp eoi_and_return
kbd_isr:
    lock incl KBD_IRQS
    jmp eoi_and_return
ged_isr:
    lock incl GED_IRQS
    jmp eoi_and_return
timer_isr:
    lock incl TIMER_IRQS
eoi_and_return:
    pushq %rax
    movabsq $0xfee000b0, %rax
    movl $0, (%rax)
    popq %rax
    iretq
spurious_isr:
    iretq

    .section .rodata.isr_table, "a"
    .balign 8
    .globl isr_serial, isr_timer, isr_spurious, isr_virtio
isr_serial:   .quad serial_isr
isr_virtio:   .quad virtio_isr
    .globl isr_kbd, isr_ged
isr_kbd:      .quad kbd_isr
isr_ged:      .quad ged_isr
isr_timer:    .quad timer_isr
isr_spurious: .quad spurious_isr
    "#,
    options(att_syntax)
);

extern "C" {
    static isr_serial: u64;
    static isr_timer: u64;
    static isr_spurious: u64;
    static isr_virtio: u64;
    static isr_kbd: u64;
    static isr_ged: u64;
}

#[repr(C, align(16))]
struct Idt([u64; 512]);
static mut IDT: Idt = Idt([0; 512]);

#[repr(C, packed)]
struct DescriptorPtr {
    limit: u16,
    base: u64,
}

fn lapic_read(reg: u64) -> u32 {
    peek(LAPIC + reg)
}

fn lapic_write(reg: u64, v: u32) {
    poke(LAPIC + reg, v)
}

/// This CPU's APIC ID from its local APIC.
pub fn apic_id() -> u32 {
    lapic_read(LAPIC_ID) >> 24
}

/// Masks both 8259 PICs (so ISA IRQs only arrive through the IOAPIC) and software-enables the
/// local APIC.
pub fn init_bsp() {
    outb(0x21, 0xff);
    outb(0xa1, 0xff);
    lapic_write(LAPIC_SVR, 0x100 | u32::from(SPURIOUS_VECTOR));
}

fn set_gate(vector: u8, handler: u64) {
    let cs: u16;
    // SAFETY: reading CS has no side effects.
    unsafe { core::arch::asm!("mov {0:x}, cs", out(reg) cs, options(nomem, nostack)) };
    let lo = (handler & 0xffff)
        | (u64::from(cs) << 16)
        | (0x8e << 40) // present, DPL 0, 64-bit interrupt gate
        | ((handler >> 16) & 0xffff) << 48;
    let hi = handler >> 32;
    let idt = core::ptr::addr_of_mut!(IDT) as *mut u64;
    // SAFETY: vector < 256, so both words are inside the 512-entry table; only the BSP writes it.
    unsafe {
        idt.add(vector as usize * 2).write_volatile(lo);
        idt.add(vector as usize * 2 + 1).write_volatile(hi);
    }
}

/// Installs the IDT with the serial, timer and spurious handlers.
pub fn load_idt() {
    // SAFETY: the extern statics are addresses defined in the assembly above.
    let (serial, timer, spurious, virtio, kbd, ged) = unsafe {
        (
            isr_serial,
            isr_timer,
            isr_spurious,
            isr_virtio,
            isr_kbd,
            isr_ged,
        )
    };
    set_gate(GED_VECTOR, ged);
    set_gate(KBD_VECTOR, kbd);
    set_gate(SERIAL_VECTOR, serial);
    set_gate(VIRTIO_VECTOR, virtio);
    set_gate(TIMER_VECTOR, timer);
    set_gate(SPURIOUS_VECTOR, spurious);
    let ptr = DescriptorPtr {
        limit: (256 * 16 - 1) as u16,
        base: core::ptr::addr_of!(IDT) as u64,
    };
    // SAFETY: the IDT is static and its handlers exist.
    unsafe { core::arch::asm!("lidt [{0}]", in(reg) &ptr, options(readonly, nostack)) };
}

/// Routes IOAPIC pin `pin` (edge, active high) to `vector` on APIC `dest`, unmasked.
pub fn route_irq(pin: u32, vector: u8, dest: u8) {
    let select = |reg: u32, v: u32| {
        poke::<u32>(IOAPIC, reg);
        poke::<u32>(IOAPIC + 0x10, v);
    };
    select(0x11 + 2 * pin, u32::from(dest) << 24);
    select(0x10 + 2 * pin, u32::from(vector));
}

/// Starts the local APIC timer as a one-shot watchdog of about `ms` milliseconds (KVM's APIC
/// timer counts at 1 GHz; divide by 16).
pub fn start_watchdog(ms: u32) {
    lapic_write(LAPIC_TIMER_DIV, 0x3);
    lapic_write(LAPIC_LVT_TIMER, u32::from(TIMER_VECTOR));
    lapic_write(LAPIC_TIMER_INIT, ms.saturating_mul(62_500));
}

/// Stops the watchdog.
pub fn stop_watchdog() {
    lapic_write(LAPIC_TIMER_INIT, 0);
}

/// Sends INIT then STARTUP (vector = page number of the trampoline) to APIC `dest`.
pub fn send_init_sipi(dest: u8, trampoline: u64) {
    lapic_write(LAPIC_ICR_HI, u32::from(dest) << 24);
    lapic_write(LAPIC_ICR_LO, 0x4500); // INIT, level assert
    lapic_write(LAPIC_ICR_HI, u32::from(dest) << 24);
    lapic_write(LAPIC_ICR_LO, 0x4600 | (trampoline >> 12) as u32); // STARTUP
}

/// Acknowledges the current interrupt.
pub fn eoi() {
    lapic_write(LAPIC_EOI, 0);
}

/// Serial interrupts taken so far.
pub fn serial_irqs() -> u32 {
    SERIAL_IRQS.load(Ordering::SeqCst)
}

/// Keyboard interrupts taken so far.
pub fn kbd_irqs() -> u32 {
    KBD_IRQS.load(Ordering::SeqCst)
}

/// virtio interrupts taken so far.
pub fn virtio_irqs() -> u32 {
    VIRTIO_IRQS.load(Ordering::SeqCst)
}

/// Generic Event Device interrupts so far.
pub fn ged_irqs() -> u32 {
    GED_IRQS.load(Ordering::SeqCst)
}

/// Watchdog expiries so far.
pub fn timer_irqs() -> u32 {
    TIMER_IRQS.load(Ordering::SeqCst)
}
