//! `vireo-agent` as PID 1 in new namespaces (`unshare --pid --mount --uts --net --fork`), as
//! it runs as a guest's init: its mounts, hostname, network, zombie reaping and power-off.

use agent::exec::{power_off, run, RunError};
use agent::proto::{Exec, Exited};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Init {
    child: Child,
    sock: PathBuf,
    dir: PathBuf,
}

impl Drop for Init {
    /// Kills the namespace's init (unshare's child), which unshare then reaps as it exits.
    fn drop(&mut self) {
        let pid = self.child.id();
        if let Ok(children) = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")) {
            for c in children.split_whitespace() {
                let _ = Command::new("kill").args(["-KILL", c]).status();
            }
        }
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts the agent as PID 1 with `cmdline` as its kernel command line. An `eth0` (a veth
/// interface) is made in the new network namespace first; `exec` keeps the shell's PID 1.
fn start(name: &str, cmdline: &str) -> Init {
    assert!(
        rustix::process::geteuid().is_root(),
        "these tests make namespaces and need root"
    );
    // Not under /tmp, /run or /dev, which the agent mounts over in its namespace (a checkout,
    // and so its target directory, may well be under /tmp).
    let dir = Path::new("/var/tmp").join(format!("vireo-pid1-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("agent.sock");
    let cmdline_file = dir.join("cmdline");
    std::fs::write(&cmdline_file, cmdline).unwrap();
    // `noxsave splash` stand for the words a kernel passes on to init.
    let script = format!(
        "ip link add eth0 type veth peer name veth1 && exec {} noxsave --listen unix:{} splash --cmdline-file {}",
        env!("CARGO_BIN_EXE_vireo-agent"),
        sock.display(),
        cmdline_file.display()
    );
    let child = Command::new("unshare")
        .args([
            "--pid",
            "--mount",
            "--uts",
            "--net",
            "--fork",
            "--kill-child",
            "sh",
            "-c",
            &script,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run unshare");
    let end = Instant::now() + Duration::from_secs(10);
    while UnixStream::connect(&sock).is_err() {
        assert!(Instant::now() < end, "the agent never listened as PID 1");
        std::thread::sleep(Duration::from_millis(10));
    }
    Init { child, sock, dir }
}

impl Init {
    fn sh(&self, script: &str) -> (Exited, String) {
        let exec = Exec {
            argv: vec!["sh".into(), "-c".into(), script.into()],
            env: [(
                "PATH".to_string(),
                "/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
            )]
            .into(),
            ..Default::default()
        };
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let s = UnixStream::connect(&self.sock).unwrap();
        let r = run(s, &exec, std::io::empty(), None, &mut out, &mut err).unwrap();
        (r, String::from_utf8_lossy(&out).into_owned())
    }
}

#[test]
fn as_init_it_mounts_names_and_networks_the_guest() {
    let init = start(
        "setup",
        "console=ttyS0 ip=10.7.0.2::10.7.0.1:255.255.255.0::eth0:off vireo.hostname=sandbox-1",
    );
    let (r, out) = init.sh("echo $$ $PPID; hostname");
    assert_eq!(r.code, Some(0));
    let lines: Vec<&str> = out.lines().collect();
    // The command's parent is the agent, PID 1 of the namespace.
    assert!(lines[0].ends_with(" 1"), "{out}");
    assert_eq!(lines[1], "sandbox-1");
    let (_, mounts) = init.sh("cat /proc/self/mounts");
    for (fs, at) in [
        ("proc", "/proc"),
        ("sysfs", "/sys"),
        ("devtmpfs", "/dev"),
        ("devpts", "/dev/pts"),
        ("tmpfs", "/dev/shm"),
        ("tmpfs", "/tmp"),
        ("tmpfs", "/run"),
    ] {
        assert!(
            mounts
                .lines()
                .any(|l| l.starts_with(&format!("{fs} {at} {fs} "))),
            "{fs} on {at} missing:\n{mounts}"
        );
    }
    // lo is up (IFF_UP | IFF_LOOPBACK); eth0 has the ip= address and the default route.
    let (_, lo) = init.sh("cat /sys/class/net/lo/flags");
    assert_eq!(lo.trim(), "0x9");
    let (_, addr) = init.sh("ip -o -4 addr show dev eth0; ip -4 route show default");
    assert!(addr.contains("inet 10.7.0.2/24"), "{addr}");
    assert!(addr.contains("default via 10.7.0.1 dev eth0"), "{addr}");
    let (_, flags) = init.sh("cat /sys/class/net/eth0/flags");
    let flags = u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).unwrap();
    assert_eq!(flags & 1, 1, "eth0 is not up");
}

#[test]
fn as_init_it_reaps_orphans() {
    let init = start("reap", "quiet");
    // Each subshell leaves a `sleep` behind, which PID 1 inherits and must reap.
    let (r, _) = init.sh("for i in 1 2 3 4 5; do (sleep 0.1 &); done; exit 0");
    assert_eq!(r.code, Some(0));
    std::thread::sleep(Duration::from_millis(800));
    let (_, states) = init.sh("cat /proc/[0-9]*/stat");
    let zombies: Vec<&str> = states.lines().filter(|l| l.contains(") Z ")).collect();
    assert!(zombies.is_empty(), "zombies left: {zombies:?}");
    // Session commands still get their own status while the reaper runs.
    let (r, _) = init.sh("exit 9");
    assert_eq!(r.code, Some(9));
}

#[test]
fn power_off_is_only_for_init_and_ends_it() {
    let mut init = start("poweroff", "quiet");
    power_off(UnixStream::connect(&init.sock).unwrap()).unwrap();
    // In a PID namespace, power-off ends the namespace's init.
    let end = Instant::now() + Duration::from_secs(10);
    while init.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < end, "power-off did not end the init");
        std::thread::sleep(Duration::from_millis(20));
    }
    // An agent that is not init refuses.
    let (host, agent) = UnixStream::pair().unwrap();
    std::thread::spawn(move || {
        let _ = agent::exec::serve(agent, &agent::exec::Agent::plain("test"));
    });
    match power_off(host) {
        Err(RunError::Agent(m)) => assert!(m.contains("not the guest's init"), "{m}"),
        other => panic!("{other:?}"),
    }
}
