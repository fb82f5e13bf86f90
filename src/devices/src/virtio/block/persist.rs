//! virtio-blk's snapshot state: what the guest was told about the disk, checked against the
//! image the restored device opens.

use super::Block;
use serde::{Deserialize, Serialize};

/// A drive as a snapshot holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    /// The image the device used.
    pub path: std::path::PathBuf,
    /// Capacity the guest was given, in 512-byte sectors.
    pub sectors: u64,
    /// Whether the guest was told the drive is read-only.
    pub read_only: bool,
}

impl Block {
    pub(super) fn state(&self) -> BlockState {
        BlockState {
            path: self.config.path.clone(),
            sectors: crate::bus::lock(&self.disk).sectors(),
            read_only: self.config.read_only,
        }
    }

    /// A guest that was told one capacity must not find another under it after a restore: its
    /// file system would read past the end or miss what lies beyond.
    pub(super) fn check_state(&self, state: &BlockState) -> Result<(), String> {
        let now = self.state();
        if now.sectors != state.sectors {
            return Err(format!(
                "drive '{}': image {} has {} sectors, but the guest was given {} sectors from {}",
                self.config.id,
                now.path.display(),
                now.sectors,
                state.sectors,
                state.path.display()
            ));
        }
        if now.read_only != state.read_only {
            return Err(format!(
                "drive '{}': the snapshot's drive was {}, this one is {}",
                self.config.id,
                if state.read_only {
                    "read-only"
                } else {
                    "writable"
                },
                if now.read_only {
                    "read-only"
                } else {
                    "writable"
                }
            ));
        }
        Ok(())
    }
}
