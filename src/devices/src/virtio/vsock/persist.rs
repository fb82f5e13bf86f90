//! virtio-vsock's snapshot state: the guest's CID. Connections do not survive a snapshot: the
//! restored device tells the driver with a TRANSPORT_RESET event, as Firecracker's does.

use super::Vsock;
use serde::{Deserialize, Serialize};

/// The vsock device as a snapshot holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    /// The guest's context ID.
    pub cid: u64,
    /// The Unix socket host programs used.
    pub uds_path: std::path::PathBuf,
}

impl Vsock {
    pub(super) fn state(&self) -> VsockState {
        VsockState {
            cid: self.cid,
            uds_path: self.path.clone(),
        }
    }

    pub(super) fn check_state(&self, state: &VsockState) -> Result<(), String> {
        if state.cid != self.cid {
            return Err(format!(
                "vsock: the guest had CID {}, this device has CID {}",
                state.cid, self.cid
            ));
        }
        Ok(())
    }
}
