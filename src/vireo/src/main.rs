//! The `vireo` command: parses the command line into a VM configuration and runs it.

use clap::{Args, FromArgMatches, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use vmm::{DriveConfig, ExitReason, SerialConfig, VmConfig};

mod guest;
mod kit;
mod log;
mod seccomp;
mod telemetry;
use telemetry::ProcessTelemetry;

/// vireo: a microVM monitor on Linux KVM.
///
/// Boot a kernel directly with `vireo run`, or drive vireo like Firecracker: serve its HTTP API
/// on a Unix socket (`--api-sock`) and/or boot from a Firecracker config file (`--config-file`).
/// Firecracker's own command-line flags are accepted, so tools that exec `firecracker` can exec
/// vireo instead.
#[derive(Parser, Debug)]
#[command(name = "vireo", version, about)]
struct Cli {
    /// Log level for vireo's own messages on stderr: error, warn, info, debug or trace.
    #[arg(long, global = true, default_value = "warn", value_name = "LEVEL")]
    log_level: tracing::Level,
    /// Serve the Firecracker-compatible API on this Unix socket.
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
    /// Configure (and start) the VM from a Firecracker-format JSON config file.
    #[arg(long, value_name = "FILE")]
    config_file: Option<PathBuf>,
    /// With --config-file: boot without serving the API.
    #[arg(long)]
    no_api: bool,
    /// Instance ID reported by GET / (letters, digits and '-', at most 64).
    #[arg(long, value_name = "ID", default_value = "anonymous-instance", value_parser = parse_id)]
    id: String,
    #[command(flatten)]
    seccomp: SeccompFlags,
    #[command(flatten)]
    firecracker: FirecrackerFlags,
    #[command(subcommand)]
    command: Option<Command>,
}

/// How vireo's threads are confined (on by default; see the README's "Confinement").
#[derive(Args, Debug)]
#[command(next_help_heading = "Confinement")]
struct SeccompFlags {
    /// Run without seccomp filters (Firecracker's flag).
    #[arg(long, global = true)]
    no_seccomp: bool,
    /// Use the filters in this file, compiled by Firecracker's seccompiler-bin, instead of
    /// vireo's own (thread categories vmm, api, vcpu).
    #[arg(long, global = true, value_name = "FILE")]
    seccomp_filter: Option<PathBuf>,
    /// Let calls outside vireo's filters through and have the kernel log them (dmesg), to find
    /// a missing entry, instead of stopping with exit code 148.
    #[arg(long, global = true)]
    seccomp_log: bool,
}

/// Firecracker's flags that vireo's own interface names differently or not at all.
#[derive(Args, Debug)]
#[command(next_help_heading = "Firecracker's flags")]
struct FirecrackerFlags {
    /// Logger level (Error, Warning, Info, Debug, Trace, Off), as PUT /logger's `level`.
    #[arg(long, value_name = "LEVEL")]
    level: Option<String>,
    /// Log to this file or named pipe, as PUT /logger's `log_path`.
    #[arg(long, value_name = "PATH")]
    log_path: Option<String>,
    /// Put the level in each log line.
    #[arg(long)]
    show_level: bool,
    /// Put the source file and line in each log line.
    #[arg(long)]
    show_log_origin: bool,
    /// Only log messages from this module path.
    #[arg(long, value_name = "MODULE")]
    module: Option<String>,
    /// Write metrics to this file or named pipe, as PUT /metrics.
    #[arg(long, value_name = "PATH")]
    metrics_path: Option<String>,
    /// Largest API request body in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = api::DEFAULT_MAX_PAYLOAD)]
    http_api_max_payload_size: usize,
    /// Process start time in microseconds of CLOCK_MONOTONIC (passed by Firecracker's jailer).
    #[arg(long, value_name = "US")]
    start_time_us: Option<u64>,
    /// Process start CPU time in microseconds (passed by Firecracker's jailer).
    #[arg(long, value_name = "US")]
    start_time_cpu_us: Option<u64>,
    /// Parent process CPU time in microseconds (passed by Firecracker's jailer).
    #[arg(long, value_name = "US")]
    parent_cpu_time_us: Option<u64>,
    /// Not supported yet (boot timer device).
    #[arg(long)]
    boot_timer: bool,
    /// Largest MMDS data store in bytes (default: the API body limit).
    #[arg(long, value_name = "BYTES")]
    mmds_size_limit: Option<usize>,
    /// A JSON file to fill the MMDS data store with at start.
    #[arg(long, value_name = "PATH")]
    metadata: Option<PathBuf>,
    /// Not supported yet (snapshots).
    #[arg(long, value_name = "PATH")]
    describe_snapshot: Option<PathBuf>,
    /// Not supported yet (snapshots).
    #[arg(long)]
    snapshot_version: bool,
    /// Not supported yet (PCI).
    #[arg(long)]
    enable_pci: bool,
}

impl FirecrackerFlags {
    /// The first flag that asks for something vireo does not have, with the reason.
    fn unsupported(&self) -> Option<String> {
        let not_yet = [
            ("--boot-timer", self.boot_timer, "the boot timer device"),
            (
                "--describe-snapshot",
                self.describe_snapshot.is_some(),
                "snapshotting",
            ),
            ("--snapshot-version", self.snapshot_version, "snapshotting"),
            ("--enable-pci", self.enable_pci, "PCI"),
        ];
        not_yet
            .iter()
            .find(|(_, set, _)| *set)
            .map(|(flag, _, what)| format!("{flag}: {what} is not supported by vireo yet"))
    }

    /// `--level`, `--log-path`, `--show-level`, `--show-log-origin`, `--module` as PUT /logger.
    fn logger(&self) -> Option<vmm::resources::LoggerConfig> {
        let any = self.level.is_some()
            || self.log_path.is_some()
            || self.show_level
            || self.show_log_origin
            || self.module.is_some();
        any.then(|| vmm::resources::LoggerConfig {
            level: self.level.clone(),
            log_path: self.log_path.clone(),
            show_level: Some(self.show_level),
            show_log_origin: Some(self.show_log_origin),
            module: self.module.clone(),
        })
    }
}

/// Firecracker's rule for instance IDs.
fn parse_id(s: &str) -> Result<String, String> {
    if s.is_empty() || s.len() > 64 {
        return Err(format!("instance ID '{s}' must be 1 to 64 characters"));
    }
    if let Some(c) = s.chars().find(|c| !c.is_ascii_alphanumeric() && *c != '-') {
        return Err(format!(
            "instance ID '{s}': '{c}' is not allowed (letters, digits and '-' only)"
        ));
    }
    Ok(s.to_owned())
}

/// vireo's subcommands (their descriptions are in [`SUBCOMMANDS`]).
#[derive(Debug)]
enum Command {
    Run(Box<RunArgs>),
    Snapshot(SnapshotArgs),
    Restore(RestoreArgs),
    RebaseSnap(RebaseArgs),
    Exec(guest::ExecArgs),
    Cp(guest::CpArgs),
    Rootfs(kit::RootfsCommand),
}

/// What adds a subcommand's arguments to its `clap::Command`.
type AddArgs = fn(clap::Command) -> clap::Command;
/// What makes the [`Command`] from a subcommand's matches.
type FromMatches = fn(&mut clap::ArgMatches) -> Result<Command, clap::Error>;

/// Each subcommand's name, description, arguments and variant. The arguments are added only when that
/// subcommand is the one given (clap's `defer`): a Firecracker-style `vireo --api-sock PATH`
/// start, which waits on this parse before it binds its socket, builds none of them.
const SUBCOMMANDS: [(&str, &str, AddArgs, FromMatches); 7] = [
    (
        "run",
        "Boot a kernel and run it until the guest powers off or resets",
        args::<RunArgs>,
        |m| Ok(Command::Run(Box::new(RunArgs::from_arg_matches_mut(m)?))),
    ),
    (
        "snapshot",
        "Snapshot the VM of a running vireo (through its API socket) into a directory",
        args::<SnapshotArgs>,
        |m| Ok(Command::Snapshot(SnapshotArgs::from_arg_matches_mut(m)?)),
    ),
    (
        "restore",
        "Start a VM from a snapshot directory and run it until it ends",
        args::<RestoreArgs>,
        |m| Ok(Command::Restore(RestoreArgs::from_arg_matches_mut(m)?)),
    ),
    (
        "rebase-snap",
        "Merge a diff snapshot's memory file into the full memory file it was taken after, as \
         Firecracker's rebase-snap does; the state file of the diff then loads with it",
        args::<RebaseArgs>,
        |m| Ok(Command::RebaseSnap(RebaseArgs::from_arg_matches_mut(m)?)),
    ),
    (
        "exec",
        "Run a command in the guest through its agent (vireo-agent), with its output, input, \
         signals and exit status",
        args::<guest::ExecArgs>,
        |m| Ok(Command::Exec(guest::ExecArgs::from_arg_matches_mut(m)?)),
    ),
    (
        "cp",
        "Copy a file into (`vm:PATH` as DST) or out of (`vm:PATH` as SRC) the guest",
        args::<guest::CpArgs>,
        |m| Ok(Command::Cp(guest::CpArgs::from_arg_matches_mut(m)?)),
    ),
    (
        "rootfs",
        "Root file system images for Linux guests",
        |c| {
            <kit::RootfsCommand as Subcommand>::augment_subcommands(
                c.subcommand_required(true).arg_required_else_help(true),
            )
        },
        |m| {
            Ok(Command::Rootfs(kit::RootfsCommand::from_arg_matches_mut(
                m,
            )?))
        },
    ),
];

/// A subcommand's arguments, added when it is used; its description stays the one in
/// [`SUBCOMMANDS`] (an argument struct's own doc comment would otherwise replace it).
fn args<A: Args>(cmd: clap::Command) -> clap::Command {
    let about = cmd.get_about().cloned();
    let cmd = A::augment_args(cmd);
    match about {
        Some(about) => cmd.about(about),
        None => cmd,
    }
}

impl Subcommand for Command {
    fn augment_subcommands(mut cmd: clap::Command) -> clap::Command {
        for (name, about, args, _) in SUBCOMMANDS {
            cmd = cmd.subcommand(clap::Command::new(name).about(about).defer(args));
        }
        cmd
    }

    fn augment_subcommands_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_subcommands(cmd)
    }

    fn has_subcommand(name: &str) -> bool {
        SUBCOMMANDS.iter().any(|(n, ..)| *n == name)
    }
}

