//! A vCPU: its boot configuration and the loop that runs it on its own thread.

use super::ioctl_nr;
use super::vm::Vm;
use arch::regs::EntryMode;
use devices::bus::Bus;
use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::{VcpuExit, VcpuFd};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use thiserror::Error;
use utils::seccomp::{ioctl, Allow};

/// What a vCPU thread calls beyond every thread's basics: KVM_RUN, the clock hint when it
/// parks, and the register reads of an error report. The port I/O and MMIO devices it runs
/// only write to eventfds (interrupts, reset and power events, device activation).
pub const SECCOMP: Allow = Allow {
    by: "vCPU threads",
    syscalls: &[],
    with_arg: &[
        ioctl(ioctl_nr::KVM_RUN),
        ioctl(ioctl_nr::KVM_KVMCLOCK_CTRL),
        ioctl(ioctl_nr::KVM_GET_REGS),
        ioctl(ioctl_nr::KVM_GET_SREGS),
    ],
};

/// Errors configuring a vCPU.
#[derive(Debug, Error)]
pub enum Error {
    /// A KVM ioctl used during setup failed.
    #[error("cannot configure vCPU {index}: {what}: {err}")]
    Setup {
        /// vCPU index.
        index: u32,
        /// Which step.
        what: &'static str,
        /// Cause.
        err: kvm_ioctls::Error,
    },
    /// The CPU template cannot be applied.
    #[error("cannot configure vCPU {index}: {reason}")]
    Template {
        /// vCPU index.
        index: u32,
        /// Why.
        reason: String,
    },
    /// KVM refused one of the boot MSRs.
    #[error("cannot configure vCPU {index}: KVM accepted only {set} of {total} boot MSRs")]
    Msrs {
        /// vCPU index.
        index: u32,
        /// How many KVM took.
        set: usize,
        /// How many were offered.
        total: usize,
    },
}

/// Why a vCPU stopped running.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VcpuStop {
    /// The VMM asked it to stop.
    Requested,
    /// The VMM asked it to pause: it is at an instruction boundary, with no exit half served,
    /// and its thread should park (releasing the vCPU) until resumed.
    Paused,
    /// The guest triple-faulted (KVM_EXIT_SHUTDOWN).
    TripleFault(String),
    /// KVM could not handle something the guest did (usually an instruction its emulator does
    /// not support).
    InternalError(String),
    /// KVM could not enter the guest (invalid guest state).
    FailedEntry(String),
    /// The guest asked KVM for a reset or shutdown through a system event.
    SystemEvent {
        /// True for power-off, false for reset.
        poweroff: bool,
    },
    /// Any other failure: an unexpected exit or a failing ioctl.
    Error(String),
}

/// How the VMM steers running vCPU threads: stop for good, or park until resumed. A thread
/// notices either after the VMM interrupts its KVM_RUN with a signal.
#[derive(Default)]
pub struct VcpuControl {
    stop: AtomicBool,
    /// Mirrors `paused` for the check on every exit, which must not take a lock.
    pause: AtomicBool,
    paused: Mutex<bool>,
    cond: Condvar,
    parked: AtomicUsize,
}

