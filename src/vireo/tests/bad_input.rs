//! Every bad input gets one clear line on stderr naming the thing and the reason, and a
//! non-zero exit; never a panic.

mod common;
use common::*;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;

/// Asserts a setup failure: exit 1, and stderr is one `vireo: error:` line containing all of
/// `needles`.
fn assert_rejected(r: &Run, needles: &[&str]) {
    assert_eq!(r.code(), 1, "exit code; stderr: {}", r.stderr);
    let lines: Vec<&str> = r.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {:?}", r.stderr);
    assert!(lines[0].starts_with("vireo: error: "), "{:?}", lines[0]);
    for n in needles {
        assert!(lines[0].contains(n), "{:?} should mention {n:?}", lines[0]);
    }
    assert!(!r.stderr.contains("panicked"));
    assert!(r.stdout.is_empty(), "the guest never ran: {}", r.stdout);
}

fn elf() -> String {
    guest("elf").to_str().unwrap().to_owned()
}

#[test]
fn missing_kernel() {
    let r = run(&["--kernel", "/nonexistent/vmlinux"]);
    assert_rejected(
        &r,
        &["kernel image", "/nonexistent/vmlinux", "No such file"],
    );
}

#[test]
fn kernel_is_a_directory() {
    let dir = scratch("kernel-dir");
    let r = run(&["--kernel", dir.to_str().unwrap()]);
    assert_rejected(&r, &["kernel image", dir.to_str().unwrap(), "directory"]);
}

/// Runs vireo as the unprivileged user `nobody` on a copy of the ELF guest with file mode
/// `mode`: root can read any file and open /dev/kvm, so these checks need another user.
fn run_as_nobody(name: &str, mode: u32) -> (Run, PathBuf, PathBuf) {
    let dir = scratch(name);
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let k = dir.join("vmlinux");
    std::fs::copy(guest("elf"), &k).unwrap();
    std::fs::set_permissions(&k, std::fs::Permissions::from_mode(mode)).unwrap();
    // The build tree may sit where nobody cannot reach (under /root, say): run a copy.
    let vireo = dir.join("vireo");
    std::fs::copy(vireo_bin(), &vireo).unwrap();
    std::fs::set_permissions(&vireo, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&vireo)
        .args(["run", "--kernel", k.to_str().unwrap()])
        .output()
        .expect("setpriv (util-linux) runs vireo as nobody");
    (Run::from(out), k, dir)
}