impl FromArgMatches for Command {
    fn from_arg_matches(matches: &clap::ArgMatches) -> Result<Self, clap::Error> {
        Self::from_arg_matches_mut(&mut matches.clone())
    }

    fn from_arg_matches_mut(matches: &mut clap::ArgMatches) -> Result<Self, clap::Error> {
        use clap::error::ErrorKind;
        let Some((name, mut m)) = matches.remove_subcommand() else {
            return Err(clap::Error::raw(
                ErrorKind::MissingSubcommand,
                "a subcommand is required",
            ));
        };
        match SUBCOMMANDS.iter().find(|(n, ..)| *n == name) {
            Some((.., make)) => make(&mut m),
            None => Err(clap::Error::raw(
                ErrorKind::InvalidSubcommand,
                format!("unknown subcommand '{name}'"),
            )),
        }
    }

    fn update_from_arg_matches(&mut self, matches: &clap::ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(matches)?;
        Ok(())
    }
}

/// File names inside a snapshot directory.
const SNAPSHOT_STATE: &str = "state";
const SNAPSHOT_MEMORY: &str = "memory";

#[derive(Args, Debug)]
struct SnapshotArgs {
    /// The API socket of the vireo (or Firecracker) running the VM.
    #[arg(long, value_name = "PATH")]
    api_sock: PathBuf,
    /// Directory to write `state` and `memory` into (created if missing).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Write only the memory written since the previous snapshot (needs track_dirty_pages).
    #[arg(long)]
    diff: bool,
    /// Leave the VM paused afterwards (by default it runs on).
    #[arg(long)]
    leave_paused: bool,
}

