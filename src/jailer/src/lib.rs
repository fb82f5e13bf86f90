//! `vireo-jailer`: starts a VMM confined the way Firecracker's jailer starts Firecracker, with
//! the same flags and jail layout, so tools written for that jailer drive this one unchanged.
//!
//! In order: inherited descriptors closed; the jail `<chroot-base-dir>/<exec file name>/<id>/root`
//! created (it must not exist); resource limits; cgroups (v1 or v2) joined; the network
//! namespace joined; the VMM binary copied in; a new mount namespace whose root is the jail
//! (`pivot_root`), holding only `/dev/kvm`, `/dev/net/tun`, `/dev/urandom` and, where the host
//! has it, `/dev/userfaultfd`; optionally a new PID namespace and a daemon session; the user and
//! group switched (no capabilities left) and no_new_privs set; then the VMM exec'd with `--id`,
//! `--start-time-us` and `--start-time-cpu-us` before the arguments given after `--`.

mod cgroup;
mod jail;

use clap::Parser;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Firecracker's jailer flags.
#[derive(Parser, Debug)]
#[command(name = "vireo-jailer", version, about)]
pub struct Args {
    /// Jail ID (letters, digits and '-', at most 64).
    #[arg(long)]
    pub id: String,
    /// The VMM binary to copy into the jail and exec.
    #[arg(long, value_name = "PATH")]
    pub exec_file: PathBuf,
    /// User ID the VMM runs as.
    #[arg(long)]
    pub uid: u32,
    /// Group ID the VMM runs as.
    #[arg(long)]
    pub gid: u32,
    /// Where jails are made.
    #[arg(long, value_name = "DIR", default_value = "/srv/jailer")]
    pub chroot_base_dir: PathBuf,
    /// Network namespace to join (a path such as /var/run/netns/NAME).
    #[arg(long, value_name = "PATH")]
    pub netns: Option<PathBuf>,
    /// Start a new session and send standard I/O to /dev/null before the exec.
    #[arg(long)]
    pub daemonize: bool,
    /// Exec the VMM as PID 1 of a new PID namespace (its host PID goes in `<exec name>.pid` in
    /// the jail).
    #[arg(long)]
    pub new_pid_ns: bool,
    /// cgroup version: 1 or 2.
    #[arg(long, default_value = "1", value_parser = ["1", "2"])]
    pub cgroup_version: String,
    /// A cgroup file and value, e.g. `memory.limit_in_bytes=268435456` (repeatable).
    #[arg(long, value_name = "FILE=VALUE")]
    pub cgroup: Vec<String>,
    /// The cgroup under which the jail's cgroup is made (default: the exec file's name).
    #[arg(long, value_name = "PATH")]
    pub parent_cgroup: Option<String>,
    /// A resource limit, `fsize=BYTES` or `no-file=N` (repeatable).
    #[arg(long, value_name = "RESOURCE=VALUE")]
    pub resource_limit: Vec<String>,
    /// The VMM's own arguments, after `--`.
    #[arg(last = true)]
    pub vmm_args: Vec<String>,
}

/// Why a jail could not be made.
#[derive(Debug, Error)]
pub enum Error {
    /// A flag's value is wrong.
    #[error("{0}")]
    Invalid(String),
    /// A system call on a named thing failed.
    #[error("cannot {what}: {err}")]
    Sys {
        /// What was being done, naming the file or setting.
        what: String,
        /// Cause.
        err: std::io::Error,
    },
}

/// `Error::Sys` for `what`.
pub(crate) fn sys<E: Into<std::io::Error>>(what: impl Into<String>) -> impl FnOnce(E) -> Error {
    let what = what.into();
    move |e| Error::Sys {
        what,
        err: e.into(),
    }
}

/// Firecracker's rule for jail IDs: 1 to 64 letters, digits and '-'.
pub fn check_id(id: &str) -> Result<(), Error> {
    if id.is_empty() || id.len() > 64 {
        return Err(Error::Invalid(format!(
            "jail ID '{id}' must be 1 to 64 characters"
        )));
    }
    if let Some(c) = id.chars().find(|c| !c.is_ascii_alphanumeric() && *c != '-') {
        return Err(Error::Invalid(format!(
            "jail ID '{id}': '{c}' is not allowed (letters, digits and '-' only)"
        )));
    }
    Ok(())
}

/// A `--resource-limit` value: the resource and its limit.
pub fn parse_limit(s: &str) -> Result<(nix::sys::resource::Resource, u64), Error> {
    use nix::sys::resource::Resource;
    let bad = || {
        Error::Invalid(format!(
            "resource limit '{s}' is not fsize=BYTES or no-file=N"
        ))
    };
    let (k, v) = s.split_once('=').ok_or_else(bad)?;
    let v: u64 = v.parse().map_err(|_| bad())?;
    match k {
        "fsize" => Ok((Resource::RLIMIT_FSIZE, v)),
        "no-file" => Ok((Resource::RLIMIT_NOFILE, v)),
        _ => Err(bad()),
    }
}

/// The jail's root for `args`: `<chroot-base-dir>/<exec file name>/<id>/root`.
pub fn jail_root(args: &Args) -> Result<PathBuf, Error> {
    let name = exec_name(&args.exec_file)?;
    Ok(args.chroot_base_dir.join(name).join(&args.id).join("root"))
}

fn exec_name(exec: &Path) -> Result<String, Error> {
    exec.file_name()
        .and_then(|n| n.to_str())
        .map(str::to_owned)
        .ok_or_else(|| {
            Error::Invalid(format!(
                "exec file {} has no usable file name",
                exec.display()
            ))
        })
}

/// Makes the jail and execs the VMM in it; returns only on failure.
pub fn run(args: Args) -> Error {
    match jail::enter(args) {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_limits() {
        assert!(check_id("vm-1").is_ok());
        assert!(check_id("").is_err());
        assert!(check_id(&"a".repeat(65)).is_err());
        let e = check_id("../x").unwrap_err().to_string();
        assert!(e.contains("'.'"), "{e}");
        assert!(check_id("a/b").unwrap_err().to_string().contains("'/'"));
        assert!(parse_limit("no-file=1024").is_ok());
        assert!(parse_limit("fsize=10").is_ok());
        assert!(parse_limit("cpu=1").is_err());
        assert!(parse_limit("no-file").is_err());
        assert!(parse_limit("no-file=x").is_err());
    }
}
