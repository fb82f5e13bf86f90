//! Pseudo-terminals for commands run with a terminal.

use rustix::pty::{grantpt, openpt, ptsname, unlockpt, OpenptFlags};
use rustix::termios::{tcsetwinsize, Winsize};
use std::fs::{File, OpenOptions};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;

/// Opens a pseudo-terminal of `rows` by `cols`: its master side and the path of the other.
pub fn open(rows: u16, cols: u16) -> std::io::Result<(File, PathBuf)> {
    let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)?;
    grantpt(&master)?;
    unlockpt(&master)?;
    let name = ptsname(&master, Vec::new())?;
    let master = File::from(master);
    resize(&master, rows, cols)?;
    Ok((master, PathBuf::from(name.to_string_lossy().into_owned())))
}

/// Tells the terminal (and so the command, by SIGWINCH) its new size.
pub fn resize(master: &File, rows: u16, cols: u16) -> std::io::Result<()> {
    let size = Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    Ok(tcsetwinsize(master, size)?)
}

/// The helper's work (`vireo-agent --exec-on-tty PTS ... -- ARGV`): a new session whose
/// controlling terminal is `pts`, then `argv` on it. Returns only if that fails.
pub fn exec_on(pts: &str, uid: Option<u32>, gid: Option<u32>, argv: &[String]) -> String {
    let Some((program, args)) = argv.split_first() else {
        return "no command given".into();
    };
    if let Err(e) = rustix::process::setsid() {
        return format!("setsid: {e}");
    }
    // A session leader without a terminal that opens one gets it as its controlling terminal.
    let open = || OpenOptions::new().read(true).write(true).open(pts);
    let (i, o, e) = match (open(), open(), open()) {
        (Ok(i), Ok(o), Ok(e)) => (i, o, e),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => return format!("{pts}: {e}"),
    };
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(i).stdout(o).stderr(e);
    if let Some(gid) = gid {
        cmd.gid(gid);
    }
    if let Some(uid) = uid {
        cmd.uid(uid);
    }
    format!("cannot run {program}: {}", cmd.exec())
}
