//! The guest agent's protocol: how vireo and `vireo-agent` (inside the guest) talk over a
//! stream (vsock in a VM; a Unix socket for tests).
//!
//! Work in progress for issue 12: the framing, the messages and running a command over them
//! are here; the `vireo-agent` binary (PID 1 duties, vsock) and `vireo exec` come next.

pub mod copy;
pub mod exec;
pub mod proto;
