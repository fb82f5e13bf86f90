//! Running a command for the host: the agent's side ([`serve`]) and the host's ([`run`]), over
//! any byte stream (vsock in a VM, a Unix socket in tests).
//!
//! The agent answers `Hello`, then serves one `Exec`: the command's standard output and error
//! are read by a thread each and sent as frames as they come; frames from the host feed its
//! standard input, close it, or signal it; when both outputs are closed and the command has
//! been reaped, `Exited` ends the session.

use crate::children::Children;
use crate::proto::{
    ErrorMessage, Exec, Exited, Frame, FrameError, Hello, Kind, Resize, Signal, Started, MAX_DATA,
    VERSION,
};
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

/// A stream both sides can read and write from several threads.
pub trait Stream: Read + Write + Send + 'static {
    /// A second handle on the same stream.
    fn try_clone_stream(&self) -> std::io::Result<Self>
    where
        Self: Sized;
}

impl Stream for std::os::unix::net::UnixStream {
    fn try_clone_stream(&self) -> std::io::Result<Self> {
        self.try_clone()
    }
}

/// A connected socket of a family std has no type for (vsock).
impl Stream for File {
    fn try_clone_stream(&self) -> std::io::Result<Self> {
        self.try_clone()
    }
}

pub(crate) fn error_frame(message: String) -> Frame {
    Frame::json(Kind::Error, &ErrorMessage { message })
}

/// What sessions share: the agent's name, its children, and what it may do.
#[derive(Clone)]
pub struct Agent {
    /// Program and version, sent in `Hello`.
    pub software: String,
    /// The commands sessions started.
    pub children: Arc<Children>,
    /// The program that puts a command on a terminal (`vireo-agent --exec-on-tty`); without
    /// it, terminal requests are refused.
    pub tty_helper: Option<PathBuf>,
    /// Whether `PowerOff` is honoured (the agent is the guest's init).
    pub init: bool,
}

impl Agent {
    /// An agent whose sessions reap their own commands, without terminals (tests).
    pub fn plain(software: &str) -> Self {
        Self {
            software: software.into(),
            children: Children::new(),
            tty_helper: None,
            init: false,
        }
    }
}

/// Serves one session on `stream`: the greeting, then one request.
pub fn serve<S: Stream>(mut stream: S, agent: &Agent) -> Result<(), FrameError> {
    let hello = Frame::read_from(&mut stream)?;
    if hello.kind != Kind::Hello {
        error_frame("the session must start with Hello".into()).write_to(&mut stream)?;
        return Ok(());
    }
    let theirs: Hello = hello.parse()?;
    Frame::json(
        Kind::Hello,
        &Hello {
            version: VERSION,
            software: agent.software.clone(),
        },
    )
    .write_to(&mut stream)?;
    if theirs.version != VERSION {
        return Err(FrameError::Version(theirs.version));
    }
    let request = Frame::read_from(&mut stream)?;
    match request.kind {
        Kind::Exec => serve_exec(stream, &request, agent),
        Kind::CopyIn => crate::copy::serve_in(stream, &request),
        Kind::CopyOut => crate::copy::serve_out(stream, &request),
        Kind::PowerOff => crate::init::power_off(stream, agent.init),
        other => error_frame(format!(
            "expected Exec, CopyIn, CopyOut or PowerOff, got {other:?}"
        ))
        .write_to(&mut stream),
    }
}

/// Where a command's input goes and its output comes from.
enum Io {
    Pipes {
        stdin: Option<std::process::ChildStdin>,
    },
    Terminal {
        master: File,
    },
}

