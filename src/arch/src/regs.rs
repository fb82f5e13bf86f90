//! Register state at kernel entry for each boot protocol.

use crate::gdt::{self, CODE_SELECTOR, DATA_SELECTOR, TSS_SELECTOR};
use crate::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PML4_START, PVH_INFO_START, ZERO_PAGE_START,
};
use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// How the bootstrap vCPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryMode {
    /// Linux 64-bit boot protocol: long mode, paging on (identity map), RSI = boot_params.
    Linux64,
    /// PVH: 32-bit protected mode, paging off, EBX = hvm_start_info.
    Pvh,
}

impl EntryMode {
    /// The GDT written at [`BOOT_GDT_START`] for this mode.
    pub fn gdt(self) -> [u64; 4] {
        gdt::boot_gdt(self == EntryMode::Linux64)
    }
}

/// General-purpose registers at entry.
pub fn boot_regs(mode: EntryMode, entry: u64) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: 0x2, // bit 1 is reserved and always set
        rip: entry,
        ..Default::default()
    };
    match mode {
        EntryMode::Linux64 => {
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = ZERO_PAGE_START;
        }
        EntryMode::Pvh => regs.rbx = PVH_INFO_START,
    }
    regs
}

/// Adjusts the special registers KVM reports for a fresh vCPU to the mode's entry state.
pub fn boot_sregs(mode: EntryMode, sregs: &mut kvm_sregs) {
    let table = mode.gdt();
    let code = gdt::kvm_segment_from_gdt(table[1], CODE_SELECTOR);
    let data = gdt::kvm_segment_from_gdt(table[2], DATA_SELECTOR);
    let tss = gdt::kvm_segment_from_gdt(table[3], TSS_SELECTOR);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&table) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    match mode {
        EntryMode::Linux64 => {
            sregs.cr0 = (sregs.cr0 | CR0_PE | CR0_PG | CR0_ET) & !0x6000_0000;
            sregs.cr3 = PML4_START;
            sregs.cr4 |= CR4_PAE;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
        EntryMode::Pvh => {
            // PVH: protected mode with paging off, caches on (CD/NW clear).
            sregs.cr0 = (sregs.cr0 | CR0_PE | CR0_ET) & !(CR0_PG | 0x6000_0000);
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
}

/// FPU state at entry: x87 control word and MXCSR at their reset defaults.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linux64_enters_long_mode() {
        let mut s = kvm_sregs::default();
        boot_sregs(EntryMode::Linux64, &mut s);
        assert_eq!(s.cs.l, 1);
        assert_ne!(s.cr0 & CR0_PG, 0);
        assert_ne!(s.efer & EFER_LMA, 0);
        assert_eq!(s.cr3, PML4_START);
        assert_eq!(boot_regs(EntryMode::Linux64, 0x100200).rsi, ZERO_PAGE_START);
    }

    #[test]
    fn pvh_enters_flat_protected_mode() {
        let mut s = kvm_sregs {
            cr0: 0x6000_0010,
            ..Default::default()
        };
        boot_sregs(EntryMode::Pvh, &mut s);
        assert_eq!((s.cs.l, s.cs.db, s.cs.limit), (0, 1, 0xffff_ffff));
        assert_eq!(s.cr0 & (CR0_PG | CR0_PE | 0x6000_0000), CR0_PE);
        assert_eq!(s.efer, 0);
        assert_eq!(boot_regs(EntryMode::Pvh, 0x100000).rbx, PVH_INFO_START);
    }
}
