//! seccomp-BPF confinement: the system calls each piece of vireo makes are listed beside that
//! code as an [`Allow`]; a thread kind's filter is the union of the lists of the code it runs,
//! compiled with seccompiler and installed by the thread itself before it touches anything a
//! guest or client controls.
//!
//! A call outside the filter traps (SIGSYS): the handler names the call and the thread kind in
//! the log and ends the process with [`EXIT_CODE`], as Firecracker does. In log mode the kernel
//! lets the call through and records it in its audit log instead (`dmesg`: `type=1326 ...
//! comm="<thread>" ... syscall=<nr>`), which is how a missing entry is found.

mod names;

use seccompiler::{
    SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
    TargetArch,
};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, OnceLock};

pub use seccompiler::{sock_filter, BpfProgram};

/// Exit code of a process that made a forbidden system call (Firecracker's).
pub const EXIT_CODE: i32 = 148;

/// A system call allowed only when one argument has one value.
#[derive(Clone, Copy, Debug)]
pub struct ArgRule {
    /// The system call.
    pub syscall: i64,
    /// Which argument (0-based) is compared.
    pub arg: u8,
    /// The value it must equal.
    pub value: u64,
}

/// An ioctl allowed with one request number only. Request numbers are 32 bits (the kernel
/// ignores the rest, and musl passes them sign-extended), so only those are compared.
pub const fn ioctl(request: u64) -> ArgRule {
    ArgRule {
        syscall: libc::SYS_ioctl,
        arg: 1,
        value: request & 0xffff_ffff,
    }
}

/// [`ioctl`] for a request number from the libc crate, whose type differs between glibc
/// (`c_ulong`) and musl (`c_int`).
#[allow(clippy::unnecessary_cast)]
pub const fn libc_ioctl(request: libc::Ioctl) -> ArgRule {
    ioctl(request as u64)
}

/// The system calls one piece of code makes, kept beside that code.
#[derive(Clone, Copy, Debug)]
pub struct Allow {
    /// What makes these calls.
    pub by: &'static str,
    /// Allowed with any arguments.
    pub syscalls: &'static [i64],
    /// Allowed with one argument fixed (ioctl request numbers, prctl options).
    pub with_arg: &'static [ArgRule],
}

/// What a filter does with a call outside its lists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Stop the process (SIGSYS, logged, exit code [`EXIT_CODE`]).
    Trap,
    /// Let the call through; the kernel's audit log records it.
    Log,
}

/// A filter that cannot be built or installed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// seccompiler refused the rules.
    #[error("cannot compile the seccomp filter for the {kind} thread: {err}")]
    Compile {
        /// Thread kind.
        kind: String,
        /// Cause.
        err: String,
    },
    /// The kernel refused the filter.
    #[error("cannot install the seccomp filter for the {kind} thread: {err}")]
    Install {
        /// Thread kind.
        kind: &'static str,
        /// Cause.
        err: String,
    },
}

/// Compiles the union of `lists` into one filter for thread kind `kind`.
pub fn compile(kind: &str, lists: &[Allow], mode: Mode) -> Result<BpfProgram, Error> {
    // None: allowed with any arguments; Some(rules): allowed when one rule matches.
    let mut map: BTreeMap<i64, Option<Vec<SeccompRule>>> = BTreeMap::new();
    let err = |e: seccompiler::BackendError| Error::Compile {
        kind: kind.to_owned(),
        err: e.to_string(),
    };
    for list in lists {
        for &nr in list.syscalls {
            map.insert(nr, None);
        }
        for r in list.with_arg {
            let len = if r.value > u64::from(u32::MAX) {
                SeccompCmpArgLen::Qword
            } else {
                SeccompCmpArgLen::Dword
            };
            let cond = SeccompCondition::new(r.arg, len, SeccompCmpOp::Eq, r.value).map_err(err)?;
            let rule = SeccompRule::new(vec![cond]).map_err(err)?;
            if let Some(rules) = map.entry(r.syscall).or_insert_with(|| Some(Vec::new())) {
                rules.push(rule);
            }
        }
    }
    let rules = map
        .into_iter()
        .map(|(nr, rules)| (nr, rules.unwrap_or_default()))
        .collect();
    let mismatch = match mode {
        Mode::Trap => SeccompAction::Trap,
        Mode::Log => SeccompAction::Log,
    };
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(err)?;
    filter.try_into().map_err(err)
}

