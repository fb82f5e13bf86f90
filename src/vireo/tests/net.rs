//! virtio-net end to end: the test guest's driver talks to the host kernel through a TAP in a
//! private network namespace (ARP, UDP, bursts each way), with small buffers, with a guest that
//! stops posting buffers, with hostile chains, and two guests on a bridge. Frames are checked
//! byte for byte at both ends; vireo's counters come from its metrics file.

mod common;
use common::*;
use std::io::{BufRead, BufReader, Read};
use std::net::UdpSocket;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const GUEST_MAC: &str = "02:00:00:00:00:02";

struct Vm {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    stderr: std::thread::JoinHandle<String>,
    metrics: PathBuf,
}

/// Starts the test guest from a Firecracker config file with `interfaces` as
/// `(tap, guest_mac)` and a metrics file.
fn start(
    dir: &Path,
    name: &str,
    kind: &str,
    interfaces: &[(&str, Option<&str>)],
    args: &str,
) -> Vm {
    start_with(dir, name, kind, interfaces, args, &serde_json::json!({}))
}

/// [`start`], with `extra` fields (rate limiters) on every interface.
fn start_with(
    dir: &Path,
    name: &str,
    kind: &str,
    interfaces: &[(&str, Option<&str>)],
    args: &str,
    extra: &serde_json::Value,
) -> Vm {
    let metrics = dir.join(format!("{name}.metrics"));
    let nets: Vec<serde_json::Value> = interfaces
        .iter()
        .enumerate()
        .map(|(i, (tap, mac))| {
            let mut v = serde_json::json!({ "iface_id": format!("eth{i}"), "host_dev_name": tap });
            if let Some(m) = mac {
                v["guest_mac"] = serde_json::json!(m);
            }
            for (k, x) in extra.as_object().into_iter().flatten() {
                v[k] = x.clone();
            }
            v
        })
        .collect();
    let cfg = serde_json::json!({
        "boot-source": {
            "kernel_image_path": guest(kind),
            "boot_args": format!("console=ttyS0 vireo.nettest {args}"),
        },
        "machine-config": { "vcpu_count": 1, "mem_size_mib": 128 },
        "network-interfaces": nets,
        "metrics": { "metrics_path": metrics },
    });
    let path = dir.join(format!("{name}.json"));
    write_file(&path, cfg.to_string().as_bytes());
    let mut child = vireo()
        .args(["--no-api", "--config-file"])
        .arg(&path)
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(l.trim_end_matches('\r').to_owned()).is_err() {
                break;
            }
        }
    });
    let stderr = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    Vm {
        child,
        lines,
        seen: Vec::new(),
        stderr,
        metrics,
    }
}

impl Vm {
    /// Waits for a report line starting with `prefix` and returns it.
    fn wait(&mut self, prefix: &str) -> String {
        let end = Instant::now() + DEADLINE;
        loop {
            if let Some(l) = self.seen.iter().find(|l| l.starts_with(prefix)) {
                return l.clone();
            }
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => self.seen.push(l),
                Err(_) => panic!("no {prefix:?} from the guest; saw {:#?}", self.seen),
            }
        }
    }

    /// Waits for vireo to exit; returns its exit code, every line and stderr.
    fn finish(mut self) -> (i32, Vec<String>, String, serde_json::Value) {
        let status = wait_exit(&mut self.child);
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(2)) {
            self.seen.push(l);
        }
        let stderr = self.stderr.join().unwrap();
        let text = std::fs::read_to_string(&self.metrics).unwrap_or_default();
        let metrics = text
            .lines()
            .last()
            .map(|l| serde_json::from_str(l).unwrap())
            .unwrap_or(serde_json::Value::Null);
        (status.code().unwrap_or(-1), self.seen, stderr, metrics)
    }
}

/// Sets a socket's receive buffer beyond the sysctl limit (as root).
fn force_rcvbuf(fd: i32, size: libc::c_int) {
    // SAFETY: setsockopt(2) reads the int we pass for its length.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        )
    };
    assert_eq!(r, 0, "SO_RCVBUFFORCE: {}", std::io::Error::last_os_error());
}

