//! virtio-blk and virtio-rng end to end: the test guest drives the devices through the MMIO
//! transport (ioeventfd notifications, irqfd interrupts) and the host checks the disk images.

mod common;
use common::*;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

const TEST_SECTOR: u64 = 8;
const TEST_BYTES: usize = 16384;

/// What the guest writes on drive `slot` (mirrors guest/src/devtest.rs).
fn guest_pattern(slot: usize) -> Vec<u8> {
    let seed = slot as u8 + 1;
    (0..TEST_BYTES)
        .map(|i| ((i.wrapping_mul(31)) ^ (i >> 7)) as u8 ^ seed.wrapping_mul(0x5b))
        .collect()
}

fn blk_line(r: &Run, dev: usize, what: &str) -> String {
    let prefix = format!("dev={dev} {what}");
    r.all("blk")
        .into_iter()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no '@blk {prefix}' line:\n{}", r.stdout))
}

fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut f = std::fs::File::open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut v = vec![0u8; len];
    f.read_exact(&mut v).unwrap();
    v
}

#[test]
fn block_devices_read_write_flush_discard_and_read_only() {
    let dir = scratch("virtio-blk");
    // Drive 0: 8 MiB, writable, with data where discard and write-zeroes will land.
    let rw = dir.join("rw.img");
    {
        let mut f = std::fs::File::create(&rw).unwrap();
        f.set_len(8 << 20).unwrap();
        f.seek(SeekFrom::Start(1 << 20)).unwrap();
        f.write_all(&vec![0x5a; 1 << 20]).unwrap();
        f.seek(SeekFrom::Start(64 * 512)).unwrap();
        f.write_all(&[0x77; 4096]).unwrap();
        f.sync_all().unwrap();
    }
    let allocated_before = std::fs::metadata(&rw).unwrap().blocks();
    // Drive 1: read-only, with known contents.
    let ro = dir.join("ro.img");
    let ro_data = pattern(4 << 20, 77);
    write_file(&ro, &ro_data);

    let kernel = guest("pvh");
    let r = run(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--drive",
        &format!("path={},id=scratch-disk{}", rw.display(), engine_opt()),
        "--drive",
        &format!("path={},readonly=on{}", ro.display(), engine_opt()),
        "--cmdline",
        "vireo.blktest",
    ]);
    assert_eq!(r.code(), 0, "{}\n{}", r.stderr, r.stdout);
    let virtio = r.all("virtio");
    assert_eq!(virtio.len(), 2, "{virtio:?}");
    assert!(virtio[0].contains("base=0xd0000000 irq=5 magic=0x74726976 version=2 device_id=2"));

    // Drive 0.
    let config = blk_line(&r, 0, "config");
    assert_eq!(field(&config, "capacity"), Some("16384"), "{config}");
    assert_eq!(field(&config, "blk_size"), Some("512"));
    assert_eq!(field(&config, "seg_max"), Some("254"));
    assert_eq!(field(&config, "size_max"), Some("1048576"));
    assert_eq!(field(&config, "ro"), Some("0"));
    let id = blk_line(&r, 0, "id");
    assert_eq!(
        (field(&id, "status"), field(&id, "id")),
        (Some("0"), Some("scratch-disk"))
    );
    assert_eq!(field(&blk_line(&r, 0, "write"), "status"), Some("0"));
    assert_eq!(field(&blk_line(&r, 0, "flush"), "status"), Some("0"));
    let read = blk_line(&r, 0, "read");
    assert_eq!(
        (field(&read, "status"), field(&read, "match")),
        (Some("0"), Some("1"))
    );
    let indirect = blk_line(&r, 0, "indirect");
    assert_eq!(
        (field(&indirect, "status"), field(&indirect, "match")),
        (Some("0"), Some("1"))
    );
    assert_eq!(
        read_at(&rw, TEST_SECTOR * 512, TEST_BYTES),
        guest_pattern(0),
        "the guest's write is in the host file"
    );
    assert_eq!(field(&blk_line(&r, 0, "discard"), "status"), Some("0"));
    assert_eq!(field(&blk_line(&r, 0, "zeroes"), "status"), Some("0"));
    assert!(
        read_at(&rw, 1 << 20, 1 << 20).iter().all(|&b| b == 0),
        "discarded range reads zero"
    );
    assert!(
        read_at(&rw, 64 * 512, 4096).iter().all(|&b| b == 0),
        "write-zeroes range is zero"
    );
    let allocated_after = std::fs::metadata(&rw).unwrap().blocks();
    assert!(
        allocated_after < allocated_before,
        "discard punched a hole: {allocated_before} -> {allocated_after} blocks"
    );
    let oob = blk_line(&r, 0, "oob");
    assert_eq!(
        field(&oob, "status"),
        Some("1"),
        "out-of-range read is an I/O error"
    );
    // Completions arrive by interrupt (irqfd). Interrupts that arrive while the guest is busy
    // coalesce in the LAPIC, so only their presence is certain, not one per request.
    assert!(
        field(&oob, "irqs").unwrap().parse::<u32>().unwrap() >= 1,
        "completions by interrupt"
    );

    // Drive 1: read-only.
    let config = blk_line(&r, 1, "config");
    assert_eq!(field(&config, "ro"), Some("1"));
    assert_eq!(field(&config, "capacity"), Some("8192"));
    assert_eq!(
        field(&blk_line(&r, 1, "id"), "id"),
        Some("drive1"),
        "default id"
    );
    assert_eq!(
        field(&blk_line(&r, 1, "write"), "status"),
        Some("1"),
        "write refused"
    );
    assert_eq!(
        std::fs::read(&ro).unwrap(),
        ro_data,
        "read-only image untouched"
    );
    assert!(
        !r.stdout.contains("dev=1 discard"),
        "no discard offered on a read-only drive"
    );
    let _ = std::fs::remove_dir_all(dir);
}

