//! The Firecracker-compatible API over its Unix socket, driven by a real HTTP client (hyper),
//! and the config-file route.

mod common;
use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One HTTP request on a fresh connection; returns (status, body).
fn http(sock: &Path, method: &str, path: &str, body: &str) -> (u16, String) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let stream = tokio::net::UnixStream::connect(sock)
            .await
            .expect("connect");
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        let req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("Host", "localhost")
            .header("Content-Type", "application/json")
            .body(Full::new(Bytes::from(body.to_owned())))
            .unwrap();
        let resp = sender.send_request(req).await.expect("response");
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    })
}

fn fault(resp: &(u16, String)) -> String {
    assert_eq!(resp.0, 400, "expected 400, got {resp:?}");
    let v: serde_json::Value = serde_json::from_str(&resp.1).expect("JSON error body");
    v["fault_message"]
        .as_str()
        .expect("fault_message")
        .to_owned()
}

struct Vireo {
    child: Child,
    sock: PathBuf,
    lines: std::sync::mpsc::Receiver<String>,
    dir: PathBuf,
}

impl Vireo {
    fn start(name: &str) -> Self {
        let dir = scratch(name);
        let sock = dir.join("api.sock");
        let mut child = Command::new(env!("CARGO_BIN_EXE_vireo"))
            .arg("--api-sock")
            .arg(&sock)
            .args(["--id", "test-vm"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l.trim_end_matches('\r').to_owned()).is_err() {
                    break;
                }
            }
        });
        let end = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(&sock).is_err() {
            assert!(Instant::now() < end, "API socket never came up");
            std::thread::sleep(Duration::from_millis(5));
        }
        Vireo {
            child,
            sock,
            lines,
            dir,
        }
    }

    fn req(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        http(&self.sock, method, path, body)
    }

    fn wait_line(&self, want: &str) -> Vec<String> {
        let mut seen = Vec::new();
        wait_line(&self.lines, want, &mut seen);
        seen
    }

    fn stop(mut self, sig: i32) -> Option<i32> {
        // SAFETY: kill(2) on the pid of a child this test started and has not reaped.
        unsafe { libc::kill(self.child.id() as i32, sig) };
        let code = wait_exit(&mut self.child).code();
        assert!(!self.sock.exists(), "vireo removes its socket on exit");
        let _ = std::fs::remove_dir_all(&self.dir);
        code
    }
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
    assert_eq!(
        v.req("PUT", "/actions", r#"{"action_type":"InstanceStart"}"#)
            .0,
        204
    );
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
            r#"{"iface_id":"eth0","host_dev_name":"tap0"}"#.into(),
            "not supported by vireo yet",
        ),
        (
            "PUT",
            "/vsock",
            r#"{"guest_cid":3,"uds_path":"/tmp/v.sock"}"#.into(),
            "not supported by vireo yet",
        ),
        (
            "GET",
            "/balloon",
            String::new(),
            "not supported by vireo yet",
        ),
        (
            "PUT",
            "/snapshot/create",
            r#"{"snapshot_path":"a","mem_file_path":"b"}"#.into(),
            "snapshotting is not supported",
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
    // Many concurrent clients all get answers.
    let sock = v.sock.clone();
    let threads: Vec<_> = (0..40)
        .map(|_| {
            let sock = sock.clone();
            std::thread::spawn(move || http(&sock, "GET", "/version", "").0)
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
    let out = Command::new(env!("CARGO_BIN_EXE_vireo"))
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
    let mut b = Command::new(env!("CARGO_BIN_EXE_vireo"))
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

    // A device vireo does not have yet is refused by name.
    let mut bad = json.clone();
    bad["network-interfaces"] = serde_json::json!([{"iface_id":"eth0","host_dev_name":"tap0"}]);
    write_file(&cfg, bad.to_string().as_bytes());
    let r = run_raw(&["--config-file", cfg.to_str().unwrap(), "--no-api"]);
    assert_eq!(r.code(), 1);
    assert!(
        r.stderr
            .contains("network-interfaces: this device is not supported"),
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
        r#"{{"drive_id":"data","path_on_host":"{}","is_root_device":false,"is_read_only":false}}"#,
        small.display()
    );
    assert_eq!(v.req("PUT", "/drives/data", &drive).0, 204);
    assert_eq!(
        v.req("PUT", "/actions", r#"{"action_type":"InstanceStart"}"#)
            .0,
        204
    );
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
