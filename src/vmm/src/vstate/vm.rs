//! A KVM virtual machine: memory slots, the in-kernel interrupt controllers and irqfds.

use super::ioctl_nr::KVM_SET_USER_MEMORY_REGION;
use crate::memory::GuestMemoryMmap;
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VmFd};
use std::io;
use thiserror::Error;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

/// Where KVM puts the three pages of its real-mode TSS; must be outside RAM and below 4 GiB.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
/// CPUID.1:ECX bit for the TSC-deadline timer mode of the LAPIC.
const CPUID_1_ECX_TSC_DEADLINE: u32 = 1 << 24;
/// PIT flag: the speaker port dummy, so guest probes of port 0x61 stay in the kernel.
const KVM_PIT_SPEAKER_DUMMY: u32 = 1;

/// What dropping a [`Vm`] asks of the VMM thread: deleting its memory slots.
pub const SECCOMP: utils::seccomp::Allow = utils::seccomp::Allow {
    by: "deleting the VM's memory slots before it is destroyed",
    syscalls: &[],
    with_arg: &[utils::seccomp::ioctl(KVM_SET_USER_MEMORY_REGION)],
};

/// How long after its registrations KVM may still hold normal-grace-period callbacks for a VM:
/// a few scheduler ticks (~15 ms at HZ=250 here), with room for HZ=100 hosts. An older VM has
/// none left for its destruction to wait on.
const SRCU_SETTLED: std::time::Duration = std::time::Duration::from_millis(100);

/// Errors creating or setting up the VM.
#[derive(Debug, Error)]
pub enum Error {
    /// /dev/kvm is absent.
    #[error("/dev/kvm does not exist: this host has no KVM (load the kvm_intel or kvm_amd module, or enable nested virtualisation)")]
    KvmMissing,
    /// /dev/kvm exists but this user may not open it.
    #[error("permission denied opening /dev/kvm: run as a user in the kvm group or as root")]
    KvmPermission,
    /// Any other failure opening /dev/kvm.
    #[error("cannot open /dev/kvm: {0}")]
    KvmOpen(io::Error),
    /// The host's KVM is too old or unusual.
    #[error("KVM API version {0} is not supported (need 12)")]
    KvmApiVersion(i32),
    /// KVM_CREATE_VM failed.
    #[error("cannot create a KVM VM: {0}")]
    CreateVm(kvm_ioctls::Error),
    /// KVM_GET_SUPPORTED_CPUID failed.
    #[error("cannot read the CPUID KVM supports: {0}")]
    SupportedCpuid(kvm_ioctls::Error),
    /// KVM_SET_USER_MEMORY_REGION failed.
    #[error("cannot give guest memory slot {slot} ({size} bytes at {addr:#x}) to KVM: {err}")]
    MemorySlot {
        /// Slot number.
        slot: u32,
        /// Guest physical address.
        addr: u64,
        /// Size in bytes.
        size: u64,
        /// Cause.
        err: kvm_ioctls::Error,
    },
    /// KVM_SET_TSS_ADDR failed.
    #[error("cannot set the KVM TSS address: {0}")]
    TssAddress(kvm_ioctls::Error),
    /// KVM_CREATE_IRQCHIP failed.
    #[error("cannot create the in-kernel interrupt controllers: {0}")]
    IrqChip(kvm_ioctls::Error),
    /// KVM_CREATE_PIT2 failed.
    #[error("cannot create the in-kernel PIT: {0}")]
    Pit(kvm_ioctls::Error),
    /// KVM_IRQFD failed.
    #[error("cannot route an eventfd to GSI {gsi}: {err}")]
    Irqfd {
        /// The interrupt line.
        gsi: u32,
        /// Cause.
        err: kvm_ioctls::Error,
    },
    /// KVM_IOEVENTFD failed.
    #[error("cannot attach a notification eventfd at MMIO address {addr:#x}: {err}")]
    Ioevent {
        /// Guest physical address.
        addr: u64,
        /// Cause.
        err: kvm_ioctls::Error,
    },
    /// The host's XSAVE area does not fit KVM's 4 KiB structure.
    #[error(
        "this host's XSAVE area is {0} bytes; vireo supports hosts whose area fits 4096 bytes"
    )]
    XsaveTooLarge(i32),
    /// KVM_CREATE_VCPU failed.
    #[error("cannot create vCPU {index}: {err}")]
    CreateVcpu {
        /// vCPU index.
        index: u32,
        /// Cause.
        err: kvm_ioctls::Error,
    },
}

/// One KVM VM.
pub struct Vm {
    fd: VmFd,
    supported_cpuid: CpuId,
    max_vcpus: u32,
    saveable_msrs: Vec<u32>,
    /// Whether the in-kernel PIT was created.
    has_pit: bool,
    /// How many memory slots (0, 1, ...) [`Vm::register_memory`] made; a young VM deletes them
    /// when it is dropped.
    ram_slots: u32,
    /// When KVM made the VM; its devices and ioeventfds are registered within milliseconds.
    created: std::time::Instant,
}

