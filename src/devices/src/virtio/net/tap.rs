//! The host side of a virtio-net device: an existing TAP interface, opened by name with a
//! virtio-net header on every frame (IFF_VNET_HDR), so frames and their offload metadata
//! cross between the guest and the host kernel without being parsed or split here.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use thiserror::Error;

/// Bytes of the virtio-net header on every frame (virtio 1.x: `virtio_net_hdr_v1`, with
/// `num_buffers`), which is also the header the TAP reads and writes.
pub const VNET_HDR_LEN: usize = 12;

/// Linux's interface name limit, with the NUL.
const IFNAMSIZ: usize = 16;

/// Why a TAP cannot be used.
#[derive(Debug, Error)]
pub enum TapError {
    /// The name cannot be an interface name.
    #[error("'{0}' is not a valid interface name (1 to 15 bytes, no '/', no whitespace)")]
    BadName(String),
    /// No such interface.
    #[error("TAP device {0} does not exist (create it first, e.g. ip tuntap add {0} mode tap)")]
    Missing(String),
    /// The interface is not a TAP (a TUN, a bridge, a physical NIC...).
    #[error("{0} is not a TAP device")]
    NotATap(String),
    /// A multi-queue TAP (vireo uses one queue pair).
    #[error("TAP device {0} is multi-queue; vireo needs a single-queue TAP")]
    MultiQueue(String),
    /// Another process has it open.
    #[error("TAP device {0} is busy: another process has it open")]
    Busy(String),
    /// An ioctl or open failed.
    #[error("cannot open TAP device {name}: {what}: {err}")]
    Io {
        /// Interface.
        name: String,
        /// The step that failed.
        what: &'static str,
        /// Cause.
        err: std::io::Error,
    },
}

/// `struct ethtool_drvinfo`, as far as vireo reads it.
#[repr(C)]
struct DrvInfo {
    cmd: u32,
    driver: [u8; 32],
    version: [u8; 32],
    fw_version: [u8; 32],
    bus_info: [u8; 32],
    rest: [u8; 64],
}

#[repr(C)]
struct IfReqData {
    name: [u8; IFNAMSIZ],
    data: *mut DrvInfo,
    _pad: [u8; 16],
}

const SIOCETHTOOL: libc::c_ulong = 0x8946;
const ETHTOOL_GDRVINFO: u32 = 3;

fn c_str(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// The driver and bus of interface `name` in this network namespace (`("tun", "tap")` for a
/// TAP), or `None` if there is no such interface.
fn driver_of(name: &str) -> Option<(String, String)> {
    // SAFETY: socket(2) with constant arguments; the descriptor is closed below.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return None;
    }
    // SAFETY: the descriptor was just created and is owned here.
    let sock = unsafe { File::from_raw_fd(sock) };
    let mut info = DrvInfo {
        cmd: ETHTOOL_GDRVINFO,
        driver: [0; 32],
        version: [0; 32],
        fw_version: [0; 32],
        bus_info: [0; 32],
        rest: [0; 64],
    };
    let mut req = IfReqData {
        name: [0; IFNAMSIZ],
        data: &mut info,
        _pad: [0; 16],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: SIOCETHTOOL reads the ifreq and writes the drvinfo it points to; both outlive
    // the call.
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), SIOCETHTOOL as _, &mut req) };
    if r < 0 {
        return match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::ENODEV) => None,
            // An interface without ethtool support (lo, for one): it exists, it is no TAP.
            _ => Some((String::new(), String::new())),
        };
    }
    Some((c_str(&info.driver), c_str(&info.bus_info)))
}

#[repr(C)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// An open single-queue TAP with virtio-net headers.
pub struct Tap {
    file: File,
    name: String,
    uso: bool,
}

