//! Talking to the guest's agent (`vireo-agent`): `vireo exec` and `vireo cp`, and the
//! connection `vireo run --rootfs` uses.

use agent::exec::{Control, RunError};
use agent::proto::{Exec, Exited};
use clap::Args;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Exit status when vireo itself (not the command) failed: the agent could not be reached, or
/// the stream broke.
pub const EXIT_AGENT_FAILED: u8 = 125;
/// Exit status when the agent could not start the command (missing, not executable).
pub const EXIT_CANNOT_RUN: u8 = 127;

/// Where the guest's agent is reached.
#[derive(Args, Debug, Clone)]
pub struct AgentTarget {
    /// The API socket of the vireo running the VM; its vsock device's socket is used.
    #[arg(long, value_name = "PATH", required_unless_present_any = ["vsock", "agent_socket"])]
    pub api_sock: Option<PathBuf>,
    /// The VM's vsock Unix socket (`uds` of --vsock, `uds_path` of PUT /vsock).
    #[arg(long, value_name = "PATH", conflicts_with = "api_sock")]
    pub vsock: Option<PathBuf>,
    /// The agent's vsock port in the guest.
    #[arg(long, value_name = "N", default_value_t = agent::proto::PORT)]
    pub port: u32,
    /// The agent's own Unix socket (an agent run on the host with --listen unix:PATH, for tests).
    #[arg(long, value_name = "PATH", hide = true, conflicts_with_all = ["api_sock", "vsock"])]
    pub agent_socket: Option<PathBuf>,
}

/// Connects to guest port `port` through a vsock device's host socket `uds`, as Firecracker's
/// host side defines it: `CONNECT <port>\n`, answered `OK <host port>\n`.
pub fn vsock_connect(uds: &Path, port: u32) -> Result<UnixStream, String> {
    let mut s = UnixStream::connect(uds)
        .map_err(|e| format!("cannot connect to the vsock socket {}: {e}", uds.display()))?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(|e| format!("vsock socket {}: {e}", uds.display()))?;
    // Read the answer byte by byte: what follows it belongs to the agent's stream.
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 32 {
        match s.read(&mut byte) {
            Ok(1) if byte[0] == b'\n' => break,
            Ok(1) => line.push(byte[0]),
            _ => {
                return Err(format!(
                    "nothing listens on vsock port {port} in the guest (is vireo-agent running?)"
                ))
            }
        }
    }
    s.set_read_timeout(None).map_err(|e| e.to_string())?;
    if !line.starts_with(b"OK ") {
        return Err(format!(
            "vsock socket {}: unexpected answer {:?} to CONNECT",
            uds.display(),
            String::from_utf8_lossy(&line)
        ));
    }
    Ok(s)
}

/// The vsock socket of the VM served on `api_sock`, from its configuration.
fn vsock_of(api_sock: &Path) -> Result<PathBuf, String> {
    let (status, body) = api::client::request(api_sock, "GET", "/vm/config", "")?;
    if status != 200 {
        return Err(format!("GET /vm/config: HTTP {status}: {body}"));
    }
    let config: serde_json::Value =
        serde_json::from_str(&body).map_err(|e| format!("GET /vm/config: {e}"))?;
    config["vsock"]["uds_path"]
        .as_str()
        .map(PathBuf::from)
        .ok_or_else(|| {
            format!(
                "the VM on {} has no vsock device, so its agent cannot be reached",
                api_sock.display()
            )
        })
}

impl AgentTarget {
    /// A fresh connection to the agent (one per request).
    pub fn connect(&self) -> Result<UnixStream, String> {
        if let Some(path) = &self.agent_socket {
            return UnixStream::connect(path)
                .map_err(|e| format!("cannot connect to the agent at {}: {e}", path.display()));
        }
        let uds = match (&self.vsock, &self.api_sock) {
            (Some(v), _) => v.clone(),
            (None, Some(api)) => vsock_of(api)?,
            (None, None) => return Err("give --api-sock or --vsock".into()),
        };
        vsock_connect(&uds, self.port)
    }
}

