//! Just enough of ARP, IPv4 and TCP to serve HTTP/1.1 at the MMDS address to one guest
//! interface: frames for that address are answered here and never reach the TAP.
//!
//! The TCP side is deliberately small: it accepts connections to port 80, takes in-order data,
//! answers every complete request (pipelined or one per connection) with data segments sent at
//! once (responses are bounded by the store's size limit, well inside a guest's receive
//! window), and closes when the guest does. Anything else gets a reset. Every guest frame is
//! untrusted: lengths are checked before they are used, and state is bounded.

use super::{lock, Answer, SharedMmds, MMDS_MAC};
use std::collections::{HashMap, VecDeque};

const ETH: usize = 14;
const HTTP_PORT: u16 = 80;
const MSS: usize = 1460;
/// Connections kept at once; the oldest goes when a new one comes.
const MAX_CONNS: usize = 64;
/// Largest request (headers and body) a connection may build up.
const MAX_REQUEST: usize = 64 * 1024;
/// Frames waiting for the guest; more are dropped (the guest's TCP retransmits).
const MAX_QUEUED: usize = 256;
/// Bytes of the virtio-net header put before each frame for the guest.
const VNET_HDR: usize = 12;

const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const PSH: u8 = 0x08;
const ACK: u8 = 0x10;

struct Conn {
    mac: [u8; 6],
    /// Next sequence number this side sends.
    seq: u32,
    /// Next sequence number expected from the guest.
    ack: u32,
    request: Vec<u8>,
    closing: bool,
    born: u64,
}

/// A TCP segment from the guest, as far as MMDS reads it.
struct Segment<'a> {
    mac: [u8; 6],
    src: [u8; 4],
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    payload: &'a [u8],
}

/// The MMDS endpoint of one interface.
pub struct MmdsStack {
    ip: [u8; 4],
    store: SharedMmds,
    conns: HashMap<([u8; 4], u16), Conn>,
    out: VecDeque<Vec<u8>>,
    ip_id: u16,
    clock: u64,
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn checksum(data: &[u8], mut acc: u32) -> u16 {
    for c in data.chunks(2) {
        acc += u32::from(c[0]) << 8 | u32::from(*c.get(1).unwrap_or(&0));
    }
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

fn http_response(a: &Answer) -> Vec<u8> {
    let reason = match a.status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Payload Too Large",
        _ => "Not Implemented",
    };
    let mut r = format!(
        "HTTP/1.1 {} {reason}\r\nServer: vireo MMDS\r\nContent-Type: {}\r\nContent-Length: {}\r\n\r\n",
        a.status,
        a.content_type,
        a.body.len()
    )
    .into_bytes();
    r.extend_from_slice(&a.body);
    r
}

impl MmdsStack {
    /// The endpoint at `ip` serving `store`.
    pub fn new(ip: [u8; 4], store: SharedMmds) -> Self {
        Self {
            ip,
            store,
            conns: HashMap::new(),
            out: VecDeque::new(),
            ip_id: 1,
            clock: 0,
        }
    }

    /// Whether an Ethernet frame from the guest is for MMDS: an ARP request for its address,
    /// or IPv4 to it. Looks at the first 42 bytes at most.
    pub fn is_for_mmds(&self, eth: &[u8]) -> bool {
        match eth.get(12..14) {
            Some([8, 6]) => eth.get(38..42) == Some(&self.ip[..]),
            Some([8, 0]) => eth.get(30..34) == Some(&self.ip[..]),
            _ => false,
        }
    }

    /// The next frame for the guest (with its virtio-net header).
    pub fn pop(&mut self) -> Option<Vec<u8>> {
        self.out.pop_front()
    }

    /// Whether frames wait for the guest.
    pub fn pending(&self) -> bool {
        !self.out.is_empty()
    }

    fn queue(&mut self, frame: Vec<u8>) {
        if self.out.len() < MAX_QUEUED {
            self.out.push_back(frame);
        }
    }

    /// Takes one frame the guest sent to MMDS.
    pub fn handle(&mut self, eth: &[u8]) {
        if eth.len() < ETH {
            return;
        }
        match (eth[12], eth[13]) {
            (8, 6) => self.arp(eth),
            (8, 0) => self.ipv4(eth),
            _ => {}
        }
    }

    fn arp(&mut self, eth: &[u8]) {
        let Some(a) = eth.get(ETH..ETH + 28) else {
            return;
        };
        // Ethernet/IPv4 request for our address.
        if a[..8] != [0, 1, 8, 0, 6, 4, 0, 1] || a[24..28] != self.ip {
            return;
        }
        let mut f = vec![0u8; VNET_HDR];
        f.extend_from_slice(&a[8..14]);
        f.extend_from_slice(&MMDS_MAC);
        f.extend_from_slice(&[8, 6, 0, 1, 8, 0, 6, 4, 0, 2]);
        f.extend_from_slice(&MMDS_MAC);
        f.extend_from_slice(&self.ip);
        f.extend_from_slice(&a[8..18]);
        self.queue(f);
    }