#[derive(Args, Debug)]
struct RestoreArgs {
    /// Snapshot directory (with `state` and `memory`), as `vireo snapshot` writes it.
    #[arg(long, value_name = "DIR")]
    snapshot: PathBuf,
    /// Keep the VM paused until resumed through the API (needs --api-sock).
    #[arg(long)]
    paused: bool,
    /// Serve the API on this Unix socket (to pause, snapshot again or stop the VM).
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
    /// Where the serial console goes: stdio or file:PATH.
    #[arg(long, value_name = "WHERE", default_value = "stdio", value_parser = parse_serial)]
    serial: SerialConfig,
    /// Use another TAP for a network interface: ID=TAP. Repeat for more.
    #[arg(long = "net-override", value_name = "ID=TAP", value_parser = parse_override)]
    net_overrides: Vec<(String, String)>,
    /// Use another Unix socket path for the vsock device.
    #[arg(long, value_name = "PATH")]
    vsock_override: Option<PathBuf>,
    /// Log written pages so that diff snapshots can follow.
    #[arg(long)]
    track_dirty_pages: bool,
    /// Move the guest's clock on by the real time since the snapshot.
    #[arg(long)]
    clock_realtime: bool,
}

#[derive(Args, Debug)]
struct RebaseArgs {
    /// The full memory file, updated in place. No VM may be running from it.
    #[arg(long, value_name = "PATH")]
    base_file: PathBuf,
    /// The diff snapshot's memory file.
    #[arg(long, value_name = "PATH")]
    diff_file: PathBuf,
}

#[derive(Args, Debug, Clone)]
struct RunArgs {
    /// Kernel image: ELF vmlinux (PVH note or 64-bit entry) or bzImage. With --rootfs it
    /// defaults to the one scripts/build-kernel.sh builds.
    #[arg(long, value_name = "PATH", required_unless_present = "rootfs")]
    kernel: Option<PathBuf>,
    /// Boot Linux on a root file system made from this directory or OCI image (cached, keyed
    /// by content), run the command after `--` in it through vireo-agent, power off, and exit
    /// with the command's status.
    #[arg(long, value_name = "DIR_OR_IMAGE", requires = "command")]
    rootfs: Option<PathBuf>,
    /// With --rootfs: the vireo-agent to install (a static build).
    #[arg(long, value_name = "PATH", requires = "rootfs")]
    agent: Option<PathBuf>,
    /// With --rootfs: run the command on a terminal.
    #[arg(short = 't', long, requires = "rootfs")]
    tty: bool,
    /// With --rootfs: how long, in seconds, the guest may take to boot and answer.
    #[arg(long, value_name = "S", default_value_t = 30, requires = "rootfs")]
    boot_timeout: u64,
    /// Give the guest KVM's in-kernel 8254 PIT, as Firecracker always does. vireo leaves it out
    /// by default, as Cloud Hypervisor does: Linux with kvmclock and the TSC-deadline LAPIC timer
    /// never uses it, and KVM's teardown of it costs every VM about 15 ms at exit on Linux 6.18
    /// hosts. Guests that calibrate or tick with the PIT need it.
    #[arg(long, conflicts_with = "no_pit")]
    pit: bool,
    /// Leave out the PIT: the default, kept for scripts that name it.
    #[arg(long)]
    no_pit: bool,
    /// With --rootfs: the command to run in the guest.
    #[arg(last = true, value_name = "CMD", requires = "rootfs")]
    command: Vec<String>,
    /// Initial ramdisk loaded for the kernel.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STR", default_value = vmm::DEFAULT_CMDLINE)]
    cmdline: String,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    cpus: u32,
    /// Guest memory: MIB[,huge_pages=None|Transparent|2M][,merge=on]. 2M backs it with the
    /// host's 2 MiB huge pages (reserved at start); merge=on lets the kernel's same-page merging
    /// share identical pages between VMs (see the README for the side channel that opens).
    #[arg(long, value_name = "SPEC", default_value = "128", value_parser = parse_memory)]
    memory: MemorySpec,
    /// Where the serial console goes: stdio, file:PATH or none.
    #[arg(long, value_name = "WHERE", default_value = "stdio", value_parser = parse_serial)]
    serial: SerialConfig,
    /// A virtio-blk drive: path=IMG[,id=ID][,readonly=on][,root=on][,bw=SIZE/MS][,ops=SIZE/MS]
    /// [,io_engine=sync|async]. Repeat for more drives; the guest sees them as /dev/vda,
    /// /dev/vdb, ... in this order.
    #[arg(long = "drive", value_name = "SPEC", value_parser = parse_drive)]
    drives: Vec<DriveConfig>,
    /// Give the guest a virtio-rng entropy device fed by the host's getrandom.
    #[arg(long)]
    rng: bool,
    /// Limit the serial console's output: bw=SIZE/MS[+BURST],ops=SIZE/MS[+BURST]; output beyond
    /// the limits is dropped and counted.
    #[arg(long, value_name = "LIMITS", value_parser = parse_limits)]
    serial_limit: Option<devices::rate_limiter::RateLimiterConfig>,
    /// Limit the entropy device's bytes and requests: bw=SIZE/MS[+BURST],ops=SIZE/MS[+BURST]
    /// (implies --rng).
    #[arg(long, value_name = "LIMITS", value_parser = parse_limits)]
    rng_limit: Option<devices::rate_limiter::RateLimiterConfig>,
    /// A virtio-net interface on an existing host TAP:
    /// tap=NAME[,mac=AA:BB:CC:DD:EE:FF][,id=ID][,mtu=N], or fd=N for a TAP already opened (with
    /// IFF_VNET_HDR) and handed down. Repeat for more (eth0, eth1, ...). Without mac= the guest
    /// picks a random address.
    #[arg(long = "net", value_name = "SPEC", value_parser = parse_net)]
    nets: Vec<PartialNet>,
    /// A virtio-vsock device: cid=N,uds=PATH. Host programs connect to the Unix socket PATH
    /// and write `CONNECT <port>`; guest connections to host port P reach `PATH_P`.
    #[arg(long, value_name = "SPEC", value_parser = parse_vsock)]
    vsock: Option<vmm::config::VsockConfig>,
    /// A virtio-balloon device:
    /// size_mib=N[,deflate_on_oom=on][,stats_period_s=S][,reporting=on]. The guest gives N MiB
    /// back to the host; with stats_period_s it reports its memory statistics every S seconds;
    /// with reporting=on the host releases the free pages the guest reports.
    #[arg(long, value_name = "SPEC", value_parser = parse_balloon)]
    balloon: Option<devices::virtio::balloon::BalloonConfig>,
    /// Memory hotplug (a virtio-mem device):
    /// total_mib=N[,slot_mib=S][,block_mib=B][,requested_mib=R]. A region of N MiB after RAM
    /// (slots of S MiB, default 128; blocks of B MiB, default 2), of which the guest is asked
    /// to plug R MiB from boot.
    #[arg(long, value_name = "SPEC", value_parser = parse_hotplug)]
    memory_hotplug: Option<vmm::config::HotplugConfig>,
}

