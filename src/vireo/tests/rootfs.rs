//! `vireo rootfs build` from a directory, an OCI tarball and a `docker save` tarball, each
//! image read back with debugfs (e2fsprogs); and `vireo run --rootfs` up to what this host
//! can boot.

mod common;

use common::{agent_bin, finish, scratch, vireo, Run};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

fn musl_agent() -> PathBuf {
    agent_bin(Some("x86_64-unknown-linux-musl"))
}

fn build(src: &Path, out: &Path, extra: &[&str]) -> Run {
    finish(
        vireo()
            .args(["rootfs", "build"])
            .arg(src)
            .arg("-o")
            .arg(out)
            .arg("--agent")
            .arg(musl_agent())
            .args(extra)
            .spawn()
            .unwrap(),
    )
}

/// debugfs's answer to one request on `image`.
fn debugfs(image: &Path, request: &str) -> String {
    let out = Command::new("debugfs")
        .args(["-R", request])
        .arg(image)
        .output()
        .expect("run debugfs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Type, mode, owner and link count of `path` in `image`, from debugfs's stat.
fn stat(image: &Path, path: &str) -> String {
    debugfs(image, &format!("stat {path}"))
}

fn assert_mode(image: &Path, path: &str, ty: &str, mode: &str, uid: u32, gid: u32) {
    let s = stat(image, path);
    assert!(s.contains(&format!("Type: {ty}")), "{path}: {s}");
    assert!(
        s.contains(&format!("Mode:  {mode}")),
        "{path}: want mode {mode}: {s}"
    );
    assert!(
        s.contains(&format!("User: {uid:5}")),
        "{path}: want uid {uid}: {s}"
    );
    assert!(
        s.contains(&format!("Group: {gid:5}")),
        "{path}: want gid {gid}: {s}"
    );
}

fn exists(image: &Path, path: &str) -> bool {
    !debugfs(image, &format!("stat {path}")).is_empty()
}

fn agent_is_installed(image: &Path) {
    assert_mode(image, "/usr/sbin/vireo-agent", "regular", "0755", 0, 0);
    let size = std::fs::metadata(musl_agent()).unwrap().len();
    assert!(stat(image, "/usr/sbin/vireo-agent").contains(&format!("Size: {size}")));
}

#[test]
fn a_directory_becomes_an_image_with_the_agent() {
    let dir = scratch("rootfs-dir");
    let src = dir.join("root");
    std::fs::create_dir_all(src.join("etc")).unwrap();
    std::fs::create_dir_all(src.join("bin")).unwrap();
    std::fs::write(src.join("etc/hostname"), "box\n").unwrap();
    std::fs::write(src.join("bin/tool"), "#!/bin/sh\necho tool\n").unwrap();
    std::fs::set_permissions(src.join("bin/tool"), PermissionsExt::from_mode(0o750)).unwrap();
    std::os::unix::fs::symlink("tool", src.join("bin/alias")).unwrap();
    std::os::unix::fs::chown(src.join("etc/hostname"), Some(1000), Some(100)).unwrap();
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(src.join("big.bin"), &big).unwrap();
    let image = dir.join("root.ext4");
    let r = build(&src, &image, &[]);
    assert_eq!(r.code(), 0, "{r:?}");
    assert!(r.stdout.contains("MiB ext4"), "{}", r.stdout);
    assert_eq!(debugfs(&image, "cat /etc/hostname"), "box\n");
    assert_mode(&image, "/etc/hostname", "regular", "0644", 1000, 100);
    assert_mode(&image, "/bin/tool", "regular", "0750", 0, 0);
    assert!(stat(&image, "/bin/alias").contains("Type: symlink"));
    assert!(debugfs(&image, "stat /bin/alias").contains("Fast link dest: \"tool\""));
    let dumped = dir.join("big.out");
    debugfs(&image, &format!("dump /big.bin {}", dumped.display()));
    assert!(
        std::fs::read(&dumped).unwrap() == big,
        "/big.bin differs in the image"
    );
    agent_is_installed(&image);
    // The default size leaves room: at least 16 MiB beyond the contents.
    let size = std::fs::metadata(&image).unwrap().len();
    assert!(size >= (3 + 16) << 20, "image of {size} bytes");

    // A size too small for the source is refused by name, and nothing is left behind.
    let small = dir.join("small.ext4");
    let r = build(&src, &small, &["--size", "4"]);
    assert_ne!(r.code(), 0);
    assert!(
        r.stderr.contains("needs about") && r.stderr.contains("4 MiB"),
        "{}",
        r.stderr
    );
    assert!(!small.exists());
    let r = build(&src, &small, &["--size", "40"]);
    assert_eq!(r.code(), 0, "{r:?}");
    assert_eq!(std::fs::metadata(&small).unwrap().len(), 40 << 20);

    // Sources and agents that cannot be used.
    let r = build(&dir.join("missing"), &small, &[]);
    assert!(
        r.stderr.contains("missing") && r.code() != 0,
        "{}",
        r.stderr
    );
    let r = finish(
        vireo()
            .args(["rootfs", "build"])
            .arg(&src)
            .arg("-o")
            .arg(&small)
            .arg("--agent")
            .arg(agent_bin(None))
            .spawn()
            .unwrap(),
    );
    assert!(r.stderr.contains("dynamically linked"), "{}", r.stderr);
}

/// A tar layer built entry by entry.
struct Layer(tar::Builder<Vec<u8>>);

impl Layer {
    fn new() -> Self {
        Self(tar::Builder::new(Vec::new()))
    }

    fn entry(
        mut self,
        path: &str,
        ty: tar::EntryType,
        mode: u32,
        owner: (u64, u64),
        data: &[u8],
        link: Option<&str>,
    ) -> Self {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(ty);
        h.set_mode(mode);
        h.set_uid(owner.0);
        h.set_gid(owner.1);
        h.set_size(data.len() as u64);
        h.set_mtime(1_700_000_000);
        if let Some(l) = link {
            h.set_link_name(l).unwrap();
        }
        if ty == tar::EntryType::Char {
            h.set_device_major(1).unwrap();
            h.set_device_minor(3).unwrap();
        }
        h.set_path(path).unwrap();
        h.set_cksum();
        self.0.append(&h, data).unwrap();
        self
    }

    /// A pax header giving the next entry the extended attribute `name`=`value`.
    fn xattr(mut self, name: &str, value: &str) -> Self {
        let body = format!("SCHILY.xattr.{name}={value}\n");
        // The record's length counts its own digits.
        let mut len = body.len() + 2;
        while format!("{len} {body}").len() != len {
            len += 1;
        }
        let record = format!("{len} {body}");
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::XHeader);
        h.set_size(record.len() as u64);
        h.set_path("PaxHeader").unwrap();
        h.set_cksum();
        self.0.append(&h, record.as_bytes()).unwrap();
        self
    }

    fn file(self, path: &str, mode: u32, owner: (u64, u64), data: &[u8]) -> Self {
        self.entry(path, tar::EntryType::Regular, mode, owner, data, None)
    }

    fn dir(self, path: &str, mode: u32, owner: (u64, u64)) -> Self {
        self.entry(path, tar::EntryType::Directory, mode, owner, b"", None)
    }

    fn bytes(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }
}

fn sha256(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The test image's three layers: plain tar, gzip, zstd.
fn layers() -> Vec<(Vec<u8>, &'static str)> {
    use tar::EntryType::*;
    let one = Layer::new()
        .dir("etc", 0o755, (0, 0))
        .file("etc/passwd", 0o644, (0, 0), b"root:x:0:0::/root:/bin/sh\n")
        .xattr("user.vireo", "kept")
        .file("etc/secret", 0o600, (1000, 1000), b"s3cret\n")
        .dir("bin", 0o755, (0, 0))
        .file("bin/tool", 0o755, (0, 0), b"#!/bin/sh\n")
        .file("bin/su", 0o4755, (0, 0), b"setuid\n")
        .entry("bin/sh-link", Symlink, 0o777, (0, 0), b"", Some("tool"))
        .dir("opt/old", 0o755, (0, 0))
        .file("opt/old/a", 0o644, (0, 0), b"a\n")
        .file("opt/old/b", 0o644, (0, 0), b"b\n")
        .dir("var", 0o755, (0, 0))
        .file("var/gone", 0o644, (0, 0), b"gone\n")
        .dir("dev", 0o755, (0, 0))
        .entry("dev/mynull", Char, 0o666, (0, 0), b"", None)
        .entry("run-fifo", Fifo, 0o600, (0, 0), b"", None)
        .bytes();
    let two = Layer::new()
        .file("var/.wh.gone", 0o644, (0, 0), b"")
        .file("opt/old/.wh..wh..opq", 0o644, (0, 0), b"")
        .file("opt/old/c", 0o644, (0, 0), b"c\n")
        .file(
            "etc/passwd",
            0o644,
            (0, 0),
            b"root:x:0:0::/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n",
        )
        .entry(
            "etc/passwd.hard",
            Link,
            0o644,
            (0, 0),
            b"",
            Some("etc/passwd"),
        )
        .dir("home/user", 0o750, (1000, 1000))
        .bytes();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&two).unwrap();
    let three = Layer::new()
        .file("layer3", 0o640, (0, 4), b"three\n")
        .entry(
            "bin/sh-link",
            Symlink,
            0o777,
            (0, 0),
            b"",
            Some("/bin/other"),
        )
        .bytes();
    let zst =
        ruzstd::encoding::compress_to_vec(&three[..], ruzstd::encoding::CompressionLevel::Fastest);
    vec![
        (one, "application/vnd.oci.image.layer.v1.tar"),
        (
            gz.finish().unwrap(),
            "application/vnd.oci.image.layer.v1.tar+gzip",
        ),
        (zst, "application/vnd.oci.image.layer.v1.tar+zstd"),
    ]
}

/// An OCI image layout as a tarball.
fn oci_tarball(path: &Path) {
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    let mut add = |name: &str, data: &[u8]| files.push((name.to_string(), data.to_vec()));
    let mut descriptors = Vec::new();
    for (data, media) in layers() {
        let digest = sha256(&data);
        add(&format!("blobs/sha256/{digest}"), &data);
        descriptors.push(serde_json::json!({"mediaType": media, "digest": format!("sha256:{digest}"), "size": data.len()}));
    }
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    add(&format!("blobs/sha256/{}", sha256(config)), config);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": format!("sha256:{}", sha256(config)), "size": config.len()},
        "layers": descriptors,
    }))
    .unwrap();
    add(&format!("blobs/sha256/{}", sha256(&manifest)), &manifest);
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": format!("sha256:{}", sha256(&manifest)), "size": manifest.len(), "platform": {"architecture": "amd64", "os": "linux"}}],
    }))
    .unwrap();
    add("index.json", &index);
    add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
    plain_tar(path, &files);
}