/// Runs the command `request` asks for and streams it until it ends.
fn serve_exec<S: Stream>(mut stream: S, request: &Frame, agent: &Agent) -> Result<(), FrameError> {
    let exec: Exec = match request.parse() {
        Ok(e) => e,
        Err(e) => return error_frame(e.to_string()).write_to(&mut stream),
    };
    let Some((program, args)) = exec.argv.split_first() else {
        return error_frame("Exec: argv is empty".into()).write_to(&mut stream);
    };
    let mut terminal = None;
    let mut cmd = match (exec.tty, &agent.tty_helper) {
        (None, _) => {
            let mut cmd = Command::new(program);
            cmd.args(args)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            if let Some(gid) = exec.gid {
                cmd.gid(gid);
            }
            if let Some(uid) = exec.uid {
                cmd.uid(uid);
            }
            cmd
        }
        (Some(_), None) => {
            return error_frame("Exec: this agent cannot open terminals".into())
                .write_to(&mut stream)
        }
        (Some((rows, cols)), Some(helper)) => {
            let (master, pts) = match crate::tty::open(rows, cols) {
                Ok(t) => t,
                Err(e) => {
                    return error_frame(format!("Exec: cannot open a terminal: {e}"))
                        .write_to(&mut stream)
                }
            };
            terminal = Some(master);
            // The helper makes the terminal its controlling one, then becomes the command.
            let mut cmd = Command::new(helper);
            cmd.arg("--exec-on-tty").arg(&pts);
            if let Some(uid) = exec.uid {
                cmd.arg("--uid").arg(uid.to_string());
            }
            if let Some(gid) = exec.gid {
                cmd.arg("--gid").arg(gid.to_string());
            }
            cmd.arg("--")
                .args(&exec.argv)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            cmd
        }
    };
    cmd.env_clear()
        .envs(&exec.env)
        .current_dir(exec.cwd.as_deref().unwrap_or("/"));
    let mut child = match agent.children.spawn(&mut cmd) {
        Ok(c) => c,
        Err(e) => {
            return error_frame(format!("cannot run {program}: {e}")).write_to(&mut stream);
        }
    };
    let pid = child.id();
    Frame::json(Kind::Started, &Started { pid }).write_to(&mut stream)?;
    // Output frames from two threads: one writer at a time.
    let out = Arc::new(Mutex::new(stream.try_clone_stream()?));
    let pump = |mut from: Box<dyn Read + Send>, kind: Kind| {
        let out = out.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; MAX_DATA];
            loop {
                match from.read(&mut buf) {
                    // A terminal's master reads EIO once the last holder of its other side
                    // has gone.
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        let mut w = out.lock().unwrap_or_else(|e| e.into_inner());
                        if Frame::data(kind, &buf[..n]).write_to(&mut *w).is_err() {
                            return;
                        }
                    }
                }
            }
        })
    };
    let (io, pumps) = match terminal {
        None => {
            let stdout = child.stdout.take().map(|o| pump(Box::new(o), Kind::Stdout));
            let stderr = child.stderr.take().map(|e| pump(Box::new(e), Kind::Stderr));
            (
                Io::Pipes {
                    stdin: child.stdin.take(),
                },
                vec![stdout, stderr],
            )
        }
        Some(master) => {
            let reader = master.try_clone()?;
            (
                Io::Terminal { master },
                vec![Some(pump(Box::new(reader), Kind::Stdout))],
            )
        }
    };
    drop(child);
    // The host's frames, until the command ends or the host goes away.
    let children = agent.children.clone();
    let mut reader = stream;
    let input = std::thread::spawn(move || {
        let mut io = io;
        while let Ok(f) = Frame::read_from(&mut reader) {
            match (f.kind, &mut io) {
                (Kind::Stdin, Io::Pipes { stdin }) => {
                    if let Some(i) = stdin.as_mut() {
                        if i.write_all(&f.payload).is_err() {
                            *stdin = None;
                        }
                    }
                }
                (Kind::Stdin, Io::Terminal { master }) => {
                    let _ = master.write_all(&f.payload);
                }
                (Kind::StdinClose, Io::Pipes { stdin }) => *stdin = None,
                // A terminal has no end of input but the end-of-file character.
                (Kind::StdinClose, Io::Terminal { master }) => {
                    let _ = master.write_all(&[4]);
                }
                (Kind::Signal, _) => {
                    if let Ok(s) = f.parse::<Signal>() {
                        children.signal(pid, s.signal);
                    }
                }
                (Kind::Resize, Io::Terminal { master }) => {
                    if let Ok(r) = f.parse::<Resize>() {
                        let _ = crate::tty::resize(master, r.rows, r.cols);
                    }
                }
                _ => {}
            }
        }
        // The host went away: the command is not left behind.
        children.signal(pid, nix::libc::SIGKILL);
    });
    let exited = agent.children.wait(pid);
    for t in pumps.into_iter().flatten() {
        let _ = t.join();
    }
    drop(input);
    let mut w = out.lock().unwrap_or_else(|e| e.into_inner());
    Frame::json(Kind::Exited, &exited).write_to(&mut *w)
}

