//! The host side of memory hotplug: a virtio-mem [`Backend`] that makes plugged slots of the
//! hotplug region KVM memory slots and releases unplugged blocks.
//!
//! The whole region is mapped from boot (so devices can reach what the guest plugs), but a
//! slot is guest RAM only while at least one of its blocks is plugged: the guest's vCPUs cannot
//! touch a slot it has not plugged.

use crate::vstate::ioctl_nr::KVM_SET_USER_MEMORY_REGION;
use devices::virtio::mem::{Backend, MemLayout};
use kvm_bindings::kvm_userspace_memory_region;
use std::fs::File;

/// The first KVM memory slot number the hotplug region uses (RAM takes 0 and 1).
pub const FIRST_SLOT: u32 = 8;

/// What the virtio-mem device thread calls through [`SlotBackend`].
pub const SECCOMP: utils::seccomp::Allow = utils::seccomp::Allow {
    by: "memory hotplug",
    syscalls: &[libc::SYS_madvise],
    with_arg: &[utils::seccomp::ioctl(KVM_SET_USER_MEMORY_REGION)],
};

/// Memory slots of the hotplug region, registered while any of their blocks is plugged.
pub struct SlotBackend {
    vm: File,
    layout: MemLayout,
    /// Host address of the region.
    host: u64,
    log_dirty: bool,
    /// Plugged blocks per slot.
    plugged: Vec<u64>,
}

impl SlotBackend {
    /// A backend for the region `layout` describes, mapped at `host`, on the VM behind `vm`.
    pub fn new(vm: File, layout: MemLayout, host: u64, log_dirty: bool) -> Self {
        let slots = (layout.region_size / layout.slot_size) as usize;
        Self {
            vm,
            layout,
            host,
            log_dirty,
            plugged: vec![0; slots],
        }
    }

    fn set_slot(&self, index: usize, present: bool) -> Result<(), String> {
        let size = self.layout.slot_size;
        let offset = index as u64 * size;
        let region = kvm_userspace_memory_region {
            slot: FIRST_SLOT + index as u32,
            flags: if self.log_dirty {
                kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: self.layout.addr + offset,
            memory_size: if present { size } else { 0 },
            userspace_addr: self.host + offset,
        };
        // SAFETY: the range is one slot of the hotplug region's mapping, which guest memory
        // owns for as long as the VM exists; the ioctl reads one region descriptor.
        let r = unsafe {
            vmm_sys_util::ioctl::ioctl_with_ref(&self.vm, KVM_SET_USER_MEMORY_REGION as _, &region)
        };
        if r < 0 {
            return Err(format!(
                "KVM_SET_USER_MEMORY_REGION for hotplug slot {index}: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(())
    }

    /// (slot, blocks of that slot) for a range of the region.
    fn slots_of(&self, offset: u64, len: u64) -> Vec<(usize, u64)> {
        let (slot, block) = (self.layout.slot_size, self.layout.block_size);
        let mut out: Vec<(usize, u64)> = Vec::new();
        let mut at = offset;
        while at < offset + len {
            let index = (at / slot) as usize;
            let end = ((index as u64 + 1) * slot).min(offset + len);
            out.push((index, (end - at) / block));
            at = end;
        }
        out
    }
}

impl Backend for SlotBackend {
    fn plug(&mut self, offset: u64, len: u64) -> Result<(), String> {
        for (index, blocks) in self.slots_of(offset, len) {
            if self.plugged[index] == 0 {
                self.set_slot(index, true)?;
            }
            self.plugged[index] += blocks;
        }
        Ok(())
    }

    fn unplug(&mut self, offset: u64, len: u64) -> Result<(), String> {
        // SAFETY: the range lies inside the hotplug region's private anonymous mapping;
        // MADV_DONTNEED only drops its pages, which the guest gave back.
        let r = unsafe {
            libc::madvise(
                (self.host + offset) as *mut libc::c_void,
                len as usize,
                libc::MADV_DONTNEED,
            )
        };
        if r != 0 {
            return Err(format!(
                "cannot release {len} bytes: {}",
                std::io::Error::last_os_error()
            ));
        }
        for (index, blocks) in self.slots_of(offset, len) {
            self.plugged[index] = self.plugged[index].saturating_sub(blocks);
            if self.plugged[index] == 0 {
                self.set_slot(index, false)?;
            }
        }
        Ok(())
    }
}
