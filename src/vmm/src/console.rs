//! Connecting the guest's serial port to the host: stdout/stdin (with the terminal in raw
//! mode while attached), a file, or nothing.

use crate::config::SerialConfig;
use devices::bus::lock;
use devices::legacy::Serial;
use nix::sys::termios::{self, SetArg, Termios};
use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

/// What the console's input thread calls: reads from stdin (the serial port's interrupt and
/// the quit event are eventfd writes).
pub const SECCOMP: utils::seccomp::Allow = utils::seccomp::Allow {
    by: "the console's input thread",
    syscalls: &[libc::SYS_read],
    with_arg: &[],
};

/// What restoring the terminal calls on the VMM thread at the end.
pub const RESTORE_SECCOMP: utils::seccomp::Allow = utils::seccomp::Allow {
    by: "restoring the terminal",
    syscalls: &[],
    with_arg: &[
        utils::seccomp::libc_ioctl(libc::TCGETS),
        utils::seccomp::libc_ioctl(libc::TCSETS),
        utils::seccomp::libc_ioctl(libc::TCSETSW),
        utils::seccomp::libc_ioctl(libc::TCSETSF),
    ],
};

/// Ctrl-A: the escape key of the interactive console (Ctrl-A x quits, Ctrl-A Ctrl-A sends one
/// Ctrl-A), as in QEMU, so Ctrl-C can reach the guest.
pub const ESCAPE: u8 = 0x01;

/// Errors attaching the console.
#[derive(Debug, Error)]
pub enum Error {
    /// The serial output file cannot be created.
    #[error("cannot open serial output file {path}: {err}")]
    File {
        /// The file.
        path: PathBuf,
        /// Cause.
        err: std::io::Error,
    },
    /// The terminal cannot be switched to raw mode.
    #[error("cannot put the terminal in raw mode: {0}")]
    RawMode(nix::Error),
}

static SAVED_TERMIOS: Mutex<Option<Termios>> = Mutex::new(None);

/// Puts the terminal back as it was before vireo attached to it. Safe to call more than once
/// and from a panic hook.
pub fn restore_terminal() {
    let saved = SAVED_TERMIOS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    if let Some(t) = saved {
        let _ = termios::tcsetattr(std::io::stdin(), SetArg::TCSANOW, &t);
    }
}

/// The host side of the serial port while the VM runs. Dropping it restores the terminal.
pub struct Console {
    raw_mode: bool,
    /// What the input thread takes, until [`Console::start_input`] starts it.
    input: Option<(Arc<Mutex<Serial>>, EventFd)>,
}

impl Drop for Console {
    fn drop(&mut self) {
        if self.raw_mode {
            restore_terminal();
        }
    }
}

/// Where the UART's output goes for `cfg`.
pub fn output(cfg: &SerialConfig) -> Result<Box<dyn Write + Send>, Error> {
    Ok(match cfg {
        SerialConfig::Stdio => Box::new(std::io::stdout()),
        SerialConfig::File(path) => Box::new(utils::files::open_output(path, true).map_err(
            |err| Error::File {
                path: path.clone(),
                err,
            },
        )?),
        SerialConfig::None => Box::new(std::io::sink()),
    })
}

/// Starts feeding host input to the guest (for [`SerialConfig::Stdio`]); `quit` is signalled
/// when the user types the escape sequence.
pub fn attach(
    cfg: &SerialConfig,
    serial: Arc<Mutex<Serial>>,
    quit: EventFd,
) -> Result<Console, Error> {
    if *cfg != SerialConfig::Stdio {
        return Ok(Console {
            raw_mode: false,
            input: None,
        });
    }
    let stdin = std::io::stdin();
    let interactive = stdin.is_terminal();
    if interactive {
        let saved = termios::tcgetattr(&stdin).map_err(Error::RawMode)?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        *SAVED_TERMIOS.lock().unwrap_or_else(|e| e.into_inner()) = Some(saved);
        termios::tcsetattr(&stdin, SetArg::TCSANOW, &raw).map_err(Error::RawMode)?;
    }
    Ok(Console {
        raw_mode: interactive,
        input: Some((serial, quit)),
    })
}

impl Console {
    /// Starts the thread that feeds host input to the guest. The caller starts the vCPUs
    /// first, so that this thread (its filter's installation takes ~0.15 ms) does not hold a
    /// CPU a vCPU is waiting for on its way to the guest's first instruction.
    pub fn start_input(&mut self) {
        let Some((serial, quit)) = self.input.take() else {
            return;
        };
        // Input is a terminal exactly when attach put it in raw mode.
        let interactive = self.raw_mode;
        // Blocked in read() for the VM's whole life; it ends with the process.
        let filter = utils::seccomp::filter(utils::seccomp::ThreadKind::Console);
        let _ = std::thread::Builder::new()
            .name("serial-input".into())
            .stack_size(64 << 10)
            .spawn(move || {
                filter.install();
                input_loop(serial, quit, interactive)
            });
    }
}

fn input_loop(serial: Arc<Mutex<Serial>>, quit: EventFd, interactive: bool) {
    let mut stdin = std::io::stdin().lock();
    let mut buf = [0u8; 64];
    let mut escaped = false;
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        let mut bytes = Vec::with_capacity(n);
        for &b in &buf[..n] {
            if interactive && escaped {
                escaped = false;
                match b {
                    b'x' | b'X' => {
                        let _ = quit.write(1);
                        return;
                    }
                    ESCAPE => bytes.push(ESCAPE),
                    _ => {}
                }
            } else if interactive && b == ESCAPE {
                escaped = true;
            } else {
                bytes.push(b);
            }
        }
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            let taken = lock(&serial).enqueue_input(rest);
            rest = &rest[taken..];
            if !rest.is_empty() {
                // The guest has not drained its receive FIFO yet.
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}
