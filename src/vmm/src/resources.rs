//! The VM as an API client or config file describes it before boot, in Firecracker's data model
//! (the objects of its HTTP API and `--config-file`), checked as each piece arrives and turned
//! into a [`VmConfig`] at start.

use crate::config::{DriveConfig, NetConfig, SerialConfig, VmConfig, DEFAULT_CMDLINE};
use devices::rate_limiter::RateLimiterConfig;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::PathBuf;
use thiserror::Error;
use utils::files::Kind;

/// A configuration request that cannot be applied; the text is the API's fault_message.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("{0}")]
pub struct ResourceError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, ResourceError> {
    Err(ResourceError(msg.into()))
}

/// `PUT /boot-source`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    /// Host path of the kernel image.
    pub kernel_image_path: String,
    /// Host path of the initrd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
    /// Kernel command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
}

/// `PUT /machine-config` (and the answer to `GET`).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// vCPUs.
    pub vcpu_count: u32,
    /// Guest RAM in MiB.
    pub mem_size_mib: u64,
    /// Simultaneous multithreading (not offered: must be false).
    #[serde(default)]
    pub smt: bool,
    /// Dirty page tracking, for diff snapshots.
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// CPU template (not offered).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<String>,
    /// Huge page backing: "None", "Transparent" or "2M".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<String>,
    /// KVM's 8254 PIT (vireo's own field; left out unless asked for, as `vireo run` leaves it
    /// out without `--pit`; Firecracker always has one): shown only when true.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pit: bool,
}

impl Default for MachineConfig {
    fn default() -> Self {
        Self {
            vcpu_count: 1,
            mem_size_mib: 128,
            smt: false,
            track_dirty_pages: false,
            cpu_template: None,
            huge_pages: None,
            pit: false,
        }
    }
}

/// `PATCH /machine-config`: any subset.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigUpdate {
    /// vCPUs.
    pub vcpu_count: Option<u32>,
    /// Guest RAM in MiB.
    pub mem_size_mib: Option<u64>,
    /// SMT.
    pub smt: Option<bool>,
    /// Dirty page tracking.
    pub track_dirty_pages: Option<bool>,
    /// CPU template.
    pub cpu_template: Option<String>,
    /// Huge pages.
    pub huge_pages: Option<String>,
    /// The PIT.
    pub pit: Option<bool>,
}

/// `PUT /drives/{id}`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    /// Drive name, also what the guest reads as its serial.
    pub drive_id: String,
    /// Host path of the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<String>,
    /// Boot from this drive (`root=/dev/vda`, or `root=PARTUUID=` with `partuuid`).
    pub is_root_device: bool,
    /// Read-only drive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_read_only: Option<bool>,
    /// Root partition UUID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    /// "Unsafe" or "Writeback"; vireo always honours flushes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_type: Option<String>,
    /// Bandwidth and request-rate limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiterConfig>,
    /// "Sync" (the default) or "Async" (io_uring).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_engine: Option<String>,
    /// vhost-user-blk socket (not offered).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
}

/// `PATCH /drives/{id}`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PartialDrive {
    /// Drive name.
    pub drive_id: String,
    /// New image.
    pub path_on_host: Option<String>,
    /// New bandwidth and request-rate limits.
    pub rate_limiter: Option<RateLimiterConfig>,
}

/// `PUT /network-interfaces/{iface_id}`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterface {
    /// Interface ID.
    pub iface_id: String,
    /// The host TAP interface.
    pub host_dev_name: String,
    /// MAC address for the guest; without one the guest picks its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    /// MTU advertised to the guest with VIRTIO_NET_F_MTU (68 to 65535).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// Limits on frames to the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    /// Limits on frames from the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiterConfig>,
}

/// `PATCH /network-interfaces/{iface_id}`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PartialNetworkInterface {
    /// Interface ID.
    pub iface_id: String,
    /// New limits on frames to the guest.
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    /// New limits on frames from the guest.
    pub tx_rate_limiter: Option<RateLimiterConfig>,
}

/// `PUT /mmds/config`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MmdsConfig {
    /// V1 (tokens optional) or V2 (session tokens required).
    #[serde(default = "default_mmds_version")]
    pub version: String,
    /// Interfaces MMDS answers on.
    pub network_interfaces: Vec<String>,
    /// Link-local address MMDS answers at (169.254.169.254 by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4_address: Option<String>,
    /// Answer in EC2 IMDS's plain-text format whatever the Accept header says.
    #[serde(default)]
    pub imds_compat: bool,
}

fn default_mmds_version() -> String {
    "V1".into()
}

impl MmdsConfig {
    /// The MMDS address: a link-local 169.254.x.y, neither network nor broadcast address.
    pub fn ip(&self) -> Result<[u8; 4], String> {
        let Some(s) = &self.ipv4_address else {
            return Ok(devices::virtio::net::mmds::DEFAULT_IPV4);
        };
        let ip: std::net::Ipv4Addr = s
            .parse()
            .map_err(|_| format!("ipv4_address '{s}' is not an IPv4 address"))?;
        let o = ip.octets();
        if o[0] != 169 || o[1] != 254 || !(1..=254).contains(&o[2]) {
            return Err(format!(
                "ipv4_address {s} is not a usable link-local address (169.254.1.0 to 169.254.254.255)"
            ));
        }
        Ok(o)
    }
}