/// A UDP socket on the host side with a receive buffer big enough for a whole burst.
fn udp(addr: &str) -> UdpSocket {
    let s = UdpSocket::bind(addr).unwrap();
    force_rcvbuf(s.as_raw_fd(), 16 << 20);
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

/// A packet socket capturing every frame on `dev`.
fn capture(dev: &str) -> OwnedFd {
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK,
            (libc::ETH_P_ALL as u16).to_be() as i32,
        )
    };
    assert!(
        fd >= 0,
        "AF_PACKET socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: the descriptor is new and owned here.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    force_rcvbuf(fd.as_raw_fd(), 64 << 20);
    let name = std::ffi::CString::new(dev).unwrap();
    // SAFETY: if_nametoindex reads the NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    // SAFETY: an all-zero sockaddr_ll is valid; the fields set below make it a bind address.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
    addr.sll_ifindex = index as i32;
    // SAFETY: bind(2) reads the sockaddr_ll for the length given.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(r, 0, "bind AF_PACKET: {}", std::io::Error::last_os_error());
    fd
}

/// Every frame captured so far.
fn captured(fd: &OwnedFd) -> Vec<Vec<u8>> {
    let mut frames = Vec::new();
    let mut buf = vec![0u8; 70_000];
    loop {
        // SAFETY: recv(2) writes at most `buf.len()` bytes into `buf`.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n <= 0 {
            return frames;
        }
        frames.push(buf[..n as usize].to_vec());
    }
}

fn mac_bytes(s: &str) -> Vec<u8> {
    s.split(':')
        .map(|p| u8::from_str_radix(p, 16).unwrap())
        .collect()
}

fn csum(data: &[u8], mut acc: u32) -> u16 {
    for c in data.chunks(2) {
        acc += u32::from(c[0]) << 8 | u32::from(*c.get(1).unwrap_or(&0));
    }
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// Checks an IPv4/UDP frame's IP and UDP checksums.
fn checksums_valid(frame: &[u8]) -> bool {
    let ip = &frame[14..];
    let ihl = usize::from(ip[0] & 0xf) * 4;
    let udp_len = usize::from(u16::from_be_bytes([ip[ihl + 4], ip[ihl + 5]]));
    let udp = &ip[ihl..ihl + udp_len];
    let pseudo: u32 = ip[12..20]
        .chunks(2)
        .map(|c| u32::from(c[0]) << 8 | u32::from(c[1]))
        .sum::<u32>()
        + u32::from(ip[9])
        + udp_len as u32;
    csum(&ip[..ihl], 0) == 0 && (udp[6..8] == [0, 0] || csum(udp, pseudo) == 0)
}

fn net_counter(m: &serde_json::Value, iface: &str, name: &str) -> u64 {
    m["devices"][format!("net_{iface}")][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no {name} for {iface} in {m}"))
}

/// What a single-guest exchange left behind.
struct Exchange {
    lines: Vec<String>,
    metrics: serde_json::Value,
    frames: Vec<Vec<u8>>,
    host_mac: String,
    ns: NetNs,
}

/// The single-guest exchange: ARP both ways, a hello each way, a burst each way, every frame
/// on the TAP captured.
fn exchange(tag: &str, kind: &str, burst: u32, args: &str) -> Exchange {
    exchange_with(tag, kind, burst, args, &serde_json::json!({}))
}

/// [`exchange`] with `extra` fields (rate limiters) on the interface.
fn exchange_with(
    tag: &str,
    kind: &str,
    burst: u32,
    args: &str,
    extra: &serde_json::Value,
) -> Exchange {
    let ns = NetNs::enter(tag);
    ns.tap("tap0", Some("10.0.0.1/24"));
    let cap = capture("tap0");
    let dir = scratch(tag);
    let hello_rx = udp("10.0.0.1:6000");
    let burst_rx = udp("10.0.0.1:6001");
    let counter = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        let mut seqs = Vec::new();
        while seqs.len() < burst as usize {
            let Ok(n) = burst_rx.recv(&mut buf) else {
                break;
            };
            assert_eq!(n, 64);
            let seq = u32::from_be_bytes(buf[..4].try_into().unwrap());
            for (i, b) in buf[4..n].iter().enumerate() {
                assert_eq!(
                    *b,
                    (seq as u8).wrapping_add(i as u8 + 4),
                    "byte {i} of frame {seq}"
                );
            }
            seqs.push(seq);
        }
        seqs
    });
    let mut vm = start_with(
        &dir,
        "vm",
        kind,
        &[("tap0", Some(GUEST_MAC))],
        &format!("vireo.netburst={burst} {args}"),
        extra,
    );
    vm.wait("@net ready");
    let mut buf = [0u8; 256];
    let (n, from) = hello_rx.recv_from(&mut buf).expect("the guest's hello");
    assert_eq!(&buf[..n], b"hello from vireo");
    assert_eq!(from.to_string(), "10.0.0.2:5000");
    // The host learned the guest's address from its ARP request: forget it, so that the host
    // kernel has to ask and the guest has to answer.
    ns.sh("ip neigh del 10.0.0.2 dev tap0");
    // The host's hello, then its burst, paced so that the host's own queues keep up. The
    // burst waits until the guest has the hello: frames the host kernel queues while it still
    // resolves the guest's address can be overtaken by later ones when the queue is flushed,
    // which would be the host's reordering, not vireo's.
    hello_rx
        .send_to(b"hello from the host", "10.0.0.2:5000")
        .unwrap();
    vm.wait("@net udp-rx");
    for seq in 0..burst {
        let mut p = seq.to_be_bytes().to_vec();
        p.extend((4..64).map(|i| (seq as u8).wrapping_add(i as u8)));
        hello_rx.send_to(&p, "10.0.0.2:5001").unwrap();
        if seq % 20 == 19 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    let (code, lines, stderr, metrics) = vm.finish();
    assert_eq!(code, 0, "{stderr}");
    let seqs = counter.join().unwrap();
    assert_eq!(
        seqs,
        (0..burst).collect::<Vec<_>>(),
        "every guest frame, in order"
    );
    let _ = std::fs::remove_dir_all(dir);
    Exchange {
        lines,
        metrics,
        frames: captured(&cap),
        host_mac: ns.mac("tap0"),
        ns,
    }
}

fn line<'a>(lines: &'a [String], prefix: &str) -> &'a str {
    lines
        .iter()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} in {lines:#?}"))
}

