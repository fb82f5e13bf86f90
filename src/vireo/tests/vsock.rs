//! virtio-vsock end to end with the test guest's driver and host programs on the Unix sockets,
//! as Firecracker's users drive it: `CONNECT <port>` on the device's socket for host-initiated
//! connections, `PATH_<port>` listeners for guest-initiated ones.

mod common;
use common::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

fn pattern(len: usize, seed: usize) -> Vec<u8> {
    (0..len).map(|i| ((i * 7 + seed) % 251) as u8).collect()
}

/// Starts `vireo run` with the test guest and a vsock device at `sock`, passing `args` to the
/// guest; returns it with its remaining output lines once the guest reports it is ready.
fn start_guest(sock: &Path, args: &str) -> (std::process::Child, impl Iterator<Item = String>) {
    let mut child = vireo()
        .args(["run", "--kernel"])
        .arg(guest("elf"))
        .arg("--vsock")
        .arg(format!("cid=3,uds={}", sock.display()))
        .args(["--cmdline", &format!("vireo.vsocktest {args}")])
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let mut lines = BufReader::new(out)
        .lines()
        .map_while(Result::ok)
        .map(|l| l.trim_end_matches('\r').to_owned());
    for l in lines.by_ref() {
        if l == "@vsock ready" {
            break;
        }
    }
    (child, lines)
}

/// The host's side of the test guest's vsock test: a listener for its connection to port
/// 6000, then a `CONNECT 5000` carrying `n` bytes each way.
fn exercise(mut child: std::process::Child, sock: &Path, n: usize) {
    let l6000 = UnixListener::bind(format!("{}_6000", sock.display())).unwrap();
    let from_guest = std::thread::spawn(move || {
        let (mut c, _) = l6000.accept().unwrap();
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut v = Vec::new();
        let _ = c.read_to_end(&mut v);
        v
    });
    let out = child.stdout.take().unwrap();
    let mut lines = BufReader::new(out).lines().map_while(Result::ok);
    let mut seen = Vec::new();
    for l in lines.by_ref() {
        let l = l.trim_end_matches('\r').to_owned();
        let ready = l == "@vsock ready";
        seen.push(l);
        if ready {
            break;
        }
    }
    assert!(
        seen.iter()
            .any(|l| l == "@vsock connect port=6000 result=response"),
        "{seen:#?}"
    );
    assert!(
        seen.iter()
            .any(|l| l == "@vsock connect port=6001 result=rst"),
        "no listener: RST; {seen:#?}"
    );
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(b"CONNECT 5000\n").unwrap();
    let mut ok = [0u8; 32];
    let k = s.read(&mut ok).unwrap();
    let ok = String::from_utf8_lossy(&ok[..k]).to_string();
    assert!(ok.starts_with("OK ") && ok.ends_with('\n'), "{ok:?}");
    // Several times the guest's 16 KiB receive buffer: the host must wait for its credit.
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || w.write_all(&pattern(n, 0)).unwrap());
    let mut back = Vec::new();
    let _ = s.read_to_end(&mut back);
    writer.join().unwrap();
    assert_eq!(back.len(), n);
    assert!(back == pattern(n, 1), "every byte from the guest");
    let rest: Vec<String> = lines.map(|l| l.trim_end_matches('\r').to_owned()).collect();
    assert_eq!(wait_exit(&mut child).code(), Some(0));
    assert!(
        rest.iter()
            .any(|l| l == &format!("@vsock received bytes={n} bad=0")),
        "every byte to the guest: {rest:#?}"
    );
    let g = from_guest.join().unwrap();
    assert_eq!(g, pattern(20, 1), "the guest's bytes on port 6000");
}

