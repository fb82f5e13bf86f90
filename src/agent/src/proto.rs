//! Frames on the agent's stream.
//!
//! ```text
//! frame = length: u32 LE   (bytes after this field: 2 + payload)
//!         version: u8      (VERSION; any other is refused)
//!         kind: u8         (Kind)
//!         payload          (JSON for control messages, raw bytes for data)
//! ```
//!
//! A frame longer than [`MAX_FRAME`] is refused before it is read, so a peer cannot make the
//! other side allocate more than that. The host speaks first (`Hello`), the agent answers
//! `Hello`; then the host sends `Exec` and streams `Stdin`/`StdinClose`/`Signal`/`Resize`, and
//! the agent streams `Started`, `Stdout`, `Stderr` and ends with `Exited` (or `Error`). Files
//! go in with `CopyIn` then `Data`… `DataEnd`, and out with `CopyOut` answered by `Data`…
//! `DataEnd` (or `Error`). `PowerOff` syncs and powers the VM off. Each connection carries one
//! request.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use thiserror::Error;

/// The protocol version this side speaks.
pub const VERSION: u8 = 1;
/// Largest frame (version, kind and payload), in bytes.
pub const MAX_FRAME: u32 = 1 << 20;
/// The vsock port the agent listens on in the guest.
pub const PORT: u32 = 1024;
/// Largest data payload a sender puts in one frame (leaves room under [`MAX_FRAME`]).
pub const MAX_DATA: usize = 64 << 10;

/// What a frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Both sides, first: JSON [`Hello`].
    Hello = 1,
    /// Host: run a command, JSON [`Exec`].
    Exec = 2,
    /// Host: bytes for the command's standard input.
    Stdin = 3,
    /// Host: no more standard input.
    StdinClose = 4,
    /// Host: a signal for the command, JSON [`Signal`].
    Signal = 5,
    /// Host: the terminal's new size, JSON [`Resize`].
    Resize = 6,
    /// Agent: the command runs, JSON [`Started`].
    Started = 16,
    /// Agent: bytes the command wrote to standard output.
    Stdout = 17,
    /// Agent: bytes the command wrote to standard error.
    Stderr = 18,
    /// Agent: the command ended, JSON [`Exited`].
    Exited = 19,
    /// Either side: a request failed, JSON [`ErrorMessage`].
    Error = 20,
    /// Host: a file is coming, JSON [`CopyIn`].
    CopyIn = 32,
    /// Host: send a file, JSON [`CopyOut`].
    CopyOut = 33,
    /// A file's bytes.
    Data = 34,
    /// The end of a file.
    DataEnd = 35,
    /// Host: sync the file systems and power the VM off (the agent must be PID 1); answered
    /// by `PowerOff` just before it happens, or `Error`.
    PowerOff = 48,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Self> {
        use Kind::*;
        [
            Hello, Exec, Stdin, StdinClose, Signal, Resize, Started, Stdout, Stderr, Exited, Error,
            CopyIn, CopyOut, Data, DataEnd, PowerOff,
        ]
        .into_iter()
        .find(|k| *k as u8 == v)
    }
}

/// Why a frame could not be read or written.
#[derive(Debug, Error)]
pub enum FrameError {
    /// The stream failed or ended mid-frame.
    #[error("agent stream: {0}")]
    Io(#[from] std::io::Error),
    /// The stream ended between frames.
    #[error("the agent stream closed")]
    Closed,
    /// A frame announced more than [`MAX_FRAME`] bytes.
    #[error("a frame of {0} bytes is larger than the limit of {MAX_FRAME}")]
    TooLarge(u32),
    /// A frame too short to hold its version and kind.
    #[error("a frame of {0} bytes is too short")]
    TooShort(u32),
    /// The peer speaks another version.
    #[error("protocol version {0} is not supported (this side speaks {VERSION})")]
    Version(u8),
    /// An unknown frame kind.
    #[error("unknown frame kind {0}")]
    Kind(u8),
    /// A control message that does not parse.
    #[error("malformed {kind:?} message: {err}")]
    Json {
        /// The frame's kind.
        kind: Kind,
        /// What serde said.
        err: String,
    },
}

/// One frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// What it carries.
    pub kind: Kind,
    /// Its payload.
    pub payload: Vec<u8>,
}

impl Frame {
    /// A frame of raw bytes.
    pub fn data(kind: Kind, payload: &[u8]) -> Self {
        Self {
            kind,
            payload: payload.to_vec(),
        }
    }

