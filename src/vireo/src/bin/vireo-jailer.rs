//! `vireo-jailer`: Firecracker's jailer command line in front of the `jailer` crate.

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let e = jailer::run(jailer::Args::parse());
    eprintln!("vireo-jailer: error: {e}");
    ExitCode::from(1)
}
