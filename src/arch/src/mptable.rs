//! Intel MultiProcessor Specification 1.4 tables: how a guest without ACPI learns its CPUs,
//! its IOAPIC and how ISA interrupts are wired.

use crate::layout::{APIC_START, EBDA_START, HIMEM_START, IOAPIC_PINS, IOAPIC_START};
use thiserror::Error;

/// Highest vCPU count the MP table can describe: APIC IDs are 8 bits wide and one ID goes to
/// the IOAPIC (and 0xff means "all").
pub const MAX_CPUS: u8 = 254;

const FLOATING_POINTER_SIZE: usize = 16;
const HEADER_SIZE: usize = 44;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;

const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;

const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
// Family 6 signature and FPU|APIC feature bits: what Linux expects to see for a modern CPU.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = (1 << 9) | 1;

/// Errors building the MP table.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum Error {
    /// Zero or too many CPUs.
    #[error("the MP table can describe 1 to {MAX_CPUS} vCPUs, not {0}")]
    CpuCount(u32),
}

/// Guest address of the MP floating pointer structure.
pub const MPTABLE_START: u64 = EBDA_START;

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// Builds the MP floating pointer followed by the configuration table for `num_cpus` vCPUs
/// (APIC IDs 0..n, the first the bootstrap processor), one ISA bus, one IOAPIC with every ISA
/// IRQ routed to its IOAPIC pin (IRQ 0 to pin 2), and LINT0/LINT1 wired as ExtINT/NMI.
/// The result is written at [`MPTABLE_START`].
pub fn build(num_cpus: u32) -> Result<Vec<u8>, Error> {
    if num_cpus == 0 || num_cpus > u32::from(MAX_CPUS) {
        return Err(Error::CpuCount(num_cpus));
    }
    let ioapic_id = num_cpus as u8;
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..num_cpus as u8 {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTSTRAP } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    count += 1;
    // The 8259's output reaches pin 0 (ExtINT); ISA IRQ 0 (the PIT) is wired to pin 2, as on a
    // PC and as KVM routes GSI 0; every other IRQ goes to the pin of its number.
    entries.extend_from_slice(&[
        ENTRY_IO_INTERRUPT,
        INT_TYPE_EXTINT,
        0,
        0,
        0,
        0,
        ioapic_id,
        0,
    ]);
    entries.extend_from_slice(&[ENTRY_IO_INTERRUPT, INT_TYPE_INT, 0, 0, 0, 0, ioapic_id, 2]);
    count += 2;
    for irq in (1..IOAPIC_PINS).filter(|&i| i != 2) {
        entries.extend_from_slice(&[
            ENTRY_IO_INTERRUPT,
            INT_TYPE_INT,
            0,
            0,
            0,
            irq,
            ioapic_id,
            irq,
        ]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_addr = MPTABLE_START + FLOATING_POINTER_SIZE as u64;
    let table_len = HEADER_SIZE + entries.len();
    let mut header = Vec::with_capacity(HEADER_SIZE);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&(table_len as u16).to_le_bytes());
    header.push(4); // spec revision 1.4
    header.push(0); // checksum, filled below
    header.extend_from_slice(b"VIREO   ");
    header.extend_from_slice(b"MICROVM     ");
    header.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    header.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    header.extend_from_slice(&[0, 0, 0, 0]); // extended table length, checksum, reserved
    let mut table = header;
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut out = Vec::with_capacity(FLOATING_POINTER_SIZE + table.len());
    out.extend_from_slice(b"_MP_");
    out.extend_from_slice(&(table_addr as u32).to_le_bytes());
    out.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]);
    out[10] = checksum(&out);
    out.extend_from_slice(&table);
    debug_assert!(MPTABLE_START + out.len() as u64 <= HIMEM_START);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_counts() {
        for n in [1u32, 2, 64, MAX_CPUS as u32] {
            let t = build(n).unwrap();
            assert_eq!(&t[0..4], b"_MP_");
            assert_eq!(sum(&t[0..16]), 0);
            let len = u16::from_le_bytes([t[20], t[21]]) as usize;
            assert_eq!(sum(&t[16..16 + len]), 0);
            assert_eq!(16 + len, t.len());
            let entries = u16::from_le_bytes([t[16 + 34], t[16 + 35]]) as u32;
            assert_eq!(entries, n + 1 + 1 + IOAPIC_PINS as u32 + 2);
            let processors = t[60..]
                .chunks(20)
                .take(n as usize)
                .filter(|e| e[0] == ENTRY_PROCESSOR)
                .count();
            assert_eq!(processors as u32, n);
            assert!(MPTABLE_START + t.len() as u64 <= HIMEM_START);
        }
    }

    #[test]
    fn rejects_bad_counts() {
        assert_eq!(build(0), Err(Error::CpuCount(0)));
        assert_eq!(build(255), Err(Error::CpuCount(255)));
    }
}
