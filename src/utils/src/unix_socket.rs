//! Listening Unix sockets at user-named paths, as the API and vsock need them: a live socket
//! at the path is refused, a stale one (nobody answers) replaced, and on exit only the socket
//! this process created is removed (another process may have put its own at the path since).

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// Why a socket could not be bound.
#[derive(Debug)]
pub enum BindError {
    /// Another process serves the path.
    InUse,
    /// The path exists and is not a socket.
    NotASocket,
    /// Creating or binding failed.
    Io(std::io::Error),
}

impl std::fmt::Display for BindError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BindError::InUse => f.write_str("it is in use by a running process"),
            BindError::NotASocket => f.write_str("it exists and is not a socket"),
            BindError::Io(e) => write!(f, "{e}"),
        }
    }
}

/// A socket this process bound; dropping it removes the path if it is still this socket.
#[derive(Debug)]
pub struct OwnedPath {
    path: PathBuf,
    identity: (u64, u64),
}

impl Drop for OwnedPath {
    fn drop(&mut self) {
        if let Ok(meta) = std::fs::symlink_metadata(&self.path) {
            if (meta.dev(), meta.ino()) == self.identity {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// Binds a non-blocking listener at `path` (see the module's rules).
pub fn bind(path: &Path) -> Result<(UnixListener, OwnedPath), BindError> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(BindError::NotASocket);
        }
        if UnixStream::connect(path).is_ok() {
            return Err(BindError::InUse);
        }
        // Nobody answers: a stale socket from a process that died.
        let _ = std::fs::remove_file(path);
    }
    let listener = UnixListener::bind(path).map_err(BindError::Io)?;
    let meta = std::fs::symlink_metadata(path).map_err(BindError::Io)?;
    let owned = OwnedPath {
        path: path.to_owned(),
        identity: (meta.dev(), meta.ino()),
    };
    listener.set_nonblocking(true).map_err(BindError::Io)?;
    Ok((listener, owned))
}