/// `total_mib=N[,slot_mib=S][,block_mib=B][,requested_mib=R]`.
fn parse_hotplug(s: &str) -> Result<vmm::config::HotplugConfig, String> {
    let mut h = vmm::config::HotplugConfig {
        total_mib: 0,
        slot_mib: 128,
        block_mib: 2,
        requested_mib: 0,
    };
    for item in s.split(',') {
        let (key, v) = item.split_once('=').unwrap_or((item, ""));
        let slot = match key {
            "total_mib" => &mut h.total_mib,
            "slot_mib" => &mut h.slot_mib,
            "block_mib" => &mut h.block_mib,
            "requested_mib" => &mut h.requested_mib,
            _ => {
                return Err(format!(
                    "'{item}' is not a memory hotplug option: use total_mib=N[,slot_mib=S][,block_mib=B][,requested_mib=R]"
                ))
            }
        };
        *slot = v
            .parse()
            .map_err(|_| format!("{key}={v}: expected a number of MiB"))?;
    }
    if h.total_mib == 0 {
        return Err("memory hotplug needs total_mib=N".into());
    }
    Ok(h)
}

/// `size_mib=N[,deflate_on_oom=on][,stats_period_s=S][,reporting=on]`.
fn parse_balloon(s: &str) -> Result<devices::virtio::balloon::BalloonConfig, String> {
    let mut b = devices::virtio::balloon::BalloonConfig::default();
    let mut size = false;
    for item in s.split(',') {
        match item.split_once('=') {
            Some(("size_mib", v)) => {
                b.amount_mib = v
                    .parse()
                    .map_err(|_| format!("size_mib={v}: expected a number of MiB"))?;
                size = true;
            }
            Some(("deflate_on_oom", v)) => b.deflate_on_oom = parse_on_off("deflate_on_oom", v)?,
            Some(("stats_period_s", v)) => {
                b.stats_polling_interval_s = v.parse().map_err(|_| {
                    format!("stats_period_s={v}: expected seconds from 0 to 65535")
                })?
            }
            Some(("reporting", v)) => b.free_page_reporting = parse_on_off("reporting", v)?,
            _ => {
                return Err(format!(
                    "'{item}' is not a balloon option: use size_mib=N[,deflate_on_oom=on][,stats_period_s=S][,reporting=on]"
                ))
            }
        }
    }
    if !size {
        return Err("the balloon needs size_mib=N (0 for an empty balloon)".into());
    }
    Ok(b)
}

/// `cid=N,uds=PATH`.
fn parse_vsock(s: &str) -> Result<vmm::config::VsockConfig, String> {
    let (mut cid, mut uds) = (None, None);
    for item in s.split(',') {
        match item.split_once('=') {
            Some(("cid", v)) => {
                cid = Some(
                    v.parse::<u64>()
                        .map_err(|_| format!("cid={v}: expected a number"))?,
                )
            }
            Some(("uds", "")) => return Err("uds= needs a path".into()),
            Some(("uds", v)) => uds = Some(PathBuf::from(v)),
            _ => {
                return Err(format!(
                    "'{item}' is not a vsock option: use cid=N,uds=PATH"
                ))
            }
        }
    }
    let (Some(cid), Some(uds)) = (cid, uds) else {
        return Err("vsock needs cid=N and uds=PATH".into());
    };
    vmm::config::check_cid(cid)?;
    Ok(vmm::config::VsockConfig { cid, uds })
}

/// A `--net` value before its default ID (`eth<N>`, by position) is known.
#[derive(Clone, Debug)]
struct PartialNet {
    id: Option<String>,
    tap: String,
    fd: Option<i32>,
    mac: Option<[u8; 6]>,
    mtu: Option<u16>,
    rx_limit: devices::rate_limiter::RateLimiterConfig,
    tx_limit: devices::rate_limiter::RateLimiterConfig,
}

