//! Finding the CPUs through the Intel MP table in the EBDA.

use crate::io::peek;

/// Most CPUs the guest tracks.
pub const MAX_CPUS: usize = 256;

/// The processors the MP table lists.
pub struct Cpus {
    /// APIC IDs, in table order.
    pub apic_ids: [u8; MAX_CPUS],
    /// Valid entries.
    pub count: usize,
    /// APIC ID of the bootstrap processor.
    pub bsp: u8,
}

fn checksum_ok(addr: u64, len: u64) -> bool {
    let mut sum = 0u8;
    for i in 0..len {
        sum = sum.wrapping_add(peek::<u8>(addr + i));
    }
    sum == 0
}

/// Scans the first KiB of the EBDA for the MP floating pointer and reads the processor entries
/// of its configuration table. Errors are reported as text.
pub fn find_cpus() -> Result<Cpus, &'static [u8]> {
    let mut fp = 0;
    let mut a = 0x9fc00u64;
    while a < 0xa0000 {
        if peek::<u32>(a) == u32::from_le_bytes(*b"_MP_") {
            fp = a;
            break;
        }
        a += 16;
    }
    if fp == 0 {
        return Err(b"no MP floating pointer in the EBDA");
    }
    if !checksum_ok(fp, 16) {
        return Err(b"MP floating pointer checksum is wrong");
    }
    let table = u64::from(peek::<u32>(fp + 4));
    if peek::<u32>(table) != u32::from_le_bytes(*b"PCMP") {
        return Err(b"MP configuration table signature is wrong");
    }
    let len = u64::from(peek::<u16>(table + 4));
    if !checksum_ok(table, len) {
        return Err(b"MP configuration table checksum is wrong");
    }
    let entries = peek::<u16>(table + 34);
    let mut cpus = Cpus {
        apic_ids: [0; MAX_CPUS],
        count: 0,
        bsp: 0,
    };
    let mut e = table + 44;
    for _ in 0..entries {
        let kind = peek::<u8>(e);
        if kind == 0 {
            let id = peek::<u8>(e + 1);
            let flags = peek::<u8>(e + 3);
            if flags & 1 != 0 && cpus.count < MAX_CPUS {
                cpus.apic_ids[cpus.count] = id;
                cpus.count += 1;
            }
            if flags & 2 != 0 {
                cpus.bsp = id;
            }
            e += 20;
        } else {
            e += 8;
        }
    }
    Ok(cpus)
}
