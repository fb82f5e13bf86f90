//! Confinement: every thread of a running vireo under a seccomp filter, each kind of thread
//! stopped (exit code 148, the call named) when it steps outside its list, log mode, and
//! Firecracker filter files.

mod common;
use common::*;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What `/proc/PID/task/*/status` says about each thread: (name, Seccomp, NoNewPrivs).
fn thread_modes(pid: u32) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let Ok(status) = std::fs::read_to_string(t.unwrap().path().join("status")) else {
            continue;
        };
        let get = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.trim().to_owned())
                .unwrap_or_default()
        };
        out.push((get("Name:"), get("Seccomp:"), get("NoNewPrivs:")));
    }
    out.sort();
    out
}

/// A config file booting the ELF guest with `args` on its command line, a drive and the
/// entropy device, 2 vCPUs.
fn config(dir: &Path, args: &str) -> PathBuf {
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let cfg = dir.join("vm.json");
    let json = serde_json::json!({
        "boot-source": {
            "kernel_image_path": guest("elf"),
            "boot_args": format!("console=ttyS0 {args}")
        },
        "machine-config": { "vcpu_count": 2, "mem_size_mib": 64 },
        "drives": [{
            "drive_id": "data",
            "path_on_host": disk,
            "is_root_device": false,
            "is_read_only": false,
            "io_engine": io_engine()
        }],
        "entropy": {}
    });
    write_file(&cfg, json.to_string().as_bytes());
    cfg
}