/// `tap=NAME[,mac=AA:BB:CC:DD:EE:FF][,id=ID][,mtu=N]`; a bare first item is taken as the TAP.
fn parse_net(s: &str) -> Result<PartialNet, String> {
    let mut net = PartialNet {
        id: None,
        tap: String::new(),
        fd: None,
        mac: None,
        mtu: None,
        rx_limit: Default::default(),
        tx_limit: Default::default(),
    };
    for (i, item) in s.split(',').enumerate() {
        match item.split_once('=') {
            Some(("tap", v)) => net.tap = v.to_owned(),
            Some(("fd", v)) => {
                let fd: i32 = v
                    .parse()
                    .ok()
                    .filter(|fd| *fd > 2)
                    .ok_or_else(|| format!("fd={v}: expected an open TAP descriptor number above 2"))?;
                net.fd = Some(fd);
                net.tap = format!("fd{fd}");
            }
            Some(("id", "")) => return Err("id= needs a value: the interface's ID".into()),
            Some(("id", v)) => net.id = Some(v.to_owned()),
            Some(("mac", v)) => net.mac = Some(vmm::config::parse_mac(v)?),
            Some(("mtu", v)) => {
                let mtu: u32 = v
                    .parse()
                    .map_err(|_| format!("mtu={v}: expected a number from 68 to 65535"))?;
                if !vmm::config::MTU_RANGE.contains(&mtu) {
                    return Err(format!("mtu={v}: expected a number from 68 to 65535"));
                }
                net.mtu = Some(mtu as u16);
            }
            Some(("rx_bw", v)) => net.rx_limit.bandwidth = Some(parse_bucket("rx_bw", v)?),
            Some(("rx_ops", v)) => net.rx_limit.ops = Some(parse_bucket("rx_ops", v)?),
            Some(("tx_bw", v)) => net.tx_limit.bandwidth = Some(parse_bucket("tx_bw", v)?),
            Some(("tx_ops", v)) => net.tx_limit.ops = Some(parse_bucket("tx_ops", v)?),
            None if i == 0 => net.tap = item.to_owned(),
            _ => {
                return Err(format!(
                    "'{item}' is not a network option: use tap=NAME|fd=N[,mac=AA:BB:CC:DD:EE:FF][,id=ID][,mtu=N][,rx_bw=SIZE/MS][,rx_ops=SIZE/MS][,tx_bw=SIZE/MS][,tx_ops=SIZE/MS]"
                ))
            }
        }
    }
    if net.tap.is_empty() {
        return Err(
            "a network interface needs tap=NAME (an existing TAP device) or fd=N (an open one)"
                .into(),
        );
    }
    Ok(net)
}

fn parse_on_off(key: &str, v: &str) -> Result<bool, String> {
    match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(format!("{key}={v}: expected on or off")),
    }
}

/// `--memory`.
#[derive(Clone, Debug)]
struct MemorySpec {
    mib: u64,
    huge_pages: vmm::config::HugePages,
    merge: bool,
}

/// `MIB[,huge_pages=None|Transparent|2M][,merge=on]`.
fn parse_memory(s: &str) -> Result<MemorySpec, String> {
    let mut items = s.split(',');
    let size = items.next().unwrap_or_default();
    let mut spec = MemorySpec {
        mib: size
            .parse()
            .map_err(|_| format!("'{size}' is not a memory size in MiB"))?,
        huge_pages: vmm::config::HugePages::None,
        merge: false,
    };
    for item in items {
        match item.split_once('=') {
            Some(("huge_pages", v)) => spec.huge_pages = vmm::config::HugePages::parse(v)?,
            Some(("merge", v)) => spec.merge = parse_on_off("merge", v)?,
            _ => {
                return Err(format!(
                    "'{item}' is not a memory option: use MIB[,huge_pages=None|Transparent|2M][,merge=on]"
                ))
            }
        }
    }
    Ok(spec)
}

/// A token bucket on the command line: `SIZE/MS[+BURST]` (SIZE tokens refilled every MS ms,
/// plus a one-time burst), as Firecracker's `size`, `refill_time` and `one_time_burst`.
fn parse_bucket(key: &str, v: &str) -> Result<devices::rate_limiter::TokenBucketConfig, String> {
    let bad = || format!("{key}={v}: expected SIZE/MS[+BURST], e.g. {key}=1048576/100");
    let (size, rest) = v.split_once('/').ok_or_else(bad)?;
    let (ms, burst) = match rest.split_once('+') {
        Some((ms, b)) => (ms, Some(b.parse().map_err(|_| bad())?)),
        None => (rest, None),
    };
    Ok(devices::rate_limiter::TokenBucketConfig {
        size: size.parse().map_err(|_| bad())?,
        one_time_burst: burst,
        refill_time: ms.parse().map_err(|_| bad())?,
    })
}

/// `bw=SIZE/MS[+BURST][,ops=SIZE/MS[+BURST]]` (either may be left out).
fn parse_limits(s: &str) -> Result<devices::rate_limiter::RateLimiterConfig, String> {
    let mut limits = devices::rate_limiter::RateLimiterConfig::default();
    for item in s.split(',') {
        match item.split_once('=') {
            Some(("bw", v)) => limits.bandwidth = Some(parse_bucket("bw", v)?),
            Some(("ops", v)) => limits.ops = Some(parse_bucket("ops", v)?),
            _ => {
                return Err(format!(
                    "'{item}' is not a limit: use bw=SIZE/MS[+BURST],ops=SIZE/MS[+BURST]"
                ))
            }
        }
    }
    Ok(limits)
}

/// `path=IMG[,id=ID][,readonly=on][,root=on][,bw=SIZE/MS][,ops=SIZE/MS][,io_engine=E]`; a bare
/// first item is
/// taken as the path.
fn parse_drive(s: &str) -> Result<DriveConfig, String> {
    let mut drive = DriveConfig {
        path: PathBuf::new(),
        id: None,
        read_only: false,
        root: false,
        rate_limiter: Default::default(),
        io_engine: Default::default(),
    };
    for (i, item) in s.split(',').enumerate() {
        match item.split_once('=') {
            Some(("path", v)) => drive.path = PathBuf::from(v),
            Some(("id", "")) => return Err("id= needs a value: the drive's ID".into()),
            Some(("id", v)) => drive.id = Some(v.to_owned()),
            Some(("readonly", v)) => drive.read_only = parse_on_off("readonly", v)?,
            Some(("root", v)) => drive.root = parse_on_off("root", v)?,
            Some(("bw", v)) => drive.rate_limiter.bandwidth = Some(parse_bucket("bw", v)?),
            Some(("ops", v)) => drive.rate_limiter.ops = Some(parse_bucket("ops", v)?),
            Some(("io_engine", v)) => drive.io_engine = v.parse()?,
            None if i == 0 => drive.path = PathBuf::from(item),
            _ => {
                return Err(format!(
                    "'{item}' is not a drive option: use path=IMG[,id=ID][,readonly=on][,root=on][,bw=SIZE/MS][,ops=SIZE/MS][,io_engine=sync|async]"
                ))
            }
        }
    }
    if drive.path.as_os_str().is_empty() {
        return Err("a drive needs path=IMG".into());
    }
    Ok(drive)
}

