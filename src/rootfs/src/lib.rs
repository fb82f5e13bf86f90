//! Root file systems for vireo guests: an ext4 image made by `mkfs.ext4 -d` (e2fsprogs, no loop
//! mounts) from a directory or an OCI image, with the guest agent installed.
//!
//! An OCI image is an image layout directory (`oci-layout`, `index.json`, `blobs/`) or a tarball
//! of one, or a `docker save` tarball (`manifest.json`). Its layers are applied in order into a
//! staging directory (whiteouts and opaque directories honoured), which `mkfs.ext4` then reads.

mod ext4;
mod oci;

pub use ext4::AGENT_PATH;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Why an image could not be built.
#[derive(Debug, Error)]
pub enum Error {
    /// A file or directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// What failed.
        source: std::io::Error,
    },
    /// The source is neither a directory nor an image vireo reads.
    #[error("{0}")]
    Source(String),
    /// The image is malformed.
    #[error("image {path}: {reason}")]
    Image {
        /// The image.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The source does not fit in the size asked for.
    #[error("{src} needs about {needed_mib} MiB, more than the {given_mib} MiB given with --size")]
    TooSmall {
        /// The source.
        src: String,
        /// What it needs, with the file system's own overhead.
        needed_mib: u64,
        /// What was asked for.
        given_mib: u64,
    },
    /// An e2fsprogs tool failed.
    #[error("{tool}: {reason}")]
    Tool {
        /// mkfs.ext4 or debugfs.
        tool: &'static str,
        /// Its complaint.
        reason: String,
    },
}

pub(crate) fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.display().to_string(),
        source,
    }
}

/// How to build.
#[derive(Clone, Debug)]
pub struct Options {
    /// The image's size in MiB; by default the smallest that fits plus headroom.
    pub size_mib: Option<u64>,
    /// The `vireo-agent` binary installed at [`AGENT_PATH`] (a static build).
    pub agent: PathBuf,
}

/// What was built.
#[derive(Debug)]
pub struct Built {
    /// The image's size.
    pub size_mib: u64,
    /// What the source was.
    pub kind: SourceKind,
    /// What could not be kept (owners and device nodes without root, say).
    pub warnings: Vec<String>,
}

/// The kinds of source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceKind {
    /// A directory used as the root.
    Directory,
    /// An OCI image layout directory.
    OciLayout,
    /// A tarball of an OCI layout or from `docker save`.
    ImageTarball,
}

/// Says what `src` is, by looking at it.
pub fn source_kind(src: &Path) -> Result<SourceKind, Error> {
    let meta = std::fs::metadata(src).map_err(io(src))?;
    if meta.is_dir() {
        if src.join("oci-layout").is_file() && src.join("index.json").is_file() {
            Ok(SourceKind::OciLayout)
        } else {
            Ok(SourceKind::Directory)
        }
    } else if meta.is_file() {
        Ok(SourceKind::ImageTarball)
    } else {
        Err(Error::Source(format!(
            "{}: not a directory, an OCI image layout or an image tarball",
            src.display()
        )))
    }
}

/// Builds the ext4 image `out` from `src`.
pub fn build(src: &Path, out: &Path, options: &Options) -> Result<Built, Error> {
    let kind = source_kind(src)?;
    let agent_meta = std::fs::metadata(&options.agent).map_err(|e| {
        Error::Source(format!(
            "the guest agent {}: {e} (build it with `cargo build --release -p agent --target x86_64-unknown-linux-musl`)",
            options.agent.display()
        ))
    })?;
    let mut warnings = Vec::new();
    let staging;
    let root = match kind {
        SourceKind::Directory => src.to_path_buf(),
        SourceKind::OciLayout | SourceKind::ImageTarball => {
            let (st, w) = unpack_staged(src, kind, out)?;
            staging = st;
            warnings = w;
            staging.0.join("rootfs")
        }
    };
    let size_mib = ext4::make(&root, src, out, options.size_mib, agent_meta.len())?;
    ext4::install_agent(out, &options.agent)?;
    Ok(Built {
        size_mib,
        kind,
        warnings,
    })
}