#[derive(Args, Debug)]
pub struct ExecArgs {
    #[command(flatten)]
    target: AgentTarget,
    /// Run the command on a terminal (this one is put in raw mode meanwhile).
    #[arg(short = 't', long)]
    tty: bool,
    /// Set an environment variable: NAME=VALUE. Repeat for more. PATH has a default.
    #[arg(short = 'e', long = "env", value_name = "NAME=VALUE", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Working directory in the guest (default /).
    #[arg(short = 'w', long, value_name = "DIR")]
    workdir: Option<String>,
    /// Run as UID[:GID] (numbers).
    #[arg(short = 'u', long, value_name = "UID[:GID]", value_parser = parse_user)]
    user: Option<(u32, Option<u32>)>,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    argv: Vec<String>,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.into(), v.into())),
        _ => Err(format!("'{s}' is not NAME=VALUE")),
    }
}

fn parse_user(s: &str) -> Result<(u32, Option<u32>), String> {
    let num = |v: &str| {
        v.parse::<u32>()
            .map_err(|_| format!("'{v}' is not a numeric user or group ID"))
    };
    match s.split_once(':') {
        Some((u, g)) => Ok((num(u)?, Some(num(g)?))),
        None => Ok((num(s)?, None)),
    }
}

/// The PATH a command gets unless the user gives one.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The request `argv` with the user's environment over the defaults (PATH, HOME=/root, and
/// TERM on a terminal).
pub fn exec_request(argv: Vec<String>, env: &[(String, String)], tty: Option<(u16, u16)>) -> Exec {
    let mut e = Exec {
        argv,
        tty,
        ..Default::default()
    };
    e.env.insert("PATH".into(), DEFAULT_PATH.into());
    e.env.insert("HOME".into(), "/root".into());
    if tty.is_some() {
        let term = std::env::var("TERM").unwrap_or_else(|_| "xterm".into());
        e.env.insert("TERM".into(), term);
    }
    e.env.extend(env.iter().cloned());
    e
}

/// The exit status a shell would report for how the command ended.
pub fn exit_status(e: &Exited) -> u8 {
    match (e.code, e.signal) {
        (Some(c), _) => c as u8,
        (None, Some(s)) => 128u8.wrapping_add(s as u8),
        (None, None) => EXIT_AGENT_FAILED,
    }
}

/// Runs `exec` through `stream`, on this process's standard streams, forwarding the signals
/// a user sends to stop a command (and, on a terminal, its size). Returns the exit status.
pub fn run_command(stream: UnixStream, exec: &Exec) -> u8 {
    let (tx, rx) = std::sync::mpsc::channel();
    let raw = exec.tty.is_some().then(terminal::RawMode::enter).flatten();
    let forwarded = [
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
        signal_hook::consts::SIGQUIT,
        signal_hook::consts::SIGWINCH,
    ];
    if let Ok(mut signals) = signal_hook::iterator::Signals::new(forwarded) {
        std::thread::spawn(move || {
            for sig in signals.forever() {
                let c = if sig == signal_hook::consts::SIGWINCH {
                    match terminal::size() {
                        Some((rows, cols)) => Control::Resize(rows, cols),
                        None => continue,
                    }
                } else {
                    Control::Signal(sig)
                };
                if tx.send(c).is_err() {
                    return;
                }
            }
        });
    }
    let r = agent::exec::run(
        stream,
        exec,
        std::io::stdin(),
        Some(rx),
        &mut std::io::stdout(),
        &mut std::io::stderr(),
    );
    drop(raw);
    match r {
        Ok(exited) => exit_status(&exited),
        Err(RunError::Agent(m)) => {
            eprintln!("vireo: {m}");
            EXIT_CANNOT_RUN
        }
        Err(RunError::Transport(m)) => {
            eprintln!("vireo: the agent's stream failed: {m}");
            EXIT_AGENT_FAILED
        }
    }
}

/// The size for a guest terminal: this terminal's, else 24 by 80.
pub fn tty_size() -> (u16, u16) {
    terminal::size().unwrap_or((24, 80))
}