fn parse_serial(s: &str) -> Result<SerialConfig, String> {
    match s {
        "stdio" => Ok(SerialConfig::Stdio),
        "none" => Ok(SerialConfig::None),
        _ => match s.strip_prefix("file:") {
            Some("") => Err("file: needs a path, as in file:/tmp/console.log".into()),
            Some(p) => Ok(SerialConfig::File(PathBuf::from(p))),
            None => Err(format!(
                "'{s}' is not a serial destination: use stdio, file:PATH or none"
            )),
        },
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (sink, level) = telemetry::init_logging(cli.log_level);
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        vmm::console::restore_terminal();
        default_hook(info);
    }));

    let vm_runs = matches!(
        cli.command,
        None | Some(Command::Run(_)) | Some(Command::Restore(_))
    );
    if vm_runs {
        let sc = &cli.seccomp;
        if let Err(e) = seccomp::setup(sc.no_seccomp, sc.seccomp_filter.as_deref(), sc.seccomp_log)
        {
            eprintln!("vireo: error: {e}");
            return ExitCode::from(vmm::EXIT_CODE_ERROR as u8);
        }
    }
    match &cli.command {
        None => ExitCode::from(control_plane(
            &cli,
            ProcessTelemetry::new(cli.id.clone(), sink, level, cli.log_level),
            None,
        ) as u8),
        Some(Command::Restore(args)) => ExitCode::from(control_plane(
            &cli,
            ProcessTelemetry::new(cli.id.clone(), sink, level, cli.log_level),
            Some(args),
        ) as u8),
        Some(Command::Snapshot(args)) => ExitCode::from(snapshot(args) as u8),
        Some(Command::Exec(args)) => ExitCode::from(guest::exec(args)),
        Some(Command::Cp(args)) => ExitCode::from(guest::cp(args)),
        Some(Command::Rootfs(cmd)) => ExitCode::from(kit::rootfs(cmd)),
        Some(Command::RebaseSnap(args)) => {
            match vmm::persist::rebase(&args.base_file, &args.diff_file) {
                Ok(pages) => {
                    println!(
                        "merged {pages} pages of {} into {}",
                        args.diff_file.display(),
                        args.base_file.display()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("vireo: error: {e}");
                    ExitCode::from(vmm::EXIT_CODE_ERROR as u8)
                }
            }
        }
        Some(Command::Run(args)) => {
            let args = args.clone();
            let kernel_given = args.kernel.is_some();
            let config = VmConfig {
                kernel: args.kernel.unwrap_or_default(),
                initrd: args.initrd,
                cmdline: args.cmdline,
                vcpus: args.cpus,
                mem_mib: args.memory.mib,
                huge_pages: args.memory.huge_pages,
                merge: args.memory.merge,
                serial: args.serial,
                drives: args.drives,
                serial_rate_limiter: args.serial_limit.unwrap_or_default(),
                rng: args.rng || args.rng_limit.is_some(),
                rng_rate_limiter: args.rng_limit.unwrap_or_default(),
                balloon: args.balloon,
                hotplug: args.memory_hotplug,
                track_dirty_pages: false,
                pit: args.pit,
                cpu_template: None,
                nets: args
                    .nets
                    .into_iter()
                    .enumerate()
                    .map(|(n, p)| vmm::NetConfig {
                        id: p.id.unwrap_or_else(|| format!("eth{n}")),
                        tap: p.tap,
                        tap_fd: p.fd,
                        mac: p.mac,
                        mtu: p.mtu,
                        mmds: false,
                        rx_rate_limiter: p.rx_limit,
                        tx_rate_limiter: p.tx_limit,
                    })
                    .collect(),
                mmds: None,
                vsock: args.vsock,
            };
            if let Some(src) = args.rootfs {
                let r = kit::RootfsRun {
                    src,
                    agent: args.agent,
                    argv: args.command,
                    tty: args.tty,
                    boot_timeout: std::time::Duration::from_secs(args.boot_timeout),
                };
                return ExitCode::from(kit::run(config, kernel_given, &r));
            }
            let code = match vmm::run(&config) {
                Ok(reason) => {
                    report(&reason);
                    reason.exit_code()
                }
                Err(e) => {
                    eprintln!("vireo: error: {e}");
                    vmm::EXIT_CODE_ERROR
                }
            };
            ExitCode::from(code as u8)
        }
    }
}

fn report(reason: &ExitReason) {
    let code = reason.exit_code();
    match reason {
        ExitReason::PowerOff(v) => tracing::info!("VM ended: the guest powered off (value {v:#x})"),
        ExitReason::Reset => tracing::info!("VM ended: the guest reset"),
        ExitReason::TripleFault(regs) => {
            eprintln!("vireo: guest triple fault (exit code {code})\n{regs}")
        }
        ExitReason::InternalError(detail) => {
            eprintln!("vireo: KVM internal error (exit code {code}): {detail}")
        }
        ExitReason::FailedEntry(detail) => {
            eprintln!("vireo: KVM failed to enter the guest (exit code {code}): {detail}")
        }
        ExitReason::VcpuError(detail) => {
            eprintln!("vireo: vCPU failure (exit code {code}): {detail}")
        }
        ExitReason::Signal(sig) => eprintln!("vireo: stopped by signal {sig} (exit code {code})"),
        ExitReason::ConsoleQuit => eprintln!("vireo: quit from the console (exit code {code})"),
    }
}

/// Largest config file read: far above any real configuration, far below what hurts.
const CONFIG_FILE_MAX: u64 = 1 << 20;

