//! Copying files into and out of the guest: `CopyIn` followed by `Data` frames and `DataEnd`
//! (acknowledged by the agent with `DataEnd`), and `CopyOut` answered by `Data` frames and
//! `DataEnd`. Failures come back as `Error` naming the path.

use crate::exec::{error_frame, greet, Stream};
use crate::proto::{CopyIn, CopyOut, ErrorMessage, Frame, FrameError, Kind, MAX_DATA};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;

/// The agent's side of `CopyIn`: writes the file, then acknowledges.
pub(crate) fn serve_in<S: Stream>(mut stream: S, request: &Frame) -> Result<(), FrameError> {
    let c: CopyIn = match request.parse() {
        Ok(c) => c,
        Err(e) => return error_frame(e.to_string()).write_to(&mut stream),
    };
    // A refused file still has its data read to the end, so that the host, which sends it
    // all before reading the answer, gets the reason rather than a broken stream.
    let mut file = if c.path.starts_with('/') {
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(c.mode & 0o7777)
            .open(&c.path)
            .map_err(|e| format!("cannot create {}: {e}", c.path))
    } else {
        Err(format!("CopyIn: {} is not an absolute path", c.path))
    };
    let mut failed = file.as_ref().err().cloned();
    loop {
        let f = Frame::read_from(&mut stream)?;
        match f.kind {
            Kind::Data => {
                if let (Ok(w), None) = (file.as_mut(), &failed) {
                    if let Err(e) = w.write_all(&f.payload) {
                        failed = Some(format!("cannot write {}: {e}", c.path));
                    }
                }
            }
            Kind::DataEnd => break,
            other => {
                return error_frame(format!("CopyIn: unexpected {other:?} frame"))
                    .write_to(&mut stream)
            }
        }
    }
    match failed {
        Some(m) => error_frame(m).write_to(&mut stream),
        None => Frame::data(Kind::DataEnd, b"").write_to(&mut stream),
    }
}

/// The agent's side of `CopyOut`: sends the file.
pub(crate) fn serve_out<S: Stream>(mut stream: S, request: &Frame) -> Result<(), FrameError> {
    let c: CopyOut = match request.parse() {
        Ok(c) => c,
        Err(e) => return error_frame(e.to_string()).write_to(&mut stream),
    };
    let file = std::fs::File::open(&c.path).and_then(|f| {
        if f.metadata()?.is_file() {
            Ok(f)
        } else {
            Err(std::io::Error::other("not a regular file"))
        }
    });
    let mut file = match file {
        Ok(f) => f,
        Err(e) => return error_frame(format!("cannot read {}: {e}", c.path)).write_to(&mut stream),
    };
    let mut buf = vec![0u8; MAX_DATA];
    loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => Frame::data(Kind::Data, &buf[..n]).write_to(&mut stream)?,
            Err(e) => {
                return error_frame(format!("cannot read {}: {e}", c.path)).write_to(&mut stream)
            }
        }
    }
    Frame::data(Kind::DataEnd, b"").write_to(&mut stream)
}

fn agent_error(f: &Frame) -> String {
    f.parse::<ErrorMessage>()
        .map(|m| m.message)
        .unwrap_or_else(|e| e.to_string())
}

/// The host's side: copies `from` into the guest at `path` with permission bits `mode`;
/// returns the bytes sent.
pub fn copy_in<S: Stream>(
    mut stream: S,
    path: &str,
    mode: u32,
    from: &mut dyn Read,
) -> Result<u64, String> {
    let e = |e: FrameError| e.to_string();
    greet(&mut stream)?;
    Frame::json(
        Kind::CopyIn,
        &CopyIn {
            path: path.into(),
            mode,
        },
    )
    .write_to(&mut stream)
    .map_err(e)?;
    let mut buf = vec![0u8; MAX_DATA];
    let mut sent = 0u64;
    loop {
        let n = from.read(&mut buf).map_err(|x| x.to_string())?;
        if n == 0 {
            break;
        }
        Frame::data(Kind::Data, &buf[..n])
            .write_to(&mut stream)
            .map_err(e)?;
        sent += n as u64;
    }
    Frame::data(Kind::DataEnd, b"")
        .write_to(&mut stream)
        .map_err(e)?;
    let f = Frame::read_from(&mut stream).map_err(e)?;
    match f.kind {
        Kind::DataEnd => Ok(sent),
        Kind::Error => Err(agent_error(&f)),
        other => Err(format!("unexpected {other:?} frame from the agent")),
    }
}

/// The host's side: copies the guest's file at `path` to `to`; returns the bytes received.
pub fn copy_out<S: Stream>(mut stream: S, path: &str, to: &mut dyn Write) -> Result<u64, String> {
    let e = |e: FrameError| e.to_string();
    greet(&mut stream)?;
    Frame::json(Kind::CopyOut, &CopyOut { path: path.into() })
        .write_to(&mut stream)
        .map_err(e)?;
    let mut got = 0u64;
    loop {
        let f = Frame::read_from(&mut stream).map_err(e)?;
        match f.kind {
            Kind::Data => {
                to.write_all(&f.payload).map_err(|x| x.to_string())?;
                got += f.payload.len() as u64;
            }
            Kind::DataEnd => return Ok(got),
            Kind::Error => return Err(agent_error(&f)),
            other => return Err(format!("unexpected {other:?} frame from the agent")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::UnixStream;

    fn session() -> UnixStream {
        let (host, agent) = UnixStream::pair().unwrap();
        std::thread::spawn(move || {
            let _ = crate::exec::serve(agent, &crate::exec::Agent::plain("vireo-agent test"));
        });
        host
    }

    fn scratch(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("vireo-agent-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn files_go_in_and_come_out_whole() {
        let dir = scratch("copy");
        let path = dir.join("f.bin");
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let sent = copy_in(session(), path.to_str().unwrap(), 0o640, &mut &data[..]).unwrap();
        assert_eq!(sent, data.len() as u64);
        assert_eq!(std::fs::read(&path).unwrap(), data);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640 & !umask());
        let mut back = Vec::new();
        let got = copy_out(session(), path.to_str().unwrap(), &mut back).unwrap();
        assert_eq!(got, data.len() as u64);
        assert_eq!(back, data);
        let _ = std::fs::remove_dir_all(dir);
    }

    fn umask() -> u32 {
        let s = std::fs::read_to_string("/proc/self/status").unwrap();
        s.lines()
            .find_map(|l| l.strip_prefix("Umask:"))
            .map(|v| u32::from_str_radix(v.trim(), 8).unwrap())
            .unwrap_or(0o022)
    }

    #[test]
    fn bad_paths_are_refused_by_name() {
        let big = vec![7u8; 3 << 20];
        let e = copy_in(session(), "relative/path", 0o600, &mut &big[..]).unwrap_err();
        assert!(e.contains("relative/path is not an absolute path"), "{e}");
        let e = copy_in(session(), "/no/such/dir/f", 0o600, &mut &b"x"[..]).unwrap_err();
        assert!(e.contains("cannot create /no/such/dir/f"), "{e}");
        let e = copy_out(session(), "/no/such/file", &mut Vec::new()).unwrap_err();
        assert!(e.contains("cannot read /no/such/file"), "{e}");
        let e = copy_out(session(), "/tmp", &mut Vec::new()).unwrap_err();
        assert!(e.contains("not a regular file"), "{e}");
    }
}