pub use devices::virtio::balloon::BalloonConfig;

/// What a balloon request without a balloon is told (Firecracker's words).
pub const NO_BALLOON: &str = "No balloon device found.";

/// `PATCH /balloon`: a new target.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonUpdate {
    /// Target size in MiB.
    pub amount_mib: u32,
}

/// `PATCH /balloon/hinting/start`'s optional body.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonStartCmd {
    /// Answer the guest's STOP with DONE at once, ending the run (default true).
    #[serde(default)]
    pub acknowledge_on_stop: Option<bool>,
}

/// `PUT /hotplug/memory` (Firecracker's MemoryHotplugConfig).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryHotplugConfig {
    /// Size of the hotplug region in MiB.
    pub total_size_mib: u64,
    /// Host granularity in MiB (default 128, at least 128).
    #[serde(default = "default_slot_mib")]
    pub slot_size_mib: u64,
    /// Guest granularity in MiB (default 2, at least 2).
    #[serde(default = "default_block_mib")]
    pub block_size_mib: u64,
}

fn default_slot_mib() -> u64 {
    128
}

fn default_block_mib() -> u64 {
    2
}

impl From<crate::config::HotplugConfig> for MemoryHotplugConfig {
    fn from(h: crate::config::HotplugConfig) -> Self {
        Self {
            total_size_mib: h.total_mib,
            slot_size_mib: h.slot_mib,
            block_size_mib: h.block_mib,
        }
    }
}

impl MemoryHotplugConfig {
    /// The VM configuration's form.
    pub fn config(&self) -> crate::config::HotplugConfig {
        crate::config::HotplugConfig {
            total_mib: self.total_size_mib,
            slot_mib: self.slot_size_mib,
            block_mib: self.block_size_mib,
            requested_mib: 0,
        }
    }
}

/// `PATCH /hotplug/memory`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryHotplugSizeUpdate {
    /// The size the guest should plug, in MiB.
    pub requested_size_mib: u64,
}

/// `PATCH /balloon/statistics`: a new statistics interval.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonStatsUpdate {
    /// Seconds between statistics updates (statistics cannot be turned on or off after boot).
    pub stats_polling_interval_s: u16,
}

/// `PUT /vsock`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VsockDevice {
    /// The guest's CID.
    pub guest_cid: u64,
    /// The Unix socket host programs connect to.
    pub uds_path: String,
    /// Deprecated in Firecracker; accepted and ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_id: Option<String>,
}

/// `PUT /entropy`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EntropyDevice {
    /// Bandwidth and request-rate limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiterConfig>,
}

/// `PUT /serial`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SerialDevice {
    /// Where guest serial output goes (default: vireo's stdout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_out_path: Option<String>,
    /// Output limits: guest output beyond them is dropped (and counted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiterConfig>,
}

/// `PUT /logger`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LoggerConfig {
    /// Error, Warning, Info, Debug, Trace or Off (any case).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<String>,
    /// File or named pipe for the log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_path: Option<String>,
    /// Print the level in each line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_level: Option<bool>,
    /// Print file and line of each message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_log_origin: Option<bool>,
    /// Only messages from this module path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

/// `PUT /metrics`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// File or named pipe metrics are written to.
    pub metrics_path: String,
    /// Put the instance ID in each metrics line as `"id"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub emit_id: Option<bool>,
}

/// `PUT /actions`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct InstanceActionInfo {
    /// What to do.
    pub action_type: ActionType,
}

/// Synchronous actions.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
pub enum ActionType {
    /// Write the metrics now.
    FlushMetrics,
    /// Boot the configured VM.
    InstanceStart,
    /// Press Ctrl+Alt+Del on the guest's keyboard.
    SendCtrlAltDel,
}

/// `PUT /snapshot/create`, as Firecracker defines it.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreateParams {
    /// The memory file to write.
    pub mem_file_path: String,
    /// The state file to write.
    pub snapshot_path: String,
    /// Full (the default) or Diff.
    #[serde(default)]
    pub snapshot_type: crate::persist::SnapshotType,
}

impl SnapshotCreateParams {
    /// The snapshot to write.
    pub fn into_params(self) -> Result<crate::persist::CreateParams, ResourceError> {
        for (what, p) in [
            ("mem_file_path", &self.mem_file_path),
            ("snapshot_path", &self.snapshot_path),
        ] {
            if p.is_empty() {
                return err(format!("snapshot create: {what} is empty"));
            }
        }
        Ok(crate::persist::CreateParams {
            kind: self.snapshot_type,
            state_path: self.snapshot_path.into(),
            mem_path: self.mem_file_path.into(),
        })
    }
}

/// `mem_backend` of `PUT /snapshot/load`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MemoryBackend {
    /// File or Uffd.
    pub backend_type: MemoryBackendType,
    /// The memory file, or the page-fault handler's Unix socket.
    pub backend_path: String,
}

