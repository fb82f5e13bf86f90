//! What KVM holds of a VM and its vCPUs, saved for a snapshot and given back on restore.
//!
//! Only what the host's KVM reports it can save is asked for: the MSRs come from KVM's own list
//! of saveable MSRs (those it then refuses to read are left out), and nested virtualisation
//! state is never requested (vireo does not offer VMX or SVM to guests).

use super::ioctl_nr;
use super::vcpu::Vcpu;
use super::vm::Vm;
use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    CpuId, Msrs, KVM_CLOCK_REALTIME, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES,
};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use utils::seccomp::{ioctl, Allow};

/// What reading a paused VM's state for a snapshot calls (on the VMM thread).
pub const SECCOMP: Allow = Allow {
    by: "saving vCPU and VM state",
    syscalls: &[],
    with_arg: &[
        ioctl(ioctl_nr::KVM_GET_CPUID2),
        ioctl(ioctl_nr::KVM_GET_MSRS),
        ioctl(ioctl_nr::KVM_GET_REGS),
        ioctl(ioctl_nr::KVM_GET_SREGS),
        ioctl(ioctl_nr::KVM_GET_XSAVE),
        ioctl(ioctl_nr::KVM_GET_XCRS),
        ioctl(ioctl_nr::KVM_GET_DEBUGREGS),
        ioctl(ioctl_nr::KVM_GET_LAPIC),
        ioctl(ioctl_nr::KVM_GET_MP_STATE),
        ioctl(ioctl_nr::KVM_GET_VCPU_EVENTS),
        ioctl(ioctl_nr::KVM_GET_TSC_KHZ),
        ioctl(ioctl_nr::KVM_GET_IRQCHIP),
        ioctl(ioctl_nr::KVM_GET_PIT2),
        ioctl(ioctl_nr::KVM_GET_CLOCK),
        ioctl(ioctl_nr::KVM_GET_DIRTY_LOG),
        ioctl(ioctl_nr::KVM_CHECK_EXTENSION),
    ],
};

/// Errors saving or restoring KVM state.
#[derive(Debug, Error)]
pub enum Error {
    /// A KVM ioctl failed.
    #[error("{what}: {err}")]
    Kvm {
        /// Which step.
        what: String,
        /// Cause.
        err: kvm_ioctls::Error,
    },
    /// The snapshot does not fit this host.
    #[error("{0}")]
    Incompatible(String),
}

fn kvm(what: impl Into<String>) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    let what = what.into();
    move |err| Error::Kvm { what, err }
}

/// MSR that must be written after the LAPIC is in TSC-deadline mode, or KVM drops it.
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// One vCPU as KVM holds it.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// vCPU index (and APIC ID).
    pub index: u32,
    /// CPUID the guest sees.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Every MSR KVM could read, from its list of saveable ones.
    pub msrs: Vec<kvm_msr_entry>,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// FPU, SSE and AVX state.
    pub xsave: kvm_xsave,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debug_regs: kvm_debugregs,
    /// Local APIC registers.
    pub lapic: kvm_lapic_state,
    /// Running, halted, or waiting for SIPI.
    pub mp_state: kvm_mp_state,
    /// Pending exceptions, interrupts and NMIs.
    pub vcpu_events: kvm_vcpu_events,
    /// TSC frequency the guest ran at, in kHz (when KVM reports it).
    pub tsc_khz: Option<u32>,
}

/// The VM-wide interrupt controllers, PIT and clock.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmState {
    /// The 8254 PIT, if the VM has one (older snapshots always do).
    #[serde(default)]
    pub pit: Option<kvm_pit_state2>,
    /// kvmclock's view of time.
    pub clock: kvm_clock_data,
    /// The 8259s and the IOAPIC.
    pub pic_master: kvm_irqchip,
    /// Second 8259.
    pub pic_slave: kvm_irqchip,
    /// IOAPIC.
    pub ioapic: kvm_irqchip,
}

