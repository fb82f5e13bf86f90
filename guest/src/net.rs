//! A virtio-net driver (two split queues) and the network test the host suite asks for with
//! `vireo.nettest`. It speaks just enough Ethernet, ARP, IPv4 and UDP to talk to the host
//! kernel on the other side of the TAP and to another guest on a bridge:
//!
//! * it answers ARP requests for its address and resolves the host's (or a peer's);
//! * it sends a UDP datagram `hello from vireo` to port 6000 and a burst of numbered
//!   datagrams to port 6001, then reports `@net ready`;
//! * it reports the first datagram to its port 5000 byte for byte and counts a burst of
//!   numbered datagrams to port 5001, checking every byte.
//!
//! Options: `vireo.netip=A.B.C.D` (default 10.0.0.2), `vireo.nethost=` (10.0.0.1),
//! `vireo.netpeer=` (another guest to exchange hellos with instead), `vireo.netburst=N` (frames
//! each way, default 0), `vireo.netrx=N` (receive buffers posted, default 64),
//! `vireo.netbuf=BYTES` (their size, default 2048), `vireo.netmrg=0` (do not negotiate
//! MRG_RXBUF), `vireo.netpause=N` (stop posting buffers for about a second after N burst frames),
//! `vireo.netmmds=1|2` (read `vireo.netmmdskey` from MMDS over V1 or V2, at
//! `vireo.netmmdsip`, over a minimal TCP client), `vireo.nethostile` (send malformed chains first), `vireo.netarp` (stop once the host's
//! address is resolved), `vireo.nettso` (send one 64 KiB TCP
//! segment with TSO to `vireo.nettsodst`), `vireo.netcsum` (accept checksum and TSO offloads
//! from the host).
//!
//! Runs at CPL0, which on some hosts is emulated instruction by instruction: the host builds
//! and checks the heavy data; the guest touches a few bytes per frame.

use crate::io::{peek, poke, putc, puts};
use crate::ring::Queue;
use crate::{apic, field};
use core::sync::atomic::{fence, Ordering};

const F_MAC: u64 = 1 << 5;
const F_MRG_RXBUF: u64 = 1 << 15;
const F_STATUS: u64 = 1 << 16;
const F_MTU: u64 = 1 << 3;
const F_CSUM: u64 = 1 << 0;
const F_HOST_TSO4: u64 = 1 << 11;
const F_GUEST_CSUM: u64 = 1 << 1;
const F_GUEST_TSO4: u64 = 1 << 7;
const VERSION_1: u64 = 1 << 32;
const EVENT_IDX: u64 = 1 << 29;

const QSIZE: u16 = 256;
/// Where the driver's rings and buffers live (the test runs with at least 64 MiB).
const BASE: u64 = 0x200_0000;
const RX_RING: u64 = BASE;
const TX_RING: u64 = BASE + 0x4000;
const RX_BUFS: u64 = BASE + 0x10_0000;
const TX_BUFS: u64 = BASE + 0x80_0000;
const TX_SLOT: u64 = 2048;
const TSO_BUF: u64 = BASE + 0xc0_0000;
const RESP_BUF: u64 = BASE + 0xe0_0000;
const RESP_MAX: u64 = 0x1_0000;
const HDR: u64 = 12;

struct Net {
    base: u64,
    features: u64,
    mac: [u8; 6],
    rx: Queue,
    tx: Queue,
    rx_count: u16,
    rx_size: u32,
    tx_next: u16,
    ip: [u8; 4],
    notifies: u64,
}

fn reg(base: u64, off: u64) -> u32 {
    peek(base + off)
}

fn set_reg(base: u64, off: u64, v: u32) {
    poke(base + off, v)
}

fn parse_u64(s: &[u8]) -> Option<u64> {
    let mut v: u64 = 0;
    if s.is_empty() {
        return None;
    }
    for &c in s {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
    }
    Some(v)
}

fn parse_ip(s: &[u8]) -> Option<[u8; 4]> {
    let mut ip = [0u8; 4];
    let mut n = 0;
    for part in s.split(|&c| c == b'.') {
        if n == 4 {
            return None;
        }
        ip[n] = u8::try_from(parse_u64(part)?).ok()?;
        n += 1;
    }
    (n == 4).then_some(ip)
}

fn hex_byte(v: u8) {
    let h = |n: u8| if n < 10 { b'0' + n } else { b'a' + n - 10 };
    putc(h(v >> 4));
    putc(h(v & 0xf));
}

fn put_mac(m: &[u8; 6]) {
    for (i, b) in m.iter().enumerate() {
        if i > 0 {
            putc(b':');
        }
        hex_byte(*b);
    }
}

fn put_ip(ip: &[u8]) {
    for (i, b) in ip.iter().enumerate() {
        if i > 0 {
            putc(b'.');
        }
        crate::io::put_dec(u64::from(*b));
    }
}

