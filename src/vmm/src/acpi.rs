//! ACPI tables for a hardware-reduced ACPI platform: how modern guests (Linux with ACPI, as
//! Firecracker and Cloud Hypervisor boot it) find their CPUs, their interrupt controller, the
//! serial port, and how to power off and reset.
//!
//! ```text
//! RSDP (ACPI_START) → XSDT → FADT → DSDT (\_SB.COM1, \_SB.PS2K, \_SB.VRnn per virtio device,
//!                                          \_SB.VGEN and \_SB.GED_ (VM generation ID), \_S5_)
//!                          → MADT (one local APIC per vCPU, the IOAPIC)
//! ```
//! The MP table stays as well, for guests booted with `acpi=off` or without ACPI support.

use crate::device_manager::GED_IRQ;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml};
use arch::layout::{ACPI_START, APIC_START, IOAPIC_START, VMGENID_START};
use devices::legacy::power::acpi as pm;
use devices::legacy::{i8042, serial};

const OEM_ID: [u8; 6] = *b"VIREO ";
const OEM_TABLE_ID: [u8; 8] = *b"VIREOVM ";
const OEM_REVISION: u32 = 1;
const IAPC_8042: u16 = 1 << 1;
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_MSI_NOT_SUPPORTED: u16 = 1 << 3;
const IAPC_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;
/// DSDT revision 2 and up means 64-bit AML integers.
const DSDT_REVISION: u8 = 6;

fn aml_bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// A virtio-mmio device as the DSDT describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioMmioDevice {
    /// MMIO window base.
    pub base: u64,
    /// MMIO window size.
    pub size: u64,
    /// Interrupt line (GSI).
    pub irq: u32,
}

/// `Device (VRnn)` with the `LNRO0005` ID Linux's virtio_mmio driver matches on.
fn virtio_device(index: usize, dev: &VirtioMmioDevice) -> Vec<u8> {
    let mem = aml::Memory32Fixed::new(true, dev.base as u32, dev.size as u32);
    let irq = aml::Interrupt::new(true, true, false, false, dev.irq);
    let crs = aml::ResourceTemplate::new(vec![&mem, &irq]);
    let hid = aml::Name::new("_HID".into(), &"LNRO0005");
    let uid_value = index as u32;
    let uid = aml::Name::new("_UID".into(), &uid_value);
    let cca = aml::Name::new("_CCA".into(), &aml::ONE);
    let crs_name = aml::Name::new("_CRS".into(), &crs);
    let name = format!("VR{index:02X}");
    aml_bytes(&aml::Device::new(
        name.as_str().into(),
        vec![&hid, &uid, &cca, &crs_name],
    ))
}

