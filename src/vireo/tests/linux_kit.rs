//! The Linux kit end to end: the recipe's kernel (scripts/build-kernel.sh) booting a root file
//! system made from a directory, with vireo-agent as init: `vireo run --rootfs`, `vireo exec`,
//! `vireo cp`, the network from `ip=`, and a snapshot restored with the agent still serving.
//!
//! Linux needs hardware virtualisation: where /proc/cpuinfo shows neither vmx nor svm these
//! tests are reported as ignored with that reason. Where it does, they need the recipe's kernel
//! (`VIREO_KIT_KERNEL`, default where the script puts it; `.ci/run` builds it on such hosts)
//! and a static busybox (`VIREO_BUSYBOX`, default /bin/busybox); a missing one fails the test.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn kit_kernel() -> PathBuf {
    let p = std::env::var_os("VIREO_KIT_KERNEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let base = std::env::var_os("XDG_DATA_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var("HOME").unwrap()).join(".local/share")
                });
            base.join("vireo/vmlinux")
        });
    assert!(
        p.is_file(),
        "no kit kernel at {}: run scripts/build-kernel.sh or set VIREO_KIT_KERNEL",
        p.display()
    );
    p
}

/// A root directory holding a static busybox and the applets the tests call.
fn busybox_root(dir: &Path) -> PathBuf {
    let root = dir.join("root");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    let bb =
        PathBuf::from(std::env::var("VIREO_BUSYBOX").unwrap_or_else(|_| "/bin/busybox".into()));
    assert!(
        bb.is_file(),
        "no static busybox at {}: set VIREO_BUSYBOX",
        bb.display()
    );
    std::fs::copy(&bb, root.join("bin/busybox")).unwrap();
    for applet in [
        "sh",
        "uname",
        "cat",
        "echo",
        "ping",
        "sha256sum",
        "hostname",
        "sleep",
        "sync",
    ] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    root
}

fn agent_env(c: &mut Command, dir: &Path) {
    c.env("VIREO_AGENT", agent_bin(Some("x86_64-unknown-linux-musl")))
        .env("XDG_CACHE_HOME", dir.join("cache"));
}

#[test]
#[cfg_attr(
    not(vireo_hw_virt),
    ignore = "skipped: no vmx or svm in /proc/cpuinfo, so a Linux kernel cannot boot on this host"
)]
fn linux_kit_runs_a_command_on_a_directory_in_one_step() {
    let dir = scratch("kit-run");
    let root = busybox_root(&dir);
    let run = |argv: &[&str]| {
        let mut c = vireo();
        agent_env(&mut c, &dir);
        c.args(["run", "--rootfs"])
            .arg(&root)
            .arg("--kernel")
            .arg(kit_kernel())
            .arg("--")
            .args(argv)
            .stdin(Stdio::null());
        finish(c.spawn().unwrap())
    };
    let r = run(&["uname", "-a"]);
    assert_eq!(r.code(), 0, "{r:?}");
    assert!(r.stdout.starts_with("Linux vireo "), "{}", r.stdout);
    // The exit status is the command's; its output streams are kept apart.
    let r = run(&["sh", "-c", "echo out; echo err >&2; exit 3"]);
    assert_eq!((r.code(), r.stdout.as_str()), (3, "out\n"), "{r:?}");
    assert!(r.stderr.contains("err\n"), "{}", r.stderr);
}

/// A running vireo, killed when dropped (a failed test leaves no VM behind).
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A Linux VM booted on `image` with the agent as init and a vsock device at `uds`.
fn boot(image: &Path, uds: &Path, extra: &[&str], cmdline_extra: &str) -> Running {
    let child = vireo()
        .arg("run")
        .arg("--kernel")
        .arg(kit_kernel())
        .arg("--drive")
        .arg(format!("path={},root=on", image.display()))
        .arg("--cmdline")
        .arg(format!(
            "console=ttyS0 reboot=k panic=1 pci=off rw init=/usr/sbin/vireo-agent {cmdline_extra}"
        ))
        .arg("--vsock")
        .arg(format!("cid=3,uds={}", uds.display()))
        .args(["--serial", "none", "--memory", "256"])
        .args(extra)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    Running(child)
}