/// The kinds of thread vireo runs, each confined by its own filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ThreadKind {
    /// The main thread: API requests to the VM, the event loop, device activation, snapshots.
    Vmm,
    /// The HTTP API server (and its helper threads).
    Api,
    /// Each vCPU: KVM_RUN and the emulated port I/O and MMIO devices.
    Vcpu,
    /// A virtio-blk device thread.
    Block,
    /// A virtio-net device thread.
    Net,
    /// The virtio-vsock device thread.
    Vsock,
    /// The virtio-rng device thread.
    Rng,
    /// The virtio-balloon device thread.
    Balloon,
    /// The virtio-mem (memory hotplug) device thread.
    Mem,
    /// The serial console's input thread.
    Console,
    /// The periodic metrics writer.
    Metrics,
}

impl ThreadKind {
    /// Every kind.
    pub const ALL: [ThreadKind; 11] = [
        ThreadKind::Vmm,
        ThreadKind::Api,
        ThreadKind::Vcpu,
        ThreadKind::Block,
        ThreadKind::Net,
        ThreadKind::Vsock,
        ThreadKind::Rng,
        ThreadKind::Balloon,
        ThreadKind::Mem,
        ThreadKind::Console,
        ThreadKind::Metrics,
    ];

    /// The kind's name in logs and `VIREO_SECCOMP_SELFTEST`.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vmm => "vmm",
            ThreadKind::Api => "api",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Block => "block",
            ThreadKind::Net => "net",
            ThreadKind::Vsock => "vsock",
            ThreadKind::Rng => "rng",
            ThreadKind::Balloon => "balloon",
            ThreadKind::Mem => "mem",
            ThreadKind::Console => "console",
            ThreadKind::Metrics => "metrics",
        }
    }

    /// The Firecracker thread category (`vmm`, `api` or `vcpu`) whose filter a
    /// `--seccomp-filter` file gives this kind. Firecracker runs devices, the console and
    /// metrics on its VMM thread, so vireo's threads for them take the `vmm` filter.
    pub fn firecracker_category(self) -> &'static str {
        match self {
            ThreadKind::Api => "api",
            ThreadKind::Vcpu => "vcpu",
            _ => "vmm",
        }
    }
}

/// Gives the program for a thread kind (`None`: that kind runs unfiltered).
pub type FilterSource = Box<dyn Fn(ThreadKind) -> Option<Arc<BpfProgram>> + Send + Sync>;

static SOURCE: OnceLock<FilterSource> = OnceLock::new();
/// Each kind's program, made the first time a thread of that kind starts: a VM that never
/// starts an API or a network thread never pays for compiling their filters.
static PROGRAMS: [OnceLock<Option<Arc<BpfProgram>>>; ThreadKind::ALL.len()] =
    [const { OnceLock::new() }; ThreadKind::ALL.len()];

/// Sets where the process's filters come from, once, before any confined thread starts.
/// Without it (`--no-seccomp`, unit tests) no thread is filtered.
pub fn set_filters(source: FilterSource) {
    let _ = SOURCE.set(source);
}