    /// A frame carrying `msg` as JSON.
    pub fn json<T: Serialize>(kind: Kind, msg: &T) -> Self {
        Self {
            kind,
            payload: serde_json::to_vec(msg).unwrap_or_default(),
        }
    }

    /// The payload as a JSON message.
    pub fn parse<T: for<'a> Deserialize<'a>>(&self) -> Result<T, FrameError> {
        serde_json::from_slice(&self.payload).map_err(|e| FrameError::Json {
            kind: self.kind,
            err: e.to_string(),
        })
    }

    /// The frame's bytes on the stream.
    pub fn encode(&self) -> Result<Vec<u8>, FrameError> {
        let len = self.payload.len() + 2;
        let len = u32::try_from(len)
            .ok()
            .filter(|&l| l <= MAX_FRAME)
            .ok_or(FrameError::TooLarge(u32::try_from(len).unwrap_or(u32::MAX)))?;
        let mut out = Vec::with_capacity(4 + len as usize);
        out.extend_from_slice(&len.to_le_bytes());
        out.push(VERSION);
        out.push(self.kind as u8);
        out.extend_from_slice(&self.payload);
        Ok(out)
    }

    /// Writes the frame.
    pub fn write_to(&self, w: &mut impl Write) -> Result<(), FrameError> {
        w.write_all(&self.encode()?)?;
        Ok(())
    }

    /// Reads one frame; the length is checked before the payload is allocated.
    pub fn read_from(r: &mut impl Read) -> Result<Self, FrameError> {
        let mut len = [0u8; 4];
        match r.read(&mut len[..1])? {
            0 => return Err(FrameError::Closed),
            _ => r.read_exact(&mut len[1..])?,
        }
        let len = u32::from_le_bytes(len);
        if len > MAX_FRAME {
            return Err(FrameError::TooLarge(len));
        }
        if len < 2 {
            return Err(FrameError::TooShort(len));
        }
        let mut head = [0u8; 2];
        r.read_exact(&mut head)?;
        if head[0] != VERSION {
            return Err(FrameError::Version(head[0]));
        }
        let kind = Kind::from_u8(head[1]).ok_or(FrameError::Kind(head[1]))?;
        let mut payload = vec![0u8; len as usize - 2];
        r.read_exact(&mut payload)?;
        Ok(Self { kind, payload })
    }
}

/// The first message each way.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The protocol version the sender speaks.
    pub version: u8,
    /// The sender's program and version, for logs.
    pub software: String,
}

/// Run a command.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Exec {
    /// The program and its arguments; the program is looked up in PATH when it has no `/`.
    pub argv: Vec<String>,
    /// Environment variables (the command gets these only).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory (default `/`).
    #[serde(default)]
    pub cwd: Option<String>,
    /// User and group to run as (default the agent's).
    #[serde(default)]
    pub uid: Option<u32>,
    /// Group to run as.
    #[serde(default)]
    pub gid: Option<u32>,
    /// Run on a pseudo-terminal of this size (rows, columns) instead of pipes.
    #[serde(default)]
    pub tty: Option<(u16, u16)>,
}

/// A signal for the command.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signal {
    /// Its number.
    pub signal: i32,
}

/// The terminal's new size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resize {
    /// Rows.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
}

/// The command started.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Started {
    /// Its process ID in the guest.
    pub pid: u32,
}

/// The command ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exited {
    /// Its exit status, if it exited.
    pub code: Option<i32>,
    /// The signal that ended it, if one did.
    pub signal: Option<i32>,
}

/// A request failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorMessage {
    /// What failed and why, naming the thing.
    pub message: String,
}

/// A file is coming to `path`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CopyIn {
    /// Where it goes in the guest.
    pub path: String,
    /// Its permission bits.
    pub mode: u32,
}

/// Send the file at `path`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CopyOut {
    /// Where it is in the guest.
    pub path: String,
}

