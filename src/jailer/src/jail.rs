//! The jail itself: descriptors, limits, namespaces, the new root, its devices, the identity
//! switch and the exec.

use crate::{check_id, exec_name, jail_root, parse_limit, sys, Args, Error};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};
use nix::sys::stat::{makedev, mknod, Mode, SFlag};
use nix::time::{clock_gettime, ClockId};
use nix::unistd::{chdir, chown, pivot_root, setgroups, setresgid, setresuid, Gid, Uid};
use std::convert::Infallible;
use std::ffi::CString;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Firecracker's jailer's default limit on open files.
const DEFAULT_NOFILE: u64 = 2048;

fn micros(clock: ClockId) -> u64 {
    clock_gettime(clock).map_or(0, |t| {
        t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1_000
    })
}

/// A character device the jail gets: path inside the jail, type, numbers, mode.
struct Node {
    path: &'static str,
    major: u64,
    minor: u64,
}

/// userfaultfd's device numbers, where the host has the device (Linux 6.1+): Uffd snapshot
/// restores need it, since unprivileged userfaultfd(2) is often off.
fn userfaultfd_numbers() -> Option<(u64, u64)> {
    let dev = std::fs::read_to_string("/sys/class/misc/userfaultfd/dev").ok()?;
    let (ma, mi) = dev.trim().split_once(':')?;
    Some((ma.parse().ok()?, mi.parse().ok()?))
}

