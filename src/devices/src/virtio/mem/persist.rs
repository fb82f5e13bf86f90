//! virtio-mem's snapshot state: which blocks are plugged and the size requested. The layout
//! comes from the configuration and must match.

use super::{BlockState, MemLayout};
use serde::{Deserialize, Serialize};

/// The device as a snapshot holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemState {
    /// The layout the blocks refer to.
    pub layout: MemLayout,
    /// One bit per block, set when plugged.
    pub plugged: Vec<u64>,
    /// Bytes the host asked for.
    pub requested_size: u64,
}

impl From<&BlockState> for MemState {
    fn from(s: &BlockState) -> Self {
        Self {
            layout: s.layout,
            plugged: s.plugged.clone(),
            requested_size: s.requested_size,
        }
    }
}

impl MemState {
    /// Checks the state against the device's layout and takes it.
    pub fn apply(&self, s: &mut BlockState) -> Result<(), String> {
        if self.layout != s.layout {
            return Err(format!(
                "virtio-mem: the snapshot's region {:?} differs from this device's {:?}",
                self.layout, s.layout
            ));
        }
        let blocks = s.layout.blocks();
        if self.plugged.len() != blocks.div_ceil(64) as usize
            || (!blocks.is_multiple_of(64)
                && self.plugged.last().is_some_and(|w| w >> (blocks % 64) != 0))
        {
            return Err("virtio-mem: the snapshot's block map does not fit the region".into());
        }
        let mut fresh = BlockState::new(s.layout);
        fresh.set_requested_size(self.requested_size)?;
        fresh.plugged = self.plugged.clone();
        fresh.plugged_blocks = self.plugged.iter().map(|w| u64::from(w.count_ones())).sum();
        *s = fresh;
        Ok(())
    }
}