/// Reads a JSON file the user names (config file, MMDS metadata): a regular file of at most
/// [`CONFIG_FILE_MAX`] bytes.
fn read_json_file<T: serde::de::DeserializeOwned>(
    what: &str,
    path: &std::path::Path,
) -> Result<T, String> {
    use std::io::Read;
    let name = path.display();
    let meta = std::fs::metadata(path).map_err(|e| format!("{what} {name}: {e}"))?;
    if !meta.is_file() {
        return Err(format!(
            "{what} {name} is not a regular file (it is {})",
            utils::files::file_kind(&meta)
        ));
    }
    // Opened the way every input is (non-blocking, checked again once open), so that a path
    // swapped for a FIFO after the check above cannot hang start-up.
    let file = utils::files::open_input(path, utils::files::Kind::Regular, false)
        .map_err(|e| format!("{what} {name}: {e}"))?;
    let mut bytes = Vec::new();
    file.take(CONFIG_FILE_MAX + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read {what} {name}: {e}"))?;
    if bytes.len() as u64 > CONFIG_FILE_MAX {
        return Err(format!(
            "{what} {name} is larger than {CONFIG_FILE_MAX} bytes"
        ));
    }
    serde_json::from_slice(&bytes).map_err(|e| format!("{what} {name} is not valid: {e}"))
}

/// Reads a Firecracker config file: a regular file of at most [`CONFIG_FILE_MAX`] bytes.
fn read_config_file(
    path: &std::path::Path,
    mmds_limit: usize,
) -> Result<vmm::resources::VmResources, String> {
    let cfg: vmm::resources::ConfigFile = read_json_file("config file", path)?;
    cfg.into_resources(mmds_limit)
        .map_err(|e| format!("config file {}: {e}", path.display()))
}

/// The Firecracker-style routes: API socket and/or config file, one shared controller.
/// `ID=TAP` of `--net-override`.
fn parse_override(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((id, tap)) if !id.is_empty() && !tap.is_empty() => Ok((id.into(), tap.into())),
        _ => Err(format!("'{s}' is not ID=TAP")),
    }
}