/// `vireo exec --vsock uds -- argv`, retried until the agent answers (it starts with the VM).
fn exec(uds: &Path, argv: &[&str]) -> Run {
    let end = Instant::now() + DEADLINE;
    loop {
        let r = finish(
            vireo()
                .arg("exec")
                .arg("--vsock")
                .arg(uds)
                .arg("--")
                .args(argv)
                .stdin(Stdio::null())
                .spawn()
                .unwrap(),
        );
        if r.code() != 125 || Instant::now() > end {
            return r;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn image_of(dir: &Path) -> PathBuf {
    let root = busybox_root(dir);
    let image = dir.join("rootfs.ext4");
    let mut c = vireo();
    agent_env(&mut c, dir);
    let r = finish(
        c.args(["rootfs", "build"])
            .arg(&root)
            .arg("-o")
            .arg(&image)
            .spawn()
            .unwrap(),
    );
    assert_eq!(r.code(), 0, "{r:?}");
    image
}

#[test]
#[cfg_attr(
    not(vireo_hw_virt),
    ignore = "skipped: no vmx or svm in /proc/cpuinfo, so a Linux kernel cannot boot on this host"
)]
fn linux_kit_exec_and_cp_reach_a_running_guest() {
    let dir = scratch("kit-exec");
    let image = image_of(&dir);
    let uds = dir.join("vsock.sock");
    let _vm = boot(&image, &uds, &[], "vireo.hostname=kit-guest");
    let r = exec(&uds, &["hostname"]);
    assert_eq!((r.code(), r.stdout.as_str()), (0, "kit-guest\n"), "{r:?}");
    let r = exec(&uds, &["cat", "/proc/1/cmdline"]);
    assert!(r.stdout.starts_with("/usr/sbin/vireo-agent"), "{r:?}");
    let payload = dir.join("payload");
    let data: Vec<u8> = (0..500_000u32).map(|i| (i % 241) as u8).collect();
    std::fs::write(&payload, &data).unwrap();
    let cp = |a: &str, b: &str| {
        finish(
            vireo()
                .arg("cp")
                .arg("--vsock")
                .arg(&uds)
                .args([a, b])
                .spawn()
                .unwrap(),
        )
    };
    assert_eq!(cp(payload.to_str().unwrap(), "vm:/tmp/payload").code(), 0);
    let back = dir.join("back");
    assert_eq!(cp("vm:/tmp/payload", back.to_str().unwrap()).code(), 0);
    assert!(
        std::fs::read(&back).unwrap() == data,
        "the copy came back different"
    );
}

#[test]
#[cfg_attr(
    not(vireo_hw_virt),
    ignore = "skipped: no vmx or svm in /proc/cpuinfo, so a Linux kernel cannot boot on this host"
)]
fn linux_kit_guest_reaches_a_tap_with_its_ip_parameter() {
    let ns = NetNs::enter("kit-net");
    ns.tap("tap0", Some("10.9.0.1/24"));
    let dir = scratch("kit-net");
    let image = image_of(&dir);
    let uds = dir.join("vsock.sock");
    let _vm = boot(
        &image,
        &uds,
        &["--net", "tap=tap0"],
        "ip=10.9.0.2::10.9.0.1:255.255.255.0::eth0:off",
    );
    let r = exec(&uds, &["ping", "-c", "2", "-W", "5", "10.9.0.1"]);
    assert_eq!(r.code(), 0, "{r:?}");
}

#[test]
#[cfg_attr(
    not(vireo_hw_virt),
    ignore = "skipped: no vmx or svm in /proc/cpuinfo, so a Linux kernel cannot boot on this host"
)]
fn linux_kit_agent_serves_after_a_snapshot_is_restored() {
    let dir = scratch("kit-snap");
    let image = image_of(&dir);
    let v = Vireo::start("kit-snap-api");
    let uds = dir.join("vsock.sock");
    let body = |s: &str| s.to_string();
    for (path, b) in [
        (
            "/boot-source",
            body(&format!(
                r#"{{"kernel_image_path":"{}","boot_args":"console=ttyS0 reboot=k panic=1 pci=off rw init=/usr/sbin/vireo-agent"}}"#,
                kit_kernel().display()
            )),
        ),
        (
            "/drives/rootfs",
            body(&format!(
                r#"{{"drive_id":"rootfs","path_on_host":"{}","is_root_device":true,"is_read_only":false}}"#,
                image.display()
            )),
        ),
        (
            "/vsock",
            body(&format!(
                r#"{{"guest_cid":3,"uds_path":"{}"}}"#,
                uds.display()
            )),
        ),
        (
            "/machine-config",
            body(r#"{"vcpu_count":1,"mem_size_mib":256}"#),
        ),
        ("/actions", body(r#"{"action_type":"InstanceStart"}"#)),
    ] {
        let (status, text) = v.req("PUT", path, &b);
        assert!(status < 300, "PUT {path}: {status} {text}");
    }
    // Something only memory holds: a file on the guest's /tmp (tmpfs).
    let r = exec(
        &uds,
        &["sh", "-c", "echo before-snapshot > /tmp/mark; sync"],
    );
    assert_eq!(r.code(), 0, "{r:?}");
    let snap = dir.join("snap");
    let r = finish(
        vireo()
            .args(["snapshot", "--api-sock"])
            .arg(&v.sock)
            .arg("--out")
            .arg(&snap)
            .spawn()
            .unwrap(),
    );
    assert_eq!(r.code(), 0, "{r:?}");
    let _ = v.stop(libc::SIGTERM);
    let uds2 = dir.join("vsock2.sock");
    let _restored = Running(
        vireo()
            .args(["restore", "--snapshot"])
            .arg(&snap)
            .arg("--vsock-override")
            .arg(&uds2)
            .args(["--serial", "stdio"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let r = exec(&uds2, &["cat", "/tmp/mark"]);
    assert_eq!(
        (r.code(), r.stdout.as_str()),
        (0, "before-snapshot\n"),
        "{r:?}"
    );
}
