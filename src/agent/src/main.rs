//! `vireo-agent`: serves vireo inside the guest, as its init (PID 1) or as a service under the
//! image's own init.

use agent::children::Children;
use agent::exec::{serve, Agent};
use agent::init::BootConfig;
use clap::Parser;
use nix::sys::socket::{
    bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, VsockAddr,
};
use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(name = "vireo-agent", version, about)]
struct Cli {
    /// Where to listen: `vsock:PORT` (in a VM) or `unix:PATH` (tests run the agent on a host).
    #[arg(long, default_value_t = format!("vsock:{}", agent::proto::PORT))]
    listen: String,
    /// Read the kernel command line from this file instead of /proc/cmdline (tests).
    #[arg(long, hide = true)]
    cmdline_file: Option<PathBuf>,
    /// Put the command after `--` on this terminal as its controlling one (used by the agent
    /// itself for `vireo exec -t`).
    #[arg(long, hide = true, requires = "argv")]
    exec_on_tty: Option<String>,
    #[arg(long, hide = true)]
    uid: Option<u32>,
    #[arg(long, hide = true)]
    gid: Option<u32>,
    #[arg(last = true, hide = true)]
    argv: Vec<String>,
}

/// The agent's own options (with their values) among `args`, without the words the kernel
/// passed on from its command line.
fn own_arguments(mut args: impl Iterator<Item = String>) -> Vec<String> {
    let mut own: Vec<String> = args.next().into_iter().collect();
    while let Some(a) = args.next() {
        if a.starts_with("--listen") || a.starts_with("--cmdline-file") {
            if !a.contains('=') {
                if let Some(v) = args.next() {
                    own.extend([a, v]);
                }
                continue;
            }
            own.push(a);
        } else {
            eprintln!("vireo-agent: ignoring {a:?} (passed on by the kernel)");
        }
    }
    own
}

enum Listener {
    Vsock(OwnedFd),
    Unix(UnixListener),
}

fn listener(spec: &str) -> Result<Listener, String> {
    if let Some(port) = spec.strip_prefix("vsock:") {
        let port: u32 = port
            .parse()
            .map_err(|_| format!("--listen {spec}: {port} is not a port number"))?;
        let fd = socket(
            AddressFamily::Vsock,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(|e| format!("vsock socket: {e} (is virtio-vsock in this kernel?)"))?;
        bind(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            &VsockAddr::new(libc_vmaddr_cid_any(), port),
        )
        .map_err(|e| format!("vsock port {port}: {e}"))?;
        listen(&fd, Backlog::new(16).unwrap_or(Backlog::MAXCONN))
            .map_err(|e| format!("vsock port {port}: {e}"))?;
        Ok(Listener::Vsock(fd))
    } else if let Some(path) = spec.strip_prefix("unix:") {
        let _ = std::fs::remove_file(path);
        UnixListener::bind(path)
            .map(Listener::Unix)
            .map_err(|e| format!("{path}: {e}"))
    } else {
        Err(format!("--listen {spec}: expected vsock:PORT or unix:PATH"))
    }
}

/// VMADDR_CID_ANY: accept connections to any of the guest's CIDs.
fn libc_vmaddr_cid_any() -> u32 {
    u32::MAX
}

fn main() -> ExitCode {
    let init = std::process::id() == 1;
    // As init, the kernel hands over the command line's words it does not know as arguments:
    // they are not the agent's, and an init that exits takes the kernel down with it.
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(_) if init => Cli::parse_from(own_arguments(std::env::args())),
        Err(e) => e.exit(),
    };
    if let Some(pts) = &cli.exec_on_tty {
        let why = agent::tty::exec_on(pts, cli.uid, cli.gid, &cli.argv);
        // Said on the terminal, where the user looks.
        if let Ok(mut t) = std::fs::OpenOptions::new().write(true).open(pts) {
            let _ = std::io::Write::write_all(&mut t, format!("vireo-agent: {why}\r\n").as_bytes());
        }
        eprintln!("vireo-agent: {why}");
        return ExitCode::from(127);
    }
    if let Err(e) = run(&cli, init) {
        eprintln!("vireo-agent: {e}");
        if init {
            // An init that exits panics the kernel; power off instead so the VMM exits.
            nix::unistd::sync();
            let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
        }
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

fn run(cli: &Cli, init: bool) -> Result<(), String> {
    let children = if init {
        let cmdline_file = cli
            .cmdline_file
            .clone()
            .unwrap_or_else(|| "/proc/cmdline".into());
        // /proc is not mounted yet: mount first, then read the command line.
        let mut problems = agent::init::mount_all();
        let cmdline = std::fs::read_to_string(&cmdline_file)
            .map_err(|e| format!("{}: {e}", cmdline_file.display()))?;
        match BootConfig::parse(&cmdline) {
            Ok(config) => problems.extend(agent::init::start(&config)),
            Err(e) => problems.push(e),
        }
        for p in problems {
            eprintln!("vireo-agent: {p}");
        }
        Children::with_reaper().map_err(|e| format!("reaper thread: {e}"))?
    } else {
        Children::new()
    };
    let agent = Agent {
        software: format!("vireo-agent {}", env!("CARGO_PKG_VERSION")),
        children,
        tty_helper: std::env::current_exe().ok(),
        init,
    };
    let listener = listener(&cli.listen)?;
    eprintln!("vireo-agent: listening on {}", cli.listen);
    loop {
        let agent = agent.clone();
        match &listener {
            Listener::Vsock(fd) => {
                let conn = match rustix::net::accept(fd) {
                    Ok(c) => File::from(c),
                    Err(e) => {
                        eprintln!("vireo-agent: accept: {e}");
                        continue;
                    }
                };
                std::thread::spawn(move || session(conn, &agent));
            }
            Listener::Unix(l) => match l.accept() {
                Ok((conn, _)) => {
                    std::thread::spawn(move || session(conn, &agent));
                }
                Err(e) => eprintln!("vireo-agent: accept: {e}"),
            },
        }
    }
}

fn session<S: agent::exec::Stream>(conn: S, agent: &Agent) {
    if let Err(e) = serve(conn, agent) {
        eprintln!("vireo-agent: session: {e}");
    }
}