/// The host's greeting, and the agent's checked.
pub(crate) fn greet<S: Stream>(stream: &mut S) -> Result<(), String> {
    let e = |e: FrameError| e.to_string();
    Frame::json(
        Kind::Hello,
        &Hello {
            version: VERSION,
            software: format!("vireo {}", env!("CARGO_PKG_VERSION")),
        },
    )
    .write_to(stream)
    .map_err(e)?;
    let hello = Frame::read_from(stream).map_err(e)?;
    if hello.kind != Kind::Hello {
        return Err(format!("the agent answered {:?} to Hello", hello.kind));
    }
    let theirs: Hello = hello.parse().map_err(e)?;
    if theirs.version != VERSION {
        return Err(format!(
            "the agent ({}) speaks protocol version {}, vireo {VERSION}",
            theirs.software, theirs.version
        ));
    }
    Ok(())
}

/// What the host sends while a command runs, besides its input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    /// Deliver this signal to the command.
    Signal(i32),
    /// The terminal is now this many rows and columns.
    Resize(u16, u16),
}

/// How a host-side request failed.
#[derive(Debug, PartialEq, Eq)]
pub enum RunError {
    /// The agent refused or could not run the command, and said why.
    Agent(String),
    /// The stream or the protocol failed.
    Transport(String),
}

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Agent(m) | Self::Transport(m) => f.write_str(m),
        }
    }
}

/// The host's side: greets the agent, runs `exec`, feeds it `stdin` (then closes its input)
/// and `controls`, writes what it prints to `stdout` and `stderr`, and returns how it ended.
pub fn run<S: Stream>(
    mut stream: S,
    exec: &Exec,
    mut stdin: impl Read + Send + 'static,
    controls: Option<std::sync::mpsc::Receiver<Control>>,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> Result<Exited, RunError> {
    let t = |e: FrameError| RunError::Transport(e.to_string());
    greet(&mut stream).map_err(RunError::Transport)?;
    Frame::json(Kind::Exec, exec)
        .write_to(&mut stream)
        .map_err(t)?;
    // Input and controls come from two threads: one writer at a time.
    let writer = Arc::new(Mutex::new(
        stream
            .try_clone_stream()
            .map_err(|x| RunError::Transport(x.to_string()))?,
    ));
    let send = move |w: &Mutex<S>, f: Frame| {
        let mut w = w.lock().unwrap_or_else(|e| e.into_inner());
        f.write_to(&mut *w).is_ok()
    };
    {
        let writer = writer.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; MAX_DATA];
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if !send(&writer, Frame::data(Kind::Stdin, &buf[..n])) {
                            return;
                        }
                    }
                }
            }
            send(&writer, Frame::data(Kind::StdinClose, b""));
        });
    }
    if let Some(controls) = controls {
        std::thread::spawn(move || {
            for c in controls {
                let f = match c {
                    Control::Signal(signal) => Frame::json(Kind::Signal, &Signal { signal }),
                    Control::Resize(rows, cols) => {
                        Frame::json(Kind::Resize, &Resize { rows, cols })
                    }
                };
                if !send(&writer, f) {
                    return;
                }
            }
        });
    }
    let io = |x: std::io::Error| RunError::Transport(x.to_string());
    loop {
        let f = Frame::read_from(&mut stream).map_err(t)?;
        match f.kind {
            Kind::Started => {}
            Kind::Stdout => {
                stdout.write_all(&f.payload).map_err(io)?;
                stdout.flush().map_err(io)?;
            }
            Kind::Stderr => {
                stderr.write_all(&f.payload).map_err(io)?;
                stderr.flush().map_err(io)?;
            }
            Kind::Exited => return f.parse().map_err(t),
            Kind::Error => {
                let m: ErrorMessage = f.parse().map_err(t)?;
                return Err(RunError::Agent(m.message));
            }
            other => {
                return Err(RunError::Transport(format!(
                    "unexpected {other:?} frame from the agent"
                )))
            }
        }
    }
}

