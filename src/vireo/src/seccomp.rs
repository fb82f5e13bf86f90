//! Which system calls each kind of vireo thread may make: the lists kept beside the code that
//! makes the calls, put together per thread kind, or a Firecracker `--seccomp-filter` file.
//!
//! A thread inherits the filter of the thread that starts it and adds its own, and the kernel
//! applies both. The VMM thread starts device threads after it is confined, so its filter
//! holds every device thread's list too (as Firecracker's VMM thread, which runs its devices).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use utils::seccomp::{compile, Allow, BpfProgram, Mode, ThreadKind, THREAD_BASICS, THREAD_SPAWN};

use devices::virtio::{balloon, block, net, rng, vsock, worker};

/// The lists one kind of thread is allowed.
fn lists(kind: ThreadKind) -> Vec<Allow> {
    let device = |own: Allow| vec![THREAD_BASICS, worker::SECCOMP, own];
    match kind {
        ThreadKind::Vcpu => vec![THREAD_BASICS, vmm::vstate::vcpu::SECCOMP],
        ThreadKind::Block => device(block::SECCOMP),
        ThreadKind::Net => device(net::SECCOMP),
        ThreadKind::Vsock => device(vsock::SECCOMP),
        ThreadKind::Rng => device(rng::SECCOMP),
        ThreadKind::Balloon => device(balloon::SECCOMP),
        ThreadKind::Mem => device(vmm::hotplug::SECCOMP),
        ThreadKind::Console => vec![THREAD_BASICS, vmm::console::SECCOMP],
        ThreadKind::Metrics => vec![THREAD_BASICS, crate::telemetry::METRICS_SECCOMP],
        ThreadKind::Api => vec![THREAD_BASICS, THREAD_SPAWN, api::SECCOMP],
        ThreadKind::Vmm => vec![
            THREAD_BASICS,
            THREAD_SPAWN,
            vmm::SECCOMP,
            worker::SPAWN_SECCOMP,
            net::ACTIVATE_SECCOMP,
            vmm::persist::SECCOMP,
            vmm::vstate::persist::SECCOMP,
            utils::files::OPEN_SECCOMP,
            block::REPLACE_SECCOMP,
            block::uring::SETUP_SECCOMP,
            vmm::console::RESTORE_SECCOMP,
            vmm::vstate::vm::SECCOMP,
            // Device threads start under this filter.
            worker::SECCOMP,
            block::SECCOMP,
            net::SECCOMP,
            vsock::SECCOMP,
            rng::SECCOMP,
            balloon::SECCOMP,
            vmm::hotplug::SECCOMP,
            crate::telemetry::METRICS_SECCOMP,
        ],
    }
}

/// vireo's own filters, one per thread kind, all at once (the tests; a running vireo compiles
/// each kind's when its first thread starts).
#[cfg(test)]
fn builtin(mode: Mode) -> Result<HashMap<ThreadKind, Arc<BpfProgram>>, String> {
    ThreadKind::ALL
        .iter()
        .map(|&kind| {
            compile(kind.name(), &lists(kind), mode)
                .map(|p| (kind, Arc::new(p)))
                .map_err(|e| e.to_string())
        })
        .collect()
}

/// Largest filter file read: Firecracker's limit (a filter holds at most 4096 instructions and
/// there are three thread categories).
const FILE_MAX: u64 = 100_000;

/// The thread categories a Firecracker filter file must have.
const CATEGORIES: [&str; 3] = ["vmm", "api", "vcpu"];

