//! vireo's test guest.
//!
//! A freestanding kernel that boots through PVH, the Linux 64-bit protocol from an ELF, or a
//! bzImage; reports what it was given on COM1; starts the other CPUs; optionally echoes a line
//! of serial input taken by interrupt; and ends as the command line asks.
//!
//! Lines starting with `@` are for the test suite (`@key field=value ...`); the rest is a banner
//! for people. Command-line options it understands:
//! * `vireo.end=poweroff|reset|acpi-off|acpi-reset|triplefault|badfetch|hang` — how to end
//!   (default poweroff: the 0x501 port; acpi-off and acpi-reset use the FADT's registers);
//! * `vireo.input` — wait (up to 10 s) for one line on the serial port and echo it back;
//! * `vireo.kbd` — wait (up to 10 s) for eight keyboard bytes (IRQ 1) and report them;
//! * `vireo.firstbyte` — write one byte and power off at once (the boot benchmark);
//! * `vireo.nohash` — do not hash the initrd (large ones take long at CPL0);
//! * `vireo.count=N` — count N timer ticks, printing each (the snapshot tests; see `ticker`);
//! * `vireo.balloontest=N` — drive the balloon (see `balloon`);
//! * `vireo.memtest` — drive the virtio-mem device (see `mem`);
//! * `vireo.touch=N` — write one byte in every 4 KiB page of N MiB from 16 MiB up (the jailer's
//!   memory-limit test), then report `@touched mib=N`.
//!
//! Runs entirely at CPL0, which on some hosts means in KVM's instruction emulator: keep the
//! instruction count small and integer-only.

#![no_std]

pub mod acpi;
pub mod apic;
mod balloon;
pub mod boot;
mod devtest;
mod entry;
pub mod io;
mod mem;
pub mod mp;
mod net;
mod ring;
pub mod smp;
mod ticker;
pub mod virtio;
mod vsock;

use boot::BootInfo;
use io::{getc, put_dec, put_hex, puts};

extern "Rust" {
    /// Which image this is ("elf", "pvh" or "bzimage"), defined by each binary.
    static VIREO_GUEST_IMAGE: &'static [u8];
}

/// `vireo.touch=N`: makes the host back N MiB of guest RAM, one write per page.
fn touch(v: &[u8]) {
    let mib = v
        .iter()
        .take_while(|c| c.is_ascii_digit())
        .fold(0u64, |n, c| n * 10 + u64::from(c - b'0'));
    let base = 16u64 << 20;
    let mut a = base;
    while a < base + (mib << 20) {
        io::poke::<u8>(a, 0x5a);
        a += 4096;
    }
    puts(b"@touched");
    field(b"mib", mib, false);
    puts(b"\n");
}

