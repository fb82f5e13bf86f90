//! A virtio-vsock driver (receive, transmit and event queues) and the test the host suite asks
//! for with `vireo.vsocktest`:
//!
//! * connect to host port 6000 (a listener at `PATH_6000`) and send a line, then to host port
//!   6001 (nobody listens: RST expected), reporting each outcome;
//! * report `@vsock ready`, accept the host's connection to port 5000, receive
//!   `vireo.vsockbytes` bytes (default 100000) checking every one, with a small receive buffer
//!   (`buf_alloc` 16 KiB) so that the host must wait for credit, then send as many back and
//!   shut the connection down.
//!
//! With `vireo.vsockevents` it only posts event buffers and reports each event (a restored
//! device sends TRANSPORT_RESET).
//!
//! Stream byte `i` is `(i * 7 + seed) % 251` (seed 0 host to guest, 1 guest to host).

use crate::io::{peek, poke, puts};
use crate::ring::Queue;
use crate::{apic, field};
use core::sync::atomic::{fence, Ordering};

const QSIZE: u16 = 64;
const BASE: u64 = 0x300_0000;
const RINGS: [u64; 3] = [BASE, BASE + 0x4000, BASE + 0x8000];
const RX_BUFS: u64 = BASE + 0x10_0000;
const TX_BUFS: u64 = BASE + 0x20_0000;
const BUF: u64 = 4096;
const HDR: u64 = 44;
const HOST_CID: u64 = 2;
/// Receive buffer the guest advertises: small, so flow control is exercised.
const GUEST_BUF: u32 = 16 * 1024;

const REQUEST: u16 = 1;
const RESPONSE: u16 = 2;
const RST: u16 = 3;
const SHUTDOWN: u16 = 4;
const RW: u16 = 5;
const CREDIT_UPDATE: u16 = 6;

/// Publishes a one-buffer chain in descriptor `id`.
fn publish(q: &mut Queue, id: u16, addr: u64, len: u32, write: bool) {
    q.set_desc(id, addr, len, if write { 2 } else { 0 }, 0);
    q.publish(id);
}

/// One packet header as the guest reads it.
#[derive(Clone, Copy, Default)]
struct Pkt {
    src_port: u32,
    dst_port: u32,
    len: u32,
    op: u16,
    buf_alloc: u32,
    fwd_cnt: u32,
}

struct Vsock {
    base: u64,
    cid: u64,
    rx: Queue,
    tx: Queue,
    events: Queue,
    tx_next: u16,
    /// The receive buffer advertised to the host.
    buf_alloc: u32,
}

/// The connection the test serves: ports, credit both ways, bytes in and out.
#[derive(Default)]
struct Conn {
    local: u32,
    peer: u32,
    peer_buf: u32,
    peer_fwd: u32,
    tx_cnt: u32,
    fwd_cnt: u32,
    fwd_sent: u32,
    received: u64,
    bad: u64,
    closed: bool,
}

fn pattern(i: u64, seed: u64) -> u8 {
    ((i * 7 + seed) % 251) as u8
}