/// `vireo exec`.
pub fn exec(args: &ExecArgs) -> u8 {
    let stream = match args.target.connect() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("vireo: {e}");
            return EXIT_AGENT_FAILED;
        }
    };
    let tty = args.tty.then(|| terminal::size().unwrap_or((24, 80)));
    let mut request = exec_request(args.argv.clone(), &args.env, tty);
    request.cwd = args.workdir.clone();
    if let Some((uid, gid)) = args.user {
        request.uid = Some(uid);
        request.gid = gid;
        if uid != 0 && !args.env.iter().any(|(k, _)| k == "HOME") {
            request.env.insert("HOME".into(), "/".into());
        }
    }
    run_command(stream, &request)
}

#[derive(Args, Debug)]
pub struct CpArgs {
    #[command(flatten)]
    target: AgentTarget,
    /// What to copy: a host file, or `vm:PATH` for a file in the guest.
    #[arg(value_name = "SRC")]
    src: String,
    /// Where to: a host path, or `vm:PATH` (absolute) in the guest. Exactly one side is `vm:`.
    #[arg(value_name = "DST")]
    dst: String,
}

/// `vireo cp`.
pub fn cp(args: &CpArgs) -> u8 {
    match copy(args) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("vireo: {e}");
            1
        }
    }
}

fn copy(args: &CpArgs) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    match (args.src.strip_prefix("vm:"), args.dst.strip_prefix("vm:")) {
        (None, Some(to)) => {
            let meta = std::fs::metadata(&args.src).map_err(|e| format!("{}: {e}", args.src))?;
            if !meta.is_file() {
                return Err(format!("{}: not a regular file", args.src));
            }
            let mut f = std::fs::File::open(&args.src).map_err(|e| format!("{}: {e}", args.src))?;
            let mode = meta.permissions().mode() & 0o7777;
            // `vm:/dir/` names a directory: the file keeps its name there.
            let to = &match to.strip_suffix('/') {
                Some(dir) => format!("{dir}/{}", basename(&args.src)),
                None => to.to_string(),
            };
            agent::copy::copy_in(args.target.connect()?, to, mode, &mut f)
                .map_err(|e| format!("{} -> vm:{to}: {e}", args.src))?;
            Ok(())
        }
        (Some(from), None) => {
            let dst = if Path::new(&args.dst).is_dir() {
                Path::new(&args.dst).join(basename(from))
            } else {
                PathBuf::from(&args.dst)
            };
            let dst = dst.to_string_lossy();
            let tmp = format!("{dst}.vireo-cp");
            let mut f = std::fs::File::create(&tmp).map_err(|e| format!("{dst}: {e}"))?;
            // Written beside and renamed, so a failed copy leaves no partial file.
            let r = args
                .target
                .connect()
                .and_then(|s| agent::copy::copy_out(s, from, &mut f))
                .map_err(|e| format!("vm:{from} -> {dst}: {e}"))
                .and_then(|_| {
                    f.sync_all().map_err(|e| format!("{tmp}: {e}"))?;
                    std::fs::rename(&tmp, &*dst).map_err(|e| format!("{dst}: {e}"))
                });
            if r.is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
            r
        }
        _ => Err(format!(
            "cp {} {}: exactly one of the two must be a guest path (vm:PATH)",
            args.src, args.dst
        )),
    }
}

fn basename(path: &str) -> &str {
    path.trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or(path)
}

/// The user's terminal while a command runs on the guest's.
mod terminal {
    use rustix::termios::{tcgetattr, tcgetwinsize, tcsetattr, OptionalActions, Termios};

    /// The terminal's size (rows, columns), if standard input is one.
    pub fn size() -> Option<(u16, u16)> {
        let w = tcgetwinsize(std::io::stdin()).ok()?;
        Some((w.ws_row, w.ws_col))
    }

    /// Raw mode on standard input until dropped: keys go to the guest as typed.
    pub struct RawMode(Termios);

    impl RawMode {
        pub fn enter() -> Option<Self> {
            let saved = tcgetattr(std::io::stdin()).ok()?;
            let mut raw = saved.clone();
            raw.make_raw();
            tcsetattr(std::io::stdin(), OptionalActions::Flush, &raw).ok()?;
            Some(Self(saved))
        }
    }

    impl Drop for RawMode {
        fn drop(&mut self) {
            let _ = tcsetattr(std::io::stdin(), OptionalActions::Flush, &self.0);
        }
    }
}
