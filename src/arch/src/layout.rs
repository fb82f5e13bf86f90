//! Guest physical memory layout.
//!
//! ```text
//! 0x0000_0500  GDT (boot)                      0x0000_0520  IDT (boot, empty)
//! 0x0000_6000  PVH hvm_start_info, module list and memory map
//! 0x0000_7000  Linux zero page (boot_params)
//! 0x0000_8ff0  initial stack pointer (grows down)
//! 0x0000_9000  PML4, 0xa000 PDPT, 0xb000..0xf000 four page directories (identity map of 4 GiB)
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  EBDA: MP floating pointer and configuration table
//! 0x000e_0000  ACPI: RSDP, XSDT, FADT, MADT, DSDT
//! 0x0010_0000  kernel (HIMEM_START); initrd at the top of low RAM
//! 0xc000_0000  32-bit MMIO gap (IOAPIC 0xfec0_0000, LAPIC 0xfee0_0000) up to 4 GiB
//! 0x1_0000_0000 RAM above the gap when the guest has more than 3 GiB
//! ```

use thiserror::Error;

/// Boot GDT, written by the VMM for protocols that enter with paging or protection on.
pub const BOOT_GDT_START: u64 = 0x500;
/// Boot IDT (empty): the guest installs its own before enabling interrupts.
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (one entry: the initrd).
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map entries.
pub const PVH_MEMMAP_START: u64 = 0x6080;
/// Maximum number of PVH memory map entries that fit before the zero page.
pub const PVH_MEMMAP_MAX_ENTRIES: usize = ((ZERO_PAGE_START - PVH_MEMMAP_START) / 24) as usize;
/// Linux boot_params ("zero page").
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the 64-bit entry.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Page map level 4 of the boot identity map.
pub const PML4_START: u64 = 0x9000;
/// Page directory pointer table of the boot identity map.
pub const PDPTE_START: u64 = 0xa000;
/// First of four page directories (2 MiB pages) of the boot identity map.
pub const PDE_START: u64 = 0xb000;
/// How much of the address space the boot page tables map one-to-one.
pub const IDENTITY_MAP_SIZE: u64 = 4 << 30;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Longest command line (with its NUL) for kernels that do not state their own limit:
/// Linux's x86 COMMAND_LINE_SIZE.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Extended BIOS data area; holds the MP table. RAM below it is usable by the guest.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables (RSDP first, where an ACPI-aware guest scans for it: the BIOS area
/// 0xe0000-0xfffff, reserved in the memory map).
pub const ACPI_START: u64 = 0xe0000;
/// The VM generation ID's 16 bytes: the last page of the reserved BIOS area, above the ACPI
/// tables.
pub const VMGENID_START: u64 = 0xf_f000;
/// First byte above the legacy BIOS/VGA area; kernels load here or above.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO hole.
pub const MMIO_GAP_END: u64 = 1 << 32;
/// IOAPIC MMIO base, as KVM's in-kernel IOAPIC expects.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC MMIO base.
pub const APIC_START: u64 = 0xfee0_0000;
/// Number of IOAPIC pins (GSIs) KVM's in-kernel IOAPIC provides.
pub const IOAPIC_PINS: u8 = 24;

/// Errors building a memory layout.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum Error {
    /// Guest memory too small to hold the boot structures and a kernel.
    #[error("guest memory of {0} bytes is too small: vireo needs at least {min} bytes", min = MIN_MEMORY)]
    TooSmall(u64),
}

/// Smallest guest memory vireo accepts: the low structures plus room above 1 MiB.
pub const MIN_MEMORY: u64 = 2 << 20;

/// What an address range holds, in e820 terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryType {
    /// Usable RAM (e820 type 1).
    Ram = 1,
    /// Reserved (e820 type 2).
    Reserved = 2,
}

/// One range of the guest physical address space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryRegion {
    /// First byte.
    pub start: u64,
    /// Length in bytes.
    pub size: u64,
    /// What it holds.
    pub kind: MemoryType,
}

impl MemoryRegion {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.start + self.size
    }
}

/// The RAM slots backing `mem_size` bytes of guest memory: one below the MMIO gap and, for
/// guests larger than 3 GiB, one above 4 GiB.
pub fn ram_regions(mem_size: u64) -> Result<Vec<(u64, u64)>, Error> {
    if mem_size < MIN_MEMORY {
        return Err(Error::TooSmall(mem_size));
    }
    if mem_size <= MMIO_GAP_START {
        Ok(vec![(0, mem_size)])
    } else {
        Ok(vec![
            (0, MMIO_GAP_START),
            (MMIO_GAP_END, mem_size - MMIO_GAP_START),
        ])
    }
}

