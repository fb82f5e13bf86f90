//! The host side of vsock, as Firecracker's hybrid design has it: guest connections to host
//! port P reach the Unix socket `PATH_P`; a host client connects to the Unix socket `PATH`,
//! writes `CONNECT <port>\n`, reads `OK <host port>\n` and then talks to the guest's listener.
//!
//! Every connection is a non-blocking Unix stream watched edge-triggered by the device thread.
//! Flow control is the virtio credit scheme: vireo never sends a connection more than the guest
//! said it can hold, and accepts from the guest only what it advertised (what the Unix peer has
//! not read yet is kept, up to that credit; a guest that sends more is reset).

use super::packet::{op, Header, HOST_CID, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};
use super::VsockMetrics;
use crate::metrics::add;
use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;

/// Receive buffer vireo advertises for each connection (its credit to the guest).
pub const CONN_BUF: u32 = 256 * 1024;
/// Connections at once (the issue asks for at least 1024).
pub const MAX_CONNS: usize = 4096;
/// Host clients still writing their `CONNECT` line.
const MAX_PENDING: usize = 1024;
/// Longest `CONNECT <port>\n` line.
const MAX_LINE: usize = 32;
/// Control packets waiting for receive buffers; beyond this the oldest connections' packets
/// are dropped (counted): a guest that never posts buffers cannot grow vireo.
const MAX_CONTROL: usize = 8192;
/// First port vireo gives host-initiated connections on its side.
const FIRST_LOCAL_PORT: u32 = 1 << 30;

/// (host-side port, guest-side port).
pub type Key = (u32, u32);

#[derive(Debug, PartialEq, Eq)]
enum State {
    /// Host-initiated: REQUEST sent, waiting for the guest's RESPONSE.
    Connecting,
    Established,
}

/// One connection.
pub struct Conn {
    stream: UnixStream,
    state: State,
    /// Bytes from the guest the Unix peer has not taken yet.
    to_host: Vec<u8>,
    /// Bytes written to the Unix peer (our `fwd_cnt`).
    fwd_cnt: u32,
    /// `fwd_cnt` as last told to the guest.
    fwd_cnt_sent: u32,
    /// The guest's receive buffer and how much of what we sent it has consumed.
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes sent to the guest.
    rx_cnt: u32,
    /// The Unix stream may have data (edge-triggered: until a read says otherwise).
    readable: bool,
    /// The Unix peer closed its sending side: the guest was told.
    host_done: bool,
    /// In the muxer's queue of connections with data for the guest.
    queued: bool,
}

impl Conn {
    fn new(stream: UnixStream, state: State) -> Self {
        Self {
            stream,
            state,
            to_host: Vec::new(),
            fwd_cnt: 0,
            fwd_cnt_sent: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            rx_cnt: 0,
            readable: true,
            host_done: false,
            queued: false,
        }
    }

    /// Whether the stream may have data for the guest and the guest has room for it.
    fn can_send(&self) -> bool {
        self.state == State::Established
            && self.readable
            && !self.host_done
            && self.peer_credit() > 0
    }

    /// Bytes the guest can take now.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = self.rx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }
}

/// Changes to what the device thread watches.
#[derive(Debug)]
pub enum Watch {
    /// Watch this descriptor (readable, writable, edge-triggered).
    Add(RawFd),
    /// Stop watching this stream, then close it (by dropping it).
    Remove(UnixStream),
}

/// All connections of one device.
pub struct Muxer {
    guest_cid: u64,
    path: PathBuf,
    listener: UnixListener,
    conns: HashMap<Key, Conn>,
    by_fd: HashMap<RawFd, Key>,
    pending: HashMap<RawFd, (UnixStream, Vec<u8>)>,
    control: VecDeque<Header>,
    /// Connections that may have data for the guest, served in turn: found without walking
    /// every connection per packet, and one busy stream cannot starve the others.
    to_guest: VecDeque<Key>,
    next_port: u32,
    metrics: Arc<VsockMetrics>,
    /// Descriptors to start or stop watching, for the device thread.
    pub watch: Vec<Watch>,
}