/// How a restored VM's memory is provided.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
pub enum MemoryBackendType {
    /// A memory file, mapped privately.
    File,
    /// A userfaultfd page-fault handler.
    Uffd,
}

/// One of `network_overrides`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NetworkOverride {
    /// Interface ID in the snapshot.
    pub iface_id: String,
    /// The TAP it uses now.
    pub host_dev_name: String,
}

/// `vsock_override`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VsockOverride {
    /// The Unix socket the device uses now.
    pub uds_path: String,
}

/// `PUT /snapshot/load`, as Firecracker defines it.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SnapshotLoadParams {
    /// The state file.
    pub snapshot_path: String,
    /// The memory (exclusive with `mem_file_path`).
    #[serde(default)]
    pub mem_backend: Option<MemoryBackend>,
    /// The memory file (deprecated form of `mem_backend`).
    #[serde(default)]
    pub mem_file_path: Option<String>,
    /// Deprecated name of `track_dirty_pages`.
    #[serde(default)]
    pub enable_diff_snapshots: bool,
    /// Log written pages for diff snapshots.
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// Resume at once.
    #[serde(default)]
    pub resume_vm: bool,
    /// New TAPs.
    #[serde(default)]
    pub network_overrides: Vec<NetworkOverride>,
    /// New vsock socket.
    #[serde(default)]
    pub vsock_override: Option<VsockOverride>,
    /// Advance the guest clock by the time since the snapshot.
    #[serde(default)]
    pub clock_realtime: bool,
    /// Huge page backing: only the snapshot's own ("Snapshot") or "None" is offered.
    #[serde(default)]
    pub huge_pages: Option<String>,
}

impl SnapshotLoadParams {
    /// The restore to perform; the serial port is the restoring process's.
    pub fn into_params(
        self,
        serial: SerialConfig,
    ) -> Result<crate::persist::LoadParams, ResourceError> {
        use crate::persist::MemBackend;
        if self.snapshot_path.is_empty() {
            return err("snapshot load: snapshot_path is empty");
        }
        let mem = match (self.mem_backend, self.mem_file_path) {
            (Some(_), Some(_)) => {
                return err("snapshot load: give either mem_backend or mem_file_path, not both")
            }
            (None, None) => {
                return err("snapshot load: mem_backend (or the older mem_file_path) is required")
            }
            (None, Some(p)) => MemBackend::File(p.into()),
            (Some(b), None) => match b.backend_type {
                MemoryBackendType::File => MemBackend::File(b.backend_path.into()),
                MemoryBackendType::Uffd => MemBackend::Uffd(b.backend_path.into()),
            },
        };
        match self.huge_pages.as_deref() {
            None | Some("None") | Some("Snapshot") => {}
            Some(h) => {
                return err(format!(
                    "snapshot load: huge_pages {h} is not supported by vireo yet (None or Snapshot)"
                ))
            }
        }
        let mut ids: Vec<&str> = Vec::new();
        for o in &self.network_overrides {
            if ids.contains(&o.iface_id.as_str()) {
                return err(format!(
                    "snapshot load: network_overrides names interface '{}' twice",
                    o.iface_id
                ));
            }
            ids.push(&o.iface_id);
        }
        Ok(crate::persist::LoadParams {
            state_path: self.snapshot_path.into(),
            mem,
            track_dirty_pages: self.track_dirty_pages || self.enable_diff_snapshots,
            resume: self.resume_vm,
            network_overrides: self
                .network_overrides
                .into_iter()
                .map(|o| (o.iface_id, o.host_dev_name))
                .collect(),
            vsock_override: self.vsock_override.map(|v| v.uds_path.into()),
            clock_realtime: self.clock_realtime,
            serial,
        })
    }
}

/// `PATCH /vm`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VmStateUpdate {
    /// Target state.
    pub state: VmState,
}

/// Paused or Resumed.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
pub enum VmState {
    /// Stop the vCPUs.
    Paused,
    /// Run them again.
    Resumed,
}

/// Everything a VM is configured with before it starts.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct VmResources {
    /// Kernel, initrd, command line.
    pub boot_source: Option<BootSource>,
    /// vCPUs and memory.
    pub machine: MachineConfig,
    /// Drives in insertion order.
    pub drives: Vec<Drive>,
    /// Network interfaces in insertion order.
    pub interfaces: Vec<NetworkInterface>,
    /// The MMDS data store, shared with the running VM's interfaces.
    pub mmds: crate::config::MmdsHandle,
    /// Where and how MMDS answers.
    pub mmds_config: Option<MmdsConfig>,
    /// The vsock device.
    pub vsock: Option<VsockDevice>,
    /// The balloon, if configured (`PUT /balloon`).
    pub balloon: Option<BalloonConfig>,
    /// Memory hotplug, if configured (`PUT /hotplug/memory`).
    pub hotplug: Option<MemoryHotplugConfig>,
    /// Entropy device, if configured.
    pub entropy: Option<EntropyDevice>,
    /// Serial output.
    pub serial: Option<SerialDevice>,
    /// Logger.
    pub logger: Option<LoggerConfig>,
    /// Metrics.
    pub metrics: Option<MetricsConfig>,
    /// The custom CPU template.
    pub cpu_config: Option<crate::cpu_config::CpuConfig>,
}

