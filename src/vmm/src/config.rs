//! The description of a VM to build, whichever front end (flags, config file, API) produced it.

use std::path::PathBuf;

/// Where the guest's COM1 output goes and its input comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SerialConfig {
    /// vireo's own stdin/stdout; the terminal is put in raw mode while the guest runs.
    Stdio,
    /// Output to a file (truncated first) or a named pipe (not waited on); no input.
    File(PathBuf),
    /// The UART exists but its output is discarded.
    None,
}

/// Everything needed to build and boot one VM.
#[derive(Clone, Debug, PartialEq, Eq)]
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
    pub serial: SerialConfig,
    /// virtio-blk drives, in the order the guest sees them (/dev/vda, /dev/vdb, ...).
    pub drives: Vec<DriveConfig>,
    /// Whether the guest gets a virtio-rng entropy device.
    pub rng: bool,
}

/// One virtio-blk drive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DriveConfig {
    /// Disk image on the host.
    pub path: PathBuf,
    /// ID the guest reads with GET_ID (at most 20 bytes); defaults to `drive<N>`.
    pub id: Option<String>,
    /// Refuse guest writes (and open the image read-only).
    pub read_only: bool,
    /// Make this drive the guest's root device (`root=/dev/vda`); first drive only.
    pub root: bool,
}

/// Command line used when the user gives none: what a Linux microVM guest needs to talk on
/// the serial port and reboot through the i8042.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off";