impl Vsock {
    fn init(base: u64, irq: u32, bsp: u8) -> Result<Vsock, &'static [u8]> {
        let reg = |o: u64| peek::<u32>(base + o);
        let set = |o: u64, v: u32| poke::<u32>(base + o, v);
        // ACKNOWLEDGE, then DRIVER: devices may insist on the order (virtio 1.2, 3.1.1).
        set(0x70, 0);
        set(0x70, 1);
        set(0x70, 3);
        set(0x14, 0);
        let lo = reg(0x10);
        set(0x14, 1);
        let hi = reg(0x10);
        if hi & 1 == 0 {
            return Err(b"no VERSION_1");
        }
        // VERSION_1, and EVENT_IDX and IN_ORDER where offered (Firecracker offers IN_ORDER and
        // refuses a driver that drops it); nothing else.
        set(0x24, 0);
        set(0x20, lo & (1 << 29));
        set(0x24, 1);
        set(0x20, hi & (1 | 1 << 3));
        set(0x70, 11);
        if reg(0x70) & 8 == 0 {
            return Err(b"FEATURES_OK refused");
        }
        let queues = RINGS.map(|ring| Queue::new(ring, QSIZE));
        for (i, q) in queues.iter().enumerate() {
            set(0x30, i as u32);
            set(0x38, u32::from(QSIZE));
            for (off, a) in [(0x80, q.desc), (0x90, q.avail), (0xa0, q.used)] {
                set(off, a as u32);
                set(off + 4, (a >> 32) as u32);
            }
            set(0x44, 1);
        }
        let [rx, tx, events] = queues;
        apic::route_irq(irq, apic::VIRTIO_VECTOR, bsp);
        set(0x70, 15);
        let mut v = Vsock {
            base,
            cid: u64::from(reg(0x100)) | u64::from(reg(0x104)) << 32,
            rx,
            tx,
            events,
            tx_next: 0,
            buf_alloc: GUEST_BUF,
        };
        for i in 0..QSIZE {
            publish(&mut v.rx, i, RX_BUFS + u64::from(i) * BUF, BUF as u32, true);
        }
        set(0x50, 0);
        Ok(v)
    }

    /// Where the next packet's payload goes (after waiting for a free slot: the device
    /// completes transmits at once).
    fn peek_tx_data(&mut self) -> u64 {
        let expiries = apic::timer_irqs();
        apic::start_watchdog(100);
        while self
            .tx
            .avail_idx
            .wrapping_sub(peek::<u16>(self.tx.used + 2))
            >= QSIZE
            && apic::timer_irqs() == expiries
        {
            core::hint::spin_loop();
        }
        apic::stop_watchdog();
        TX_BUFS + u64::from(self.tx_next) * BUF + HDR
    }

    /// Sends a packet of `len` bytes of the guest's stream pattern.
    fn send(&mut self, c: &mut Conn, op: u16, flags: u32, len: u32) {
        let data = self.peek_tx_data();
        for i in 0..u64::from(len) {
            poke::<u8>(data + i, pattern(u64::from(c.tx_cnt) + i, 1));
        }
        self.send_packet(c, op, flags, len);
    }

    /// Sends a packet whose `len` payload bytes are already in place.
    fn send_raw(&mut self, c: &mut Conn, op: u16, len: u32) {
        self.peek_tx_data();
        self.send_packet(c, op, 0, len);
    }

    fn send_packet(&mut self, c: &mut Conn, op: u16, flags: u32, len: u32) {
        let slot = self.tx_next;
        self.tx_next = (slot + 1) % QSIZE;
        let b = TX_BUFS + u64::from(slot) * BUF;
        poke(b, self.cid);
        poke(b + 8, HOST_CID);
        poke(b + 16, c.local);
        poke(b + 20, c.peer);
        poke(b + 24, len);
        poke::<u16>(b + 28, 1);
        poke(b + 30, op);
        poke(b + 32, flags);
        poke(b + 36, self.buf_alloc);
        poke(b + 40, c.fwd_cnt);
        c.tx_cnt = c.tx_cnt.wrapping_add(len);
        c.fwd_sent = c.fwd_cnt;
        publish(&mut self.tx, slot, b, (HDR as u32) + len, false);
        poke::<u32>(self.base + 0x50, 1);
    }

    /// Waits up to `ms` (0: does not wait) for a received packet; returns it with where its
    /// data is.
    fn recv(&mut self, ms: u32) -> Option<(Pkt, u64, u16)> {
        if ms == 0 && peek::<u16>(self.rx.used + 2) == self.rx.used_seen {
            return None;
        }
        let expiries = apic::timer_irqs();
        apic::start_watchdog(ms);
        loop {
            if let Some((id, _len)) = self.rx.pop_used() {
                apic::stop_watchdog();
                let b = RX_BUFS + u64::from(id) * BUF;
                let p = Pkt {
                    src_port: peek(b + 16),
                    dst_port: peek(b + 20),
                    len: peek(b + 24),
                    op: peek(b + 30),
                    buf_alloc: peek(b + 36),
                    fwd_cnt: peek(b + 40),
                };
                return Some((p, b + HDR, id));
            }
            if apic::timer_irqs() != expiries {
                return None;
            }
            // Ask for an interrupt at the next used entry, then sleep.
            poke::<u16>(self.rx.avail + 4 + u64::from(QSIZE) * 2, self.rx.used_seen);
            fence(Ordering::SeqCst);
            if peek::<u16>(self.rx.used + 2) != self.rx.used_seen {
                continue;
            }
            // SAFETY: wait for the device (or watchdog) interrupt.
            unsafe { core::arch::asm!("sti; hlt; cli", options(nomem, nostack)) };
            let isr = peek::<u32>(self.base + 0x60);
            poke::<u32>(self.base + 0x64, isr);
        }
    }

    fn repost(&mut self, id: u16) {
        publish(
            &mut self.rx,
            id,
            RX_BUFS + u64::from(id) * BUF,
            BUF as u32,
            true,
        );
        poke::<u32>(self.base + 0x50, 0);
    }

    /// Connects to host port `port` from `local`: the answer's operation (RESPONSE or RST).
    fn connect(&mut self, local: u32, port: u32) -> u16 {
        let mut c = Conn {
            local,
            peer: port,
            ..Default::default()
        };
        self.send(&mut c, REQUEST, 0, 0);
        let mut answer = 0;
        for _ in 0..20 {
            let Some((p, _, id)) = self.recv(250) else {
                continue;
            };
            self.repost(id);
            if p.dst_port == local && p.src_port == port {
                answer = p.op;
                break;
            }
        }
        if answer == RESPONSE {
            c.peer_buf = 256 * 1024;
            self.send(&mut c, RW, 0, 20);
            self.send(&mut c, SHUTDOWN, 3, 0);
        }
        answer
    }
}