impl VmResources {
    /// Whether nothing but the logger, metrics and serial port was configured: a snapshot
    /// brings the rest, so only such a process may load one (as in Firecracker).
    pub fn only_process_settings(&self) -> bool {
        self.boot_source.is_none()
            && self.machine == MachineConfig::default()
            && self.drives.is_empty()
            && self.interfaces.is_empty()
            && self.mmds_config.is_none()
            && self.vsock.is_none()
            && self.balloon.is_none()
            && self.hotplug.is_none()
            && self.entropy.is_none()
            && self.cpu_config.is_none()
    }

    /// Applies `PUT /cpu-config`: the template is checked now.
    pub fn set_cpu_config(&mut self, c: crate::cpu_config::CpuConfig) -> Result<(), ResourceError> {
        c.compile().map_err(ResourceError)?;
        self.cpu_config = Some(c);
        Ok(())
    }

    /// Where a restored guest's serial port goes: `PUT /serial`'s file, else stdout.
    pub fn serial_config(&self) -> SerialConfig {
        match self
            .serial
            .as_ref()
            .and_then(|s| s.serial_out_path.as_ref())
        {
            Some(p) => SerialConfig::File(PathBuf::from(p)),
            None => SerialConfig::Stdio,
        }
    }
}

/// Checks an input the user names now, as Firecracker does, so that a bad path is a 400 on
/// its own request rather than a failed InstanceStart.
fn readable_file(what: &str, path: &str, kind: Kind) -> Result<(), ResourceError> {
    match utils::files::open_input(std::path::Path::new(path), kind, false) {
        Ok(f) if kind == Kind::Regular && f.metadata().is_ok_and(|m| m.len() == 0) => {
            err(format!("{what} {path} is empty"))
        }
        Ok(_) => Ok(()),
        Err(e) => err(format!("cannot open {what} {path}: {e}")),
    }
}

impl VmResources {
    /// Sets the boot source; the files must be readable now.
    pub fn set_boot_source(&mut self, b: BootSource) -> Result<(), ResourceError> {
        readable_file("kernel image", &b.kernel_image_path, Kind::Regular)?;
        if let Some(initrd) = &b.initrd_path {
            readable_file("initrd", initrd, Kind::Regular)?;
        }
        self.boot_source = Some(b);
        Ok(())
    }

    /// Replaces the machine configuration.
    pub fn set_machine_config(&mut self, m: MachineConfig) -> Result<(), ResourceError> {
        crate::validate_machine(m.vcpu_count, m.mem_size_mib)
            .map_err(|e| ResourceError(e.to_string()))?;
        if m.smt {
            return err("smt: simultaneous multithreading is not supported by vireo");
        }
        if let Some(t) = m.cpu_template.as_deref().filter(|t| *t != "None") {
            return err(format!(
                "cpu_template {t}: static CPU templates are not offered by vireo; give a custom template with PUT /cpu-config"
            ));
        }
        if let Some(h) = m.huge_pages.as_deref() {
            let huge = crate::config::HugePages::parse(h).map_err(ResourceError)?;
            if huge == crate::config::HugePages::Huge2M && !m.mem_size_mib.is_multiple_of(2) {
                return err(format!(
                    "huge_pages 2M: mem_size_mib {} is not a multiple of 2",
                    m.mem_size_mib
                ));
            }
        }
        self.machine = m;
        Ok(())
    }

    /// Applies a partial machine configuration.
    pub fn update_machine_config(&mut self, u: MachineConfigUpdate) -> Result<(), ResourceError> {
        let m = self.machine.clone();
        self.set_machine_config(MachineConfig {
            vcpu_count: u.vcpu_count.unwrap_or(m.vcpu_count),
            mem_size_mib: u.mem_size_mib.unwrap_or(m.mem_size_mib),
            smt: u.smt.unwrap_or(m.smt),
            track_dirty_pages: u.track_dirty_pages.unwrap_or(m.track_dirty_pages),
            cpu_template: u.cpu_template.or(m.cpu_template),
            huge_pages: u.huge_pages.or(m.huge_pages),
            pit: u.pit.unwrap_or(m.pit),
        })
    }