/// Ones' complement sum of 16-bit big-endian words of `len` bytes at `addr`.
fn sum16(addr: u64, len: u64, mut acc: u32) -> u32 {
    let mut i = 0;
    while i + 1 < len {
        acc += u32::from(peek::<u8>(addr + i)) << 8 | u32::from(peek::<u8>(addr + i + 1));
        i += 2;
    }
    if i < len {
        acc += u32::from(peek::<u8>(addr + i)) << 8;
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

fn put_be16(addr: u64, v: u16) {
    poke::<u8>(addr, (v >> 8) as u8);
    poke::<u8>(addr + 1, v as u8);
}

fn be16(addr: u64) -> u16 {
    u16::from(peek::<u8>(addr)) << 8 | u16::from(peek::<u8>(addr + 1))
}

fn copy(dst: u64, src: &[u8]) {
    for (i, b) in src.iter().enumerate() {
        poke::<u8>(dst + i as u64, *b);
    }
}

fn read4(addr: u64) -> [u8; 4] {
    [peek(addr), peek(addr + 1), peek(addr + 2), peek(addr + 3)]
}

fn read6(addr: u64) -> [u8; 6] {
    [
        peek(addr),
        peek(addr + 1),
        peek(addr + 2),
        peek(addr + 3),
        peek(addr + 4),
        peek(addr + 5),
    ]
}

/// Something random enough for a locally administered MAC address.
fn random_mac() -> [u8; 6] {
    let lo: u32;
    let hi: u32;
    // SAFETY: rdtsc only reads the time-stamp counter.
    unsafe { core::arch::asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack)) };
    let mut x = (u64::from(hi) << 32 | u64::from(lo)) ^ 0x9e37_79b9_7f4a_7c15;
    x ^= x >> 29;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 32;
    [
        0x02,
        x as u8,
        (x >> 8) as u8,
        (x >> 16) as u8,
        (x >> 24) as u8,
        (x >> 40) as u8,
    ]
}

