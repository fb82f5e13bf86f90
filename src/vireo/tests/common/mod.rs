//! Shared helpers for vireo's end-to-end tests: building the test guest, running the vireo
//! binary with a deadline, and reading the guest's `@` report lines.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, OnceLock};
use std::time::{Duration, Instant};

/// The image kinds the test guest is built as.
pub const KINDS: [&str; 3] = ["elf", "pvh", "bzimage"];

/// How long any single VM may run in a test before it counts as hung.
pub const DEADLINE: Duration = Duration::from_secs(60);

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// Builds the test guest (once per test binary) and returns the path of image `kind`.
pub fn guest(kind: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let guest_dir = workspace_root().join("guest");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        // The guest has its own target and flags (guest/.cargo/config.toml, read from its
        // directory); nothing from the outer build may leak into it.
        let out = Command::new(cargo)
            .current_dir(&guest_dir)
            .args(["build", "--release", "--quiet"])
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .env_remove("CARGO_BUILD_TARGET")
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("CARGO_BUILD_RUSTFLAGS")
            .env_remove("RUSTC_WORKSPACE_WRAPPER")
            .output()
            .expect("run cargo to build the test guest");
        assert!(
            out.status.success(),
            "building the test guest failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        guest_dir.join("target/x86_64-unknown-none/release")
    });
    dir.join(format!("vireo-guest-{kind}"))
}

