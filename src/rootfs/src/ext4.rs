//! Making the ext4 image with e2fsprogs, and putting the agent into it.

use crate::{io, Error};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

/// Where the agent is installed in every image (`init=` for the kernel).
pub const AGENT_PATH: &str = "/usr/sbin/vireo-agent";

/// Bytes (in 4 KiB blocks) and inodes a tree takes.
#[derive(Default)]
pub(crate) struct Usage {
    pub(crate) bytes: u64,
    pub(crate) inodes: u64,
}

pub(crate) fn usage(dir: &Path, u: &mut Usage) -> Result<(), Error> {
    for e in std::fs::read_dir(dir).map_err(io(dir))? {
        let e = e.map_err(io(dir))?;
        let path = e.path();
        let m = std::fs::symlink_metadata(&path).map_err(io(&path))?;
        u.inodes += 1;
        // Blocks the content takes (4 KiB each), and a block per directory.
        u.bytes += m.len().div_ceil(4096) * 4096;
        if m.is_dir() {
            u.bytes += 4096;
            usage(&path, u)?;
        }
    }
    Ok(())
}

const MIB: u64 = 1 << 20;

/// Makes `out` from the tree `root` (which came from `src`); returns its size in MiB.
pub fn make(
    root: &Path,
    src: &Path,
    out: &Path,
    size_mib: Option<u64>,
    agent_bytes: u64,
) -> Result<u64, Error> {
    let mut u = Usage::default();
    usage(root, &mut u)?;
    u.bytes += agent_bytes.div_ceil(4096) * 4096 + 3 * 4096;
    u.inodes += 3;
    // ext4's own share: a 256-byte inode per file (and spare ones), block-group metadata
    // (about 1/32 of the blocks), and a journal (4 MiB at these sizes).
    let inodes = u.inodes + u.inodes / 4 + 256;
    let needed = u.bytes + u.bytes / 32 + inodes * 256 + 4 * MIB;
    let needed_mib = needed.div_ceil(MIB);
    let size = match size_mib {
        Some(given) if given < needed_mib => {
            return Err(Error::TooSmall {
                src: src.display().to_string(),
                needed_mib,
                given_mib: given,
            })
        }
        Some(given) => given,
        // Headroom: a quarter more, and at least 16 MiB free.
        None => (needed_mib + (needed_mib / 4).max(16)).max(32),
    };
    let _ = std::fs::remove_file(out);
    // 4 KiB blocks whatever the size: mke2fs's "small" type would pick 1 KiB blocks for
    // images under 512 MiB, slower to write and for the guest to read.
    let result = Command::new("mkfs.ext4")
        .args([
            "-q", "-F", "-m", "0", "-b", "4096", "-I", "256", "-L", "rootfs", "-N",
        ])
        .arg(inodes.to_string())
        .arg("-d")
        .arg(root)
        .arg(out)
        .arg(format!("{size}M"))
        .output()
        .map_err(|e| Error::Tool {
            tool: "mkfs.ext4",
            reason: format!("{e} (install e2fsprogs)"),
        })?;
    if !result.status.success() {
        let _ = std::fs::remove_file(out);
        let why = String::from_utf8_lossy(&result.stderr).trim().to_string();
        if why.contains("Could not allocate") || why.contains("No space left") {
            return Err(Error::TooSmall {
                src: src.display().to_string(),
                needed_mib: needed_mib.max(size + 1),
                given_mib: size,
            });
        }
        return Err(Error::Tool {
            tool: "mkfs.ext4",
            reason: format!(
                "populating {} from {}: {why}",
                out.display(),
                root.display()
            ),
        });
    }
    Ok(size)
}

/// Writes `agent` into the image at [`AGENT_PATH`], owned by root, mode 0755.
pub fn install_agent(image: &Path, agent: &Path) -> Result<(), Error> {
    let target = AGENT_PATH.trim_start_matches('/');
    // debugfs goes on after a failed command (mkdir of an existing directory, rm of a missing
    // file), so the result is checked on its own afterwards.
    let script = format!(
        "mkdir usr\nmkdir usr/sbin\nrm {target}\nwrite {} {target}\nsif {target} mode 0100755\nsif {target} uid 0\nsif {target} gid 0\n",
        agent.display()
    );
    let run = |args: &[&str]| {
        Command::new("debugfs")
            .args(args)
            .arg(image)
            .output()
            .map_err(|e| Error::Tool {
                tool: "debugfs",
                reason: format!("{e} (install e2fsprogs)"),
            })
    };
    let commands = image.with_extension("debugfs");
    std::fs::write(&commands, script).map_err(io(&commands))?;
    let out = run(&["-w", "-f", &commands.to_string_lossy()]);
    let _ = std::fs::remove_file(&commands);
    out?;
    let stat = run(&["-R", &format!("stat {target}")])?;
    let text = String::from_utf8_lossy(&stat.stdout);
    let size = std::fs::metadata(agent).map_err(io(agent))?.size();
    if !text.contains(&format!("Size: {size}")) {
        return Err(Error::Tool {
            tool: "debugfs",
            reason: format!(
                "the agent did not land at {AGENT_PATH} in {} (is /usr or /usr/sbin not a directory in the image?)",
                image.display()
            ),
        });
    }
    Ok(())
}