impl Net {
    fn init(
        base: u64,
        irq: u32,
        want_mrg: bool,
        extra: u64,
        rx_count: u16,
        rx_size: u32,
        ip: [u8; 4],
        bsp: u8,
    ) -> Result<Net, &'static [u8]> {
        if reg(base, 0) != 0x7472_6976 || reg(base, 4) != 2 {
            return Err(b"not a virtio-mmio v2 device");
        }
        set_reg(base, 0x70, 0);
        set_reg(base, 0x70, 1);
        set_reg(base, 0x70, 3);
        set_reg(base, 0x14, 0);
        let lo = u64::from(reg(base, 0x10));
        set_reg(base, 0x14, 1);
        let offered = lo | u64::from(reg(base, 0x10)) << 32;
        let mut want = VERSION_1 | EVENT_IDX | F_MAC | F_STATUS | F_MTU | F_CSUM | F_HOST_TSO4;
        if want_mrg {
            want |= F_MRG_RXBUF;
        }
        want |= extra;
        let features = offered & want;
        if features & VERSION_1 == 0 {
            return Err(b"no VERSION_1");
        }
        set_reg(base, 0x24, 0);
        set_reg(base, 0x20, features as u32);
        set_reg(base, 0x24, 1);
        set_reg(base, 0x20, (features >> 32) as u32);
        set_reg(base, 0x70, 1 | 2 | 8);
        if reg(base, 0x70) & 8 == 0 {
            return Err(b"FEATURES_OK refused");
        }
        let rx = Queue::new(RX_RING, QSIZE);
        let tx = Queue::new(TX_RING, QSIZE);
        for (i, q) in [&rx, &tx].iter().enumerate() {
            set_reg(base, 0x30, i as u32);
            if reg(base, 0x34) < u32::from(QSIZE) {
                return Err(b"queue too small");
            }
            set_reg(base, 0x38, u32::from(QSIZE));
            for (off, a) in [(0x80, q.desc), (0x90, q.avail), (0xa0, q.used)] {
                set_reg(base, off, a as u32);
                set_reg(base, off + 4, (a >> 32) as u32);
            }
            set_reg(base, 0x44, 1);
        }
        let mac = if features & F_MAC != 0 {
            let mut m = [0u8; 6];
            for (i, b) in m.iter_mut().enumerate() {
                *b = peek(base + 0x100 + i as u64);
            }
            m
        } else {
            random_mac()
        };
        apic::route_irq(irq, apic::VIRTIO_VECTOR, bsp);
        let mut n = Net {
            base,
            features,
            mac,
            rx,
            tx,
            rx_count,
            rx_size,
            tx_next: 0,
            ip,
            notifies: 0,
        };
        for i in 0..rx_count {
            n.rx.set_desc(
                i,
                RX_BUFS + u64::from(i) * u64::from(rx_size),
                rx_size,
                2,
                0,
            );
        }
        set_reg(base, 0x70, 1 | 2 | 8 | 4);
        if reg(base, 0x70) & 0x40 != 0 {
            return Err(b"device needs reset after DRIVER_OK");
        }
        for i in 0..rx_count {
            n.rx.publish(i);
        }
        n.notify(0);
        Ok(n)
    }

    fn notify(&mut self, queue: u32) {
        self.notifies += 1;
        set_reg(self.base, 0x50, queue);
    }

    fn config_u16(&self, off: u64) -> u16 {
        peek(self.base + 0x100 + off)
    }

    /// Waits up to `ms` for a used entry on either queue (by interrupt).
    fn wait(&mut self, ms: u32) -> bool {
        let expiries = apic::timer_irqs();
        apic::start_watchdog(ms);
        loop {
            self.rx.arm();
            if self.rx.used_idx() != self.rx.used_seen {
                break;
            }
            if apic::timer_irqs() != expiries {
                return false;
            }
            // SAFETY: wait for the device (or watchdog) interrupt.
            unsafe { core::arch::asm!("sti; hlt; cli", options(nomem, nostack)) };
        }
        apic::stop_watchdog();
        let isr = reg(self.base, 0x60);
        set_reg(self.base, 0x64, isr);
        true
    }

    /// A free transmit slot's buffer (after reclaiming sent ones).
    fn tx_slot(&mut self) -> (u16, u64) {
        while self.tx.avail_idx.wrapping_sub(self.tx.used_idx()) >= QSIZE {
            let expiries = apic::timer_irqs();
            apic::start_watchdog(100);
            while apic::timer_irqs() == expiries
                && self.tx.avail_idx.wrapping_sub(self.tx.used_idx()) >= QSIZE
            {
                // SAFETY: wait for an interrupt.
                unsafe { core::arch::asm!("sti; hlt; cli", options(nomem, nostack)) };
            }
            apic::stop_watchdog();
        }
        let slot = self.tx_next;
        self.tx_next = (slot + 1) % QSIZE;
        (slot, TX_BUFS + u64::from(slot) * TX_SLOT)
    }

    /// Sends the frame of `len` bytes (header included) in slot `slot`.
    fn send_slot(&mut self, slot: u16, buf: u64, len: u32) {
        self.tx.set_desc(slot, buf, len, 0, 0);
        if self.tx.publish(slot) {
            self.notify(1);
        }
    }

    /// Builds an Ethernet frame in a fresh slot: zeroed virtio-net header, addresses, type;
    /// returns the slot and where the payload starts.
    fn frame(&mut self, dst: &[u8; 6], ethertype: u16) -> (u16, u64, u64) {
        let (slot, buf) = self.tx_slot();
        for i in 0..HDR {
            poke::<u8>(buf + i, 0);
        }
        copy(buf + HDR, dst);
        copy(buf + HDR + 6, &self.mac);
        put_be16(buf + HDR + 12, ethertype);
        (slot, buf, buf + HDR + 14)
    }

    fn send_arp(&mut self, op: u16, target_mac: &[u8; 6], target_ip: &[u8; 4]) {
        let dst = if op == 1 { [0xff; 6] } else { *target_mac };
        let (slot, buf, p) = self.frame(&dst, 0x0806);
        put_be16(p, 1);
        put_be16(p + 2, 0x0800);
        poke::<u8>(p + 4, 6);
        poke::<u8>(p + 5, 4);
        put_be16(p + 6, op);
        copy(p + 8, &self.mac);
        copy(p + 14, &self.ip);
        copy(p + 18, if op == 1 { &[0u8; 6] } else { target_mac });
        copy(p + 24, target_ip);
        self.send_slot(slot, buf, (HDR + 14 + 28) as u32);
    }

    /// Writes a 20-byte IPv4 header (don't fragment, TTL 64, checksum) for `len` bytes of
    /// `proto` to `dst`.
    fn ipv4_header(&self, ip: u64, id: u16, proto: u8, len: u16, dst: &[u8; 4]) {
        poke::<u8>(ip, 0x45);
        poke::<u8>(ip + 1, 0);
        put_be16(ip + 2, 20 + len);
        put_be16(ip + 4, id);
        put_be16(ip + 6, 0x4000);
        poke::<u8>(ip + 8, 64);
        poke::<u8>(ip + 9, proto);
        put_be16(ip + 10, 0);
        copy(ip + 12, &self.ip);
        copy(ip + 16, dst);
        put_be16(ip + 10, !fold(sum16(ip, 20, 0)));
    }

    /// Sends a UDP datagram; `payload` fills it (`seq` in the first four bytes when given,
    /// the rest a pattern the host checks), with a real checksum when `checksum`.
    fn send_udp(
        &mut self,
        dst_mac: &[u8; 6],
        dst_ip: &[u8; 4],
        sport: u16,
        dport: u16,
        payload: &[u8],
        checksum: bool,
    ) {
        let (slot, buf, ip) = self.frame(dst_mac, 0x0800);
        let udp = ip + 20;
        let len = 8 + payload.len() as u16;
        self.ipv4_header(ip, slot, 17, len, dst_ip);
        put_be16(udp, sport);
        put_be16(udp + 2, dport);
        put_be16(udp + 4, len);
        put_be16(udp + 6, 0);
        copy(udp + 8, payload);
        if checksum {
            // Pseudo-header: addresses, protocol, length.
            let acc = sum16(ip + 12, 8, 17 + u32::from(len));
            let c = !fold(sum16(udp, u64::from(len), acc));
            put_be16(udp + 6, if c == 0 { 0xffff } else { c });
        }
        self.send_slot(slot, buf, (HDR + 14 + 20) as u32 + u32::from(len));
    }

    /// Sends a TCP segment with a full checksum.
    #[allow(clippy::too_many_arguments)]
    fn send_tcp(
        &mut self,
        dst_mac: &[u8; 6],
        dst_ip: &[u8; 4],
        sport: u16,
        dport: u16,
        seq: u32,
        ack: u32,
        flags: u8,
        payload: &[u8],
    ) {
        let (slot, buf, ip) = self.frame(dst_mac, 0x0800);
        let tcp = ip + 20;
        let len = 20 + payload.len() as u16;
        self.ipv4_header(ip, slot, 6, len, dst_ip);
        put_be16(tcp, sport);
        put_be16(tcp + 2, dport);
        put_be16(tcp + 4, (seq >> 16) as u16);
        put_be16(tcp + 6, seq as u16);
        put_be16(tcp + 8, (ack >> 16) as u16);
        put_be16(tcp + 10, ack as u16);
        poke::<u8>(tcp + 12, 5 << 4);
        poke::<u8>(tcp + 13, flags);
        put_be16(tcp + 14, 65535);
        put_be16(tcp + 16, 0);
        put_be16(tcp + 18, 0);
        copy(tcp + 20, payload);
        let acc = sum16(ip + 12, 8, 6 + u32::from(len));
        put_be16(tcp + 16, !fold(sum16(tcp, u64::from(len), acc)));
        self.send_slot(slot, buf, (HDR + 14 + 20) as u32 + u32::from(len));
    }

    /// Returns the receive chain `id` (and, with MRG_RXBUF, the `extra` ones after it) to the
    /// device.
    fn repost(&mut self, id: u16) -> bool {
        self.rx.publish(id)
    }
}

