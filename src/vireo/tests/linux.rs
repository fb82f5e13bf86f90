//! Real Linux guests: a distribution bzImage and the ELF vmlinux inside it, booted to a
//! busybox shell on the serial console, using virtio-blk, virtio-rng and virtio-net.
//!
//! A Linux kernel needs hardware virtualisation; where /proc/cpuinfo shows neither vmx nor svm
//! these tests are reported as ignored, with that reason (see build.rs). Where it does, they
//! need a kernel and a static busybox: `VIREO_LINUX_KERNEL` (a bzImage; default: the newest
//! /boot/vmlinuz-*) and `VIREO_BUSYBOX` (default: /bin/busybox), plus `VIREO_LINUX_MODULES`
//! (`lib/modules/<version>`) when the kernel builds virtio as modules. `.ci/run` fetches all of
//! them from Debian on such hosts. A missing kernel or busybox fails the test: it never passes silently.

mod common;
use common::*;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

fn linux_kernel() -> PathBuf {
    if let Ok(p) = std::env::var("VIREO_LINUX_KERNEL") {
        return PathBuf::from(p);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/boot")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .collect();
    found.sort();
    found.pop().expect(
        "no Linux kernel: set VIREO_LINUX_KERNEL to a bzImage or install one in /boot \
         (Debian: linux-image-amd64)",
    )
}

fn busybox() -> PathBuf {
    let p = PathBuf::from(std::env::var("VIREO_BUSYBOX").unwrap_or_else(|_| "/bin/busybox".into()));
    assert!(
        p.exists(),
        "no static busybox at {}: set VIREO_BUSYBOX or install busybox-static",
        p.display()
    );
    p
}

/// Appends one entry to a newc-format cpio archive.
fn cpio_entry(out: &mut Vec<u8>, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
    static INO: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);
    let ino = INO.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let fields = [
        ino,
        mode,
        0,
        0,
        1,
        0,
        data.len() as u32,
        0,
        0,
        rdev.0,
        rdev.1,
        name.len() as u32 + 1,
        0,
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
    out.extend_from_slice(data);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

/// Kernel modules the virtio test needs when the kernel does not build them in (Debian's
/// does not): from `VIREO_LINUX_MODULES` (a `lib/modules/<version>` directory), in load order.
fn virtio_modules() -> Vec<(String, Vec<u8>)> {
    let Ok(dir) = std::env::var("VIREO_LINUX_MODULES") else {
        return Vec::new();
    };
    [
        "drivers/virtio/virtio.ko",
        "drivers/virtio/virtio_ring.ko",
        "drivers/virtio/virtio_mmio.ko",
        "drivers/block/virtio_blk.ko",
        "drivers/char/hw_random/virtio-rng.ko",
        "drivers/virtio/virtio_balloon.ko",
        "drivers/virtio/virtio_mem.ko",
        "net/core/failover.ko",
        "drivers/net/net_failover.ko",
        "drivers/net/virtio_net.ko",
    ]
    .iter()
    .filter_map(|m| {
        let path = Path::new(&dir).join("kernel").join(m);
        let name = path.file_name()?.to_string_lossy().into_owned();
        std::fs::read(&path).ok().map(|data| (name, data))
    })
    .collect()
}

/// An initramfs holding busybox and an /init that loads any virtio modules, reports and then
/// runs `then`.
fn initramfs(dir: &Path, then: &str) -> PathBuf {
    let modules = virtio_modules();
    let insmods: String = modules
        .iter()
        .map(|(name, _)| format!("insmod /lib/{name}\n"))
        .collect();
    let init = format!(
        "#!/bin/busybox sh\n\
         /bin/busybox --install -s /bin\n\
         export PATH=/bin\n\
         mount -t proc proc /proc\n\
         mount -t sysfs sysfs /sys\n\
         mount -t devtmpfs devtmpfs /dev\n\
         {insmods}\
         sleep 1\n\
         echo \"VIREO-LINUX cpus=$(grep -c ^processor /proc/cpuinfo)\"\n\
         echo \"VIREO-LINUX memtotal=$(grep MemTotal /proc/meminfo | tr -s ' ' | cut -d' ' -f2)\"\n\
         echo \"VIREO-LINUX cmdline=$(cat /proc/cmdline)\"\n\
         {then}\n"
    );
    let mut a = Vec::new();
    cpio_entry(&mut a, "bin", 0o040755, (0, 0), &[]);
    cpio_entry(&mut a, "dev", 0o040755, (0, 0), &[]);
    cpio_entry(&mut a, "dev/console", 0o020600, (5, 1), &[]);
    cpio_entry(&mut a, "proc", 0o040755, (0, 0), &[]);
    cpio_entry(&mut a, "sys", 0o040755, (0, 0), &[]);
    cpio_entry(&mut a, "lib", 0o040755, (0, 0), &[]);
    for (name, data) in &modules {
        cpio_entry(&mut a, &format!("lib/{name}"), 0o100644, (0, 0), data);
    }
    cpio_entry(
        &mut a,
        "bin/busybox",
        0o100755,
        (0, 0),
        &std::fs::read(busybox()).unwrap(),
    );
    cpio_entry(&mut a, "init", 0o100755, (0, 0), init.as_bytes());
    cpio_entry(&mut a, "TRAILER!!!", 0, (0, 0), &[]);
    let path = dir.join("initramfs.cpio");
    write_file(&path, &a);
    path
}

/// The ELF vmlinux inside a bzImage: the setup header's payload_offset/payload_length locate
/// the compressed kernel, which the host's decompressor unpacks.
fn extract_vmlinux(bzimage: &Path, dir: &Path) -> PathBuf {
    let data = std::fs::read(bzimage).unwrap();
    let setup_sects = match data[0x1f1] {
        0 => 4,
        n => n as usize,
    };
    let le32 = |o: usize| u32::from_le_bytes(data[o..o + 4].try_into().unwrap()) as usize;
    let start = (setup_sects + 1) * 512 + le32(0x248);
    let payload = &data[start..start + le32(0x24c)];
    let (tool, args): (&str, &[&str]) = match payload {
        [0xfd, b'7', b'z', b'X', b'Z', 0, ..] => ("xz", &["-dc", "--single-stream"]),
        [0x28, 0xb5, 0x2f, 0xfd, ..] => ("zstd", &["-dcq"]),
        [0x1f, 0x8b, ..] => ("gzip", &["-dcq"]),
        _ => panic!("{}: payload compression not recognised", bzimage.display()),
    };
    let mut child = Command::new(tool)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{tool} is needed to unpack the kernel: {e}"));
    let mut stdin = child.stdin.take().unwrap();
    let owned = payload.to_vec();
    let feeder = std::thread::spawn(move || {
        let _ = stdin.write_all(&owned);
    });
    let out = child.wait_with_output().unwrap();
    feeder.join().unwrap();
    assert!(
        out.stdout.starts_with(b"\x7fELF"),
        "{tool} did not yield an ELF vmlinux"
    );
    let path = dir.join("vmlinux");
    write_file(&path, &out.stdout);
    path
}

const CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off rdinit=/init";

/// The value of a `VIREO-LINUX key=value` line on the console.
fn linux_report(seen: &[String], key: &str) -> String {
    seen.iter()
        .find_map(|l| l.strip_prefix(&format!("VIREO-LINUX {key}=")))
        .unwrap_or_else(|| panic!("no {key} report from Linux; console:\n{}", seen.join("\n")))
        .to_owned()
}

/// Boots `kernel` with `initrd` and the test command line, plus `extra` flags.
fn boot_linux(
    kernel: &Path,
    initrd: &Path,
    extra: &[&str],
) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    let mut args = vec![
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--cmdline",
        CMDLINE,
    ];
    args.extend_from_slice(extra);
    spawn_interactive(&args)
}

/// Boots the distribution kernel with an initramfs that runs `script`, reports that it is done
/// and powers off; returns the console's lines once vireo has exited with 0.
fn run_script(dir: &Path, script: &str, extra: &[&str]) -> Vec<String> {
    let initrd = initramfs(
        dir,
        &format!("{script}\necho VIREO-LINUX-DONE\npoweroff -f"),
    );
    let (mut child, rx) = boot_linux(&linux_kernel(), &initrd, extra);
    let mut seen = Vec::new();
    wait_line(&rx, "VIREO-LINUX-DONE", &mut seen);
    assert_eq!(
        wait_exit(&mut child).code(),
        Some(0),
        "ACPI power-off ends vireo with 0"
    );
    seen
}

fn check_report(seen: &[String], cpus: u32, mem_mib: u64) {
    let find = |key: &str| linux_report(seen, key);
    assert_eq!(find("cpus"), cpus.to_string());
    let memtotal_kib: u64 = find("memtotal").parse().unwrap();
    assert!(memtotal_kib > (mem_mib << 10) / 2 && memtotal_kib <= mem_mib << 10);
    assert_eq!(find("cmdline"), CMDLINE);
}

#[test]
#[cfg_attr(
    not(vireo_hw_virt),
    ignore = "skipped: no vmx or svm in /proc/cpuinfo, so a Linux kernel cannot boot on this host"
)]
fn linux_bzimage_boots_to_a_shell() {
    let dir = scratch("linux-bzimage");
    let kernel = linux_kernel();
    let initrd = initramfs(&dir, "echo VIREO-LINUX-SHELL\nexec sh");
    let (mut child, rx) = boot_linux(&kernel, &initrd, &["--cpus", "2", "--memory", "512"]);
    let mut seen = Vec::new();
    wait_line(&rx, "VIREO-LINUX-SHELL", &mut seen);
    check_report(&seen, 2, 512);
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(b"echo $((6 * 7))-from-the-shell\n")
        .unwrap();
    wait_line(&rx, "42-from-the-shell", &mut seen);
    stdin.write_all(b"reboot -f\n").unwrap();
    assert_eq!(
        wait_exit(&mut child).code(),
        Some(0),
        "a guest reboot ends vireo with 0"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
#[cfg_attr(
    not(vireo_hw_virt),
    ignore = "skipped: no vmx or svm in /proc/cpuinfo, so a Linux kernel cannot boot on this host"
)]
fn linux_vmlinux_boots() {
    let dir = scratch("linux-vmlinux");
    let vmlinux = extract_vmlinux(&linux_kernel(), &dir);
    // poweroff: Linux enters S5 through the FADT's sleep control register.
    let initrd = initramfs(&dir, "echo VIREO-LINUX-DONE\npoweroff -f");
    let (mut child, rx) = boot_linux(&vmlinux, &initrd, &["--memory", "256"]);
    let mut seen = Vec::new();
    wait_line(&rx, "VIREO-LINUX-DONE", &mut seen);
    check_report(&seen, 1, 256);
    assert_eq!(
        wait_exit(&mut child).code(),
        Some(0),
        "ACPI power-off ends vireo with 0"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
#[cfg_attr(
    not(vireo_hw_virt),
    ignore = "skipped: no vmx or svm in /proc/cpuinfo, so a Linux kernel cannot boot on this host"
)]
fn linux_uses_virtio_blk_and_rng() {
    let dir = scratch("linux-virtio");
    let disk = dir.join("disk.img");
    let mut image = vec![0u8; 8 << 20];
    image[..16].copy_from_slice(b"VIREO-DISK-MARK\n");
    write_file(&disk, &image);
    let seen = run_script(
        &dir,
        "echo \"VIREO-LINUX serial=$(cat /sys/block/vda/serial)\"\n\
         echo \"VIREO-LINUX size=$(cat /sys/block/vda/size)\"\n\
         echo \"VIREO-LINUX mark=$(head -c 15 /dev/vda)\"\n\
         echo guest-wrote-this | dd of=/dev/vda bs=512 seek=4 conv=fsync 2>/dev/null\n\
         echo \"VIREO-LINUX rng=$(cat /sys/class/misc/hw_random/rng_current)\"\n\
         echo \"VIREO-LINUX random=$(head -c 16 /dev/hwrng | od -An -tx1 | tr -d ' \\n')\"",
        &[
            "--memory",
            "256",
            "--drive",
            &format!("path={},id=linux-test-disk", disk.display()),
            "--rng",
        ],
    );
    let find = |key: &str| linux_report(&seen, key);
    assert_eq!(find("serial"), "linux-test-disk", "GET_ID");
    assert_eq!(find("size"), "16384", "capacity in sectors");
    assert_eq!(find("mark"), "VIREO-DISK-MARK");
    assert!(find("rng").starts_with("virtio_rng"), "{}", find("rng"));
    assert_eq!(find("random").len(), 32);
    let written = std::fs::read(&disk).unwrap();
    assert_eq!(&written[4 * 512..4 * 512 + 16], b"guest-wrote-this");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
#[cfg_attr(
    not(vireo_hw_virt),
    ignore = "skipped: no vmx or svm in /proc/cpuinfo, so a Linux kernel cannot boot on this host"
)]
fn linux_inflates_the_balloon_it_is_given() {
    let dir = scratch("linux-balloon");
    // Linux takes the pages it gives to the balloon out of MemTotal (without
    // deflate_on_oom), so the guest's own view shows the inflation.
    let seen = run_script(
        &dir,
        "sleep 3\n\
         echo \"VIREO-LINUX driver=$(ls /sys/bus/virtio/drivers/virtio_balloon | grep -c virtio)\"\n\
         echo \"VIREO-LINUX after=$(grep MemTotal /proc/meminfo | tr -s ' ' | cut -d' ' -f2)\"",
        &[
            "--memory",
            "256",
            "--balloon",
            "size_mib=64,stats_period_s=1",
        ],
    );
    let find = |key: &str| linux_report(&seen, key);
    assert_eq!(find("driver"), "1", "virtio_balloon bound the device");
    let before: u64 = find("memtotal").parse().unwrap();
    let after: u64 = find("after").parse().unwrap();
    assert!(
        before >= after + (60 << 10),
        "MemTotal {before} KiB -> {after} KiB: the balloon did not take 64 MiB"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
#[cfg_attr(
    not(vireo_hw_virt),
    ignore = "skipped: no vmx or svm in /proc/cpuinfo, so a Linux kernel cannot boot on this host"
)]
fn linux_plugs_hotplug_memory() {
    let dir = scratch("linux-hotplug");
    // virtio-mem plugs the requested 128 MiB; the blocks are onlined here (unless the kernel's
    // memhp_default_state already did), and MemTotal grows.
    let seen = run_script(
        &dir,
        "sleep 3\n\
         for m in /sys/devices/system/memory/memory*/state; do echo online > $m 2>/dev/null; done\n\
         sleep 1\n\
         echo \"VIREO-LINUX driver=$(ls /sys/bus/virtio/drivers/virtio_mem | grep -c virtio)\"\n\
         echo \"VIREO-LINUX after=$(grep MemTotal /proc/meminfo | tr -s ' ' | cut -d' ' -f2)\"",
        &[
            "--memory",
            "256",
            "--memory-hotplug",
            "total_mib=512,requested_mib=128",
        ],
    );
    let find = |key: &str| linux_report(&seen, key);
    assert_eq!(find("driver"), "1", "virtio_mem bound the device");
    let before: u64 = find("memtotal").parse().unwrap();
    let after: u64 = find("after").parse().unwrap();
    assert!(
        after >= before + (120 << 10),
        "MemTotal {before} KiB -> {after} KiB: 128 MiB were not plugged"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
#[cfg_attr(
    not(vireo_hw_virt),
    ignore = "skipped: no vmx or svm in /proc/cpuinfo, so a Linux kernel cannot boot on this host"
)]
fn linux_uses_virtio_net() {
    let ns = NetNs::enter("linux-net");
    ns.tap("tap0", Some("10.0.0.1/24"));
    let host = std::net::UdpSocket::bind("10.0.0.1:6000").unwrap();
    host.set_read_timeout(Some(DEADLINE)).unwrap();
    let dir = scratch("linux-net");
    let seen = run_script(
        &dir,
        "ip link set eth0 up\n\
         ip addr add 10.0.0.2/24 dev eth0\n\
         echo \"VIREO-LINUX mac=$(cat /sys/class/net/eth0/address)\"\n\
         echo \"VIREO-LINUX mtu=$(cat /sys/class/net/eth0/mtu)\"\n\
         echo \"VIREO-LINUX ping=$(ping -c 3 -W 5 10.0.0.1 >/dev/null && echo ok)\"\n\
         echo hello-from-linux | nc -u -w 1 10.0.0.1 6000",
        &[
            "--memory",
            "256",
            "--net",
            "tap=tap0,mac=02:00:00:00:00:02,mtu=1400",
        ],
    );
    let mut buf = [0u8; 64];
    let (n, from) = host.recv_from(&mut buf).expect("Linux's datagram");
    assert_eq!(&buf[..n], b"hello-from-linux\n");
    assert_eq!(from.ip().to_string(), "10.0.0.2");
    let find = |key: &str| linux_report(&seen, key);
    assert_eq!(find("mac"), "02:00:00:00:00:02", "VIRTIO_NET_F_MAC");
    assert_eq!(find("mtu"), "1400", "VIRTIO_NET_F_MTU");
    assert_eq!(find("ping"), "ok");
    let _ = std::fs::remove_dir_all(dir);
}
