//! The Firecracker-compatible API over its Unix socket, driven by a real HTTP client (hyper, through `api::client`),
//! and the config-file route.

mod common;
use common::*;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Sends raw bytes on a fresh connection (then shuts down the sending side if `half_close`),
/// reads until the server closes or goes quiet, and splits what came back into responses.
fn raw(sock: &Path, bytes: &[u8], half_close: bool) -> Vec<(u16, String)> {
    let mut s = UnixStream::connect(sock).unwrap();
    // A server at its connection cap answers and closes before reading: keep its answer.
    let _ = s.write_all(bytes);
    if half_close {
        let _ = s.shutdown(std::net::Shutdown::Write);
    }
    s.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let mut responses = Vec::new();
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
        responses = split_responses(&out);
        // Half-closed: one answer is all there is; otherwise wait for the close.
        if half_close && !responses.is_empty() {
            break;
        }
    }
    responses
}

/// (status, body) of each complete response in `bytes`.
fn split_responses(mut bytes: &[u8]) -> Vec<(u16, String)> {
    let mut out = Vec::new();
    while let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&bytes[..end]).to_string();
        let status: u16 = head[9..12].parse().unwrap();
        let len: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().unwrap())
            })
            .unwrap_or(0);
        let body_start = end + 4;
        if bytes.len() < body_start + len {
            break;
        }
        let body = String::from_utf8_lossy(&bytes[body_start..body_start + len]).to_string();
        out.push((status, body));
        bytes = &bytes[body_start + len..];
    }
    out
}

fn fault(resp: &(u16, String)) -> String {
    assert_eq!(resp.0, 400, "expected 400, got {resp:?}");
    let v: serde_json::Value = serde_json::from_str(&resp.1).expect("JSON error body");
    v["fault_message"]
        .as_str()
        .expect("fault_message")
        .to_owned()
}

fn configure(v: &Vireo, boot_args: &str, drive: &Path) {
    let kernel = guest("elf");
    let boot = format!(
        r#"{{"kernel_image_path":"{}","boot_args":"{boot_args}"}}"#,
        kernel.display()
    );
    assert_eq!(v.req("PUT", "/boot-source", &boot).0, 204);
    assert_eq!(
        v.req(
            "PUT",
            "/machine-config",
            r#"{"vcpu_count":2,"mem_size_mib":256}"#
        )
        .0,
        204
    );
    let d = format!(
        r#"{{"drive_id":"rootfs","path_on_host":"{}","is_root_device":false,"is_read_only":false}}"#,
        drive.display()
    );
    assert_eq!(v.req("PUT", "/drives/rootfs", &d).0, 204);
    assert_eq!(v.req("PUT", "/entropy", "{}").0, 204);
}

