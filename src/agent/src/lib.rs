//! vireo's guest agent: the protocol vireo and `vireo-agent` (inside the guest) speak over a
//! stream (vsock in a VM; a Unix socket for tests), the agent's side of it (commands, files,
//! terminals, its duties as the guest's init) and the host's side (`exec::run`, `copy`).

pub mod children;
pub mod copy;
pub mod exec;
pub mod init;
pub mod net;
pub mod proto;
pub mod tty;