    fn ipv4(&mut self, eth: &[u8]) {
        let ip = &eth[ETH..];
        if ip.len() < 20 || ip[0] >> 4 != 4 {
            return;
        }
        let ihl = usize::from(ip[0] & 0xf) * 4;
        let total = usize::from(be16(ip, 2)).min(ip.len());
        // Fragments are not reassembled: MMDS requests fit a segment.
        if ip[9] != 6 || ihl < 20 || total < ihl + 20 || be16(ip, 6) & 0x3fff != 0 {
            return;
        }
        let src: [u8; 4] = [ip[12], ip[13], ip[14], ip[15]];
        let tcp = &ip[ihl..total];
        let off = usize::from(tcp[12] >> 4) * 4;
        if off < 20 || off > tcp.len() {
            return;
        }
        self.tcp(&Segment {
            mac: [eth[6], eth[7], eth[8], eth[9], eth[10], eth[11]],
            src,
            sport: be16(tcp, 0),
            dport: be16(tcp, 2),
            seq: be32(tcp, 4),
            ack: be32(tcp, 8),
            flags: tcp[13],
            payload: &tcp[off..],
        });
    }

    fn tcp(&mut self, seg: &Segment<'_>) {
        let Segment {
            mac,
            src,
            sport,
            seq,
            ack,
            flags,
            payload,
            ..
        } = *seg;
        let key = (src, sport);
        if flags & RST != 0 {
            self.conns.remove(&key);
            return;
        }
        if seg.dport != HTTP_PORT {
            self.reset(seg);
            return;
        }
        if flags & SYN != 0 && flags & ACK == 0 {
            if self.conns.len() >= MAX_CONNS && !self.conns.contains_key(&key) {
                if let Some(oldest) = self
                    .conns
                    .iter()
                    .min_by_key(|(_, c)| c.born)
                    .map(|(k, _)| *k)
                {
                    self.conns.remove(&oldest);
                }
            }
            self.clock += 1;
            let isn = (self.clock as u32).wrapping_mul(0x9e37_79b9);
            self.conns.insert(
                key,
                Conn {
                    mac,
                    seq: isn.wrapping_add(1),
                    ack: seq.wrapping_add(1),
                    request: Vec::new(),
                    closing: false,
                    born: self.clock,
                },
            );
            self.segment(key, isn, SYN | ACK, &[]);
            return;
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            self.reset(seg);
            return;
        };
        if conn.closing && flags & ACK != 0 && ack == conn.seq && payload.is_empty() {
            self.conns.remove(&key);
            return;
        }
        let mut ack_needed = false;
        if !payload.is_empty() {
            if seq == conn.ack {
                if conn.request.len() + payload.len() > MAX_REQUEST {
                    conn.request.clear();
                    conn.ack = conn.ack.wrapping_add(payload.len() as u32);
                    let a = Answer {
                        status: 413,
                        content_type: "text/plain",
                        body: b"Request too large".to_vec(),
                    };
                    self.send_data(key, &http_response(&a));
                    return;
                }
                conn.request.extend_from_slice(payload);
                conn.ack = conn.ack.wrapping_add(payload.len() as u32);
            }
            // In order, a retransmission or a gap: say what is expected either way.
            ack_needed = true;
        }
        let fin = flags & FIN != 0 && seq.wrapping_add(payload.len() as u32) == conn.ack;
        if fin {
            conn.ack = conn.ack.wrapping_add(1);
        }
        let responses = self.take_requests(key);
        if !responses.is_empty() {
            self.send_data(key, &responses);
        } else if ack_needed && !fin {
            let s = self.conns.get(&key).map_or(0, |c| c.seq);
            self.segment(key, s, ACK, &[]);
        }
        if fin {
            if let Some(c) = self.conns.get_mut(&key) {
                let s = c.seq;
                c.seq = c.seq.wrapping_add(1);
                c.closing = true;
                self.segment(key, s, FIN | ACK, &[]);
            }
        }
    }