fn check_burst(lines: &[String], metrics: &serde_json::Value, burst: u64, ns: &NetNs) {
    assert_eq!(
        line(lines, "@net udp-rx"),
        format!(
            "@net udp-rx from=10.0.0.1:6000 len=19 data={}",
            b"hello from the host"
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        )
    );
    let rx = line(lines, "@net burst-rx");
    assert_eq!(field(rx, "count"), Some(burst.to_string().as_str()), "{rx}");
    assert_eq!(field(rx, "bad"), Some("0"), "{rx}");
    for counter in ["rx_drops", "rx_errors", "tx_drops", "tx_errors"] {
        assert_eq!(
            net_counter(metrics, "eth0", counter),
            0,
            "{counter}: {metrics}"
        );
    }
    // vireo counted at least the bursts (ARP and hellos come on top).
    assert!(net_counter(metrics, "eth0", "rx_frames") > burst);
    assert!(net_counter(metrics, "eth0", "tx_frames") > burst);
    // The TAP's own drops are the host kernel's, reported separately.
    let (tap_rx_drop, tap_tx_drop) = (
        ns.link_stat("tap0", "rx", "dropped"),
        ns.link_stat("tap0", "tx", "dropped"),
    );
    // Frames the host kernel sent before vireo opened the TAP are its drops, not vireo's.
    eprintln!("the TAP's own drops (host kernel): rx {tap_rx_drop}, tx {tap_tx_drop}");
}