fn dsdt(virtio: &[VirtioMmioDevice]) -> Vec<u8> {
    let port = serial::COM1_BASE as u16;
    let io = aml::IO::new(port, port, 1, serial::PORT_SIZE as u8);
    let irq = aml::Interrupt::new(true, true, false, false, serial::COM1_IRQ);
    let com1_resources = aml::ResourceTemplate::new(vec![&io, &irq]);
    let hid = aml::EISAName::new("PNP0501");
    let hid_name = aml::Name::new("_HID".into(), &hid);
    let uid_name = aml::Name::new("_UID".into(), &aml::ZERO);
    let crs_name = aml::Name::new("_CRS".into(), &com1_resources);
    let com1 = aml::Device::new("COM1".into(), vec![&hid_name, &uid_name, &crs_name]);
    // The PS/2 keyboard controller (reset line, and Ctrl+Alt+Del from the API).
    let kbd_data = aml::IO::new(0x60, 0x60, 1, 1);
    let kbd_cmd = aml::IO::new(0x64, 0x64, 1, 1);
    let kbd_irq = aml::Interrupt::new(true, true, false, false, i8042::KBD_IRQ);
    let kbd_resources = aml::ResourceTemplate::new(vec![&kbd_data, &kbd_cmd, &kbd_irq]);
    let kbd_hid = aml::EISAName::new("PNP0303");
    let kbd_hid_name = aml::Name::new("_HID".into(), &kbd_hid);
    let kbd_crs_name = aml::Name::new("_CRS".into(), &kbd_resources);
    let kbd = aml::Device::new("PS2K".into(), vec![&kbd_hid_name, &kbd_crs_name]);
    let virtio_aml: Vec<u8> = virtio
        .iter()
        .enumerate()
        .flat_map(|(i, d)| virtio_device(i, d))
        .collect();
    let virtio_raw = RawAml(virtio_aml);
    let vmgenid = RawAml(vmgenid_devices());
    let sb = aml::Scope::new("\\_SB_".into(), vec![&com1, &kbd, &virtio_raw, &vmgenid]);
    // \_S5_: the SLP_TYP values (a, b) for soft-off, as the sleep control register expects.
    let s5_type = pm::S5_SLEEP_TYPE;
    let s5_package = aml::Package::new(vec![&s5_type, &s5_type, &0u8, &0u8]);
    let s5 = aml::Name::new("_S5_".into(), &s5_package);
    let mut table = Sdt::new(
        *b"DSDT",
        36,
        DSDT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    table.append_slice(&aml_bytes(&sb));
    table.append_slice(&aml_bytes(&s5));
    table.as_slice().to_vec()
}

/// `\_SB.VGEN`, the VM generation ID (Linux's vmgenid driver matches `VMGENCTR` and reads
/// the ID's address from `ADDR`), and `\_SB.GED_`, the Generic Event Device whose interrupt
/// notifies VGEN that the ID changed.
fn vmgenid_devices() -> Vec<u8> {
    let addr = VMGENID_START;
    let (low, high) = (addr as u32, (addr >> 32) as u32);
    let hid = aml::Name::new("_HID".into(), &"VMGENCTR");
    let cid = aml::Name::new("_CID".into(), &"VM_GEN_COUNTER");
    let ddn = aml::Name::new("_DDN".into(), &"VM_Gen_Counter");
    let package = aml::Package::new(vec![&low, &high]);
    let addr_name = aml::Name::new("ADDR".into(), &package);
    let vgen = aml::Device::new("VGEN".into(), vec![&hid, &cid, &ddn, &addr_name]);
    let ged_hid = aml::Name::new("_HID".into(), &"ACPI0013");
    let ged_uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let irq = aml::Interrupt::new(true, true, false, false, GED_IRQ);
    let crs = aml::ResourceTemplate::new(vec![&irq]);
    let ged_crs = aml::Name::new("_CRS".into(), &crs);
    let vgen_path = aml::Path::new("\\_SB_.VGEN");
    let notify = aml::Notify::new(&vgen_path, &0x80u8);
    let is_ours = aml::Equal::new(&aml::Arg(0), &GED_IRQ);
    let when = aml::If::new(&is_ours, vec![&notify]);
    let evt = aml::Method::new("_EVT".into(), 1, true, vec![&when]);
    let ged = aml::Device::new("GED_".into(), vec![&ged_hid, &ged_uid, &ged_crs, &evt]);
    let mut v = aml_bytes(&vgen);
    v.extend(aml_bytes(&ged));
    v
}

/// Already-encoded AML placed inside a scope.
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

fn io_register(port: u64) -> GAS {
    GAS::new(AddressSpace::SystemIo, 8, 0, AccessSize::ByteAccess, port)
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut f = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    f.sleep_control_reg = io_register(pm::ACPI_PM_BASE + pm::SLEEP_CONTROL);
    f.sleep_status_reg = io_register(pm::ACPI_PM_BASE + pm::SLEEP_STATUS);
    f.reset_reg = io_register(pm::ACPI_PM_BASE + pm::RESET);
    f.reset_value = pm::RESET_VALUE;
    // An 8042 keyboard controller; no VGA, no MSI (there is no PCI) and no CMOS RTC.
    f.iapc_boot_arch =
        (IAPC_8042 | IAPC_VGA_NOT_PRESENT | IAPC_MSI_NOT_SUPPORTED | IAPC_CMOS_RTC_NOT_PRESENT)
            .into();
    f.hypervisor_vendor_identity = u64::from_le_bytes(*b"VIREO\0\0\0").into();
    aml_bytes(&f.finalize())
}

fn madt(cpus: u32) -> Vec<u8> {
    let mut m = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(APIC_START as u32),
    );
    for cpu in 0..cpus {
        m.add_structure(ProcessorLocalApic::new(
            cpu as u8,
            cpu as u8,
            EnabledStatus::Enabled,
        ));
    }
    // Same IOAPIC ID as in the MP table; GSIs 0-23 map to its pins.
    m.add_structure(IoApic::new(cpus as u8, IOAPIC_START as u32, 0));
    aml_bytes(&m)
}

fn align(v: usize) -> usize {
    (v + 15) & !15
}

