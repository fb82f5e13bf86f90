//! The description of a VM to build, whichever front end (flags, config file, API) produced it.

use std::path::PathBuf;

/// Where the guest's COM1 output goes and its input comes from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum SerialConfig {
    /// vireo's own stdin/stdout; the terminal is put in raw mode while the guest runs.
    #[default]
    Stdio,
    /// Output to a file (truncated first) or a named pipe (not waited on); no input.
    File(PathBuf),
    /// The UART exists but its output is discarded.
    None,
}

/// Everything needed to build and boot one VM. Snapshots keep it (without the serial port,
/// file descriptors and MMDS data, which belong to the process that restores).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VmConfig {
    /// Kernel image: ELF vmlinux (with or without a PVH note) or bzImage.
    pub kernel: PathBuf,
    /// Optional initial ramdisk.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// Serial console wiring.
    #[serde(skip)]
    pub serial: SerialConfig,
    /// The serial console's output limits (beyond them output is dropped).
    #[serde(default)]
    pub serial_rate_limiter: devices::rate_limiter::RateLimiterConfig,
    /// virtio-blk drives, in the order the guest sees them (/dev/vda, /dev/vdb, ...).
    pub drives: Vec<DriveConfig>,
    /// Whether the guest gets a virtio-rng entropy device.
    pub rng: bool,
    /// The entropy device's bandwidth and request-rate limits.
    #[serde(default)]
    pub rng_rate_limiter: devices::rate_limiter::RateLimiterConfig,
    /// Whether KVM logs the pages the guest writes, so that diff snapshots can be taken.
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// Whether the VM has KVM's in-kernel 8254 PIT (off unless asked for). Linux under vireo's
    /// hardware-reduced ACPI (kvmclock, the LAPIC timer) never uses it; without it the VM takes
    /// about 60 KiB less and KVM destroys it ~15 ms sooner (docs/benchmarks.md). State files
    /// from before the field had one.
    #[serde(default = "yes")]
    pub pit: bool,
    /// What backs guest RAM: normal pages, transparent huge pages, or 2 MiB hugetlbfs pages.
    #[serde(default)]
    pub huge_pages: HugePages,
    /// Mark guest RAM mergeable (KSM may share identical pages between VMs).
    #[serde(default)]
    pub merge: bool,
    /// A custom CPU template (`PUT /cpu-config`) applied to every vCPU.
    #[serde(default)]
    pub cpu_template: Option<crate::cpu_config::CpuTemplate>,
    /// virtio-net interfaces, in the order the guest sees them (eth0, eth1, ...).
    pub nets: Vec<NetConfig>,
    /// The metadata service, answered on the interfaces whose `mmds` is set.
    pub mmds: Option<MmdsSetup>,
    /// The virtio-vsock device.
    pub vsock: Option<VsockConfig>,
    /// The virtio-balloon device.
    #[serde(default)]
    pub balloon: Option<devices::virtio::balloon::BalloonConfig>,
    /// Memory hotplug (a virtio-mem device and its region).
    #[serde(default)]
    pub hotplug: Option<HotplugConfig>,
}

/// Memory hotplug: a region of `total_mib` after RAM that the guest plugs in blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HotplugConfig {
    /// Size of the region in MiB.
    pub total_mib: u64,
    /// What the host makes guest RAM at a time, in MiB (at least 128: Linux's memory block).
    pub slot_mib: u64,
    /// What the guest plugs at a time, in MiB.
    pub block_mib: u64,
    /// What the guest is asked to plug from boot, in MiB.
    #[serde(default)]
    pub requested_mib: u64,
}

impl HotplugConfig {
    /// Where the region lies for a guest of `mem_mib` MiB, checked.
    pub fn layout(&self, mem_mib: u64) -> Result<devices::virtio::mem::MemLayout, String> {
        if self.slot_mib < 128 {
            return Err(format!(
                "memory hotplug: the slot size ({} MiB) must be at least 128 MiB",
                self.slot_mib
            ));
        }
        let mib = |v: u64| {
            v.checked_mul(1 << 20)
                .ok_or_else(|| format!("memory hotplug: {v} MiB is too large"))
        };
        let (region_size, slot_size, block_size) = (
            mib(self.total_mib)?,
            mib(self.slot_mib)?,
            mib(self.block_mib)?,
        );
        let layout = devices::virtio::mem::MemLayout {
            addr: arch::layout::hotplug_base(mib(mem_mib)?, region_size, slot_size),
            region_size,
            block_size,
            slot_size,
        };
        layout.check()?;
        if layout.blocks() > u64::from(u32::MAX) {
            return Err("memory hotplug: too many blocks; use larger ones".into());
        }
        Ok(layout)
    }
}

/// A virtio-vsock device and the Unix socket its host side listens on.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VsockConfig {
    /// The guest's CID (3 to 2^32 - 2).
    pub cid: u64,
    /// Host clients connect here; guest connections to port P go to `PATH_P`.
    pub uds: std::path::PathBuf,
}