/// What the receive loop has seen.
#[derive(Default)]
struct Seen {
    /// The TCP connection to MMDS: our port, the server's next sequence number once it
    /// answered our SYN, response bytes gathered (at RESP_BUF), and whether it closed.
    tcp_port: u16,
    tcp_next: Option<u32>,
    tcp_len: u64,
    tcp_fin: bool,
    peer_mac: Option<[u8; 6]>,
    hello: bool,
    burst: u64,
    burst_bad: u64,
    buffers_merged: u64,
    frames: u64,
}

fn report_hello(from: &[u8], sport: u16, data: u64, len: u64) {
    puts(b"@net udp-rx from=");
    put_ip(from);
    putc(b':');
    crate::io::put_dec(u64::from(sport));
    field(b"len", len, false);
    puts(b" data=");
    for i in 0..len.min(64) {
        hex_byte(peek(data + i));
    }
    puts(b"\n");
}

/// Handles one received frame of `len` bytes at `buf` (header included).
fn handle(n: &mut Net, seen: &mut Seen, buf: u64, len: u64, want_ip: &[u8; 4]) {
    seen.frames += 1;
    if len < HDR + 14 {
        return;
    }
    let eth = buf + HDR;
    match be16(eth + 12) {
        0x0806 if len >= HDR + 14 + 28 => {
            let a = eth + 14;
            let op = be16(a + 6);
            let sender_mac = read6(a + 8);
            let sender_ip = read4(a + 14);
            let target_ip = read4(a + 24);
            if op == 1 && target_ip == n.ip {
                n.send_arp(2, &sender_mac, &sender_ip);
            } else if op == 2 && sender_ip == *want_ip && seen.peer_mac.is_none() {
                seen.peer_mac = Some(sender_mac);
                puts(b"@net arp-reply ip=");
                put_ip(&sender_ip);
                puts(b" mac=");
                put_mac(&sender_mac);
                puts(b"\n");
            }
        }
        0x0800 if len >= HDR + 14 + 28 => {
            let ip = eth + 14;
            let ihl = u64::from(peek::<u8>(ip) & 0xf) * 4;
            if read4(ip + 16) != n.ip {
                return;
            }
            if peek::<u8>(ip + 9) == 6 {
                tcp_in(seen, ip, ihl, len - HDR - 14);
                return;
            }
            if peek::<u8>(ip + 9) != 17 {
                return;
            }
            let udp = ip + ihl;
            let dport = be16(udp + 2);
            let ulen = u64::from(be16(udp + 4)).saturating_sub(8);
            let data = udp + 8;
            if dport == 5000 && !seen.hello {
                seen.hello = true;
                report_hello(&read4(ip + 12), be16(udp), data, ulen);
            } else if dport == 5001 && ulen >= 4 {
                let seq = u32::from(be16(data)) << 16 | u32::from(be16(data + 2));
                let mut ok = u64::from(seq) == seen.burst;
                for i in 4..ulen {
                    ok &= peek::<u8>(data + i) == (seq as u8).wrapping_add(i as u8);
                }
                if !ok {
                    seen.burst_bad += 1;
                }
                seen.burst += 1;
            }
        }
        _ => {}
    }
}

/// A TCP segment for our MMDS connection: the SYN-ACK, then data in order, then FIN.
fn tcp_in(seen: &mut Seen, ip: u64, ihl: u64, ip_room: u64) {
    let tcp = ip + ihl;
    if be16(tcp + 2) != seen.tcp_port {
        return;
    }
    let total = u64::from(be16(ip + 2)).min(ip_room);
    let off = u64::from(peek::<u8>(tcp + 12) >> 4) * 4;
    let data_len = total.saturating_sub(ihl + off);
    let seq = u32::from(be16(tcp + 4)) << 16 | u32::from(be16(tcp + 6));
    let flags = peek::<u8>(tcp + 13);
    if flags & 0x12 == 0x12 {
        seen.tcp_next = Some(seq.wrapping_add(1));
        return;
    }
    let Some(next) = seen.tcp_next else { return };
    if seq != next {
        return;
    }
    for i in 0..data_len.min(RESP_MAX - seen.tcp_len) {
        poke::<u8>(RESP_BUF + seen.tcp_len + i, peek(tcp + off + i));
    }
    seen.tcp_len += data_len;
    let mut next = next.wrapping_add(data_len as u32);
    if flags & 1 != 0 {
        seen.tcp_fin = true;
        next = next.wrapping_add(1);
    }
    seen.tcp_next = Some(next);
}

/// Drains the receive ring: handles every frame and reposts its buffers (unless `hold`, when
/// they are kept back and returned in the list).
fn drain(
    n: &mut Net,
    seen: &mut Seen,
    want_ip: &[u8; 4],
    held: &mut [u16; QSIZE as usize],
    nheld: &mut usize,
    hold: bool,
) {
    let mut notify = false;
    while let Some((id, len)) = n.rx.pop_used() {
        if id >= n.rx_count {
            // The hostile test's read-only buffer, given back empty: not reposted.
            continue;
        }
        let buf = RX_BUFS + u64::from(id) * u64::from(n.rx_size);
        let buffers = if n.features & F_MRG_RXBUF != 0 {
            peek::<u16>(buf + 10)
        } else {
            1
        };
        if buffers > 1 {
            // The frame goes on in the next buffers: the test only merges in place when they
            // are consecutive, which a fresh ring gives; otherwise the frame is counted only.
            seen.buffers_merged += u64::from(buffers);
            let mut ids = [id; 64];
            let mut total = u64::from(len);
            for k in 1..usize::from(buffers).min(64) {
                match n.rx.pop_used() {
                    Some((i2, l2)) => {
                        ids[k] = i2;
                        total += u64::from(l2);
                    }
                    None => break,
                }
            }
            handle(n, seen, buf, u64::from(len).min(total), want_ip);
            for &i in &ids[..usize::from(buffers).min(64)] {
                notify |= n.repost(i);
            }
            continue;
        }
        handle(n, seen, buf, u64::from(len), want_ip);
        if hold {
            held[*nheld] = id;
            *nheld += 1;
        } else {
            notify |= n.repost(id);
        }
    }
    if notify {
        n.notify(0);
    }
}