fn tun_set_offload(tap: &File, flags: libc::c_uint) -> std::io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes the offload flags by value; it writes to no memory.
    let r = unsafe {
        libc::ioctl(
            tap.as_raw_fd(),
            libc::TUNSETOFFLOAD,
            libc::c_ulong::from(flags),
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Tap {
    /// Opens the existing TAP interface `name`. It must exist already (vireo never creates
    /// interfaces), be a TAP, be single-queue and not be open in another process.
    pub fn open(name: &str) -> Result<Self, TapError> {
        if name.is_empty()
            || name.len() >= IFNAMSIZ
            || name.contains('/')
            || name.chars().any(char::is_whitespace)
            || name == "."
            || name == ".."
        {
            return Err(TapError::BadName(name.to_owned()));
        }
        // TUNSETIFF would create a missing interface: look first, in this network namespace.
        match driver_of(name) {
            None => return Err(TapError::Missing(name.to_owned())),
            Some((driver, bus)) if driver != "tun" || bus != "tap" => {
                return Err(TapError::NotATap(name.to_owned()))
            }
            Some(_) => {}
        }
        let io = |what: &'static str| {
            let name = name.to_owned();
            move |err| TapError::Io { name, what, err }
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(io("open /dev/net/tun"))?;
        let mut req = IfReq {
            name: [0; IFNAMSIZ],
            flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes the ifreq we pass, which lives across the call.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
        if r < 0 {
            let err = std::io::Error::last_os_error();
            return Err(match err.raw_os_error() {
                Some(libc::EBUSY) => TapError::Busy(name.to_owned()),
                // It is a TAP, so the flags conflict: it was made multi-queue.
                Some(libc::EINVAL) => TapError::MultiQueue(name.to_owned()),
                _ => io("TUNSETIFF")(err),
            });
        }
        Self::configure(file, name.to_owned())
    }

    /// Takes over a TAP a management tool opened and handed down as descriptor `fd`. It must
    /// be a TAP opened with IFF_VNET_HDR (the header size is set here) and not multi-queue.
    pub fn from_fd(fd: RawFd) -> Result<Self, TapError> {
        let label = format!("fd {fd}");
        // SAFETY: F_GETFD only reads the descriptor's flags; a closed one fails with EBADF.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(TapError::Io {
                name: label,
                what: "the descriptor is not open",
                err: std::io::Error::last_os_error(),
            });
        }
        let mut req = IfReq {
            name: [0; IFNAMSIZ],
            flags: 0,
            _pad: [0; 22],
        };
        // SAFETY: TUNGETIFF writes the ifreq we pass, which lives across the call.
        if unsafe { libc::ioctl(fd, libc::TUNGETIFF, &mut req) } < 0 {
            return Err(TapError::NotATap(label));
        }
        let name = c_str(&req.name);
        let flags = i32::from(req.flags);
        if flags & libc::IFF_TAP == 0 {
            return Err(TapError::NotATap(name));
        }
        if flags & libc::IFF_MULTI_QUEUE != 0 {
            return Err(TapError::MultiQueue(name));
        }
        if flags & libc::IFF_VNET_HDR == 0 {
            return Err(TapError::Io {
                name,
                what: "it was opened without IFF_VNET_HDR",
                err: std::io::Error::from_raw_os_error(libc::EINVAL),
            });
        }
        // SAFETY: the caller handed this descriptor to vireo; from here on vireo owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        // SAFETY: F_SETFL on the descriptor we now own; reads need not block the device thread.
        unsafe {
            let fl = libc::fcntl(fd, libc::F_GETFL);
            libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK);
            libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
        }
        Self::configure(file, name)
    }

    /// Sets the virtio-net header size on an attached TAP and learns whether it takes USO;
    /// leaves every offload off until the guest negotiates some.
    fn configure(file: File, name: String) -> Result<Self, TapError> {
        let io = |what: &'static str, err| TapError::Io {
            name: name.clone(),
            what,
            err,
        };
        let hdr_len: libc::c_int = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads the int behind the pointer, which outlives the call.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr_len) } < 0 {
            return Err(io("TUNSETVNETHDRSZ", std::io::Error::last_os_error()));
        }
        // Kernels from 6.2 take UDP segmentation offload (USO), which current Linux guests use
        // instead of UFO; older ones refuse the flags.
        let uso_flags = libc::TUN_F_CSUM | libc::TUN_F_USO4 | libc::TUN_F_USO6;
        let uso = tun_set_offload(&file, uso_flags).is_ok();
        tun_set_offload(&file, 0).map_err(|e| io("TUNSETOFFLOAD", e))?;
        Ok(Self { file, name, uso })
    }

    /// Wraps an already-open TAP descriptor (tests use a datagram socket pair instead).
    pub fn from_file(file: File, name: &str, uso: bool) -> Self {
        Self {
            file,
            name: name.to_owned(),
            uso,
        }
    }

    /// Interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the TAP takes USO (UDP segmentation offload) frames.
    pub fn supports_uso(&self) -> bool {
        self.uso
    }

    /// Tells the TAP which offloads the guest accepts on receive (TUN_F_* flags): the host
    /// kernel then hands over large and partially checksummed frames instead of
    /// segmenting them first.
    pub fn set_offload(&self, flags: u32) -> std::io::Result<()> {
        match tun_set_offload(&self.file, flags) {
            // A socket standing in for a TAP in tests has no offloads to set.
            Err(e) if e.raw_os_error() == Some(libc::ENOTTY) => Ok(()),
            r => r,
        }
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// A connected pair of datagram sockets standing in for a TAP in unit tests and fuzzing:
/// like a TAP, each read or write is one whole frame.
pub fn socket_pair() -> std::io::Result<(File, File)> {
    let mut fds = [0; 2];
    // SAFETY: socketpair(2) writes two descriptors into the array we own.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors are new and owned by nobody else.
    Ok(unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) })
}