/// Feature leaves compared against the host when restoring: (leaf, subleaf, register name).
const FEATURE_LEAVES: [(u32, u32); 4] = [(1, 0), (7, 0), (0x8000_0001, 0), (0xd, 1)];
/// Bits the guest's CPUID may have that the host's supported list lacks, because KVM or
/// vireo sets them itself: OSXSAVE and OSPKE follow CR4, and vireo adds TSC-deadline.
fn dynamic_bits(leaf: u32, reg: usize) -> u32 {
    match (leaf, reg) {
        (1, 2) => (1 << 27) | (1 << 24),
        (7, 2) => 1 << 4,
        _ => 0,
    }
}

impl Vcpu {
    /// Reads the vCPU's whole state; the vCPU must be paused (see `VcpuStop::Paused`).
    pub fn save_state(&self, vm: &Vm) -> Result<VcpuState, Error> {
        let i = self.index();
        let fd = self.fd();
        let cpuid = fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm(format!("vCPU {i}: KVM_GET_CPUID2")))?
            .as_slice()
            .to_vec();
        Ok(VcpuState {
            index: i,
            cpuid,
            msrs: self.read_msrs(vm)?,
            regs: fd
                .get_regs()
                .map_err(kvm(format!("vCPU {i}: KVM_GET_REGS")))?,
            sregs: fd
                .get_sregs()
                .map_err(kvm(format!("vCPU {i}: KVM_GET_SREGS")))?,
            xsave: fd
                .get_xsave()
                .map_err(kvm(format!("vCPU {i}: KVM_GET_XSAVE")))?,
            xcrs: fd
                .get_xcrs()
                .map_err(kvm(format!("vCPU {i}: KVM_GET_XCRS")))?,
            debug_regs: fd
                .get_debug_regs()
                .map_err(kvm(format!("vCPU {i}: KVM_GET_DEBUGREGS")))?,
            lapic: fd
                .get_lapic()
                .map_err(kvm(format!("vCPU {i}: KVM_GET_LAPIC")))?,
            mp_state: fd
                .get_mp_state()
                .map_err(kvm(format!("vCPU {i}: KVM_GET_MP_STATE")))?,
            vcpu_events: fd
                .get_vcpu_events()
                .map_err(kvm(format!("vCPU {i}: KVM_GET_VCPU_EVENTS")))?,
            tsc_khz: fd.get_tsc_khz().ok(),
        })
    }

    /// Reads every MSR on KVM's saveable list, leaving out those KVM refuses (KVM_GET_MSRS
    /// stops at the first one it cannot read and says how many it read).
    fn read_msrs(&self, vm: &Vm) -> Result<Vec<kvm_msr_entry>, Error> {
        let list = vm.saveable_msrs();
        let mut out = Vec::with_capacity(list.len());
        let mut pos = 0;
        while pos < list.len() {
            let n = (list.len() - pos).min(KVM_MAX_MSR_ENTRIES);
            let entries: Vec<kvm_msr_entry> = list[pos..pos + n]
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let mut msrs = Msrs::from_entries(&entries)
                .map_err(|e| Error::Incompatible(format!("cannot build an MSR list: {e:?}")))?;
            let read = self
                .fd()
                .get_msrs(&mut msrs)
                .map_err(kvm(format!("vCPU {}: KVM_GET_MSRS", self.index())))?;
            out.extend_from_slice(&msrs.as_slice()[..read]);
            // KVM stops at the first MSR it cannot read: skip that one and go on.
            pos += read + usize::from(read < n);
        }
        Ok(out)
    }

    /// Gives the vCPU the state `s` (in the order KVM needs: CPUID first, MSRs after the LAPIC
    /// so the TSC deadline holds, events last).
    pub fn restore_state(&self, vm: &Vm, s: &VcpuState, cpu_count: u32) -> Result<(), Error> {
        let i = self.index();
        let fd = self.fd();
        // What this host gives a vCPU is what KVM makes of vireo's CPUID once set, which on
        // some hosts (nested, PVM) differs from KVM_GET_SUPPORTED_CPUID: ask the vCPU itself.
        let mut fresh = vm.supported_cpuid().clone();
        arch::cpuid::normalize(&mut fresh, i, cpu_count);
        fd.set_cpuid2(&fresh)
            .map_err(kvm(format!("vCPU {i}: KVM_SET_CPUID2")))?;
        let host = fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm(format!("vCPU {i}: KVM_GET_CPUID2")))?;
        check_cpuid(&host, &s.cpuid, i)?;
        if let (Some(want), Ok(have)) = (s.tsc_khz, fd.get_tsc_khz()) {
            // A guest calibrated its clocks against the TSC; a different rate would skew them.
            if want.abs_diff(have) > have / 4000 && fd.set_tsc_khz(want).is_err() {
                return Err(Error::Incompatible(format!(
                    "vCPU {i}: the snapshot's TSC runs at {want} kHz, this host's at {have} kHz, and this host's KVM cannot scale it"
                )));
            }
        }
        let cpuid = CpuId::from_entries(&s.cpuid)
            .map_err(|e| Error::Incompatible(format!("vCPU {i}: bad CPUID list: {e:?}")))?;
        fd.set_cpuid2(&cpuid)
            .map_err(kvm(format!("vCPU {i}: KVM_SET_CPUID2")))?;
        fd.set_mp_state(s.mp_state)
            .map_err(kvm(format!("vCPU {i}: KVM_SET_MP_STATE")))?;
        fd.set_regs(&s.regs)
            .map_err(kvm(format!("vCPU {i}: KVM_SET_REGS")))?;
        fd.set_sregs(&s.sregs)
            .map_err(kvm(format!("vCPU {i}: KVM_SET_SREGS")))?;
        // SAFETY: `Vm::new` refused hosts whose XSAVE area is larger than `kvm_xsave`, so KVM
        // reads no further than the struct.
        unsafe { fd.set_xsave(&s.xsave) }.map_err(kvm(format!("vCPU {i}: KVM_SET_XSAVE")))?;
        fd.set_xcrs(&s.xcrs)
            .map_err(kvm(format!("vCPU {i}: KVM_SET_XCRS")))?;
        fd.set_debug_regs(&s.debug_regs)
            .map_err(kvm(format!("vCPU {i}: KVM_SET_DEBUGREGS")))?;
        fd.set_lapic(&s.lapic)
            .map_err(kvm(format!("vCPU {i}: KVM_SET_LAPIC")))?;
        let (mut first, mut last): (Vec<_>, Vec<_>) = s
            .msrs
            .iter()
            .partition(|m| m.index != MSR_IA32_TSC_DEADLINE);
        first.append(&mut last);
        for chunk in first.chunks(KVM_MAX_MSR_ENTRIES) {
            let msrs = Msrs::from_entries(chunk)
                .map_err(|e| Error::Incompatible(format!("vCPU {i}: bad MSR list: {e:?}")))?;
            let set = fd
                .set_msrs(&msrs)
                .map_err(kvm(format!("vCPU {i}: KVM_SET_MSRS")))?;
            if set != chunk.len() {
                return Err(Error::Incompatible(format!(
                    "vCPU {i}: this host's KVM refused MSR {:#x} of the snapshot",
                    chunk[set].index
                )));
            }
        }
        fd.set_vcpu_events(&s.vcpu_events)
            .map_err(kvm(format!("vCPU {i}: KVM_SET_VCPU_EVENTS")))?;
        Ok(())
    }
}