/// Sends malformed chains on the transmit queue: a frame shorter than its header, a chain
/// with a device-writable buffer, a buffer outside guest memory, and one far too long.
fn hostile(n: &mut Net) {
    let (s0, b0) = n.tx_slot();
    n.send_slot(s0, b0, 4);
    let (s1, b1) = n.tx_slot();
    n.tx.set_desc(s1, b1, 64, 2, 0);
    if n.tx.publish(s1) {
        n.notify(1);
    }
    let (s2, _) = n.tx_slot();
    n.send_slot(s2, 0xff_ffff_0000, 64);
    let (s3, b3) = n.tx_slot();
    n.send_slot(s3, b3, 200_000);
    // A receive buffer the device may not write (read-only), given back empty.
    let id = n.rx_count;
    n.rx.set_desc(id, RX_BUFS, 64, 0, 0);
    n.rx.publish(id);
    n.notify(0);
    puts(b"@net hostile sent=5\n");
}

/// One 64 KiB TCP segment with TSO: the host kernel segments it on the way out.
fn tso(n: &mut Net, dst_mac: &[u8; 6], dst_ip: &[u8; 4]) {
    const PAYLOAD: u64 = 65000;
    const MSS: u16 = 1448;
    let buf = TSO_BUF;
    // virtio_net_hdr: NEEDS_CSUM, GSO_TCPV4, hdr_len, gso_size, csum_start, csum_offset.
    poke::<u8>(buf, 1);
    poke::<u8>(buf + 1, 1);
    poke::<u16>(buf + 2, 14 + 20 + 20);
    poke::<u16>(buf + 4, MSS);
    poke::<u16>(buf + 6, 14 + 20);
    poke::<u16>(buf + 8, 16);
    poke::<u16>(buf + 10, 0);
    let eth = buf + HDR;
    copy(eth, dst_mac);
    copy(eth + 6, &n.mac);
    put_be16(eth + 12, 0x0800);
    let ip = eth + 14;
    let total = 20 + 20 + PAYLOAD;
    poke::<u8>(ip, 0x45);
    poke::<u8>(ip + 1, 0);
    put_be16(ip + 2, total as u16);
    put_be16(ip + 4, 1);
    put_be16(ip + 6, 0x4000);
    poke::<u8>(ip + 8, 64);
    poke::<u8>(ip + 9, 6);
    put_be16(ip + 10, 0);
    copy(ip + 12, &n.ip);
    copy(ip + 16, dst_ip);
    put_be16(ip + 10, !fold(sum16(ip, 20, 0)));
    let tcp = ip + 20;
    put_be16(tcp, 40000);
    put_be16(tcp + 2, 7000);
    copy(tcp + 4, &[0, 0, 0, 1, 0, 0, 0, 0]);
    poke::<u8>(tcp + 12, 5 << 4);
    poke::<u8>(tcp + 13, 0x18); // PSH, ACK
    put_be16(tcp + 14, 65535);
    put_be16(tcp + 18, 0);
    // The payload is whatever is in memory there: the host checks segment count and checksums.
    // Partial checksum: the pseudo-header sum only, for the device (host) to complete.
    let acc = sum16(ip + 12, 8, 6 + 20 + PAYLOAD as u32);
    put_be16(tcp + 16, fold(acc));
    let (slot, _) = n.tx_slot();
    n.send_slot(slot, buf, (HDR + 14 + total) as u32);
    puts(b"@net tso sent bytes=");
    crate::io::put_dec(PAYLOAD);
    puts(b"\n");
}

/// One HTTP request over a fresh TCP connection to port 80 of `dst`; returns the status and
/// where the body is (at RESP_BUF).
fn http(
    n: &mut Net,
    seen: &mut Seen,
    dst_mac: &[u8; 6],
    dst: &[u8; 4],
    port: u16,
    request: &[u8],
) -> (u64, u64, u64) {
    seen.tcp_port = port;
    seen.tcp_next = None;
    seen.tcp_len = 0;
    seen.tcp_fin = false;
    let mut held = [0u16; QSIZE as usize];
    let mut nheld = 0;
    n.send_tcp(dst_mac, dst, port, 80, 1000, 0, 0x02, &[]);
    let mut waits = 0;
    while seen.tcp_next.is_none() && waits < 25 {
        if n.wait(200) {
            drain(n, seen, dst, &mut held, &mut nheld, false);
        }
        waits += 1;
    }
    let Some(next) = seen.tcp_next else {
        return (0, 0, 0);
    };
    n.send_tcp(dst_mac, dst, port, 80, 1001, next, 0x18, request);
    let end_seq = 1001 + request.len() as u32;
    waits = 0;
    while !seen.tcp_fin && waits < 25 {
        // Done once the whole body (per Content-Length) is in.
        if let Some((status, start, len)) = parse_response(seen.tcp_len) {
            if start + len <= seen.tcp_len {
                n.send_tcp(
                    dst_mac,
                    dst,
                    port,
                    80,
                    end_seq,
                    seen.tcp_next.unwrap_or(0),
                    0x11,
                    &[],
                );
                if n.wait(200) {
                    drain(n, seen, dst, &mut held, &mut nheld, false);
                }
                n.send_tcp(
                    dst_mac,
                    dst,
                    port,
                    80,
                    end_seq + 1,
                    seen.tcp_next.unwrap_or(0),
                    0x10,
                    &[],
                );
                return (status, start, len);
            }
        }
        if n.wait(200) {
            drain(n, seen, dst, &mut held, &mut nheld, false);
        } else {
            waits += 1;
        }
    }
    parse_response(seen.tcp_len).unwrap_or((0, 0, 0))
}

