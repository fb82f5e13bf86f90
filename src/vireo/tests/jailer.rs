//! vireo-jailer: Firecracker's jailer flags and layout; what the jailed vireo can see, hold
//! and do; cgroup limits enforced by the kernel.

mod common;
use common::*;
use std::io::BufRead;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const NOBODY: u32 = 65534;

/// A static vireo (a jail holds no shared libraries): `VIREO_JAIL_BIN`, or the musl release
/// build, made once if missing.
fn static_vireo() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("VIREO_JAIL_BIN") {
            return PathBuf::from(p);
        }
        let root = workspace_root();
        let bin = root.join("target/x86_64-unknown-linux-musl/release/vireo");
        if !bin.exists() {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let ok = Command::new(cargo)
                .current_dir(&root)
                .args([
                    "build",
                    "--release",
                    "-p",
                    "vireo",
                    "--target",
                    "x86_64-unknown-linux-musl",
                ])
                .status()
                .expect("run cargo")
                .success();
            assert!(ok, "building the static vireo failed");
        }
        bin
    })
    .clone()
}

fn jailer() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vireo-jailer"));
    c.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// The flags every jail here shares: `id`, the static vireo, user and group nobody, `base`.
fn jail_args(id: &str, base: &Path) -> Vec<String> {
    let vireo = static_vireo();
    [
        "--id",
        id,
        "--exec-file",
        vireo.to_str().unwrap(),
        "--uid",
        "65534",
        "--gid",
        "65534",
        "--chroot-base-dir",
        base.to_str().unwrap(),
    ]
    .map(str::to_owned)
    .to_vec()
}

/// A unique jail ID for this test process.
fn jail_id(tag: &str) -> String {
    format!("{tag}-{}", std::process::id())
}

/// A jailed VMM, killed when the test ends however it ends.
struct Jailed(Child);

