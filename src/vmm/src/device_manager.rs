//! Every device of a VM in one place: the legacy PC devices on the port I/O bus and the virtio
//! devices on the MMIO bus. The manager allocates what each device occupies (an MMIO window and
//! an interrupt line per virtio device, its queue ioeventfds and irqfd, its command-line and
//! ACPI DSDT entries) and finds devices by kind and ID for changes while the guest runs.
//!
//! Guests find virtio devices two ways: an `LNRO0005` device in the ACPI DSDT (what kernels
//! configured like Firecracker's use) and a `virtio_mmio.device=` entry on the command line
//! (kernels with CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES, `acpi=off`, and vireo's test guest).
//!
//! Adding a kind of device: its model in one folder under `devices/`, and one registration in
//! [`DeviceManager::create`].

use crate::config::VmConfig;
use crate::memory::GuestMemoryMmap;
use crate::vstate::vm::Vm;
use crate::Error;
use devices::acpi::vmgenid::VmGenId;
use devices::bus::Bus;
use devices::legacy::{i8042, power, serial, AcpiPmDevice, PowerDevice, Serial, I8042};
use devices::virtio::balloon;
use devices::virtio::block::{Block, BlockConfig};
use devices::virtio::mmio::{MmioTransport, MMIO_WINDOW_SIZE, QUEUE_NOTIFY_OFFSET};
use devices::virtio::net::tap::Tap;
use devices::virtio::net::{Net, NetConfig as NetDeviceConfig};
use devices::virtio::rng::Rng;
use devices::virtio::{Interrupt, VirtioDevice};
use devices::EventFdTrigger;
use std::path::PathBuf;
use std::sync::atomic::AtomicU8;
use std::sync::{Arc, Mutex};
use vmm_sys_util::eventfd::EventFd;

/// First virtio-mmio window, in the 32-bit MMIO gap.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// First interrupt line for virtio devices (0-4 are the PIT, keyboard, cascade and COMs).
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// Interrupt line of the ACPI Generic Event Device (VM generation ID changes): the last pin.
pub const GED_IRQ: u32 = arch::layout::IOAPIC_PINS as u32 - 1;
/// Last IOAPIC pin for virtio devices.
pub const VIRTIO_IRQ_MAX: u32 = GED_IRQ - 1;

/// The kinds of device the API can address by ID.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    /// The virtio-balloon device (`PUT /balloon`; ID `balloon`).
    Balloon,
    /// A virtio-blk drive (`PUT /drives/{id}`).
    Drive,
    /// The virtio-mem device of memory hotplug (`PUT /hotplug/memory`; ID `memory-hotplug`).
    Memory,
    /// The virtio-rng entropy device (`PUT /entropy`; ID `entropy`).
    Entropy,
    /// A virtio-net interface (`PUT /network-interfaces/{id}`).
    Interface,
    /// The virtio-vsock device (`PUT /vsock`; ID `vsock`).
    Vsock,
}

impl DeviceKind {
    /// The kind of thread that runs such a device (and the seccomp filter it installs).
    pub fn thread_kind(self) -> utils::seccomp::ThreadKind {
        match self {
            DeviceKind::Balloon => utils::seccomp::ThreadKind::Balloon,
            DeviceKind::Drive => utils::seccomp::ThreadKind::Block,
            DeviceKind::Memory => utils::seccomp::ThreadKind::Mem,
            DeviceKind::Entropy => utils::seccomp::ThreadKind::Rng,
            DeviceKind::Interface => utils::seccomp::ThreadKind::Net,
            DeviceKind::Vsock => utils::seccomp::ThreadKind::Vsock,
        }
    }

    /// The kind as a snapshot names it.
    pub fn name(self) -> &'static str {
        match self {
            DeviceKind::Balloon => "balloon device",
            DeviceKind::Drive => "drive",
            DeviceKind::Memory => "memory hotplug device",
            DeviceKind::Entropy => "entropy device",
            DeviceKind::Interface => "network interface",
            DeviceKind::Vsock => "vsock device",
        }
    }
}