static FOREIGN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Records that the filters come from a file (Firecracker's), which allow only the calls
/// Firecracker makes.
pub fn mark_foreign_filters() {
    FOREIGN.store(true, Ordering::Relaxed);
}

/// Whether vireo may make the calls it needs only to be faster (not in Firecracker's filters):
/// false under a `--seccomp-filter` file, where such a call would end the process.
pub fn optional_calls_allowed() -> bool {
    !FOREIGN.load(Ordering::Relaxed)
}

/// The filter threads of `kind` install.
pub fn filter(kind: ThreadKind) -> ThreadFilter {
    let index = ThreadKind::ALL.iter().position(|k| *k == kind).unwrap_or(0);
    ThreadFilter {
        kind: kind.name(),
        program: SOURCE
            .get()
            .and_then(|source| PROGRAMS[index].get_or_init(|| source(kind)).clone()),
    }
}

/// The filter one kind of thread installs on itself; without a program (`--no-seccomp`) it
/// installs nothing.
#[derive(Clone, Debug)]
pub struct ThreadFilter {
    kind: &'static str,
    program: Option<Arc<BpfProgram>>,
}

impl ThreadFilter {
    /// No filter (seccomp turned off, or unit tests).
    pub fn none(kind: &'static str) -> Self {
        Self {
            kind,
            program: None,
        }
    }

    /// Installs the filter on the calling thread. A thread must not go on unconfined, so a
    /// kernel that refuses the filter ends the process (exit code 1) with the reason.
    pub fn install(&self) {
        let Some(program) = &self.program else {
            return;
        };
        THREAD_KIND.with(|k| k.set(self.kind));
        if let Err(e) = seccompiler::apply_filter(program) {
            let e = Error::Install {
                kind: self.kind,
                err: e.to_string(),
            };
            tracing::error!("{e} (--no-seccomp runs without filters)");
            eprintln!("vireo: {e} (--no-seccomp runs without filters)");
            std::process::exit(1);
        }
        if SELFTEST.get().is_some_and(|k| k == self.kind) {
            forbidden_call();
        }
    }
}

thread_local! {
    /// The kind of filter the calling thread installed, for the trap handler's message.
    static THREAD_KIND: Cell<&'static str> = const { Cell::new("") };
}

static SELFTEST: OnceLock<String> = OnceLock::new();
static LOG_FD: AtomicI32 = AtomicI32::new(-1);

/// Makes threads of kind `kind` issue a system call no filter allows right after installing
/// their filter: proves, on a running vireo, that the filters are live (see the README).
pub fn set_selftest(kind: &str) {
    let _ = SELFTEST.set(kind.to_owned());
}

/// The call [`set_selftest`] makes: `sysinfo`, harmless and outside every list.
fn forbidden_call() {
    let mut info = std::mem::MaybeUninit::<libc::sysinfo>::uninit();
    // SAFETY: sysinfo writes one struct sysinfo into the buffer it is given, which is ours.
    let _ = unsafe { libc::sysinfo(info.as_mut_ptr()) };
}

/// Also writes the trap handler's message to `fd` (the log file), besides stderr.
pub fn set_log_fd(fd: i32) {
    LOG_FD.store(fd, Ordering::Relaxed);
}

/// Installs the SIGSYS handler that reports a forbidden call and ends the process.
pub fn install_trap_handler() -> Result<(), String> {
    vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, on_sigsys)
        .map_err(|e| format!("cannot install the SIGSYS handler: {e}"))
}

/// The name of system call `nr` on x86_64.
pub fn syscall_name(nr: i64) -> &'static str {
    names::NAMES
        .binary_search_by_key(&nr, |&(n, _)| n)
        .map_or("unknown", |i| names::NAMES[i].1)
}

/// `si_code` of a SIGSYS raised by a seccomp filter.
const SYS_SECCOMP: i32 = 1;

/// Fixed buffer the handler formats into: no allocation or lock in a signal handler.
struct StackBuf {
    buf: [u8; 320],
    len: usize,
}