#[test]
fn every_thread_of_a_running_vm_is_confined() {
    let dir = scratch("seccomp-threads");
    let cfg = config(
        &dir,
        "vireo.blktest vireo.rngtest vireo.count=0 vireo.tickms=100",
    );
    let sock = dir.join("api.sock");
    let metrics = dir.join("metrics");
    let mut child = vireo()
        .arg("--api-sock")
        .arg(&sock)
        .arg("--config-file")
        .arg(&cfg)
        .arg("--metrics-path")
        .arg(&metrics)
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    // Ticks come after the device tests: every thread the VM has is up by then.
    let mut seen = Vec::new();
    let end = Instant::now() + Duration::from_secs(60);
    while !seen.iter().any(|l: &String| l.starts_with("@tick ")) {
        match rx.recv_timeout(end.saturating_duration_since(Instant::now())) {
            Ok(l) => seen.push(l),
            Err(_) => panic!("the guest never ticked; saw {seen:#?}"),
        }
    }
    // An API request on a running VM, so the API thread has served one confined.
    assert_eq!(http(&sock, "GET", "/", "").0, 200);
    let modes = thread_modes(child.id());
    let names: Vec<&str> = modes.iter().map(|(n, _, _)| n.as_str()).collect();
    for want in [
        "vireo",
        "api",
        "vcpu0",
        "vcpu1",
        "virtio-blk",
        "virtio-rng",
        "serial-input",
        "metrics",
    ] {
        assert!(names.contains(&want), "no {want} thread in {modes:?}");
    }
    for (name, seccomp, nnp) in &modes {
        assert_eq!(seccomp, "2", "thread {name} is not filtered: {modes:?}");
        assert_eq!(nnp, "1", "thread {name}: NoNewPrivs: {modes:?}");
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn no_seccomp_leaves_threads_unfiltered() {
    let kernel = guest("pvh");
    let mut child = vireo()
        .args(["--no-seccomp", "run", "--kernel"])
        .arg(&kernel)
        .args(["--cmdline", "console=ttyS0 vireo.count=0"])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let modes = thread_modes(child.id());
    let _ = child.kill();
    let _ = child.wait();
    assert!(modes.iter().any(|(n, _, _)| n == "vcpu0"), "{modes:?}");
    assert!(modes.iter().all(|(_, s, _)| s == "0"), "{modes:?}");
}

/// Runs vireo with `VIREO_SECCOMP_SELFTEST=kind` and `args`.
fn selftest(kind: &str, args: &[&str]) -> Run {
    let mut c = vireo();
    c.env("VIREO_SECCOMP_SELFTEST", kind).args(args);
    finish(c.spawn().unwrap())
}

fn assert_stopped(kind: &str, r: &Run) {
    assert_eq!(r.code(), 148, "{kind}: {}", r.stderr);
    let want = format!("the {kind} thread made system call sysinfo (99)");
    assert!(r.stderr.contains(&want), "{kind}: {}", r.stderr);
}

#[test]
fn each_kind_of_thread_is_stopped_outside_its_list() {
    let dir = scratch("seccomp-kinds");
    let kernel = guest("elf");
    let kernel = kernel.to_str().unwrap();
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let drive = format!("path={}{}", disk.display(), engine_opt());
    let vsock = format!("cid=3,uds={}", dir.join("v.sock").display());
    let boot = |extra: &[&str], cmdline: &str| {
        let mut a = vec!["run", "--kernel", kernel, "--cmdline", cmdline];
        a.extend_from_slice(extra);
        a.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };
    let cases: Vec<(&str, Vec<String>)> = vec![
        ("vcpu", boot(&[], "console=ttyS0")),
        ("vmm", boot(&[], "console=ttyS0")),
        ("console", boot(&[], "console=ttyS0")),
        (
            "block",
            boot(&["--drive", &drive], "console=ttyS0 vireo.blktest"),
        ),
        ("rng", boot(&["--rng"], "console=ttyS0 vireo.rngtest")),
        (
            "balloon",
            boot(
                &["--balloon", "size_mib=1,stats_period_s=1"],
                "console=ttyS0 vireo.balloontest=2",
            ),
        ),
        (
            "vsock",
            boot(&["--vsock", &vsock], "console=ttyS0 vireo.vsocktest"),
        ),
    ];
    for (kind, args) in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_stopped(kind, &selftest(kind, &args));
    }
    // The memory hotplug device's thread (configured through a config file).
    let hotplug = dir.join("hotplug.json");
    let json = serde_json::json!({
        "boot-source": { "kernel_image_path": guest("pvh"), "boot_args": "console=ttyS0 vireo.memtest" },
        "machine-config": { "vcpu_count": 1, "mem_size_mib": 128 },
        "memory-hotplug": { "total_size_mib": 128 }
    });
    write_file(&hotplug, json.to_string().as_bytes());
    let r = selftest(
        "mem",
        &["--config-file", hotplug.to_str().unwrap(), "--no-api"],
    );
    assert_stopped("mem", &r);
    // The API thread confines itself before it serves anyone.
    let sock = dir.join("api.sock");
    let r = selftest("api", &["--api-sock", sock.to_str().unwrap()]);
    assert_stopped("api", &r);
    // The metrics writer, started by --metrics-path.
    let cfg = config(&dir, "vireo.count=0");
    let metrics = dir.join("metrics");
    let r = selftest(
        "metrics",
        &[
            "--config-file",
            cfg.to_str().unwrap(),
            "--no-api",
            "--metrics-path",
            metrics.to_str().unwrap(),
        ],
    );
    assert_stopped("metrics", &r);
    // With a log file, the report goes there too.
    let log = dir.join("log");
    let r = selftest(
        "vcpu",
        &[
            "--log-path",
            log.to_str().unwrap(),
            "--config-file",
            cfg.to_str().unwrap(),
            "--no-api",
        ],
    );
    assert_stopped("vcpu", &r);
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("made system call sysinfo (99)"), "{logged}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_network_thread_is_stopped_outside_its_list() {
    let ns = NetNs::enter("seccomp");
    ns.tap("vtap0", None);
    let kernel = guest("elf");
    let r = selftest(
        "net",
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--cmdline",
            "console=ttyS0 vireo.nettest",
            "--net",
            "tap=vtap0",
        ],
    );
    assert_stopped("net", &r);
}

#[test]
fn log_mode_lets_the_call_through_and_the_kernel_logs_it() {
    let kernel = guest("pvh");
    let r = selftest(
        "vcpu",
        &["--seccomp-log", "run", "--kernel", kernel.to_str().unwrap()],
    );
    assert_eq!(r.code(), 0, "{}", r.stderr);
    assert_eq!(r.report("end").as_deref(), Some("poweroff"));
    // The kernel's audit record of the call (printed to its log when no audit daemon takes it).
    match Command::new("dmesg").output() {
        Ok(o) if o.status.success() => {
            let log = String::from_utf8_lossy(&o.stdout);
            let hit = log.lines().any(|l| {
                l.contains("type=1326")
                    && l.contains("comm=\"vcpu0\"")
                    && l.contains(" syscall=99 ")
            });
            assert!(
                hit,
                "no audit record of sysinfo from vcpu0 in the kernel log"
            );
        }
        _ => eprintln!(
            "skipped: the kernel log is not readable here (dmesg), so only the run was checked"
        ),
    }
}