#[test]
fn unreadable_kernel() {
    let (r, k, dir) = run_as_nobody("kernel-unreadable", 0o000);
    assert_rejected(
        &r,
        &["kernel image", k.to_str().unwrap(), "Permission denied"],
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn file_that_is_no_kernel() {
    let dir = scratch("not-a-kernel");
    let junk = dir.join("junk.bin");
    write_file(&junk, &pattern(65536, 9));
    let r = run(&["--kernel", junk.to_str().unwrap()]);
    assert_rejected(&r, &[junk.to_str().unwrap(), "not a kernel"]);
    let empty = dir.join("empty");
    write_file(&empty, b"");
    let r = run(&["--kernel", empty.to_str().unwrap()]);
    assert_rejected(
        &r,
        &["kernel image", empty.to_str().unwrap(), "it is empty"],
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn user_space_elf_is_no_kernel() {
    let r = run(&["--kernel", "/bin/true"]);
    assert_rejected(&r, &["/bin/true", "not a loadable x86_64 ELF kernel"]);
}

#[test]
fn truncated_elf() {
    let dir = scratch("truncated-elf");
    let k = dir.join("vmlinux");
    let data = std::fs::read(guest("elf")).unwrap();
    write_file(&k, &data[..200]);
    let r = run(&["--kernel", k.to_str().unwrap()]);
    assert_rejected(&r, &[k.to_str().unwrap(), "ELF"]);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn bzimage_without_64bit_entry() {
    let dir = scratch("bzimage-32");
    let k = dir.join("bzImage");
    let mut data = std::fs::read(guest("bzimage")).unwrap();
    data[0x236] = 0; // xloadflags: clear XLF_KERNEL_64
    write_file(&k, &data);
    let r = run(&["--kernel", k.to_str().unwrap()]);
    assert_rejected(&r, &[k.to_str().unwrap(), "no 64-bit entry point", "2.15"]);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn missing_initrd() {
    let r = run(&["--kernel", &elf(), "--initrd", "/nonexistent/initrd.img"]);
    assert_rejected(&r, &["initrd", "/nonexistent/initrd.img", "No such file"]);
}

#[test]
fn initrd_that_does_not_fit() {
    let dir = scratch("initrd-too-big");
    let initrd = dir.join("initrd.img");
    let f = std::fs::File::create(&initrd).unwrap();
    f.set_len(200 << 20).unwrap(); // sparse: costs no disk
    for kind in KINDS {
        let k = guest(kind);
        let r = run(&[
            "--kernel",
            k.to_str().unwrap(),
            "--memory",
            "128",
            "--initrd",
            initrd.to_str().unwrap(),
        ]);
        assert_rejected(
            &r,
            &[
                "initrd",
                initrd.to_str().unwrap(),
                "209715200 bytes",
                "--memory",
            ],
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn command_line_longer_than_the_protocol_allows() {
    // vmlinux and PVH: Linux's x86 COMMAND_LINE_SIZE (2048 with the NUL).
    for kind in ["elf", "pvh"] {
        let k = guest(kind);
        let ok = "a".repeat(2047);
        let r = run(&["--kernel", k.to_str().unwrap(), "--cmdline", &ok]);
        assert_eq!(r.code(), 0, "{kind}: 2047 bytes fit: {}", r.stderr);
        assert_eq!(r.report("cmdline").as_deref(), Some(ok.as_str()));
        let long = "a".repeat(2048);
        let r = run(&["--kernel", k.to_str().unwrap(), "--cmdline", &long]);
        assert_rejected(&r, &["command line is 2048 bytes", "at most 2047"]);
    }
    // bzImage: whatever its setup header's cmdline_size says (the test guest says 1023).
    let k = guest("bzimage");
    let ok = "b".repeat(1023);
    let r = run(&["--kernel", k.to_str().unwrap(), "--cmdline", &ok]);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    assert_eq!(r.report("cmdline").as_deref(), Some(ok.as_str()));
    let r = run(&[
        "--kernel",
        k.to_str().unwrap(),
        "--cmdline",
        &"b".repeat(1024),
    ]);
    assert_rejected(&r, &["command line is 1024 bytes", "at most 1023"]);
    // What vireo appends for its devices counts, and the message says so.
    let dir = scratch("cmdline-devices");
    let img = dir.join("d.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let r = run(&[
        "--kernel",
        guest("elf").to_str().unwrap(),
        "--drive",
        &format!("path={},root=on", img.display()),
        "--cmdline",
        &"c".repeat(2040),
    ]);
    assert_rejected(
        &r,
        &[
            "of them the device entries vireo appends",
            "virtio_mmio.device=",
        ],
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn memory_zero_or_beyond_the_host() {
    let r = run(&["--kernel", &elf(), "--memory", "0"]);
    assert_rejected(&r, &["memory size 0 MiB", "too small"]);
    let r = run(&["--kernel", &elf(), "--memory", "1"]);
    assert_rejected(&r, &["memory size 1 MiB", "too small"]);
    let r = run(&["--kernel", &elf(), "--memory", "100000000"]);
    assert_rejected(&r, &["memory size 100000000 MiB", "more than this host"]);
}

#[test]
fn kernel_larger_than_memory() {
    // The bzImage's init_size is honoured: a guest too small for it is refused up front.
    let dir = scratch("kernel-too-big");
    let k = dir.join("bzImage");
    let mut data = std::fs::read(guest("bzimage")).unwrap();
    data[0x260..0x264].copy_from_slice(&(64u32 << 20).to_le_bytes()); // init_size = 64 MiB
    write_file(&k, &data);
    let r = run(&["--kernel", k.to_str().unwrap(), "--memory", "32"]);
    assert_rejected(&r, &[k.to_str().unwrap(), "more memory"]);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn cpus_zero_or_above_the_maximum() {
    let r = run(&["--kernel", &elf(), "--cpus", "0"]);
    assert_rejected(&r, &["vCPU count 0"]);
    let r = run(&["--kernel", &elf(), "--cpus", "255"]);
    assert_rejected(&r, &["vCPU count 255", "254"]);
}

#[test]
fn malformed_flags_are_usage_errors() {
    let r = run(&["--kernel", &elf(), "--memory", "lots"]);
    assert_eq!(r.code(), 2);
    assert!(
        r.stderr
            .contains("invalid value 'lots' for '--memory <SPEC>'"),
        "{}",
        r.stderr
    );
    let r = run(&["--kernel", &elf(), "--serial", "tcp:1234"]);
    assert_eq!(r.code(), 2);
    assert!(
        r.stderr.contains("stdio, file:PATH or none"),
        "{}",
        r.stderr
    );
    let r = run(&["--memory", "128"]);
    assert_eq!(r.code(), 2);
    assert!(r.stderr.contains("--kernel"), "{}", r.stderr);
    // An empty drive ID, which the API refuses too.
    let r = run(&["--kernel", &elf(), "--drive", "path=/dev/null,id="]);
    assert_eq!(r.code(), 2);
    assert!(r.stderr.contains("id= needs a value"), "{}", r.stderr);
}

#[test]
fn fifo_inputs_are_refused_before_they_are_opened() {
    let dir = scratch("fifo-inputs");
    let fifo = dir.join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo(3) on a NUL-terminated path this test owns.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let f = fifo.to_str().unwrap();
    let r = run(&["--kernel", f]);
    assert_rejected(&r, &["kernel image", f, "named pipe"]);
    let r = run(&["--kernel", &elf(), "--initrd", f]);
    assert_rejected(&r, &["initrd", f, "named pipe"]);
    let r = run(&[
        "--kernel",
        &elf(),
        "--drive",
        &format!("path={f},readonly=on"),
    ]);
    assert_rejected(&r, &["drive image", f, "named pipe"]);
    let empty = dir.join("empty");
    std::fs::write(&empty, b"").unwrap();
    let r = run(&["--kernel", &elf(), "--initrd", empty.to_str().unwrap()]);
    assert_rejected(&r, &["initrd", "empty"]);
    // Serial output into a FIFO nobody reads: the guest runs to its end regardless.
    let r = run(&[
        "--kernel",
        &elf(),
        "--serial",
        &format!("file:{f}"),
        "--cmdline",
        "vireo.end=poweroff",
    ]);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn serial_file_that_cannot_be_created() {
    let r = run(&[
        "--kernel",
        &elf(),
        "--serial",
        "file:/nonexistent/dir/console.log",
    ]);
    assert_rejected(&r, &["serial output file", "/nonexistent/dir/console.log"]);
}

#[test]
fn kvm_device_missing() {
    // A private mount namespace with an empty /dev: this process alone sees no /dev/kvm.
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg("mount -t tmpfs none /dev && exec \"$0\" run --kernel \"$1\"")
        .arg(vireo_bin())
        .arg(guest("elf"))
        .output()
        .expect("unshare (util-linux) runs vireo without /dev/kvm");
    let r = Run::from(out);
    assert_rejected(&r, &["/dev/kvm does not exist"]);
}

#[test]
fn kvm_device_not_permitted() {
    let (r, _, dir) = run_as_nobody("kvm-perm", 0o644);
    assert_rejected(&r, &["permission denied opening /dev/kvm"]);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn initrd_never_overlaps_the_kernels_bss() {
    // The ELF test guest's bss (page tables, stacks) lies in a segment with no file contents.
    // In a 2 MiB guest an initrd of 0xf0000 bytes would fit only on top of it: refused. One
    // that fits below the end of RAM and above the bss boots with its bytes intact.
    let dir = scratch("initrd-bss");
    let big = dir.join("big.img");
    write_file(&big, &pattern(0xf0000, 11));
    for kind in ["elf", "pvh"] {
        let k = guest(kind);
        let r = run(&[
            "--kernel",
            k.to_str().unwrap(),
            "--memory",
            "2",
            "--initrd",
            big.to_str().unwrap(),
        ]);
        assert_rejected(&r, &["initrd", "983040 bytes"]);
    }
    let small = pattern(0xc0000, 12);
    let ok = dir.join("ok.img");
    write_file(&ok, &small);
    let k = guest("pvh");
    let r = run(&[
        "--kernel",
        k.to_str().unwrap(),
        "--memory",
        "2",
        "--initrd",
        ok.to_str().unwrap(),
    ]);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    let line = r.report("initrd").unwrap();
    assert_eq!(
        field(&line, "fnv1a").unwrap(),
        format!("{:#x}", fnv1a(&small))
    );
    let _ = std::fs::remove_dir_all(dir);
}