impl std::fmt::Write for StackBuf {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

extern "C" fn on_sigsys(num: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    if num != libc::SIGSYS || info.is_null() {
        return;
    }
    // SAFETY: the kernel hands an SA_SIGINFO handler a valid siginfo_t; for a seccomp SIGSYS
    // its union holds the call address (8 bytes at offset 16), then the system call number.
    let (code, nr) = unsafe {
        let base = info.cast::<u8>();
        (
            (*info).si_code,
            base.add(24).cast::<libc::c_int>().read_unaligned(),
        )
    };
    if code != SYS_SECCOMP {
        return;
    }
    let nr = i64::from(nr);
    let mut msg = StackBuf {
        buf: [0; 320],
        len: 0,
    };
    let _ = match THREAD_KIND.with(|k| k.get()) {
        // A helper thread runs under the filter of the thread that started it.
        "" => write!(msg, "vireo: seccomp: a helper thread"),
        kind => write!(msg, "vireo: seccomp: the {kind} thread"),
    };
    let _ = write!(msg, " made system call {} ({nr})", syscall_name(nr));
    if nr == libc::SYS_ioctl && !ctx.is_null() {
        // SAFETY: for SA_SIGINFO handlers the third argument is the interrupted ucontext_t.
        let request =
            unsafe { (*ctx.cast::<libc::ucontext_t>()).uc_mcontext.gregs[libc::REG_RSI as usize] };
        let _ = write!(msg, " with request {request:#x}");
    }
    let _ = writeln!(
        msg,
        ", which its filter does not allow; stopping (exit code {EXIT_CODE})"
    );
    let bytes = &msg.buf[..msg.len];
    for fd in [libc::STDERR_FILENO, LOG_FD.load(Ordering::Relaxed)] {
        if fd >= 0 {
            // SAFETY: write(2) on a file descriptor from a buffer we own; async-signal-safe.
            let _ = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
        }
    }
    // SAFETY: _exit(2) is async-signal-safe and ends the process at once.
    unsafe { libc::_exit(EXIT_CODE) }
}

/// The calls every thread makes whatever it runs: memory, locks, time, signals, logging and
/// thread exit (Rust's standard library, glibc and musl).
pub const THREAD_BASICS: Allow = Allow {
    by: "every thread (allocator, locks, clocks, signals, logging, exit)",
    syscalls: &[
        libc::SYS_brk,
        libc::SYS_mmap,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_mprotect,
        libc::SYS_madvise,
        libc::SYS_futex,
        libc::SYS_sched_yield,
        libc::SYS_gettid,
        libc::SYS_clock_gettime,
        libc::SYS_gettimeofday,
        libc::SYS_clock_nanosleep,
        libc::SYS_nanosleep,
        libc::SYS_getrandom,
        libc::SYS_rt_sigreturn,
        libc::SYS_rt_sigprocmask,
        libc::SYS_sigaltstack,
        libc::SYS_write,
        // A signal lands on any thread; its handler writes to signal-hook's self-pipe socket.
        libc::SYS_sendto,
        libc::SYS_close,
        libc::SYS_exit,
        libc::SYS_exit_group,
    ],
    // The standard library checks that a descriptor is open before closing it (debug builds).
    with_arg: &[ArgRule {
        syscall: libc::SYS_fcntl,
        arg: 1,
        value: libc::F_GETFD as u64,
    }],
};

/// What starting a thread asks of the thread that starts it (the new thread inherits that
/// filter until it installs its own).
pub const THREAD_SPAWN: Allow = Allow {
    by: "starting threads",
    syscalls: &[
        libc::SYS_clone,
        libc::SYS_clone3,
        libc::SYS_set_robust_list,
        libc::SYS_rseq,
        libc::SYS_sched_getaffinity,
    ],
    with_arg: &[
        ArgRule {
            syscall: libc::SYS_prctl,
            arg: 0,
            value: libc::PR_SET_NAME as u64,
        },
        // The new thread confines itself: no_new_privs, then its own filter (which can only
        // narrow what this one allows).
        ArgRule {
            syscall: libc::SYS_prctl,
            arg: 0,
            value: libc::PR_SET_NO_NEW_PRIVS as u64,
        },
        ArgRule {
            syscall: libc::SYS_seccomp,
            arg: 0,
            value: libc::SECCOMP_SET_MODE_FILTER as u64,
        },
    ],
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_compilation() {
        assert_eq!(syscall_name(0), "read");
        assert_eq!(syscall_name(libc::SYS_ioctl), "ioctl");
        assert_eq!(syscall_name(libc::SYS_sysinfo), "sysinfo");
        assert_eq!(syscall_name(100_000), "unknown");
        const KVM_RUN: ArgRule = ioctl(0xae80);
        let list = Allow {
            by: "test",
            syscalls: &[libc::SYS_read],
            with_arg: &[KVM_RUN],
        };
        let p = compile("test", &[THREAD_BASICS, list], Mode::Trap).unwrap();
        assert!(p.len() > 10);
        // A plain entry wins over an argument rule for the same call.
        let both = Allow {
            by: "test",
            syscalls: &[libc::SYS_ioctl],
            with_arg: &[KVM_RUN],
        };
        assert!(compile("test", &[both], Mode::Log).is_ok());
    }

    #[test]
    fn the_selftest_call_is_in_no_shared_list() {
        for list in [THREAD_BASICS, THREAD_SPAWN] {
            assert!(!list.syscalls.contains(&libc::SYS_sysinfo));
        }
    }
}
