//! The vsock host side against real Unix sockets, with packets from the guest made by hand.

use super::muxer::{Muxer, Watch, CONN_BUF};
use super::packet::{op, Header, HOST_CID, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};
use super::VsockMetrics;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

const CID: u64 = 3;

struct Rig {
    dir: PathBuf,
    path: PathBuf,
    mux: Muxer,
    metrics: Arc<VsockMetrics>,
}

impl Rig {
    fn new(name: &str) -> Rig {
        let dir = std::env::temp_dir().join(format!("vireo-vsock-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("v.sock");
        let listener = UnixListener::bind(&path).unwrap();
        listener.set_nonblocking(true).unwrap();
        let metrics = Arc::new(VsockMetrics::default());
        let mux = Muxer::new(CID, path.clone(), listener, metrics.clone());
        Rig {
            dir,
            path,
            mux,
            metrics,
        }
    }

    fn guest(&mut self, src_port: u32, dst_port: u32, op: u16, flags: u32, data: &[u8]) {
        let h = Header {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len: data.len() as u32,
            kind: TYPE_STREAM,
            op,
            flags,
            buf_alloc: 65536,
            fwd_cnt: 0,
        };
        self.mux.from_guest(&h, data);
    }

    fn controls(&mut self) -> Vec<Header> {
        std::iter::from_fn(|| self.mux.pop_control()).collect()
    }

    /// Feeds the muxer's stream events as the device thread would.
    fn poll(&mut self) {
        for w in std::mem::take(&mut self.mux.watch) {
            if let Watch::Add(fd) = w {
                self.mux.ready(fd, true, true, false);
            }
        }
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn host_connects_to_a_guest_port() {
    let mut r = Rig::new("host-connect");
    let mut client = UnixStream::connect(&r.path).unwrap();
    client.write_all(b"CONNECT 5000\n").unwrap();
    r.mux.accept();
    r.poll();
    let c = r.controls();
    assert_eq!(c.len(), 1);
    let req = c[0];
    assert_eq!(
        (req.op, req.dst_port, req.dst_cid, req.src_cid),
        (op::REQUEST, 5000, CID, HOST_CID)
    );
    assert_eq!(req.buf_alloc, CONN_BUF);
    // The guest accepts: the client reads OK and the port vireo gave its side.
    r.guest(5000, req.src_port, op::RESPONSE, 0, &[]);
    client
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut line = [0u8; 32];
    let n = client.read(&mut line).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&line[..n]),
        format!("OK {}\n", req.src_port)
    );
    // Guest data reaches the client.
    r.guest(5000, req.src_port, op::RW, 0, b"hello host");
    let n = client.read(&mut line).unwrap();
    assert_eq!(&line[..n], b"hello host");
    assert_eq!(r.metrics.tx_bytes.load(Ordering::Relaxed), 10);
    // Client data is ready for the guest, within the guest's credit.
    client.write_all(b"hello guest").unwrap();
    let (key, credit) = r.mux.next_readable().expect("a readable connection");
    assert_eq!(key, (req.src_port, 5000));
    assert_eq!(credit, 65536);
    let mut buf = [0u8; 64];
    let n = r.mux.stream(key).unwrap().read(&mut buf);
    let h = r.mux.read_done(key, n).unwrap();
    assert_eq!((h.op, h.len), (op::RW, 11));
    assert_eq!(&buf[..11], b"hello guest");
    // The guest closes both ways: vireo resets and closes the client's stream.
    r.guest(
        5000,
        req.src_port,
        op::SHUTDOWN,
        SHUTDOWN_RCV | SHUTDOWN_SEND,
        &[],
    );
    assert!(r.controls().iter().any(|h| h.op == op::RST));
    drop(r.mux.watch.drain(..).collect::<Vec<_>>());
    assert_eq!(client.read(&mut line).unwrap(), 0, "closed");
}

#[test]
fn a_port_without_a_guest_listener_closes_the_client() {
    let mut r = Rig::new("no-listener");
    let mut client = UnixStream::connect(&r.path).unwrap();
    client.write_all(b"CONNECT 7000\n").unwrap();
    r.mux.accept();
    r.poll();
    let req = r.controls()[0];
    r.guest(7000, req.src_port, op::RST, 0, &[]);
    drop(r.mux.watch.drain(..).collect::<Vec<_>>());
    client
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut b = [0u8; 8];
    assert_eq!(client.read(&mut b).unwrap(), 0);
}

#[test]
fn guest_connects_to_a_host_listener_or_gets_rst() {
    let mut r = Rig::new("guest-connect");
    let host = UnixListener::bind(format!("{}_6000", r.path.display())).unwrap();
    r.guest(1234, 6000, op::REQUEST, 0, &[]);
    let c = r.controls();
    assert_eq!(
        (c[0].op, c[0].src_port, c[0].dst_port),
        (op::RESPONSE, 6000, 1234)
    );
    let (mut peer, _) = host.accept().unwrap();
    r.guest(1234, 6000, op::RW, 0, b"from the guest");
    let mut b = [0u8; 32];
    let n = peer.read(&mut b).unwrap();
    assert_eq!(&b[..n], b"from the guest");
    // No listener on port 6001: RST.
    r.guest(1235, 6001, op::REQUEST, 0, &[]);
    let c = r.controls();
    assert_eq!((c[0].op, c[0].dst_port), (op::RST, 1235));
}

#[test]
fn bad_packets_and_bad_clients_change_nothing_else() {
    let mut r = Rig::new("bad");
    // Wrong source CID, wrong destination, unknown type: dropped, no connection.
    let mut h = Header {
        src_cid: 9,
        dst_cid: HOST_CID,
        kind: TYPE_STREAM,
        op: op::REQUEST,
        ..Default::default()
    };
    r.mux.from_guest(&h, &[]);
    h.src_cid = CID;
    h.dst_cid = 7;
    r.mux.from_guest(&h, &[]);
    h.dst_cid = HOST_CID;
    h.kind = 2;
    r.mux.from_guest(&h, &[]);
    // RW on a connection that does not exist: RST.
    r.guest(1, 2, op::RW, 0, b"x");
    let c = r.controls();
    assert!(c.iter().all(|h| h.op == op::RST), "{c:?}");
    assert!(r.metrics.dropped.load(Ordering::Relaxed) >= 4);
    // A client that sends garbage, or an over-long line, is closed.
    for junk in [&b"HELLO\n"[..], &[b'9'; 100][..], b"CONNECT notaport\n"] {
        let mut client = UnixStream::connect(&r.path).unwrap();
        client.write_all(junk).unwrap();
        r.mux.accept();
        r.poll();
        drop(r.mux.watch.drain(..).collect::<Vec<_>>());
        client
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let mut b = [0u8; 8];
        // Closed: end of stream, or a reset when vireo closed with bytes unread.
        match client.read(&mut b) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("{junk:?}: {other:?}"),
        }
    }
    assert!(r.controls().is_empty(), "no REQUEST for a bad client");
}

#[test]
fn a_guest_that_ignores_credit_is_reset() {
    let mut r = Rig::new("credit");
    let host = UnixListener::bind(format!("{}_6000", r.path.display())).unwrap();
    r.guest(1, 6000, op::REQUEST, 0, &[]);
    r.controls();
    // The host side never reads: what the guest sends beyond vireo's credit gets it reset.
    let (_peer, _) = host.accept().unwrap();
    let chunk = vec![7u8; 64 * 1024];
    let mut reset = false;
    for _ in 0..64 {
        r.guest(1, 6000, op::RW, 0, &chunk);
        if r.controls().iter().any(|h| h.op == op::RST) {
            reset = true;
            break;
        }
    }
    assert!(reset, "reset once past the advertised credit");
}

#[test]
fn half_close_each_way() {
    let mut r = Rig::new("half-close");
    let host = UnixListener::bind(format!("{}_6000", r.path.display())).unwrap();
    r.guest(9, 6000, op::REQUEST, 0, &[]);
    r.controls();
    let (mut peer, _) = host.accept().unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    // The guest will send no more: the host peer reads the end of the stream...
    r.guest(9, 6000, op::RW, 0, b"last words");
    r.guest(9, 6000, op::SHUTDOWN, SHUTDOWN_SEND, &[]);
    let mut got = Vec::new();
    peer.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"last words");
    // ...and can still send to the guest, which still has the connection.
    peer.write_all(b"reply").unwrap();
    assert!(r.controls().iter().all(|h| h.op != op::RST), "not reset");
    let (key, _) = r.mux.next_readable().expect("still readable");
    let mut buf = [0u8; 16];
    let n = r.mux.stream(key).unwrap().read(&mut buf);
    let h = r.mux.read_done(key, n).unwrap();
    assert_eq!(&buf[..h.len as usize], b"reply");
    // The host peer closes too: the guest is told to expect nothing more either way.
    peer.shutdown(std::net::Shutdown::Both).unwrap();
    let n = r.mux.stream(key).unwrap().read(&mut buf);
    assert!(r.mux.read_done(key, n).is_none());
    let c = r.controls();
    assert!(
        c.iter()
            .any(|h| h.op == op::SHUTDOWN && h.flags == SHUTDOWN_RCV | SHUTDOWN_SEND),
        "{c:?}"
    );
}