impl Drop for Jailed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl std::ops::Deref for Jailed {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Jailed {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

/// Starts the jailer and returns it with a channel of its (the VMM's) stdout lines.
fn start(args: &[&str]) -> (Jailed, mpsc::Receiver<String>) {
    let mut child = Jailed(jailer().args(args).spawn().expect("start vireo-jailer"));
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

fn wait_for(rx: &mpsc::Receiver<String>, prefix: &str) -> Vec<String> {
    let mut seen = Vec::new();
    let end = Instant::now() + Duration::from_secs(60);
    while !seen.iter().any(|l: &String| l.starts_with(prefix)) {
        match rx.recv_timeout(end.saturating_duration_since(Instant::now())) {
            Ok(l) => seen.push(l),
            Err(_) => panic!("no line starting {prefix:?}; saw {seen:#?}"),
        }
    }
    seen
}

fn status_field(pid: u32, key: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Puts the test guest in the jail (owned by the jailed user) and boots it through the API.
fn boot_in_jail(root: &Path, sock: &Path, mem_mib: u32, args: &str) {
    let kernel = root.join("kernel");
    std::fs::copy(guest("elf"), &kernel).unwrap();
    std::os::unix::fs::chown(&kernel, Some(NOBODY), Some(NOBODY)).unwrap();
    let boot = format!(r#"{{"kernel_image_path":"/kernel","boot_args":"console=ttyS0 {args}"}}"#);
    assert_eq!(http(sock, "PUT", "/boot-source", &boot).0, 204);
    let mc = format!(r#"{{"vcpu_count":1,"mem_size_mib":{mem_mib}}}"#);
    assert_eq!(http(sock, "PUT", "/machine-config", &mc).0, 204);
    let (code, body) = http(
        sock,
        "PUT",
        "/actions",
        r#"{"action_type":"InstanceStart"}"#,
    );
    assert_eq!(code, 204, "{body}");
}

#[test]
fn a_jailed_vireo_sees_holds_and_may_only_what_it_needs() {
    let base = scratch("jail-base");
    let id = jail_id("confined");
    let vireo = static_vireo();
    // A descriptor left open (no close-on-exec) by whoever starts the jailer.
    let secret = base.join("secret");
    write_file(&secret, b"not for the guest");
    let file = std::fs::File::open(&secret).unwrap();
    // SAFETY: dup(2) of a descriptor we own; the copy has no close-on-exec flag.
    let leaked = unsafe { libc::dup(file.as_raw_fd()) };
    assert!(leaked > 2);
    let uid = NOBODY.to_string();
    let netns = format!("vireo-jail-{}", std::process::id());
    assert!(Command::new("ip")
        .args(["netns", "add", &netns])
        .status()
        .unwrap()
        .success());
    /// Deletes the namespace however the test ends.
    struct DelNs<'a>(&'a str);
    impl Drop for DelNs<'_> {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", self.0]).status();
        }
    }
    let _del = DelNs(&netns);
    let netns_path = format!("/run/netns/{netns}");
    let (mut child, rx) = start(&[
        "--id",
        &id,
        "--exec-file",
        vireo.to_str().unwrap(),
        "--uid",
        &uid,
        "--gid",
        &uid,
        "--chroot-base-dir",
        base.to_str().unwrap(),
        "--netns",
        &netns_path,
        "--resource-limit",
        "no-file=1000",
        "--resource-limit",
        "fsize=1048576",
        "--",
        "--api-sock",
        "/api.sock",
    ]);
    // SAFETY: closes our own copy; the jailer has its own.
    unsafe { libc::close(leaked) };
    let root = base.join("vireo").join(&id).join("root");
    let sock = root.join("api.sock");
    wait_for_socket(&sock);
    let pid = child.id();

    // Who it is: the given user and group, no capabilities, no way to gain any.
    assert_eq!(status_field(pid, "Uid:"), "65534 65534 65534 65534");
    assert_eq!(status_field(pid, "Gid:"), "65534 65534 65534 65534");
    assert_eq!(status_field(pid, "Groups:"), "");
    assert_eq!(status_field(pid, "CapEff:"), "0000000000000000");
    assert_eq!(status_field(pid, "CapPrm:"), "0000000000000000");
    assert_eq!(status_field(pid, "NoNewPrivs:"), "1");
    // Where it lives: the given network namespace, under the given limits.
    use std::os::unix::fs::MetadataExt;
    let ns = |p: &str| std::fs::metadata(p).unwrap().ino();
    assert_eq!(ns(&format!("/proc/{pid}/ns/net")), ns(&netns_path));
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let limit = |name: &str| {
        limits
            .lines()
            .find(|l| l.starts_with(name))
            .map(|l| l.split_whitespace().rev().nth(1).unwrap().to_owned())
            .unwrap()
    };
    assert_eq!(limit("Max open files"), "1000", "{limits}");
    assert_eq!(limit("Max file size"), "1048576", "{limits}");
    // What it sees: its root is the jail, which holds only its binary, devices and socket.
    let seen_root = std::fs::metadata(format!("/proc/{pid}/root/")).unwrap();
    let jail = std::fs::metadata(&root).unwrap();
    assert_eq!((seen_root.dev(), seen_root.ino()), (jail.dev(), jail.ino()));
    let mut entries: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/root/"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    entries.sort();
    assert_eq!(entries, ["api.sock", "dev", "vireo"]);
    for dev in ["kvm", "net/tun", "urandom"] {
        let meta = std::fs::metadata(root.join("dev").join(dev)).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (NOBODY, NOBODY), "/dev/{dev}");
    }
    // What it holds: nothing it was handed but standard I/O.
    let fds: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .map(|e| {
            std::fs::read_link(e.unwrap().path())
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    assert!(
        !fds.iter().any(|t| t.contains("secret")),
        "the inherited descriptor reached the VMM: {fds:?}"
    );
    for t in &fds {
        assert!(
            t.starts_with("socket:")
                || t.starts_with("pipe:")
                || t.starts_with("anon_inode:")
                || t == "/dev/null",
            "unexpected descriptor {t} in {fds:?}"
        );
    }
    // The API works through the jail's path from outside, and knows its ID.
    let (code, body) = http(&sock, "GET", "/", "");
    assert_eq!(code, 200);
    assert!(body.contains(&format!("\"id\":\"{id}\"")), "{body}");

    // A guest runs in the jail; every thread of the VMM is then under seccomp too.
    boot_in_jail(&root, &sock, 32, "vireo.count=0");
    wait_for(&rx, "@tick ");
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let status = std::fs::read_to_string(t.unwrap().path().join("status")).unwrap();
        assert!(status.contains("\nSeccomp:\t2\n"), "{status}");
        assert!(status.contains("\nCapEff:\t0000000000000000\n"), "{status}");
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(base);
}

#[test]
fn new_pid_namespace_and_daemon() {
    let base = scratch("jail-pidns");
    let id = jail_id("pidns");
    let out = jailer()
        .args(jail_args(&id, &base))
        .args([
            "--new-pid-ns",
            "--daemonize",
            "--",
            "--api-sock",
            "/api.sock",
        ])
        .output()
        .unwrap();
    // The jailer returns once the VMM is started in its namespace, leaving its PID.
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let root = base.join("vireo").join(&id).join("root");
    wait_for_socket(&root.join("api.sock"));
    let pid: u32 = std::fs::read_to_string(root.join("vireo.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let nspid = status_field(pid, "NSpid:");
    assert!(
        nspid.ends_with(" 1"),
        "not PID 1 of a new namespace: {nspid}"
    );
    // Daemonized: a session of its own, standard I/O on /dev/null.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = stat.rsplit_once(") ").unwrap().1;
    let session: u32 = after.split_whitespace().nth(3).unwrap().parse().unwrap();
    assert_eq!(session, pid, "{stat}");
    for fd in 0..3 {
        assert_eq!(
            std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).unwrap(),
            Path::new("/dev/null")
        );
    }
    assert_eq!(http(&root.join("api.sock"), "GET", "/", "").0, 200);
    // SAFETY: kill(2) on the VMM this test started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let _ = std::fs::remove_dir_all(base);
}

#[test]
fn bad_jails_are_refused_by_name() {
    let base = scratch("jail-bad");
    let vireo = static_vireo();
    let v = vireo.to_str().unwrap();
    let b = base.to_str().unwrap();
    let dynamic = vireo_bin_dynamic();
    let long = "a".repeat(65);
    std::fs::create_dir_all(base.join("vireo/taken/root")).unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--id", "a/b", "--exec-file", v], "'/' is not allowed"),
        (vec!["--id", &long, "--exec-file", v], "1 to 64 characters"),
        (
            vec!["--id", "x1", "--exec-file", "/nonexistent/vireo"],
            "/nonexistent/vireo",
        ),
        (vec!["--id", "x2", "--exec-file", b], "not a regular file"),
        (vec!["--id", "taken", "--exec-file", v], "already exists"),
        (
            vec!["--id", "x3", "--exec-file", v, "--resource-limit", "cpu=1"],
            "resource limit 'cpu=1'",
        ),
        (
            vec!["--id", "x4", "--exec-file", v, "--cgroup", "nonsense"],
            "cgroup setting 'nonsense'",
        ),
        (
            vec!["--id", "x5", "--exec-file", dynamic.to_str().unwrap()],
            "dynamically linked",
        ),
    ];
    for (args, why) in cases {
        let out = jailer()
            .args(&args)
            .args(["--uid", "65534", "--gid", "65534", "--chroot-base-dir", b])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.starts_with("vireo-jailer: error:") && err.contains(why),
            "{args:?}: {err}"
        );
    }
    let _ = std::fs::remove_dir_all(base);
}

/// The glibc build of vireo (dynamically linked).
fn vireo_bin_dynamic() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_vireo"))
}

/// A VM that touches 40 MiB of its 64 in a jail whose memory cgroup holds `limit` bytes.
fn touching_vm(
    base: &Path,
    id: &str,
    version: &str,
    limit: &str,
    parent: &str,
) -> (Jailed, mpsc::Receiver<String>) {
    let mut args = jail_args(id, base);
    args.extend(
        [
            "--cgroup-version",
            version,
            "--cgroup",
            limit,
            "--parent-cgroup",
            parent,
            "--",
            "--api-sock",
            "/api.sock",
        ]
        .map(str::to_owned),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (child, rx) = start(&args);
    let root = base.join("vireo").join(id).join("root");
    wait_for_socket(&root.join("api.sock"));
    boot_in_jail(&root, &root.join("api.sock"), 64, "vireo.touch=40");
    (child, rx)
}

fn memory_limit_is_enforced(
    version: &str,
    mount: &Path,
    limit_file: &str,
    failures: &dyn Fn(&Path) -> u64,
) {
    let base = scratch(&format!("jail-cgroup-v{version}"));
    let parent = format!("vireo-test-{}", std::process::id());
    let small = jail_id(&format!("small{version}"));
    let roomy = jail_id(&format!("roomy{version}"));
    let (mut a, _) = touching_vm(
        &base,
        &small,
        version,
        &format!("{limit_file}={}", 24 << 20),
        &parent,
    );
    let (mut b, lines) = touching_vm(
        &base,
        &roomy,
        version,
        &format!("{limit_file}={}", 512 << 20),
        &parent,
    );
    let sa = wait_exit(&mut a);
    let sb = wait_exit(&mut b);
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(sa.signal(), Some(libc::SIGKILL), "the limited VM: {sa:?}");
    assert!(failures(&mount.join(&parent).join(&small)) > 0);
    assert_eq!(sb.code(), Some(0), "the neighbour: {sb:?}");
    std::thread::sleep(Duration::from_millis(100));
    let out: Vec<String> = lines.try_iter().collect();
    assert!(out.iter().any(|l| l == "@touched mib=40"), "{out:#?}");
    for id in [&small, &roomy] {
        let _ = std::fs::remove_dir(mount.join(&parent).join(id));
    }
    let _ = std::fs::remove_dir(mount.join(&parent));
    let _ = std::fs::remove_dir_all(base);
}

#[test]
fn a_memory_cgroup_v1_limit_kills_only_its_vm() {
    let mount = Path::new("/sys/fs/cgroup/memory");
    if !mount.join("memory.limit_in_bytes").exists() {
        eprintln!(
            "skipped: no cgroup v1 memory controller at {}",
            mount.display()
        );
        return;
    }
    memory_limit_is_enforced("1", mount, "memory.limit_in_bytes", &|dir| {
        std::fs::read_to_string(dir.join("memory.failcnt"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    });
}

#[test]
#[cfg_attr(
    not(vireo_cgroup2_memory),
    ignore = "skipped: this host's cgroup v2 hierarchy has no memory controller"
)]
fn a_memory_cgroup_v2_limit_kills_only_its_vm() {
    let mount = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .iter()
        .map(Path::new)
        .find(|m| m.join("cgroup.controllers").exists())
        .expect("a cgroup v2 hierarchy");
    memory_limit_is_enforced("2", mount, "memory.max", &|dir| {
        let events = std::fs::read_to_string(dir.join("memory.events")).unwrap();
        events
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    });
}