/// A filter file as Firecracker's seccompiler-bin writes it, from Firecracker's JSON format.
fn filter_file(path: &Path, json: &str) {
    let map = seccompiler::compile_from_json(json.as_bytes(), seccompiler::TargetArch::x86_64)
        .expect("a valid filter description");
    let mut out = (map.len() as u64).to_le_bytes().to_vec();
    for (name, prog) in &map {
        out.extend((name.len() as u64).to_le_bytes());
        out.extend(name.as_bytes());
        out.extend((prog.len() as u64).to_le_bytes());
        for i in prog {
            out.extend(i.code.to_le_bytes());
            out.push(i.jt);
            out.push(i.jf);
            out.extend(i.k.to_le_bytes());
        }
    }
    write_file(path, &out);
}

/// Allows everything but sysinfo, which traps.
const ALL_BUT_SYSINFO: &str = r#"{"default_action": "allow", "filter_action": "trap",
    "filter": [{"syscall": "sysinfo"}]}"#;

#[test]
fn firecracker_filter_files_are_used_and_checked() {
    let dir = scratch("seccomp-file");
    let file = dir.join("filters.bpf");
    filter_file(
        &file,
        &format!(
            r#"{{"vmm": {ALL_BUT_SYSINFO}, "api": {ALL_BUT_SYSINFO}, "vcpu": {ALL_BUT_SYSINFO}}}"#
        ),
    );
    let f = file.to_str().unwrap();
    let kernel = guest("elf");
    let kernel = kernel.to_str().unwrap();
    // The guest runs under the file's filters ...
    let r = run(&["--seccomp-filter", f, "--kernel", kernel]);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    assert_eq!(r.report("end").as_deref(), Some("poweroff"));
    // A file allows only what Firecracker makes: vireo leaves out the calls that only make it
    // faster (deleting the memory slots at exit) instead of dying on them.
    let strict = dir.join("strict.bpf");
    let no_extras = r#"{"default_action": "allow", "filter_action": "trap", "filter": [
        {"syscall": "ioctl", "args": [{"index": 1, "type": "dword", "op": "eq", "val": 1075883590}]}]}"#;
    filter_file(
        &strict,
        &format!(r#"{{"vmm": {no_extras}, "api": {ALL_BUT_SYSINFO}, "vcpu": {ALL_BUT_SYSINFO}}}"#),
    );
    let r = run(&[
        "--seccomp-filter",
        strict.to_str().unwrap(),
        "--kernel",
        kernel,
    ]);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    assert_eq!(r.report("end").as_deref(), Some("poweroff"));
    // ... which are live: vCPUs take the vcpu filter, device threads the vmm one.
    let r = selftest("vcpu", &["run", "--seccomp-filter", f, "--kernel", kernel]);
    assert_stopped("vcpu", &r);
    let rng = selftest(
        "rng",
        &[
            "run",
            "--seccomp-filter",
            f,
            "--kernel",
            kernel,
            "--rng",
            "--cmdline",
            "console=ttyS0 vireo.rngtest",
        ],
    );
    assert_stopped("rng", &rng);

    // Bad files are refused by name.
    let only_vmm = dir.join("only-vmm.bpf");
    filter_file(&only_vmm, &format!(r#"{{"vmm": {ALL_BUT_SYSINFO}}}"#));
    let truncated = dir.join("truncated.bpf");
    let bytes = std::fs::read(&file).unwrap();
    write_file(&truncated, &bytes[..bytes.len() - 4]);
    let cases: [(&Path, &str); 4] = [
        (&only_vmm, "no filter for the 'api' threads"),
        (&truncated, "more than the file holds"),
        (Path::new("/nonexistent/f.bpf"), "No such file"),
        (&dir, "not a regular file"),
    ];
    for (path, why) in cases {
        let r = run(&[
            "--seccomp-filter",
            path.to_str().unwrap(),
            "--kernel",
            kernel,
        ]);
        assert_eq!(r.code(), 1, "{}: {}", path.display(), r.stderr);
        assert!(
            r.stderr.contains("seccomp filter file") && r.stderr.contains(why),
            "{}: {}",
            path.display(),
            r.stderr
        );
    }
    let r = run(&["--no-seccomp", "--seccomp-filter", f, "--kernel", kernel]);
    assert_eq!(r.code(), 1);
    assert!(r.stderr.contains("contradict"), "{}", r.stderr);
    let _ = std::fs::remove_dir_all(dir);
}