    /// Adds or replaces a drive.
    pub fn insert_drive(&mut self, d: Drive) -> Result<(), ResourceError> {
        if d.drive_id.is_empty() || d.drive_id.len() > 20 {
            return err(format!(
                "drive_id '{}' must be 1 to 20 bytes (the guest reads it as the disk's serial)",
                d.drive_id
            ));
        }
        if d.socket.is_some() {
            return err("socket: vhost-user block devices are not supported by vireo");
        }
        if let Some(e) = d.io_engine.as_deref() {
            // Firecracker's spelling only, on the API.
            if e != "Sync" && e != "Async" {
                return err(format!("io_engine {e}: expected Sync or Async"));
            }
            if e == "Async" {
                devices::virtio::block::uring::probe().map_err(|e| {
                    ResourceError(format!(
                        "io_engine Async: {}",
                        devices::virtio::block::uring::explain(&e)
                    ))
                })?;
            }
        }
        if let Some(c) = d.cache_type.as_deref() {
            if c != "Unsafe" && c != "Writeback" {
                return err(format!("cache_type {c}: expected Unsafe or Writeback"));
            }
        }
        let Some(path) = &d.path_on_host else {
            return err("path_on_host is required for a virtio-blk drive");
        };
        readable_file("drive image", path, Kind::Image)?;
        if d.is_root_device
            && self
                .drives
                .iter()
                .any(|o| o.is_root_device && o.drive_id != d.drive_id)
        {
            return err("a root device is already configured");
        }
        // The root drive is always first (/dev/vda), as in Firecracker: an update that makes a
        // drive root moves it to the front; one that makes the root drive a plain drive moves
        // it to the back.
        match self.drives.iter().position(|o| o.drive_id == d.drive_id) {
            Some(i) if self.drives[i].is_root_device == d.is_root_device => self.drives[i] = d,
            Some(i) => {
                self.drives.remove(i);
                if d.is_root_device {
                    self.drives.insert(0, d);
                } else {
                    self.drives.push(d);
                }
            }
            None if d.is_root_device => self.drives.insert(0, d),
            None => self.drives.push(d),
        }
        Ok(())
    }

    /// Updates a drive before boot.
    pub fn patch_drive(&mut self, p: PartialDrive) -> Result<(), ResourceError> {
        let Some(d) = self.drives.iter_mut().find(|d| d.drive_id == p.drive_id) else {
            return err(format!("drive '{}' does not exist", p.drive_id));
        };
        if let Some(rl) = p.rate_limiter {
            d.rate_limiter = Some(rl);
        }
        if let Some(path) = p.path_on_host {
            readable_file("drive image", &path, Kind::Image)?;
            d.path_on_host = Some(path);
        }
        Ok(())
    }

    /// Adds or replaces a network interface. The TAP is opened now, as Firecracker does, so
    /// that a missing, busy or wrong TAP is refused on this request (and released again: the
    /// VM opens it at start).
    pub fn insert_interface(&mut self, n: NetworkInterface) -> Result<(), ResourceError> {
        let what = format!("network interface '{}'", n.iface_id);
        if n.iface_id.is_empty() || n.iface_id.len() > 64 {
            return err(format!("{what}: iface_id must be 1 to 64 bytes"));
        }
        let mac = match &n.guest_mac {
            Some(m) => Some(
                crate::config::parse_mac(m).map_err(|e| ResourceError(format!("{what}: {e}")))?,
            ),
            None => None,
        };
        if let Some(mtu) = n.mtu {
            if !crate::config::MTU_RANGE.contains(&mtu) {
                return err(format!("{what}: mtu {mtu} is outside 68 to 65535"));
            }
        }
        if let Some(o) = self
            .interfaces
            .iter()
            .find(|o| o.host_dev_name == n.host_dev_name && o.iface_id != n.iface_id)
        {
            return err(format!(
                "{what}: TAP {} is already used by interface '{}'",
                n.host_dev_name, o.iface_id
            ));
        }
        if let (Some(mac), Some(text)) = (mac, &n.guest_mac) {
            // Stored interfaces' MACs were checked when they were inserted.
            if let Some(o) = self.interfaces.iter().find(|o| {
                o.iface_id != n.iface_id
                    && o.guest_mac.as_deref().map(crate::config::parse_mac) == Some(Ok(mac))
            }) {
                return err(format!(
                    "{what}: MAC address {text} is already used by interface '{}'",
                    o.iface_id
                ));
            }
        }
        let already_ours = self
            .interfaces
            .iter()
            .any(|o| o.iface_id == n.iface_id && o.host_dev_name == n.host_dev_name);
        if !already_ours {
            devices::virtio::net::tap::Tap::open(&n.host_dev_name)
                .map_err(|e| ResourceError(format!("{what}: {e}")))?;
        }
        match self
            .interfaces
            .iter_mut()
            .find(|o| o.iface_id == n.iface_id)
        {
            Some(o) => *o = n,
            None => self.interfaces.push(n),
        }
        Ok(())
    }

    /// Applies `PATCH /network-interfaces` (its rate limiters) to the configuration.
    pub fn patch_interface(&mut self, p: PartialNetworkInterface) -> Result<(), ResourceError> {
        let Some(n) = self
            .interfaces
            .iter_mut()
            .find(|o| o.iface_id == p.iface_id)
        else {
            return err(format!("network interface '{}' does not exist", p.iface_id));
        };
        n.rx_rate_limiter = p.rx_rate_limiter.or(n.rx_rate_limiter);
        n.tx_rate_limiter = p.tx_rate_limiter.or(n.tx_rate_limiter);
        Ok(())
    }