/// The ACPI tables for `cpus` vCPUs and the `virtio` devices as one image to write at
/// [`ACPI_START`], which is where the RSDP sits.
pub fn build(cpus: u32, virtio: &[VirtioMmioDevice]) -> Vec<u8> {
    let mut image = vec![0u8; align(Rsdp::len())];
    let place = |image: &mut Vec<u8>, table: &[u8]| -> u64 {
        let offset = image.len();
        image.extend_from_slice(table);
        image.resize(align(image.len()), 0);
        ACPI_START + offset as u64
    };
    let dsdt_addr = place(&mut image, &dsdt(virtio));
    let fadt_addr = place(&mut image, &fadt(dsdt_addr));
    let madt_addr = place(&mut image, &madt(cpus));
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt_addr = place(&mut image, &aml_bytes(&xsdt));
    let rsdp = aml_bytes(&Rsdp::new(OEM_ID, xsdt_addr));
    image[..rsdp.len()].copy_from_slice(&rsdp);
    debug_assert!(ACPI_START + image.len() as u64 <= VMGENID_START);
    image
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn table_at(image: &[u8], addr: u64) -> &[u8] {
        let off = (addr - ACPI_START) as usize;
        let len = u32::from_le_bytes(image[off + 4..off + 8].try_into().unwrap()) as usize;
        &image[off..off + len]
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    #[test]
    fn tables_link_up_with_valid_checksums() {
        let virtio = [
            VirtioMmioDevice {
                base: 0xd000_0000,
                size: 0x1000,
                irq: 5,
            },
            VirtioMmioDevice {
                base: 0xd000_1000,
                size: 0x1000,
                irq: 6,
            },
        ];
        for cpus in [1u32, 2, 254] {
            let image = build(cpus, &virtio);
            assert!(ACPI_START + image.len() as u64 <= VMGENID_START);
            assert_eq!(&image[..8], b"RSD PTR ");
            assert_eq!(sum(&image[..20]), 0);
            assert_eq!(sum(&image[..36]), 0);
            let xsdt = table_at(&image, u64_at(&image, 24));
            assert_eq!(&xsdt[..4], b"XSDT");
            assert_eq!(sum(xsdt), 0);
            let entries: Vec<u64> = (36..xsdt.len())
                .step_by(8)
                .map(|o| u64_at(xsdt, o))
                .collect();
            assert_eq!(entries.len(), 2);
            let fadt = table_at(&image, entries[0]);
            assert_eq!(&fadt[..4], b"FACP");
            assert_eq!(sum(fadt), 0);
            let flags = u32::from_le_bytes(fadt[112..116].try_into().unwrap());
            assert_ne!(flags & (1 << 20), 0, "hardware-reduced");
            assert_eq!(u64_at(fadt, 244 + 4), pm::ACPI_PM_BASE + pm::SLEEP_CONTROL);
            assert_eq!(u64_at(fadt, 116 + 4), pm::ACPI_PM_BASE + pm::RESET);
            assert_eq!(
                u16::from_le_bytes([fadt[109], fadt[110]]),
                0x2e,
                "IAPC_BOOT_ARCH"
            );
            let dsdt = table_at(&image, u64_at(fadt, 140));
            assert_eq!(&dsdt[..4], b"DSDT");
            assert_eq!(sum(dsdt), 0);
            let s5 = dsdt
                .windows(4)
                .position(|w| w == b"_S5_")
                .expect("_S5_ in the DSDT");
            assert_eq!(dsdt[s5 + 4], 0x12, "_S5_ is a package");
            assert!(
                dsdt.windows(4).any(|w| w == b"PS2K"),
                "keyboard controller declared"
            );
            for id in [&b"VMGENCTR"[..], b"ACPI0013", b"_EVT"] {
                assert!(
                    dsdt.windows(id.len()).any(|w| w == id),
                    "{id:?} in the DSDT"
                );
            }
            let lnro = dsdt.windows(8).filter(|w| w == b"LNRO0005").count();
            assert_eq!(lnro, 2, "one LNRO0005 device per virtio window");
            let madt = table_at(&image, entries[1]);
            assert_eq!(&madt[..4], b"APIC");
            assert_eq!(sum(madt), 0);
            let mut off = 44;
            let mut lapics = 0;
            let mut ioapics = 0;
            while off < madt.len() {
                match madt[off] {
                    0 => lapics += 1,
                    1 => ioapics += 1,
                    t => panic!("unexpected MADT entry {t}"),
                }
                off += madt[off + 1] as usize;
            }
            assert_eq!((lapics, ioapics), (cpus, 1));
        }
    }
}