/// Reads a filter file compiled by Firecracker's seccompiler-bin: a bincode map (fixed-width
/// little-endian integers) from thread category to BPF program, each instruction 8 bytes. Every
/// vireo thread kind takes its category's program ([`ThreadKind::firecracker_category`]); an
/// empty program leaves those threads unconfined, as in Firecracker.
pub fn from_file(path: &Path) -> Result<HashMap<ThreadKind, Arc<BpfProgram>>, String> {
    use std::io::Read;
    let name = path.display();
    let file = utils::files::open_input(path, utils::files::Kind::Regular, false)
        .map_err(|e| format!("seccomp filter file {name}: {e}"))?;
    let mut bytes = Vec::new();
    file.take(FILE_MAX + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read seccomp filter file {name}: {e}"))?;
    if bytes.len() as u64 > FILE_MAX {
        return Err(format!(
            "seccomp filter file {name} is larger than {FILE_MAX} bytes"
        ));
    }
    let map = decode(&bytes).map_err(|e| format!("seccomp filter file {name}: {e}"))?;
    for c in CATEGORIES {
        if !map.contains_key(c) {
            return Err(format!(
                "seccomp filter file {name} has no filter for the '{c}' threads (it needs vmm, api and vcpu)"
            ));
        }
    }
    let mut out = HashMap::new();
    for kind in ThreadKind::ALL {
        let program = &map[kind.firecracker_category()];
        if !program.is_empty() {
            out.insert(kind, Arc::new(program.clone()));
        }
    }
    Ok(out)
}

/// Decodes seccompiler-bin's format: u64 entry count, then per entry a u64-length-prefixed
/// name and a u64-length-prefixed array of 8-byte instructions.
pub fn decode(bytes: &[u8]) -> Result<HashMap<String, BpfProgram>, String> {
    struct Reader<'a>(&'a [u8]);
    impl Reader<'_> {
        fn take(&mut self, n: usize) -> Result<&[u8], String> {
            if self.0.len() < n {
                return Err("it ends in the middle of an entry".into());
            }
            let (head, tail) = self.0.split_at(n);
            self.0 = tail;
            Ok(head)
        }
        fn len(&mut self, unit: usize) -> Result<usize, String> {
            let n = u64::from_le_bytes(self.take(8)?.try_into().unwrap_or_default());
            // Bounded by what is left, so a forged length cannot make us allocate.
            if n > (self.0.len() / unit.max(1)) as u64 {
                return Err(format!("a length of {n} is more than the file holds"));
            }
            Ok(n as usize)
        }
    }
    let mut r = Reader(bytes);
    let entries = r.len(17)?;
    let mut map = HashMap::new();
    for _ in 0..entries {
        let n = r.len(1)?;
        let name = std::str::from_utf8(r.take(n)?)
            .map_err(|_| "a thread category name is not UTF-8".to_string())?
            .to_owned();
        let count = r.len(8)?;
        if count > 4096 {
            return Err(format!(
                "the '{name}' filter has {count} instructions; BPF allows 4096"
            ));
        }
        let program = (0..count)
            .map(|_| {
                let i = r.take(8)?;
                Ok(utils::seccomp::sock_filter {
                    code: u16::from_le_bytes([i[0], i[1]]),
                    jt: i[2],
                    jf: i[3],
                    k: u32::from_le_bytes([i[4], i[5], i[6], i[7]]),
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        if map.insert(name.clone(), program).is_some() {
            return Err(format!("the '{name}' filter appears twice"));
        }
    }
    if !r.0.is_empty() {
        return Err(format!("{} bytes follow the last filter", r.0.len()));
    }
    Ok(map)
}

/// glibc's malloc opens /proc/sys/vm/overcommit_memory the first time it shrinks a
/// per-thread arena, which may be long after that thread is confined. With a single arena (the
/// main heap, grown and trimmed with brk) it never does; vireo's threads allocate little, and
/// one arena also keeps a small VMM small.
#[cfg(target_env = "gnu")]
fn fix_malloc_arenas() {
    // SAFETY: mallopt only sets a malloc tunable; called before any other thread exists.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
}

/// musl's malloc has no arenas and opens nothing.
#[cfg(not(target_env = "gnu"))]
fn fix_malloc_arenas() {}

/// Sets up confinement for this process: the filters every thread installs, the handler that
/// reports a forbidden call, and the self-test (`VIREO_SECCOMP_SELFTEST=<thread kind>`).
pub fn setup(off: bool, file: Option<&Path>, log: bool) -> Result<(), String> {
    if off {
        if file.is_some() {
            return Err("--no-seccomp and --seccomp-filter contradict each other".into());
        }
        tracing::info!("--no-seccomp: threads run without seccomp filters");
        return Ok(());
    }
    let source: utils::seccomp::FilterSource = match file {
        Some(path) => {
            if log {
                return Err(
                    "--seccomp-log applies to vireo's own filters; a --seccomp-filter file sets its own actions"
                        .into(),
                );
            }
            let programs = from_file(path)?;
            utils::seccomp::mark_foreign_filters();
            Box::new(move |kind| programs.get(&kind).cloned())
        }
        None => {
            let mode = if log { Mode::Log } else { Mode::Trap };
            Box::new(move |kind| match compile(kind.name(), &lists(kind), mode) {
                Ok(p) => Some(Arc::new(p)),
                Err(e) => {
                    // Never run a thread unconfined because its filter did not compile (the
                    // unit tests compile every kind).
                    eprintln!("vireo: error: {e}");
                    std::process::exit(vmm::EXIT_CODE_ERROR);
                }
            })
        }
    };
    fix_malloc_arenas();
    utils::seccomp::install_trap_handler()?;
    if let Some(kind) = std::env::var_os("VIREO_SECCOMP_SELFTEST") {
        utils::seccomp::set_selftest(&kind.to_string_lossy());
    }
    utils::seccomp::set_filters(source);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(map: &[(&str, &[u64])]) -> Vec<u8> {
        let mut out = (map.len() as u64).to_le_bytes().to_vec();
        for (name, prog) in map {
            out.extend((name.len() as u64).to_le_bytes());
            out.extend(name.as_bytes());
            out.extend((prog.len() as u64).to_le_bytes());
            for i in *prog {
                out.extend(i.to_le_bytes());
            }
        }
        out
    }

    #[test]
    fn every_kind_compiles_in_both_modes() {
        assert_eq!(builtin(Mode::Trap).unwrap().len(), ThreadKind::ALL.len());
        assert_eq!(builtin(Mode::Log).unwrap().len(), ThreadKind::ALL.len());
    }

    #[test]
    fn device_threads_are_allowed_nothing_the_vmm_thread_is_not() {
        // They start under the VMM thread's filter, and the kernel applies both.
        let calls = |kind| {
            lists(kind)
                .iter()
                .flat_map(|l| {
                    l.syscalls
                        .iter()
                        .map(|&n| (n, None))
                        .chain(
                            l.with_arg
                                .iter()
                                .map(|r| (r.syscall, Some((r.arg, r.value)))),
                        )
                        .collect::<Vec<_>>()
                })
                .collect::<std::collections::HashSet<_>>()
        };
        let vmm = calls(ThreadKind::Vmm);
        for kind in [
            ThreadKind::Block,
            ThreadKind::Net,
            ThreadKind::Vsock,
            ThreadKind::Rng,
            ThreadKind::Balloon,
            ThreadKind::Mem,
            ThreadKind::Metrics,
        ] {
            for c in calls(kind) {
                assert!(
                    vmm.contains(&c) || vmm.contains(&(c.0, None)),
                    "{kind:?} may call {} ({c:?}) but the VMM thread may not",
                    utils::seccomp::syscall_name(c.0)
                );
            }
        }
    }

    #[test]
    fn a_vcpu_may_not_create_vms_or_open_files() {
        let vcpu = lists(ThreadKind::Vcpu);
        for l in &vcpu {
            assert!(!l.syscalls.contains(&libc::SYS_ioctl), "{}", l.by);
            assert!(!l.syscalls.contains(&libc::SYS_openat), "{}", l.by);
            // KVM_CREATE_VM is _IO(0xae, 0x01).
            assert!(!l.with_arg.iter().any(|r| r.value == 0xae01), "{}", l.by);
        }
    }

    #[test]
    fn filter_files_decode_and_bad_ones_are_named() {
        let ret_allow = 0x7fff_0000_0000_0006u64; // BPF_RET|BPF_K, SECCOMP_RET_ALLOW
        let bytes = encode(&[("vmm", &[ret_allow]), ("api", &[]), ("vcpu", &[ret_allow])]);
        let map = decode(&bytes).unwrap();
        assert_eq!(map["vmm"].len(), 1);
        assert_eq!(map["vmm"][0].code, 6);
        assert_eq!(map["vmm"][0].k, 0x7fff_0000);
        assert!(map["api"].is_empty());
        let e = decode(&bytes[..bytes.len() - 3]).unwrap_err();
        assert!(e.contains("more than the file holds"), "{e}");
        let e = decode(&bytes[..bytes.len() - 11]).unwrap_err();
        assert!(e.contains("ends in the middle"), "{e}");
        let mut extra = bytes.clone();
        extra.push(0);
        assert!(decode(&extra).unwrap_err().contains("follow the last"));
        let mut huge = bytes.clone();
        huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(decode(&huge)
            .unwrap_err()
            .contains("more than the file holds"));
        let twice = encode(&[("vmm", &[]), ("vmm", &[])]);
        assert!(decode(&twice).unwrap_err().contains("twice"));
    }
}
