//! OCI images and `docker save` tarballs: finding the layers, and applying them in order.

use crate::{io, Error, SourceKind};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Component, Path, PathBuf};
use std::rc::Rc;

#[derive(Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Platform {
    architecture: String,
    os: String,
}

#[derive(Deserialize)]
struct Index {
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct Manifest {
    layers: Vec<Descriptor>,
}

/// One entry of `docker save`'s manifest.json.
#[derive(Deserialize)]
struct DockerManifest {
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

fn image_error(src: &Path, reason: impl Into<String>) -> Error {
    Error::Image {
        path: src.display().to_string(),
        reason: reason.into(),
    }
}

/// An image's files: a layout directory, or a tarball read in place (members are found once,
/// then read at their offsets; nothing is unpacked).
enum Image {
    Dir(PathBuf),
    Tarball {
        path: PathBuf,
        /// Member name (without `./`) → offset of its bytes and their length.
        members: HashMap<String, (u64, u64)>,
    },
}

impl Image {
    fn open(src: &Path, kind: SourceKind) -> Result<Self, Error> {
        if kind == SourceKind::OciLayout {
            return Ok(Self::Dir(src.to_path_buf()));
        }
        let mut f = File::open(src).map_err(io(src))?;
        let mut magic = [0u8; 4];
        let n = f.read(&mut magic).map_err(io(src))?;
        if magic[..n].starts_with(&[0x1f, 0x8b]) || magic[..n] == [0x28, 0xb5, 0x2f, 0xfd] {
            return Err(image_error(
                src,
                "the tarball is compressed; decompress it first (gunzip, zstd -d): its members are read in place",
            ));
        }
        f.rewind().map_err(io(src))?;
        let mut archive = tar::Archive::new(BufReader::new(f));
        let mut members = HashMap::new();
        let bad = |e: std::io::Error| {
            image_error(
                src,
                format!("not an image tarball (OCI or docker save): {e}"),
            )
        };
        for entry in archive.entries().map_err(bad)? {
            let entry = entry.map_err(bad)?;
            if !entry.header().entry_type().is_file() {
                continue;
            }
            let name = entry.path().map_err(bad)?.to_string_lossy().into_owned();
            let name = name.trim_start_matches("./").to_string();
            members.insert(name, (entry.raw_file_position(), entry.size()));
        }
        if members.is_empty() {
            return Err(image_error(
                src,
                "not an image tarball (OCI or docker save): no files in it",
            ));
        }
        Ok(Self::Tarball {
            path: src.to_path_buf(),
            members,
        })
    }

    fn has(&self, name: &str) -> bool {
        match self {
            Self::Dir(d) => d.join(name).is_file(),
            Self::Tarball { members, .. } => members.contains_key(name),
        }
    }

    /// The member `name` (a relative path of normal components).
    fn reader(&self, src: &Path, name: &str) -> Result<Box<dyn Read>, Error> {
        if Path::new(name)
            .components()
            .any(|c| !matches!(c, Component::Normal(_)))
        {
            return Err(image_error(src, format!("path {name:?} leaves the image")));
        }
        match self {
            Self::Dir(d) => {
                let p = d.join(name);
                Ok(Box::new(File::open(&p).map_err(io(&p))?))
            }
            Self::Tarball { path, members } => {
                let &(offset, len) = members
                    .get(name)
                    .ok_or_else(|| image_error(src, format!("{name} is missing from it")))?;
                let mut f = File::open(path).map_err(io(path))?;
                f.seek(SeekFrom::Start(offset)).map_err(io(path))?;
                Ok(Box::new(f.take(len)))
            }
        }
    }

    fn json<T: for<'a> Deserialize<'a>>(&self, src: &Path, name: &str) -> Result<T, Error> {
        let mut text = Vec::new();
        self.reader(src, name)?
            .take(16 << 20)
            .read_to_end(&mut text)
            .map_err(io(src))?;
        serde_json::from_slice(&text).map_err(|e| image_error(src, format!("{name}: {e}")))
    }

