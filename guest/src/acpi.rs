//! Reading the ACPI tables the way an ACPI-aware kernel does: RSDP → XSDT → FADT / MADT → DSDT.

use crate::io::peek;

/// What the tables say, as far as the tests care.
pub struct Acpi {
    /// Where the RSDP was.
    pub rsdp: u64,
    /// Tables reached through the XSDT (plus the DSDT).
    pub tables: u32,
    /// Enabled local APICs in the MADT.
    pub cpus: u32,
    /// IOAPICs in the MADT.
    pub ioapics: u32,
    /// FADT says hardware-reduced ACPI.
    pub hw_reduced: bool,
    /// Sleep control register (I/O port), 0 if none.
    pub sleep_port: u16,
    /// Reset register (I/O port) and value, 0 if none.
    pub reset_port: u16,
    /// Value to write to the reset register.
    pub reset_value: u8,
    /// SLP_TYPa from the DSDT's `\_S5_` package.
    pub s5: Option<u8>,
    /// Address of the VM generation ID (the `ADDR` package of the DSDT), 0 if none.
    pub vmgenid: u64,
    /// Interrupt line of the Generic Event Device (`ACPI0013`), if there is one.
    pub ged_irq: Option<u32>,
}

fn checksum_ok(addr: u64, len: u64) -> bool {
    let mut sum = 0u8;
    for i in 0..len {
        sum = sum.wrapping_add(peek::<u8>(addr + i));
    }
    sum == 0
}

fn table(addr: u64) -> Result<(u32, u64), &'static [u8]> {
    let len = u64::from(peek::<u32>(addr + 4));
    if !(36..=0x10_0000).contains(&len) {
        return Err(b"an ACPI table has an impossible length");
    }
    if !checksum_ok(addr, len) {
        return Err(b"an ACPI table checksum is wrong");
    }
    Ok((peek::<u32>(addr), len))
}

/// `\_S5_` package's first element, found by scanning the AML for the name.
fn s5_type(dsdt: u64, len: u64) -> Option<u8> {
    let name = u32::from_le_bytes(*b"_S5_");
    let mut i = 36;
    while i + 8 < len {
        if peek::<u32>(dsdt + i) == name && peek::<u8>(dsdt + i + 4) == 0x12 {
            let pkg = dsdt + i + 5;
            let extra = u64::from(peek::<u8>(pkg) >> 6); // PkgLength's following bytes
            let first = pkg + 1 + extra + 1; // skip PkgLength and NumElements
            return match peek::<u8>(first) {
                0x00 => Some(0),
                0x01 => Some(1),
                0x0a => Some(peek::<u8>(first + 1)),
                _ => None,
            };
        }
        i += 1;
    }
    None
}

/// An AML integer at `at` (ZeroOp, OneOp or a Byte/Word/DWord/QWord constant) and the bytes
/// it takes.
fn aml_int(at: u64) -> Option<(u64, u64)> {
    match peek::<u8>(at) {
        0x00 => Some((0, 1)),
        0x01 => Some((1, 1)),
        0x0a => Some((u64::from(peek::<u8>(at + 1)), 2)),
        0x0b => Some((u64::from(peek::<u16>(at + 1)), 3)),
        0x0c => Some((u64::from(peek::<u32>(at + 1)), 5)),
        0x0e => Some((peek::<u64>(at + 1), 9)),
        _ => None,
    }
}

/// The VM generation ID's address: `Name (ADDR, Package { low, high })` in the DSDT.
fn vmgenid_addr(dsdt: u64, len: u64) -> u64 {
    let name = u32::from_le_bytes(*b"ADDR");
    let mut i = 36;
    while i + 8 < len {
        if peek::<u32>(dsdt + i) == name && peek::<u8>(dsdt + i + 4) == 0x12 {
            let pkg = dsdt + i + 5;
            let extra = u64::from(peek::<u8>(pkg) >> 6);
            let first = pkg + 1 + extra + 1;
            if let Some((low, n)) = aml_int(first) {
                if let Some((high, _)) = aml_int(first + n) {
                    return (high << 32) | (low & 0xffff_ffff);
                }
            }
            return 0;
        }
        i += 1;
    }
    0
}

