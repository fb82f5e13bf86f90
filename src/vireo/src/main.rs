//! The `vireo` command: parses the command line into a VM configuration and runs it.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use vmm::{DriveConfig, ExitReason, SerialConfig, VmConfig};

mod telemetry;
use telemetry::ProcessTelemetry;

/// vireo: a microVM monitor on Linux KVM.
///
/// Boot a kernel directly with `vireo run`, or drive vireo like Firecracker: serve its HTTP API
/// on a Unix socket (`--api-sock`) and/or boot from a Firecracker config file (`--config-file`).
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
    /// Instance ID reported by GET /.
    #[arg(long, value_name = "ID", default_value = "anonymous-instance")]
    id: String,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot a kernel and run it until the guest powers off or resets.
    Run(RunArgs),
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Kernel image: ELF vmlinux (PVH note or 64-bit entry) or bzImage.
    #[arg(long, value_name = "PATH")]
    kernel: PathBuf,
    /// Initial ramdisk loaded for the kernel.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STR", default_value = vmm::DEFAULT_CMDLINE)]
    cmdline: String,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    cpus: u32,
    /// Guest memory in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 128)]
    memory: u64,
    /// Where the serial console goes: stdio, file:PATH or none.
    #[arg(long, value_name = "WHERE", default_value = "stdio", value_parser = parse_serial)]
    serial: SerialConfig,
    /// A virtio-blk drive: path=IMG[,id=ID][,readonly=on][,root=on]. Repeat for more drives;
    /// the guest sees them as /dev/vda, /dev/vdb, ... in this order.
    #[arg(long = "drive", value_name = "SPEC", value_parser = parse_drive)]
    drives: Vec<DriveConfig>,
    /// Give the guest a virtio-rng entropy device fed by the host's getrandom.
    #[arg(long)]
    rng: bool,
}

fn parse_on_off(key: &str, v: &str) -> Result<bool, String> {
    match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(format!("{key}={v}: expected on or off")),
    }
}

/// `path=IMG[,id=ID][,readonly=on][,root=on]`; a bare first item is taken as the path.
fn parse_drive(s: &str) -> Result<DriveConfig, String> {
    let mut drive = DriveConfig {
        path: PathBuf::new(),
        id: None,
        read_only: false,
        root: false,
    };
    for (i, item) in s.split(',').enumerate() {
        match item.split_once('=') {
            Some(("path", v)) => drive.path = PathBuf::from(v),
            Some(("id", v)) => drive.id = Some(v.to_owned()),
            Some(("readonly", v)) => drive.read_only = parse_on_off("readonly", v)?,
            Some(("root", v)) => drive.root = parse_on_off("root", v)?,
            None if i == 0 => drive.path = PathBuf::from(item),
            _ => {
                return Err(format!(
                    "'{item}' is not a drive option: use path=IMG[,id=ID][,readonly=on][,root=on]"
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

    match cli.command {
        None => ExitCode::from(control_plane(
            &cli,
            ProcessTelemetry::new(sink, level, cli.log_level),
        ) as u8),
        Some(Command::Run(args)) => {
            let config = VmConfig {
                kernel: args.kernel,
                initrd: args.initrd,
                cmdline: args.cmdline,
                vcpus: args.cpus,
                mem_mib: args.memory,
                serial: args.serial,
                drives: args.drives,
                rng: args.rng,
            };
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
        ExitReason::PowerOff(v) => tracing::info!("guest powered off (value {v:#x})"),
        ExitReason::Reset => tracing::info!("guest reset"),
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

/// The Firecracker-style routes: API socket and/or config file, one shared controller.
fn control_plane(cli: &Cli, telemetry: ProcessTelemetry) -> i32 {
    use vmm::controller::{serve, Controller, RequestQueue, VmmAction};
    use vmm::resources::{ActionType, ConfigFile, VmResources};
    if cli.api_sock.is_none() && !(cli.config_file.is_some() && cli.no_api) {
        eprintln!(
            "vireo: error: give --api-sock PATH, --config-file FILE [--no-api], or the run subcommand (see --help)"
        );
        return 2;
    }
    if cli.no_api && cli.api_sock.is_some() {
        eprintln!("vireo: error: --no-api and --api-sock contradict each other");
        return 2;
    }
    let resources = match &cli.config_file {
        None => VmResources::default(),
        Some(path) => {
            let parsed = std::fs::read(path)
                .map_err(|e| format!("cannot read config file {}: {e}", path.display()))
                .and_then(|bytes| {
                    serde_json::from_slice::<ConfigFile>(&bytes)
                        .map_err(|e| format!("config file {} is not valid: {e}", path.display()))
                })
                .and_then(|cfg| {
                    cfg.into_resources()
                        .map_err(|e| format!("config file {}: {e}", path.display()))
                });
            match parsed {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("vireo: error: {e}");
                    return vmm::EXIT_CODE_ERROR;
                }
            }
        }
    };
    let mut telemetry = telemetry;
    if let Some(l) = &resources.logger {
        if let Err(e) = vmm::controller::Telemetry::configure_logger(&mut telemetry, l) {
            eprintln!("vireo: error: logger: {e}");
            return vmm::EXIT_CODE_ERROR;
        }
    }
    if let Some(m) = &resources.metrics {
        if let Err(e) = vmm::controller::Telemetry::configure_metrics(&mut telemetry, m) {
            eprintln!("vireo: error: metrics: {e}");
            return vmm::EXIT_CODE_ERROR;
        }
    }
    let mut controller = Controller::new(cli.id.clone(), resources, Box::new(telemetry));
    let (tx, rx) = std::sync::mpsc::channel();
    let notify = match vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("vireo: error: cannot create an eventfd: {e}");
            return vmm::EXIT_CODE_ERROR;
        }
    };
    let _server = match &cli.api_sock {
        Some(path) => {
            let notify_api = match notify.try_clone() {
                Ok(n) => n,
                Err(e) => {
                    eprintln!("vireo: error: cannot create an eventfd: {e}");
                    return vmm::EXIT_CODE_ERROR;
                }
            };
            match api::ApiServer::start(path, tx.clone(), notify_api) {
                Ok(s) => Some(s),
                Err(e) => {
                    eprintln!("vireo: error: {e}");
                    return vmm::EXIT_CODE_ERROR;
                }
            }
        }
        None => None,
    };
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
    let signal = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for sig in [libc::SIGINT, libc::SIGTERM] {
        if let Err(e) = signal_hook::flag::register_usize(sig, signal.clone(), sig as usize) {
            eprintln!("vireo: error: cannot handle signal {sig}: {e}");
            return vmm::EXIT_CODE_ERROR;
        }
    }
    match serve(&mut controller, &queue, &signal) {
        Some(reason) => {
            report(&reason);
            reason.exit_code()
        }
        None => 0,
    }
}