/// A change to a device while the guest runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceUpdate {
    /// Re-open the device's backing file from this path (drives).
    Backing(PathBuf),
    /// New rate limits (drives).
    RateLimiter(devices::rate_limiter::RateLimiterConfig),
    /// New receive and/or transmit rate limits (network interfaces).
    RxTxRateLimiters {
        /// Frames to the guest.
        rx: Option<devices::rate_limiter::RateLimiterConfig>,
        /// Frames from the guest.
        tx: Option<devices::rate_limiter::RateLimiterConfig>,
    },
}

struct VirtioEntry {
    kind: DeviceKind,
    id: String,
    transport: Arc<Mutex<MmioTransport>>,
}

/// One virtio device in a snapshot: which it is, and its transport's and its own state.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VirtioDeviceState {
    /// [`DeviceKind::name`].
    pub kind: String,
    /// Its ID.
    pub id: String,
    /// Transport registers, queues and device state.
    pub mmio: devices::virtio::mmio::persist::MmioState,
}

/// Every device of a VM in a snapshot.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DevicesState {
    /// COM1.
    pub serial: devices::legacy::serial::persist::SerialState,
    /// The i8042 controller.
    pub i8042: devices::legacy::i8042::persist::I8042State,
    /// The virtio devices, in MMIO window order.
    pub virtio: Vec<VirtioDeviceState>,
}

/// Events the legacy devices raise for the VMM's event loop.
pub struct PlatformEvents {
    /// The guest asked for a reset (i8042, ACPI reset register).
    pub reset: EventFdTrigger,
    /// The guest asked to power off (power port, ACPI S5).
    pub power: EventFdTrigger,
    /// The value written to the power port.
    pub power_value: Arc<AtomicU8>,
}

/// The devices of one VM.
pub struct DeviceManager {
    pio: Bus,
    mmio: Bus,
    cmdline: String,
    acpi: Vec<crate::acpi::VirtioMmioDevice>,
    virtio: Vec<VirtioEntry>,
    serial: Arc<Mutex<Serial>>,
    i8042: Arc<Mutex<I8042>>,
    vmgenid: VmGenId,
    events: PlatformEvents,
    /// Unix sockets devices listen on, removed when the VM goes.
    sockets: Vec<utils::unix_socket::OwnedPath>,
    /// Signalled when a driver sets DRIVER_OK: the VMM thread then activates the device.
    activate_evt: Arc<EventFd>,
    /// The balloon, if the VM has one: its handle and its transport (for configuration
    /// changes).
    balloon: Option<(balloon::Handle, Arc<Mutex<MmioTransport>>)>,
    /// The memory hotplug device: its block state and its transport.
    hotplug: Option<(devices::virtio::mem::SharedState, Arc<Mutex<MmioTransport>>)>,
}