/// A tarball of `files` (name, bytes), as image tarballs hold them.
fn plain_tar(path: &Path, files: &[(String, Vec<u8>)]) {
    let mut outer = tar::Builder::new(std::fs::File::create(path).unwrap());
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_path(name).unwrap();
        h.set_cksum();
        outer.append(&h, &data[..]).unwrap();
    }
    outer.finish().unwrap();
}

#[test]
fn an_oci_tarball_is_applied_layer_by_layer() {
    let dir = scratch("rootfs-oci");
    let tarball = dir.join("image.tar");
    oci_tarball(&tarball);
    let image = dir.join("image.ext4");
    let r = build(&tarball, &image, &[]);
    assert_eq!(r.code(), 0, "{r:?}");
    // Modes and owners, set-id bits included.
    assert_mode(&image, "/etc/secret", "regular", "0600", 1000, 1000);
    assert_mode(&image, "/bin/su", "regular", "04755", 0, 0);
    assert_mode(&image, "/home/user", "directory", "0750", 1000, 1000);
    assert_mode(&image, "/layer3", "regular", "0640", 0, 4);
    // A later layer's file replaces the earlier one; the hard link shares its inode.
    assert!(debugfs(&image, "cat /etc/passwd").contains("user:x:1000"));
    assert!(stat(&image, "/etc/passwd.hard").contains("Links: 2"));
    // Whiteouts: a file removed, an opaque directory that keeps only the upper layer's entry.
    assert!(!exists(&image, "/var/gone"));
    assert!(exists(&image, "/var"));
    assert!(!exists(&image, "/opt/old/a") && !exists(&image, "/opt/old/b"));
    assert_eq!(debugfs(&image, "cat /opt/old/c"), "c\n");
    assert!(!exists(&image, "/var/.wh.gone") && !exists(&image, "/opt/old/.wh..wh..opq"));
    // Symlinks (replaced by the zstd layer), device nodes and FIFOs.
    assert!(debugfs(&image, "stat /bin/sh-link").contains("Fast link dest: \"/bin/other\""));
    let null = debugfs(&image, "stat /dev/mynull");
    assert!(null.contains("Type: character special"), "{null}");
    assert!(null.contains("Device major/minor number: 01:03"), "{null}");
    assert!(stat(&image, "/run-fifo").contains("Type: FIFO"));
    // Extended attributes from the layer's pax headers.
    let xattrs = debugfs(&image, "ea_list /etc/secret");
    assert!(
        xattrs.contains("user.vireo") && xattrs.contains("kept"),
        "{xattrs}"
    );
    agent_is_installed(&image);

    // Without root, owners and device nodes cannot be kept, and the build says so.
    let open = dir.join("unprivileged");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, PermissionsExt::from_mode(0o777)).unwrap();
    let r = finish(
        Command::new("setpriv")
            .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
            .arg(common::vireo_bin())
            .args(["rootfs", "build"])
            .arg(&tarball)
            .arg("-o")
            .arg(open.join("image.ext4"))
            .arg("--agent")
            .arg(musl_agent())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    assert_eq!(r.code(), 0, "{r:?}");
    assert!(
        r.stderr.contains("run as root to keep owners"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr
            .contains("device nodes left out (making them needs root): /dev/mynull"),
        "{}",
        r.stderr
    );

    // A layer whose content does not match its digest is refused.
    let mut bytes = std::fs::read(&tarball).unwrap();
    let at = bytes.windows(10).position(|w| w == b"#!/bin/sh\n").unwrap();
    bytes[at] = b'X';
    std::fs::write(&tarball, &bytes).unwrap();
    let r = build(&tarball, &image, &[]);
    assert!(
        r.stderr.contains("does not match its content"),
        "{}",
        r.stderr
    );
}

#[test]
fn a_docker_save_tarball_is_read() {
    let dir = scratch("rootfs-docker");
    let tarball = dir.join("saved.tar");
    let one = Layer::new().file("hello", 0o644, (0, 0), b"one\n").bytes();
    let two = Layer::new()
        .file(".wh.hello", 0o644, (0, 0), b"")
        .file("world", 0o600, (0, 0), b"two\n")
        .bytes();
    let manifest = br#"[{"Config":"c.json","RepoTags":["t:latest"],"Layers":["aaa/layer.tar","bbb/layer.tar"]}]"#;
    plain_tar(
        &tarball,
        &[
            ("aaa/layer.tar".into(), one),
            ("bbb/layer.tar".into(), two),
            ("manifest.json".into(), manifest.to_vec()),
        ],
    );
    let image = dir.join("saved.ext4");
    let r = build(&tarball, &image, &[]);
    assert_eq!(r.code(), 0, "{r:?}");
    assert!(!exists(&image, "/hello"));
    assert_eq!(debugfs(&image, "cat /world"), "two\n");
    // Not an image at all.
    let junk = dir.join("junk.tar");
    std::fs::write(&junk, b"not a tarball").unwrap();
    let r = build(&junk, &image, &[]);
    assert!(
        r.code() != 0 && r.stderr.contains("junk.tar"),
        "{}",
        r.stderr
    );
}

#[test]
fn run_rootfs_says_what_is_missing_and_when_the_guest_has_no_agent() {
    let dir = scratch("rootfs-run");
    let src = dir.join("root");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("hello"), "hi\n").unwrap();
    let env = |c: &mut Command| {
        c.env("XDG_CACHE_HOME", dir.join("cache"))
            .env("VIREO_KERNEL_DIR", dir.join("no-kernel-here"))
            .env("VIREO_AGENT", musl_agent());
    };
    let mut c = vireo();
    env(&mut c);
    let r = finish(
        c.args(["run", "--rootfs"])
            .arg(&src)
            .args(["--", "true"])
            .spawn()
            .unwrap(),
    );
    assert_ne!(r.code(), 0);
    assert!(r.stderr.contains("scripts/build-kernel.sh"), "{}", r.stderr);
    assert!(r.stderr.contains("no-kernel-here/vmlinux"), "{}", r.stderr);
    // vireo's test guest boots and powers off: it has no agent, which is said.
    let mut c = vireo();
    env(&mut c);
    let r = finish(
        c.args(["run", "--rootfs"])
            .arg(&src)
            .arg("--kernel")
            .arg(common::guest("pvh"))
            .args(["--", "true"])
            .spawn()
            .unwrap(),
    );
    assert_eq!(r.code(), 125, "{r:?}");
    assert!(
        r.stderr.contains("the VM ended before its agent answered"),
        "{}",
        r.stderr
    );
    // The image was built into the cache once, keyed by content; the run's copy is gone.
    let cached: Vec<_> = std::fs::read_dir(dir.join("cache/vireo/rootfs"))
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(cached.len(), 1, "{cached:?}");
    assert!(debugfs(&cached[0].path(), "cat /hello") == "hi\n");
    // The command is required.
    let r = common::run(&["--rootfs", src.to_str().unwrap()]);
    assert_eq!(r.code(), 2, "{r:?}");
}