/// Refuses a snapshot whose guest was shown CPU features this host cannot give it.
fn check_cpuid(host: &CpuId, guest: &[kvm_cpuid_entry2], index: u32) -> Result<(), Error> {
    const REGS: [&str; 4] = ["eax", "ebx", "ecx", "edx"];
    for (leaf, sub) in FEATURE_LEAVES {
        let Some(g) = guest.iter().find(|e| e.function == leaf && e.index == sub) else {
            continue;
        };
        let h = host
            .as_slice()
            .iter()
            .find(|e| e.function == leaf && (e.index == sub || e.flags & 1 == 0));
        let hv = h.map_or([0; 4], |h| [h.eax, h.ebx, h.ecx, h.edx]);
        let gv = [g.eax, g.ebx, g.ecx, g.edx];
        // Leaf 1 EAX/EBX and leaf 0xd.1 EBX are not feature masks.
        for r in 0..4 {
            if matches!(
                (leaf, r),
                (1, 0) | (1, 1) | (7, 0) | (0xd, 1) | (0xd, 2) | (0xd, 3)
            ) {
                continue;
            }
            let missing = gv[r] & !hv[r] & !dynamic_bits(leaf, r);
            if missing != 0 {
                return Err(Error::Incompatible(format!(
                    "vCPU {index}: the snapshot's CPUID leaf {leaf:#x}.{sub} {} has features {missing:#010x} that this host's CPU (with KVM) lacks",
                    REGS[r]
                )));
            }
        }
    }
    Ok(())
}

