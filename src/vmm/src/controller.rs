//! Serves API requests: configuration before boot, then control of the running VM. One request
//! at a time, on the VMM thread, so vCPUs are never blocked by the API.

use crate::device_manager::{DeviceKind, DeviceUpdate};
use crate::resources::{
    ActionType, BalloonConfig, BalloonStartCmd, BalloonStatsUpdate, BalloonUpdate, BootSource,
    Drive, EntropyDevice, LoggerConfig, MachineConfig, MachineConfigUpdate, MemoryHotplugConfig,
    MemoryHotplugSizeUpdate, MetricsConfig, MmdsConfig, NetworkInterface, PartialDrive,
    PartialNetworkInterface, ResourceError, SerialDevice, SnapshotLoadParams, VmResources, VmState,
    VsockDevice,
};
use crate::{ExitReason, RunningVm, VmEvent};
use serde_json::{json, Value};

/// A request from an API client (or a config file).
#[derive(Debug, Clone, PartialEq)]
pub enum VmmAction {
    /// `GET /`.
    GetInstanceInfo,
    /// `GET /version`.
    GetVersion,
    /// `GET /machine-config`.
    GetMachineConfig,
    /// `GET /vm/config`.
    GetVmConfig,
    /// `PUT /boot-source`.
    PutBootSource(BootSource),
    /// `PUT /machine-config`.
    PutMachineConfig(MachineConfig),
    /// `PATCH /machine-config`.
    PatchMachineConfig(MachineConfigUpdate),
    /// `PUT /drives/{id}`.
    PutDrive(Drive),
    /// `PATCH /drives/{id}`.
    PatchDrive(PartialDrive),
    /// `PUT /network-interfaces/{id}`.
    PutNetworkInterface(NetworkInterface),
    /// `PATCH /network-interfaces/{id}`.
    PatchNetworkInterface(PartialNetworkInterface),
    /// `PUT /mmds/config`.
    PutMmdsConfig(MmdsConfig),
    /// `PUT /mmds`.
    PutMmds(Value),
    /// `PATCH /mmds`.
    PatchMmds(Value),
    /// `GET /mmds`.
    GetMmds,
    /// `PUT /vsock`.
    PutVsock(VsockDevice),
    /// `PUT /balloon`.
    PutBalloon(BalloonConfig),
    /// `PATCH /balloon`.
    PatchBalloon(BalloonUpdate),
    /// `GET /balloon`.
    GetBalloon,
    /// `GET /balloon/statistics`.
    GetBalloonStats,
    /// `PATCH /balloon/statistics`.
    PatchBalloonStats(BalloonStatsUpdate),
    /// `PATCH /balloon/hinting/start`.
    StartBalloonHinting(BalloonStartCmd),
    /// `GET /balloon/hinting/status`.
    GetBalloonHinting,
    /// `PATCH /balloon/hinting/stop`.
    StopBalloonHinting,
    /// `PUT /hotplug/memory`.
    PutHotplug(MemoryHotplugConfig),
    /// `PATCH /hotplug/memory`.
    PatchHotplug(MemoryHotplugSizeUpdate),
    /// `GET /hotplug/memory`.
    GetHotplug,
    /// `PUT /entropy`.
    PutEntropy(EntropyDevice),
    /// `PUT /serial`.
    PutSerial(SerialDevice),
    /// `PUT /logger`.
    PutLogger(LoggerConfig),
    /// `PUT /metrics`.
    PutMetrics(MetricsConfig),
    /// `PUT /actions`.
    Action(ActionType),
    /// `PATCH /vm`.
    SetVmState(VmState),
    /// `PUT /cpu-config`.
    PutCpuConfig(crate::cpu_config::CpuConfig),
    /// `PUT /snapshot/create`.
    CreateSnapshot(crate::persist::CreateParams),
    /// `PUT /snapshot/load` (the serial port is filled in by the controller).
    LoadSnapshot(SnapshotLoadParams),
}

/// A successful answer: nothing (204) or a JSON body (200).
#[derive(Debug, Clone, PartialEq)]
pub enum VmmData {
    /// 204 No Content.
    Empty,
    /// 200 with this body.
    Json(Value),
}

/// The answer to a request.
pub type VmmResult = Result<VmmData, ResourceError>;

