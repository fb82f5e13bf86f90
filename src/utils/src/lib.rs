//! Small pieces shared by vireo's crates.

pub mod files;
pub mod ratelimit;
pub mod unix_socket;
