//! The PVH boot protocol's hvm_start_info, module list and memory map.

use super::{Error, InitrdPlacement};
use crate::memory::GuestMemoryMmap;
use arch::layout::{self, MemoryRegion};
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::GuestAddress;

const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;

/// Writes hvm_start_info at [`layout::PVH_INFO_START`], pointing at the command line, the
/// initrd as module 0, and the memory map.
pub(super) fn write_start_info(
    mem: &GuestMemoryMmap,
    initrd: Option<InitrdPlacement>,
    memory_map: &[MemoryRegion],
) -> Result<(), Error> {
    if memory_map.len() > layout::PVH_MEMMAP_MAX_ENTRIES {
        return Err(Error::GuestMemory("a PVH memory map with too many entries"));
    }
    let memmap: Vec<hvm_memmap_table_entry> = memory_map
        .iter()
        .map(|r| hvm_memmap_table_entry {
            addr: r.start,
            size: r.size,
            type_: r.kind as u32,
            reserved: 0,
        })
        .collect();
    let info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: layout::CMDLINE_START,
        memmap_paddr: layout::PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        rsdp_paddr: layout::ACPI_START,
        nr_modules: u32::from(initrd.is_some()),
        modlist_paddr: if initrd.is_some() {
            layout::PVH_MODLIST_START
        } else {
            0
        },
        ..Default::default()
    };
    let mut params = BootParams::new(&info, GuestAddress(layout::PVH_INFO_START));
    if let Some(i) = initrd {
        params.set_modules(
            &[hvm_modlist_entry {
                paddr: i.addr,
                size: i.size,
                ..Default::default()
            }],
            GuestAddress(layout::PVH_MODLIST_START),
        );
    }
    params.set_sections(&memmap, GuestAddress(layout::PVH_MEMMAP_START));
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem)
        .map_err(|_| Error::GuestMemory("the PVH start info"))
}
