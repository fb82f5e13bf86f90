//! virtio-net's snapshot state: the identity the guest saw (MAC, MTU) and the TAP it used. The
//! restored device may sit on another TAP (Firecracker's `network_overrides`); the offloads the
//! driver negotiated are applied to it again when the device restarts.

use super::Net;
use serde::{Deserialize, Serialize};

/// An interface as a snapshot holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    /// The MAC address the guest was given, if any.
    pub mac: Option<[u8; 6]>,
    /// The MTU the guest was given, if any.
    pub mtu: Option<u16>,
    /// The TAP the interface used.
    pub tap: String,
    /// Features offered: a TAP without USO cannot carry a guest that negotiated it.
    pub features: u64,
}

impl Net {
    pub(super) fn state(&self) -> NetState {
        NetState {
            mac: self.config.mac,
            mtu: self.config.mtu,
            tap: self.tap.name().to_string(),
            features: self.features,
        }
    }

    pub(super) fn check_state(&self, state: &NetState) -> Result<(), String> {
        let id = &self.config.id;
        if state.mac != self.config.mac {
            return Err(format!(
                "network interface '{id}': the guest was given MAC {:02x?}, this interface has {:02x?}",
                state.mac, self.config.mac
            ));
        }
        if state.mtu != self.config.mtu {
            return Err(format!(
                "network interface '{id}': the guest was given MTU {:?}, this interface has {:?}",
                state.mtu, self.config.mtu
            ));
        }
        if state.features & !self.features != 0 {
            return Err(format!(
                "network interface '{id}': TAP {} lacks offloads the guest was offered on {} (features {:#x} missing)",
                self.tap.name(),
                state.tap,
                state.features & !self.features
            ));
        }
        Ok(())
    }
}