fn report_connect(port: u32, op: u16) {
    puts(b"@vsock connect");
    field(b"port", u64::from(port), false);
    puts(match op {
        RESPONSE => b" result=response\n" as &[u8],
        RST => b" result=rst\n",
        _ => b" result=none\n",
    });
}

/// Echo mode (`vireo.vsockecho=N`): accepts connections to port 5000 (and refuses others) and
/// sends every byte back on the connection it came from, until N connections have been served
/// and closed.
fn echo(v: &mut Vsock, want: u64) {
    let mut served = 0u64;
    let mut idle = 0;
    puts(b"@vsock ready\n");
    while served < want && idle < 120 {
        let Some((p, data, id)) = v.recv(250) else {
            idle += 1;
            continue;
        };
        idle = 0;
        let mut c = Conn {
            local: p.dst_port,
            peer: p.src_port,
            peer_buf: p.buf_alloc,
            peer_fwd: p.fwd_cnt,
            ..Default::default()
        };
        match p.op {
            REQUEST if p.dst_port == 5000 => v.send(&mut c, RESPONSE, 0, 0),
            // Nobody listens on any other port: refused, as Linux does.
            REQUEST => v.send(&mut c, RST, 0, 0),
            RW => {
                // Echo: the payload goes back as it came (it is well within every credit).
                let n = p.len.min((BUF - HDR) as u32);
                let slot_data = v.peek_tx_data();
                for i in 0..u64::from(n) {
                    poke::<u8>(slot_data + i, peek::<u8>(data + i));
                }
                v.send_raw(&mut c, RW, n);
            }
            SHUTDOWN => {
                v.send(&mut c, RST, 0, 0);
                served += 1;
            }
            _ => {}
        }
        v.repost(id);
    }
    puts(b"@vsock echo");
    field(b"served", served, false);
    puts(b"\n");
}

/// Benchmark mode (`vireo.vsockbench=BYTES`): sinks every connection to port 5000 without
/// reading the bytes (credit returned as they arrive), and answers a connection to port 5001
/// by sending BYTES from one untouched buffer, then shutting it down.
/// Credit bookkeeping of the sink connections, by the host's port.
type Sinks = [(u32, u32, u32); 64];

/// Sinks one packet for a connection to port 5000: accepts, takes data (returning credit a
/// quarter of the buffer at a time), answers a shutdown with RST.
fn sink(v: &mut Vsock, sinks: &mut Sinks, p: &Pkt) {
    let slot = (p.src_port % 64) as usize;
    if sinks[slot].0 != p.src_port {
        sinks[slot] = (p.src_port, 0, 0);
    }
    let mut c = Conn {
        local: p.dst_port,
        peer: p.src_port,
        peer_buf: p.buf_alloc,
        peer_fwd: p.fwd_cnt,
        fwd_cnt: sinks[slot].1,
        fwd_sent: sinks[slot].2,
        ..Default::default()
    };
    match p.op {
        REQUEST if p.dst_port == 5000 => v.send(&mut c, RESPONSE, 0, 0),
        RW => {
            c.fwd_cnt = c.fwd_cnt.wrapping_add(p.len);
            if c.fwd_cnt.wrapping_sub(c.fwd_sent) >= v.buf_alloc / 4 {
                v.send(&mut c, CREDIT_UPDATE, 0, 0);
            }
        }
        SHUTDOWN => v.send(&mut c, RST, 0, 0),
        _ => {}
    }
    sinks[slot] = (p.src_port, c.fwd_cnt, c.fwd_sent);
}

