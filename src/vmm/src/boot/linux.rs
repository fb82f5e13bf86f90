//! The Linux boot protocol's zero page (struct boot_params).

use super::{Error, InitrdPlacement};
use crate::memory::GuestMemoryMmap;
use arch::layout::{self, MemoryRegion};
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::GuestAddress;

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
/// "Undefined" boot loader type: vireo has no assigned ID.
const KERNEL_LOADER_OTHER: u8 = 0xff;
/// Alignment a relocatable kernel must keep.
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;

/// Fills boot_params from the image's own setup header (bzImage) or a blank one (vmlinux) and
/// writes it at [`layout::ZERO_PAGE_START`].
pub(super) fn write_zero_page(
    mem: &GuestMemoryMmap,
    header: Option<setup_header>,
    cmdline_len: usize,
    initrd: Option<InitrdPlacement>,
    memory_map: &[MemoryRegion],
) -> Result<(), Error> {
    let mut params = boot_params::default();
    if let Some(h) = header {
        params.hdr = h;
    }
    params.acpi_rsdp_addr = layout::ACPI_START;
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = layout::CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32 + 1;
    if header.is_none() {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    if let Some(i) = initrd {
        params.hdr.ramdisk_image = i.addr as u32;
        params.hdr.ramdisk_size = i.size as u32;
        params.ext_ramdisk_image = (i.addr >> 32) as u32;
        params.ext_ramdisk_size = (i.size >> 32) as u32;
    }
    if memory_map.len() > params.e820_table.len() {
        return Err(Error::GuestMemory("an e820 map with too many entries"));
    }
    for (slot, region) in params.e820_table.iter_mut().zip(memory_map) {
        *slot = boot_e820_entry {
            addr: region.start,
            size: region.size,
            r#type: region.kind as u32,
        };
    }
    params.e820_entries = memory_map.len() as u8;
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new::<boot_params>(&params, GuestAddress(layout::ZERO_PAGE_START)),
        mem,
    )
    .map_err(|_| Error::GuestMemory("the zero page"))
}