/// The memory map reported to the guest (e820 / PVH memmap): RAM below the EBDA, the
/// reserved EBDA and BIOS area, RAM from 1 MiB, and RAM above 4 GiB if any.
pub fn memory_map(mem_size: u64) -> Result<Vec<MemoryRegion>, Error> {
    let slots = ram_regions(mem_size)?;
    let mut map = vec![
        MemoryRegion {
            start: 0,
            size: EBDA_START,
            kind: MemoryType::Ram,
        },
        MemoryRegion {
            start: EBDA_START,
            size: HIMEM_START - EBDA_START,
            kind: MemoryType::Reserved,
        },
        MemoryRegion {
            start: HIMEM_START,
            size: slots[0].1 - HIMEM_START,
            kind: MemoryType::Ram,
        },
    ];
    if let Some(&(start, size)) = slots.get(1) {
        map.push(MemoryRegion {
            start,
            size,
            kind: MemoryType::Ram,
        });
    }
    Ok(map)
}

/// End of RAM below the 32-bit MMIO gap: where a top-of-low-memory initrd must end.
pub fn low_ram_end(mem_size: u64) -> u64 {
    mem_size.min(MMIO_GAP_START)
}

/// Where a memory hotplug region of `size` bytes goes for a guest of `mem_size` bytes: after
/// RAM, aligned to `align`, below the MMIO gap if it fits there, else above 4 GiB. It is not in
/// the memory map the guest gets; the virtio-mem device announces it.
pub fn hotplug_base(mem_size: u64, size: u64, align: u64) -> u64 {
    let ram_end = if mem_size <= MMIO_GAP_START {
        mem_size
    } else {
        MMIO_GAP_END + (mem_size - MMIO_GAP_START)
    };
    let low = ram_end.next_multiple_of(align);
    if ram_end <= MMIO_GAP_START && low.saturating_add(size) <= MMIO_GAP_START {
        low
    } else {
        ram_end.max(MMIO_GAP_END).next_multiple_of(align)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_is_one_slot() {
        assert_eq!(ram_regions(128 << 20).unwrap(), vec![(0, 128 << 20)]);
        let map = memory_map(128 << 20).unwrap();
        assert_eq!(map.len(), 3);
        assert_eq!(map[2].end(), 128 << 20);
        let ram: u64 = map
            .iter()
            .filter(|r| r.kind == MemoryType::Ram)
            .map(|r| r.size)
            .sum();
        assert_eq!(ram, (128 << 20) - (HIMEM_START - EBDA_START));
    }

    #[test]
    fn large_guest_skips_the_mmio_gap() {
        let size = 6u64 << 30;
        let slots = ram_regions(size).unwrap();
        assert_eq!(slots, vec![(0, 3 << 30), (4 << 30, 3 << 30)]);
        let map = memory_map(size).unwrap();
        assert_eq!(map.last().unwrap().start, 4 << 30);
        assert!(map
            .iter()
            .all(|r| r.end() <= MMIO_GAP_START || r.start >= MMIO_GAP_END));
    }

    #[test]
    fn tiny_guest_is_refused() {
        assert_eq!(ram_regions(1 << 20), Err(Error::TooSmall(1 << 20)));
    }

    #[test]
    fn boot_structures_do_not_overlap() {
        let spans = [
            (BOOT_GDT_START, 0x20),
            (BOOT_IDT_START, 8),
            (PVH_INFO_START, 0x40),
            (PVH_MODLIST_START, 0x40),
            (PVH_MEMMAP_START, ZERO_PAGE_START - PVH_MEMMAP_START),
            (ZERO_PAGE_START, 0x1000),
            (PML4_START, 0x1000),
            (PDPTE_START, 0x1000),
            (PDE_START, 0x4000),
            (CMDLINE_START, CMDLINE_MAX_SIZE as u64),
        ];
        for (i, a) in spans.iter().enumerate() {
            for b in &spans[i + 1..] {
                assert!(a.0 + a.1 <= b.0, "{a:x?} overlaps {b:x?}");
            }
        }
        assert!(CMDLINE_START + CMDLINE_MAX_SIZE as u64 <= EBDA_START);
    }

    #[test]
    fn hotplug_regions_follow_ram() {
        let m = 128 << 20;
        assert_eq!(hotplug_base(128 << 20, 256 << 20, m), 128 << 20);
        assert_eq!(hotplug_base(100 << 20, 256 << 20, m), 128 << 20);
        // Too big for the space below the gap: above 4 GiB.
        assert_eq!(hotplug_base(2 << 30, 2 << 30, m), 4 << 30);
        // RAM above 4 GiB already: after it.
        assert_eq!(hotplug_base(5 << 30, 1 << 30, m), 6 << 30);
    }
}
