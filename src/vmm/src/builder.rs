//! Turning a [`VmConfig`] into a VM ready to run: checked inputs, memory, kernel, platform
//! tables, legacy devices and configured vCPUs.

use crate::boot::{self, BootInputs, BootSetup};
use crate::config::VmConfig;
use crate::device_manager::DeviceManager;
use crate::memory::Memory;
use crate::vstate::vcpu::Vcpu;
use crate::vstate::vm::Vm;
use crate::Error;
use devices::bus::Bus;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;
use vm_memory::{Bytes, GuestAddress};

/// A VM with everything in place, its vCPUs not yet started.
pub(crate) struct Machine {
    // Keeps the KVM VM (and with it every vCPU and irqfd) alive.
    pub vm: Vm,
    // Guest RAM must outlive the KVM memory slots that point into it.
    pub memory: Memory,
    pub vcpus: Vec<Vcpu>,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub devices: DeviceManager,
    /// How the kernel was loaded (none for a restored VM).
    pub boot: Option<BootSetup>,
    /// What the VM was built from, kept for snapshots.
    pub config: VmConfig,
}

fn open(what: &'static str, path: &Path) -> Result<File, Error> {
    let err = |err| Error::OpenFile {
        what,
        path: path.to_owned(),
        err,
    };
    let file = utils::files::open_input(path, utils::files::Kind::Regular, false).map_err(err)?;
    // An empty kernel or initrd is a mistake (Firecracker refuses an empty initrd too).
    match file.metadata() {
        Ok(m) if m.len() == 0 => Err(err(std::io::Error::other("it is empty"))),
        _ => Ok(file),
    }
}

/// Total RAM of the host in MiB, from /proc/meminfo (read once: every PUT /machine-config
/// checks against it, and it does not change while vireo runs).
fn host_memory_mib() -> Option<u64> {
    static HOST_MIB: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *HOST_MIB.get_or_init(|| {
        let info = std::fs::read_to_string("/proc/meminfo").ok()?;
        let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib / 1024)
    })
}

/// Checks a vCPU count and memory size against vireo's and the host's limits (not KVM's,
/// which needs an open VM).
pub(crate) fn validate_machine(vcpus: u32, mem_mib: u64) -> Result<(), Error> {
    let min_mib = arch::layout::MIN_MEMORY >> 20;
    if mem_mib < min_mib {
        return Err(Error::InvalidConfig(format!(
            "memory size {} MiB is too small: a guest needs at least {min_mib} MiB",
            mem_mib
        )));
    }
    if let Some(host) = host_memory_mib() {
        if mem_mib > host {
            return Err(Error::InvalidConfig(format!(
                "memory size {} MiB is more than this host's {host} MiB of RAM",
                mem_mib
            )));
        }
    }
    if vcpus == 0 {
        return Err(Error::InvalidConfig(
            "vCPU count 0 is invalid: a VM needs at least 1 vCPU".into(),
        ));
    }
    if vcpus > u32::from(arch::mptable::MAX_CPUS) {
        return Err(Error::InvalidConfig(format!(
            "vCPU count {} is more than vireo supports ({})",
            vcpus,
            arch::mptable::MAX_CPUS
        )));
    }
    Ok(())
}

pub(crate) fn build(config: &VmConfig) -> Result<Machine, Error> {
    validate_machine(config.vcpus, config.mem_mib)?;
    let mut kernel = open("kernel image", &config.kernel)?;
    let mut initrd = match &config.initrd {
        Some(p) => Some((p.as_path(), open("initrd", p)?)),
        None => None,
    };
    let mem_size = config.mem_mib << 20;
    let mut memory = Memory::anonymous_with(
        mem_size,
        config.track_dirty_pages,
        config.huge_pages,
        config.merge,
    )?;
    if let Some(h) = &config.hotplug {
        let layout = h.layout(config.mem_mib).map_err(Error::InvalidConfig)?;
        memory.add_hotplug(
            vm_memory::GuestAddress(layout.addr),
            layout.region_size,
            None,
        )?;
    }
    // Devices before the kernel: they add to the kernel command line.
    let (vm, devices) = platform(config, &memory)?;
    let cmdline = format!("{}{}", config.cmdline, devices.cmdline());
    let boot = boot::load(
        &memory.guest,
        BootInputs {
            kernel_path: &config.kernel,
            kernel: &mut kernel,
            initrd: initrd.as_mut().map(|(p, f)| (*p, f)),
            cmdline: &cmdline,
            cmdline_added: devices.cmdline().len(),
            mem_size,
        },
    )?;
    tracing::debug!("kernel loaded");
    let mptable =
        arch::mptable::build(config.vcpus).map_err(|e| Error::InvalidConfig(e.to_string()))?;
    memory
        .guest
        .write_slice(&mptable, GuestAddress(arch::mptable::MPTABLE_START))
        .map_err(|_| Error::Boot(boot::Error::GuestMemory("the MP table")))?;
    memory
        .guest
        .write_slice(
            &crate::acpi::build(config.vcpus, devices.acpi_devices()),
            GuestAddress(arch::layout::ACPI_START),
        )
        .map_err(|_| Error::Boot(boot::Error::GuestMemory("the ACPI tables")))?;

    let mut vcpus = Vec::with_capacity(config.vcpus as usize);
    for index in 0..config.vcpus {
        let vcpu = Vcpu::new(&vm, index)?;
        let entry = (index == 0).then_some((boot.mode, boot.entry));
        vcpu.configure(&vm, config.vcpus, entry, config.cpu_template.as_ref())?;
        vcpus.push(vcpu);
    }

    tracing::debug!("vCPUs configured");
    Ok(Machine::assemble(
        vm,
        memory,
        vcpus,
        devices,
        Some(boot),
        config.clone(),
    ))
}

/// What a booted and a restored VM share: the KVM VM (checked against `config`'s vCPU count),
/// `memory` given to it, its interrupt controllers, and `config`'s devices.
pub(crate) fn platform(config: &VmConfig, memory: &Memory) -> Result<(Vm, DeviceManager), Error> {
    let mut vm = Vm::new()?;
    tracing::debug!("KVM VM created");
    if config.vcpus > vm.max_vcpus() {
        return Err(Error::InvalidConfig(format!(
            "vCPU count {} is more than this host's KVM allows ({})",
            config.vcpus,
            vm.max_vcpus()
        )));
    }
    vm.register_memory(&memory.guest, memory.track_dirty, memory.hotplug)?;
    vm.setup_irqchip(config.pit)?;
    tracing::debug!("guest memory and interrupt controllers ready");
    let devices = DeviceManager::create(config, &vm, &memory.guest)?;
    Ok((vm, devices))
}

impl Machine {
    /// The machine, its buses taken from `devices` for the vCPUs.
    pub(crate) fn assemble(
        vm: Vm,
        memory: Memory,
        vcpus: Vec<Vcpu>,
        mut devices: DeviceManager,
        boot: Option<BootSetup>,
        config: VmConfig,
    ) -> Self {
        let (pio, mmio) = devices.take_buses();
        Machine {
            vm,
            memory,
            vcpus,
            pio,
            mmio,
            devices,
            boot,
            config,
        }
    }
}