    /// `blobs/ALG/HEX` for `ALG:HEX`.
    fn blob_name(src: &Path, digest: &str) -> Result<String, Error> {
        let (alg, hex) = digest
            .split_once(':')
            .filter(|(a, h)| {
                !a.is_empty()
                    && a.bytes().all(|b| b.is_ascii_alphanumeric())
                    && !h.is_empty()
                    && h.bytes().all(|b| b.is_ascii_hexdigit())
            })
            .ok_or_else(|| image_error(src, format!("bad digest {digest:?}")))?;
        Ok(format!("blobs/{alg}/{hex}"))
    }

    /// The blob `digest` read whole and checked (indexes and manifests: small).
    fn checked_blob(&self, src: &Path, digest: &str) -> Result<String, Error> {
        let name = Self::blob_name(src, digest)?;
        let mut r = Digested::new(self.reader(src, &name)?, digest);
        std::io::copy(&mut r, &mut std::io::sink()).map_err(io(src))?;
        r.check(src)?;
        Ok(name)
    }

    /// The image's layers, in order (OCI index and manifest, or docker save's manifest.json).
    /// Each with the digest to check it against while it is applied, if the image gives one.
    fn layers(&self, src: &Path) -> Result<Vec<(String, Option<String>)>, Error> {
        if self.has("index.json") {
            let mut index: Index = self.json(src, "index.json")?;
            // An index may point at further indexes (multi-platform images): take linux/amd64.
            for _ in 0..4 {
                let pick = index
                    .manifests
                    .iter()
                    .find(|m| {
                        m.platform
                            .as_ref()
                            .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
                    })
                    .or_else(|| index.manifests.iter().find(|m| m.platform.is_none()))
                    .or(index.manifests.first())
                    .ok_or_else(|| image_error(src, "index.json lists no manifests"))?;
                let name = self.checked_blob(src, &pick.digest)?;
                if pick.media_type.contains("index") || pick.media_type.contains("manifest.list") {
                    index = self.json(src, &name)?;
                    continue;
                }
                let manifest: Manifest = self.json(src, &name)?;
                return manifest
                    .layers
                    .iter()
                    .map(|l| Ok((Self::blob_name(src, &l.digest)?, Some(l.digest.clone()))))
                    .collect();
            }
            Err(image_error(src, "indexes nested too deep"))
        } else if self.has("manifest.json") {
            let manifests: Vec<DockerManifest> = self.json(src, "manifest.json")?;
            let first = manifests
                .first()
                .ok_or_else(|| image_error(src, "manifest.json lists no images"))?;
            Ok(first
                .layers
                .iter()
                .map(|l| (l.trim_start_matches("./").to_string(), None))
                .collect())
        } else {
            Err(image_error(
                src,
                "neither index.json (OCI) nor manifest.json (docker save) is in it",
            ))
        }
    }
}

/// A reader that hashes what passes through it, to check a blob against its digest.
struct Digested {
    inner: Box<dyn Read>,
    hash: Sha256,
    /// `sha256:HEX` to check; other algorithms (and none) are not checked.
    digest: String,
}

impl Digested {
    fn new(inner: Box<dyn Read>, digest: &str) -> Self {
        Self {
            inner,
            hash: Sha256::new(),
            digest: digest.to_string(),
        }
    }