/// Connects to a Unix socket without ever blocking: a listener whose backlog is full counts as
/// refusing.
fn connect_nonblocking(path: &std::path::Path) -> std::io::Result<UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: an all-zero sockaddr_un is valid; the path is copied in below within bounds.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return Err(std::io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the descriptor is new and owned by this stream from here on.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    // SAFETY: connect(2) reads the sockaddr_un for the length given.
    let r = unsafe {
        libc::connect(
            fd,
            (&addr as *const libc::sockaddr_un).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stream)
}

impl Muxer {
    /// The host side for guest `guest_cid`, listening at `listener` (bound to `path`).
    pub fn new(
        guest_cid: u64,
        path: PathBuf,
        listener: UnixListener,
        metrics: Arc<VsockMetrics>,
    ) -> Self {
        Self {
            guest_cid,
            path,
            listener,
            conns: HashMap::new(),
            by_fd: HashMap::new(),
            pending: HashMap::new(),
            control: VecDeque::new(),
            to_guest: VecDeque::new(),
            next_port: FIRST_LOCAL_PORT,
            metrics,
            watch: Vec::new(),
        }
    }

    /// The listening socket, for the device thread to watch.
    pub fn listener_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    fn header(&self, key: Key, op: u16, len: u32, flags: u32) -> Header {
        let fwd_cnt = self.conns.get(&key).map_or(0, |c| c.fwd_cnt);
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.0,
            dst_port: key.1,
            len,
            kind: TYPE_STREAM,
            op,
            flags,
            buf_alloc: CONN_BUF,
            fwd_cnt,
        }
    }

    fn send_control(&mut self, key: Key, op: u16, flags: u32) {
        if self.control.len() >= MAX_CONTROL {
            add(&self.metrics.dropped, 1);
            return;
        }
        let h = self.header(key, op, 0, flags);
        if let Some(c) = self.conns.get_mut(&key) {
            c.fwd_cnt_sent = c.fwd_cnt;
        }
        self.control.push_back(h);
    }

    /// Answers a packet for no connection with RST.
    fn reset_unknown(&mut self, h: &Header) {
        if h.op == op::RST || self.control.len() >= MAX_CONTROL {
            return;
        }
        add(&self.metrics.resets, 1);
        self.control.push_back(Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: h.dst_port,
            dst_port: h.src_port,
            kind: TYPE_STREAM,
            op: op::RST,
            ..Default::default()
        });
    }

    fn close(&mut self, key: Key) {
        if let Some(c) = self.conns.remove(&key) {
            if c.queued {
                // No stale turns: a guest opening and closing connections cannot grow the queue.
                self.to_guest.retain(|k| *k != key);
            }
            self.by_fd.remove(&c.stream.as_raw_fd());
            self.watch.push(Watch::Remove(c.stream));
            add(&self.metrics.conns_closed, 1);
        }
    }

    fn reset(&mut self, key: Key) {
        add(&self.metrics.resets, 1);
        self.send_control(key, op::RST, 0);
        self.close(key);
    }

    /// The next control packet for the guest, if any.
    pub fn pop_control(&mut self) -> Option<Header> {
        self.control.pop_front()
    }

    /// Puts back a control packet no buffer was posted for.
    pub fn unpop_control(&mut self, h: Header) {
        self.control.push_front(h);
    }

    /// Counts a packet dropped before it reached a connection.
    pub fn dropped(&self) {
        add(&self.metrics.dropped, 1);
    }

    /// A connection with data for the guest and credit to send it: its key and how much it
    /// may send. It stays first in turn until [`Self::read_done`] reports its read.
    pub fn next_readable(&mut self) -> Option<(Key, u32)> {
        while let Some(&key) = self.to_guest.front() {
            if let Some(c) = self.conns.get(&key) {
                if c.can_send() {
                    return Some((key, c.peer_credit()));
                }
            }
            self.to_guest.pop_front();
            if let Some(c) = self.conns.get_mut(&key) {
                c.queued = false;
            }
        }
        None
    }

    /// Puts a connection in turn for the guest if it may have data and the guest has room.
    fn wake(&mut self, key: Key) {
        if let Some(c) = self.conns.get_mut(&key) {
            if !c.queued && c.can_send() {
                c.queued = true;
                self.to_guest.push_back(key);
            }
        }
    }

    /// The Unix stream of a connection, to read guest-bound data from.
    pub fn stream(&self, key: Key) -> Option<&UnixStream> {
        self.conns.get(&key).map(|c| &c.stream)
    }

    /// Records what a read for the guest gave: `Some(n)` bytes sent as RW (the header for them
    /// is returned), `Some(0)` the Unix peer closed its side, `None` nothing to read now.
    pub fn read_done(&mut self, key: Key, result: std::io::Result<usize>) -> Option<Header> {
        if self.to_guest.front() == Some(&key) {
            self.to_guest.pop_front();
            if let Some(c) = self.conns.get_mut(&key) {
                c.queued = false;
            }
        }
        let header = self.read_result(key, result);
        // Back in turn, behind the others, if there may be more.
        self.wake(key);
        header
    }

    fn read_result(&mut self, key: Key, result: std::io::Result<usize>) -> Option<Header> {
        match result {
            Ok(0) => {
                if let Some(c) = self.conns.get_mut(&key) {
                    c.host_done = true;
                }
                // The host side closed: the guest will receive and send no more.
                self.send_control(key, op::SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND);
                None
            }
            Ok(n) => {
                let h = self.header(key, op::RW, n as u32, 0);
                if let Some(c) = self.conns.get_mut(&key) {
                    c.rx_cnt = c.rx_cnt.wrapping_add(n as u32);
                    c.fwd_cnt_sent = c.fwd_cnt;
                }
                add(&self.metrics.rx_bytes, n as u64);
                Some(h)
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if let Some(c) = self.conns.get_mut(&key) {
                    c.readable = false;
                }
                None
            }
            Err(_) => {
                self.reset(key);
                None
            }
        }
    }

    /// Handles a packet from the guest; `data` is its payload (already bounded by the header's
    /// `len` and the chain).
    pub fn from_guest(&mut self, h: &Header, data: &[u8]) {
        self.take_from_guest(h, data);
        // Any packet may have opened the connection or given it credit.
        self.wake((h.dst_port, h.src_port));
    }

    fn take_from_guest(&mut self, h: &Header, data: &[u8]) {
        if h.src_cid != self.guest_cid || h.dst_cid != HOST_CID {
            add(&self.metrics.dropped, 1);
            utils::warn_limited!(
                "vsock_bad_cid",
                "vsock: packet from CID {} to CID {} dropped (the guest is {}, the host 2)",
                h.src_cid,
                h.dst_cid,
                self.guest_cid
            );
            return;
        }
        if h.kind != TYPE_STREAM {
            add(&self.metrics.dropped, 1);
            self.reset_unknown(h);
            return;
        }
        let key = (h.dst_port, h.src_port);
        if h.op == op::REQUEST {
            self.guest_connect(key, h);
            return;
        }
        let Some(c) = self.conns.get_mut(&key) else {
            add(&self.metrics.dropped, 1);
            self.reset_unknown(h);
            return;
        };
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        match h.op {
            op::RESPONSE if c.state == State::Connecting => {
                c.state = State::Established;
                let line = format!("OK {}\n", key.0);
                if c.stream.write_all(line.as_bytes()).is_err() {
                    self.reset(key);
                }
            }
            op::RW if c.state == State::Established => self.forward_to_host(key, data),
            op::CREDIT_UPDATE => {}
            op::CREDIT_REQUEST => self.send_control(key, op::CREDIT_UPDATE, 0),
            op::SHUTDOWN => {
                if h.flags & SHUTDOWN_SEND != 0 {
                    let _ = c.stream.shutdown(std::net::Shutdown::Write);
                }
                if h.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND) == SHUTDOWN_RCV | SHUTDOWN_SEND {
                    self.reset(key);
                }
            }
            op::RST => self.close(key),
            _ => {
                add(&self.metrics.dropped, 1);
                self.reset(key);
            }
        }
    }

    /// Guest data for the Unix peer: written at once where it can be, kept (within the credit
    /// the guest was given) where it cannot.
    fn forward_to_host(&mut self, key: Key, data: &[u8]) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if c.to_host.len() + data.len() > CONN_BUF as usize {
            // The guest sent past the credit it was given.
            add(&self.metrics.dropped, 1);
            utils::warn_limited!(
                "vsock_credit_overrun",
                "vsock: connection {}:{} sent beyond its credit; reset",
                key.0,
                key.1
            );
            self.reset(key);
            return;
        }
        c.to_host.extend_from_slice(data);
        add(&self.metrics.tx_bytes, data.len() as u64);
        self.flush(key);
    }

    /// Writes what the Unix peer can take; tells the guest its new credit when enough was
    /// consumed.
    pub fn flush(&mut self, key: Key) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        while !c.to_host.is_empty() {
            match c.stream.write(&c.to_host) {
                Ok(0) => break,
                Ok(n) => {
                    c.to_host.drain(..n);
                    c.fwd_cnt = c.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.reset(key);
                    return;
                }
            }
        }
        if c.fwd_cnt.wrapping_sub(c.fwd_cnt_sent) >= CONN_BUF / 4 {
            self.send_control(key, op::CREDIT_UPDATE, 0);
        }
    }

    fn guest_connect(&mut self, key: Key, h: &Header) {
        if self.conns.contains_key(&key) || self.conns.len() >= MAX_CONNS {
            self.reset_unknown(h);
            return;
        }
        let path = PathBuf::from(format!("{}_{}", self.path.display(), key.0));
        match connect_nonblocking(&path) {
            Ok(stream) => {
                let fd = stream.as_raw_fd();
                let mut c = Conn::new(stream, State::Established);
                c.peer_buf_alloc = h.buf_alloc;
                c.peer_fwd_cnt = h.fwd_cnt;
                self.conns.insert(key, c);
                self.by_fd.insert(fd, key);
                self.watch.push(Watch::Add(fd));
                add(&self.metrics.conns_opened, 1);
                self.send_control(key, op::RESPONSE, 0);
            }
            Err(_) => {
                // No listener at PATH_port (or it cannot take more): the guest gets RST.
                self.reset_unknown(h);
            }
        }
    }

    /// Takes every waiting host client.
    pub fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((s, _)) => {
                    if self.pending.len() >= MAX_PENDING || s.set_nonblocking(true).is_err() {
                        add(&self.metrics.dropped, 1);
                        continue;
                    }
                    let fd = s.as_raw_fd();
                    self.pending.insert(fd, (s, Vec::new()));
                    self.watch.push(Watch::Add(fd));
                    // The line is often there already.
                    self.connect_line(fd);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    utils::warn_limited!("vsock_accept_failed", "vsock: accept failed: {e}");
                    return;
                }
            }
        }
    }

    /// A watched descriptor has events: readable, writable, or closed.
    pub fn ready(&mut self, fd: RawFd, readable: bool, writable: bool, closed: bool) {
        if self.pending.contains_key(&fd) {
            self.connect_line(fd);
            return;
        }
        let Some(&key) = self.by_fd.get(&fd) else {
            return;
        };
        if readable || closed {
            if let Some(c) = self.conns.get_mut(&key) {
                c.readable = true;
            }
            self.wake(key);
        }
        if writable {
            self.flush(key);
        }
    }

    /// Reads a host client's `CONNECT <port>\n` and asks the guest for the connection.
    fn connect_line(&mut self, fd: RawFd) {
        let Some((mut stream, mut line)) = self.pending.remove(&fd) else {
            return;
        };
        let mut buf = [0u8; MAX_LINE];
        loop {
            match stream.read(&mut buf) {
                Ok(0) => {
                    self.watch.push(Watch::Remove(stream));
                    return;
                }
                Ok(n) => line.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.watch.push(Watch::Remove(stream));
                    return;
                }
            }
            if line.len() > MAX_LINE || line.contains(&b'\n') {
                break;
            }
        }
        let Some(end) = line.iter().position(|&b| b == b'\n') else {
            if line.len() > MAX_LINE {
                add(&self.metrics.dropped, 1);
                self.watch.push(Watch::Remove(stream));
            } else {
                self.pending.insert(fd, (stream, line));
            }
            return;
        };
        let port = std::str::from_utf8(&line[..end])
            .ok()
            .and_then(|l| l.strip_prefix("CONNECT "))
            .and_then(|p| p.trim().parse::<u32>().ok());
        let Some(port) = port.filter(|_| self.conns.len() < MAX_CONNS) else {
            // Not a CONNECT line (or no room): close this client, nothing else changes.
            add(&self.metrics.dropped, 1);
            self.watch.push(Watch::Remove(stream));
            return;
        };
        let key = loop {
            let p = self.next_port;
            self.next_port = self.next_port.wrapping_add(1).max(FIRST_LOCAL_PORT);
            if !self.conns.contains_key(&(p, port)) {
                break (p, port);
            }
        };
        // As in Firecracker, the client sends nothing more before its `OK`.
        self.conns.insert(key, Conn::new(stream, State::Connecting));
        self.by_fd.insert(fd, key);
        add(&self.metrics.conns_opened, 1);
        self.send_control(key, op::REQUEST, 0);
    }
}