#[test]
fn streams_both_ways_with_flow_control() {
    let dir = scratch("vsock-run");
    let sock = dir.join("v.sock");
    let child = vireo()
        .args(["run", "--kernel"])
        .arg(guest("elf"))
        .arg("--vsock")
        .arg(format!("cid=3,uds={}", sock.display()))
        .args(["--cmdline", "vireo.vsocktest vireo.vsockbytes=200000"])
        .spawn()
        .unwrap();
    exercise(child, &sock, 200_000);
    assert!(!sock.exists(), "the socket goes with vireo");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn through_the_config_file() {
    let dir = scratch("vsock-config");
    let sock = dir.join("v.sock");
    let cfg = serde_json::json!({
        "boot-source": {
            "kernel_image_path": guest("pvh"),
            "boot_args": "console=ttyS0 vireo.vsocktest vireo.vsockbytes=50000",
        },
        "vsock": { "guest_cid": 3, "uds_path": sock, "vsock_id": "vsock0" },
        "metrics": { "metrics_path": dir.join("metrics") },
    });
    let path = dir.join("vm.json");
    write_file(&path, cfg.to_string().as_bytes());
    let child = vireo()
        .args(["--no-api", "--config-file"])
        .arg(&path)
        .spawn()
        .unwrap();
    exercise(child, &sock, 50_000);
    // Counted: both connections, the reset for port 6001, the bytes each way.
    let text = std::fs::read_to_string(dir.join("metrics")).unwrap();
    let m: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    let v = &m["devices"]["vsock"];
    assert_eq!(v["conns_opened"], 2, "{m}");
    assert!(v["resets"].as_u64().unwrap() >= 1, "{m}");
    assert_eq!(v["rx_bytes"], 50_000, "{m}");
    assert_eq!(v["tx_bytes"], 50_000 + 20, "{m}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn bad_cids_and_a_live_socket_are_refused() {
    let dir = scratch("vsock-bad");
    let k = guest("elf");
    let k = k.to_str().unwrap();
    for cid in ["0", "1", "2", "4294967295"] {
        let r = run(&[
            "--kernel",
            k,
            "--vsock",
            &format!("cid={cid},uds=/tmp/x.sock"),
        ]);
        assert_eq!(r.code(), 2, "{cid}");
        assert!(
            r.stderr
                .contains(&format!("guest CID {cid} cannot be used")),
            "{}",
            r.stderr
        );
    }
    let sock = dir.join("live.sock");
    let _live = UnixListener::bind(&sock).unwrap();
    let r = run(&[
        "--kernel",
        k,
        "--vsock",
        &format!("cid=3,uds={}", sock.display()),
    ]);
    assert_eq!(r.code(), 1);
    assert!(
        r.stderr.contains("in use by a running process"),
        "{}",
        r.stderr
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// 1024 connections at once, each carrying its own bytes, all echoed back intact by the
/// guest; each closed from the host side.
#[test]
fn a_thousand_concurrent_connections() {
    const CONNS: usize = 1024;
    // SAFETY: setrlimit(2) reads the struct we pass; vireo inherits the raised limit.
    unsafe {
        let lim = libc::rlimit {
            rlim_cur: 8192,
            rlim_max: 8192,
        };
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
    let dir = scratch("vsock-many");
    let sock = dir.join("v.sock");
    let (mut child, lines) = start_guest(&sock, &format!("vireo.vsockecho={CONNS}"));
    let mut conns: Vec<UnixStream> = (0..CONNS)
        .map(|_| {
            let mut s = UnixStream::connect(&sock).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            s.write_all(b"CONNECT 5000\n").unwrap();
            s
        })
        .collect();
    for s in &mut conns {
        let mut ok = [0u8; 32];
        let n = s.read(&mut ok).unwrap();
        assert!(
            ok[..n].starts_with(b"OK "),
            "{:?}",
            String::from_utf8_lossy(&ok[..n])
        );
    }
    let payload = |i: usize| -> Vec<u8> { (0..64).map(|k| (i * 31 + k) as u8).collect() };
    for (i, s) in conns.iter_mut().enumerate() {
        s.write_all(&payload(i)).unwrap();
    }
    for (i, s) in conns.iter_mut().enumerate() {
        let mut back = vec![0u8; 64];
        s.read_exact(&mut back).unwrap();
        assert_eq!(back, payload(i), "connection {i}");
    }
    for s in &conns {
        s.shutdown(std::net::Shutdown::Write).unwrap();
    }
    for s in &mut conns {
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        assert!(rest.is_empty());
    }
    let rest: Vec<String> = lines.collect();
    assert_eq!(wait_exit(&mut child).code(), Some(0));
    assert!(
        rest.iter()
            .any(|l| l == &format!("@vsock echo served={CONNS}")),
        "{rest:#?}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// A host peer that goes away while the guest still sends: that connection is reset, the
/// guest is told, and vireo carries on.
#[test]
fn a_vanishing_host_peer_resets_its_connection() {
    let dir = scratch("vsock-vanish");
    let sock = dir.join("v.sock");
    let _l6000 = UnixListener::bind(format!("{}_6000", sock.display())).unwrap();
    let (mut child, lines) = start_guest(&sock, "vireo.vsockbytes=300000");
    {
        let mut s = UnixStream::connect(&sock).unwrap();
        s.write_all(b"CONNECT 5000\n").unwrap();
        let mut ok = [0u8; 32];
        let _ = s.read(&mut ok).unwrap();
        s.write_all(&pattern(300_000, 0)).unwrap();
        // Gone without reading a byte of what the guest now sends.
    }
    let rest: Vec<String> = lines.collect();
    assert_eq!(wait_exit(&mut child).code(), Some(0));
    let sent = rest
        .iter()
        .find(|l| l.starts_with("@vsock sent"))
        .unwrap_or_else(|| panic!("{rest:#?}"));
    assert_eq!(field(sent, "reset"), Some("1"), "{sent}");
    let _ = std::fs::remove_dir_all(dir);
}

/// The same through Firecracker's API: `PUT /vsock` (with the deprecated `vsock_id`), shown in
/// `GET /vm/config`.
#[test]
fn through_the_api() {
    let dir = scratch("vsock-api");
    let sock = dir.join("v.sock");
    let api = dir.join("api.sock");
    let child = vireo().arg("--api-sock").arg(&api).spawn().unwrap();
    wait_for_socket(&api);
    let req = |method: &str, path: &str, body: &str| -> (u16, String) {
        let mut s = UnixStream::connect(&api).unwrap();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        let body = answer.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
        (answer[9..12].parse().unwrap(), body)
    };
    let (code, body) = req("PUT", "/vsock", r#"{"guest_cid":1,"uds_path":"/tmp/x"}"#);
    assert_eq!(code, 400);
    assert!(body.contains("guest CID 1 cannot be used"), "{body}");
    let vsock = format!(
        r#"{{"vsock_id":"vsock0","guest_cid":3,"uds_path":"{}"}}"#,
        sock.display()
    );
    assert_eq!(req("PUT", "/vsock", &vsock).0, 204);
    let (_, cfg) = req("GET", "/vm/config", "");
    let cfg: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    assert_eq!(cfg["vsock"]["guest_cid"], 3);
    let boot = format!(
        r#"{{"kernel_image_path":"{}","boot_args":"console=ttyS0 vireo.vsocktest vireo.vsockbytes=30000"}}"#,
        guest("elf").display()
    );
    assert_eq!(req("PUT", "/boot-source", &boot).0, 204);
    assert_eq!(
        req("PUT", "/actions", r#"{"action_type":"InstanceStart"}"#).0,
        204
    );
    exercise(child, &sock, 30_000);
    assert!(!sock.exists() && !api.exists());
    let _ = std::fs::remove_dir_all(dir);
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

fn host_connect(sock: &Path, port: u32) -> UnixStream {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    writeln!(s, "CONNECT {port}").unwrap();
    let mut ok = Vec::new();
    let mut b = [0u8; 1];
    while !ok.ends_with(b"\n") {
        assert_eq!(s.read(&mut b).unwrap(), 1, "OK line");
        ok.push(b[0]);
    }
    assert!(ok.starts_with(b"OK "));
    s
}

/// A host peer that never reads while the guest tries to send it 100 MiB: credit stops the
/// guest, vireo's memory stays bounded, and another connection carries 1 MiB meanwhile.
#[test]
fn a_peer_that_never_reads_costs_bounded_memory() {
    let dir = scratch("vsock-slow");
    let sock = dir.join("v.sock");
    let (mut child, lines) = start_guest(&sock, "vireo.vsockbench=104857600");
    let before = rss_kib(child.id());
    let slow = host_connect(&sock, 5001);
    std::thread::sleep(Duration::from_secs(2));
    // Meanwhile another connection flows: 1 MiB to the guest, then its close.
    let mut other = host_connect(&sock, 5000);
    other
        .set_write_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    other.write_all(&vec![0x5a; 1 << 20]).unwrap();
    other.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    let _ = other.read_to_end(&mut rest);
    let after = rss_kib(child.id());
    assert!(
        after < before + 16 * 1024,
        "RSS grew from {before} KiB to {after} KiB"
    );
    // The slow peer goes away: its connection is reset and the guest stops sending.
    drop(slow);
    let rest: Vec<String> = lines.collect();
    assert_eq!(wait_exit(&mut child).code(), Some(0));
    let sent = rest
        .iter()
        .find(|l| l.starts_with("@vsock bench sent"))
        .unwrap_or_else(|| panic!("{rest:#?}"));
    let bytes: u64 = field(sent, "bytes").unwrap().parse().unwrap();
    assert!(bytes < 4 << 20, "credit held the guest back: {sent}");
    assert_eq!(field(sent, "reset"), Some("1"), "{sent}");
    let _ = std::fs::remove_dir_all(dir);
}