/// Logging and metrics live in the binary (they own the process's tracing subscriber and
/// files); the controller reaches them through this.
pub trait Telemetry: Send {
    /// Applies `PUT /logger`.
    fn configure_logger(&mut self, cfg: &LoggerConfig) -> Result<(), String>;
    /// Applies `PUT /metrics`.
    fn configure_metrics(&mut self, cfg: &MetricsConfig) -> Result<(), String>;
    /// Writes the metrics now.
    fn flush_metrics(&mut self) -> Result<(), String>;
    /// Counts one API request and whether it succeeded.
    fn record_request(&mut self, ok: bool);
    /// Records how the VM ended.
    fn vm_ended(&mut self, reason: &ExitReason);
}

/// What vireo reports as its version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The VM's state machine as the API sees it.
pub struct Controller {
    resources: VmResources,
    vm: Option<RunningVm>,
    id: String,
    telemetry: Box<dyn Telemetry>,
}

fn fail<T>(msg: impl Into<String>) -> Result<T, ResourceError> {
    Err(ResourceError(msg.into()))
}

const NOT_AFTER_START: &str = "is not supported after starting the microVM";
const NOT_BEFORE_START: &str = "is not supported before starting the microVM";
const NO_HOTPLUG: &str = "memory hotplug is not configured (PUT /hotplug/memory first)";

impl Controller {
    /// A controller for a VM not yet started.
    pub fn new(id: String, resources: VmResources, telemetry: Box<dyn Telemetry>) -> Self {
        Self {
            resources,
            vm: None,
            id,
            telemetry,
        }
    }

