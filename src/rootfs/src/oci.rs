//! OCI images and `docker save` tarballs: finding the layers, and applying them in order.

use crate::{io, Error, SourceKind};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Component, Path, PathBuf};

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

fn read_json<T: for<'a> Deserialize<'a>>(src: &Path, path: &Path) -> Result<T, Error> {
    let text = std::fs::read(path).map_err(io(path))?;
    serde_json::from_slice(&text).map_err(|e| {
        image_error(
            src,
            format!("{}: {e}", path.strip_prefix(src).unwrap_or(path).display()),
        )
    })
}

/// `blobs/ALG/HEX` for `ALG:HEX`, refusing anything that could leave the layout.
fn blob(layout: &Path, src: &Path, digest: &str) -> Result<PathBuf, Error> {
    let (alg, hex) = digest
        .split_once(':')
        .filter(|(a, h)| {
            !a.is_empty()
                && a.bytes().all(|b| b.is_ascii_alphanumeric())
                && !h.is_empty()
                && h.bytes().all(|b| b.is_ascii_hexdigit())
        })
        .ok_or_else(|| image_error(src, format!("bad digest {digest:?}")))?;
    Ok(layout.join("blobs").join(alg).join(hex))
}

/// The layers of the image at `layout` (an OCI layout or an unpacked `docker save`), in order,
/// each checked against its digest when it has one.
fn layers(layout: &Path, src: &Path) -> Result<Vec<PathBuf>, Error> {
    if layout.join("index.json").is_file() {
        let mut index: Index = read_json(src, &layout.join("index.json"))?;
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
            let path = blob(layout, src, &pick.digest)?;
            verify(src, &path, &pick.digest)?;
            if pick.media_type.contains("index") || pick.media_type.contains("manifest.list") {
                index = read_json(src, &path)?;
                continue;
            }
            let manifest: Manifest = read_json(src, &path)?;
            return manifest
                .layers
                .iter()
                .map(|l| {
                    let p = blob(layout, src, &l.digest)?;
                    verify(src, &p, &l.digest)?;
                    Ok(p)
                })
                .collect();
        }
        Err(image_error(src, "indexes nested too deep"))
    } else if layout.join("manifest.json").is_file() {
        let manifests: Vec<DockerManifest> = read_json(src, &layout.join("manifest.json"))?;
        let first = manifests
            .first()
            .ok_or_else(|| image_error(src, "manifest.json lists no images"))?;
        first
            .layers
            .iter()
            .map(|l| {
                let rel = Path::new(l);
                if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
                    return Err(image_error(
                        src,
                        format!("layer path {l:?} leaves the image"),
                    ));
                }
                Ok(layout.join(rel))
            })
            .collect()
    } else {
        Err(image_error(
            src,
            "neither index.json (OCI) nor manifest.json (docker save) is in it",
        ))
    }
}

fn verify(src: &Path, path: &Path, digest: &str) -> Result<(), Error> {
    let Some(want) = digest.strip_prefix("sha256:") else {
        return Ok(());
    };
    let mut h = Sha256::new();
    let mut f = File::open(path).map_err(io(path))?;
    std::io::copy(&mut f, &mut h).map_err(io(path))?;
    let got: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    if got != want {
        return Err(image_error(
            src,
            format!("blob {digest} does not match its content (sha256:{got})"),
        ));
    }
    Ok(())
}

/// A layer, decompressed as its first bytes say (gzip, zstd, or plain tar).
fn open_layer(path: &Path) -> Result<Box<dyn Read>, Error> {
    let mut f = BufReader::new(File::open(path).map_err(io(path))?);
    let magic = {
        use std::io::BufRead;
        f.fill_buf().map_err(io(path))?.get(..4).map(<[u8]>::to_vec)
    };
    Ok(match magic.as_deref() {
        Some([0x1f, 0x8b, ..]) => Box::new(flate2::read::MultiGzDecoder::new(f)),
        Some([0x28, 0xb5, 0x2f, 0xfd]) => Box::new(
            ruzstd::decoding::StreamingDecoder::new(f).map_err(|e| Error::Image {
                path: path.display().to_string(),
                reason: format!("zstd: {e}"),
            })?,
        ),
        _ => Box::new(f),
    })
}

/// Unpacks the image `src` into `staging/rootfs`; returns what could not be kept.
pub fn unpack(src: &Path, kind: SourceKind, staging: &Path) -> Result<Vec<String>, Error> {
    let layout = match kind {
        SourceKind::OciLayout => src.to_path_buf(),
        _ => {
            let dir = staging.join("image");
            std::fs::create_dir_all(&dir).map_err(io(&dir))?;
            // The outer tarball may itself be compressed.
            let mut outer = tar::Archive::new(open_layer(src)?);
            outer.unpack(&dir).map_err(|e| {
                image_error(
                    src,
                    format!("not an image tarball (OCI or docker save): {e}"),
                )
            })?;
            dir
        }
    };
    let root = staging.join("rootfs");
    std::fs::create_dir_all(&root).map_err(io(&root))?;
    let mut apply = Apply::new(&root);
    for layer in layers(&layout, src)? {
        apply.layer(&layer).map_err(|e| match e {
            Error::Io { path, source } if path.is_empty() => image_error(
                src,
                format!(
                    "layer {}: {source}",
                    layer.strip_prefix(&layout).unwrap_or(&layer).display()
                ),
            ),
            e => e,
        })?;
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

    fn layer(&mut self, path: &Path) -> Result<(), Error> {
        let mut archive = tar::Archive::new(open_layer(path)?);
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