/// Unpacks an image's layers into a staging directory: in memory (/dev/shm) when four times
/// the image's size fits in half of what is free there, since creating and deleting the tree
/// on a disk file system costs more than the rest of the build; else, or if memory runs out
/// part way, beside the output.
fn unpack_staged(
    src: &Path,
    kind: SourceKind,
    out: &Path,
) -> Result<(Staging, Vec<String>), Error> {
    let shm = Path::new("/dev/shm");
    let image_bytes = tree_bytes(src);
    let fits = nix::sys::statvfs::statvfs(shm)
        .map(|v| image_bytes.saturating_mul(4) < v.blocks_available() * v.fragment_size() / 2)
        .unwrap_or(false);
    if fits {
        let staging = Staging::new(&shm.join(out.file_name().unwrap_or_default()))?;
        match oci::unpack(src, kind, &staging.0) {
            Err(Error::Io { source, .. }) if source.raw_os_error() == Some(nix::libc::ENOSPC) => {}
            Err(e) if e.to_string().contains("No space left") => {}
            r => return r.map(|w| (staging, w)),
        }
    }
    let staging = Staging::new(out)?;
    let warnings = oci::unpack(src, kind, &staging.0)?;
    Ok((staging, warnings))
}

/// Bytes of an image: its tarball, or the blocks of its layout directory.
fn tree_bytes(path: &Path) -> u64 {
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => {
            let mut u = ext4::Usage::default();
            ext4::usage(path, &mut u).map(|_| u.bytes).unwrap_or(0)
        }
        Ok(m) => m.len(),
        Err(_) => 0,
    }
}

/// A scratch directory named after the output, beside it, removed when dropped.
pub(crate) struct Staging(pub PathBuf);

impl Staging {
    pub(crate) fn new(near: &Path) -> Result<Self, Error> {
        let dir = near.with_file_name(format!(
            ".{}.vireo-staging-{}",
            near.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        Ok(Self(dir))
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A key for the image `build(src, …, options)` makes: a SHA-256 over the source's content
/// (every file's path, type, mode, owner, size and bytes, or the image's bytes), the agent's
/// bytes and the size asked for.
pub fn cache_key(src: &Path, options: &Options) -> Result<String, Error> {
    let mut h = Sha256::new();
    h.update(b"vireo-rootfs-1\0");
    h.update(format!("{:?}\0", options.size_mib));
    hash_file(&mut h, &options.agent)?;
    match source_kind(src)? {
        SourceKind::ImageTarball => hash_file(&mut h, src)?,
        SourceKind::Directory | SourceKind::OciLayout => hash_tree(&mut h, src, Path::new(""))?,
    }
    Ok(h.finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>())
}

fn hash_file(h: &mut Sha256, path: &Path) -> Result<(), Error> {
    let mut f = std::fs::File::open(path).map_err(io(path))?;
    std::io::copy(&mut f, h).map_err(io(path))?;
    Ok(())
}

fn hash_tree(h: &mut Sha256, dir: &Path, rel: &Path) -> Result<(), Error> {
    use std::os::unix::fs::MetadataExt;
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .collect::<Result<_, _>>()
        .map_err(io(dir))?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        let m = std::fs::symlink_metadata(&path).map_err(io(&path))?;
        let name = rel.join(e.file_name());
        h.update(format!(
            "{}\0{:o}\0{}\0{}\0{}\0{}\0",
            name.display(),
            m.mode(),
            m.uid(),
            m.gid(),
            m.len(),
            m.rdev()
        ));
        if m.is_dir() {
            hash_tree(h, &path, &name)?;
        } else if m.file_type().is_symlink() {
            let to = std::fs::read_link(&path).map_err(io(&path))?;
            h.update(to.as_os_str().as_encoded_bytes());
        } else if m.is_file() {
            hash_file(h, &path)?;
        }
    }
    Ok(())
}

/// Returns the cached image for `src` under `cache_dir`, building it first if needed (then
/// with what the build reported).
pub fn cached(
    src: &Path,
    cache_dir: &Path,
    options: &Options,
) -> Result<(PathBuf, Option<Built>), Error> {
    let key = cache_key(src, options)?;
    let image = cache_dir.join(format!("{key}.ext4"));
    if image.is_file() {
        return Ok((image, None));
    }
    std::fs::create_dir_all(cache_dir).map_err(io(cache_dir))?;
    // Built beside and renamed, so a half-built image is never found.
    let tmp = cache_dir.join(format!(".{key}.{}.ext4", std::process::id()));
    let r = build(src, &tmp, options).and_then(|built| {
        std::fs::rename(&tmp, &image)
            .map_err(io(&image))
            .map(|_| built)
    });
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r.map(|built| (image, Some(built)))
}

/// Whether the program at `path` is statically linked (so it runs in an image without a C
/// library), as the C library's `ldd` reports it.
pub fn is_static(path: &Path) -> Result<bool, Error> {
    let out = std::process::Command::new("ldd")
        .arg(path)
        .output()
        .map_err(|e| Error::Tool {
            tool: "ldd",
            reason: e.to_string(),
        })?;
    let text = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    Ok(text.contains("statically linked") || text.contains("not a dynamic executable"))
}
