//! Port I/O, memory-mapped registers and the COM1 console.

use core::arch::asm;

/// Writes a byte to an I/O port.
pub fn outb(port: u16, v: u8) {
    // SAFETY: port I/O has no memory effects visible to Rust.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack, preserves_flags))
    }
}

/// Reads a byte from an I/O port.
pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: as above.
    unsafe {
        asm!("in al, dx", out("al") v, in("dx") port, options(nomem, nostack, preserves_flags))
    }
    v
}

/// Reads a value at a physical address (identity-mapped).
pub fn peek<T: Copy>(addr: u64) -> T {
    // SAFETY: the guest identity-maps all of low memory; callers pass addresses the VMM gave.
    unsafe { core::ptr::read_volatile(addr as *const T) }
}

/// Writes a value at a physical address.
pub fn poke<T: Copy>(addr: u64, v: T) {
    // SAFETY: as above.
    unsafe { core::ptr::write_volatile(addr as *mut T, v) }
}

const COM1: u16 = 0x3f8;
const LSR_THR_EMPTY: u8 = 0x20;
const LSR_DATA_READY: u8 = 0x01;

/// Sets COM1 to 8N1 with interrupts off.
pub fn serial_init() {
    outb(COM1 + 1, 0x00); // IER
    outb(COM1 + 3, 0x03); // LCR: 8 bits, no parity, 1 stop bit
}

/// Sends one byte on COM1, waiting for the transmitter as a real driver must.
pub fn putc(c: u8) {
    while inb(COM1 + 5) & LSR_THR_EMPTY == 0 {}
    outb(COM1, c);
}

/// Receives a byte from COM1 if one is waiting.
pub fn getc() -> Option<u8> {
    (inb(COM1 + 5) & LSR_DATA_READY != 0).then(|| inb(COM1))
}

/// Sends bytes, turning `\n` into `\r\n` for terminals in raw mode.
pub fn puts(s: &[u8]) {
    for &c in s {
        if c == b'\n' {
            putc(b'\r');
        }
        putc(c);
    }
}

/// Prints `v` in hexadecimal with a 0x prefix.
pub fn put_hex(v: u64) {
    puts(b"0x");
    let mut started = false;
    for shift in (0..16).rev() {
        let d = ((v >> (shift * 4)) & 0xf) as u8;
        if d != 0 || started || shift == 0 {
            started = true;
            putc(if d < 10 { b'0' + d } else { b'a' + d - 10 });
        }
    }
}

/// Prints `v` in decimal.
pub fn put_dec(mut v: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    puts(&buf[i..]);
}