    fn state(&self) -> &'static str {
        match &self.vm {
            None => "Not started",
            Some(vm) if vm.is_paused() => "Paused",
            Some(_) => "Running",
        }
    }

    /// Applies one request.
    pub fn handle(&mut self, action: VmmAction) -> VmmResult {
        let result = self.apply(action);
        self.telemetry.record_request(result.is_ok());
        result
    }

    fn apply(&mut self, action: VmmAction) -> VmmResult {
        use VmmAction::*;
        let pre_boot = |name: &str| -> Result<(), ResourceError> {
            if self.vm.is_some() {
                fail(format!("{name} {NOT_AFTER_START}"))
            } else {
                Ok(())
            }
        };
        match action {
            GetInstanceInfo => Ok(VmmData::Json(json!({
                "app_name": "vireo",
                "id": self.id,
                "state": self.state(),
                "vmm_version": VERSION,
            }))),
            GetVersion => Ok(VmmData::Json(json!({ "firecracker_version": VERSION }))),
            GetMachineConfig => Ok(VmmData::Json(
                serde_json::to_value(&self.resources.machine).unwrap_or(Value::Null),
            )),
            GetVmConfig => Ok(VmmData::Json(self.resources.full_config())),
            PutBootSource(b) => {
                pre_boot("PUT /boot-source")?;
                self.resources.set_boot_source(b).map(|_| VmmData::Empty)
            }
            PutMachineConfig(m) => {
                pre_boot("PUT /machine-config")?;
                self.resources.set_machine_config(m).map(|_| VmmData::Empty)
            }
            PatchMachineConfig(m) => {
                pre_boot("PATCH /machine-config")?;
                self.resources
                    .update_machine_config(m)
                    .map(|_| VmmData::Empty)
            }
            PutDrive(d) => {
                pre_boot("PUT /drives")?;
                self.resources.insert_drive(d).map(|_| VmmData::Empty)
            }
            PatchDrive(p) => {
                if self.vm.is_some() {
                    return self.patch_running_drive(p);
                }
                self.resources.patch_drive(p).map(|_| VmmData::Empty)
            }
            PutNetworkInterface(n) => {
                pre_boot("PUT /network-interfaces")?;
                self.resources.insert_interface(n).map(|_| VmmData::Empty)
            }
            PatchNetworkInterface(p) => {
                if let Some(vm) = &self.vm {
                    let update = DeviceUpdate::RxTxRateLimiters {
                        rx: p.rx_rate_limiter,
                        tx: p.tx_rate_limiter,
                    };
                    vm.devices()
                        .update(DeviceKind::Interface, &p.iface_id, update)
                        .map_err(|e| ResourceError(e.to_string()))?;
                }
                self.resources.patch_interface(p).map(|_| VmmData::Empty)
            }
            PutMmdsConfig(c) => {
                pre_boot("PUT /mmds/config")?;
                self.resources.set_mmds_config(c).map(|_| VmmData::Empty)
            }
            PutMmds(v) => devices::virtio::net::mmds::lock(&self.resources.mmds.0)
                .put(v)
                .map(|_| VmmData::Empty)
                .map_err(|e| ResourceError(format!("PUT /mmds: {e}"))),
            PatchMmds(v) => devices::virtio::net::mmds::lock(&self.resources.mmds.0)
                .patch(&v)
                .map(|_| VmmData::Empty)
                .map_err(|e| ResourceError(format!("PATCH /mmds: {e}"))),
            GetMmds => Ok(VmmData::Json(
                devices::virtio::net::mmds::lock(&self.resources.mmds.0)
                    .data()
                    .clone(),
            )),
            PutVsock(v) => {
                pre_boot("PUT /vsock")?;
                self.resources.set_vsock(v).map(|_| VmmData::Empty)
            }
            PutBalloon(b) => {
                pre_boot("PUT /balloon")?;
                self.resources.set_balloon(b).map(|_| VmmData::Empty)
            }
            PatchBalloon(u) => self.patch_balloon(u),
            GetBalloon => {
                let Some(b) = &self.resources.balloon else {
                    return fail(crate::resources::NO_BALLOON);
                };
                let mut b = b.clone();
                // A running (or restored) balloon says what is in force now.
                if let Some(devices) = self.vm.as_ref().map(|vm| vm.devices()) {
                    if let Ok(stats) = devices.balloon_stats() {
                        b.amount_mib = stats.target_mib;
                    }
                    if let Some(secs) = devices.balloon_stats_interval() {
                        b.stats_polling_interval_s = secs;
                    }
                }
                Ok(VmmData::Json(
                    serde_json::to_value(b).unwrap_or(Value::Null),
                ))
            }
            GetBalloonStats => self.balloon_stats(),
            PatchBalloonStats(u) => {
                let Some(vm) = &self.vm else {
                    return fail(format!("PATCH /balloon/statistics {NOT_BEFORE_START}"));
                };
                if self.resources.balloon.is_none() {
                    return fail(crate::resources::NO_BALLOON);
                }
                vm.devices()
                    .set_balloon_stats_interval(u.stats_polling_interval_s)
                    .map(|_| VmmData::Empty)
                    .map_err(|e| ResourceError(e.to_string()))
            }
            StartBalloonHinting(c) => {
                let devices = self.hinting("PATCH /balloon/hinting/start")?;
                devices
                    .start_balloon_hinting(c.acknowledge_on_stop.unwrap_or(true))
                    .map(|_| VmmData::Empty)
                    .map_err(|e| ResourceError(e.to_string()))
            }
            GetBalloonHinting => {
                let devices = self.hinting("GET /balloon/hinting/status")?;
                let status = devices
                    .balloon_hinting_status()
                    .map_err(|e| ResourceError(e.to_string()))?;
                Ok(VmmData::Json(
                    serde_json::to_value(status).unwrap_or(Value::Null),
                ))
            }
            StopBalloonHinting => {
                let devices = self.hinting("PATCH /balloon/hinting/stop")?;
                devices
                    .stop_balloon_hinting()
                    .map(|_| VmmData::Empty)
                    .map_err(|e| ResourceError(e.to_string()))
            }
            PutHotplug(h) => {
                pre_boot("PUT /hotplug/memory")?;
                self.resources.set_hotplug(h).map(|_| VmmData::Empty)
            }
            PatchHotplug(u) => {
                if self.resources.hotplug.is_none() {
                    return fail(NO_HOTPLUG);
                }
                let Some(vm) = &self.vm else {
                    return fail(format!("PATCH /hotplug/memory {NOT_BEFORE_START}"));
                };
                vm.devices()
                    .set_hotplug_requested(u.requested_size_mib)
                    .map(|_| VmmData::Empty)
                    .map_err(|e| ResourceError(e.to_string()))
            }
            GetHotplug => {
                let Some(h) = &self.resources.hotplug else {
                    return fail(NO_HOTPLUG);
                };
                let (plugged, requested) = self
                    .vm
                    .as_ref()
                    .and_then(|vm| vm.devices().hotplug_sizes())
                    .unwrap_or((0, 0));
                Ok(VmmData::Json(json!({
                    "total_size_mib": h.total_size_mib,
                    "slot_size_mib": h.slot_size_mib,
                    "block_size_mib": h.block_size_mib,
                    "plugged_size_mib": plugged >> 20,
                    "requested_size_mib": requested >> 20,
                })))
            }
            PutEntropy(e) => {
                pre_boot("PUT /entropy")?;
                self.resources.set_entropy(e).map(|_| VmmData::Empty)
            }
            PutSerial(s) => {
                pre_boot("PUT /serial")?;
                self.resources.set_serial(s).map(|_| VmmData::Empty)
            }
            PutLogger(l) => {
                self.telemetry.configure_logger(&l).map_err(ResourceError)?;
                self.resources.logger = Some(l);
                Ok(VmmData::Empty)
            }
            PutMetrics(m) => {
                if let Some(old) = &self.resources.metrics {
                    return fail(format!(
                        "PUT /metrics: reinitialization of metrics is not allowed (they already go to {})",
                        old.metrics_path
                    ));
                }
                self.telemetry
                    .configure_metrics(&m)
                    .map_err(ResourceError)?;
                self.resources.metrics = Some(m);
                Ok(VmmData::Empty)
            }
            Action(ActionType::InstanceStart) => self.start().map(|_| VmmData::Empty),
            Action(ActionType::FlushMetrics) => self
                .telemetry
                .flush_metrics()
                .map(|_| VmmData::Empty)
                .map_err(ResourceError),
            Action(ActionType::SendCtrlAltDel) => match &self.vm {
                None => fail("cannot send Ctrl+Alt+Del: the microVM is not running"),
                Some(vm) => {
                    vm.devices().send_ctrl_alt_del();
                    Ok(VmmData::Empty)
                }
            },
            SetVmState(state) => match (&mut self.vm, state) {
                (None, _) => fail("cannot pause or resume: the microVM is not running"),
                (Some(vm), VmState::Paused) => vm
                    .pause()
                    .map(|_| VmmData::Empty)
                    .map_err(|e| ResourceError(e.to_string())),
                (Some(vm), VmState::Resumed) => {
                    vm.resume();
                    Ok(VmmData::Empty)
                }
            },
            PutCpuConfig(c) => {
                pre_boot("PUT /cpu-config")?;
                self.resources.set_cpu_config(c).map(|_| VmmData::Empty)
            }
            CreateSnapshot(p) => match &mut self.vm {
                None => fail("cannot create a snapshot: the microVM is not running"),
                Some(vm) => vm
                    .snapshot(&p)
                    .map(|_| VmmData::Empty)
                    .map_err(|e| ResourceError(format!("cannot create a snapshot: {e}"))),
            },
            LoadSnapshot(p) => self.load_snapshot(p),
        }
    }

    fn load_snapshot(&mut self, p: SnapshotLoadParams) -> VmmResult {
        if self.vm.is_some() {
            return fail("cannot load a snapshot: a microVM is already running in this process");
        }
        if !self.resources.only_process_settings() {
            return fail(
                "cannot load a snapshot after configuring boot-specific resources: only the logger, metrics and serial port may be set before a load",
            );
        }
        let params = p.into_params(self.resources.serial_config())?;
        let vm = RunningVm::restore(&params)
            .map_err(|e| ResourceError(format!("cannot load the snapshot: {e}")))?;
        let config = vm.config();
        self.resources.machine.vcpu_count = config.vcpus;
        self.resources.machine.mem_size_mib = config.mem_mib;
        self.resources.machine.track_dirty_pages = config.track_dirty_pages;
        self.resources.balloon = config.balloon.clone();
        self.resources.hotplug = config.hotplug.map(MemoryHotplugConfig::from);
        self.vm = Some(vm);
        Ok(VmmData::Empty)
    }

    fn start(&mut self) -> Result<(), ResourceError> {
        if self.vm.is_some() {
            return fail("InstanceStart: the microVM is already running");
        }
        let config = self.resources.vm_config()?;
        let vm = RunningVm::start(&config)
            .map_err(|e| ResourceError(format!("cannot start the microVM: {e}")))?;
        self.vm = Some(vm);
        Ok(())
    }

    fn patch_balloon(&mut self, u: BalloonUpdate) -> VmmResult {
        let Some(vm) = &self.vm else {
            return self.resources.update_balloon(u).map(|_| VmmData::Empty);
        };
        let Some(b) = self.resources.balloon.as_mut() else {
            return fail(crate::resources::NO_BALLOON);
        };
        devices::virtio::balloon::check_target(u.amount_mib, vm.config().mem_mib)
            .map_err(ResourceError)?;
        vm.devices()
            .set_balloon_target(u.amount_mib)
            .map_err(|e| ResourceError(e.to_string()))?;
        b.amount_mib = u.amount_mib;
        Ok(VmmData::Empty)
    }

    /// The running VM's devices, for a hinting request on a balloon configured with it.
    fn hinting(&self, what: &str) -> Result<&crate::device_manager::DeviceManager, ResourceError> {
        let Some(b) = &self.resources.balloon else {
            return fail(crate::resources::NO_BALLOON);
        };
        let Some(vm) = &self.vm else {
            return fail(format!("{what} {NOT_BEFORE_START}"));
        };
        if !b.free_page_hinting {
            return fail(
                "the balloon's free page hinting was not enabled when the device was configured",
            );
        }
        Ok(vm.devices())
    }

    fn balloon_stats(&self) -> VmmResult {
        let Some(b) = &self.resources.balloon else {
            return fail(crate::resources::NO_BALLOON);
        };
        let Some(vm) = &self.vm else {
            return fail(format!("GET /balloon/statistics {NOT_BEFORE_START}"));
        };
        if b.stats_polling_interval_s == 0 {
            return fail("Statistics for the balloon device are not enabled");
        }
        let stats = vm
            .devices()
            .balloon_stats()
            .map_err(|e| ResourceError(e.to_string()))?;
        Ok(VmmData::Json(
            serde_json::to_value(stats).unwrap_or(Value::Null),
        ))
    }

    fn patch_running_drive(&mut self, p: PartialDrive) -> VmmResult {
        let Some(vm) = self.vm.as_mut() else {
            return fail("the microVM is not running");
        };
        let mut updates = Vec::new();
        if let Some(rl) = p.rate_limiter {
            updates.push(DeviceUpdate::RateLimiter(rl));
        }
        if let Some(path) = &p.path_on_host {
            updates.push(DeviceUpdate::Backing(path.into()));
        }
        for update in updates {
            vm.devices()
                .update(DeviceKind::Drive, &p.drive_id, update)
                .map_err(|e| ResourceError(e.to_string()))?;
        }
        if let Some(d) = self
            .resources
            .drives
            .iter_mut()
            .find(|d| d.drive_id == p.drive_id)
        {
            d.rate_limiter = p.rate_limiter.or(d.rate_limiter);
            d.path_on_host = p.path_on_host.or(d.path_on_host.take());
        }
        Ok(VmmData::Empty)
    }

    /// Stops the VM after it ended.
    pub fn shutdown(&mut self) {
        if let Some(vm) = self.vm.take() {
            vm.shutdown();
        }
    }
}