/// Benchmark mode (`vireo.vsockbench=BYTES`): sinks every connection to port 5000 without
/// reading the bytes, and answers a connection to port 5001 by sending BYTES from one
/// untouched buffer (serving the sinks meanwhile), then shutting it down, or stopping at a
/// reset.
fn bench(v: &mut Vsock, total: u64) {
    let mut sinks: Sinks = [(0, 0, 0); 64];
    // What the posted buffers hold: the host may send that much before waiting.
    v.buf_alloc = u32::from(QSIZE) * (BUF - HDR) as u32;
    puts(b"@vsock ready\n");
    let mut idle = 0;
    while idle < 240 {
        let Some((p, _, id)) = v.recv(250) else {
            idle += 1;
            continue;
        };
        idle = 0;
        v.repost(id);
        if !(p.op == REQUEST && p.dst_port == 5001) {
            sink(v, &mut sinks, &p);
            continue;
        }
        let mut c = Conn {
            local: p.dst_port,
            peer: p.src_port,
            peer_buf: p.buf_alloc,
            peer_fwd: p.fwd_cnt,
            ..Default::default()
        };
        v.send(&mut c, RESPONSE, 0, 0);
        let (mut sent, mut waits, mut reset) = (0u64, 0, false);
        while sent < total && waits < 400 && !reset {
            let credit = c.peer_buf.saturating_sub(c.tx_cnt.wrapping_sub(c.peer_fwd));
            let n = (total - sent).min(BUF - HDR).min(u64::from(credit)) as u32;
            if let Some((q, _, id)) = v.recv(if n == 0 { 250 } else { 0 }) {
                v.repost(id);
                if q.src_port == c.peer && q.dst_port == c.local {
                    c.peer_buf = q.buf_alloc;
                    c.peer_fwd = q.fwd_cnt;
                    reset = q.op == RST;
                } else {
                    sink(v, &mut sinks, &q);
                }
                continue;
            }
            if n == 0 {
                waits += 1;
                continue;
            }
            v.peek_tx_data();
            v.send_raw(&mut c, RW, n);
            sent += u64::from(n);
        }
        if !reset {
            v.send(&mut c, SHUTDOWN, 3, 0);
        }
        puts(b"@vsock bench sent");
        field(b"bytes", sent, false);
        field(b"reset", u64::from(reset), false);
        puts(b"\n");
        return;
    }
}

/// The vsock test on the device at `base`.
/// Where event buffers go.
const EVENT_BUFS: u64 = BASE + 0x30_0000;
const EVENT_SLOTS: u16 = 4;

/// `vireo.vsockevents`: posts buffers on the event queue and reports every event the device
/// sends (`@vsock event id=N`; 0 is TRANSPORT_RESET), forever, waking every 20 ms.
fn events(v: &mut Vsock) -> ! {
    for i in 0..EVENT_SLOTS {
        poke::<u32>(EVENT_BUFS + u64::from(i) * 16, 0xffff_ffff);
        publish(&mut v.events, i, EVENT_BUFS + u64::from(i) * 16, 4, true);
    }
    poke::<u32>(v.base + 0x50, 2);
    puts(b"@vsock events posted\n");
    loop {
        while let Some((id, len)) = v.events.pop_used() {
            puts(b"@vsock event");
            field(
                b"id",
                u64::from(peek::<u32>(EVENT_BUFS + u64::from(id) * 16)),
                false,
            );
            field(b"len", u64::from(len), false);
            puts(b"\n");
            poke::<u32>(EVENT_BUFS + u64::from(id) * 16, 0xffff_ffff);
            publish(&mut v.events, id, EVENT_BUFS + u64::from(id) * 16, 4, true);
            poke::<u32>(v.base + 0x50, 2);
        }
        v.events.arm();
        let before = apic::timer_irqs();
        apic::start_watchdog(20);
        while apic::timer_irqs() == before && v.events.used_idx() == v.events.used_seen {
            // SAFETY: wait for the device or the timer; the handlers only count.
            unsafe { core::arch::asm!("sti; hlt; cli", options(nomem, nostack)) };
        }
        let isr = peek::<u32>(v.base + 0x60);
        poke::<u32>(v.base + 0x64, isr);
    }
}