    /// Compares what was read (all of the blob) with the digest.
    fn check(&mut self, src: &Path) -> Result<(), Error> {
        let Some(want) = self.digest.strip_prefix("sha256:") else {
            return Ok(());
        };
        let got: String = std::mem::take(&mut self.hash)
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        if got != want {
            return Err(image_error(
                src,
                format!(
                    "blob {} does not match its content (sha256:{got})",
                    self.digest
                ),
            ));
        }
        Ok(())
    }
}

impl Read for Digested {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

/// One [`Digested`] read by the decompressor, then drained and checked by its owner.
struct Shared(Rc<RefCell<Digested>>);

impl Read for Shared {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.borrow_mut().read(buf)
    }
}

/// A layer, decompressed as its first bytes say (gzip, zstd, or plain tar).
fn decompress(src: &Path, name: &str, r: Box<dyn Read>) -> Result<Box<dyn Read>, Error> {
    let mut f = BufReader::with_capacity(1 << 16, r);
    let magic = {
        use std::io::BufRead;
        f.fill_buf().map_err(io(src))?.get(..4).map(<[u8]>::to_vec)
    };
    Ok(match magic.as_deref() {
        Some([0x1f, 0x8b, ..]) => Box::new(flate2::read::MultiGzDecoder::new(f)),
        Some([0x28, 0xb5, 0x2f, 0xfd]) => Box::new(
            ruzstd::decoding::StreamingDecoder::new(f)
                .map_err(|e| image_error(src, format!("layer {name}: zstd: {e}")))?,
        ),
        _ => Box::new(f),
    })
}

/// Unpacks the image `src` into `staging/rootfs`; returns what could not be kept.
pub fn unpack(src: &Path, kind: SourceKind, staging: &Path) -> Result<Vec<String>, Error> {
    let image = Image::open(src, kind)?;
    let root = staging.join("rootfs");
    std::fs::create_dir_all(&root).map_err(io(&root))?;
    let mut apply = Apply::new(&root);
    for (layer, digest) in image.layers(src)? {
        // The digest is checked on the bytes as they are applied (one read of each layer);
        // a mismatch fails the build, and the staging directory goes with it.
        let digested = Rc::new(RefCell::new(Digested::new(
            image.reader(src, &layer)?,
            digest.as_deref().unwrap_or(""),
        )));
        let reader = decompress(src, &layer, Box::new(Shared(digested.clone())))?;
        apply.layer(reader).map_err(|e| match e {
            Error::Io { path, source } if path.is_empty() => {
                image_error(src, format!("layer {layer}: {source}"))
            }
            e => e,
        })?;
        let mut d = digested.borrow_mut();
        std::io::copy(&mut *d, &mut std::io::sink()).map_err(io(src))?;
        d.check(src)?;
    }
    Ok(apply.warnings())
}

/// Applies layers one after another onto `root`.
struct Apply {
    root: PathBuf,
    root_canon: PathBuf,
    /// Owners not set and device nodes not made, counted (needs root).
    owners_lost: u64,
    nodes_lost: Vec<String>,
    xattrs_lost: u64,
}

fn layer_io(e: std::io::Error) -> Error {
    Error::Io {
        path: String::new(),
        source: e,
    }
}

impl Apply {
    fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
            root_canon: root.canonicalize().unwrap_or_else(|_| root.to_path_buf()),
            owners_lost: 0,
            nodes_lost: Vec::new(),
            xattrs_lost: 0,
        }
    }

    fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        if self.owners_lost > 0 {
            w.push(format!(
                "{} files keep the builder's owner instead of the image's: run as root to keep owners",
                self.owners_lost
            ));
        }
        if !self.nodes_lost.is_empty() {
            w.push(format!(
                "device nodes left out (making them needs root): {}",
                self.nodes_lost.join(", ")
            ));
        }
        if self.xattrs_lost > 0 {
            w.push(format!(
                "{} files lost extended attributes this user may not set",
                self.xattrs_lost
            ));
        }
        w
    }

    /// The staging path for `rel`, if its parent resolves inside the root (a layer's symlink
    /// must not lead a whiteout or a device node outside).
    fn inside(&self, rel: &Path) -> Option<PathBuf> {
        Some(self.dir_inside(rel.parent()?)?.join(rel.file_name()?))
    }

    /// The staging directory `rel`, if it resolves inside the root.
    fn dir_inside(&self, rel: &Path) -> Option<PathBuf> {
        let canon = self.root.join(rel).canonicalize().ok()?;
        canon.starts_with(&self.root_canon).then_some(canon)
    }

    /// Creates the directories above `rel` that no layer has made yet (tar files need not
    /// list them), each only where its parent resolves inside the root.
    fn make_parents(&self, rel: &Path) {
        let mut at = PathBuf::new();
        for c in rel.parent().into_iter().flat_map(Path::components) {
            let next = at.join(c);
            if std::fs::symlink_metadata(self.root.join(&next)).is_err() {
                match self.dir_inside(&at) {
                    Some(parent) => {
                        let _ = std::fs::create_dir(parent.join(c));
                    }
                    None => return,
                }
            }
            at = next;
        }
    }

    fn remove(path: &Path) {
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.is_dir() => {
                let _ = std::fs::remove_dir_all(path);
            }
            Ok(_) => {
                let _ = std::fs::remove_file(path);
            }
            Err(_) => {}
        }
    }

    fn layer(&mut self, reader: Box<dyn Read>) -> Result<(), Error> {
        let mut archive = tar::Archive::new(reader);
        // Paths this layer wrote: an opaque marker hides what lower layers put in its
        // directory, not what this one did.
        let mut mine: HashSet<PathBuf> = HashSet::new();
        for entry in archive.entries().map_err(layer_io)? {
            let mut entry = entry.map_err(layer_io)?;
            let raw = entry.path().map_err(layer_io)?.into_owned();
            // Relative, normal components only.
            let rel: PathBuf = raw
                .components()
                .filter(|c| !matches!(c, Component::CurDir | Component::RootDir))
                .collect();
            if rel.as_os_str().is_empty()
                || rel.components().any(|c| !matches!(c, Component::Normal(_)))
            {
                continue;
            }
            let name = rel
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if name == ".wh..wh..opq" {
                let dir = rel.parent().unwrap_or(Path::new(""));
                if let Some(d) = self.dir_inside(dir) {
                    if let Ok(children) = std::fs::read_dir(&d) {
                        for c in children.flatten() {
                            if !mine.contains(&dir.join(c.file_name())) {
                                Self::remove(&c.path());
                            }
                        }
                    }
                }
                continue;
            }
            if let Some(hidden) = name.strip_prefix(".wh.") {
                if let Some(p) = self.inside(&rel.with_file_name(hidden)) {
                    Self::remove(&p);
                }
                continue;
            }
            self.make_parents(&rel);
            let Some(target) = self.inside(&rel) else {
                continue;
            };
            let kind = entry.header().entry_type();
            // What a lower layer had here goes, unless both are directories (merged).
            if let Ok(m) = std::fs::symlink_metadata(&target) {
                if !(kind.is_dir() && m.is_dir()) {
                    Self::remove(&target);
                }
            }
            mine.insert(rel.clone());
            let header = entry.header();
            let (uid, gid) = (header.uid().unwrap_or(0), header.gid().unwrap_or(0));
            let mode = header.mode().unwrap_or(0o644);
            if kind.is_character_special() || kind.is_block_special() || kind.is_fifo() {
                self.node(&entry, &rel, &target, kind, mode)?;
            } else {
                entry.set_preserve_permissions(true);
                entry.set_preserve_mtime(true);
                entry.set_unpack_xattrs(true);
                if entry.unpack_in(&self.root).is_err() {
                    // Usually an extended attribute this user may not set: again without.
                    entry.set_unpack_xattrs(false);
                    entry.unpack_in(&self.root).map_err(layer_io)?;
                    self.xattrs_lost += 1;
                }
            }
            if kind.is_pax_global_extensions() || kind.is_pax_local_extensions() {
                continue;
            }
            self.own(&target, uid as u32, gid as u32, mode, kind.is_symlink());
        }
        Ok(())
    }

    fn node(
        &mut self,
        entry: &tar::Entry<'_, Box<dyn Read>>,
        rel: &Path,
        target: &Path,
        kind: tar::EntryType,
        mode: u32,
    ) -> Result<(), Error> {
        use nix::sys::stat::{makedev, mknod, Mode, SFlag};
        let h = entry.header();
        let dev = makedev(
            h.device_major().ok().flatten().unwrap_or(0) as u64,
            h.device_minor().ok().flatten().unwrap_or(0) as u64,
        );
        let flag = if kind.is_fifo() {
            SFlag::S_IFIFO
        } else if kind.is_block_special() {
            SFlag::S_IFBLK
        } else {
            SFlag::S_IFCHR
        };
        if let Err(e) = mknod(target, flag, Mode::from_bits_truncate(mode), dev) {
            if e == nix::errno::Errno::EPERM {
                self.nodes_lost.push(format!("/{}", rel.display()));
                return Ok(());
            }
            return Err(layer_io(e.into()));
        }
        Ok(())
    }

    /// Gives `target` the layer's owner (then its mode again: chown clears set-id bits).
    fn own(&mut self, target: &Path, uid: u32, gid: u32, mode: u32, symlink: bool) {
        if !target.exists() && !symlink {
            return;
        }
        if std::os::unix::fs::lchown(target, Some(uid), Some(gid)).is_err() {
            self.owners_lost += 1;
            return;
        }
        if !symlink {
            use std::os::unix::fs::PermissionsExt;
            let _ =
                std::fs::set_permissions(target, std::fs::Permissions::from_mode(mode & 0o7777));
        }
    }
}
