//! The guest agent's protocol: how vireo and `vireo-agent` (inside the guest) talk over a
//! stream (vsock in a VM; a Unix socket for tests).
//!
//! Work in progress for issue 12: the framing and messages are here; the agent and the host
//! commands that use them come next.

pub mod proto;
