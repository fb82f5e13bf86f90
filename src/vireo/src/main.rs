//! The `vireo` command: parses the command line into a VM configuration and runs it.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use vmm::{DriveConfig, ExitReason, SerialConfig, VmConfig};

/// vireo: a microVM monitor on Linux KVM.
#[derive(Parser, Debug)]
#[command(name = "vireo", version, about)]
struct Cli {
    /// Log level for vireo's own messages on stderr: error, warn, info, debug or trace.
    #[arg(long, global = true, default_value = "warn", value_name = "LEVEL")]
    log_level: tracing::Level,
    #[command(subcommand)]
    command: Command,
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
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(cli.log_level)
        .with_target(false)
        .init();
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        vmm::console::restore_terminal();
        default_hook(info);
    }));

    match cli.command {
        Command::Run(args) => {
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
