//! The i8042's snapshot state: its registers, the bytes waiting for the guest and the command
//! awaiting its argument.

use super::{Pending, BUFFER_LIMIT, I8042};
use serde::{Deserialize, Serialize};

/// The controller as a snapshot holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {
    buf: Vec<u8>,
    ctr: u8,
    status: u8,
    pending: Pending,
}

impl I8042 {
    /// The controller's state.
    pub fn save(&self) -> I8042State {
        I8042State {
            buf: self.buf.iter().copied().collect(),
            ctr: self.ctr,
            status: self.status,
            pending: self.pending,
        }
    }

    /// Takes `state` into a controller that has not been used yet.
    pub fn restore(&mut self, state: &I8042State) -> Result<(), String> {
        if state.buf.len() > BUFFER_LIMIT {
            return Err(format!(
                "i8042: the snapshot holds {} waiting bytes, more than the controller's {BUFFER_LIMIT}",
                state.buf.len()
            ));
        }
        self.buf = state.buf.iter().copied().collect();
        self.ctr = state.ctr;
        self.status = state.status;
        self.pending = state.pending;
        Ok(())
    }
}