    /// Applies `PUT /mmds/config`: the interfaces must exist already.
    pub fn set_mmds_config(&mut self, c: MmdsConfig) -> Result<(), ResourceError> {
        use devices::virtio::net::mmds::{lock, Version};
        let version = match c.version.as_str() {
            "V1" => Version::V1,
            "V2" => Version::V2,
            v => return err(format!("mmds-config: version '{v}' is not V1 or V2")),
        };
        c.ip()
            .map_err(|e| ResourceError(format!("mmds-config: {e}")))?;
        if c.network_interfaces.is_empty() {
            return err("mmds-config: network_interfaces names no interface");
        }
        if let Some(missing) = c
            .network_interfaces
            .iter()
            .find(|id| !self.interfaces.iter().any(|n| &n.iface_id == *id))
        {
            return err(format!(
                "mmds-config: network interface '{missing}' does not exist (PUT /network-interfaces first)"
            ));
        }
        lock(&self.mmds.0).configure(version, c.imds_compat);
        self.mmds_config = Some(c);
        Ok(())
    }

    /// Sets the vsock device (`PUT /vsock`).
    pub fn set_vsock(&mut self, v: VsockDevice) -> Result<(), ResourceError> {
        crate::config::check_cid(v.guest_cid).map_err(|e| ResourceError(format!("vsock: {e}")))?;
        if v.uds_path.is_empty() {
            return err("vsock: uds_path is empty");
        }
        self.vsock = Some(v);
        Ok(())
    }

    /// Sets the balloon (`PUT /balloon`).
    pub fn set_balloon(&mut self, b: BalloonConfig) -> Result<(), ResourceError> {
        b.check(self.machine.mem_size_mib).map_err(ResourceError)?;
        self.balloon = Some(b);
        Ok(())
    }

    /// Sets memory hotplug (`PUT /hotplug/memory`); the sizes are checked now.
    pub fn set_hotplug(&mut self, h: MemoryHotplugConfig) -> Result<(), ResourceError> {
        h.config()
            .layout(self.machine.mem_size_mib)
            .map_err(ResourceError)?;
        self.hotplug = Some(h);
        Ok(())
    }

    /// Changes the configured balloon's target (`PATCH /balloon` before boot).
    pub fn update_balloon(&mut self, u: BalloonUpdate) -> Result<(), ResourceError> {
        let mem = self.machine.mem_size_mib;
        let Some(b) = self.balloon.as_mut() else {
            return err(NO_BALLOON);
        };
        devices::virtio::balloon::check_target(u.amount_mib, mem).map_err(ResourceError)?;
        b.amount_mib = u.amount_mib;
        Ok(())
    }

    /// Adds the entropy device.
    pub fn set_entropy(&mut self, e: EntropyDevice) -> Result<(), ResourceError> {
        self.entropy = Some(e);
        Ok(())
    }

    /// Sets the serial output.
    pub fn set_serial(&mut self, s: SerialDevice) -> Result<(), ResourceError> {
        if let Some(path) = &s.serial_out_path {
            // Checked (and created) now, truncated when the VM starts.
            utils::files::open_output(std::path::Path::new(path), false)
                .map_err(|e| ResourceError(format!("cannot open serial output {path}: {e}")))?;
        }
        self.serial = Some(s);
        Ok(())
    }