/// Requests arrive on a channel with a reply channel each; `notify` becomes readable when one
/// is waiting.
pub struct RequestQueue {
    /// Incoming requests.
    pub requests: std::sync::mpsc::Receiver<(VmmAction, std::sync::mpsc::Sender<VmmResult>)>,
    /// Readable when requests are waiting.
    pub notify: vmm_sys_util::eventfd::EventFd,
}

const API_TOKEN: u64 = crate::EXTERNAL_TOKEN_BASE;

/// Serves requests until the VM (once started) ends, or until `signal` (set by the caller's
/// SIGINT/SIGTERM handler to the signal number) is set before it starts. Returns how it ended,
/// or `None` if the request channel closed before a VM ran.
pub fn serve(
    controller: &mut Controller,
    queue: &RequestQueue,
    signal: &std::sync::atomic::AtomicUsize,
) -> Option<ExitReason> {
    use std::os::fd::AsRawFd;
    use std::sync::atomic::Ordering;
    use std::sync::mpsc::RecvTimeoutError;
    let mut watching = false;
    loop {
        let Some(vm) = controller.vm.as_mut() else {
            let sig = signal.load(Ordering::SeqCst);
            if sig != 0 {
                return Some(ExitReason::Signal(sig as i32));
            }
            match queue
                .requests
                .recv_timeout(std::time::Duration::from_millis(50))
            {
                Ok((action, reply)) => {
                    let _ = reply.send(controller.handle(action));
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return None,
            }
            continue;
        };
        if !watching {
            if let Err(e) = vm.watch(queue.notify.as_raw_fd(), API_TOKEN) {
                tracing::error!("API requests cannot reach the running VM: {e}");
            }
            watching = true;
        }
        match vm.wait() {
            VmEvent::Ended(reason) => {
                controller.telemetry.vm_ended(&reason);
                controller.shutdown();
                return Some(reason);
            }
            VmEvent::External(API_TOKEN) => {
                let _ = queue.notify.read();
                while let Ok((action, reply)) = queue.requests.try_recv() {
                    let _ = reply.send(controller.handle(action));
                }
            }
            VmEvent::External(_) => {}
        }
    }
}