/// Checks a guest CID: 0, 1 and 2 are reserved (hypervisor, local, host) and 2^32 - 1 is
/// VMADDR_CID_ANY.
pub fn check_cid(cid: u64) -> Result<(), String> {
    if cid <= 2 || cid >= u64::from(u32::MAX) {
        return Err(format!(
            "guest CID {cid} cannot be used: 0, 1 and 2 are reserved and it must be below 4294967295"
        ));
    }
    Ok(())
}

/// The data store and address of MMDS.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MmdsSetup {
    /// The link-local address MMDS answers at.
    pub ip: [u8; 4],
    /// The store the API fills.
    #[serde(skip)]
    pub store: MmdsHandle,
}

/// The shared MMDS store, compared by identity.
#[derive(Clone)]
pub struct MmdsHandle(pub devices::virtio::net::mmds::SharedMmds);

impl MmdsHandle {
    /// A new, empty store holding at most `limit` bytes of JSON.
    pub fn new(limit: usize) -> Self {
        Self(std::sync::Arc::new(std::sync::Mutex::new(
            devices::virtio::net::mmds::Mmds::new(limit),
        )))
    }
}

impl Default for MmdsHandle {
    fn default() -> Self {
        Self::new(DEFAULT_MMDS_LIMIT)
    }
}

impl PartialEq for MmdsHandle {
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for MmdsHandle {}

impl std::fmt::Debug for MmdsHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MmdsHandle")
    }
}

/// Firecracker's default MMDS data store limit (that of an API request body).
pub const DEFAULT_MMDS_LIMIT: usize = 51_200;

/// One virtio-net interface on a host TAP.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetConfig {
    /// Interface ID (`eth0` by default), how the API names it.
    pub id: String,
    /// The existing host TAP interface.
    pub tap: String,
    /// Or an already-open TAP descriptor a management tool handed down (`tap` is then only
    /// a label).
    #[serde(skip)]
    pub tap_fd: Option<i32>,
    /// MAC address offered to the guest; without one the guest picks a random one.
    pub mac: Option<[u8; 6]>,
    /// MTU advertised to the guest (68 to 65535).
    pub mtu: Option<u16>,
    /// MMDS answers on this interface.
    pub mmds: bool,
    /// Limits on frames to the guest.
    #[serde(default)]
    pub rx_rate_limiter: devices::rate_limiter::RateLimiterConfig,
    /// Limits on frames from the guest.
    #[serde(default)]
    pub tx_rate_limiter: devices::rate_limiter::RateLimiterConfig,
}

/// Parses `AA:BB:CC:DD:EE:FF`, refusing multicast addresses (no NIC can have one).
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split(':').collect();
    let mut mac = [0u8; 6];
    if parts.len() != 6 {
        return Err(format!(
            "MAC address '{s}' must be six hex pairs like 02:00:00:00:00:01"
        ));
    }
    for (b, p) in mac.iter_mut().zip(&parts) {
        if p.len() != 2 {
            return Err(format!(
                "MAC address '{s}' must be six hex pairs like 02:00:00:00:00:01"
            ));
        }
        *b = u8::from_str_radix(p, 16)
            .map_err(|_| format!("MAC address '{s}': '{p}' is not a hex byte"))?;
    }
    if mac[0] & 1 != 0 {
        return Err(format!(
            "MAC address '{s}' is a multicast address, which no interface can have"
        ));
    }
    Ok(mac)
}

/// Formats a MAC address as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The bounds of an advertised MTU (virtio's minimum, and what the header can carry).
pub const MTU_RANGE: std::ops::RangeInclusive<u32> = 68..=65535;

/// What backs guest RAM (Firecracker's `huge_pages`, plus transparent huge pages).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum HugePages {
    /// 4 KiB pages.
    #[default]
    None,
    /// 4 KiB pages the kernel may gather into transparent huge pages (MADV_HUGEPAGE).
    Transparent,
    /// 2 MiB pages from the host's hugetlbfs pool, reserved when the VM starts.
    #[serde(rename = "2M")]
    Huge2M,
}

impl HugePages {
    /// Parses Firecracker's names: `None`, `2M`, and `Transparent`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "None" => Ok(Self::None),
            "Transparent" => Ok(Self::Transparent),
            "2M" => Ok(Self::Huge2M),
            _ => Err(format!("huge_pages {s}: expected None, Transparent or 2M")),
        }
    }
}

/// One virtio-blk drive.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DriveConfig {
    /// Disk image on the host.
    pub path: PathBuf,
    /// ID the guest reads with GET_ID (at most 20 bytes); defaults to `drive<N>`.
    pub id: Option<String>,
    /// Refuse guest writes (and open the image read-only).
    pub read_only: bool,
    /// Make this drive the guest's root device (`root=/dev/vda`); first drive only.
    pub root: bool,
    /// Bandwidth and request-rate limits (Firecracker's `rate_limiter`).
    #[serde(default)]
    pub rate_limiter: devices::rate_limiter::RateLimiterConfig,
    /// How requests reach the image (Firecracker's `io_engine`; Sync unless chosen).
    #[serde(default)]
    pub io_engine: devices::virtio::block::IoEngine,
}

/// Command line used when the user gives none: what a Linux microVM guest needs to talk on
/// the serial port and reboot through the i8042.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off";

/// Serde's default for options that are on unless said otherwise.
fn yes() -> bool {
    true
}