/// The host's side of `PowerOff`: returns once the agent has synced and is powering off.
pub fn power_off<S: Stream>(mut stream: S) -> Result<(), RunError> {
    let t = |e: FrameError| RunError::Transport(e.to_string());
    greet(&mut stream).map_err(RunError::Transport)?;
    Frame::data(Kind::PowerOff, b"")
        .write_to(&mut stream)
        .map_err(t)?;
    let f = Frame::read_from(&mut stream).map_err(t)?;
    match f.kind {
        Kind::PowerOff => Ok(()),
        Kind::Error => Err(RunError::Agent(
            f.parse::<ErrorMessage>().map(|m| m.message).map_err(t)?,
        )),
        other => Err(RunError::Transport(format!(
            "unexpected {other:?} frame from the agent"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    /// The agent on one end of a socket pair, in a thread; the host's end.
    fn session() -> UnixStream {
        let (host, agent) = UnixStream::pair().unwrap();
        std::thread::spawn(move || {
            let _ = serve(agent, &Agent::plain("vireo-agent test"));
        });
        host
    }

    fn exec(argv: &[&str]) -> Exec {
        Exec {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: [("PATH".to_string(), "/usr/bin:/bin".to_string())].into(),
            ..Default::default()
        }
    }

    fn run_it(e: &Exec, input: &'static [u8]) -> (Result<Exited, RunError>, Vec<u8>, Vec<u8>) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let r = run(session(), e, input, None, &mut out, &mut err);
        (r, out, err)
    }

    #[test]
    fn output_streams_and_the_exit_status_come_back() {
        let (r, out, err) = run_it(&exec(&["sh", "-c", "echo hi; echo oops >&2; exit 3"]), b"");
        assert_eq!(
            r,
            Ok(Exited {
                code: Some(3),
                signal: None
            })
        );
        assert_eq!(out, b"hi\n");
        assert_eq!(err, b"oops\n");
    }

    #[test]
    fn standard_input_reaches_the_command_and_its_end_is_seen() {
        let (r, out, _) = run_it(&exec(&["cat"]), b"line one\nline two\n");
        assert_eq!(r.unwrap().code, Some(0));
        assert_eq!(out, b"line one\nline two\n");
    }

    #[test]
    fn environment_and_directory_are_the_requested_ones() {
        let mut e = exec(&["sh", "-c", "echo $GREETING; pwd"]);
        e.env.insert("GREETING".into(), "hello".into());
        e.cwd = Some("/tmp".into());
        let (r, out, _) = run_it(&e, b"");
        assert_eq!(r.unwrap().code, Some(0));
        assert_eq!(out, b"hello\n/tmp\n");
    }

    #[test]
    fn a_missing_command_and_bad_requests_are_errors() {
        let (r, _, _) = run_it(&exec(&["/no/such/program"]), b"");
        let e = r.unwrap_err().to_string();
        assert!(e.contains("cannot run /no/such/program"), "{e}");
        let (r, _, _) = run_it(&exec(&[]), b"");
        assert!(r.unwrap_err().to_string().contains("argv is empty"));
        let mut t = exec(&["true"]);
        t.tty = Some((24, 80));
        let (r, _, _) = run_it(&t, b"");
        assert!(r.unwrap_err().to_string().contains("cannot open terminals"));
    }

    /// A session running `sleep 30`, driven frame by frame: the host's end and the pid.
    fn started_sleep() -> (UnixStream, u32) {
        let mut host = session();
        greet(&mut host).unwrap();
        Frame::json(Kind::Exec, &exec(&["sleep", "30"]))
            .write_to(&mut host)
            .unwrap();
        let started = Frame::read_from(&mut host).unwrap();
        assert_eq!(started.kind, Kind::Started);
        let pid = started.parse::<Started>().unwrap().pid;
        (host, pid)
    }

    #[test]
    fn signals_are_forwarded() {
        let (mut host, _) = started_sleep();
        Frame::json(Kind::Signal, &Signal { signal: 15 })
            .write_to(&mut host)
            .unwrap();
        let f = Frame::read_from(&mut host).unwrap();
        assert_eq!(f.kind, Kind::Exited);
        assert_eq!(
            f.parse::<Exited>().unwrap(),
            Exited {
                code: None,
                signal: Some(15)
            }
        );
    }

    #[test]
    fn a_host_that_goes_away_takes_its_command_with_it() {
        let (host, pid) = started_sleep();
        drop(host);
        let end = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::path::Path::new(&format!("/proc/{pid}")).exists()
            && std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| !s.contains(") Z"))
        {
            assert!(
                std::time::Instant::now() < end,
                "the command outlived its host"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}
