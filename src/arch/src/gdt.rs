//! Boot GDT entries and their KVM segment-register form.

use kvm_bindings::kvm_segment;

/// Builds a GDT descriptor from flags (the 12 bits made of the access byte and the granularity
/// nibble, as in `0xa09b`), base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// 64-bit code segment, present, ring 0.
pub const CODE64: u64 = gdt_entry(0xa09b, 0, 0xfffff);
/// 32-bit flat code segment, 4 GiB limit (PVH entry).
pub const CODE32: u64 = gdt_entry(0xc09b, 0, 0xfffff);
/// Flat read/write data segment, 4 GiB limit.
pub const DATA: u64 = gdt_entry(0xc093, 0, 0xfffff);
/// Busy 64-bit TSS; KVM needs a valid TR even though the guest never switches tasks through it.
pub const TSS: u64 = gdt_entry(0x808b, 0, 0xfffff);

/// Selector of the code segment in the boot GDT.
pub const CODE_SELECTOR: u16 = 0x08;
/// Selector of the data segment in the boot GDT.
pub const DATA_SELECTOR: u16 = 0x10;
/// Selector of the TSS in the boot GDT.
pub const TSS_SELECTOR: u16 = 0x18;

/// The boot GDT for a guest entered in 64-bit mode (`long_mode`) or 32-bit protected mode.
pub fn boot_gdt(long_mode: bool) -> [u64; 4] {
    [0, if long_mode { CODE64 } else { CODE32 }, DATA, TSS]
}

/// Decodes a GDT entry into the segment register state KVM expects for `selector`.
pub fn kvm_segment_from_gdt(entry: u64, selector: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    // With 4 KiB granularity the effective limit covers the whole last page.
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    kvm_segment {
        base,
        limit,
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: if (entry >> 47) & 1 == 1 { 0 } else { 1 },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code64_decodes_as_long_mode() {
        let seg = kvm_segment_from_gdt(CODE64, CODE_SELECTOR);
        assert_eq!(
            (seg.l, seg.db, seg.present, seg.s, seg.type_),
            (1, 0, 1, 1, 0xb)
        );
        assert_eq!(seg.limit, 0xffff_ffff);
        assert_eq!(seg.base, 0);
    }

    #[test]
    fn code32_decodes_as_flat_32bit() {
        let seg = kvm_segment_from_gdt(CODE32, CODE_SELECTOR);
        assert_eq!((seg.l, seg.db, seg.g), (0, 1, 1));
        assert_eq!(seg.limit, 0xffff_ffff);
    }

    #[test]
    fn entry_round_trips_base_and_limit() {
        let e = gdt_entry(0x0093, 0x1234_5678, 0xabcde);
        let seg = kvm_segment_from_gdt(e, 0x10);
        assert_eq!(seg.base, 0x1234_5678);
        assert_eq!(seg.limit, 0xabcde);
        assert_eq!(seg.g, 0);
    }
}