pub(crate) fn enter(args: Args) -> Result<Infallible, Error> {
    let start_us = micros(ClockId::CLOCK_MONOTONIC);
    let start_cpu_us = micros(ClockId::CLOCK_PROCESS_CPUTIME_ID);
    // Nothing the caller left open reaches the VMM.
    // SAFETY: close_range(2) closes only descriptors; the jailer holds none above 2 yet.
    if unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) } != 0 {
        return Err(sys("close inherited file descriptors")(
            std::io::Error::last_os_error(),
        ));
    }
    check_id(&args.id)?;
    let meta = std::fs::metadata(&args.exec_file)
        .map_err(sys(format!("use exec file {}", args.exec_file.display())))?;
    if !meta.is_file() {
        return Err(Error::Invalid(format!(
            "exec file {} is not a regular file",
            args.exec_file.display()
        )));
    }
    let name = exec_name(&args.exec_file)?;
    let mut limits = vec![(nix::sys::resource::Resource::RLIMIT_NOFILE, DEFAULT_NOFILE)];
    for l in &args.resource_limit {
        let (res, v) = parse_limit(l)?;
        limits.retain(|(r, _)| *r != res);
        limits.push((res, v));
    }
    let root = jail_root(&args)?;
    let jail_dir = root.parent().unwrap_or(&root).to_owned();
    if jail_dir.exists() {
        return Err(Error::Invalid(format!(
            "jail directory {} already exists (another jail with ID '{}'?)",
            jail_dir.display(),
            args.id
        )));
    }
    std::fs::create_dir_all(&root).map_err(sys(format!("create {}", root.display())))?;

    let parent = args.parent_cgroup.clone().unwrap_or_else(|| name.clone());
    crate::cgroup::join(
        &args.cgroup_version,
        &args.cgroup,
        &parent,
        &args.id,
        std::process::id(),
    )?;
    if let Some(ns) = &args.netns {
        let f = std::fs::File::open(ns)
            .map_err(sys(format!("open network namespace {}", ns.display())))?;
        setns(&f, CloneFlags::CLONE_NEWNET)
            .map_err(sys(format!("join network namespace {}", ns.display())))?;
    }
    let inside = root.join(&name);
    std::fs::copy(&args.exec_file, &inside).map_err(sys(format!(
        "copy {} into the jail",
        args.exec_file.display()
    )))?;
    std::fs::set_permissions(&inside, std::fs::Permissions::from_mode(0o755))
        .map_err(sys(format!("make {} executable", inside.display())))?;
    let uffd = userfaultfd_numbers();
    // Opened before the root changes, for --daemonize.
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(sys("open /dev/null"))?;

    new_root(&root)?;
    let mut nodes = vec![
        Node {
            path: "/dev/kvm",
            major: 10,
            minor: 232,
        },
        Node {
            path: "/dev/net/tun",
            major: 10,
            minor: 200,
        },
        Node {
            path: "/dev/urandom",
            major: 1,
            minor: 9,
        },
    ];
    if let Some((major, minor)) = uffd {
        nodes.push(Node {
            path: "/dev/userfaultfd",
            major,
            minor,
        });
    }
    let (uid, gid) = (Uid::from_raw(args.uid), Gid::from_raw(args.gid));
    for n in &nodes {
        let path = Path::new(n.path);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(sys(format!("create {}", dir.display())))?;
        }
        mknod(
            path,
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o600),
            makedev(n.major, n.minor),
        )
        .map_err(sys(format!("create device node {}", n.path)))?;
        chown(path, Some(uid), Some(gid)).map_err(sys(format!("chown {}", n.path)))?;
    }
    // The VMM may create its sockets and files in the jail's root.
    chown("/", Some(uid), Some(gid)).map_err(sys("chown the jail's root"))?;
    // Limits last, so that they bind the VMM and not the copy of its binary into the jail.
    for (res, v) in &limits {
        nix::sys::resource::setrlimit(*res, *v, *v)
            .map_err(sys(format!("set resource limit {res:?} to {v}")))?;
    }

    let mut extra = Vec::new();
    if args.new_pid_ns {
        let parent_cpu_us = micros(ClockId::CLOCK_PROCESS_CPUTIME_ID);
        unshare(CloneFlags::CLONE_NEWPID).map_err(sys("make a PID namespace"))?;
        // SAFETY: the jailer is single-threaded, so the child may run any code after fork.
        match unsafe { nix::unistd::fork() }.map_err(sys("fork into the PID namespace"))? {
            nix::unistd::ForkResult::Parent { child } => {
                let pid_file = format!("/{name}.pid");
                std::fs::write(&pid_file, child.to_string())
                    .map_err(sys(format!("write {pid_file}")))?;
                std::process::exit(0);
            }
            nix::unistd::ForkResult::Child => {
                extra = vec!["--parent-cpu-time-us".to_owned(), parent_cpu_us.to_string()];
            }
        }
    }
    if args.daemonize {
        nix::unistd::setsid().map_err(sys("start a new session"))?;
        nix::unistd::dup2_stdin(&null).map_err(sys("redirect stdin"))?;
        nix::unistd::dup2_stdout(&null).map_err(sys("redirect stdout"))?;
        nix::unistd::dup2_stderr(&null).map_err(sys("redirect stderr"))?;
    }
    drop(null);

    setgroups(&[]).map_err(sys("drop supplementary groups"))?;
    setresgid(gid, gid, gid).map_err(sys(format!("switch to group {gid}")))?;
    // Leaving uid 0 clears every capability set.
    setresuid(uid, uid, uid).map_err(sys(format!("switch to user {uid}")))?;
    nix::sys::prctl::set_no_new_privs().map_err(sys("set no_new_privs"))?;

    let mut argv = vec![
        name.clone(),
        "--id".to_owned(),
        args.id.clone(),
        "--start-time-us".to_owned(),
        start_us.to_string(),
        "--start-time-cpu-us".to_owned(),
        start_cpu_us.to_string(),
    ];
    argv.extend(extra);
    argv.extend(args.vmm_args.iter().cloned());
    let cstr = |s: &str| {
        CString::new(s).map_err(|_| Error::Invalid(format!("argument '{s}' holds a NUL byte")))
    };
    let argv = argv
        .iter()
        .map(|a| cstr(a))
        .collect::<Result<Vec<_>, _>>()?;
    let path = cstr(&format!("/{name}"))?;
    // A clean environment: nothing from the caller's reaches the VMM.
    let env: [CString; 0] = [];
    let e = nix::unistd::execve(&path, &argv, &env).unwrap_err();
    if e == nix::errno::Errno::ENOENT {
        // The file is there: what is missing is its dynamic loader.
        return Err(Error::Invalid(format!(
            "cannot exec /{name} in the jail: it is dynamically linked and the jail holds no \
             shared libraries; jail a static build (x86_64-unknown-linux-musl, see the README)"
        )));
    }
    Err(sys(format!("exec /{name} in the jail"))(e))
}

/// Makes `root` this process's `/` in a new mount namespace, with the old root gone.
fn new_root(root: &Path) -> Result<(), Error> {
    unshare(CloneFlags::CLONE_NEWNS).map_err(sys("make a mount namespace"))?;
    // Nothing mounted here propagates back to the host.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_SLAVE | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(sys("make / a slave mount"))?;
    // pivot_root needs the new root to be a mount point.
    mount(
        Some(root),
        root,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(sys(format!("bind-mount {}", root.display())))?;
    chdir(root).map_err(sys(format!("enter {}", root.display())))?;
    std::fs::create_dir("old_root").map_err(sys("create old_root in the jail"))?;
    pivot_root(".", "old_root").map_err(sys(format!("pivot_root into {}", root.display())))?;
    chdir("/").map_err(sys("enter the new root"))?;
    umount2("/old_root", MntFlags::MNT_DETACH).map_err(sys("unmount the old root"))?;
    std::fs::remove_dir("/old_root").map_err(sys("remove /old_root"))?;
    Ok(())
}