impl Vm {
    /// Reads the interrupt controllers, PIT and clock; every vCPU must be paused.
    pub fn save_state(&self) -> Result<VmState, Error> {
        let fd = self.fd();
        let chip = |id| -> Result<kvm_irqchip, Error> {
            let mut c = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            fd.get_irqchip(&mut c)
                .map_err(kvm(format!("KVM_GET_IRQCHIP {id}")))?;
            Ok(c)
        };
        Ok(VmState {
            pit: if self.has_pit() {
                Some(fd.get_pit2().map_err(kvm("KVM_GET_PIT2"))?)
            } else {
                None
            },
            clock: fd.get_clock().map_err(kvm("KVM_GET_CLOCK"))?,
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
        })
    }

    /// Gives a new VM (irqchip created, no vCPU running) the state `s`. With `realtime`, the
    /// guest's clock moves on by the real time that passed since the snapshot (Firecracker's
    /// `clock_realtime`); otherwise it continues from the value saved.
    pub fn restore_state(&self, s: &VmState, realtime: bool) -> Result<(), Error> {
        let fd = self.fd();
        match (&s.pit, self.has_pit()) {
            (Some(pit), true) => fd.set_pit2(pit).map_err(kvm("KVM_SET_PIT2"))?,
            (None, false) => {}
            (saved, _) => {
                return Err(Error::Incompatible(format!(
                    "the snapshot's state {} a PIT but its configuration {}",
                    if saved.is_some() { "has" } else { "has no" },
                    if saved.is_some() {
                        "has none"
                    } else {
                        "has one"
                    }
                )))
            }
        }
        let mut clock = s.clock;
        clock.flags = if realtime {
            s.clock.flags & KVM_CLOCK_REALTIME
        } else {
            0
        };
        fd.set_clock(&clock).map_err(kvm("KVM_SET_CLOCK"))?;
        for c in [&s.pic_master, &s.pic_slave, &s.ioapic] {
            fd.set_irqchip(c)
                .map_err(kvm(format!("KVM_SET_IRQCHIP {}", c.chip_id)))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(pit: Option<kvm_pit_state2>) -> VmState {
        VmState {
            pit,
            clock: kvm_clock_data::default(),
            pic_master: kvm_irqchip::default(),
            pic_slave: kvm_irqchip::default(),
            ioapic: kvm_irqchip::default(),
        }
    }

    #[test]
    fn a_vm_state_without_a_pit_round_trips_and_older_ones_still_read() {
        let none: VmState =
            serde_json::from_slice(&serde_json::to_vec(&state(None)).unwrap()).unwrap();
        assert!(none.pit.is_none());
        let pit = kvm_pit_state2 {
            flags: 7,
            ..Default::default()
        };
        // Snapshots from before the PIT became optional hold it as a plain object.
        let mut old = serde_json::to_value(state(None)).unwrap();
        old["pit"] = serde_json::to_value(pit).unwrap();
        let read: VmState = serde_json::from_value(old).unwrap();
        assert_eq!(read.pit.map(|p| p.flags), Some(7));
        // And a state file that leaves the field out reads as having none.
        let mut bare = serde_json::to_value(state(None)).unwrap();
        bare.as_object_mut().unwrap().remove("pit");
        assert!(serde_json::from_value::<VmState>(bare)
            .unwrap()
            .pit
            .is_none());
    }
}