pub fn test(info: &crate::boot::BootInfo, base: u64, irq: u32, bsp: u8) {
    let total = info
        .option_value(b"vireo.vsockbytes")
        .or(info.option_value(b"vireo.vsockbench"))
        .and_then(|v| {
            v.iter().try_fold(0u64, |a, &c| {
                c.is_ascii_digit().then(|| a * 10 + u64::from(c - b'0'))
            })
        })
        .unwrap_or(100_000);
    let mut v = match Vsock::init(base, irq, bsp) {
        Ok(v) => v,
        Err(e) => {
            puts(b"@vsock error=");
            puts(e);
            puts(b"\n");
            return;
        }
    };
    puts(b"@vsock");
    field(b"cid", v.cid, false);
    puts(b"\n");
    if info.option_value(b"vireo.vsockbench").is_some() {
        bench(&mut v, total);
        return;
    }
    if info.has_option(b"vireo.vsockevents") {
        events(&mut v);
    }
    if let Some(n) = info.option_value(b"vireo.vsockecho") {
        let n = n
            .iter()
            .try_fold(0u64, |a, &c| {
                c.is_ascii_digit().then(|| a * 10 + u64::from(c - b'0'))
            })
            .unwrap_or(1);
        echo(&mut v, n);
        return;
    }
    let r = v.connect(40000, 6000);
    report_connect(6000, r);
    let r = v.connect(40001, 6001);
    report_connect(6001, r);
    puts(b"@vsock ready\n");

    // Serve one host connection to port 5000.
    let mut c = Conn::default();
    let mut idle = 0;
    while !c.closed && idle < 80 {
        let Some((p, data, id)) = v.recv(250) else {
            idle += 1;
            continue;
        };
        idle = 0;
        c.peer_buf = p.buf_alloc;
        c.peer_fwd = p.fwd_cnt;
        match p.op {
            REQUEST if p.dst_port == 5000 => {
                c.local = 5000;
                c.peer = p.src_port;
                puts(b"@vsock accepted");
                field(b"from", u64::from(p.src_port), false);
                puts(b"\n");
                v.repost(id);
                v.send(&mut c, RESPONSE, 0, 0);
                continue;
            }
            RW if p.dst_port == c.local && c.local != 0 => {
                for i in 0..u64::from(p.len) {
                    if peek::<u8>(data + i) != pattern(c.received + i, 0) {
                        c.bad += 1;
                    }
                }
                c.received += u64::from(p.len);
                c.fwd_cnt = c.fwd_cnt.wrapping_add(p.len);
                v.repost(id);
                if c.fwd_cnt.wrapping_sub(c.fwd_sent) >= GUEST_BUF / 2 {
                    v.send(&mut c, CREDIT_UPDATE, 0, 0);
                }
                if c.received >= total {
                    puts(b"@vsock received");
                    field(b"bytes", c.received, false);
                    field(b"bad", c.bad, false);
                    puts(b"\n");
                    // Send as much back, within the host's credit.
                    let mut sent = 0u64;
                    let mut waits = 0;
                    let mut reset = false;
                    while sent < total && waits < 200 && !reset {
                        // Packets from the host meanwhile: credit updates, or a reset when the
                        // host side went away.
                        let credit = c.peer_buf.saturating_sub(c.tx_cnt.wrapping_sub(c.peer_fwd));
                        let n = (total - sent).min(BUF - HDR).min(u64::from(credit)) as u32;
                        let wait = if n == 0 { 250 } else { 0 };
                        if let Some((p, _, id)) = v.recv(wait) {
                            reset = p.op == RST;
                            c.peer_buf = p.buf_alloc;
                            c.peer_fwd = p.fwd_cnt;
                            v.repost(id);
                            continue;
                        }
                        if n == 0 {
                            waits += 1;
                            continue;
                        }
                        v.send(&mut c, RW, 0, n);
                        sent += u64::from(n);
                    }
                    puts(b"@vsock sent");
                    field(b"bytes", sent, false);
                    field(b"reset", u64::from(reset), false);
                    puts(b"\n");
                    if !reset {
                        v.send(&mut c, SHUTDOWN, 3, 0);
                    }
                    c.closed = true;
                }
                continue;
            }
            SHUTDOWN | RST => c.closed = c.local != 0 && p.dst_port == c.local,
            _ => {}
        }
        v.repost(id);
    }
}