fn fnv1a(addr: u64, len: u64) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for i in 0..len {
        h ^= u32::from(io::peek::<u8>(addr + i));
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

pub(crate) fn field(name: &[u8], v: u64, hex: bool) {
    puts(b" ");
    puts(name);
    puts(b"=");
    if hex {
        put_hex(v)
    } else {
        put_dec(v)
    }
}

/// Reads one line of serial input, woken by the UART's interrupt through the IOAPIC.
fn read_line(bsp: u8, buf: &mut [u8]) -> Option<usize> {
    apic::route_irq(4, apic::SERIAL_VECTOR, bsp);
    io::outb(0x3f8 + 4, 0x0b); // MCR: DTR, RTS, OUT2 (the IRQ gate on a PC)
    io::outb(0x3f8 + 1, 0x01); // IER: received data available
    puts(b"@input ready\n");
    apic::start_watchdog(10_000);
    let mut n = 0;
    loop {
        // Halt first: input that arrived since IER was set has already raised the interrupt,
        // which is pending until interrupts are enabled, so the wake-up is never missed.
        // SAFETY: wait for the next interrupt; the handlers only bump counters.
        unsafe { core::arch::asm!("sti; hlt; cli", options(nomem, nostack)) };
        while let Some(c) = getc() {
            if c == b'\n' || c == b'\r' {
                apic::stop_watchdog();
                return Some(n);
            }
            if n < buf.len() {
                buf[n] = c;
                n += 1;
            }
        }
        if apic::timer_irqs() > 0 {
            return None;
        }
    }
}

/// Waits (up to 10 s) for eight bytes from the keyboard, taken by interrupt (IRQ 1), and reports
/// them: what a Ctrl+Alt+Del from the host looks like to the guest.
fn read_keys(bsp: u8) {
    apic::route_irq(1, apic::KBD_VECTOR, bsp);
    puts(b"@kbd ready\n");
    let mut got = [0u8; 8];
    let mut n = 0;
    let expiries = apic::timer_irqs();
    apic::start_watchdog(10_000);
    while n < got.len() && apic::timer_irqs() == expiries {
        // SAFETY: wait for the keyboard (or watchdog) interrupt.
        unsafe { core::arch::asm!("sti; hlt; cli", options(nomem, nostack)) };
        while n < got.len() && io::inb(0x64) & 1 != 0 {
            got[n] = io::inb(0x60);
            n += 1;
        }
    }
    apic::stop_watchdog();
    puts(b"@kbd bytes=");
    for &b in &got[..n] {
        let hex = |d: u8| if d < 10 { b'0' + d } else { b'a' + d - 10 };
        io::putc(hex(b >> 4));
        io::putc(hex(b & 0xf));
    }
    field(b"irqs", u64::from(apic::kbd_irqs()), false);
    puts(b"\n");
}

fn end(how: &[u8], acpi: Option<&acpi::Acpi>) -> ! {
    puts(b"@end ");
    puts(how);
    puts(b"\n");
    match how {
        b"reset" => io::outb(0x64, 0xfe),
        b"triplefault" => {
            let zero = [0u8; 10];
            // SAFETY: deliberately loads an empty IDT and raises #UD, which cannot be delivered.
            unsafe { core::arch::asm!("lidt [{0}]", "ud2", in(reg) &zero, options(noreturn)) }
        }
        b"badfetch" => {
            // SAFETY: deliberately jumps into the MMIO hole, where there is no memory to fetch.
            unsafe { core::arch::asm!("jmp {0}", in(reg) 0xd000_0000u64, options(noreturn)) }
        }
        b"hang" => {}
        b"acpi-off" => match acpi {
            Some(a) if a.sleep_port != 0 => {
                io::outb(a.sleep_port, (a.s5.unwrap_or(0) << 2) | 0x20); // SLP_TYP | SLP_EN
            }
            _ => puts(b"@error no ACPI sleep control register\n"),
        },
        b"acpi-reset" => match acpi {
            Some(a) if a.reset_port != 0 => io::outb(a.reset_port, a.reset_value),
            _ => puts(b"@error no ACPI reset register\n"),
        },
        _ => io::outb(0x501, 0),
    }
    loop {
        // SAFETY: park the CPU.
        unsafe { core::arch::asm!("cli; hlt", options(nomem, nostack)) };
    }
}

/// The guest proper, once in long mode with a stack.
pub fn main(info: BootInfo) -> ! {
    if info.has_option(b"vireo.firstbyte") {
        // Boot-time benchmark: one byte out, then off at once. The power port ends vireo and
        // QEMU (isa-debug-exit); Cloud Hypervisor takes ACPI S5 at its sleep control port
        // 0x600; Firecracker takes the i8042 reset.
        io::outb(0x3f8, b'!');
        io::outb(0x501, 0);
        io::outb(0x600, (5 << 2) | 0x20);
        io::outb(0x64, 0xfe);
    }
    io::serial_init();
    // SAFETY: every binary defines the symbol.
    let image = unsafe { VIREO_GUEST_IMAGE };
    puts(b"\nvireo test guest: ");
    puts(image);
    puts(b" image, ");
    puts(info.protocol);
    puts(b" boot\n@boot image=");
    puts(image);
    puts(b" protocol=");
    puts(info.protocol);
    puts(b"\n");
    if let Some(p) = info.problem {
        puts(b"@error ");
        puts(p);
        puts(b"\n");
    }

    let mut ram = 0;
    for (i, &(addr, size, kind)) in info.memmap[..info.memmap_len].iter().enumerate() {
        puts(b"@mem");
        field(b"index", i as u64, false);
        field(b"addr", addr, true);
        field(b"size", size, true);
        field(b"type", u64::from(kind), false);
        puts(b"\n");
        if kind == 1 {
            ram += size;
        }
    }
    puts(b"@memtotal");
    field(b"ram", ram, false);
    field(b"entries", info.memmap_len as u64, false);
    puts(b"\n");

    let (cl_addr, cl_len) = info.cmdline;
    puts(b"@cmdline ");
    // SAFETY: the VMM wrote `cl_len` bytes at `cl_addr`.
    let cmdline = unsafe { core::slice::from_raw_parts(cl_addr as *const u8, cl_len) };
    io::puts(cmdline);
    puts(b"\n");

    match info.initrd {
        Some((addr, size)) => {
            puts(b"@initrd");
            field(b"addr", addr, true);
            field(b"size", size, false);
            if !info.has_option(b"vireo.nohash") {
                field(b"fnv1a", u64::from(fnv1a(addr, size)), true);
            }
            puts(b"\n");
        }
        None => puts(b"@initrd none\n"),
    }

    let acpi = match acpi::read(info.rsdp) {
        Ok(a) => {
            puts(b"@acpi");
            field(b"rsdp", a.rsdp, true);
            field(b"from_boot_data", u64::from(info.rsdp != 0), false);
            field(b"tables", u64::from(a.tables), false);
            field(b"cpus", u64::from(a.cpus), false);
            field(b"ioapics", u64::from(a.ioapics), false);
            field(b"hw_reduced", u64::from(a.hw_reduced), false);
            field(b"s5", a.s5.map_or(0xff, u64::from), false);
            field(b"sleep_port", u64::from(a.sleep_port), true);
            field(b"reset_port", u64::from(a.reset_port), true);
            field(b"vmgenid", a.vmgenid, true);
            field(b"ged_irq", a.ged_irq.map_or(0xff, u64::from), false);
            puts(b"\n");
            Some(a)
        }
        Err(e) => {
            puts(b"@acpi none ");
            puts(e);
            puts(b"\n");
            None
        }
    };

    let mut online = 1;
    let mut listed = 1;
    let bsp = apic::apic_id() as u8;
    apic::init_bsp();
    apic::load_idt();
    match mp::find_cpus() {
        Ok(cpus) => {
            listed = cpus.count;
            puts(b"@cpus");
            field(b"listed", cpus.count as u64, false);
            field(b"bsp", u64::from(cpus.bsp), false);
            puts(b"\n");
            smp::report_cpu(b"bsp");
            online += smp::start_aps(&cpus.apic_ids[..cpus.count], cpus.bsp);
        }
        Err(e) => {
            // Without an MP table (QEMU's microvm, say) only this CPU runs the tests.
            puts(b"@error ");
            puts(e);
            puts(b"\n");
        }
    }
    devtest::run(&info, cmdline, bsp);
    if let Some(v) = info.option_value(b"vireo.touch") {
        touch(v);
    }
    ticker::run(
        &info,
        cmdline,
        bsp,
        acpi.as_ref().map_or(0, |a| a.vmgenid),
        acpi.as_ref().and_then(|a| a.ged_irq),
    );
    if info.has_option(b"vireo.kbd") {
        read_keys(bsp);
    }
    if info.has_option(b"vireo.input") {
        let mut buf = [0u8; 128];
        match read_line(bsp, &mut buf) {
            Some(n) => {
                puts(b"@input line=");
                puts(&buf[..n]);
                field(b"irqs", u64::from(apic::serial_irqs()), false);
                puts(b"\n");
            }
            None => puts(b"@input timeout\n"),
        }
    }

    puts(b"\n  Hello from vireo!\n  booted   ");
    puts(image);
    puts(b" image via ");
    puts(if info.protocol == b"pvh" {
        b"PVH" as &[u8]
    } else {
        b"the Linux 64-bit boot protocol"
    });
    puts(b"\n  memory   ");
    put_dec(ram >> 20);
    puts(b" MiB usable in ");
    put_dec(info.memmap_len as u64);
    puts(b" ranges\n  cpus     ");
    put_dec(online as u64);
    puts(b" of ");
    put_dec(listed as u64);
    puts(b" running\n  cmdline  ");
    puts(cmdline);
    puts(b"\n  initrd   ");
    match info.initrd {
        Some((_, size)) => {
            put_dec(size);
            puts(b" bytes\n\n");
        }
        None => puts(b"none\n\n"),
    }
    puts(b"@cpus");
    field(b"online", online as u64, false);
    puts(b"\n");

    end(
        info.option_value(b"vireo.end").unwrap_or(b"poweroff"),
        acpi.as_ref(),
    )
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    puts(b"@error guest panic\n");
    end(b"poweroff", None)
}
