//! Opening the files a user names, without ever blocking the VMM: every path is checked for
//! what it is before it is opened, and what may be a FIFO is opened non-blocking.

use std::fs::{File, Metadata, OpenOptions};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// What kind of file `meta` describes, in words for error messages.
pub fn file_kind(meta: &Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_file() {
        "a regular file"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a named pipe"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_char_device() {
        "a character device"
    } else {
        "not a regular file"
    }
}

/// Which kinds of file an input may be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Kernel, initrd, config file: a regular file.
    Regular,
    /// Drive image: a regular file or a block device.
    Image,
}

fn allowed(kind: Kind, meta: &Metadata) -> bool {
    let t = meta.file_type();
    t.is_file() || (kind == Kind::Image && t.is_block_device())
}

fn refusal(kind: Kind, meta: &Metadata) -> std::io::Error {
    let want = match kind {
        Kind::Regular => "a regular file",
        Kind::Image => "a regular file or a block device",
    };
    std::io::Error::other(format!("it is {}, not {want}", file_kind(meta)))
}

/// What opening a user-named file calls: the checks of what it is, the open, and the file
/// status flag changes.
pub const OPEN_SECCOMP: crate::seccomp::Allow = crate::seccomp::Allow {
    by: "opening user-named files",
    syscalls: &[
        libc::SYS_statx,
        libc::SYS_newfstatat,
        libc::SYS_fstat,
        libc::SYS_openat,
        libc::SYS_fcntl,
        // musl's names for the same on x86_64.
        libc::SYS_open,
        libc::SYS_stat,
        libc::SYS_lstat,
    ],
    with_arg: &[],
};

/// Opens an input file of `kind` (read-only, or read-write when `write`), refusing anything
/// else before it is opened. The open itself is non-blocking, and the opened file is checked
/// again, so a path swapped for a FIFO between the two checks cannot block either. Once it is
/// known to be a regular file or a block device the file is made blocking again: io_uring
/// would otherwise end a read of uncached data with EAGAIN instead of waiting for the disk.
pub fn open_input(path: &Path, kind: Kind, write: bool) -> std::io::Result<File> {
    let meta = std::fs::metadata(path)?;
    if !allowed(kind, &meta) {
        return Err(refusal(kind, &meta));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let meta = file.metadata()?;
    if !allowed(kind, &meta) {
        return Err(refusal(kind, &meta));
    }
    let flags = rustix::fs::fcntl_getfl(&file)?;
    rustix::fs::fcntl_setfl(&file, flags - rustix::fs::OFlags::NONBLOCK)?;
    Ok(file)
}

/// Opens an output file: created if missing (and truncated when `truncate`, appended to
/// otherwise); a FIFO is opened read-write so that neither the open nor later writes wait for
/// a reader, and writes to a full pipe fail at once instead of blocking.
pub fn open_output(path: &Path, truncate: bool) -> std::io::Result<File> {
    let meta = std::fs::metadata(path).ok();
    let mut opts = OpenOptions::new();
    opts.custom_flags(libc::O_NONBLOCK);
    match &meta {
        Some(m) if m.file_type().is_fifo() => {
            opts.read(true).write(true);
        }
        Some(m) if m.is_dir() => {
            return Err(std::io::Error::other("it is a directory"));
        }
        Some(m) if !m.is_file() && !m.file_type().is_char_device() => {
            return Err(std::io::Error::other(format!(
                "it is {}, not a file or a named pipe",
                file_kind(m)
            )));
        }
        _ if truncate => {
            opts.write(true).create(true).truncate(true);
        }
        _ => {
            opts.append(true).create(true);
        }
    }
    opts.open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifos_are_refused_as_inputs_and_opened_without_blocking_as_outputs() {
        let dir = std::env::temp_dir().join(format!("vireo-files-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo(3) on a NUL-terminated path this test owns.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = open_input(&fifo, Kind::Regular, false).unwrap_err();
        assert!(e.to_string().contains("named pipe"), "{e}");
        let e = open_input(&fifo, Kind::Image, false).unwrap_err();
        assert!(e.to_string().contains("block device"), "{e}");
        let e = open_input(&dir, Kind::Regular, false).unwrap_err();
        assert!(e.to_string().contains("directory"), "{e}");
        // A file that passed the checks is blocking again (io_uring reads would otherwise end
        // with EAGAIN).
        let image = dir.join("image");
        std::fs::write(&image, [0u8; 512]).unwrap();
        let f = open_input(&image, Kind::Image, true).unwrap();
        let flags = rustix::fs::fcntl_getfl(&f).unwrap();
        assert!(!flags.contains(rustix::fs::OFlags::NONBLOCK), "{flags:?}");
        // No reader: still opens at once.
        open_output(&fifo, true).unwrap();
        let file = dir.join("out");
        std::fs::write(&file, b"old").unwrap();
        open_output(&file, true).unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), b"");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