#[test]
fn guest_and_host_exchange_arp_udp_and_a_thousand_frames_each_way() {
    let run = exchange("arp-udp", "elf", 1000, "");
    check_burst(&run.lines, &run.metrics, 1000, &run.ns);
    // The guest answered the host kernel's ARP request (the host's hello reached it), and its
    // own frames carry the right addresses and checksums.
    let guest = mac_bytes(GUEST_MAC);
    let host = mac_bytes(&run.host_mac);
    let arp = run
        .frames
        .iter()
        .find(|f| f[6..12] == guest[..] && f[12..14] == [8, 6] && f[20..22] == [0, 1])
        .expect("the guest's ARP request");
    assert_eq!(&arp[..6], &[0xff; 6], "broadcast");
    assert_eq!(&arp[22..28], &guest[..], "sender MAC");
    assert_eq!(&arp[28..32], &[10, 0, 0, 2], "sender IP");
    assert_eq!(&arp[38..42], &[10, 0, 0, 1], "target IP");
    let reply = run
        .frames
        .iter()
        .find(|f| f[6..12] == guest[..] && f[12..14] == [8, 6] && f[20..22] == [0, 2])
        .expect("the guest's ARP reply to the host kernel");
    assert_eq!(&reply[..6], &host[..]);
    assert_eq!(&reply[32..38], &host[..], "target MAC");
    let hello = run
        .frames
        .iter()
        .find(|f| f[6..12] == guest[..] && f[12..14] == [8, 0] && f[36..38] == [0x17, 0x70])
        .expect("the guest's hello to port 6000");
    assert_eq!(&hello[..6], &host[..], "to the host's MAC");
    assert_eq!(&hello[26..30], &[10, 0, 0, 2]);
    assert_eq!(&hello[30..34], &[10, 0, 0, 1]);
    assert!(checksums_valid(hello), "IP and UDP checksums");
    assert_eq!(&hello[42..], b"hello from vireo");
    let arp_line = line(&run.lines, "@net arp-reply");
    assert_eq!(
        arp_line,
        format!("@net arp-reply ip=10.0.0.1 mac={}", run.host_mac)
    );
    let config = line(&run.lines, "@net dev=0");
    assert_eq!(field(config, "mac"), Some(GUEST_MAC));
    assert_eq!(field(config, "mac_offered"), Some("1"));
    assert_eq!(field(config, "status"), Some("1"), "link up");
    assert_eq!(field(config, "mrg"), Some("1"));
}

/// Under tight receive and transmit limits every frame still arrives, in order and intact:
/// throttled frames wait (in the guest's ring or the TAP), they are not dropped.
#[test]
fn rate_limited_interfaces_delay_frames_and_lose_none() {
    // 500 frames and 64 KiB a second received, 200 frames a second sent (the bursts are 1000
    // frames each way, plus ARP and hellos); the host's burst waits in the TAP's queue.
    let limits = serde_json::json!({
        "rx_rate_limiter": {
            "bandwidth": { "size": 65536, "refill_time": 1000 },
            "ops": { "size": 50, "refill_time": 100 }
        },
        "tx_rate_limiter": { "ops": { "size": 20, "refill_time": 100 } }
    });
    let run = exchange_with("limited", "elf", 1000, "", &limits);
    check_burst(&run.lines, &run.metrics, 1000, &run.ns);
    assert!(net_counter(&run.metrics, "eth0", "tx_rate_limiter_throttled") > 0);
    assert!(net_counter(&run.metrics, "eth0", "rx_rate_limiter_throttled") > 0);
}

/// A guest that posts only 16 buffers of 2 KiB and does not negotiate MRG_RXBUF still gets
/// every frame that fits them.
#[test]
fn sixteen_small_buffers_without_mrg_rxbuf() {
    let run = exchange(
        "small-bufs",
        "pvh",
        1000,
        "vireo.netrx=16 vireo.netbuf=2048 vireo.netmrg=0",
    );
    assert_eq!(field(line(&run.lines, "@net dev=0"), "mrg"), Some("0"));
    check_burst(&run.lines, &run.metrics, 1000, &run.ns);
}

/// A guest that stops posting buffers: frames wait in the TAP, none is lost or corrupted,
/// and delivery resumes when buffers come back.
#[test]
fn frames_wait_in_the_tap_while_the_guest_posts_no_buffers() {
    let run = exchange("pause", "elf", 1000, "vireo.netpause=300");
    let resume = line(&run.lines, "@net resume");
    let held: u64 = field(resume, "held").unwrap().parse().unwrap();
    assert_eq!(
        held, 64,
        "every buffer was held back, so the ring ran dry: {resume}"
    );
    check_burst(&run.lines, &run.metrics, 1000, &run.ns);
}

/// Malformed chains on both queues are dropped and counted; the device, the other queue and
/// vireo keep working.
#[test]
fn hostile_chains_are_dropped_and_counted() {
    // 100 frames: enough for the device to come round to the bad buffer, posted after the
    // guest's first 64.
    let run = exchange("hostile", "elf", 100, "vireo.nethostile");
    assert!(line(&run.lines, "@net hostile").contains("sent=5"));
    let m = &run.metrics;
    // Shorter than the header and longer than the largest frame: dropped.
    assert_eq!(net_counter(m, "eth0", "tx_drops"), 2, "{m}");
    // A device-writable buffer and one outside guest memory: errors.
    assert_eq!(net_counter(m, "eth0", "tx_errors"), 2, "{m}");
    // A read-only receive buffer, returned empty.
    assert_eq!(net_counter(m, "eth0", "rx_errors"), 1, "{m}");
    let rx = line(&run.lines, "@net burst-rx");
    assert_eq!(field(rx, "count"), Some("100"));
    assert_eq!(field(rx, "bad"), Some("0"));
    assert_eq!(
        m["events"]["virtio_net_bad_tx_chain"].as_u64(),
        Some(4),
        "counted, and logged at most a few times: {m}"
    );
}