/// Status, body offset and Content-Length of the response gathered so far, once its head is in.
fn parse_response(len: u64) -> Option<(u64, u64, u64)> {
    if len < 12 {
        return None;
    }
    let status = (0..3).fold(0u64, |v, i| {
        v * 10 + u64::from(peek::<u8>(RESP_BUF + 9 + i).wrapping_sub(b'0'))
    });
    let mut head_end = None;
    let mut i = 0;
    while i + 3 < len {
        if peek::<u32>(RESP_BUF + i) == u32::from_le_bytes(*b"\r\n\r\n") {
            head_end = Some(i + 4);
            break;
        }
        i += 1;
    }
    let start = head_end?;
    // Content-Length: find the header (the server always sends it).
    let mut body_len = 0;
    let key = b"Content-Length: ";
    let mut j = 0;
    while j + key.len() as u64 <= start {
        if (0..key.len() as u64).all(|k| peek::<u8>(RESP_BUF + j + k) == key[k as usize]) {
            let mut p = RESP_BUF + j + key.len() as u64;
            while peek::<u8>(p).is_ascii_digit() {
                body_len = body_len * 10 + u64::from(peek::<u8>(p) - b'0');
                p += 1;
            }
            break;
        }
        j += 1;
    }
    Some((status, start, body_len))
}

fn report_http(tag: &[u8], (status, start, len): (u64, u64, u64)) {
    puts(b"@mmds ");
    puts(tag);
    field(b"status", status, false);
    puts(b" body=");
    for i in 0..len.min(200) {
        putc(peek(RESP_BUF + start + i));
    }
    puts(b"\n");
}

/// Reads a key from MMDS over V1 or V2 (`vireo.netmmds=1|2`), and for V2 shows that a read
/// without a token is refused.
fn mmds_test(
    info: &crate::boot::BootInfo,
    n: &mut Net,
    seen: &mut Seen,
    mmds_ip: [u8; 4],
    v2: bool,
) {
    let key = info
        .option_value(b"vireo.netmmdskey")
        .unwrap_or(b"/latest/meta-data/key");
    let mut req = [0u8; 512];
    let mut len = 0;
    let push = |b: &[u8], req: &mut [u8; 512], len: &mut usize| {
        req[*len..*len + b.len()].copy_from_slice(b);
        *len += b.len();
    };
    let mac = seen.peer_mac.unwrap_or([0; 6]);
    let mut token = [0u8; 128];
    let mut token_len = 0;
    if v2 {
        let t = http(n, seen, &mac, &mmds_ip, 41000, b"PUT /latest/api/token HTTP/1.1\r\nHost: mmds\r\nX-metadata-token-ttl-seconds: 60\r\n\r\n");
        token_len = t.2.min(128) as usize;
        for (i, b) in token[..token_len].iter_mut().enumerate() {
            *b = peek(RESP_BUF + t.1 + i as u64);
        }
        puts(b"@mmds token");
        field(b"status", t.0, false);
        field(b"len", token_len as u64, false);
        puts(b"\n");
        push(b"GET ", &mut req, &mut len);
        push(key, &mut req, &mut len);
        push(b" HTTP/1.1\r\nHost: mmds\r\n\r\n", &mut req, &mut len);
        let r = http(n, seen, &mac, &mmds_ip, 41001, &req[..len]);
        report_http(b"notoken", r);
        len = 0;
    }
    push(b"GET ", &mut req, &mut len);
    push(key, &mut req, &mut len);
    push(b" HTTP/1.1\r\nHost: mmds\r\n", &mut req, &mut len);
    if v2 {
        push(b"X-metadata-token: ", &mut req, &mut len);
        push(&token[..token_len], &mut req, &mut len);
        push(b"\r\n", &mut req, &mut len);
    }
    push(b"\r\n", &mut req, &mut len);
    let r = http(n, seen, &mac, &mmds_ip, 41002, &req[..len]);
    report_http(b"get", r);
}

fn option_u64(info: &crate::boot::BootInfo, key: &[u8], default: u64) -> u64 {
    info.option_value(key)
        .and_then(parse_u64)
        .unwrap_or(default)
}

