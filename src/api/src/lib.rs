//! vireo's control API: HTTP/1.1 on a Unix socket with Firecracker's paths, bodies and
//! `{"fault_message": ...}` errors. This crate is only the HTTP surface: each request becomes a
//! [`vmm::controller::VmmAction`] sent to the VMM thread, whose answer becomes the response.

pub mod client;
pub mod parse;
mod server;

pub use parse::{parse_request, ROUTES};
pub use server::{
    ApiServer, BindError, ServerOptions, DEFAULT_MAX_PAYLOAD, MAX_CONNECTIONS, SECCOMP,
};