/// A scratch directory unique to one test.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vireo-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// What a finished vireo run left behind.
#[derive(Debug)]
pub struct Run {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl From<std::process::Output> for Run {
    fn from(out: std::process::Output) -> Self {
        Run {
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

impl Run {
    pub fn code(&self) -> i32 {
        self.status.code().unwrap_or(-1)
    }

    /// Report lines (`@key ...`) with the `@` and line endings removed.
    pub fn reports(&self) -> Vec<String> {
        self.stdout
            .lines()
            .filter_map(|l| l.trim_end_matches('\r').strip_prefix('@'))
            .map(str::to_owned)
            .collect()
    }

    /// The first report line for `key`, without the key.
    pub fn report(&self, key: &str) -> Option<String> {
        self.reports().into_iter().find_map(|l| {
            let (k, rest) = l.split_once(' ').unwrap_or((l.as_str(), ""));
            (k == key).then(|| rest.to_owned())
        })
    }

    /// All report lines for `key`.
    pub fn all(&self, key: &str) -> Vec<String> {
        self.reports()
            .into_iter()
            .filter_map(|l| l.strip_prefix(&format!("{key} ")).map(str::to_owned))
            .collect()
    }
}

/// `field=value` from a report line.
pub fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    line.split(' ')
        .find_map(|t| t.strip_prefix(name).and_then(|r| r.strip_prefix('=')))
}

/// The vireo binary under test: `VIREO_BIN` when set (to run the suite against another build,
/// such as the static musl one), otherwise the one cargo built for these tests.
/// The block engine the drive tests use: `VIREO_TEST_IO_ENGINE=Async` runs them on the
/// io_uring engine (CI runs them under each engine).
pub fn io_engine() -> &'static str {
    match std::env::var("VIREO_TEST_IO_ENGINE").as_deref() {
        Ok("Async") | Ok("async") => "Async",
        Ok("Sync") | Ok("sync") | Err(_) => "Sync",
        Ok(other) => panic!("VIREO_TEST_IO_ENGINE={other}: expected Sync or Async"),
    }
}

/// `--drive` options choosing [`io_engine`].
pub fn engine_opt() -> String {
    format!(",io_engine={}", io_engine())
}

/// A `PUT /drives` body's field choosing [`io_engine`], to put after another field.
pub fn engine_field() -> String {
    format!(r#","io_engine":"{}""#, io_engine())
}

pub fn vireo_bin() -> PathBuf {
    std::env::var_os("VIREO_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_vireo")))
}

pub fn vireo() -> Command {
    let mut c = Command::new(vireo_bin());
    c.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// Waits up to 10 s for a vireo's API socket at `path` to accept connections.
pub fn wait_for_socket(path: &Path) {
    let end = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(path).is_err() {
        assert!(Instant::now() < end, "API socket never came up");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits for `child` with the test deadline, collecting its output.
pub fn finish(mut child: Child) -> Run {
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let o = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        s
    });
    let e = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > DEADLINE {
            let _ = child.kill();
            panic!("vireo did not finish within {DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Run {
        status,
        stdout: String::from_utf8_lossy(&o.join().unwrap()).into_owned(),
        stderr: String::from_utf8_lossy(&e.join().unwrap()).into_owned(),
    }
}

/// Runs `vireo run` with `args` to completion.
pub fn run(args: &[&str]) -> Run {
    let mut c = vireo();
    c.arg("run").args(args);
    finish(c.spawn().expect("start vireo"))
}

/// Runs `vireo` (no implied subcommand) with `args` to completion.
pub fn run_raw(args: &[&str]) -> Run {
    let mut c = vireo();
    c.args(args);
    finish(c.spawn().expect("start vireo"))
}

/// Starts vireo with piped stdin and returns it with a channel of its stdout lines.
pub fn spawn_interactive(args: &[&str]) -> (Child, mpsc::Receiver<String>) {
    let mut c = vireo();
    c.arg("run").args(args).stdin(Stdio::piped());
    let mut child = c.spawn().expect("start vireo");
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line.trim_end_matches('\r').to_owned()).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

/// Waits for a line starting with `want`; returns it and the lines seen before it, or panics
/// at the deadline.
pub fn until_prefix(rx: &mpsc::Receiver<String>, want: &str) -> (String, Vec<String>) {
    let end = Instant::now() + DEADLINE;
    let mut seen = Vec::new();
    loop {
        match rx.recv_timeout(end.saturating_duration_since(Instant::now())) {
            Ok(l) if l.starts_with(want) => return (l, seen),
            Ok(l) => seen.push(l),
            Err(_) => panic!("no line {want:?} from the guest; saw {seen:#?}"),
        }
    }
}

/// Waits for a line equal to `want` (collecting the lines seen), or panics at the deadline.
pub fn wait_line(rx: &mpsc::Receiver<String>, want: &str, seen: &mut Vec<String>) {
    let end = Instant::now() + DEADLINE;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => {
                let hit = l == want;
                seen.push(l);
                if hit {
                    return;
                }
            }
            Err(_) => panic!("no line {want:?} from the guest; saw {seen:#?}"),
        }
    }
}

/// Waits for `child` to exit within the deadline.
pub fn wait_exit(child: &mut Child) -> ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if start.elapsed() > DEADLINE {
            let _ = child.kill();
            panic!("vireo did not exit within {DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// FNV-1a, as the test guest computes it over the initrd.
pub fn fnv1a(data: &[u8]) -> u32 {
    data.iter().fold(0x811c_9dc5u32, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// Deterministic pseudo-random bytes.
pub fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).max(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

pub fn write_file(path: &Path, data: &[u8]) {
    std::fs::File::create(path)
        .and_then(|mut f| f.write_all(data))
        .unwrap();
}

/// A private network namespace for one test: the calling thread enters it (network
/// namespaces are per thread), so the sockets it opens and the processes it starts (vireo
/// included) live there; dropping it returns the thread to where it was and deletes the
/// namespace. Nothing touches the machine's own interfaces.
pub struct NetNs {
    name: String,
    home: std::fs::File,
}

impl NetNs {
    pub fn enter(tag: &str) -> NetNs {
        use std::os::fd::AsRawFd;
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let name = format!(
            "vireo-{}-{}-{tag}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        );
        let home = std::fs::File::open("/proc/thread-self/ns/net").expect("this thread's netns");
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("run ip (iproute2)")
            .success();
        assert!(ok, "ip netns add {name}");
        let ns = std::fs::File::open(format!("/run/netns/{name}")).expect("open the new netns");
        // SAFETY: setns(2) on a namespace descriptor we hold; it changes only this thread.
        assert_eq!(
            unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) },
            0
        );
        let ns = NetNs { name, home };
        // No IPv6 chatter (router solicitations, MLD) in the tests' captures and counters.
        ns.sh("ip link set lo up && sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1");
        ns
    }

    /// Runs a shell command in the namespace, which must succeed.
    pub fn sh(&self, cmd: &str) {
        let out = Command::new("sh").args(["-c", cmd]).output().unwrap();
        assert!(
            out.status.success(),
            "{cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A TAP `name` with `addr` (CIDR) if given, up, with a long queue so bursts wait in it.
    pub fn tap(&self, name: &str, addr: Option<&str>) {
        self.sh(&format!(
            "ip tuntap add {name} mode tap && ip link set {name} txqueuelen 10000 up"
        ));
        if let Some(a) = addr {
            self.sh(&format!("ip addr add {a} dev {name}"));
        }
    }

    /// The interface's counters (`ip -s -j link`), e.g. `("rx", "dropped")`.
    pub fn link_stat(&self, dev: &str, dir: &str, what: &str) -> u64 {
        let out = Command::new("ip")
            .args(["-s", "-j", "link", "show", dev])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v[0]["stats64"][dir][what].as_u64().unwrap()
    }

    /// The MAC address of `dev`.
    pub fn mac(&self, dev: &str) -> String {
        let out = Command::new("ip")
            .args(["-j", "link", "show", dev])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v[0]["address"].as_str().unwrap().to_owned()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        // SAFETY: back to the namespace this thread came from, by its descriptor.
        unsafe { libc::setns(self.home.as_raw_fd(), libc::CLONE_NEWNET) };
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// One HTTP request on a fresh connection; returns (status, body).
pub fn http(sock: &Path, method: &str, path: &str, body: &str) -> (u16, String) {
    api::client::request(sock, method, path, body).expect("an answer from the API socket")
}

/// Whether KVM's PIT worker thread for the VMM process `pid` exists (KVM names it
/// `kvm-pit/<pid>`; it exists exactly while the VM has an in-kernel PIT).
pub fn has_pit_thread(pid: u32) -> bool {
    let want = format!("kvm-pit/{pid}");
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .any(|e| std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == want))
}

/// A vireo serving its API on a socket in a scratch directory, its stdout read line by line.
pub struct Vireo {
    pub child: Child,
    pub sock: PathBuf,
    pub lines: std::sync::mpsc::Receiver<String>,
    pub dir: PathBuf,
}

impl Vireo {
    /// Starts vireo with an API socket in a new scratch directory `name`.
    pub fn start(name: &str) -> Self {
        let dir = scratch(name);
        let sock = dir.join("api.sock");
        let mut child = vireo()
            .arg("--api-sock")
            .arg(&sock)
            .args(["--id", "test-vm"])
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
        wait_for_socket(&sock);
        Vireo {
            child,
            sock,
            lines,
            dir,
        }
    }

    /// One request.
    pub fn req(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        http(&self.sock, method, path, body)
    }

    /// Waits for a stdout line containing `want`; returns the lines seen.
    /// `PUT /actions` InstanceStart, which must succeed.
    pub fn start_instance(&self) {
        let (code, body) = self.req("PUT", "/actions", r#"{"action_type":"InstanceStart"}"#);
        assert_eq!(code, 204, "InstanceStart: {body}");
    }

    pub fn wait_line(&self, want: &str) -> Vec<String> {
        let mut seen = Vec::new();
        wait_line(&self.lines, want, &mut seen);
        seen
    }

    /// Waits for a stdout line starting with `want` and returns it.
    pub fn wait_prefix(&self, want: &str) -> String {
        until_prefix(&self.lines, want).0
    }

    /// Sends `sig` and waits for the exit code.
    pub fn stop(mut self, sig: i32) -> Option<i32> {
        // SAFETY: kill(2) on the pid of a child this test started and has not reaped.
        unsafe { libc::kill(self.child.id() as i32, sig) };
        let code = wait_exit(&mut self.child).code();
        assert!(!self.sock.exists(), "vireo removes its socket on exit");
        let _ = std::fs::remove_dir_all(&self.dir);
        code
    }
}

impl Drop for Vireo {
    /// A test that fails part way must not leave its VMM running.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Builds `vireo-agent` (once per test binary) for `target` (None: the host's, a debug build;
/// Some: a release build for that target) and returns its path.
pub fn agent_bin(target: Option<&str>) -> PathBuf {
    static BUILT: std::sync::Mutex<Vec<(Option<String>, PathBuf)>> =
        std::sync::Mutex::new(Vec::new());
    let mut built = BUILT.lock().unwrap();
    if let Some((_, p)) = built.iter().find(|(t, _)| t.as_deref() == target) {
        return p.clone();
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut c = Command::new(cargo);
    c.current_dir(workspace_root()).args([
        "build",
        "--quiet",
        "-p",
        "agent",
        "--bin",
        "vireo-agent",
    ]);
    let dir = match target {
        Some(t) => {
            c.args(["--release", "--target", t]);
            workspace_root().join("target").join(t).join("release")
        }
        None => workspace_root().join("target/debug"),
    };
    let out = c.output().expect("run cargo to build vireo-agent");
    assert!(
        out.status.success(),
        "building vireo-agent failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = dir.join("vireo-agent");
    built.push((target.map(str::to_string), path.clone()));
    path
}
