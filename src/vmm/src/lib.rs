//! vireo's virtual machine monitor: builds a VM from a [`VmConfig`] and runs it to the end.
//!
//! One thread per vCPU runs KVM_RUN; the calling thread waits for the VM to end (guest reset
//! or power-off, a vCPU failure, a signal, or the console's quit key) and tears it down.

pub mod acpi;
pub mod boot;
mod builder;
pub mod config;
pub mod console;
pub mod controller;
pub mod cpu_config;
pub mod device_manager;
pub mod hotplug;
pub mod memory;
pub mod persist;
pub mod resources;
pub mod vstate;

pub use config::{DriveConfig, NetConfig, SerialConfig, VmConfig, DEFAULT_CMDLINE};

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use thiserror::Error;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};
use vstate::vcpu::{Vcpu, VcpuControl, VcpuStop};

/// Errors building or running a VM.
#[derive(Debug, Error)]
pub enum Error {
    /// A configuration value is out of range.
    #[error("{0}")]
    InvalidConfig(String),
    /// An input file cannot be opened.
    #[error("cannot open {what} {path}: {err}")]
    OpenFile {
        /// What the file is for.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Cause.
        err: std::io::Error,
    },
    /// KVM VM setup.
    #[error(transparent)]
    Vm(#[from] vstate::vm::Error),
    /// vCPU setup.
    #[error(transparent)]
    Vcpu(#[from] vstate::vcpu::Error),
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] memory::Error),
    /// Kernel, initrd or command line.
    #[error(transparent)]
    Boot(#[from] boot::Error),
    /// A block device.
    #[error(transparent)]
    Block(#[from] devices::virtio::block::BlockError),
    /// A network interface's TAP cannot be used.
    #[error("network interface {id}: {err}")]
    Net {
        /// Interface ID.
        id: String,
        /// Cause.
        err: devices::virtio::net::tap::TapError,
    },
    /// Placing a device.
    #[error("cannot place a device: {0}")]
    Bus(#[from] devices::bus::Error),
    /// The console.
    #[error(transparent)]
    Console(#[from] console::Error),
    /// Creating an eventfd.
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    /// Setting up the main event loop or signal handling.
    #[error("cannot set up the VMM event loop: {0}")]
    EventLoop(std::io::Error),
    /// Starting a vCPU thread.
    #[error("cannot start a vCPU thread: {0}")]
    Thread(std::io::Error),
}

/// What the VMM thread's event loop calls once the guest runs: waiting on events and signal
/// pipes, kicking vCPU threads (tgkill), stopping and joining threads, and removing the Unix
/// sockets it served when it ends. Device activation, snapshots, drive updates and the
/// terminal add their own lists (see the `vireo` crate's seccomp module).
pub const SECCOMP: utils::seccomp::Allow = utils::seccomp::Allow {
    by: "the VMM thread's event loop",
    syscalls: &[
        libc::SYS_epoll_wait,
        libc::SYS_epoll_pwait,
        libc::SYS_epoll_ctl,
        libc::SYS_read,
        libc::SYS_recvfrom,
        libc::SYS_getpid,
        libc::SYS_gettid,
        libc::SYS_tgkill,
        // musl kicks a thread with tkill.
        libc::SYS_tkill,
        libc::SYS_unlink,
        libc::SYS_unlinkat,
    ],
    with_arg: &[],
};

/// How a VM ended. Each maps to a documented process exit code.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest powered off (power port, or a KVM shutdown event). Carries the byte written.
    PowerOff(u8),
    /// The guest reset the machine (i8042 reset, or a KVM reset event).
    Reset,
    /// The guest triple-faulted; carries the register dump.
    TripleFault(String),
    /// KVM reported an internal error; carries the details and registers.
    InternalError(String),
    /// KVM failed to enter the guest; carries the details and registers.
    FailedEntry(String),
    /// A vCPU failed in some other way.
    VcpuError(String),
    /// vireo received SIGINT or SIGTERM.
    Signal(i32),
    /// The user typed the console's quit key (Ctrl-A x).
    ConsoleQuit,
}

impl ExitReason {
    /// The process exit code for this ending (see the README's table).
    pub fn exit_code(&self) -> i32 {
        match self {
            ExitReason::PowerOff(_) | ExitReason::Reset => 0,
            ExitReason::TripleFault(_) => 3,
            ExitReason::InternalError(_) => 4,
            ExitReason::FailedEntry(_) => 5,
            ExitReason::VcpuError(_) => 6,
            ExitReason::Signal(sig) => 128 + sig,
            ExitReason::ConsoleQuit => 130,
        }
    }
}

/// Process exit code for errors found before the guest ran (bad input, host setup).
pub const EXIT_CODE_ERROR: i32 = 1;

/// Signals that stop the VM and end vireo cleanly (terminal restored, API socket removed),
/// with exit code 128 + the signal's number.
pub const STOP_SIGNALS: [i32; 5] = [
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
];

const TOKEN_RESET: u64 = 0;
const TOKEN_POWER: u64 = 1;
const TOKEN_VCPU: u64 = 2;
const TOKEN_QUIT: u64 = 3;
const TOKEN_ACTIVATE: u64 = 4;
/// Signal pipes use this plus the signal number.
const TOKEN_SIGNAL: u64 = 100;

/// How long teardown waits for vCPU threads to leave KVM_RUN.
const VCPU_STOP_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a vCPU thread that has not stopped is signalled again: a kick that lands just
/// before the thread enters KVM_RUN is lost, so it is repeated.
const VCPU_KICK_INTERVAL: Duration = Duration::from_millis(5);

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Checks a vCPU count and memory size without touching KVM; [`run`] does this too.
pub fn validate_machine(vcpus: u32, mem_mib: u64) -> Result<(), Error> {
    builder::validate_machine(vcpus, mem_mib)
}

/// Builds the VM described by `config`, runs it until it ends and returns how it ended.
pub fn run(config: &VmConfig) -> Result<ExitReason, Error> {
    let mut vm = RunningVm::start(config)?;
    loop {
        if let VmEvent::Ended(reason) = vm.wait() {
            vm.shutdown();
            return Ok(reason);
        }
    }
}

/// Something the VM's event loop reports.
#[derive(Debug, PartialEq, Eq)]
pub enum VmEvent {
    /// The VM ended this way; call [`RunningVm::shutdown`].
    Ended(ExitReason),
    /// A file descriptor registered with [`RunningVm::watch`] is readable.
    External(u64),
}

/// First token available to [`RunningVm::watch`].
pub const EXTERNAL_TOKEN_BASE: u64 = 1000;

/// A VM whose vCPUs are running, and the event loop that watches it.
pub struct RunningVm {
    machine: builder::Machine,
    epoll: Epoll,
    _signal_pipe: UnixStream,
    /// The stop signal that arrived last.
    signal_number: Arc<std::sync::atomic::AtomicUsize>,
    _vcpu_evt: EventFd,
    _quit_evt: EventFd,
    console: Option<console::Console>,
    control: Arc<VcpuControl>,
    first_stop: Arc<Mutex<Option<VcpuStop>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// Each vCPU, locked by its thread while it runs and free while it is parked.
    vcpus: Vec<Arc<Mutex<Vcpu>>>,
    done_rx: std::sync::mpsc::Receiver<()>,
    paused: bool,
}

impl RunningVm {
    /// Builds the VM described by `config` and starts its vCPUs.
    pub fn start(config: &VmConfig) -> Result<Self, Error> {
        let machine = builder::build(config)?;
        if let Some(boot) = &machine.boot {
            tracing::info!(
                "booting {} kernel at {:#x} with {} vCPU(s), {} MiB",
                boot.format,
                boot.entry,
                config.vcpus,
                config.mem_mib
            );
        }
        Self::launch(machine, &config.serial, false)
    }

    /// Starts the vCPU threads of a built (or restored) machine and the event loop around
    /// them; with `paused`, the vCPUs and devices wait for [`RunningVm::resume`].
    fn launch(
        mut machine: builder::Machine,
        serial: &SerialConfig,
        paused: bool,
    ) -> Result<Self, Error> {
        let epoll = Epoll::new().map_err(Error::EventLoop)?;
        let add = |fd: i32, token: u64| {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(Error::EventLoop)
        };
        // One socket pair for every stop signal (sockets are kernel memory, which counts when
        // thousands of VMs share a host); a flag, set first, says which signal it was.
        let (signal_rx, signal_tx) = UnixStream::pair().map_err(Error::EventLoop)?;
        let signal_number = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        for sig in STOP_SIGNALS {
            signal_hook::flag::register_usize(sig, signal_number.clone(), sig as usize)
                .map_err(Error::EventLoop)?;
            let tx = signal_tx.try_clone().map_err(Error::EventLoop)?;
            signal_hook::low_level::pipe::register(sig, tx).map_err(Error::EventLoop)?;
        }
        drop(signal_tx);
        add(signal_rx.as_raw_fd(), TOKEN_SIGNAL)?;
        let vcpu_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?;
        let quit_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?;
        add(machine.devices.events().reset.0.as_raw_fd(), TOKEN_RESET)?;
        add(machine.devices.events().power.0.as_raw_fd(), TOKEN_POWER)?;
        add(vcpu_evt.as_raw_fd(), TOKEN_VCPU)?;
        add(quit_evt.as_raw_fd(), TOKEN_QUIT)?;
        add(
            machine.devices.activation_event().as_raw_fd(),
            TOKEN_ACTIVATE,
        )?;

        register_signal_handler(SIGRTMIN(), kick_handler)
            .map_err(|e| Error::EventLoop(std::io::Error::from_raw_os_error(e.errno())))?;
        let mut console = console::attach(
            serial,
            machine.devices.serial(),
            quit_evt.try_clone().map_err(Error::EventFd)?,
        )?;

        let control = Arc::new(VcpuControl::default());
        if paused {
            control.request_pause();
        }
        let first_stop: Arc<Mutex<Option<VcpuStop>>> = Arc::new(Mutex::new(None));
        let mut threads = Vec::new();
        let mut vcpus = Vec::new();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let (confined_tx, confined_rx) = std::sync::mpsc::channel::<()>();
        for vcpu in machine.vcpus.drain(..) {
            let name = format!("vcpu{}", vcpu.index());
            let vcpu = Arc::new(Mutex::new(vcpu));
            vcpus.push(vcpu.clone());
            let done = done_tx.clone();
            let (pio, mmio, control) = (machine.pio.clone(), machine.mmio.clone(), control.clone());
            let first_stop = first_stop.clone();
            let evt = vcpu_evt.try_clone().map_err(Error::EventFd)?;
            let filter = utils::seccomp::filter(utils::seccomp::ThreadKind::Vcpu);
            let confined = confined_tx.clone();
            let handle = std::thread::Builder::new()
                .name(name)
                .stack_size(256 << 10)
                .spawn(move || {
                    filter.install();
                    drop(confined);
                    loop {
                        let why = devices::bus::lock(&vcpu).run(&pio, &mmio, &control);
                        match why {
                            VcpuStop::Paused => control.park(),
                            VcpuStop::Requested => break,
                            why => {
                                devices::bus::lock(&first_stop).get_or_insert(why);
                                let _ = evt.write(1);
                                break;
                            }
                        }
                    }
                    let _ = done.send(());
                })
                .map_err(Error::Thread)?;
            threads.push(handle);
        }
        tracing::debug!("vCPUs started");
        // Attaching a seccomp filter prepares its action cache (the filter run for every
        // system call number) under the process's signal lock, which a starting thread needs
        // (sigaltstack): the VMM thread's filter, the largest, held a vCPU back ~0.3 ms. So the
        // VMM thread confines itself once the vCPUs have their filters.
        drop(confined_tx);
        let _ = confined_rx.recv();
        console.start_input();
        // Every thread the VM needs from the start exists: from here on the VMM thread handles
        // what the guest causes, so it is confined too.
        utils::seccomp::filter(utils::seccomp::ThreadKind::Vmm).install();
        let mut vm = Self {
            machine,
            epoll,
            _signal_pipe: signal_rx,
            signal_number,
            _vcpu_evt: vcpu_evt,
            _quit_evt: quit_evt,
            console: Some(console),
            control,
            first_stop,
            threads,
            vcpus,
            done_rx,
            paused: false,
        };
        if paused {
            vm.pause()?;
        }
        Ok(vm)
    }

    /// Whether the vCPUs are paused.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Makes [`RunningVm::wait`] report `token` (at least [`EXTERNAL_TOKEN_BASE`]) when `fd`
    /// is readable.
    pub fn watch(&self, fd: std::os::fd::RawFd, token: u64) -> Result<(), Error> {
        debug_assert!(token >= EXTERNAL_TOKEN_BASE);
        self.epoll
            .ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )
            .map_err(Error::EventLoop)
    }

    /// Waits for the next event.
    pub fn wait(&mut self) -> VmEvent {
        let mut events = [EpollEvent::default(); 8];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return VmEvent::Ended(ExitReason::VcpuError(format!(
                        "VMM event loop failed: {e}"
                    )))
                }
            };
            for ev in &events[..n] {
                let reason = match ev.data() {
                    TOKEN_RESET => ExitReason::Reset,
                    TOKEN_POWER => ExitReason::PowerOff(
                        self.machine
                            .devices
                            .events()
                            .power_value
                            .load(Ordering::SeqCst),
                    ),
                    TOKEN_VCPU => match devices::bus::lock(&self.first_stop).take() {
                        Some(VcpuStop::TripleFault(s)) => ExitReason::TripleFault(s),
                        Some(VcpuStop::InternalError(s)) => ExitReason::InternalError(s),
                        Some(VcpuStop::FailedEntry(s)) => ExitReason::FailedEntry(s),
                        Some(VcpuStop::SystemEvent { poweroff: true }) => ExitReason::PowerOff(0),
                        Some(VcpuStop::SystemEvent { poweroff: false }) => ExitReason::Reset,
                        Some(VcpuStop::Error(s)) => ExitReason::VcpuError(s),
                        Some(VcpuStop::Requested) | Some(VcpuStop::Paused) | None => continue,
                    },
                    TOKEN_QUIT => ExitReason::ConsoleQuit,
                    TOKEN_ACTIVATE => {
                        self.machine.devices.activate_pending();
                        continue;
                    }
                    token if token >= EXTERNAL_TOKEN_BASE => return VmEvent::External(token),
                    TOKEN_SIGNAL => ExitReason::Signal(
                        self.signal_number.load(std::sync::atomic::Ordering::SeqCst) as i32,
                    ),
                    _ => continue,
                };
                return VmEvent::Ended(reason);
            }
        }
    }

    fn kick_until(&self, mut done: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + VCPU_STOP_TIMEOUT;
        while !done() {
            if Instant::now() >= deadline {
                return false;
            }
            for t in self.threads.iter().filter(|t| !t.is_finished()) {
                let _ = t.kill(SIGRTMIN());
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        true
    }

    /// Stops every vCPU at its next exit and waits until all are parked.
    pub fn pause(&mut self) -> Result<(), Error> {
        if self.paused {
            return Ok(());
        }
        self.control.request_pause();
        let n = self.threads.iter().filter(|t| !t.is_finished()).count();
        if !self.kick_until(|| self.control.parked() >= n) {
            self.control.resume();
            return Err(Error::EventLoop(std::io::Error::other(
                "vCPUs did not pause in time",
            )));
        }
        // Devices after vCPUs: no new requests arrive while the device threads finish theirs.
        if let Err(e) = self.machine.devices.pause() {
            self.machine.devices.resume();
            self.control.resume();
            return Err(e);
        }
        self.paused = true;
        Ok(())
    }

    /// What the VM was built (or restored) from.
    pub fn config(&self) -> &VmConfig {
        &self.machine.config
    }

    /// The VM's devices, for changes while the guest runs (by kind and ID).
    pub fn devices(&self) -> &device_manager::DeviceManager {
        &self.machine.devices
    }

    /// Lets paused devices and vCPUs run again.
    pub fn resume(&mut self) {
        if self.paused {
            self.machine.devices.resume();
        }
        self.control.resume();
        self.paused = false;
    }

    /// Stops the vCPUs and restores the terminal.
    pub fn shutdown(mut self) {
        self.control.request_stop();
        let deadline = Instant::now() + VCPU_STOP_TIMEOUT;
        let mut running = self.threads.len();
        while running > 0 && Instant::now() < deadline {
            for t in self.threads.iter().filter(|t| !t.is_finished()) {
                let _ = t.kill(SIGRTMIN());
            }
            while self.done_rx.recv_timeout(VCPU_KICK_INTERVAL).is_ok() {
                running -= 1;
                if running == 0 {
                    break;
                }
            }
        }
        if running > 0 {
            tracing::warn!("{running} vCPU thread(s) did not stop within {VCPU_STOP_TIMEOUT:?}");
        }
        for t in std::mem::take(&mut self.threads)
            .into_iter()
            .filter(|t| t.is_finished())
        {
            let _ = t.join();
        }
        self.console.take();
        tracing::debug!("vCPUs stopped");
    }
}