impl DeviceManager {
    /// Creates every device `config` asks for, plus the legacy platform every guest gets.
    /// This is the one place each kind of device is registered.
    pub fn create(config: &VmConfig, vm: &Vm, mem: &GuestMemoryMmap) -> Result<Self, Error> {
        let mut dm = Self::legacy(config, vm, mem)?;
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
                dm.cmdline.push_str(if drive.read_only {
                    " root=/dev/vda ro"
                } else {
                    " root=/dev/vda rw"
                });
            }
            let block = Block::new(BlockConfig {
                path: drive.path.clone(),
                id: id.clone(),
                read_only: drive.read_only,
                rate_limiter: drive.rate_limiter,
                io_engine: drive.io_engine,
            })?;
            dm.add_virtio(vm, mem, DeviceKind::Drive, id, Box::new(block))?;
        }
        let mut taps: Vec<(&str, &str)> = Vec::new();
        for net in &config.nets {
            if let Some((other, _)) = taps.iter().find(|(_, t)| *t == net.tap) {
                return Err(Error::InvalidConfig(format!(
                    "network interfaces {other} and {} both use TAP {}: each needs its own",
                    net.id, net.tap
                )));
            }
            if taps.iter().any(|(id, _)| *id == net.id) {
                return Err(Error::InvalidConfig(format!(
                    "network interface id '{}' is used twice",
                    net.id
                )));
            }
            taps.push((&net.id, &net.tap));
            let tap = match net.tap_fd {
                Some(fd) => Tap::from_fd(fd),
                None => Tap::open(&net.tap),
            }
            .map_err(|err| Error::Net {
                id: net.id.clone(),
                err,
            })?;
            let mut device = Net::new(
                NetDeviceConfig {
                    id: net.id.clone(),
                    mac: net.mac,
                    mtu: net.mtu,
                },
                tap,
            )
            .with_rate_limiters(&net.rx_rate_limiter, &net.tx_rate_limiter)
            .map_err(|e| {
                Error::InvalidConfig(format!(
                    "network interface {}: cannot make its rate limiters: {e}",
                    net.id
                ))
            })?;
            if let (true, Some(m)) = (net.mmds, &config.mmds) {
                device = device.with_mmds(m.store.0.clone(), m.ip);
            }
            dm.add_virtio(
                vm,
                mem,
                DeviceKind::Interface,
                net.id.clone(),
                Box::new(device),
            )?;
        }
        if let Some(v) = &config.vsock {
            crate::config::check_cid(v.cid).map_err(Error::InvalidConfig)?;
            let (listener, owned) = utils::unix_socket::bind(&v.uds).map_err(|e| {
                Error::InvalidConfig(format!("vsock socket {}: {e}", v.uds.display()))
            })?;
            dm.sockets.push(owned);
            let device = devices::virtio::vsock::Vsock::new(v.cid, v.uds.clone(), listener);
            dm.add_virtio(vm, mem, DeviceKind::Vsock, "vsock".into(), Box::new(device))?;
        }
        if config.rng {
            let rng = Rng::with_rate_limiter(&config.rng_rate_limiter).map_err(|err| {
                Error::InvalidConfig(format!(
                    "entropy device: cannot make its rate limiter: {err}"
                ))
            })?;
            dm.add_virtio(
                vm,
                mem,
                DeviceKind::Entropy,
                "entropy".into(),
                Box::new(rng),
            )?;
        }
        if let Some(b) = &config.balloon {
            b.check(config.mem_mib).map_err(Error::InvalidConfig)?;
            let device = balloon::Balloon::new(b).map_err(|e| {
                Error::InvalidConfig(format!("balloon: cannot create the device: {e}"))
            })?;
            let handle = device.handle();
            let transport = dm.add_virtio(
                vm,
                mem,
                DeviceKind::Balloon,
                "balloon".into(),
                Box::new(device),
            )?;
            dm.balloon = Some((handle, transport));
        }
        if let Some(h) = &config.hotplug {
            let layout = h.layout(config.mem_mib).map_err(Error::InvalidConfig)?;
            let host = {
                use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
                mem.find_region(vm_memory::GuestAddress(layout.addr))
                    .filter(|r| r.start_addr().0 == layout.addr && r.len() == layout.region_size)
                    .map(|r| r.as_ptr() as u64)
                    .ok_or_else(|| {
                        Error::InvalidConfig("memory hotplug: the region is not mapped".into())
                    })?
            };
            let fd = vm.try_clone_fd().map_err(Error::EventFd)?;
            let backend =
                crate::hotplug::SlotBackend::new(fd, layout, host, config.track_dirty_pages);
            let device = devices::virtio::mem::VirtioMem::new(layout, Box::new(backend));
            let state = device.state();
            devices::bus::lock(&state)
                .set_requested_size(h.requested_mib.saturating_mul(1 << 20))
                .map_err(Error::InvalidConfig)?;
            let transport = dm.add_virtio(
                vm,
                mem,
                DeviceKind::Memory,
                "memory-hotplug".into(),
                Box::new(device),
            )?;
            dm.hotplug = Some((state, transport));
        }
        Ok(dm)
    }

    /// COM1, the i8042, the power port and the ACPI sleep/reset registers (their DSDT entries
    /// are fixed: see `acpi`).
    fn legacy(config: &VmConfig, vm: &Vm, mem: &GuestMemoryMmap) -> Result<Self, Error> {
        let serial_irq = EventFdTrigger::new().map_err(Error::EventFd)?;
        vm.register_irqfd(&serial_irq.0, serial::COM1_IRQ)?;
        let serial = Arc::new(Mutex::new(Serial::new(serial_irq, {
            let out = crate::console::output(&config.serial)?;
            if config.serial_rate_limiter.limits() {
                let limited = serial::LimitedOutput::new(out, &config.serial_rate_limiter)
                    .map_err(|e| {
                        Error::InvalidConfig(format!(
                            "serial console: cannot make its rate limiter: {e}"
                        ))
                    })?;
                Box::new(limited)
            } else {
                out
            }
        })));
        let events = PlatformEvents {
            reset: EventFdTrigger::new().map_err(Error::EventFd)?,
            power: EventFdTrigger::new().map_err(Error::EventFd)?,
            power_value: Arc::new(AtomicU8::new(0)),
        };
        let clone = |t: &EventFdTrigger| t.try_clone().map_err(Error::EventFd);
        let kbd_irq = EventFdTrigger::new().map_err(Error::EventFd)?;
        vm.register_irqfd(&kbd_irq.0, i8042::KBD_IRQ)?;
        let i8042 = Arc::new(Mutex::new(I8042::new(clone(&events.reset)?, kbd_irq)));
        let mut pio = Bus::new();
        pio.insert(serial.clone(), serial::COM1_BASE, serial::PORT_SIZE)?;
        pio.insert(i8042.clone(), i8042::I8042_BASE, i8042::PORT_SIZE)?;
        pio.insert(
            Arc::new(Mutex::new(PowerDevice::new(
                clone(&events.power)?,
                events.power_value.clone(),
            ))),
            power::POWER_PORT,
            power::PORT_SIZE,
        )?;
        pio.insert(
            Arc::new(Mutex::new(AcpiPmDevice::new(
                clone(&events.power)?,
                clone(&events.reset)?,
            ))),
            power::acpi::ACPI_PM_BASE,
            power::acpi::PORT_SIZE,
        )?;
        let ged_irq = EventFdTrigger::new().map_err(Error::EventFd)?;
        vm.register_irqfd(&ged_irq.0, GED_IRQ)?;
        let vmgenid = VmGenId::new(mem, arch::layout::VMGENID_START, ged_irq)
            .map_err(|e| Error::InvalidConfig(e.to_string()))?;
        Ok(Self {
            pio,
            mmio: Bus::new(),
            cmdline: String::new(),
            acpi: Vec::new(),
            virtio: Vec::new(),
            serial,
            i8042,
            vmgenid,
            events,
            sockets: Vec::new(),
            activate_evt: Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?),
            balloon: None,
            hotplug: None,
        })
    }

    /// Places a virtio device: the next MMIO window and interrupt line, its queue
    /// notifications as ioeventfds, its interrupt as an irqfd, its command-line and DSDT
    /// entries. Returns its transport, for devices the VMM changes while the guest runs.
    fn add_virtio(
        &mut self,
        vm: &Vm,
        mem: &GuestMemoryMmap,
        kind: DeviceKind,
        id: String,
        device: Box<dyn VirtioDevice>,
    ) -> Result<Arc<Mutex<MmioTransport>>, Error> {
        let index = self.virtio.len();
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
        let mut transport = MmioTransport::new(
            device,
            mem.clone(),
            Arc::new(Interrupt::new(irq_evt)),
            queue_evts,
        );
        transport.defer_activation(self.activate_evt.clone());
        transport.set_thread_filter(utils::seccomp::filter(kind.thread_kind()));
        let transport = Arc::new(Mutex::new(transport));
        self.mmio
            .insert(transport.clone(), base, MMIO_WINDOW_SIZE)?;
        self.cmdline.push_str(&format!(
            " virtio_mmio.device={}K@{base:#x}:{irq}",
            MMIO_WINDOW_SIZE >> 10
        ));
        self.acpi.push(crate::acpi::VirtioMmioDevice {
            base,
            size: MMIO_WINDOW_SIZE,
            irq,
        });
        self.virtio.push(VirtioEntry {
            kind,
            id,
            transport: transport.clone(),
        });
        Ok(transport)
    }

    /// What the devices add to the kernel command line (with a leading space).
    pub fn cmdline(&self) -> &str {
        &self.cmdline
    }

    /// The virtio devices as the ACPI DSDT lists them.
    pub fn acpi_devices(&self) -> &[crate::acpi::VirtioMmioDevice] {
        &self.acpi
    }

    /// The buses the vCPUs dispatch port I/O and MMIO exits to.
    pub(crate) fn take_buses(&mut self) -> (Arc<Bus>, Arc<Bus>) {
        (
            Arc::new(std::mem::replace(&mut self.pio, Bus::new())),
            Arc::new(std::mem::replace(&mut self.mmio, Bus::new())),
        )
    }

    /// The serial port, for the console's input.
    pub fn serial(&self) -> Arc<Mutex<Serial>> {
        self.serial.clone()
    }

    /// The events the platform devices raise.
    pub fn events(&self) -> &PlatformEvents {
        &self.events
    }

    /// Applies `update` to the device of `kind` named `id`.
    pub fn update(&self, kind: DeviceKind, id: &str, update: DeviceUpdate) -> Result<(), Error> {
        let entry = self
            .virtio
            .iter()
            .find(|e| e.kind == kind && e.id == id)
            .ok_or_else(|| {
                Error::InvalidConfig(format!("{} '{id}' does not exist", kind.name()))
            })?;
        let mut transport = devices::bus::lock(&entry.transport);
        match update {
            DeviceUpdate::Backing(path) => transport.replace_backing(&path),
            DeviceUpdate::RateLimiter(config) => transport.update_rate_limiter(&config),
            DeviceUpdate::RxTxRateLimiters { rx, tx } => {
                transport.update_rx_tx_rate_limiters(rx.as_ref(), tx.as_ref())
            }
        }
        .map_err(Error::InvalidConfig)
    }

    fn balloon(&self) -> Result<&(balloon::Handle, Arc<Mutex<MmioTransport>>), Error> {
        self.balloon
            .as_ref()
            .ok_or_else(|| Error::InvalidConfig("the microVM has no balloon device".into()))
    }

    /// Gives the balloon a new target and tells the driver.
    pub fn set_balloon_target(&self, mib: u32) -> Result<(), Error> {
        let (handle, transport) = self.balloon()?;
        handle.set_target_mib(mib);
        devices::bus::lock(transport).config_changed();
        Ok(())
    }

    /// The balloon's size and the guest's latest statistics.
    pub fn balloon_stats(&self) -> Result<balloon::BalloonStats, Error> {
        Ok(self.balloon()?.0.stats())
    }

    /// The balloon's statistics interval now (the API may have changed it).
    pub fn balloon_stats_interval(&self) -> Option<u16> {
        self.balloon.as_ref().map(|(h, _)| h.stats_interval_s())
    }

    /// Changes the balloon's statistics interval.
    pub fn set_balloon_stats_interval(&self, secs: u16) -> Result<(), Error> {
        self.balloon()?
            .0
            .set_stats_interval_s(secs)
            .map_err(Error::InvalidConfig)
    }

    /// Starts a free page hinting run and tells the driver.
    pub fn start_balloon_hinting(&self, ack_on_stop: bool) -> Result<(), Error> {
        let (handle, transport) = self.balloon()?;
        handle.start_hinting(ack_on_stop);
        devices::bus::lock(transport).config_changed();
        Ok(())
    }

    /// Ends the hinting run and tells the driver.
    pub fn stop_balloon_hinting(&self) -> Result<(), Error> {
        let (handle, transport) = self.balloon()?;
        handle.stop_hinting();
        devices::bus::lock(transport).config_changed();
        Ok(())
    }

    /// Where free page hinting stands.
    pub fn balloon_hinting_status(&self) -> Result<balloon::HintingStatus, Error> {
        Ok(self.balloon()?.0.hinting_status())
    }

    /// Asks the guest to plug `mib` MiB of hotplug memory.
    pub fn set_hotplug_requested(&self, mib: u64) -> Result<(), Error> {
        let (state, transport) = self
            .hotplug
            .as_ref()
            .ok_or_else(|| Error::InvalidConfig("the microVM has no memory hotplug".into()))?;
        devices::bus::lock(state)
            .set_requested_size(mib.saturating_mul(1 << 20))
            .map_err(Error::InvalidConfig)?;
        devices::bus::lock(transport).config_changed();
        Ok(())
    }

    /// Plugged and requested bytes of hotplug memory.
    pub fn hotplug_sizes(&self) -> Option<(u64, u64)> {
        self.hotplug.as_ref().map(|(state, _)| {
            let s = devices::bus::lock(state);
            (s.plugged_size(), s.requested_size())
        })
    }

    /// The event a driver's DRIVER_OK signals; then call [`DeviceManager::activate_pending`].
    pub fn activation_event(&self) -> &EventFd {
        &self.activate_evt
    }

    /// Activates the devices whose drivers set DRIVER_OK, on the calling (VMM) thread: device
    /// threads are started there, never on a vCPU thread.
    pub fn activate_pending(&self) {
        let _ = self.activate_evt.read();
        for e in &self.virtio {
            devices::bus::lock(&e.transport).activate_pending();
        }
    }

    /// Parks every virtio device thread between requests (see [`MmioTransport::pause`]).
    pub fn pause(&self) -> Result<(), Error> {
        // A device the driver has just started is saved as started.
        self.activate_pending();
        for e in &self.virtio {
            devices::bus::lock(&e.transport).pause().map_err(|err| {
                Error::InvalidConfig(format!("cannot pause {} '{}': {err}", e.kind.name(), e.id))
            })?;
        }
        Ok(())
    }

    /// Lets paused device threads run again.
    pub fn resume(&self) {
        for e in &self.virtio {
            devices::bus::lock(&e.transport).resume();
        }
    }

    /// The state of every device; they must be paused.
    pub fn save(&self) -> Result<DevicesState, Error> {
        let mut virtio = Vec::with_capacity(self.virtio.len());
        for e in &self.virtio {
            let mmio = devices::bus::lock(&e.transport).save().map_err(|err| {
                Error::InvalidConfig(format!("cannot save {} '{}': {err}", e.kind.name(), e.id))
            })?;
            virtio.push(VirtioDeviceState {
                kind: e.kind.name().to_string(),
                id: e.id.clone(),
                mmio,
            });
        }
        Ok(DevicesState {
            serial: devices::bus::lock(&self.serial).save(),
            i8042: devices::bus::lock(&self.i8042).save(),
            virtio,
        })
    }

    /// Gives devices built from a snapshot's configuration the state they had. They must sit
    /// where they sat (same kinds, IDs and order, hence the same MMIO windows and interrupt
    /// lines), since the guest's drivers know them by place. The VM generation ID changes.
    pub fn restore(&mut self, state: &DevicesState, mem: &GuestMemoryMmap) -> Result<(), Error> {
        let bad = |m: String| Error::InvalidConfig(format!("snapshot devices: {m}"));
        if state.virtio.len() != self.virtio.len() {
            return Err(bad(format!(
                "the snapshot has {} virtio devices, the VM built from its configuration {}",
                state.virtio.len(),
                self.virtio.len()
            )));
        }
        devices::bus::lock(&self.serial)
            .restore(&state.serial)
            .map_err(bad)?;
        devices::bus::lock(&self.i8042)
            .restore(&state.i8042)
            .map_err(bad)?;
        for (n, (e, s)) in self.virtio.iter().zip(&state.virtio).enumerate() {
            if s.kind != e.kind.name() || s.id != e.id {
                return Err(bad(format!(
                    "device {n} is {} '{}' in the snapshot but {} '{}' here",
                    s.kind,
                    s.id,
                    e.kind.name(),
                    e.id
                )));
            }
            devices::bus::lock(&e.transport)
                .restore(&s.mmio)
                .map_err(|err| bad(format!("{} '{}': {err}", e.kind.name(), e.id)))?;
        }
        self.vmgenid
            .regenerate(mem)
            .map_err(|e| bad(format!("VM generation ID: {e}")))?;
        Ok(())
    }

    /// The VM generation ID the guest sees now.
    pub fn generation_id(&self) -> [u8; devices::acpi::vmgenid::ID_BYTES] {
        self.vmgenid.id()
    }

    /// Presses Ctrl+Alt+Del on the guest's keyboard.
    pub fn send_ctrl_alt_del(&self) {
        devices::bus::lock(&self.i8042).trigger_ctrl_alt_del();
    }
}