impl Vm {
    /// Opens /dev/kvm and creates an empty VM.
    pub fn new() -> Result<Self, Error> {
        let kvm = Kvm::new().map_err(|e| match e.errno() {
            libc::ENOENT | libc::ENODEV | libc::ENXIO => Error::KvmMissing,
            libc::EACCES | libc::EPERM => Error::KvmPermission,
            _ => Error::KvmOpen(io::Error::from_raw_os_error(e.errno())),
        })?;
        let version = kvm.get_api_version();
        if version != 12 {
            return Err(Error::KvmApiVersion(version));
        }
        let fd = kvm.create_vm().map_err(Error::CreateVm)?;
        let mut supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(Error::SupportedCpuid)?;
        // KVM emulates the TSC-deadline timer in its in-kernel LAPIC but leaves the bit out of
        // the supported set; Linux prefers that timer when it sees it.
        if kvm.check_extension(Cap::TscDeadlineTimer) {
            for e in supported_cpuid.as_mut_slice().iter_mut() {
                if e.function == 1 {
                    e.ecx |= CPUID_1_ECX_TSC_DEADLINE;
                }
            }
        }
        let max_vcpus = kvm.get_max_vcpus() as u32;
        // Snapshots save the 4 KiB legacy XSAVE area; a host whose XSAVE state is larger
        // (AMX) would lose the rest, so it is refused rather than half saved.
        let xsave_size = kvm.check_extension_int(Cap::Xsave2);
        if xsave_size > std::mem::size_of::<kvm_bindings::kvm_xsave>() as i32 {
            return Err(Error::XsaveTooLarge(xsave_size));
        }
        let saveable_msrs = kvm
            .get_msr_index_list()
            .map(|l| l.as_slice().to_vec())
            .unwrap_or_default();
        Ok(Self {
            fd,
            supported_cpuid,
            max_vcpus,
            saveable_msrs,
            has_pit: false,
            ram_slots: 0,
            created: std::time::Instant::now(),
        })
    }

    /// The KVM VM, for saving and restoring its state.
    pub(super) fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// MSRs KVM can save and restore (KVM_GET_MSR_INDEX_LIST).
    pub fn saveable_msrs(&self) -> &[u32] {
        &self.saveable_msrs
    }

    /// The most vCPUs this host's KVM allows in one VM.
    pub fn max_vcpus(&self) -> u32 {
        self.max_vcpus
    }

    /// CPUID leaves KVM can present to a guest.
    pub fn supported_cpuid(&self) -> &CpuId {
        &self.supported_cpuid
    }

    /// Hands every RAM region of `mem` (all but the one at `hotplug`, whose slots are
    /// registered as the guest plugs them) to KVM as a memory slot; with `log_dirty`, KVM
    /// records the pages the guest writes (read with [`Vm::dirty_pages`]).
    pub fn register_memory(
        &mut self,
        mem: &GuestMemoryMmap,
        log_dirty: bool,
        hotplug: Option<vm_memory::GuestAddress>,
    ) -> Result<(), Error> {
        let ram = mem.iter().filter(|r| Some(r.start_addr()) != hotplug);
        for (slot, region) in ram.enumerate() {
            let slot = slot as u32;
            let addr = region.start_addr().0;
            let size = region.len();
            let host = region.as_ptr() as u64;
            let desc = kvm_userspace_memory_region {
                slot,
                flags: if log_dirty {
                    kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
                } else {
                    0
                },
                guest_phys_addr: addr,
                memory_size: size,
                userspace_addr: host,
            };
            // SAFETY: the mapping at `host` is `size` bytes long and is owned by `mem`, which
            // the caller keeps alive for as long as the VM exists.
            unsafe { self.fd.set_user_memory_region(desc) }.map_err(|err| Error::MemorySlot {
                slot,
                addr,
                size,
                err,
            })?;
            self.ram_slots = slot + 1;
        }
        Ok(())
    }

