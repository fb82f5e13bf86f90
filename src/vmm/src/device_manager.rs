//! Places virtio devices in the guest: an MMIO window and an interrupt line each, queue
//! notifications as KVM ioeventfds, interrupts as KVM irqfds. Guests find them two ways: an
//! `LNRO0005` device in the ACPI DSDT (what kernels configured like Firecracker's use) and a
//! `virtio_mmio.device=` entry on the command line (kernels with
//! CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES, `acpi=off`, and vireo's test guest).

use crate::config::VmConfig;
use crate::memory::GuestMemoryMmap;
use crate::vstate::vm::Vm;
use crate::Error;
use devices::bus::Bus;
use devices::virtio::block::{Block, BlockConfig};
use devices::virtio::mmio::{MmioTransport, MMIO_WINDOW_SIZE, QUEUE_NOTIFY_OFFSET};
use devices::virtio::rng::Rng;
use devices::virtio::{Interrupt, VirtioDevice};
use std::sync::{Arc, Mutex};
use vmm_sys_util::eventfd::EventFd;

/// First virtio-mmio window, in the 32-bit MMIO gap.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// First interrupt line for virtio devices (0-4 are the PIT, keyboard, cascade and COMs).
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// Last usable IOAPIC pin.
pub const VIRTIO_IRQ_MAX: u32 = arch::layout::IOAPIC_PINS as u32 - 1;

/// The virtio devices of a VM and the command-line fragment announcing them.
pub struct VirtioDevices {
    /// Kernel command line additions (`root=`, `virtio_mmio.device=`), with a leading space.
    pub cmdline: String,
    /// The devices' windows and interrupt lines, for the ACPI DSDT.
    pub acpi: Vec<crate::acpi::VirtioMmioDevice>,
    /// Drives by id, for changes while the guest runs.
    pub drives: Vec<(String, Arc<Mutex<MmioTransport>>)>,
}

fn attach(
    vm: &Vm,
    mem: &GuestMemoryMmap,
    bus: &mut Bus,
    index: usize,
    device: Box<dyn VirtioDevice>,
    out: &mut VirtioDevices,
) -> Result<Arc<Mutex<MmioTransport>>, Error> {
    let irq = VIRTIO_IRQ_BASE + index as u32;
    if irq > VIRTIO_IRQ_MAX {
        return Err(Error::InvalidConfig(format!(
            "too many virtio devices: at most {}",
            VIRTIO_IRQ_MAX - VIRTIO_IRQ_BASE + 1
        )));
    }
    let base = VIRTIO_MMIO_BASE + index as u64 * MMIO_WINDOW_SIZE;
    let irq_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?;
    vm.register_irqfd(&irq_evt, irq)?;
    let mut queue_evts = Vec::new();
    for q in 0..device.queue_max_sizes().len() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?;
        vm.register_mmio_ioevent(&evt, base + QUEUE_NOTIFY_OFFSET, q as u32)?;
        queue_evts.push(evt);
    }
    let transport = MmioTransport::new(
        device,
        mem.clone(),
        Arc::new(Interrupt::new(irq_evt)),
        queue_evts,
    );
    let transport = Arc::new(Mutex::new(transport));
    bus.insert(transport.clone(), base, MMIO_WINDOW_SIZE)?;
    out.cmdline.push_str(&format!(
        " virtio_mmio.device={}K@{base:#x}:{irq}",
        MMIO_WINDOW_SIZE >> 10
    ));
    out.acpi.push(crate::acpi::VirtioMmioDevice {
        base,
        size: MMIO_WINDOW_SIZE,
        irq,
    });
    Ok(transport)
}

/// Creates the drives and the entropy device of `config` on `bus`.
pub fn create(
    config: &VmConfig,
    vm: &Vm,
    mem: &GuestMemoryMmap,
    bus: &mut Bus,
) -> Result<VirtioDevices, Error> {
    let mut out = VirtioDevices {
        cmdline: String::new(),
        acpi: Vec::new(),
        drives: Vec::new(),
    };
    let mut index = 0;
    let mut ids: Vec<String> = Vec::new();
    for (n, drive) in config.drives.iter().enumerate() {
        let id = drive.id.clone().unwrap_or_else(|| format!("drive{n}"));
        if ids.contains(&id) {
            return Err(Error::InvalidConfig(format!(
                "drive id '{id}' is used twice"
            )));
        }
        ids.push(id.clone());
        if drive.root {
            if n != 0 {
                return Err(Error::InvalidConfig(format!(
                    "drive '{id}' cannot be the root device: only the first drive can"
                )));
            }
            out.cmdline.push_str(if drive.read_only {
                " root=/dev/vda ro"
            } else {
                " root=/dev/vda rw"
            });
        }
        let block = Block::new(BlockConfig {
            path: drive.path.clone(),
            id: id.clone(),
            read_only: drive.read_only,
        })?;
        let transport = attach(vm, mem, bus, index, Box::new(block), &mut out)?;
        out.drives.push((id, transport));
        index += 1;
    }
    if config.rng {
        attach(vm, mem, bus, index, Box::new(Rng::new()), &mut out)?;
    }
    Ok(out)
}