/// The network test on the first virtio-net device.
pub fn test(info: &crate::boot::BootInfo, slot: usize, base: u64, irq: u32, bsp: u8) {
    let ip = info
        .option_value(b"vireo.netip")
        .and_then(parse_ip)
        .unwrap_or([10, 0, 0, 2]);
    let host = info
        .option_value(b"vireo.nethost")
        .and_then(parse_ip)
        .unwrap_or([10, 0, 0, 1]);
    let peer = info.option_value(b"vireo.netpeer").and_then(parse_ip);
    let mmds = info.option_value(b"vireo.netmmds");
    let mmds_ip = info
        .option_value(b"vireo.netmmdsip")
        .and_then(parse_ip)
        .unwrap_or([169, 254, 169, 254]);
    let target = if mmds.is_some() {
        mmds_ip
    } else {
        peer.unwrap_or(host)
    };
    let burst = option_u64(info, b"vireo.netburst", 0);
    let rx_count = option_u64(info, b"vireo.netrx", 64).clamp(1, u64::from(QSIZE) - 1) as u16;
    let rx_size = option_u64(info, b"vireo.netbuf", 2048).clamp(64, 65562) as u32;
    let mrg = info.option_value(b"vireo.netmrg") != Some(b"0");
    let pause_at = info.option_value(b"vireo.netpause").and_then(parse_u64);
    let bench = info.has_option(b"vireo.netbench");
    // The benchmark takes 64 KiB segments from the host too.
    let extra = if bench || info.has_option(b"vireo.netcsum") {
        F_GUEST_CSUM | F_GUEST_TSO4
    } else {
        0
    };
    let rx_count = if bench { QSIZE - 1 } else { rx_count };
    let mut n = match Net::init(base, irq, mrg, extra, rx_count, rx_size, ip, bsp) {
        Ok(n) => n,
        Err(e) => {
            puts(b"@net error=");
            puts(e);
            puts(b"\n");
            return;
        }
    };
    puts(b"@net");
    field(b"dev", slot as u64, false);
    puts(b" mac=");
    put_mac(&n.mac);
    field(b"mac_offered", u64::from(n.features & F_MAC != 0), false);
    field(b"status", u64::from(n.config_u16(6)), false);
    field(
        b"mtu",
        if n.features & F_MTU != 0 {
            u64::from(n.config_u16(10))
        } else {
            0
        },
        false,
    );
    field(b"mrg", u64::from(n.features & F_MRG_RXBUF != 0), false);
    field(b"features", n.features, true);
    puts(b"\n");

    if bench {
        run_bench(info, &mut n);
        return;
    }
    let mut seen = Seen::default();
    let mut held = [0u16; QSIZE as usize];
    let mut nheld = 0usize;
    if info.has_option(b"vireo.nethostile") {
        hostile(&mut n);
    }
    // Resolve the host (or peer), asking again every 200 ms.
    let mut tries = 0;
    while seen.peer_mac.is_none() && tries < 50 {
        n.send_arp(1, &[0; 6], &target);
        tries += 1;
        if n.wait(200) {
            drain(&mut n, &mut seen, &target, &mut held, &mut nheld, false);
        }
    }
    let Some(dst) = seen.peer_mac else {
        puts(b"@net error=no ARP reply\n");
        return;
    };
    if info.has_option(b"vireo.netarp") {
        return;
    }
    if let Some(v) = mmds {
        mmds_test(info, &mut n, &mut seen, mmds_ip, v == b"2");
        return;
    }
    if info.has_option(b"vireo.nettso") {
        let to = info
            .option_value(b"vireo.nettsodst")
            .and_then(parse_ip)
            .unwrap_or(host);
        tso(&mut n, &dst, &to);
        // Let the device take it before the guest powers off.
        n.wait(200);
        return;
    }
    let hello = b"hello from vireo";
    if peer.is_some() {
        // Another guest: send until its hello has come (it may start later), then a few more.
        let mut extra = 0;
        let mut rounds = 0;
        while extra < 3 && rounds < 300 {
            n.send_udp(&dst, &target, 5000, 5000, hello, true);
            if seen.hello {
                extra += 1;
            }
            rounds += 1;
            if n.wait(100) {
                drain(&mut n, &mut seen, &target, &mut held, &mut nheld, false);
            }
        }
        puts(b"@net peer-done hello=");
        crate::io::put_dec(u64::from(seen.hello));
        puts(b"\n");
        return;
    }
    n.send_udp(&dst, &target, 5000, 6000, hello, true);
    let mut payload = [0u8; 64];
    for seq in 0..burst {
        payload[..4].copy_from_slice(&(seq as u32).to_be_bytes());
        for (i, b) in payload.iter_mut().enumerate().skip(4) {
            *b = (seq as u8).wrapping_add(i as u8);
        }
        n.send_udp(&dst, &target, 5001, 6001, &payload, false);
        // Answer the host's ARP and keep the receive ring moving meanwhile.
        drain(&mut n, &mut seen, &target, &mut held, &mut nheld, false);
    }
    puts(b"@net ready");
    field(b"sent", burst + 1, false);
    puts(b"\n");

    // Receive the host's hello and burst; stall once if asked.
    let mut idle = 0;
    while (!seen.hello || seen.burst < burst) && idle < 100 {
        let hold = pause_at.is_some_and(|p| seen.burst >= p && nheld == 0 && idle == 0);
        if n.wait(200) {
            idle = 0;
            drain(&mut n, &mut seen, &target, &mut held, &mut nheld, false);
        } else {
            idle += 1;
        }
        if hold {
            // Stop posting: keep every buffer the device hands back for about a second.
            puts(b"@net pause at=");
            crate::io::put_dec(seen.burst);
            puts(b"\n");
            let expiries = apic::timer_irqs();
            apic::start_watchdog(1000);
            while apic::timer_irqs() == expiries {
                drain(&mut n, &mut seen, &target, &mut held, &mut nheld, true);
                n.rx.arm();
                // SAFETY: wait for an interrupt.
                unsafe { core::arch::asm!("sti; hlt; cli", options(nomem, nostack)) };
            }
            drain(&mut n, &mut seen, &target, &mut held, &mut nheld, true);
            let mut notify = false;
            for &id in &held[..nheld] {
                notify |= n.repost(id);
            }
            if notify || nheld > 0 {
                n.notify(0);
            }
            puts(b"@net resume held=");
            crate::io::put_dec(nheld as u64);
            puts(b"\n");
        }
    }
    puts(b"@net burst-rx");
    field(b"count", seen.burst, false);
    field(b"bad", seen.burst_bad, false);
    field(b"frames", seen.frames, false);
    field(b"merged", seen.buffers_merged, false);
    field(b"notifies", n.notifies, false);
    puts(b"\n");
}