/// Two guests with default settings (no MAC given) on two TAPs joined by a bridge: each
/// picks its own MAC, and they exchange UDP.
#[test]
fn two_guests_on_a_bridge_pick_distinct_macs_and_talk() {
    let ns = NetNs::enter("bridge");
    ns.sh("ip link add br0 type bridge && ip link set br0 up");
    for tap in ["tapa", "tapb"] {
        ns.tap(tap, None);
        ns.sh(&format!("ip link set {tap} master br0"));
    }
    let dir = scratch("bridge");
    let mut a = start(
        &dir,
        "a",
        "elf",
        &[("tapa", None)],
        "vireo.netip=10.0.1.2 vireo.netpeer=10.0.1.3",
    );
    let mut b = start(
        &dir,
        "b",
        "pvh",
        &[("tapb", None)],
        "vireo.netip=10.0.1.3 vireo.netpeer=10.0.1.2",
    );
    let mac_a = field(&a.wait("@net dev=0"), "mac").unwrap().to_owned();
    let mac_b = field(&b.wait("@net dev=0"), "mac").unwrap().to_owned();
    let (code_a, lines_a, err_a, _) = a.finish();
    let (code_b, lines_b, err_b, _) = b.finish();
    assert_eq!((code_a, code_b), (0, 0), "{err_a}\n{err_b}");
    assert_ne!(mac_a, mac_b, "each guest picked its own MAC");
    for (lines, mac) in [(&lines_a, &mac_a), (&lines_b, &mac_b)] {
        assert_eq!(
            field(line(lines, "@net dev=0"), "mac_offered"),
            Some("0"),
            "no MAC offered without one configured"
        );
        assert_eq!(
            u8::from_str_radix(&mac[..2], 16).unwrap() & 1,
            0,
            "unicast {mac}"
        );
    }
    assert_eq!(
        line(&lines_a, "@net arp-reply"),
        format!("@net arp-reply ip=10.0.1.3 mac={mac_b}")
    );
    assert_eq!(
        line(&lines_b, "@net arp-reply"),
        format!("@net arp-reply ip=10.0.1.2 mac={mac_a}")
    );
    let hex: String = b"hello from vireo"
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        line(&lines_a, "@net udp-rx"),
        format!("@net udp-rx from=10.0.1.3:5000 len=16 data={hex}")
    );
    assert_eq!(
        line(&lines_b, "@net udp-rx"),
        format!("@net udp-rx from=10.0.1.2:5000 len=16 data={hex}")
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// TAPs that cannot be used are refused by name and reason, before anything starts.
#[test]
fn unusable_taps_are_refused() {
    let ns = NetNs::enter("bad-taps");
    ns.tap("tap0", None);
    ns.sh("ip tuntap add tun0 mode tun && ip tuntap add tapmq mode tap multi_queue");
    let kernel = guest("elf");
    let k = kernel.to_str().unwrap();
    for (spec, needles) in [
        (
            "tap=nosuch",
            &["eth0", "TAP device nosuch does not exist"][..],
        ),
        ("tap=lo", &["lo is not a TAP device"]),
        ("tap=tun0", &["tun0 is not a TAP device"]),
        ("tap=tapmq", &["tapmq is multi-queue"]),
        ("tap=tap0,id=net9", &["net9"]),
    ] {
        let extra = if spec.contains("net9") {
            // Two interfaces on one TAP.
            vec!["--net", "tap=tap0", "--net", spec]
        } else {
            vec!["--net", spec]
        };
        let r = run(&[&["--kernel", k][..], &extra].concat());
        assert_eq!(r.code(), 1, "{spec}: {}", r.stderr);
        assert!(r.stderr.starts_with("vireo: error: "), "{}", r.stderr);
        for n in needles {
            assert!(
                r.stderr.contains(n),
                "{spec}: {:?} should mention {n:?}",
                r.stderr
            );
        }
        assert!(r.stdout.is_empty(), "nothing started: {}", r.stdout);
    }
    // Busy: another process holds the TAP.
    let holder = Command::new(vireo_bin())
        .args([
            "run",
            "--kernel",
            k,
            "--net",
            "tap=tap0",
            "--cmdline",
            "vireo.end=hang",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut holder = holder;
    let mut out = BufReader::new(holder.stdout.take().unwrap());
    let mut l = String::new();
    while out.read_line(&mut l).unwrap() > 0 && !l.contains("@end hang") {
        l.clear();
    }
    let r = run(&["--kernel", k, "--net", "tap=tap0"]);
    assert_eq!(r.code(), 1);
    assert!(
        r.stderr
            .contains("tap0 is busy: another process has it open"),
        "{}",
        r.stderr
    );
    holder.kill().unwrap();
    holder.wait().unwrap();
    for (spec, needle) in [
        ("tap=tap0,mac=01:00:00:00:00:01", "multicast"),
        ("tap=tap0,mac=02:00:00:00:00", "six hex pairs"),
        ("tap=tap0,mtu=67", "68 to 65535"),
        ("mac=02:00:00:00:00:01", "needs tap=NAME"),
        ("tap=tap0,id=", "id= needs a value"),
    ] {
        let r = run(&["--kernel", k, "--net", spec]);
        assert_eq!(r.code(), 2, "{spec}");
        assert!(r.stderr.contains(needle), "{spec}: {}", r.stderr);
    }
}

/// Opens an existing TAP without a virtio-net header (so without offloads): the host kernel
/// must hand it plain, segmented, checksummed frames.
fn plain_tap(name: &str) -> std::fs::File {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/net/tun")
        .unwrap();
    let mut req = [0u8; 40];
    req[..name.len()].copy_from_slice(name.as_bytes());
    let flags = (libc::IFF_TAP | libc::IFF_NO_PI) as u16;
    req[16..18].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes the 40-byte ifreq, which outlives the call.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), libc::TUNSETIFF, req.as_mut_ptr()) };
    assert_eq!(
        r,
        0,
        "TUNSETIFF {name}: {}",
        std::io::Error::last_os_error()
    );
    f
}