/// `vireo snapshot`: pause, create, resume, through the API of a running VMM.
fn snapshot(args: &SnapshotArgs) -> i32 {
    if let Err(e) = std::fs::create_dir_all(&args.out) {
        eprintln!("vireo: error: cannot create {}: {e}", args.out.display());
        return vmm::EXIT_CODE_ERROR;
    }
    let body = serde_json::json!({
        "snapshot_type": if args.diff { "Diff" } else { "Full" },
        "snapshot_path": args.out.join(SNAPSHOT_STATE),
        "mem_file_path": args.out.join(SNAPSHOT_MEMORY),
    })
    .to_string();
    let mut steps = vec![
        ("PATCH", "/vm", r#"{"state":"Paused"}"#.to_string()),
        ("PUT", "/snapshot/create", body),
    ];
    if !args.leave_paused {
        steps.push(("PATCH", "/vm", r#"{"state":"Resumed"}"#.to_string()));
    }
    for (method, path, body) in steps {
        match api::client::request(&args.api_sock, method, path, &body) {
            Ok((status, _)) if status < 300 => {}
            Ok((status, answer)) => {
                let msg = serde_json::from_str::<serde_json::Value>(&answer)
                    .ok()
                    .and_then(|v| v["fault_message"].as_str().map(str::to_owned))
                    .unwrap_or(answer);
                eprintln!("vireo: error: {method} {path}: {status}: {msg}");
                return vmm::EXIT_CODE_ERROR;
            }
            Err(e) => {
                eprintln!("vireo: error: {e}");
                return vmm::EXIT_CODE_ERROR;
            }
        }
    }
    0
}

fn control_plane(cli: &Cli, mut telemetry: ProcessTelemetry, restore: Option<&RestoreArgs>) -> i32 {
    use vmm::controller::{serve, Controller, RequestQueue, Telemetry, VmmAction};
    use vmm::resources::{ActionType, MetricsConfig, VmResources};
    let fc = &cli.firecracker;
    if let Some(msg) = fc.unsupported() {
        eprintln!("vireo: error: {msg}");
        return vmm::EXIT_CODE_ERROR;
    }
    let api_sock = match restore {
        Some(r) => r.api_sock.as_ref(),
        None => cli.api_sock.as_ref(),
    };
    if let Some(r) = restore {
        if r.paused && r.api_sock.is_none() {
            eprintln!("vireo: error: --paused needs --api-sock, or nothing could resume the VM");
            return 2;
        }
        if cli.config_file.is_some() {
            eprintln!("vireo: error: a restored VM takes its configuration from the snapshot, not --config-file");
            return 2;
        }
    } else if cli.api_sock.is_none() && !(cli.config_file.is_some() && cli.no_api) {
        eprintln!(
            "vireo: error: give --api-sock PATH, --config-file FILE [--no-api], or the run subcommand (see --help)"
        );
        return 2;
    }
    if cli.no_api && cli.api_sock.is_some() {
        eprintln!("vireo: error: --no-api and --api-sock contradict each other");
        return 2;
    }
    telemetry.set_startup_times(
        fc.start_time_us,
        fc.start_time_cpu_us,
        fc.parent_cpu_time_us,
    );
    let mmds_limit = fc.mmds_size_limit.unwrap_or(fc.http_api_max_payload_size);
    let mut resources = match &cli.config_file {
        None => VmResources {
            mmds: vmm::config::MmdsHandle::new(mmds_limit),
            ..Default::default()
        },
        Some(path) => match read_config_file(path, mmds_limit) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("vireo: error: {e}");
                return vmm::EXIT_CODE_ERROR;
            }
        },
    };
    if let Some(path) = &fc.metadata {
        let data = read_json_file::<serde_json::Value>("metadata file", path).and_then(|v| {
            devices::virtio::net::mmds::lock(&resources.mmds.0)
                .put(v)
                .map_err(|e| format!("metadata file {}: {e}", path.display()))
        });
        if let Err(e) = data {
            eprintln!("vireo: error: {e}");
            return vmm::EXIT_CODE_ERROR;
        }
    }
    // Flags first, then the config file's objects, as Firecracker applies them.
    if resources.logger.is_none() {
        resources.logger = fc.logger();
    }
    if resources.metrics.is_none() {
        resources.metrics = fc.metrics_path.clone().map(|metrics_path| MetricsConfig {
            metrics_path,
            emit_id: None,
        });
    }
    if let Some(l) = &resources.logger {
        if let Err(e) = telemetry.configure_logger(l) {
            eprintln!("vireo: error: logger: {e}");
            return vmm::EXIT_CODE_ERROR;
        }
    }
    if let Some(m) = &resources.metrics {
        if let Err(e) = telemetry.configure_metrics(m) {
            eprintln!("vireo: error: metrics: {e}");
            return vmm::EXIT_CODE_ERROR;
        }
    }
    if let Some(r) = restore {
        if let SerialConfig::File(p) = &r.serial {
            resources.serial = Some(vmm::resources::SerialDevice {
                serial_out_path: Some(p.display().to_string()),
                rate_limiter: None,
            });
        }
    }
    let on_reject = telemetry.reject_hook();
    let mut controller = Controller::new(cli.id.clone(), resources, Box::new(telemetry));
    let (tx, rx) = std::sync::mpsc::channel();
    let notify = match vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("vireo: error: cannot create an eventfd: {e}");
            return vmm::EXIT_CODE_ERROR;
        }
    };
    // Signals are caught before the socket exists, so that no signal can leave it behind.
    let signal = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for sig in vmm::STOP_SIGNALS {
        if let Err(e) = signal_hook::flag::register_usize(sig, signal.clone(), sig as usize) {
            eprintln!("vireo: error: cannot handle signal {sig}: {e}");
            return vmm::EXIT_CODE_ERROR;
        }
    }
    let _server = match api_sock {
        Some(path) => {
            let notify_api = match notify.try_clone() {
                Ok(n) => n,
                Err(e) => {
                    eprintln!("vireo: error: cannot create an eventfd: {e}");
                    return vmm::EXIT_CODE_ERROR;
                }
            };
            let options = api::ServerOptions {
                max_payload: fc.http_api_max_payload_size,
                on_reject,
            };
            match api::ApiServer::start(path, tx.clone(), notify_api, options) {
                Ok(s) => Some(s),
                Err(e) => {
                    eprintln!("vireo: error: {e}");
                    return vmm::EXIT_CODE_ERROR;
                }
            }
        }
        None => None,
    };
    if let Some(r) = restore {
        let load = vmm::resources::SnapshotLoadParams {
            snapshot_path: r.snapshot.join(SNAPSHOT_STATE).display().to_string(),
            mem_backend: Some(vmm::resources::MemoryBackend {
                backend_type: vmm::resources::MemoryBackendType::File,
                backend_path: r.snapshot.join(SNAPSHOT_MEMORY).display().to_string(),
            }),
            mem_file_path: None,
            enable_diff_snapshots: false,
            track_dirty_pages: r.track_dirty_pages,
            resume_vm: !r.paused,
            network_overrides: r
                .net_overrides
                .iter()
                .map(|(id, tap)| vmm::resources::NetworkOverride {
                    iface_id: id.clone(),
                    host_dev_name: tap.clone(),
                })
                .collect(),
            vsock_override: r
                .vsock_override
                .as_ref()
                .map(|p| vmm::resources::VsockOverride {
                    uds_path: p.display().to_string(),
                }),
            clock_realtime: r.clock_realtime,
            huge_pages: None,
        };
        if let Err(e) = controller.handle(VmmAction::LoadSnapshot(load)) {
            eprintln!("vireo: error: {e}");
            return vmm::EXIT_CODE_ERROR;
        }
    }
    if cli.config_file.is_some() {
        if let Err(e) = controller.handle(VmmAction::Action(ActionType::InstanceStart)) {
            eprintln!("vireo: error: {e}");
            return vmm::EXIT_CODE_ERROR;
        }
    }
    let queue = RequestQueue {
        requests: rx,
        notify,
    };
    // Keep a sender so the queue never reports closed while the VM runs without an API.
    let _keep = tx;
    match serve(&mut controller, &queue, &signal) {
        Some(reason) => {
            report(&reason);
            reason.exit_code()
        }
        None => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// clap's own consistency checks: `debug_assert` builds every subcommand, the deferred
    /// ones included.
    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    /// Every subcommand in the table parses into its own variant, with its arguments.
    #[test]
    fn each_subcommand_reaches_its_variant() {
        let parse = |args: &[&str]| {
            let mut argv = vec!["vireo"];
            argv.extend_from_slice(args);
            Cli::try_parse_from(argv).map(|c| c.command)
        };
        assert!(matches!(parse(&["--api-sock", "a"]), Ok(None)));
        assert!(matches!(
            parse(&["run", "--kernel", "k", "--memory", "64"]),
            Ok(Some(Command::Run(r))) if r.memory.mib == 64
        ));
        assert!(matches!(
            parse(&["snapshot", "--api-sock", "a", "--out", "d"]),
            Ok(Some(Command::Snapshot(_)))
        ));
        assert!(matches!(
            parse(&["restore", "--snapshot", "d"]),
            Ok(Some(Command::Restore(_)))
        ));
        assert!(matches!(
            parse(&["rebase-snap", "--base-file", "b", "--diff-file", "d"]),
            Ok(Some(Command::RebaseSnap(_)))
        ));
        assert!(matches!(
            parse(&["exec", "--api-sock", "a", "--", "true"]),
            Ok(Some(Command::Exec(_)))
        ));
        assert!(matches!(
            parse(&["cp", "--api-sock", "a", "x", "vm:/y"]),
            Ok(Some(Command::Cp(_)))
        ));
        assert!(matches!(
            parse(&["rootfs", "build", "dir"]),
            Ok(Some(Command::Rootfs(_)))
        ));
        for (name, ..) in SUBCOMMANDS {
            let err = parse(&[name, "--help"]).expect_err("help");
            assert_eq!(err.kind(), clap::error::ErrorKind::DisplayHelp, "{name}");
        }
        let err = parse(&["run", "--no-such-flag"]).expect_err("refused");
        assert_eq!(err.kind(), clap::error::ErrorKind::UnknownArgument);
    }
}