fn rng_bytes(kind: &str) -> String {
    let kernel = guest(kind);
    let r = run(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--rng",
        "--cmdline",
        "vireo.rngtest",
    ]);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    let line = r
        .report("rng")
        .unwrap_or_else(|| panic!("no @rng line: {}", r.stdout));
    assert_eq!(field(&line, "used"), Some("32"), "{line}");
    field(&line, "bytes").unwrap().to_owned()
}

#[test]
fn entropy_differs_between_runs() {
    let a = rng_bytes("elf");
    let b = rng_bytes("bzimage");
    assert_eq!(a.len(), 64);
    assert_ne!(a, "0".repeat(64));
    assert_ne!(a, b);
}

#[test]
fn root_drive_goes_on_the_command_line() {
    let dir = scratch("virtio-root");
    let img = dir.join("root.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let kernel = guest("elf");
    let r = run(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--cmdline",
        "console=ttyS0",
        "--drive",
        &format!("path={},root=on,readonly=on{}", img.display(), engine_opt()),
        "--rng",
    ]);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    assert_eq!(
        r.report("cmdline").as_deref(),
        Some(
            "console=ttyS0 root=/dev/vda ro virtio_mmio.device=4K@0xd0000000:5 \
             virtio_mmio.device=4K@0xd0001000:6"
        )
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// Asserts a rejected configuration: exit 1 and one line naming the problem.
fn rejected(args: &[&str], needles: &[&str]) {
    let kernel = guest("elf");
    let mut all = vec!["--kernel", kernel.to_str().unwrap()];
    all.extend_from_slice(args);
    let r = run(&all);
    assert_eq!(r.code(), 1, "{args:?}: {}", r.stderr);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    for n in needles {
        assert!(r.stderr.contains(n), "{:?} should mention {n:?}", r.stderr);
    }
}

#[test]
fn bad_drive_options() {
    let dir = scratch("virtio-bad");
    let img = dir.join("d.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let p = img.display().to_string();
    rejected(
        &["--drive", "path=/nonexistent/disk.img"],
        &["drive image /nonexistent/disk.img", "No such file"],
    );
    rejected(
        &["--drive", &format!("path={p},id={}", "x".repeat(21))],
        &["longer than 20 bytes"],
    );
    rejected(
        &[
            "--drive",
            &format!("path={p},id=a"),
            "--drive",
            &format!("path={p},id=a"),
        ],
        &["drive id 'a' is used twice"],
    );
    rejected(
        &[
            "--drive",
            &format!("path={p}"),
            "--drive",
            &format!("path={p},root=on"),
        ],
        &["only the first drive"],
    );
    rejected(
        &["--drive", dir.to_str().unwrap()],
        &["drive image", "directory"],
    );
    rejected(
        &["--drive", &format!("path={},readonly=on", dir.display())],
        &["is a directory"],
    );
    // Malformed specs are usage errors (exit 2) naming the option.
    let kernel = guest("elf");
    for (spec, needle) in [
        (
            format!("path={p},readonly=maybe"),
            "readonly=maybe: expected on or off",
        ),
        (
            format!("path={p},cache=none"),
            "'cache=none' is not a drive option",
        ),
        ("id=x".to_owned(), "a drive needs path=IMG"),
        (
            format!("path={p},io_engine=uring"),
            "io_engine uring: expected Sync or Async",
        ),
    ] {
        let r = run(&["--kernel", kernel.to_str().unwrap(), "--drive", &spec]);
        assert_eq!(r.code(), 2, "{spec}: {}", r.stderr);
        assert!(r.stderr.contains(needle), "{spec}: {}", r.stderr);
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn hostile_register_traffic_does_not_break_vireo() {
    // The guest hammers every virtio window and the legacy ports with random accesses, then
    // resets a block device and uses it. vireo must survive, keep read-only images untouched
    // and serve the device again.
    let dir = scratch("virtio-chaos");
    let rw = dir.join("rw.img");
    std::fs::File::create(&rw)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let ro = dir.join("ro.img");
    let ro_data = pattern(1 << 20, 5);
    write_file(&ro, &ro_data);
    for (kind, count) in [("elf", "40000"), ("pvh", "25000")] {
        let kernel = guest(kind);
        let r = run(&[
            "--kernel",
            kernel.to_str().unwrap(),
            "--cpus",
            "2",
            "--drive",
            &format!("path={}{}", rw.display(), engine_opt()),
            "--drive",
            &format!("path={},readonly=on{}", ro.display(), engine_opt()),
            "--rng",
            "--cmdline",
            &format!("vireo.chaos={count}"),
        ]);
        assert_eq!(r.code(), 0, "{kind}: {}\n{}", r.stderr, r.stdout);
        assert_eq!(r.report("chaos"), Some(format!("accesses={count}")));
        // Tens of thousands of bad accesses, a handful of log lines: guest-triggered messages
        // are rate limited per kind.
        let lines = r.stderr.lines().count();
        assert!(lines < 200, "{kind}: {lines} log lines:\n{}", r.stderr);
        let after = blk_line(&r, 0, "after-chaos");
        assert_eq!(field(&after, "status"), Some("0"), "{after}");
        assert_eq!(
            std::fs::read(&ro).unwrap(),
            ro_data,
            "read-only image untouched"
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Attaches `image` to a free loop device; detaches it when dropped.
struct Loop(String);

impl Loop {
    fn attach(image: &Path) -> Loop {
        let out = std::process::Command::new("losetup")
            .args(["-f", "--show"])
            .arg(image)
            .output()
            .expect("run losetup (util-linux)");
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Loop(String::from_utf8(out.stdout).unwrap().trim().to_owned())
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.0])
            .status();
    }
}

/// A host block device as a drive: its size comes from the device (its metadata says 0), and
/// guest writes reach it.
#[test]
fn host_block_device_as_a_drive() {
    let dir = scratch("virtio-blkdev");
    let img = dir.join("backing.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let dev = Loop::attach(&img);
    let kernel = guest("pvh");
    let r = run(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--drive",
        &format!("path={}{}", dev.0, engine_opt()),
        "--cmdline",
        "vireo.blktest",
    ]);
    assert_eq!(r.code(), 0, "{}\n{}", r.stderr, r.stdout);
    let config = blk_line(&r, 0, "config");
    assert_eq!(field(&config, "capacity"), Some("16384"), "{config}");
    assert_eq!(field(&blk_line(&r, 0, "write"), "status"), Some("0"));
    let read = blk_line(&r, 0, "read");
    assert_eq!(
        (field(&read, "status"), field(&read, "match")),
        (Some("0"), Some("1"))
    );
    drop(dev);
    assert_eq!(
        read_at(&img, TEST_SECTOR * 512, TEST_BYTES),
        guest_pattern(0),
        "the guest's write is in the backing file"
    );
    let _ = std::fs::remove_dir_all(dir);
}