/// The interrupt of the `ACPI0013` device: the first Extended Interrupt descriptor (0x89)
/// after its _HID.
fn ged_irq(dsdt: u64, len: u64) -> Option<u32> {
    let hid = *b"ACPI0013";
    let mut i = 36;
    while i + 8 < len {
        if (0..8).all(|k| peek::<u8>(dsdt + i + k) == hid[k as usize]) {
            let mut j = i + 8;
            while j + 9 < len && j < i + 64 {
                // Descriptor length 6 (flags, one interrupt), one interrupt in the table.
                if peek::<u8>(dsdt + j) == 0x89 && peek::<u16>(dsdt + j + 1) == 6 {
                    return Some(peek::<u32>(dsdt + j + 5));
                }
                j += 1;
            }
            return None;
        }
        i += 1;
    }
    None
}

/// Finds and checks the tables. `hint` is the RSDP address from the boot protocol, or 0 to
/// scan the BIOS area for it.
pub fn read(hint: u64) -> Result<Acpi, &'static [u8]> {
    let sig = u64::from_le_bytes(*b"RSD PTR ");
    let mut rsdp = hint;
    if rsdp == 0 {
        let mut a = 0xe0000u64;
        while a < 0x10_0000 {
            if peek::<u64>(a) == sig {
                rsdp = a;
                break;
            }
            a += 16;
        }
    }
    if rsdp == 0 || peek::<u64>(rsdp) != sig {
        return Err(b"no RSDP");
    }
    if !checksum_ok(rsdp, 20) || !checksum_ok(rsdp, 36) {
        return Err(b"RSDP checksum is wrong");
    }
    let xsdt: u64 = peek(rsdp + 24);
    let (xsig, xlen) = table(xsdt)?;
    if xsig != u32::from_le_bytes(*b"XSDT") {
        return Err(b"RSDP does not point at an XSDT");
    }
    let mut acpi = Acpi {
        rsdp,
        tables: 0,
        cpus: 0,
        ioapics: 0,
        hw_reduced: false,
        sleep_port: 0,
        reset_port: 0,
        reset_value: 0,
        s5: None,
        vmgenid: 0,
        ged_irq: None,
    };
    let mut e = xsdt + 36;
    while e < xsdt + xlen {
        let t: u64 = peek(e);
        let (tsig, tlen) = table(t)?;
        acpi.tables += 1;
        if tsig == u32::from_le_bytes(*b"FACP") {
            acpi.hw_reduced = peek::<u32>(t + 112) & (1 << 20) != 0;
            if peek::<u8>(t + 244) == 1 {
                acpi.sleep_port = peek::<u64>(t + 248) as u16;
            }
            if peek::<u8>(t + 116) == 1 {
                acpi.reset_port = peek::<u64>(t + 120) as u16;
                acpi.reset_value = peek::<u8>(t + 128);
            }
            let mut dsdt: u64 = peek(t + 140);
            if dsdt == 0 {
                dsdt = u64::from(peek::<u32>(t + 40));
            }
            let (dsig, dlen) = table(dsdt)?;
            if dsig != u32::from_le_bytes(*b"DSDT") {
                return Err(b"FADT does not point at a DSDT");
            }
            acpi.tables += 1;
            acpi.s5 = s5_type(dsdt, dlen);
            acpi.vmgenid = vmgenid_addr(dsdt, dlen);
            acpi.ged_irq = ged_irq(dsdt, dlen);
        } else if tsig == u32::from_le_bytes(*b"APIC") {
            let mut s = t + 44;
            while s < t + tlen {
                let kind = peek::<u8>(s);
                let len = u64::from(peek::<u8>(s + 1));
                if len == 0 {
                    return Err(b"MADT entry of length 0");
                }
                if kind == 0 && peek::<u32>(s + 4) & 1 != 0 {
                    acpi.cpus += 1;
                } else if kind == 1 {
                    acpi.ioapics += 1;
                }
                s += len;
            }
        }
        e += 8;
    }
    Ok(acpi)
}
