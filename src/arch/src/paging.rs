//! Identity-mapped boot page tables for guests entered in long mode.

use crate::layout::{IDENTITY_MAP_SIZE, PDE_START, PDPTE_START, PML4_START};

const PRESENT_RW: u64 = 0x3;
const PAGE_SIZE_2M: u64 = 0x80;

/// The boot page tables as (guest address, 4 KiB page of entries) pairs: PML4 → PDPT → four
/// page directories of 2 MiB pages mapping the first 4 GiB one-to-one, so the kernel, its boot
/// data, an initrd anywhere in low RAM and the APIC windows are all reachable at entry.
pub fn identity_map_tables() -> Vec<(u64, [u64; 512])> {
    let mut pml4 = [0u64; 512];
    pml4[0] = PDPTE_START | PRESENT_RW;
    let mut pdpt = [0u64; 512];
    let directories = IDENTITY_MAP_SIZE >> 30;
    let mut tables = Vec::with_capacity(2 + directories as usize);
    for d in 0..directories {
        let pd_addr = PDE_START + d * 0x1000;
        pdpt[d as usize] = pd_addr | PRESENT_RW;
        let mut pd = [0u64; 512];
        for (i, e) in pd.iter_mut().enumerate() {
            *e = ((d << 30) + ((i as u64) << 21)) | PRESENT_RW | PAGE_SIZE_2M;
        }
        tables.push((pd_addr, pd));
    }
    tables.push((PML4_START, pml4));
    tables.push((PDPTE_START, pdpt));
    tables
}

#[cfg(test)]
mod tests {
    use super::*;

    fn translate(tables: &[(u64, [u64; 512])], va: u64) -> Option<u64> {
        let find = |addr: u64| tables.iter().find(|t| t.0 == addr).map(|t| &t.1);
        let pml4e = find(PML4_START)?[((va >> 39) & 0x1ff) as usize];
        let pdpte = find(pml4e & !0xfff)?[((va >> 30) & 0x1ff) as usize];
        let pde = find(pdpte & !0xfff)?[((va >> 21) & 0x1ff) as usize];
        (pde & 1 == 1 && pde & PAGE_SIZE_2M != 0).then_some((pde & !0x1f_ffff) | (va & 0x1f_ffff))
    }

    #[test]
    fn maps_low_4g_one_to_one() {
        let t = identity_map_tables();
        for va in [0u64, 0x10_0000, 0x7fff_f123, 0xfee0_0000, 0xffff_ffff] {
            assert_eq!(translate(&t, va), Some(va));
        }
    }
}
