//! The agent as the guest's init (PID 1): the file systems every program expects, the
//! hostname, the network from the kernel command line, and powering off.

use crate::exec::{error_frame, Stream};
use crate::proto::{Frame, FrameError, Kind};
use nix::errno::Errno;
use nix::mount::{mount, MsFlags};
use std::path::Path;

/// What the kernel command line asks of the agent.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct BootConfig {
    /// `vireo.hostname=NAME`, else the hostname field of `ip=`.
    pub hostname: Option<String>,
    /// `ip=CLIENT:SERVER:GATEWAY:NETMASK:HOSTNAME:DEVICE:AUTOCONF` with a static address.
    pub ip: Option<crate::net::Address>,
}

impl BootConfig {
    /// Reads the parameters the agent uses from a kernel command line; others are ignored.
    pub fn parse(cmdline: &str) -> Result<Self, String> {
        let mut config = Self::default();
        let mut ip_hostname = None;
        for param in cmdline.split_ascii_whitespace() {
            if let Some(name) = param.strip_prefix("vireo.hostname=") {
                config.hostname = Some(name.to_string());
            } else if let Some(ip) = param.strip_prefix("ip=") {
                let (address, host) = crate::net::Address::parse_kernel_ip(ip)?;
                config.ip = address;
                ip_hostname = host;
            }
        }
        if config.hostname.is_none() {
            config.hostname = ip_hostname;
        }
        Ok(config)
    }
}

/// One mount the init makes.
struct Mount {
    fstype: &'static str,
    target: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
}

const MOUNTS: &[Mount] = &[
    Mount {
        fstype: "proc",
        target: "/proc",
        flags: MsFlags::MS_NOSUID
            .union(MsFlags::MS_NODEV)
            .union(MsFlags::MS_NOEXEC),
        data: None,
    },
    Mount {
        fstype: "sysfs",
        target: "/sys",
        flags: MsFlags::MS_NOSUID
            .union(MsFlags::MS_NODEV)
            .union(MsFlags::MS_NOEXEC),
        data: None,
    },
    // The kernel may have mounted it already (CONFIG_DEVTMPFS_MOUNT).
    Mount {
        fstype: "devtmpfs",
        target: "/dev",
        flags: MsFlags::MS_NOSUID,
        data: Some("mode=0755"),
    },
    Mount {
        fstype: "devpts",
        target: "/dev/pts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    },
    Mount {
        fstype: "tmpfs",
        target: "/dev/shm",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=1777"),
    },
    Mount {
        fstype: "tmpfs",
        target: "/tmp",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=1777"),
    },
    Mount {
        fstype: "tmpfs",
        target: "/run",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=0755"),
    },
];

/// Mounts what programs expect. Returns what could not be done (already-mounted targets are
/// fine); nothing here is fatal, since a command may still run without it.
pub fn mount_all() -> Vec<String> {
    let mut problems = Vec::new();
    for m in MOUNTS {
        if let Err(e) = std::fs::create_dir_all(m.target) {
            problems.push(format!("{}: {e}", m.target));
            continue;
        }
        match mount(Some(m.fstype), m.target, Some(m.fstype), m.flags, m.data) {
            Ok(()) | Err(Errno::EBUSY) => {}
            Err(e) => problems.push(format!("mount {} on {}: {e}", m.fstype, m.target)),
        }
    }
    for (link, to) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
        ("/dev/ptmx", "pts/ptmx"),
    ] {
        if std::fs::symlink_metadata(link).is_err() {
            if let Err(e) = std::os::unix::fs::symlink(to, link) {
                problems.push(format!("{link}: {e}"));
            }
        }
    }
    problems
}

/// Sets up the guest as its init: mounts, hostname, `lo` and the `ip=` interface. Returns the
/// problems met, for the console.
pub fn start(config: &BootConfig) -> Vec<String> {
    let mut problems = mount_all();
    let hostname = config.hostname.as_deref().unwrap_or("vireo");
    if let Err(e) = nix::unistd::sethostname(hostname) {
        problems.push(format!("hostname {hostname}: {e}"));
    }
    if let Err(e) = crate::net::link_up("lo") {
        problems.push(format!("lo: {e}"));
    }
    if let Some(ip) = &config.ip {
        if Path::new("/sys/class/net").join(&ip.device).exists() {
            if let Err(e) = crate::net::configure(ip) {
                problems.push(format!("{}: {e}", ip.device));
            }
        } else {
            problems.push(format!("{}: no such network interface", ip.device));
        }
    }
    problems
}

/// The `PowerOff` request: syncs, answers, and powers the VM off (only as init).
pub(crate) fn power_off<S: Stream>(mut stream: S, init: bool) -> Result<(), FrameError> {
    if !init {
        return error_frame("PowerOff: the agent is not the guest's init".into())
            .write_to(&mut stream);
    }
    nix::unistd::sync();
    Frame::data(Kind::PowerOff, b"").write_to(&mut stream)?;
    drop(stream);
    let e = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    eprintln!("vireo-agent: power off failed: {e:?}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::Address;
    use std::net::Ipv4Addr;

    #[test]
    fn the_kernel_command_line_gives_hostname_and_address() {
        let c = BootConfig::parse(
            "console=ttyS0 ip=10.0.0.2::10.0.0.1:255.255.255.0:box:eth0:off root=/dev/vda",
        )
        .unwrap();
        assert_eq!(c.hostname.as_deref(), Some("box"));
        assert_eq!(
            c.ip,
            Some(Address {
                device: "eth0".into(),
                address: Ipv4Addr::new(10, 0, 0, 2),
                prefix: 24,
                gateway: Some(Ipv4Addr::new(10, 0, 0, 1)),
            })
        );
        let c = BootConfig::parse("vireo.hostname=sandbox ip=192.168.7.9::::::").unwrap();
        assert_eq!(c.hostname.as_deref(), Some("sandbox"));
        let ip = c.ip.unwrap();
        assert_eq!(
            (ip.device.as_str(), ip.prefix, ip.gateway),
            ("eth0", 24, None)
        );
        assert_eq!(BootConfig::parse("quiet").unwrap(), BootConfig::default());
        // Addresses the kernel would ask a server for are not the agent's to configure.
        assert_eq!(BootConfig::parse("ip=dhcp").unwrap().ip, None);
        let e = BootConfig::parse("ip=10.0.0.300").unwrap_err();
        assert!(e.contains("10.0.0.300"), "{e}");
        let e = BootConfig::parse("ip=10.0.0.2::10.0.0.1:255.0.255.0::eth0:off").unwrap_err();
        assert!(e.contains("255.0.255.0"), "{e}");
    }
}