    /// The configuration to build the VM from.
    pub fn vm_config(&self) -> Result<VmConfig, ResourceError> {
        let Some(boot) = &self.boot_source else {
            return err("cannot start the microVM: no boot source (PUT /boot-source first)");
        };
        let mut cmdline = boot
            .boot_args
            .clone()
            .unwrap_or_else(|| DEFAULT_CMDLINE.to_owned());
        let drives = self
            .drives
            .iter()
            .map(|d| {
                if d.is_root_device {
                    if let Some(uuid) = &d.partuuid {
                        let mode = if d.is_read_only == Some(true) {
                            "ro"
                        } else {
                            "rw"
                        };
                        cmdline.push_str(&format!(" root=PARTUUID={uuid} {mode}"));
                    }
                }
                DriveConfig {
                    path: PathBuf::from(d.path_on_host.clone().unwrap_or_default()),
                    id: Some(d.drive_id.clone()),
                    read_only: d.is_read_only.unwrap_or(false),
                    root: d.is_root_device && d.partuuid.is_none(),
                    rate_limiter: d.rate_limiter.unwrap_or_default(),
                    io_engine: d
                        .io_engine
                        .as_deref()
                        .and_then(|e| e.parse().ok())
                        .unwrap_or_default(),
                }
            })
            .collect();
        Ok(VmConfig {
            pit: self.machine.pit,
            huge_pages: match self.machine.huge_pages.as_deref() {
                Some(h) => crate::config::HugePages::parse(h).map_err(ResourceError)?,
                None => crate::config::HugePages::None,
            },
            merge: false,
            kernel: PathBuf::from(&boot.kernel_image_path),
            initrd: boot.initrd_path.as_ref().map(PathBuf::from),
            cmdline,
            vcpus: self.machine.vcpu_count,
            mem_mib: self.machine.mem_size_mib,
            serial: match self
                .serial
                .as_ref()
                .and_then(|s| s.serial_out_path.as_ref())
            {
                Some(p) => SerialConfig::File(PathBuf::from(p)),
                None => SerialConfig::Stdio,
            },
            serial_rate_limiter: self
                .serial
                .as_ref()
                .and_then(|s| s.rate_limiter)
                .unwrap_or_default(),
            drives,
            rng: self.entropy.is_some(),
            rng_rate_limiter: self
                .entropy
                .as_ref()
                .and_then(|e| e.rate_limiter)
                .unwrap_or_default(),
            track_dirty_pages: self.machine.track_dirty_pages,
            cpu_template: self
                .cpu_config
                .as_ref()
                .map(|c| c.compile())
                .transpose()
                .map_err(ResourceError)?,
            nets: self
                .interfaces
                .iter()
                .map(|n| NetConfig {
                    id: n.iface_id.clone(),
                    tap: n.host_dev_name.clone(),
                    tap_fd: None,
                    mac: n
                        .guest_mac
                        .as_deref()
                        .and_then(|m| crate::config::parse_mac(m).ok()),
                    mtu: n.mtu.map(|m| m as u16),
                    mmds: self
                        .mmds_config
                        .as_ref()
                        .is_some_and(|c| c.network_interfaces.contains(&n.iface_id)),
                    rx_rate_limiter: n.rx_rate_limiter.unwrap_or_default(),
                    tx_rate_limiter: n.tx_rate_limiter.unwrap_or_default(),
                })
                .collect(),
            // Checked against the memory size by the device manager at start.
            balloon: self.balloon.clone(),
            hotplug: self.hotplug.as_ref().map(MemoryHotplugConfig::config),
            vsock: self.vsock.as_ref().map(|v| crate::config::VsockConfig {
                cid: v.guest_cid,
                uds: PathBuf::from(&v.uds_path),
            }),
            mmds: match &self.mmds_config {
                Some(c) => Some(crate::config::MmdsSetup {
                    ip: c.ip().map_err(ResourceError)?,
                    store: self.mmds.clone(),
                }),
                None => None,
            },
        })
    }

    /// `GET /vm/config`: the configuration in Firecracker's FullVmConfiguration shape.
    pub fn full_config(&self) -> Value {
        serde_json::json!({
            "balloon": self.balloon,
            "boot-source": self.boot_source,
            "cpu-config": self.cpu_config,
            "drives": self.drives,
            "entropy": self.entropy,
            "logger": self.logger,
            "machine-config": self.machine,
            "memory-hotplug": self.hotplug,
            "metrics": self.metrics,
            "mmds-config": self.mmds_config,
            "network-interfaces": self.interfaces,
            "pmem": [],
            "vsock": self.vsock,
        })
    }
}

/// Firecracker's `--config-file` format: the API objects under their path names.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(rename = "boot-source")]
    boot_source: Option<BootSource>,
    #[serde(rename = "machine-config")]
    machine_config: Option<MachineConfig>,
    #[serde(default)]
    drives: Vec<Drive>,
    #[serde(rename = "network-interfaces", default)]
    network_interfaces: Vec<NetworkInterface>,
    vsock: Option<VsockDevice>,
    balloon: Option<BalloonConfig>,
    entropy: Option<EntropyDevice>,
    serial: Option<SerialDevice>,
    logger: Option<LoggerConfig>,
    metrics: Option<MetricsConfig>,
    #[serde(rename = "mmds-config")]
    mmds_config: Option<MmdsConfig>,
    #[serde(rename = "cpu-config")]
    cpu_config: Option<crate::cpu_config::CpuConfig>,
    pmem: Option<Vec<Value>>,
    #[serde(rename = "memory-hotplug")]
    memory_hotplug: Option<MemoryHotplugConfig>,
}