/// The fuzz target's entry point: `data` as a stream of frames, each control message parsed
/// as its kind says.
#[doc(hidden)]
pub fn fuzz_frames(data: &[u8]) {
    let mut r = data;
    while let Ok(f) = Frame::read_from(&mut r) {
        let _ = match f.kind {
            Kind::Hello => f.parse::<Hello>().map(|_| ()),
            Kind::Exec => f.parse::<Exec>().map(|_| ()),
            Kind::Signal => f.parse::<Signal>().map(|_| ()),
            Kind::Resize => f.parse::<Resize>().map(|_| ()),
            Kind::Started => f.parse::<Started>().map(|_| ()),
            Kind::Exited => f.parse::<Exited>().map(|_| ()),
            Kind::Error => f.parse::<ErrorMessage>().map(|_| ()),
            Kind::CopyIn => f.parse::<CopyIn>().map(|_| ()),
            Kind::CopyOut => f.parse::<CopyOut>().map(|_| ()),
            _ => Ok(()),
        };
        if let Ok(bytes) = f.encode() {
            assert_eq!(Frame::read_from(&mut &bytes[..]).ok(), Some(f));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let exec = Exec {
            argv: vec!["python3".into(), "-c".into(), "print(1)".into()],
            env: [("PATH".to_string(), "/usr/bin".to_string())].into(),
            cwd: Some("/tmp".into()),
            tty: Some((24, 80)),
            ..Default::default()
        };
        let frames = [
            Frame::json(
                Kind::Hello,
                &Hello {
                    version: VERSION,
                    software: "vireo 0.1.0".into(),
                },
            ),
            Frame::json(Kind::Exec, &exec),
            Frame::data(Kind::Stdin, b"input\n"),
            Frame::data(Kind::StdinClose, b""),
            Frame::json(
                Kind::Exited,
                &Exited {
                    code: Some(3),
                    signal: None,
                },
            ),
        ];
        let mut stream = Vec::new();
        for f in &frames {
            f.write_to(&mut stream).unwrap();
        }
        let mut r = &stream[..];
        for f in &frames {
            assert_eq!(&Frame::read_from(&mut r).unwrap(), f);
        }
        assert!(matches!(Frame::read_from(&mut r), Err(FrameError::Closed)));
        assert_eq!(frames[1].parse::<Exec>().unwrap(), exec);
        // Layout: length, version, kind, payload.
        let b = Frame::data(Kind::Stdout, b"hi").encode().unwrap();
        assert_eq!(b, [4, 0, 0, 0, 1, 17, b'h', b'i']);
    }

    #[test]
    fn oversized_short_foreign_and_malformed_frames_are_refused() {
        let mut big = (MAX_FRAME + 1).to_le_bytes().to_vec();
        big.extend_from_slice(&[1, 17]);
        let e = Frame::read_from(&mut &big[..]).unwrap_err();
        assert!(e.to_string().contains("larger than the limit"), "{e}");
        let e = Frame::read_from(&mut &[1, 0, 0, 0, 1][..]).unwrap_err();
        assert!(e.to_string().contains("too short"), "{e}");
        let e = Frame::read_from(&mut &[2, 0, 0, 0, 9, 17][..]).unwrap_err();
        assert!(e.to_string().contains("version 9 is not supported"), "{e}");
        let e = Frame::read_from(&mut &[2, 0, 0, 0, 1, 99][..]).unwrap_err();
        assert!(e.to_string().contains("unknown frame kind 99"), "{e}");
        // Cut mid-frame: an I/O error, not a short frame taken for whole.
        let e = Frame::read_from(&mut &[9, 0, 0, 0, 1, 17, b'x'][..]).unwrap_err();
        assert!(matches!(e, FrameError::Io(_)), "{e}");
        let f = Frame::data(Kind::Exec, br#"{"argv":["ls"],"shell":true}"#);
        let e = f.parse::<Exec>().unwrap_err();
        assert!(e.to_string().contains("unknown field `shell`"), "{e}");
        let e = Frame::data(Kind::Stdout, &vec![0; MAX_FRAME as usize])
            .encode()
            .unwrap_err();
        assert!(matches!(e, FrameError::TooLarge(_)));
    }

    #[test]
    fn the_fuzz_corpus_replays() {
        for (name, data) in utils::fuzz_corpus("agent_frames") {
            let r = std::panic::catch_unwind(|| fuzz_frames(&data));
            assert!(r.is_ok(), "panic on corpus input {name}");
        }
    }

    #[test]
    fn random_streams_never_panic() {
        let mut x: u64 = 0x5eed_a9e7;
        for _ in 0..3000 {
            let len = (x % 512) as usize;
            let data: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    // Small lengths and known kinds now and then, so frames parse.
                    (x % 23) as u8
                })
                .collect();
            fuzz_frames(&data);
        }
    }
}