/// A 64 KiB TCP segment the guest sends with TSO crosses vireo whole; the host kernel,
/// forwarding it to an interface without offloads, cuts it into MSS-sized segments with valid
/// checksums.
#[test]
fn a_tso_segment_from_the_guest_is_segmented_by_the_host() {
    let ns = NetNs::enter("tso");
    ns.tap("tap0", Some("10.0.0.1/24"));
    ns.tap("tap1", Some("10.0.1.1/24"));
    ns.sh("sysctl -qw net.ipv4.ip_forward=1 && ip neigh add 10.0.1.2 lladdr 02:00:00:00:01:02 dev tap1");
    let mut out = plain_tap("tap1");
    let dir = scratch("tso");
    let vm = start(
        &dir,
        "vm",
        "elf",
        &[("tap0", Some(GUEST_MAC))],
        "vireo.nettso vireo.nettsodst=10.0.1.2",
    );
    let (code, lines, stderr, metrics) = vm.finish();
    assert_eq!(code, 0, "{stderr}");
    assert!(line(&lines, "@net tso sent").contains("bytes=65000"));
    // Crossed vireo as one frame: 65000 bytes of payload and 54 of headers.
    let tx_bytes = net_counter(&metrics, "eth0", "tx_bytes");
    assert!(tx_bytes >= 65054, "{metrics}");
    let mut segments: Vec<Vec<u8>> = Vec::new();
    let end = Instant::now() + Duration::from_secs(10);
    let mut buf = vec![0u8; 70_000];
    let mut payload = 0usize;
    while payload < 65000 && Instant::now() < end {
        match out.read(&mut buf) {
            Ok(n) => {
                let f = &buf[..n];
                if f[12..14] == [8, 0] && f[23] == 6 {
                    payload += n - 54;
                    segments.push(f.to_vec());
                }
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
    assert_eq!(payload, 65000, "all the payload arrived");
    assert_eq!(
        segments.len(),
        65000usize.div_ceil(1448),
        "ceil(length / gso_size) segments"
    );
    let mut seq = 1u32;
    for s in &segments {
        let ip = &s[14..34];
        assert_eq!(csum(ip, 0), 0, "IP checksum");
        let tcp = &s[34..];
        let pseudo: u32 = ip[12..20]
            .chunks(2)
            .map(|c| u32::from(c[0]) << 8 | u32::from(c[1]))
            .sum::<u32>()
            + 6
            + tcp.len() as u32;
        assert_eq!(csum(tcp, pseudo), 0, "TCP checksum of a segment");
        assert_eq!(u32::from_be_bytes(tcp[4..8].try_into().unwrap()), seq);
        assert!(s.len() - 54 <= 1448);
        seq += (s.len() - 54) as u32;
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Opens TAP `name` with `flags` (IFF_* beyond IFF_TAP) and leaves the descriptor open across
/// exec, as a management tool handing it to vireo would.
fn inheritable_tap(name: &str, flags: i32) -> std::fs::File {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .unwrap();
    let mut req = [0u8; 40];
    req[..name.len()].copy_from_slice(name.as_bytes());
    req[16..18].copy_from_slice(&((libc::IFF_TAP | flags) as u16).to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes the 40-byte ifreq, which outlives the call; F_SETFD
    // only changes the descriptor's close-on-exec flag.
    unsafe {
        assert_eq!(
            libc::ioctl(f.as_raw_fd(), libc::TUNSETIFF, req.as_mut_ptr()),
            0
        );
        libc::fcntl(f.as_raw_fd(), libc::F_SETFD, 0);
    }
    f
}

/// A TAP opened by someone else and handed down as a descriptor works like one opened by
/// name; one opened without the virtio-net header, or a descriptor that is no TAP, is refused.
#[test]
fn a_tap_handed_down_as_a_descriptor() {
    let ns = NetNs::enter("tap-fd");
    ns.tap("tap0", Some("10.0.0.1/24"));
    ns.tap("tap1", None);
    let kernel = guest("elf");
    let k = kernel.to_str().unwrap();
    let tap = inheritable_tap("tap0", libc::IFF_NO_PI | libc::IFF_VNET_HDR);
    let fd = tap.as_raw_fd().to_string();
    let r = run(&[
        "--kernel",
        k,
        "--net",
        &format!("fd={fd},mac={GUEST_MAC}"),
        "--cmdline",
        "vireo.nettest vireo.netarp",
    ]);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    let host = ns.mac("tap0");
    assert!(
        r.all("net")
            .contains(&format!("arp-reply ip=10.0.0.1 mac={host}")),
        "{}",
        r.stdout
    );
    drop(tap);
    let plain = inheritable_tap("tap1", libc::IFF_NO_PI);
    let r = run(&["--kernel", k, "--net", &format!("fd={}", plain.as_raw_fd())]);
    assert_eq!(r.code(), 1);
    assert!(
        r.stderr.contains("tap1") && r.stderr.contains("without IFF_VNET_HDR"),
        "{}",
        r.stderr
    );
    let r = run(&["--kernel", k, "--net", "fd=999"]);
    assert_eq!(r.code(), 1);
    assert!(
        r.stderr.contains("fd 999") && r.stderr.contains("not open"),
        "{}",
        r.stderr
    );
    let null = std::fs::File::open("/dev/null").unwrap();
    // SAFETY: F_SETFD only changes the descriptor's close-on-exec flag.
    unsafe { libc::fcntl(null.as_raw_fd(), libc::F_SETFD, 0) };
    let r = run(&["--kernel", k, "--net", &format!("fd={}", null.as_raw_fd())]);
    assert_eq!(r.code(), 1);
    assert!(r.stderr.contains("is not a TAP device"), "{}", r.stderr);
}

/// MMDS through the API: version 2 with a session token, read by the guest over HTTP on its
/// interface; a read without a token is refused; no MMDS frame reaches the TAP.
#[test]
fn mmds_v2_through_the_api() {
    let ns = NetNs::enter("mmds-v2");
    ns.tap("tap0", Some("10.0.0.1/24"));
    let cap = capture("tap0");
    let dir = scratch("mmds-v2");
    let sock = dir.join("api.sock");
    let mut child = vireo().arg("--api-sock").arg(&sock).spawn().unwrap();
    wait_for_socket(&sock);
    let req = |method: &str, path: &str, body: &str| -> u16 {
        let out = Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--unix-socket",
            ])
            .arg(&sock)
            .args(["-X", method, &format!("http://localhost{path}"), "-d", body])
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).parse().unwrap()
    };
    assert_eq!(
        req(
            "PUT",
            "/network-interfaces/eth0",
            &format!(r#"{{"iface_id":"eth0","host_dev_name":"tap0","guest_mac":"{GUEST_MAC}"}}"#)
        ),
        204
    );
    assert_eq!(
        req(
            "PUT",
            "/mmds/config",
            r#"{"version":"V2","network_interfaces":["eth0"]}"#
        ),
        204
    );
    assert_eq!(
        req(
            "PUT",
            "/mmds",
            r#"{"latest":{"meta-data":{"key":"value-from-mmds"}}}"#
        ),
        204
    );
    let boot = format!(
        r#"{{"kernel_image_path":"{}","boot_args":"console=ttyS0 vireo.nettest vireo.netmmds=2"}}"#,
        guest("elf").display()
    );
    assert_eq!(req("PUT", "/boot-source", &boot), 204);
    assert_eq!(
        req("PUT", "/actions", r#"{"action_type":"InstanceStart"}"#),
        204
    );
    let out = child.stdout.take().unwrap();
    let lines: Vec<String> = BufReader::new(out)
        .lines()
        .map_while(Result::ok)
        .map(|l| l.trim_end_matches('\r').to_owned())
        .take_while(|l| !l.starts_with("@end"))
        .collect();
    assert_eq!(wait_exit(&mut child).code(), Some(0));
    assert_eq!(
        line(&lines, "@net arp-reply"),
        "@net arp-reply ip=169.254.169.254 mac=06:01:23:45:67:01"
    );
    let token = line(&lines, "@mmds token");
    assert_eq!(field(token, "status"), Some("200"), "{token}");
    assert_eq!(field(token, "len"), Some("64"), "{token}");
    assert!(line(&lines, "@mmds notoken").starts_with("@mmds notoken status=401"));
    assert_eq!(
        line(&lines, "@mmds get"),
        "@mmds get status=200 body=value-from-mmds"
    );
    // Everything to and from MMDS stayed inside vireo.
    let mmds = [169u8, 254, 169, 254];
    for f in captured(&cap) {
        let arp_for_mmds = f[12..14] == [8, 6] && f.get(38..42) == Some(&mmds[..]);
        let ip_mmds = f[12..14] == [8, 0]
            && (f.get(26..30) == Some(&mmds[..]) || f.get(30..34) == Some(&mmds[..]));
        assert!(
            !arp_for_mmds && !ip_mmds,
            "an MMDS frame on the TAP: {f:02x?}"
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// MMDS from a config file with Firecracker's `--metadata` and `--mmds-size-limit`, version 1
/// (no token), at a chosen address.
#[test]
fn mmds_v1_from_a_config_file() {
    let ns = NetNs::enter("mmds-v1");
    ns.tap("tap0", Some("10.0.0.1/24"));
    let dir = scratch("mmds-v1");
    let meta = dir.join("meta.json");
    write_file(
        &meta,
        br#"{"latest":{"meta-data":{"key":"from-the-metadata-file"}}}"#,
    );
    let cfg = serde_json::json!({
        "boot-source": {
            "kernel_image_path": guest("pvh"),
            "boot_args": "console=ttyS0 vireo.nettest vireo.netmmds=1 vireo.netmmdsip=169.254.1.2",
        },
        "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": GUEST_MAC}],
        "mmds-config": {"network_interfaces": ["eth0"], "ipv4_address": "169.254.1.2"},
    });
    let path = dir.join("vm.json");
    write_file(&path, cfg.to_string().as_bytes());
    let r = run_raw(&[
        "--no-api",
        "--config-file",
        path.to_str().unwrap(),
        "--metadata",
        meta.to_str().unwrap(),
        "--mmds-size-limit",
        "1000",
    ]);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    assert_eq!(
        r.report("mmds").as_deref(),
        Some("get status=200 body=from-the-metadata-file")
    );
    // The size limit holds for the metadata file too.
    write_file(
        &meta,
        format!(r#"{{"k":"{}"}}"#, "x".repeat(2000)).as_bytes(),
    );
    let r = run_raw(&[
        "--no-api",
        "--config-file",
        path.to_str().unwrap(),
        "--metadata",
        meta.to_str().unwrap(),
        "--mmds-size-limit",
        "1000",
    ]);
    assert_eq!(r.code(), 1);
    assert!(r.stderr.contains("limit of 1000 bytes"), "{}", r.stderr);
    let _ = std::fs::remove_dir_all(dir);
}