fn bench_phase(name: &[u8], end: Option<(u64, u64, &Net, u32)>) {
    puts(b"@bench phase=");
    puts(name);
    match end {
        None => puts(b" start\n"),
        Some((frames, bytes, n, irqs)) => {
            puts(b" end");
            field(b"frames", frames, false);
            field(b"bytes", bytes, false);
            field(b"notifies", n.notifies, false);
            field(b"irqs", u64::from(irqs), false);
            puts(b"\n");
        }
    }
}

/// The network benchmark: frames of `vireo.netbenchsize` bytes (64, 1500, or 65000 as TCP
/// segments with TSO) sent `vireo.netbenchcount` times to a MAC nobody has (the host drops
/// them at once), then frames received from the host counted until it stops. The guest never
/// touches payload: every transmit descriptor points at one prepared frame, and receive
/// buffers are reposted unread.
fn run_bench(info: &crate::boot::BootInfo, n: &mut Net) {
    let size = option_u64(info, b"vireo.netbenchsize", 1500).clamp(60, 65000);
    let count = option_u64(info, b"vireo.netbenchcount", 100_000);
    // One frame to send over and over: header, Ethernet, IPv4, TCP, payload left as it is.
    let buf = TSO_BUF;
    for i in 0..HDR + 54 {
        poke::<u8>(buf + i, 0);
    }
    let tso = size > 1514;
    if tso {
        poke::<u8>(buf, 1);
        poke::<u8>(buf + 1, 1);
        poke::<u16>(buf + 2, 54);
        poke::<u16>(buf + 4, 1448);
        poke::<u16>(buf + 6, 34);
        poke::<u16>(buf + 8, 16);
    }
    let eth = buf + HDR;
    copy(eth, &[0x02, 0, 0, 0, 0x99, 0x99]);
    copy(eth + 6, &n.mac);
    put_be16(eth + 12, 0x0800);
    let ip = eth + 14;
    let ip_len = size.saturating_sub(14).max(40);
    poke::<u8>(ip, 0x45);
    put_be16(ip + 2, ip_len as u16);
    poke::<u8>(ip + 8, 64);
    poke::<u8>(ip + 9, 6);
    copy(ip + 12, &n.ip);
    copy(ip + 16, &[10, 0, 0, 99]);
    put_be16(ip + 10, !fold(sum16(ip, 20, 0)));
    poke::<u8>(ip + 32, 5 << 4);
    let frame_len = (HDR + size) as u32;
    for i in 0..QSIZE {
        n.tx.set_desc(i, buf, frame_len, 0, 0);
    }
    let irqs0 = apic::virtio_irqs();
    bench_phase(b"tx", None);
    let mut sent = 0u64;
    let mut done = 0u64;
    while done < count {
        let mut notify = false;
        while sent < count && n.tx.avail_idx.wrapping_sub(n.tx.used_idx()) < QSIZE {
            notify |= n.tx.publish((sent % u64::from(QSIZE)) as u16);
            sent += 1;
        }
        if notify {
            n.notify(1);
        }
        let used = n.tx.used_idx();
        done = sent - u64::from(n.tx.avail_idx.wrapping_sub(used));
        if done < count && n.tx.avail_idx.wrapping_sub(used) >= QSIZE {
            // Ring full: ask for an interrupt when half of it is back, and sleep until then.
            poke::<u16>(
                n.tx.avail + 4 + u64::from(QSIZE) * 2,
                used.wrapping_add(QSIZE / 2),
            );
            fence(Ordering::SeqCst);
            if n.tx.used_idx() == used {
                let expiries = apic::timer_irqs();
                apic::start_watchdog(50);
                while n.tx.used_idx() == used && apic::timer_irqs() == expiries {
                    // SAFETY: wait for the device's interrupt or the watchdog.
                    unsafe { core::arch::asm!("sti; hlt; cli", options(nomem, nostack)) };
                }
                apic::stop_watchdog();
            }
        }
    }
    bench_phase(
        b"tx",
        Some((count, count * size, n, apic::virtio_irqs() - irqs0)),
    );

    // Receive until the host has been quiet for half a second.
    let irqs0 = apic::virtio_irqs();
    n.notifies = 0;
    bench_phase(b"rx", None);
    let (mut frames, mut bytes) = (0u64, 0u64);
    let mut started = false;
    loop {
        let mut notify = false;
        let mut got = false;
        while let Some((id, len)) = n.rx.pop_used() {
            got = true;
            let b = RX_BUFS + u64::from(id) * u64::from(n.rx_size);
            let buffers = if n.features & F_MRG_RXBUF != 0 {
                peek::<u16>(b + 10)
            } else {
                1
            };
            let mut total = u64::from(len);
            for _ in 1..buffers {
                if let Some((id2, l2)) = n.rx.pop_used() {
                    total += u64::from(l2);
                    notify |= n.repost(id2);
                }
            }
            notify |= n.repost(id);
            frames += 1;
            bytes += total.saturating_sub(HDR);
        }
        if notify {
            n.notify(0);
        }
        if got {
            started = true;
            continue;
        }
        if !n.wait(if started { 500 } else { 20_000 }) {
            break;
        }
    }
    bench_phase(b"rx", Some((frames, bytes, n, apic::virtio_irqs() - irqs0)));
}