    /// Answers every complete request buffered on the connection, in order.
    fn take_requests(&mut self, key: ([u8; 4], u16)) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let Some(conn) = self.conns.get_mut(&key) else {
                return out;
            };
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut req = httparse::Request::new(&mut headers);
            let answer = match req.parse(&conn.request) {
                Ok(httparse::Status::Partial) => return out,
                Ok(httparse::Status::Complete(head)) => {
                    let len = req
                        .headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case("Content-Length"))
                        .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse().ok())
                        .unwrap_or(0usize);
                    if conn.request.len() < head + len {
                        return out;
                    }
                    let a = lock(&self.store).serve(&req, &conn.request[head..head + len]);
                    conn.request.drain(..head + len);
                    a
                }
                Err(e) => {
                    conn.request.clear();
                    Answer {
                        status: 400,
                        content_type: "text/plain",
                        body: format!("Bad request: {e}").into_bytes(),
                    }
                }
            };
            out.extend_from_slice(&http_response(&answer));
        }
    }

    fn send_data(&mut self, key: ([u8; 4], u16), data: &[u8]) {
        for chunk in data.chunks(MSS) {
            let Some(c) = self.conns.get_mut(&key) else {
                return;
            };
            let s = c.seq;
            c.seq = c.seq.wrapping_add(chunk.len() as u32);
            self.segment(key, s, PSH | ACK, chunk);
        }
    }

    /// Answers a segment that belongs to no connection (RFC 9293, 3.10.7.1).
    fn reset(&mut self, seg: &Segment<'_>) {
        let (s, a, f) = if seg.flags & ACK != 0 {
            (seg.ack, 0, RST)
        } else {
            let syn_fin = u32::from(seg.flags & (SYN | FIN) != 0);
            let len = seg.payload.len() as u32 + syn_fin;
            (0, seg.seq.wrapping_add(len), RST | ACK)
        };
        let frame = self.build(seg.mac, seg.src, seg.sport, seg.dport, s, a, f, &[]);
        self.queue(frame);
    }

    fn segment(&mut self, key: ([u8; 4], u16), seq: u32, flags: u8, data: &[u8]) {
        let Some(c) = self.conns.get(&key) else {
            return;
        };
        let (mac, ack) = (c.mac, c.ack);
        let frame = self.build(mac, key.0, key.1, HTTP_PORT, seq, ack, flags, data);
        self.queue(frame);
    }

    /// A whole frame for the guest: virtio-net header, Ethernet, IPv4, TCP, data, with both
    /// checksums filled in.
    #[allow(clippy::too_many_arguments)]
    fn build(
        &mut self,
        mac: [u8; 6],
        dst: [u8; 4],
        dport: u16,
        sport: u16,
        seq: u32,
        ack: u32,
        flags: u8,
        data: &[u8],
    ) -> Vec<u8> {
        let mut f = vec![0u8; VNET_HDR];
        f.extend_from_slice(&mac);
        f.extend_from_slice(&MMDS_MAC);
        f.extend_from_slice(&[8, 0]);
        let ip_at = f.len();
        let total = (20 + 20 + data.len()) as u16;
        self.ip_id = self.ip_id.wrapping_add(1);
        f.extend_from_slice(&[0x45, 0]);
        f.extend_from_slice(&total.to_be_bytes());
        f.extend_from_slice(&self.ip_id.to_be_bytes());
        f.extend_from_slice(&[0x40, 0, 64, 6, 0, 0]);
        f.extend_from_slice(&self.ip);
        f.extend_from_slice(&dst);
        let c = checksum(&f[ip_at..ip_at + 20], 0);
        f[ip_at + 10..ip_at + 12].copy_from_slice(&c.to_be_bytes());
        let tcp_at = f.len();
        f.extend_from_slice(&sport.to_be_bytes());
        f.extend_from_slice(&dport.to_be_bytes());
        f.extend_from_slice(&seq.to_be_bytes());
        f.extend_from_slice(&ack.to_be_bytes());
        f.extend_from_slice(&[5 << 4, flags, 0xff, 0xff, 0, 0, 0, 0]);
        f.extend_from_slice(data);
        let pseudo: u32 = f[ip_at + 12..ip_at + 20]
            .chunks(2)
            .map(|c| u32::from(c[0]) << 8 | u32::from(c[1]))
            .sum::<u32>()
            + 6
            + (20 + data.len()) as u32;
        let c = checksum(&f[tcp_at..], pseudo);
        f[tcp_at + 16..tcp_at + 18].copy_from_slice(&c.to_be_bytes());
        f
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Mmds, Version};
    use super::*;
    use std::sync::{Arc, Mutex};

    const GUEST: [u8; 6] = [2, 0, 0, 0, 0, 2];
    const GIP: [u8; 4] = [10, 0, 0, 2];
    const MIP: [u8; 4] = [169, 254, 169, 254];

    fn tcp_frame(seq: u32, ack: u32, flags: u8, data: &[u8]) -> Vec<u8> {
        let mut f = MMDS_MAC.to_vec();
        f.extend_from_slice(&GUEST);
        f.extend_from_slice(&[8, 0, 0x45, 0]);
        f.extend_from_slice(&((40 + data.len()) as u16).to_be_bytes());
        f.extend_from_slice(&[0, 1, 0x40, 0, 64, 6, 0, 0]);
        f.extend_from_slice(&GIP);
        f.extend_from_slice(&MIP);
        f.extend_from_slice(&4000u16.to_be_bytes());
        f.extend_from_slice(&80u16.to_be_bytes());
        f.extend_from_slice(&seq.to_be_bytes());
        f.extend_from_slice(&ack.to_be_bytes());
        f.extend_from_slice(&[5 << 4, flags, 0xff, 0xff, 0, 0, 0, 0]);
        f.extend_from_slice(data);
        f
    }

    fn parsed(frame: &[u8]) -> (u32, u32, u8, Vec<u8>) {
        let eth = &frame[VNET_HDR..];
        let ip = &eth[ETH..];
        assert_eq!(checksum(&ip[..20], 0), 0, "IP checksum");
        let tcp = &ip[20..usize::from(be16(ip, 2))];
        let pseudo: u32 = ip[12..20]
            .chunks(2)
            .map(|c| u32::from(c[0]) << 8 | u32::from(c[1]))
            .sum::<u32>()
            + 6
            + tcp.len() as u32;
        assert_eq!(checksum(tcp, pseudo), 0, "TCP checksum");
        (be32(tcp, 4), be32(tcp, 8), tcp[13], tcp[20..].to_vec())
    }

    fn stack() -> MmdsStack {
        let mut m = Mmds::new(10_000);
        m.put(serde_json::json!({"latest": {"meta-data": {"id": "i-123"}}}))
            .unwrap();
        MmdsStack::new(MIP, Arc::new(Mutex::new(m)))
    }

    #[test]
    fn answers_arp_for_its_address_only() {
        let mut s = stack();
        let mut arp = vec![0xff; 6];
        arp.extend_from_slice(&GUEST);
        arp.extend_from_slice(&[8, 6, 0, 1, 8, 0, 6, 4, 0, 1]);
        arp.extend_from_slice(&GUEST);
        arp.extend_from_slice(&GIP);
        arp.extend_from_slice(&[0; 6]);
        arp.extend_from_slice(&MIP);
        assert!(s.is_for_mmds(&arp));
        s.handle(&arp);
        let r = s.pop().unwrap();
        let eth = &r[VNET_HDR..];
        assert_eq!(&eth[..6], &GUEST);
        assert_eq!(&eth[22..28], &MMDS_MAC, "sender MAC");
        assert_eq!(&eth[28..32], &MIP);
        let mut other = arp.clone();
        other[38..42].copy_from_slice(&[10, 0, 0, 1]);
        assert!(!s.is_for_mmds(&other));
    }

    #[test]
    fn a_get_over_tcp() {
        let mut s = stack();
        s.handle(&tcp_frame(100, 0, SYN, &[]));
        let (isn, ack, flags, _) = parsed(&s.pop().unwrap());
        assert_eq!((ack, flags), (101, SYN | ACK));
        let req = b"GET /latest/meta-data/id HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n";
        s.handle(&tcp_frame(101, isn + 1, PSH | ACK, req));
        let (seq, ack, _, data) = parsed(&s.pop().unwrap());
        assert_eq!((seq, ack), (isn + 1, 101 + req.len() as u32));
        let text = String::from_utf8(data).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\ni-123"), "{text}");
        // The guest closes; MMDS acknowledges and closes too.
        let fin_seq = 101 + req.len() as u32;
        s.handle(&tcp_frame(fin_seq, seq + text.len() as u32, FIN | ACK, &[]));
        let (_, ack, flags, _) = parsed(&s.pop().unwrap());
        assert_eq!((ack, flags & (FIN | ACK)), (fin_seq + 1, FIN | ACK));
        assert!(s.pop().is_none());
    }

    #[test]
    fn v2_refuses_a_get_without_a_token() {
        let mut s = stack();
        lock(&s.store).configure(Version::V2, false);
        s.handle(&tcp_frame(1, 0, SYN, &[]));
        let (isn, ..) = parsed(&s.pop().unwrap());
        s.handle(&tcp_frame(
            2,
            isn + 1,
            PSH | ACK,
            b"GET /latest HTTP/1.1\r\n\r\n",
        ));
        let (.., data) = parsed(&s.pop().unwrap());
        assert!(data.starts_with(b"HTTP/1.1 401 Unauthorized\r\n"));
    }

    #[test]
    fn strangers_get_resets_and_garbage_is_ignored() {
        let mut s = stack();
        s.handle(&tcp_frame(5, 9, ACK, b"hi"));
        let (seq, _, flags, _) = parsed(&s.pop().unwrap());
        assert_eq!((seq, flags), (9, RST));
        let syn = tcp_frame(1, 0, SYN, &[]);
        for len in 0..syn.len() {
            s.handle(&syn[..len]);
        }
        let mut f = tcp_frame(1, 0, SYN, &[]);
        f[14] = 0x4f; // IHL beyond the frame
        s.handle(&f);
    }
}