impl VcpuControl {
    /// Asks every vCPU to leave its run loop.
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::Release);
        let _guard = devices::bus::lock(&self.paused);
        self.cond.notify_all();
    }

    /// Whether a stop was requested.
    pub fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Asks every vCPU to park (the caller then kicks them and waits for [`Self::parked`]).
    pub fn request_pause(&self) {
        *devices::bus::lock(&self.paused) = true;
        self.pause.store(true, Ordering::Release);
    }

    /// Whether a pause was requested.
    pub fn pause_requested(&self) -> bool {
        self.pause.load(Ordering::Acquire)
    }

    /// Lets parked vCPUs run again.
    pub fn resume(&self) {
        let mut paused = devices::bus::lock(&self.paused);
        *paused = false;
        self.pause.store(false, Ordering::Release);
        self.cond.notify_all();
    }

    /// Number of vCPUs currently parked.
    pub fn parked(&self) -> usize {
        self.parked.load(Ordering::Acquire)
    }

    /// Parks the calling vCPU thread while a pause is requested.
    pub fn park(&self) {
        let mut paused = devices::bus::lock(&self.paused);
        if !*paused {
            return;
        }
        self.parked.fetch_add(1, Ordering::AcqRel);
        while *paused && !self.stop_requested() {
            paused = self.cond.wait(paused).unwrap_or_else(|e| e.into_inner());
        }
        self.parked.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Exits to vireo, all vCPUs: port I/O, MMIO, others.
static EXITS: [std::sync::atomic::AtomicU64; 3] = [
    std::sync::atomic::AtomicU64::new(0),
    std::sync::atomic::AtomicU64::new(0),
    std::sync::atomic::AtomicU64::new(0),
];

/// (port I/O, MMIO, other) exits to vireo since start, for the metrics file.
pub fn exit_counts() -> (u64, u64, u64) {
    (
        EXITS[0].load(Ordering::Relaxed),
        EXITS[1].load(Ordering::Relaxed),
        EXITS[2].load(Ordering::Relaxed),
    )
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_MODE_NMI: u32 = 0x4;

/// A vCPU, created and configured, not yet running.
pub struct Vcpu {
    index: u32,
    fd: VcpuFd,
}

impl Vcpu {
    /// Creates vCPU `index` in `vm`.
    pub fn new(vm: &Vm, index: u32) -> Result<Self, super::vm::Error> {
        Ok(Self {
            index,
            fd: vm.create_vcpu(index)?,
        })
    }

    fn setup_err(&self, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
        let index = self.index;
        move |err| Error::Setup { index, what, err }
    }

    /// Gives the vCPU its CPUID, MSRs, FPU state and LAPIC wiring; the bootstrap processor
    /// (`boot` is Some) also gets the entry registers of its boot protocol. Application
    /// processors keep KVM's wait-for-SIPI state.
    pub fn configure(
        &self,
        vm: &Vm,
        cpu_count: u32,
        boot: Option<(EntryMode, u64)>,
        template: Option<&crate::cpu_config::CpuTemplate>,
    ) -> Result<(), Error> {
        let mut cpuid = vm.supported_cpuid().clone();
        arch::cpuid::normalize(&mut cpuid, self.index, cpu_count);
        if let Some(t) = template {
            t.apply_cpuid(&mut cpuid)
                .map_err(|reason| Error::Template {
                    index: self.index,
                    reason,
                })?;
        }
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(self.setup_err("KVM_SET_CPUID2"))?;
        if let Some(t) = template {
            // Some hosts (PVM) keep their own CPUID whatever is set: a template they ignore
            // must not pass for applied.
            let now = self
                .fd
                .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
                .map_err(self.setup_err("KVM_GET_CPUID2"))?;
            t.check_cpuid(&now).map_err(|reason| Error::Template {
                index: self.index,
                reason,
            })?;
        }

        let entries: Vec<kvm_msr_entry> = arch::msr::boot_msrs()
            .into_iter()
            .map(|(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&entries).expect("boot MSR list fits a KVM MSR array");
        let set = self
            .fd
            .set_msrs(&msrs)
            .map_err(self.setup_err("KVM_SET_MSRS"))?;
        if set != entries.len() {
            return Err(Error::Msrs {
                index: self.index,
                set,
                total: entries.len(),
            });
        }

        for &(addr, bits) in template.map_or(&[][..], |t| &t.msrs[..]) {
            let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
                index: addr,
                ..Default::default()
            }])
            .expect("one MSR fits a KVM MSR array");
            let read = self
                .fd
                .get_msrs(&mut msrs)
                .map_err(self.setup_err("KVM_GET_MSRS"))?;
            let current = if read == 1 {
                msrs.as_slice()[0].data
            } else {
                0
            };
            let entry = kvm_msr_entry {
                index: addr,
                data: bits.apply(current),
                ..Default::default()
            };
            let set = self
                .fd
                .set_msrs(&Msrs::from_entries(&[entry]).expect("one MSR fits"))
                .map_err(self.setup_err("KVM_SET_MSRS"))?;
            if set != 1 {
                return Err(Error::Template {
                    index: self.index,
                    reason: format!("cpu-config: this host's KVM refuses MSR {addr:#x}"),
                });
            }
        }

        self.fd
            .set_fpu(&arch::regs::boot_fpu())
            .map_err(self.setup_err("KVM_SET_FPU"))?;

        // LINT0 carries the 8259's ExtINT and LINT1 the NMI, as on a PC in virtual-wire mode.
        let mut lapic = self
            .fd
            .get_lapic()
            .map_err(self.setup_err("KVM_GET_LAPIC"))?;
        for (reg, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
            let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[reg + i] as u8);
            let v = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
            for (i, b) in v.to_le_bytes().iter().enumerate() {
                lapic.regs[reg + i] = *b as _;
            }
        }
        self.fd
            .set_lapic(&lapic)
            .map_err(self.setup_err("KVM_SET_LAPIC"))?;

        if let Some((mode, entry)) = boot {
            let mut sregs = self
                .fd
                .get_sregs()
                .map_err(self.setup_err("KVM_GET_SREGS"))?;
            arch::regs::boot_sregs(mode, &mut sregs);
            self.fd
                .set_sregs(&sregs)
                .map_err(self.setup_err("KVM_SET_SREGS"))?;
            self.fd
                .set_regs(&arch::regs::boot_regs(mode, entry))
                .map_err(self.setup_err("KVM_SET_REGS"))?;
        }
        Ok(())
    }

    /// Runs the guest until it stops or `control` says stop (the caller then interrupts
    /// KVM_RUN with a signal); parks while a pause is requested. Port I/O goes to `pio`; MMIO
    /// to `mmio`.
    pub fn run(&mut self, pio: &Bus, mmio: &Bus, control: &VcpuControl) -> VcpuStop {
        loop {
            if control.stop_requested() {
                return VcpuStop::Requested;
            }
            if control.pause_requested() {
                self.finish_pending_exit(pio, mmio);
                // Tells a guest with kvmclock that it was stopped, so that it does not take
                // the pause for a soft lockup; hosts and guests without kvmclock refuse it.
                let _ = self.fd.kvmclock_ctrl();
                return VcpuStop::Paused;
            }
            let exit = self.fd.run();
            let kind = match &exit {
                Ok(VcpuExit::IoIn(..)) | Ok(VcpuExit::IoOut(..)) => 0,
                Ok(VcpuExit::MmioRead(..)) | Ok(VcpuExit::MmioWrite(..)) => 1,
                _ => 2,
            };
            EXITS[kind].fetch_add(1, Ordering::Relaxed);
            match exit {
                Ok(VcpuExit::IoIn(port, data)) => {
                    if !pio.read(u64::from(port), data) {
                        tracing::trace!("vcpu{}: unhandled port read {port:#x}", self.index);
                    }
                }
                Ok(VcpuExit::IoOut(port, data)) => {
                    if !pio.write(u64::from(port), data) {
                        tracing::trace!("vcpu{}: unhandled port write {port:#x}", self.index);
                    }
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    if !mmio.read(addr, data) {
                        tracing::debug!("vcpu{}: unhandled MMIO read {addr:#x}", self.index);
                    }
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    if !mmio.write(addr, data) {
                        tracing::debug!("vcpu{}: unhandled MMIO write {addr:#x}", self.index);
                    }
                }
                Ok(VcpuExit::Shutdown) => return VcpuStop::TripleFault(self.describe()),
                Ok(VcpuExit::InternalError) => {
                    let internal = {
                        // SAFETY: after KVM_EXIT_INTERNAL_ERROR, KVM has filled the
                        // `internal` member of the kvm_run union.
                        let i = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal };
                        let n = (i.ndata as usize).min(i.data.len());
                        format!("suberror {} data {:x?}", i.suberror, &i.data[..n])
                    };
                    return VcpuStop::InternalError(format!("{internal}\n{}", self.describe()));
                }
                Ok(VcpuExit::FailEntry(reason, cpu)) => {
                    return VcpuStop::FailedEntry(format!(
                        "hardware entry failure reason {reason:#x} on host CPU {cpu}\n{}",
                        self.describe()
                    ))
                }
                Ok(VcpuExit::SystemEvent(kind, _)) => {
                    return match kind {
                        kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => {
                            VcpuStop::SystemEvent { poweroff: true }
                        }
                        kvm_bindings::KVM_SYSTEM_EVENT_RESET => {
                            VcpuStop::SystemEvent { poweroff: false }
                        }
                        other => VcpuStop::Error(format!(
                            "vCPU {}: unhandled system event {other}",
                            self.index
                        )),
                    }
                }
                // The in-kernel irqchip handles HLT; a stray exit is harmless.
                Ok(VcpuExit::Hlt) | Ok(VcpuExit::IrqWindowOpen) | Ok(VcpuExit::Intr) => {}
                Ok(other) => {
                    let what = format!("{other:?}");
                    return VcpuStop::Error(format!(
                        "vCPU {}: unexpected exit {what}\n{}",
                        self.index,
                        self.describe()
                    ));
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.fd.set_kvm_immediate_exit(0);
                }
                Err(e) => {
                    return VcpuStop::Error(format!("vCPU {}: KVM_RUN failed: {e}", self.index))
                }
            }
        }
    }

    /// Completes the exit last handled, without running further guest instructions: KVM
    /// finishes an I/O or MMIO instruction only on the next KVM_RUN, and its state before then
    /// is not what a snapshot may hold (KVM API, "KVM_RUN" and "immediate_exit").
    fn finish_pending_exit(&mut self, pio: &Bus, mmio: &Bus) {
        self.fd.set_kvm_immediate_exit(1);
        // A string instruction may exit again for its next element; each is served in turn.
        for _ in 0..4096 {
            match self.fd.run() {
                Ok(VcpuExit::IoIn(port, data)) => {
                    pio.read(u64::from(port), data);
                }
                Ok(VcpuExit::IoOut(port, data)) => {
                    pio.write(u64::from(port), data);
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    mmio.read(addr, data);
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    mmio.write(addr, data);
                }
                _ => break,
            }
        }
        self.fd.set_kvm_immediate_exit(0);
    }

    /// The guest's registers, for error reports.
    pub fn describe(&self) -> String {
        let mut s = format!("vCPU {} registers:", self.index);
        match self.fd.get_regs() {
            Ok(r) => {
                let _ = write!(
                    s,
                    "\n  rip={:#018x} rsp={:#018x} rflags={:#x}\n  rax={:#018x} rbx={:#018x} rcx={:#018x} rdx={:#018x}\n  rsi={:#018x} rdi={:#018x} rbp={:#018x}\n  r8={:#018x} r9={:#018x} r10={:#018x} r11={:#018x}\n  r12={:#018x} r13={:#018x} r14={:#018x} r15={:#018x}",
                    r.rip, r.rsp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp,
                    r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15
                );
            }
            Err(e) => {
                let _ = write!(s, " unavailable ({e})");
            }
        }
        if let Ok(sr) = self.fd.get_sregs() {
            let _ = write!(
                s,
                "\n  cs={:#x} (base {:#x}, l={} db={}) ss={:#x}\n  cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x}\n  gdt={:#x}/{:#x} idt={:#x}/{:#x}",
                sr.cs.selector, sr.cs.base, sr.cs.l, sr.cs.db, sr.ss.selector, sr.cr0, sr.cr2,
                sr.cr3, sr.cr4, sr.efer, sr.gdt.base, sr.gdt.limit, sr.idt.base, sr.idt.limit
            );
        }
        s
    }

    /// The KVM vCPU, for saving and restoring its state.
    pub(super) fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// This vCPU's index (and APIC ID).
    pub fn index(&self) -> u32 {
        self.index
    }
}