#[test]
fn firecracker_getting_started_sequence() {
    let v = Vireo::start("api-sequence");
    let disk = v.dir.join("rootfs.ext4");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let (status, body) = v.req("GET", "/", "");
    assert_eq!(status, 200);
    let info: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(info["state"], "Not started");
    assert_eq!(info["id"], "test-vm");
    assert_eq!(
        v.req("GET", "/machine-config", "").1,
        r#"{"mem_size_mib":128,"smt":false,"track_dirty_pages":false,"vcpu_count":1}"#
    );

    configure(
        &v,
        "console=ttyS0 vireo.blktest vireo.rngtest vireo.kbd vireo.end=hang",
        &disk,
    );
    let metrics = v.dir.join("metrics.json");
    let body = format!(r#"{{"metrics_path":"{}"}}"#, metrics.display());
    assert_eq!(v.req("PUT", "/metrics", &body).0, 204);
    v.start_instance();
    // Ctrl+Alt+Del reaches the guest's keyboard controller and interrupts it on IRQ 1.
    let mut seen = v.wait_line("@kbd ready");
    assert_eq!(
        v.req("PUT", "/actions", r#"{"action_type":"SendCtrlAltDel"}"#)
            .0,
        204
    );
    seen.extend(v.wait_line("@end hang"));
    let keys = seen
        .iter()
        .find(|l| l.starts_with("@kbd bytes="))
        .unwrap_or_else(|| panic!("no keys: {seen:?}"));
    assert_eq!(
        field(keys, "bytes"),
        Some("1d38e053e0d3b89d"),
        "set-1 Ctrl+Alt+Del press and release"
    );
    assert!(field(keys, "irqs").unwrap().parse::<u32>().unwrap() >= 1);
    assert!(seen.iter().any(|l| l == "@cpus online=2"), "{seen:?}");
    assert!(
        seen.iter()
            .any(|l| l.starts_with("@blk dev=0 id status=0 used=21 id=rootfs")),
        "{seen:?}"
    );
    assert!(
        seen.iter().any(|l| l.starts_with("@rng dev=1 used=32")),
        "{seen:?}"
    );

    let state = |v: &Vireo| -> String {
        let (_, body) = v.req("GET", "/", "");
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["state"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(state(&v), "Running");
    assert_eq!(v.req("PATCH", "/vm", r#"{"state":"Paused"}"#).0, 204);
    assert_eq!(state(&v), "Paused");
    assert_eq!(v.req("PATCH", "/vm", r#"{"state":"Resumed"}"#).0, 204);
    assert_eq!(state(&v), "Running");

    // Pre-boot-only resources are refused after start, as is a second start.
    let m = fault(&v.req(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count":1,"mem_size_mib":128}"#,
    ));
    assert!(m.contains("not supported after starting"), "{m}");
    let m = fault(&v.req("PUT", "/actions", r#"{"action_type":"InstanceStart"}"#));
    assert!(m.contains("already running"), "{m}");

    // PATCH of a drive's path after start re-opens the backing file.
    let other = v.dir.join("other.img");
    std::fs::File::create(&other)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let patch = format!(
        r#"{{"drive_id":"rootfs","path_on_host":"{}"}}"#,
        other.display()
    );
    assert_eq!(v.req("PATCH", "/drives/rootfs", &patch).0, 204);
    let m = fault(&v.req(
        "PATCH",
        "/drives/rootfs",
        r#"{"drive_id":"rootfs","path_on_host":"/nonexistent.img"}"#,
    ));
    assert!(m.contains("/nonexistent.img"), "{m}");

    // Per-device and vCPU counters reach the metrics file.
    assert_eq!(
        v.req("PUT", "/actions", r#"{"action_type":"FlushMetrics"}"#)
            .0,
        204
    );
    let text = std::fs::read_to_string(&metrics).unwrap();
    let m: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    let blk = &m["devices"]["block_rootfs"];
    assert!(blk["write_bytes"].as_u64().unwrap() >= 16384, "{m}");
    assert!(blk["read_bytes"].as_u64().unwrap() >= 16384 + 4096, "{m}");
    assert!(blk["flushes"].as_u64().unwrap() >= 1, "{m}");
    assert!(
        blk["errors"].as_u64().unwrap() >= 1,
        "the out-of-range read: {m}"
    );
    assert_eq!(m["devices"]["entropy"]["read_bytes"], 32, "{m}");
    assert!(m["vcpu"]["exits_io"].as_u64().unwrap() > 100, "{m}");
    assert!(m["vcpu"]["exits_mmio"].as_u64().unwrap() > 10, "{m}");

    let (status, body) = v.req("GET", "/vm/config", "");
    assert_eq!(status, 200);
    let cfg: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(cfg["machine-config"]["vcpu_count"], 2);
    assert_eq!(cfg["drives"][0]["drive_id"], "rootfs");
    assert_eq!(
        cfg["drives"][0]["path_on_host"],
        other.display().to_string()
    );
    assert!(cfg["entropy"].is_object());
    assert_eq!(v.stop(libc::SIGTERM), Some(143));
}

#[test]
fn bad_requests_get_a_fault_message_and_the_server_keeps_going() {
    let v = Vireo::start("api-bad");
    let cases: Vec<(&str, &str, String, &str)> = vec![
        ("PUT", "/machine-config", "{not json".into(), "invalid JSON"),
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count":1,"mem_size_mib":128,"colour":"red"}"#.into(),
            "unknown field `colour`",
        ),
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count":"one","mem_size_mib":128}"#.into(),
            "invalid type",
        ),
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count":1}"#.into(),
            "missing field `mem_size_mib`",
        ),
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count":0,"mem_size_mib":128}"#.into(),
            "vCPU count 0",
        ),
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count":1,"mem_size_mib":0}"#.into(),
            "memory size 0 MiB",
        ),
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count":1,"mem_size_mib":99999999999}"#.into(),
            "more than this host",
        ),
        (
            "PUT",
            "/boot-source",
            r#"{"kernel_image_path":"/nonexistent/vmlinux"}"#.into(),
            "/nonexistent/vmlinux",
        ),
        (
            "PUT",
            "/boot-source",
            "x".repeat(60 * 1024),
            "larger than 51200 bytes",
        ),
        ("DELETE", "/machine-config", String::new(), "not allowed"),
        ("GET", "/no/such/thing", String::new(), "no such path"),
        (
            "PUT",
            "/network-interfaces/eth0",
            r#"{"iface_id":"eth0","host_dev_name":"vireo-none0"}"#.into(),
            "TAP device vireo-none0 does not exist",
        ),
        (
            "PUT",
            "/network-interfaces/eth0",
            r#"{"iface_id":"eth1","host_dev_name":"tap0"}"#.into(),
            "does not match",
        ),
        (
            "PUT",
            "/vsock",
            r#"{"guest_cid":2,"uds_path":"/tmp/v.sock"}"#.into(),
            "guest CID 2 cannot be used",
        ),
        (
            "PUT",
            "/balloon",
            r#"{"amount_mib":100000,"deflate_on_oom":false}"#.into(),
            "larger than the guest's memory",
        ),
        (
            "PUT",
            "/snapshot/create",
            r#"{"snapshot_path":"a","mem_file_path":"b"}"#.into(),
            "cannot create a snapshot: the microVM is not running",
        ),
        (
            "PUT",
            "/actions",
            r#"{"action_type":"Explode"}"#.into(),
            "unknown variant `Explode`",
        ),
        (
            "PUT",
            "/actions",
            r#"{"action_type":"InstanceStart"}"#.into(),
            "no boot source",
        ),
        (
            "PATCH",
            "/vm",
            r#"{"state":"Paused"}"#.into(),
            "not running",
        ),
        (
            "PUT",
            "/drives/a",
            r#"{"drive_id":"b","path_on_host":"/x","is_root_device":false}"#.into(),
            "does not match",
        ),
        (
            "PUT",
            "/drives/a",
            r#"{"drive_id":"a","path_on_host":"/nonexistent/a.img","is_root_device":false}"#.into(),
            "/nonexistent/a.img",
        ),
    ];
    for (method, path, body, needle) in &cases {
        let m = fault(&v.req(method, path, body));
        assert!(
            m.contains(needle),
            "{method} {path}: {m:?} should mention {needle:?}"
        );
    }
    assert_eq!(v.req("GET", "/", "").0, 200, "server still answers");
    assert_eq!(v.stop(libc::SIGTERM), Some(143));
}

#[test]
fn garbage_silent_and_many_clients() {
    let v = Vireo::start("api-clients");
    // HTTP garbage: a 400 and a closed connection.
    let mut s = UnixStream::connect(&v.sock).unwrap();
    s.write_all(b"THIS IS NOT HTTP\r\n\r\n").unwrap();
    let mut reply = String::new();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.read_to_string(&mut reply);
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply:?}");
    // A client that connects and never sends is disconnected.
    let mut silent = UnixStream::connect(&v.sock).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let start = Instant::now();
    let mut buf = [0u8; 64];
    // Returns 0 (closed by the server) or, if the server never closed it, an error after the
    // 20 s read timeout, which the elapsed-time check below catches.
    let _ = silent.read(&mut buf);
    assert!(
        start.elapsed() < Duration::from_secs(15),
        "idle client closed by the server"
    );
    // Many concurrent clients all get answers: beyond the connection cap a client is told 503
    // and tries again, as Firecracker's clients do.
    let sock = v.sock.clone();
    let threads: Vec<_> = (0..40)
        .map(|_| {
            let sock = sock.clone();
            std::thread::spawn(move || loop {
                match raw(&sock, b"GET /version HTTP/1.1\r\n\r\n", true).first() {
                    Some((503, _)) => std::thread::sleep(Duration::from_millis(20)),
                    Some((code, _)) => return *code,
                    None => panic!("no answer"),
                }
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap(), 200);
    }
    assert_eq!(v.stop(libc::SIGINT), Some(130));
}

#[test]
fn socket_in_use_is_refused_and_a_stale_one_replaced() {
    let a = Vireo::start("api-sock");
    let out = Command::new(vireo_bin())
        .arg("--api-sock")
        .arg(&a.sock)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use by a running process"), "{err}");
    // SIGKILL leaves the socket file behind; the next vireo replaces it.
    let sock = a.sock.clone();
    let mut a = a;
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    assert!(sock.exists());
    let mut b = Command::new(vireo_bin())
        .arg("--api-sock")
        .arg(&sock)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    while http_ok(&sock).is_none() {
        assert!(
            Instant::now() < end,
            "second vireo never served the stale path"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(b.id() as i32, libc::SIGTERM) };
    assert_eq!(wait_exit(&mut b).code(), Some(143));
    assert!(!sock.exists());
}

fn http_ok(sock: &Path) -> Option<u16> {
    UnixStream::connect(sock).ok()?;
    Some(http(sock, "GET", "/", "").0)
}

#[test]
fn logger_and_metrics() {
    let v = Vireo::start("api-telemetry");
    let log = v.dir.join("vireo.log");
    let metrics = v.dir.join("metrics.json");
    let body = format!(r#"{{"level":"Debug","log_path":"{}"}}"#, log.display());
    assert_eq!(v.req("PUT", "/logger", &body).0, 204);
    let m = fault(&v.req("PUT", "/logger", r#"{"level":"Loud"}"#));
    assert!(m.contains("'Loud'"), "{m}");
    let body = format!(r#"{{"metrics_path":"{}"}}"#, metrics.display());
    assert_eq!(v.req("PUT", "/metrics", &body).0, 204);
    let _ = v.req(
        "PUT",
        "/boot-source",
        r#"{"kernel_image_path":"/nonexistent"}"#,
    );
    assert_eq!(
        v.req("PUT", "/actions", r#"{"action_type":"FlushMetrics"}"#)
            .0,
        204
    );
    let text = std::fs::read_to_string(&metrics).unwrap();
    let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert!(
        last["api_server"]["requests"].as_u64().unwrap() >= 4,
        "{last}"
    );
    assert!(
        last["api_server"]["failed_requests"].as_u64().unwrap() >= 2,
        "{last}"
    );
    assert!(last["metrics"]["lost_metrics"].is_u64());
    assert!(last["logger"]["lost_logs"].is_u64());
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("/nonexistent"),
        "the failed request is logged: {logged}"
    );
    assert!(
        logged.contains(" INFO "),
        "levels shown by default: {logged}"
    );

    // Format options: no level, file and line of origin.
    let body = format!(
        r#"{{"level":"Info","log_path":"{}","show_level":false,"show_log_origin":true}}"#,
        log.display()
    );
    assert_eq!(v.req("PUT", "/logger", &body).0, 204);
    let _ = v.req(
        "PUT",
        "/boot-source",
        r#"{"kernel_image_path":"/second/missing"}"#,
    );
    let logged = std::fs::read_to_string(&log).unwrap();
    let line = logged
        .lines()
        .find(|l| l.contains("/second/missing"))
        .unwrap_or_else(|| panic!("{logged}"));
    assert!(!line.contains(" INFO "), "{line}");
    assert!(line.contains(".rs:"), "origin shown: {line}");

    // A module filter keeps other modules' messages out.
    assert_eq!(
        v.req("PUT", "/logger", r#"{"module":"no_such_module"}"#).0,
        204
    );
    let _ = v.req(
        "PUT",
        "/boot-source",
        r#"{"kernel_image_path":"/third/missing"}"#,
    );
    assert!(!std::fs::read_to_string(&log)
        .unwrap()
        .contains("/third/missing"));
    assert_eq!(v.stop(libc::SIGTERM), Some(143));
}

#[test]
fn config_file_without_api() {
    let dir = scratch("config-file");
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let cfg = dir.join("vm.json");
    let json = serde_json::json!({
        "boot-source": {
            "kernel_image_path": guest("pvh"),
            "boot_args": "console=ttyS0 vireo.blktest vireo.rngtest"
        },
        "machine-config": { "vcpu_count": 2, "mem_size_mib": 128 },
        "drives": [{
            "drive_id": "data",
            "path_on_host": disk,
            "is_root_device": false,
            "is_read_only": false
        }],
        "network-interfaces": [],
        "entropy": {}
    });
    write_file(&cfg, json.to_string().as_bytes());
    let r = run_raw(&["--config-file", cfg.to_str().unwrap(), "--no-api"]);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    assert_eq!(r.report("end").as_deref(), Some("poweroff"));
    assert!(
        r.stdout.contains("@blk dev=0 id status=0 used=21 id=data"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("@cpus online=2"));
    assert!(r.stdout.contains("@rng dev=1 used=32"));

    // An interface on a TAP that does not exist is refused by name and reason.
    let mut bad = json.clone();
    bad["network-interfaces"] =
        serde_json::json!([{"iface_id":"eth0","host_dev_name":"vireo-none0"}]);
    write_file(&cfg, bad.to_string().as_bytes());
    let r = run_raw(&["--config-file", cfg.to_str().unwrap(), "--no-api"]);
    assert_eq!(r.code(), 1);
    assert!(
        r.stderr
            .contains("network interface 'eth0': TAP device vireo-none0 does not exist"),
        "{}",
        r.stderr
    );
    // A balloon larger than the guest is refused with the limit.
    let mut bad = json.clone();
    bad["balloon"] = serde_json::json!({"amount_mib": 100000, "deflate_on_oom": false});
    write_file(&cfg, bad.to_string().as_bytes());
    let r = run_raw(&["--config-file", cfg.to_str().unwrap(), "--no-api"]);
    assert_eq!(r.code(), 1);
    assert!(
        r.stderr
            .contains("balloon: a target of 100000 MiB is larger than the guest's memory"),
        "{}",
        r.stderr
    );
    write_file(&cfg, b"{ \"boot-source\": ");
    let r = run_raw(&["--config-file", cfg.to_str().unwrap(), "--no-api"]);
    assert_eq!(r.code(), 1);
    assert!(r.stderr.contains("is not valid"), "{}", r.stderr);
    let r = run_raw(&[]);
    assert_eq!(r.code(), 2);
    assert!(r.stderr.contains("--api-sock"), "{}", r.stderr);
    let _ = std::fs::remove_dir_all(dir);
}

/// docs/api.yaml describes exactly the routes the server answers.
#[test]
fn openapi_document_matches_the_routes() {
    let doc = std::fs::read_to_string(workspace_root().join("docs/api.yaml")).unwrap();
    let mut documented = Vec::new();
    let mut path: Option<String> = None;
    let mut in_paths = false;
    for line in doc.lines() {
        if line == "paths:" {
            in_paths = true;
            continue;
        }
        if in_paths && !line.starts_with(' ') && !line.is_empty() {
            in_paths = false;
        }
        if !in_paths {
            continue;
        }
        if let Some(p) = line.strip_prefix("  /").and_then(|l| l.strip_suffix(':')) {
            path = Some(format!("/{p}"));
        } else if let (Some(p), Some(m)) = (
            &path,
            line.strip_prefix("    ").and_then(|l| l.strip_suffix(':')),
        ) {
            if ["get", "put", "patch"].contains(&m) {
                documented.push((m.to_uppercase(), p.clone()));
            }
        }
    }
    let mut served: Vec<(String, String)> = api::ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    documented.sort();
    served.sort();
    assert_eq!(documented, served);
}

#[test]
fn patching_a_drive_on_a_running_vm_changes_what_the_guest_sees() {
    let v = Vireo::start("api-drive-patch");
    let small = v.dir.join("small.img");
    let big = v.dir.join("big.img");
    std::fs::File::create(&small)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    std::fs::File::create(&big)
        .unwrap()
        .set_len(3 << 20)
        .unwrap();
    let boot = format!(
        r#"{{"kernel_image_path":"{}","boot_args":"vireo.blkwatch vireo.end=hang"}}"#,
        guest("elf").display()
    );
    assert_eq!(v.req("PUT", "/boot-source", &boot).0, 204);
    let drive = format!(
        r#"{{"drive_id":"data","path_on_host":"{}","is_root_device":false,"is_read_only":false{}}}"#,
        small.display(),
        engine_field()
    );
    assert_eq!(v.req("PUT", "/drives/data", &drive).0, 204);
    v.start_instance();
    v.wait_line("@blk dev=0 watch capacity=2048 generation=0");
    let patch = format!(
        r#"{{"drive_id":"data","path_on_host":"{}"}}"#,
        big.display()
    );
    assert_eq!(v.req("PATCH", "/drives/data", &patch).0, 204);
    v.wait_line("@blk dev=0 resized capacity=6144 generation=1");
    // The guest goes on to its end: the device still works after the swap.
    v.wait_line("@end hang");
    assert_eq!(v.stop(libc::SIGTERM), Some(143));
}

#[test]
fn half_closed_clients_get_their_answer() {
    let v = Vireo::start("api-half-close");
    let body = r#"{"vcpu_count":2,"mem_size_mib":64}"#;
    let req = format!(
        "PUT /machine-config HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let answers = raw(&v.sock, req.as_bytes(), true);
    assert_eq!(answers.first().map(|a| a.0), Some(204), "{answers:?}");
    let answers = raw(&v.sock, b"GET /machine-config HTTP/1.1\r\n\r\n", true);
    assert_eq!(answers.len(), 1, "{answers:?}");
    assert!(answers[0].1.contains(r#""mem_size_mib":64"#), "{answers:?}");
    assert_eq!(v.stop(libc::SIGTERM), Some(143));
}

#[test]
fn an_exiting_vireo_leaves_a_newer_socket_alone() {
    let dir = scratch("api-sock-identity");
    let sock = dir.join("api.sock");
    let start = || {
        let c = Command::new(vireo_bin())
            .arg("--api-sock")
            .arg(&sock)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let end = Instant::now() + Duration::from_secs(10);
        while http_ok(&sock).is_none() {
            assert!(Instant::now() < end, "vireo never served {sock:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
        c
    };
    let mut a = start();
    std::fs::remove_file(&sock).unwrap();
    let mut b = start();
    // SAFETY: kill(2) on our own children.
    unsafe { libc::kill(a.id() as i32, libc::SIGTERM) };
    assert_eq!(wait_exit(&mut a).code(), Some(143));
    assert_eq!(http_ok(&sock), Some(200), "B's socket survives A's exit");
    // SAFETY: as above.
    unsafe { libc::kill(b.id() as i32, libc::SIGTERM) };
    assert_eq!(wait_exit(&mut b).code(), Some(143));
    assert!(!sock.exists(), "B removes its own socket");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn connections_are_capped_and_slow_bodies_time_out() {
    let v = Vireo::start("api-cap");
    let held = hold_slots(&v.sock, api::MAX_CONNECTIONS);
    let answers = raw(&v.sock, b"GET / HTTP/1.1\r\n\r\n", false);
    assert_eq!(answers.len(), 1, "{answers:?}");
    assert_eq!(answers[0].0, 503);
    let v503: serde_json::Value = serde_json::from_str(&answers[0].1).unwrap();
    assert!(
        v503["fault_message"]
            .as_str()
            .unwrap()
            .contains("too many open connections"),
        "{answers:?}"
    );
    drop(held);
    let end = Instant::now() + Duration::from_secs(5);
    while get_status(&v.sock) != Some(200) {
        assert!(
            Instant::now() < end,
            "slots are released when clients leave"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Headers, then one byte of a ten-byte body, then nothing.
    let start = Instant::now();
    let answers = raw(
        &v.sock,
        b"PUT /logger HTTP/1.1\r\nContent-Length: 10\r\n\r\n{",
        false,
    );
    assert!(start.elapsed() < Duration::from_secs(8));
    assert_eq!(answers.first().map(|a| a.0), Some(408), "{answers:?}");
    assert!(
        answers[0].1.contains("did not arrive within"),
        "{answers:?}"
    );
    // Hundreds of such clients at once cannot lock the API out for longer than the timeout.
    let hogs: Vec<UnixStream> = (0..300)
        .filter_map(|_| {
            let mut s = UnixStream::connect(&v.sock).ok()?;
            let _ = s.write_all(b"PUT /logger HTTP/1.1\r\nContent-Length: 10\r\n\r\n{");
            Some(s)
        })
        .collect();
    let end = Instant::now() + Duration::from_secs(15);
    while get_status(&v.sock) != Some(200) {
        assert!(
            Instant::now() < end,
            "the API came back after the hogs timed out"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(hogs);
    assert_eq!(v.stop(libc::SIGTERM), Some(143));
}

#[test]
fn every_400_has_a_fault_message_even_for_broken_http() {
    let v = Vireo::start("api-broken-http");
    let cases: [&[u8]; 6] = [
        b"GET / HTTP/2.0\r\n\r\n",
        b"PUT /logger HTTP/1.1\r\nContent-Length: abc\r\n\r\n{}",
        b"GET /\xff\xfe HTTP/1.1\r\n\r\n",
        b"PUT /logger HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}garbage\r\n\r\n",
        b"THIS IS NOT HTTP\r\n\r\n",
        b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
    ];
    for case in cases {
        let answers = raw(&v.sock, case, false);
        let errors: Vec<_> = answers.iter().filter(|a| a.0 >= 400).collect();
        assert!(
            !errors.is_empty(),
            "{:?}: {answers:?}",
            String::from_utf8_lossy(case)
        );
        for e in errors {
            assert_eq!(e.0, 400);
            let m = fault(e);
            assert!(!m.is_empty());
        }
    }
    assert_eq!(http_ok(&v.sock), Some(200));
    assert_eq!(v.stop(libc::SIGTERM), Some(143));
}

#[test]
fn rejected_requests_are_counted_and_metrics_set_once() {
    let v = Vireo::start("api-metrics-count");
    let metrics = v.dir.join("metrics.json");
    let body = format!(r#"{{"metrics_path":"{}"}}"#, metrics.display());
    assert_eq!(v.req("PUT", "/metrics", &body).0, 204);
    fault(&v.req("PUT", "/machine-config", "{not json"));
    fault(&v.req("GET", "/no/such/path", ""));
    assert_eq!(raw(&v.sock, b"NOT HTTP\r\n\r\n", false)[0].0, 400);
    let again = format!(r#"{{"metrics_path":"{}"}}"#, v.dir.join("other").display());
    let m = fault(&v.req("PUT", "/metrics", &again));
    assert!(
        m.contains("reinitialization of metrics is not allowed"),
        "{m}"
    );
    assert_eq!(
        v.req("PUT", "/actions", r#"{"action_type":"FlushMetrics"}"#)
            .0,
        204
    );
    let text = std::fs::read_to_string(&metrics).unwrap();
    let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    // PUT /metrics, three rejected requests and the refused second PUT /metrics; FlushMetrics
    // itself is counted after it writes.
    assert_eq!(last["api_server"]["requests"], 5, "{last}");
    assert_eq!(last["api_server"]["failed_requests"], 4, "{last}");
    assert_eq!(v.stop(libc::SIGTERM), Some(143));
}

#[test]
fn hangup_quit_and_usr1_end_vireo_cleanly() {
    for sig in [libc::SIGHUP, libc::SIGQUIT, libc::SIGUSR1] {
        let v = Vireo::start(&format!("api-signal-{sig}"));
        // stop() also checks that the socket is gone.
        assert_eq!(v.stop(sig), Some(128 + sig));
    }
}

/// Opens `n` connections that each hold one of the server's connection slots: each gets an
/// answer to a first request, so none of them was turned away. The start-up probe of
/// `Vireo::start` may still hold a slot for a moment; then one of these is refused, and the
/// whole set is tried again.
fn hold_slots(sock: &Path, n: usize) -> Vec<UnixStream> {
    for _ in 0..20 {
        let held: Vec<UnixStream> = (0..n)
            .map(|_| {
                let mut s = UnixStream::connect(sock).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let _ = s.write_all(b"GET / HTTP/1.1\r\n\r\n");
                s
            })
            .collect();
        let all_served = held.iter().all(|mut s| {
            let mut buf = [0u8; 512];
            matches!(s.read(&mut buf), Ok(k) if k > 12 && buf.starts_with(b"HTTP/1.1 200"))
        });
        if all_served {
            return held;
        }
        drop(held);
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("could not hold {n} connection slots");
}

/// Status of `GET /` sent raw (a 503 before the request is read is a status like any other).
fn get_status(sock: &Path) -> Option<u16> {
    raw(sock, b"GET / HTTP/1.1\r\n\r\n", true)
        .first()
        .map(|a| a.0)
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo(3) on a NUL-terminated path the test owns.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

#[test]
fn fifos_never_block_the_vmm() {
    let v = Vireo::start("api-fifo");
    let fifo = v.dir.join("fifo");
    mkfifo(&fifo);
    let f = fifo.display();
    for (path, body, needle) in [
        (
            "/boot-source",
            format!(r#"{{"kernel_image_path":"{f}"}}"#),
            "kernel image",
        ),
        (
            "/boot-source",
            format!(
                r#"{{"kernel_image_path":"{}","initrd_path":"{f}"}}"#,
                guest("elf").display()
            ),
            "initrd",
        ),
        (
            "/drives/d",
            format!(
                r#"{{"drive_id":"d","path_on_host":"{f}","is_root_device":false,"is_read_only":true}}"#
            ),
            "drive image",
        ),
    ] {
        let m = fault(&v.req("PUT", path, &body));
        assert!(m.contains(needle) && m.contains("named pipe"), "{m}");
    }
    // Output destinations may be FIFOs nobody reads: accepted at once.
    for (path, body) in [
        ("/serial", format!(r#"{{"serial_out_path":"{f}"}}"#)),
        ("/logger", format!(r#"{{"log_path":"{f}","level":"Info"}}"#)),
        ("/metrics", format!(r#"{{"metrics_path":"{f}"}}"#)),
    ] {
        assert_eq!(v.req("PUT", path, &body).0, 204, "{path}");
    }
    // A running VM's drive cannot be swapped for a FIFO either.
    let img = v.dir.join("d.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let boot = format!(
        r#"{{"kernel_image_path":"{}","boot_args":"vireo.end=hang"}}"#,
        guest("elf").display()
    );
    assert_eq!(v.req("PUT", "/boot-source", &boot).0, 204);
    let drive = format!(
        r#"{{"drive_id":"d","path_on_host":"{}","is_root_device":false}}"#,
        img.display()
    );
    assert_eq!(v.req("PUT", "/drives/d", &drive).0, 204);
    v.start_instance();
    let m = fault(&v.req(
        "PATCH",
        "/drives/d",
        &format!(r#"{{"drive_id":"d","path_on_host":"{f}"}}"#),
    ));
    assert!(m.contains("named pipe"), "{m}");
    assert_eq!(http_ok(&v.sock), Some(200));
    assert_eq!(v.stop(libc::SIGTERM), Some(143));
}

#[test]
fn config_file_must_be_a_small_regular_file() {
    let dir = scratch("config-limits");
    let r = run_raw(&["--config-file", "/dev/zero", "--no-api"]);
    assert_eq!(r.code(), 1);
    assert!(
        r.stderr
            .contains("/dev/zero is not a regular file (it is a character device)"),
        "{}",
        r.stderr
    );
    let big = dir.join("big.json");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(2 << 20)
        .unwrap();
    let r = run_raw(&["--config-file", big.to_str().unwrap(), "--no-api"]);
    assert_eq!(r.code(), 1);
    assert!(
        r.stderr.contains("is larger than 1048576 bytes"),
        "{}",
        r.stderr
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// Firecracker's getting-started flow with Firecracker's own flags, as its docs and jailer
/// pass them.
#[test]
fn firecracker_command_line_flags() {
    let dir = scratch("fc-flags");
    let sock = dir.join("firecracker.socket");
    let log = dir.join("fc.log");
    let metrics = dir.join("fc.metrics");
    let mut child = vireo()
        .arg("--api-sock")
        .arg(&sock)
        .args([
            "--id",
            "fc-vm-1",
            "--level",
            "Info",
            "--show-level",
            "--show-log-origin",
        ])
        .arg("--log-path")
        .arg(&log)
        .arg("--metrics-path")
        .arg(&metrics)
        .args([
            "--no-seccomp",
            "--start-time-us",
            "1",
            "--start-time-cpu-us",
            "0",
            "--parent-cpu-time-us",
            "5",
            "--http-api-max-payload-size",
            "1000",
        ])
        .spawn()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    while http_ok(&sock).is_none() {
        assert!(Instant::now() < end, "API socket never came up");
        std::thread::sleep(Duration::from_millis(10));
    }
    let (code, body) = http(&sock, "GET", "/", "");
    assert_eq!(code, 200);
    assert!(body.contains(r#""id":"fc-vm-1""#), "{body}");
    let m = fault(&http(&sock, "PUT", "/boot-source", &"x".repeat(2000)));
    assert!(m.contains("larger than 1000 bytes"), "{m}");
    let (_, cfg) = http(&sock, "GET", "/vm/config", "");
    assert!(cfg.contains(&metrics.display().to_string()), "{cfg}");
    let kernel = guest("elf");
    let boot = format!(
        r#"{{"kernel_image_path":"{}","boot_args":"console=ttyS0 vireo.end=poweroff"}}"#,
        kernel.display()
    );
    assert_eq!(http(&sock, "PUT", "/boot-source", &boot).0, 204);
    assert_eq!(
        http(
            &sock,
            "PUT",
            "/actions",
            r#"{"action_type":"InstanceStart"}"#
        )
        .0,
        204
    );
    assert_eq!(wait_exit(&mut child).code(), Some(0));
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(log_text.contains("INFO"), "--show-level: {log_text}");
    assert!(log_text.contains(".rs:"), "--show-log-origin: {log_text}");
    assert!(
        log_text.contains("VM ended: the guest powered off"),
        "{log_text}"
    );
    let text = std::fs::read_to_string(&metrics).unwrap();
    let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(last["vmm"]["guest_power_offs"], 1, "{last}");
    assert_eq!(last["vmm"]["guest_resets"], 0, "{last}");
    assert!(
        last["api_server"]["process_startup_time_us"]
            .as_u64()
            .unwrap()
            > 0
    );
    assert!(!sock.exists());

    // Flags for features vireo does not have are refused by name.
    for flag in [
        &["--boot-timer"][..],
        &["--enable-pci"],
        &["--describe-snapshot", "/x"],
        &["--snapshot-version"],
    ] {
        let r = run_raw(&[&["--api-sock", sock.to_str().unwrap()][..], flag].concat());
        assert_eq!(r.code(), 1, "{flag:?}");
        assert!(r.stderr.contains(flag[0]), "{flag:?}: {}", r.stderr);
        assert!(
            r.stderr.contains("not supported by vireo yet"),
            "{}",
            r.stderr
        );
        assert!(!sock.exists());
    }
    let r = run_raw(&["--api-sock", sock.to_str().unwrap(), "--id", "bad id!"]);
    assert_eq!(r.code(), 2, "{}", r.stderr);
    assert!(r.stderr.contains("instance ID"), "{}", r.stderr);
    let _ = std::fs::remove_dir_all(dir);
}

/// A reset and a power-off both exit 0; the log and the metrics tell them apart.
#[test]
fn reset_and_power_off_are_told_apart() {
    let dir = scratch("reset-vs-off");
    for (how, key, log_line) in [
        ("reset", "guest_resets", "VM ended: the guest reset"),
        (
            "poweroff",
            "guest_power_offs",
            "VM ended: the guest powered off",
        ),
    ] {
        let metrics = dir.join(format!("{how}.metrics"));
        let log = dir.join(format!("{how}.log"));
        let cfg = dir.join(format!("{how}.json"));
        let json = serde_json::json!({
            "boot-source": {
                "kernel_image_path": guest("elf"),
                "boot_args": format!("console=ttyS0 vireo.end={how}")
            },
            "logger": { "log_path": log, "level": "Info" },
            "metrics": { "metrics_path": metrics },
        });
        write_file(&cfg, json.to_string().as_bytes());
        let r = run_raw(&["--config-file", cfg.to_str().unwrap(), "--no-api"]);
        assert_eq!(r.code(), 0, "{}", r.stderr);
        assert_eq!(r.report("end").as_deref(), Some(how));
        let log_text = std::fs::read_to_string(&log).unwrap();
        assert!(log_text.contains(log_line), "{how}: {log_text}");
        let text = std::fs::read_to_string(&metrics).unwrap();
        let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        assert_eq!(last["vmm"][key], 1, "{how}: {last}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// The route table of `firecracker_api_routes_work_or_name_what_is_missing`: what each of
/// Firecracker's routes is sent, and what it must answer. (method, path as Firecracker's API
/// description writes it, concrete path, body, status, needle in the answer.)
type RouteCase = (
    &'static str,
    &'static str,
    &'static str,
    String,
    u16,
    &'static str,
);

const MISSING: &str = "not supported by vireo yet";

fn firecracker_route_table(dir: &Path) -> Vec<RouteCase> {
    let img = dir.join("cov.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let (elf, img_s) = (
        guest("elf").display().to_string(),
        img.display().to_string(),
    );
    let metrics = dir.join("metrics").display().to_string();
    let serial = dir.join("serial").display().to_string();
    vec![
        ("GET", "/", "/", String::new(), 200, "vireo"),
        ("PUT", "/logger", "/logger", r#"{"level":"Info","show_level":false}"#.into(), 204, ""),
        ("PUT", "/metrics", "/metrics", format!(r#"{{"metrics_path":"{metrics}","emit_id":true}}"#), 204, ""),
        ("PUT", "/actions", "/actions", r#"{"action_type":"FlushMetrics"}"#.into(), 204, ""),
        ("GET", "/balloon", "/balloon", String::new(), 400, "No balloon device found."),
        ("PATCH", "/balloon", "/balloon", r#"{"amount_mib":1}"#.into(), 400, "No balloon device found."),
        ("PUT", "/balloon", "/balloon", r#"{"amount_mib":0,"deflate_on_oom":false,"stats_polling_interval_s":1}"#.into(), 204, ""),
        ("PATCH", "/balloon", "/balloon", r#"{"amount_mib":1}"#.into(), 204, ""),
        ("GET", "/balloon", "/balloon", String::new(), 200, r#""amount_mib":1"#),
        ("GET", "/balloon/statistics", "/balloon/statistics", String::new(), 400, "not supported before starting"),
        ("PATCH", "/balloon/statistics", "/balloon/statistics", r#"{"stats_polling_interval_s":1}"#.into(), 400, "not supported before starting"),
        ("PATCH", "/balloon/hinting/start", "/balloon/hinting/start", "{}".into(), 400, "not supported before starting"),
        ("GET", "/balloon/hinting/status", "/balloon/hinting/status", String::new(), 400, "not supported before starting"),
        ("PATCH", "/balloon/hinting/stop", "/balloon/hinting/stop", String::new(), 400, "not supported before starting"),
        ("PUT", "/boot-source", "/boot-source", format!(r#"{{"kernel_image_path":"{elf}","boot_args":"console=ttyS0"}}"#), 204, ""),
        ("PUT", "/cpu-config", "/cpu-config", r#"{"cpuid_modifiers":[]}"#.into(), 204, ""),
        ("PUT", "/drives/{drive_id}", "/drives/cov", format!(r#"{{"drive_id":"cov","path_on_host":"{img_s}","is_root_device":true,"cache_type":"Unsafe","io_engine":"Sync"}}"#), 204, ""),
        ("PATCH", "/drives/{drive_id}", "/drives/cov", format!(r#"{{"drive_id":"cov","path_on_host":"{img_s}"}}"#), 204, ""),
        ("PUT", "/pmem/{id}", "/pmem/p0", r#"{"id":"p0","path_on_host":"/x"}"#.into(), 400, MISSING),
        ("PATCH", "/pmem/{id}", "/pmem/p0", r#"{"id":"p0"}"#.into(), 400, MISSING),
        ("GET", "/machine-config", "/machine-config", String::new(), 200, "vcpu_count"),
        ("PUT", "/machine-config", "/machine-config", r#"{"vcpu_count":1,"mem_size_mib":64,"smt":false,"track_dirty_pages":false,"huge_pages":"None"}"#.into(), 204, ""),
        ("PATCH", "/machine-config", "/machine-config", r#"{"mem_size_mib":128}"#.into(), 204, ""),
        ("PUT", "/mmds", "/mmds", r#"{"latest":{"a":"b"}}"#.into(), 204, ""),
        ("PATCH", "/mmds", "/mmds", r#"{"latest":{"c":"d"}}"#.into(), 204, ""),
        ("GET", "/mmds", "/mmds", String::new(), 200, r#"{"latest":{"a":"b","c":"d"}}"#),
        // As in Firecracker, the interfaces must exist first.
        ("PUT", "/mmds/config", "/mmds/config", r#"{"network_interfaces":["eth0"]}"#.into(), 400, "network interface 'eth0' does not exist"),
        ("PUT", "/entropy", "/entropy", "{}".into(), 204, ""),
        ("PUT", "/serial", "/serial", format!(r#"{{"serial_out_path":"{serial}"}}"#), 204, ""),
        ("GET", "/hotplug/memory", "/hotplug/memory", String::new(), 400, "memory hotplug is not configured"),
        ("PUT", "/hotplug/memory", "/hotplug/memory", r#"{"total_size_mib":1024}"#.into(), 204, ""),
        ("PATCH", "/hotplug/memory", "/hotplug/memory", r#"{"requested_size_mib":0}"#.into(), 400, "not supported before starting"),
        ("GET", "/hotplug/memory", "/hotplug/memory", String::new(), 200, r#""total_size_mib":1024"#),
        // As Firecracker, the TAP is opened when the interface is configured.
        ("PUT", "/network-interfaces/{iface_id}", "/network-interfaces/eth0", r#"{"iface_id":"eth0","host_dev_name":"vireo-none0"}"#.into(), 400, "TAP device vireo-none0 does not exist"),
        ("PATCH", "/network-interfaces/{iface_id}", "/network-interfaces/eth0", r#"{"iface_id":"eth0"}"#.into(), 400, "network interface 'eth0' does not exist"),
        ("PUT", "/snapshot/create", "/snapshot/create", r#"{"snapshot_path":"a","mem_file_path":"b"}"#.into(), 400, "the microVM is not running"),
        // After boot-specific resources were configured, as in Firecracker.
        ("PUT", "/snapshot/load", "/snapshot/load", r#"{"snapshot_path":"a","mem_file_path":"b"}"#.into(), 400, "after configuring boot-specific resources"),
        ("GET", "/version", "/version", String::new(), 200, "firecracker_version"),
        // Before InstanceStart Firecracker refuses this too.
        ("PATCH", "/vm", "/vm", r#"{"state":"Paused"}"#.into(), 400, "not running"),
        ("GET", "/vm/config", "/vm/config", String::new(), 200, "\"cov\""),
        ("PUT", "/vsock", "/vsock", r#"{"guest_cid":3,"uds_path":"/tmp/v.sock","vsock_id":"vsock0"}"#.into(), 204, ""),
    ]
}

/// Every path and method of Firecracker's API works as in Firecracker or answers 400 naming
/// the feature vireo lacks.
#[test]
fn firecracker_api_routes_work_or_name_what_is_missing() {
    let v = Vireo::start("api-spec-coverage");
    let metrics = v.dir.join("metrics");
    for (method, _, path, body, status, needle) in firecracker_route_table(&v.dir) {
        let (got, answer) = v.req(method, path, &body);
        assert_eq!(got, status, "{method} {path}: {answer}");
        if status == 400 {
            assert!(
                fault(&(got, answer.clone())).contains(needle),
                "{method} {path}: {answer}"
            );
        } else {
            assert!(answer.contains(needle), "{method} {path}: {answer}");
        }
    }
    let text = std::fs::read_to_string(&metrics).unwrap();
    let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(
        first["id"], "test-vm",
        "emit_id puts the instance ID in each line"
    );
    assert_eq!(v.stop(libc::SIGTERM), Some(143));
}

/// The route table covers exactly the routes of Firecracker's API description, so a route
/// added there fails here until it is given a behaviour.
#[test]
#[cfg_attr(
    not(vireo_fc_spec),
    ignore = "skipped: Firecracker's API description not found (set VIREO_FIRECRACKER_API_SPEC)"
)]
fn firecracker_route_table_covers_the_api_description() {
    #[cfg(vireo_fc_spec)]
    let spec = std::fs::read_to_string(env!("VIREO_FC_SPEC")).unwrap();
    #[cfg(not(vireo_fc_spec))]
    let spec = String::new();
    let mut routes = Vec::new();
    let (mut in_paths, mut path) = (false, String::new());
    for line in spec.lines() {
        if line == "paths:" {
            in_paths = true;
        } else if in_paths && !line.starts_with(' ') && !line.is_empty() {
            in_paths = false;
        } else if let Some(p) = line.strip_prefix("  /").and_then(|l| l.strip_suffix(':')) {
            path = format!("/{p}");
        } else if let Some(m) = line.strip_prefix("    ").and_then(|l| l.strip_suffix(':')) {
            if in_paths && ["get", "put", "patch", "post", "delete"].contains(&m) {
                routes.push((m.to_uppercase(), path.clone()));
            }
        }
    }
    assert!(routes.len() > 30, "parsed {routes:?}");
    let dir = scratch("api-spec-table");
    let mut covered: Vec<(String, String)> = firecracker_route_table(&dir)
        .iter()
        .map(|(m, p, ..)| (m.to_string(), p.to_string()))
        .collect();
    covered.sort();
    covered.dedup();
    routes.sort();
    assert_eq!(
        covered, routes,
        "the table covers exactly the spec's routes"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// Clients that pipeline requests and never read the answers cannot hold the API's connection
/// slots: once an answer has waited too long, their connections are dropped.
#[test]
fn clients_that_never_read_cannot_lock_the_api_out() {
    let v = Vireo::start("api-no-readers");
    let request = b"GET /version HTTP/1.1\r\n\r\n".repeat(4096);
    let stallers: Vec<UnixStream> = hold_slots(&v.sock, api::MAX_CONNECTIONS)
        .into_iter()
        .map(|mut s| {
            s.set_nonblocking(true).unwrap();
            // Fill both directions: requests the server reads, answers nobody reads.
            for _ in 0..200 {
                if s.write(&request).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            s
        })
        .collect();
    assert_eq!(get_status(&v.sock), Some(503), "every slot is held");
    let end = Instant::now() + Duration::from_secs(20);
    while get_status(&v.sock) != Some(200) {
        assert!(
            Instant::now() < end,
            "slots held by clients that never read were never released"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(stallers);
    assert_eq!(v.stop(libc::SIGTERM), Some(143));
}

/// Network interfaces through Firecracker's API: the TAP is checked at PUT, the
/// configuration shows in GET /vm/config, and the guest talks to the host after start.
#[test]
fn network_interfaces_through_the_api() {
    let ns = NetNs::enter("api-net");
    ns.tap("tap0", Some("10.0.0.1/24"));
    ns.tap("tap1", None);
    let v = Vireo::start("api-net");
    let put = |id: &str, body: &str| v.req("PUT", &format!("/network-interfaces/{id}"), body);
    let m = fault(&put(
        "eth0",
        r#"{"iface_id":"eth0","host_dev_name":"nosuch0"}"#,
    ));
    assert!(
        m.contains("eth0") && m.contains("nosuch0 does not exist"),
        "{m}"
    );
    let m = fault(&put("eth0", r#"{"iface_id":"eth0","host_dev_name":"lo"}"#));
    assert!(m.contains("lo is not a TAP device"), "{m}");
    let m = fault(&put(
        "eth0",
        r#"{"iface_id":"eth0","host_dev_name":"tap0","guest_mac":"01:02:03:04:05:06"}"#,
    ));
    assert!(m.contains("multicast"), "{m}");
    let m = fault(&put(
        "eth0",
        r#"{"iface_id":"eth0","host_dev_name":"tap0","mtu":40}"#,
    ));
    assert!(m.contains("mtu 40"), "{m}");
    let m = fault(&put(
        "eth0",
        r#"{"iface_id":"eth0","host_dev_name":"tap0","rx_rate_limiter":{"bandwidth":{"size":1,"refill":1}}}"#,
    ));
    assert!(m.contains("refill"), "{m}");
    let eth0 =
        r#"{"iface_id":"eth0","host_dev_name":"tap0","guest_mac":"02:00:00:00:00:02","mtu":1500}"#;
    assert_eq!(put("eth0", eth0).0, 204);
    // The same TAP or MAC for another interface is refused.
    let m = fault(&put(
        "eth1",
        r#"{"iface_id":"eth1","host_dev_name":"tap0"}"#,
    ));
    assert!(
        m.contains("TAP tap0 is already used by interface 'eth0'"),
        "{m}"
    );
    let m = fault(&put(
        "eth1",
        r#"{"iface_id":"eth1","host_dev_name":"tap1","guest_mac":"02:00:00:00:00:02"}"#,
    ));
    assert!(m.contains("already used by interface 'eth0'"), "{m}");
    let (code, cfg) = v.req("GET", "/vm/config", "");
    assert_eq!(code, 200);
    let cfg: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    assert_eq!(
        cfg["network-interfaces"],
        serde_json::json!([{"iface_id":"eth0","host_dev_name":"tap0","guest_mac":"02:00:00:00:00:02","mtu":1500}])
    );
    // Rate limiters: set before boot, shown in the configuration, changed while it runs.
    let limit = r#"{"iface_id":"eth0","tx_rate_limiter":{"ops":{"size":1000,"refill_time":1000}}}"#;
    assert_eq!(v.req("PATCH", "/network-interfaces/eth0", limit).0, 204);
    let cfg: serde_json::Value = serde_json::from_str(&v.req("GET", "/vm/config", "").1).unwrap();
    assert_eq!(
        cfg["network-interfaces"][0]["tx_rate_limiter"]["ops"]["size"], 1000,
        "{cfg}"
    );
    let m = fault(&v.req(
        "PATCH",
        "/network-interfaces/eth9",
        r#"{"iface_id":"eth9","tx_rate_limiter":{"ops":{"size":1,"refill_time":1}}}"#,
    ));
    assert!(m.contains("'eth9' does not exist"), "{m}");
    let boot = format!(
        r#"{{"kernel_image_path":"{}","boot_args":"console=ttyS0 vireo.nettest"}}"#,
        guest("elf").display()
    );
    assert_eq!(v.req("PUT", "/boot-source", &boot).0, 204);
    v.start_instance();
    let host_mac = ns.mac("tap0");
    let lines = v.wait_line(&format!("@net arp-reply ip=10.0.0.1 mac={host_mac}"));
    let config = lines.iter().find(|l| l.starts_with("@net dev=0")).unwrap();
    assert!(
        config.contains("mac=02:00:00:00:00:02 mac_offered=1 status=1 mtu=1500"),
        "{config}"
    );
    let m = fault(&put("eth0", eth0));
    assert!(m.contains("not supported after starting"), "{m}");
    let patch =
        r#"{"iface_id":"eth0","rx_rate_limiter":{"bandwidth":{"size":1048576,"refill_time":100}}}"#;
    assert_eq!(v.req("PATCH", "/network-interfaces/eth0", patch).0, 204);
    let cfg: serde_json::Value = serde_json::from_str(&v.req("GET", "/vm/config", "").1).unwrap();
    assert_eq!(
        cfg["network-interfaces"][0]["rx_rate_limiter"]["bandwidth"]["size"], 1048576,
        "{cfg}"
    );
    assert_eq!(v.stop(libc::SIGTERM), Some(143));
}

/// MMDS's data store and configuration through the API: merge patches, the size limit, and
/// bad configurations named.
#[test]
fn mmds_store_and_config_through_the_api() {
    let v = Vireo::start("api-mmds");
    assert_eq!(v.req("GET", "/mmds", "").1, "{}");
    assert_eq!(v.req("PUT", "/mmds", r#"{"a":{"b":"c"},"x":"y"}"#).0, 204);
    assert_eq!(
        v.req("PATCH", "/mmds", r#"{"a":{"d":"e"},"x":null}"#).0,
        204
    );
    let (code, body) = v.req("GET", "/mmds", "");
    assert_eq!(code, 200);
    let data: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(data, serde_json::json!({"a": {"b": "c", "d": "e"}}));
    let m = fault(&v.req("PUT", "/mmds", "[1, 2]"));
    assert!(m.contains("must be a JSON object"), "{m}");
    let big = format!(r#"{{"k":"{}"}}"#, "x".repeat(52_000));
    let (code, _) = v.req("PUT", "/mmds", &big);
    assert_eq!(code, 400, "larger than a request body may be");
    let near = format!(r#"{{"k":"{}"}}"#, "x".repeat(30_000));
    assert_eq!(v.req("PUT", "/mmds", &near).0, 204);
    let m = fault(&v.req("PATCH", "/mmds", &near.replace("\"k\"", "\"k2\"")));
    assert!(m.contains("limit of 51200 bytes"), "{m}");
    let m = fault(&v.req("PUT", "/mmds/config", r#"{"network_interfaces":[]}"#));
    assert!(m.contains("names no interface"), "{m}");
    let m = fault(&v.req(
        "PUT",
        "/mmds/config",
        r#"{"version":"V3","network_interfaces":["eth0"]}"#,
    ));
    assert!(m.contains("version 'V3'"), "{m}");
    let m = fault(&v.req(
        "PUT",
        "/mmds/config",
        r#"{"network_interfaces":["eth0"],"ipv4_address":"10.0.0.1"}"#,
    ));
    assert!(m.contains("not a usable link-local address"), "{m}");
    let (_, cfg) = v.req("GET", "/vm/config", "");
    let cfg: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    assert!(cfg["mmds-config"].is_null());
    assert_eq!(v.stop(libc::SIGTERM), Some(143));
}

/// `"pit": true` in `machine-config` (vireo's field) gives the guest KVM's PIT, as `--pit` does;
/// GET shows the field only then, so Firecracker's view of a default VM is unchanged.
#[test]
fn machine_config_can_ask_for_the_pit() {
    let v = Vireo::start("api-pit");
    let kernel = guest("elf");
    let boot = format!(
        r#"{{"kernel_image_path":"{}","boot_args":"console=ttyS0 vireo.end=hang"}}"#,
        kernel.display()
    );
    assert_eq!(v.req("PUT", "/boot-source", &boot).0, 204);
    assert_eq!(v.req("PATCH", "/machine-config", r#"{"pit":true}"#).0, 204);
    assert_eq!(
        v.req("GET", "/machine-config", "").1,
        r#"{"mem_size_mib":128,"pit":true,"smt":false,"track_dirty_pages":false,"vcpu_count":1}"#
    );
    let m = fault(&v.req("PATCH", "/machine-config", r#"{"pit":"no"}"#));
    assert!(m.contains("expected a boolean"), "{m}");
    v.start_instance();
    v.wait_line("@end hang");
    assert!(has_pit_thread(v.child.id()));
    let (_, body) = v.req("GET", "/vm/config", "");
    let cfg: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(cfg["machine-config"]["pit"], true, "{cfg}");
    assert_eq!(v.stop(libc::SIGTERM), Some(143));

    // The default leaves it out.
    let v = Vireo::start("api-no-pit");
    assert_eq!(v.req("PUT", "/boot-source", &boot).0, 204);
    v.start_instance();
    v.wait_line("@end hang");
    assert!(!has_pit_thread(v.child.id()));
    assert_eq!(v.stop(libc::SIGTERM), Some(143));
}