    /// A duplicate of the VM's descriptor, for a device thread that changes memory slots
    /// (memory hotplug).
    pub fn try_clone_fd(&self) -> std::io::Result<std::fs::File> {
        use std::os::fd::{AsRawFd, FromRawFd};
        // SAFETY: dup(2) of a descriptor this VM owns; the new one is owned by the File.
        let fd = unsafe { libc::fcntl(self.fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor nothing else owns.
        Ok(unsafe { std::fs::File::from_raw_fd(fd) })
    }

    /// The pages of memory slot `slot` (`size` bytes) the guest wrote since the last call, one
    /// bit per page; the slot must have been registered with dirty logging.
    pub fn dirty_pages(&self, slot: u32, size: usize) -> Result<Vec<u64>, kvm_ioctls::Error> {
        self.fd.get_dirty_log(slot, size)
    }

    /// Whether the VM has KVM's 8254 PIT.
    pub fn has_pit(&self) -> bool {
        self.has_pit
    }

    /// Creates the in-kernel LAPICs, IOAPIC, 8259 PICs and, with `pit_wanted`, the PIT. Must
    /// precede vCPU creation so application processors start in the wait-for-SIPI state.
    pub fn setup_irqchip(&mut self, pit_wanted: bool) -> Result<(), Error> {
        self.fd
            .set_tss_address(KVM_TSS_ADDRESS)
            .map_err(Error::TssAddress)?;
        self.fd.create_irq_chip().map_err(Error::IrqChip)?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        if pit_wanted {
            self.fd.create_pit2(pit).map_err(Error::Pit)?;
            self.has_pit = true;
        }
        Ok(())
    }

    /// Makes every write to `evt` raise interrupt line `gsi`, without a trip through vireo.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), Error> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(|err| Error::Irqfd { gsi, err })
    }

    /// Makes 32-bit guest writes of `value` to MMIO address `addr` signal `evt` inside KVM,
    /// without an exit to vireo.
    pub fn register_mmio_ioevent(&self, evt: &EventFd, addr: u64, value: u32) -> Result<(), Error> {
        self.fd
            .register_ioevent(evt, &IoEventAddress::Mmio(addr), value)
            .map_err(|err| Error::Ioevent { addr, err })
    }

    /// Creates vCPU `index` (its APIC ID is the same number).
    pub fn create_vcpu(&self, index: u32) -> Result<kvm_ioctls::VcpuFd, Error> {
        self.fd
            .create_vcpu(u64::from(index))
            .map_err(|err| Error::CreateVcpu { index, err })
    }
}

impl Drop for Vm {
    // Every in-kernel device or ioeventfd registration frees the I/O bus it replaces after a
    // normal SRCU grace period (call_srcu, Linux 6.18), and KVM's destruction of the VM waits
    // for those (srcu_barrier): ~15 ms after the last registration here, paid in full at exit
    // by a VM that lived less than that. Deleting a memory slot first waits for an expedited
    // grace period instead, which ends theirs in about half the time. An older VM skips it:
    // there is nothing left to wait for, and the deletion's own grace periods cost ~0.25 ms
    // (docs/benchmarks.md, "Exit").
    fn drop(&mut self) {
        if !utils::seccomp::optional_calls_allowed() || self.created.elapsed() > SRCU_SETTLED {
            return;
        }
        for slot in 0..self.ram_slots {
            let delete = kvm_userspace_memory_region {
                slot,
                ..Default::default()
            };
            // SAFETY: a zero-sized region deletes the slot; KVM reads no memory through it.
            if let Err(err) = unsafe { self.fd.set_user_memory_region(delete) } {
                tracing::debug!("deleting KVM memory slot {slot}: {err}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::Memory;
    use vmm_sys_util::ioctl::ioctl_with_mut_ref;

    /// The dirty log of `slot`, read through another descriptor of the same VM: ENOENT once
    /// the slot is gone.
    fn dirty_log(vm: &std::fs::File, slot: u32, bitmap: &mut [u64]) -> i32 {
        let mut log = kvm_bindings::kvm_dirty_log {
            slot,
            ..Default::default()
        };
        log.__bindgen_anon_1.dirty_bitmap = bitmap.as_mut_ptr().cast();
        // SAFETY: KVM writes one bit per page of the slot into `bitmap`, which is large enough
        // for the 4 MiB slot these tests make (1024 pages), and reads `log`; both outlive the call.
        let r = unsafe {
            ioctl_with_mut_ref(vm, super::super::ioctl_nr::KVM_GET_DIRTY_LOG as _, &mut log)
        };
        if r < 0 {
            io::Error::last_os_error().raw_os_error().unwrap_or(0)
        } else {
            0
        }
    }

    /// A VM with one 4 MiB slot, the memory behind it, and another descriptor of the VM.
    fn vm_with_a_slot() -> (Vm, Memory, std::fs::File) {
        let mut vm = Vm::new().unwrap();
        let mem = Memory::anonymous(4 << 20, true).unwrap();
        vm.register_memory(&mem.guest, true, None).unwrap();
        let other = vm.try_clone_fd().unwrap();
        (vm, mem, other)
    }

    #[test]
    fn dropping_the_vm_deletes_its_memory_slots() {
        let (vm, _mem, other) = vm_with_a_slot();
        let mut bitmap = [0u64; 16];
        assert_eq!(dirty_log(&other, 0, &mut bitmap), 0, "slot 0 is registered");
        drop(vm);
        // The VM lives on through `other`, without the slot.
        assert_eq!(dirty_log(&other, 0, &mut bitmap), libc::ENOENT);
    }

    #[test]
    fn an_old_vm_is_dropped_without_deleting_its_slots() {
        let (mut vm, _mem, other) = vm_with_a_slot();
        vm.created -= SRCU_SETTLED * 2;
        drop(vm);
        let mut bitmap = [0u64; 16];
        assert_eq!(
            dirty_log(&other, 0, &mut bitmap),
            0,
            "slot 0 is still there"
        );
    }
}