impl ConfigFile {
    /// Parses and applies a config file, naming the first problem; MMDS holds at most
    /// `mmds_limit` bytes.
    pub fn into_resources(self, mmds_limit: usize) -> Result<VmResources, ResourceError> {
        let unsupported = [("pmem", self.pmem.as_ref().is_some_and(|v| !v.is_empty()))];
        if let Some((name, _)) = unsupported.iter().find(|(_, set)| *set) {
            return err(format!("{name}: this device is not supported by vireo yet"));
        }
        let mut r = VmResources {
            mmds: crate::config::MmdsHandle::new(mmds_limit),
            ..Default::default()
        };
        if let Some(m) = self.machine_config {
            r.set_machine_config(m)?;
        }
        let Some(b) = self.boot_source else {
            return err("the config file has no boot-source");
        };
        r.set_boot_source(b)?;
        for d in self.drives {
            r.insert_drive(d)?;
        }
        for n in self.network_interfaces {
            r.insert_interface(n)?;
        }
        if let Some(c) = self.mmds_config {
            r.set_mmds_config(c)?;
        }
        if let Some(v) = self.vsock {
            r.set_vsock(v)?;
        }
        if let Some(b) = self.balloon {
            r.set_balloon(b)?;
        }
        if let Some(h) = self.memory_hotplug {
            r.set_hotplug(h)?;
        }
        if let Some(e) = self.entropy {
            r.set_entropy(e)?;
        }
        if let Some(s) = self.serial {
            r.set_serial(s)?;
        }
        if let Some(c) = self.cpu_config {
            r.set_cpu_config(c)?;
        }
        r.logger = self.logger;
        r.metrics = self.metrics;
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::virtio::block::IoEngine;

    fn scratch(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("vireo-res-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn drive(id: &str, path: &std::path::Path, root: bool) -> Drive {
        Drive {
            drive_id: id.into(),
            path_on_host: Some(path.to_str().unwrap().into()),
            is_root_device: root,
            is_read_only: None,
            partuuid: None,
            cache_type: None,
            rate_limiter: None,
            io_engine: None,
            socket: None,
        }
    }

    #[test]
    fn a_drive_made_root_moves_first_and_back_when_it_stops_being_root() {
        let dir = scratch("root-order");
        let img = dir.join("img");
        std::fs::write(&img, [0u8; 512]).unwrap();
        let mut r = VmResources::default();
        r.insert_drive(drive("a", &img, false)).unwrap();
        r.insert_drive(drive("b", &img, false)).unwrap();
        r.insert_drive(drive("b", &img, true)).unwrap();
        let order: Vec<&str> = r.drives.iter().map(|d| d.drive_id.as_str()).collect();
        assert_eq!(order, ["b", "a"]);
        r.insert_drive(drive("b", &img, false)).unwrap();
        r.insert_drive(drive("a", &img, true)).unwrap();
        let order: Vec<&str> = r.drives.iter().map(|d| d.drive_id.as_str()).collect();
        assert_eq!(order, ["a", "b"]);
        // The VM config then has the root drive first, as the device model requires.
        r.set_boot_source(BootSource {
            kernel_image_path: img.to_str().unwrap().into(),
            ..Default::default()
        })
        .unwrap();
        let cfg = r.vm_config().unwrap();
        assert!(cfg.drives[0].root && !cfg.drives[1].root);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn io_engine_is_firecrackers_sync_or_async() {
        let dir = scratch("engine");
        let img = dir.join("img");
        std::fs::write(&img, [0u8; 512]).unwrap();
        let mut r = VmResources::default();
        let with = |e: &str| Drive {
            io_engine: Some(e.into()),
            ..drive("d", &img, false)
        };
        r.insert_drive(with("Async")).unwrap();
        r.set_boot_source(BootSource {
            kernel_image_path: img.to_str().unwrap().into(),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(r.vm_config().unwrap().drives[0].io_engine, IoEngine::Async);
        r.insert_drive(with("Sync")).unwrap();
        assert_eq!(r.vm_config().unwrap().drives[0].io_engine, IoEngine::Sync);
        r.insert_drive(drive("d", &img, false)).unwrap();
        assert_eq!(r.vm_config().unwrap().drives[0].io_engine, IoEngine::Sync);
        for bad in ["async", "Uring", ""] {
            let e = r.insert_drive(with(bad)).unwrap_err();
            assert!(e.0.contains("expected Sync or Async"), "{bad}: {e}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn fifos_and_empty_files_are_refused_at_once() {
        let dir = scratch("fifo");
        let fifo = dir.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo(3) on a NUL-terminated path this test owns.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let empty = dir.join("empty");
        std::fs::write(&empty, b"").unwrap();
        let kernel = dir.join("kernel");
        std::fs::write(&kernel, b"x").unwrap();
        let p = |p: &std::path::Path| p.to_str().unwrap().to_owned();
        let mut r = VmResources::default();
        let boot = |k: &std::path::Path, i: Option<&std::path::Path>| BootSource {
            kernel_image_path: p(k),
            initrd_path: i.map(p),
            boot_args: None,
        };
        let e = r.set_boot_source(boot(&fifo, None)).unwrap_err();
        assert!(
            e.0.contains("kernel image") && e.0.contains("named pipe"),
            "{e}"
        );
        let e = r.set_boot_source(boot(&kernel, Some(&fifo))).unwrap_err();
        assert!(e.0.contains("initrd") && e.0.contains("named pipe"), "{e}");
        let e = r.set_boot_source(boot(&kernel, Some(&empty))).unwrap_err();
        assert!(e.0.contains("initrd") && e.0.contains("empty"), "{e}");
        let e = r.insert_drive(drive("d", &fifo, false)).unwrap_err();
        assert!(
            e.0.contains("drive image") && e.0.contains("named pipe"),
            "{e}"
        );
        // Serial output may be a FIFO (opened without waiting for a reader), not a directory.
        let serial = |path: &std::path::Path| SerialDevice {
            serial_out_path: Some(p(path)),
            rate_limiter: None,
        };
        r.set_serial(serial(&fifo)).unwrap();
        let e = r.set_serial(serial(&dir)).unwrap_err();
        assert!(
            e.0.contains("serial output") && e.0.contains("directory"),
            "{e}"
        );
        let e = r.set_serial(serial(&dir.join("no/such/dir"))).unwrap_err();
        assert!(e.0.contains("No such file"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
