//! Snapshots: a paused VM written to a state file and a memory file, and VMs restored from
//! them.
//!
//! The state file holds the VM's configuration, KVM's state of the VM and every vCPU, and
//! every device's state, in checksummed sections ([`format`]). The memory file is the guest's
//! RAM, sparse, with a trailer naming the snapshot it belongs to. Both are written to temporary
//! files, synced and renamed into place (memory first), so a crash mid-create leaves the
//! previous snapshot as it was; the shared id refuses a state file with another snapshot's
//! memory.
//!
//! A restored VM maps the memory file privately: restore costs page tables, not reads, and
//! clones of one snapshot share its page cache.

pub mod format;
pub mod memory;

use crate::builder::Machine;
use crate::config::{SerialConfig, VmConfig};
use crate::device_manager::DevicesState;
use crate::memory::{Backing, Memory};
use crate::vstate::persist::{VcpuState, VmState};
use crate::vstate::vcpu::Vcpu;
use crate::RunningVm;
use format::{FormatError, MemKind, MemTrailer, TRAILER_BYTES};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;
use thiserror::Error;
use utils::seccomp::Allow;

/// What creating a snapshot calls on the VMM thread besides the KVM state reads: files made,
/// written, synced and renamed into place, leftovers removed, the memory's resident pages found
/// (/proc/self/pagemap, SEEK_DATA).
pub const SECCOMP: Allow = Allow {
    by: "creating snapshots",
    syscalls: &[
        libc::SYS_openat,
        libc::SYS_newfstatat,
        libc::SYS_fstat,
        libc::SYS_statx,
        libc::SYS_lseek,
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_ftruncate,
        libc::SYS_fsync,
        libc::SYS_fdatasync,
        libc::SYS_rename,
        libc::SYS_renameat,
        libc::SYS_renameat2,
        libc::SYS_unlink,
        libc::SYS_unlinkat,
        libc::SYS_getdents64,
        libc::SYS_mkdir,
        libc::SYS_mkdirat,
        // musl's names on x86_64.
        libc::SYS_open,
        libc::SYS_stat,
        libc::SYS_lstat,
    ],
    with_arg: &[],
};

/// Errors creating or loading a snapshot.
#[derive(Debug, Error)]
pub enum Error {
    /// The VM must be paused first.
    #[error(
        "the microVM must be paused before a snapshot is created (PATCH /vm with state Paused)"
    )]
    NotPaused,
    /// Snapshots of hugetlbfs-backed memory are not written yet.
    #[error("snapshots of a microVM on 2M huge pages are not supported by vireo yet (huge_pages None or Transparent can be snapshotted)")]
    HugePages,
    /// Diff snapshots need dirty page tracking.
    #[error("a Diff snapshot needs dirty page tracking: set track_dirty_pages in machine-config before starting, or enable_diff_snapshots / track_dirty_pages when loading")]
    NoDirtyTracking,
    /// A path the request names cannot be used.
    #[error("{what} {path}: {reason}")]
    Path {
        /// Which path.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A snapshot file is damaged or from elsewhere.
    #[error("{what} {path}: {err}")]
    Format {
        /// Which file.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// What is wrong.
        err: FormatError,
    },
    /// The state file and memory file do not belong together, or do not fit this VM.
    #[error("{0}")]
    Mismatch(String),
    /// Saving or restoring KVM state.
    #[error("{0}")]
    Kvm(#[from] crate::vstate::persist::Error),
    /// Building the VM or its devices.
    #[error("{0}")]
    Vm(Box<crate::Error>),
}

impl From<crate::Error> for Error {
    fn from(e: crate::Error) -> Self {
        Error::Vm(Box::new(e))
    }
}

/// Full or diff, as Firecracker names them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotType {
    /// All of the guest's memory.
    #[default]
    Full,
    /// The pages written since the previous snapshot (or the restore).
    Diff,
}

/// What `PUT /snapshot/create` asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreateParams {
    /// Full or diff.
    pub kind: SnapshotType,
    /// The state file to write.
    pub state_path: PathBuf,
    /// The memory file to write.
    pub mem_path: PathBuf,
}

/// Where a restored VM's memory comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemBackend {
    /// Mapped privately from this memory file.
    File(PathBuf),
    /// Served page by page by the handler listening on this Unix socket (userfaultfd).
    Uffd(PathBuf),
}

/// What `PUT /snapshot/load` asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadParams {
    /// The state file.
    pub state_path: PathBuf,
    /// The memory.
    pub mem: MemBackend,
    /// Log the pages the guest writes, so that diff snapshots can follow.
    pub track_dirty_pages: bool,
    /// Run the guest at once (otherwise it waits, paused).
    pub resume: bool,
    /// New TAP names, by interface ID.
    pub network_overrides: Vec<(String, String)>,
    /// A new Unix socket path for the vsock device.
    pub vsock_override: Option<PathBuf>,
    /// Move the guest's clock on by the real time that passed since the snapshot.
    pub clock_realtime: bool,
    /// Where the restored guest's serial port goes.
    pub serial: SerialConfig,
}

/// The "meta" section: which snapshot this is and what it needs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// vireo that wrote it.
    pub vireo_version: String,
    /// The id its memory file's trailer carries.
    pub mem_id: u64,
    /// Full or diff.
    pub kind: SnapshotType,
}

/// What a snapshot created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CreateInfo {
    /// Memory pages written.
    pub pages: u64,
    /// Time taken, in microseconds.
    pub micros: u64,
}

fn path_err(what: &'static str, path: &Path, reason: impl std::fmt::Display) -> Error {
    Error::Path {
        what,
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

fn random_id() -> u64 {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        // Uniqueness, not secrecy, is what matters: time and pid will do.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or_default();
        return t ^ (u64::from(std::process::id()) << 32);
    }
    u64::from_le_bytes(b)
}

/// A file written under a temporary name beside its destination and renamed over it only
/// when complete; removed if dropped before that.
struct Staged {
    what: &'static str,
    dest: PathBuf,
    tmp: PathBuf,
    file: Option<File>,
}

impl Staged {
    fn create(what: &'static str, dest: &Path) -> Result<Self, Error> {
        match std::fs::metadata(dest) {
            Ok(m) if m.is_dir() => return Err(path_err(what, dest, "it is a directory")),
            Ok(m) if !m.is_file() => {
                return Err(path_err(what, dest, "it exists and is not a regular file"))
            }
            _ => {}
        }
        let name = dest
            .file_name()
            .ok_or_else(|| path_err(what, dest, "it names no file"))?;
        let dir = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
        if !dir.is_dir() {
            return Err(path_err(
                what,
                dest,
                format!("its directory {} does not exist", dir.display()),
            ));
        }
        remove_orphans(&dir, &name.to_string_lossy());
        let tmp = dir.join(format!(
            ".{}.vireo-tmp-{}-{:x}",
            name.to_string_lossy(),
            std::process::id(),
            random_id()
        ));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| path_err(what, dest, format!("cannot create a file beside it: {e}")))?;
        Ok(Self {
            what,
            dest: dest.to_owned(),
            tmp,
            file: Some(file),
        })
    }

    fn file(&self) -> &File {
        self.file.as_ref().expect("file present until commit")
    }

    fn err(&self, e: impl std::fmt::Display) -> Error {
        path_err(self.what, &self.dest, e)
    }

    fn sync(&self) -> Result<(), Error> {
        self.file()
            .sync_all()
            .map_err(|e| self.err(format!("cannot sync: {e}")))
    }

    fn commit(mut self) -> Result<(), Error> {
        self.file.take();
        std::fs::rename(&self.tmp, &self.dest).map_err(|e| {
            path_err(
                self.what,
                &self.dest,
                format!("cannot rename into place: {e}"),
            )
        })?;
        if let Some(dir) = self.dest.parent().filter(|p| !p.as_os_str().is_empty()) {
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        self.tmp = PathBuf::new();
        Ok(())
    }
}

/// Removes temporary files of `name` left in `dir` by a vireo that was killed while creating a
/// snapshot (their process no longer exists).
fn remove_orphans(dir: &Path, name: &str) {
    let prefix = format!(".{name}.vireo-tmp-");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let file = e.file_name();
        let Some(rest) = file.to_str().and_then(|f| f.strip_prefix(&prefix)) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            tracing::info!(
                "removing {} left by a snapshot create that did not finish",
                e.path().display()
            );
            let _ = std::fs::remove_file(e.path());
        }
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Snapshot counters, under `snapshot` in the metrics.
#[derive(Debug, Default)]
pub struct SnapshotMetrics {
    creates: AtomicU64,
    create_failures: AtomicU64,
    loads: AtomicU64,
    load_failures: AtomicU64,
    pages_written: AtomicU64,
    last_create_us: AtomicU64,
    last_load_us: AtomicU64,
}

impl SnapshotMetrics {
    /// Name and value of every counter.
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            ("creates", l(&self.creates)),
            ("create_failures", l(&self.create_failures)),
            ("loads", l(&self.loads)),
            ("load_failures", l(&self.load_failures)),
            ("pages_written", l(&self.pages_written)),
            ("last_create_us", l(&self.last_create_us)),
            ("last_load_us", l(&self.last_load_us)),
        ]
    }
}

/// This process's snapshot counters.
pub fn metrics() -> &'static SnapshotMetrics {
    static M: std::sync::OnceLock<SnapshotMetrics> = std::sync::OnceLock::new();
    M.get_or_init(SnapshotMetrics::default)
}

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

impl RunningVm {
    /// Writes a snapshot of the paused VM.
    pub fn snapshot(&mut self, p: &CreateParams) -> Result<CreateInfo, Error> {
        let m = metrics();
        match self.write_snapshot(p) {
            Ok(info) => {
                m.creates.fetch_add(1, Ordering::Relaxed);
                m.pages_written.fetch_add(info.pages, Ordering::Relaxed);
                m.last_create_us.store(info.micros, Ordering::Relaxed);
                Ok(info)
            }
            Err(e) => {
                m.create_failures.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    fn write_snapshot(&mut self, p: &CreateParams) -> Result<CreateInfo, Error> {
        let started = Instant::now();
        if !self.paused {
            return Err(Error::NotPaused);
        }
        let m = &self.machine;
        if m.config.huge_pages == crate::config::HugePages::Huge2M {
            return Err(Error::HugePages);
        }

        if p.kind == SnapshotType::Diff && !m.memory.track_dirty {
            return Err(Error::NoDirtyTracking);
        }
        if p.state_path == p.mem_path {
            return Err(path_err(
                "snapshot_path",
                &p.state_path,
                "it is also mem_file_path: state and memory need a file each",
            ));
        }
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for v in &self.vcpus {
            vcpus.push(devices::bus::lock(v).save_state(&m.vm)?);
        }
        // A guest running its own VMs (VMX or SVM on) has nested state in KVM that vireo does
        // not save: such a snapshot would restore broken, so it is refused.
        const CR4_VMXE: u64 = 1 << 13;
        const EFER_SVME: u64 = 1 << 12;
        if let Some(v) = vcpus
            .iter()
            .find(|v| v.sregs.cr4 & CR4_VMXE != 0 || v.sregs.efer & EFER_SVME != 0)
        {
            return Err(Error::Mismatch(format!(
                "vCPU {} has VMX or SVM enabled (the guest runs its own VMs); vireo does not save nested virtualisation state, so it cannot snapshot this VM",
                v.index
            )));
        }
        let vm_state = m.vm.save_state()?;
        let devices = m.devices.save()?;
        // The memory file holds RAM, then the hotplug region.
        let mem_size: u64 = file_size(&m.config);
        let meta = Meta {
            vireo_version: crate::controller::VERSION.to_string(),
            mem_id: random_id(),
            kind: p.kind,
        };

        let mem = Staged::create("mem_file_path", &p.mem_path)?;
        let stats = match p.kind {
            SnapshotType::Full => memory::write_full(&m.memory, mem.file()),
            SnapshotType::Diff => memory::write_diff(&m.memory, &m.vm, mem.file()),
        }
        .map_err(|e| mem.err(format!("cannot write guest memory: {e}")))?;
        let trailer = MemTrailer {
            kind: match p.kind {
                SnapshotType::Full => MemKind::Full,
                SnapshotType::Diff => MemKind::Diff,
            },
            id: meta.mem_id,
            mem_size,
        };
        std::os::unix::fs::FileExt::write_all_at(mem.file(), &trailer.encode(), mem_size)
            .map_err(|e| mem.err(format!("cannot write: {e}")))?;
        mem.sync()?;

        let bytes = format::encode(&[
            ("meta", json(&meta)),
            ("config", json(&m.config)),
            ("vm", json(&vm_state)),
            ("vcpus", json(&vcpus)),
            ("devices", json(&devices)),
        ]);
        let state = Staged::create("snapshot_path", &p.state_path)?;
        std::io::Write::write_all(&mut state.file(), &bytes)
            .map_err(|e| state.err(format!("cannot write: {e}")))?;
        state.sync()?;
        mem.commit()?;
        state.commit()?;
        // The next diff holds what is written from here on.
        if p.kind == SnapshotType::Full {
            memory::reset_dirty(&m.memory, &m.vm)
                .map_err(|e| Error::Mismatch(format!("cannot reset dirty page logs: {e}")))?;
        }
        let micros = started.elapsed().as_micros() as u64;
        tracing::info!(
            "snapshot ({:?}) written to {} and {}: {} memory pages in {} µs",
            p.kind,
            p.state_path.display(),
            p.mem_path.display(),
            stats.pages,
            micros
        );
        Ok(CreateInfo {
            pages: stats.pages,
            micros,
        })
    }

    /// Builds a VM from a snapshot and starts it (paused unless `p.resume`).
    pub fn restore(p: &LoadParams) -> Result<RunningVm, Error> {
        let started = Instant::now();
        let m = metrics();
        let r = Self::load(p);
        match &r {
            Ok(_) => {
                m.loads.fetch_add(1, Ordering::Relaxed);
                m.last_load_us
                    .store(started.elapsed().as_micros() as u64, Ordering::Relaxed);
            }
            Err(_) => {
                m.load_failures.fetch_add(1, Ordering::Relaxed);
            }
        }
        r
    }

    fn load(p: &LoadParams) -> Result<RunningVm, Error> {
        let started = Instant::now();
        let snap = Snapshot::read(&p.state_path)?;
        tracing::debug!(
            "restore: state read at {} µs",
            started.elapsed().as_micros()
        );
        let mem_size = snap.mem_size();
        let ram_size = snap.config.mem_mib << 20;
        let hotplug = match &snap.config.hotplug {
            Some(h) => {
                let l = h
                    .layout(snap.config.mem_mib)
                    .map_err(|e| Error::Mismatch(format!("the snapshot's {e}")))?;
                Some((vm_memory::GuestAddress(l.addr), l.region_size))
            }
            None => None,
        };
        let mut config = snap.config;
        for (iface, tap) in &p.network_overrides {
            let net = config
                .nets
                .iter_mut()
                .find(|n| &n.id == iface)
                .ok_or_else(|| {
                    Error::Mismatch(format!(
                        "network_overrides: the snapshot has no network interface '{iface}'"
                    ))
                })?;
            net.tap = tap.clone();
            net.tap_fd = None;
        }
        if let Some(uds) = &p.vsock_override {
            match config.vsock.as_mut() {
                Some(v) => v.uds = uds.clone(),
                None => {
                    return Err(Error::Mismatch(
                        "vsock_override: the snapshot has no vsock device".into(),
                    ))
                }
            }
        }
        config.track_dirty_pages = p.track_dirty_pages;
        let memory = match &p.mem {
            MemBackend::File(path) => {
                let (file, mem_id) = (path, snap.meta.mem_id);
                let mut memory =
                    open_memory(file, mem_id, mem_size, ram_size, p.track_dirty_pages)?;
                if let Some((addr, len)) = hotplug {
                    let f = match &memory.backing {
                        Backing::File(f) => f.try_clone(),
                        _ => Err(std::io::Error::other("not mapped from the file")),
                    }
                    .map_err(|e| path_err("mem_backend", path, e))?;
                    memory
                        .add_hotplug(addr, len, Some((&f, ram_size)))
                        .map_err(crate::Error::from)?;
                }
                memory
            }
            MemBackend::Uffd(path) => {
                // A balloon releases pages the handler filled: it must hear of it
                // (UFFD_EVENT_REMOVE) and serve zeros on the next fault, as with Firecracker.
                let removes = config.balloon.is_some();
                Memory::from_uffd(ram_size, p.track_dirty_pages, path, removes, hotplug)
                    .map_err(|e| path_err("mem_backend", path, e))?
            }
        };
        tracing::debug!(
            "restore: memory mapped at {} µs",
            started.elapsed().as_micros()
        );
        let machine = build(config, memory, &snap.vm, &snap.vcpus, &snap.devices, p)?;
        tracing::debug!(
            "restore: machine built at {} µs",
            started.elapsed().as_micros()
        );
        let vm = RunningVm::launch(machine, &p.serial, !p.resume)?;
        tracing::info!(
            "restored from {} in {} µs",
            p.state_path.display(),
            started.elapsed().as_micros()
        );
        Ok(vm)
    }
}

/// A state file, read and checked.
struct Snapshot {
    meta: Meta,
    config: VmConfig,
    vm: VmState,
    vcpus: Vec<VcpuState>,
    devices: DevicesState,
}

impl Snapshot {
    fn read(path: &Path) -> Result<Self, Error> {
        let what = "snapshot_path";
        let mut file = utils::files::open_input(path, utils::files::Kind::Regular, false)
            .map_err(|e| path_err(what, path, e))?;
        let len = file.metadata().map_err(|e| path_err(what, path, e))?.len();
        if len > format::MAX_STATE_BYTES {
            return Err(path_err(
                what,
                path,
                format!(
                    "it is {len} bytes, larger than any vireo state file ({} at most)",
                    format::MAX_STATE_BYTES
                ),
            ));
        }
        let mut data = Vec::with_capacity(len as usize);
        file.read_to_end(&mut data)
            .map_err(|e| path_err(what, path, e))?;
        Self::parse(&data, path)
    }

    /// Decodes and checks a state file's bytes (`path` names it in errors).
    fn parse(data: &[u8], path: &Path) -> Result<Self, Error> {
        let what = "snapshot_path";
        let sections = format::decode(data).map_err(|err| Error::Format {
            what,
            path: path.to_owned(),
            err,
        })?;
        let section = |name: &str| -> Result<&[u8], Error> {
            sections
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, d)| *d)
                .ok_or_else(|| Error::Format {
                    what,
                    path: path.to_owned(),
                    err: FormatError::Malformed(format!("it has no {name} section")),
                })
        };
        fn parse<T: for<'de> Deserialize<'de>>(
            path: &Path,
            name: &str,
            data: &[u8],
        ) -> Result<T, Error> {
            serde_json::from_slice(data).map_err(|e| Error::Format {
                what: "snapshot_path",
                path: path.to_owned(),
                err: FormatError::Malformed(format!("section {name}: {e}")),
            })
        }
        let meta: Meta = parse(path, "meta", section("meta")?)?;
        let snap = Self {
            config: parse(path, "config", section("config")?)?,
            vm: parse(path, "vm", section("vm")?)?,
            vcpus: parse(path, "vcpus", section("vcpus")?)?,
            devices: parse(path, "devices", section("devices")?)?,
            meta,
        };
        if snap.vcpus.len() as u32 != snap.config.vcpus {
            return Err(Error::Mismatch(format!(
                "snapshot {}: it holds {} vCPU states for a {}-vCPU machine",
                path.display(),
                snap.vcpus.len(),
                snap.config.vcpus
            )));
        }
        Ok(snap)
    }

    /// Bytes of guest memory in the memory file: RAM, then the hotplug region.
    fn mem_size(&self) -> u64 {
        file_size(&self.config)
    }
}

/// Checks a state file's bytes as a load does, without building anything: for the fuzz
/// target and for tools that inspect snapshots.
pub fn check_state(data: &[u8]) -> Result<(), Error> {
    Snapshot::parse(data, Path::new("<bytes>")).map(|_| ())
}

/// The fuzz target's entry point: `data` as a state file, and wrapped in a well-formed
/// container (valid checksums) whose five sections are its 0xff-separated parts, so that the
/// section parsers are reached too.
#[doc(hidden)]
pub fn fuzz_state(data: &[u8]) {
    let _ = check_state(data);
    let names = ["meta", "config", "vm", "vcpus", "devices"];
    let mut parts = data.split(|&b| b == 0xff);
    let sections: Vec<(&str, Vec<u8>)> = names
        .iter()
        .map(|n| (*n, parts.next().unwrap_or(&[]).to_vec()))
        .collect();
    let _ = check_state(&format::encode(&sections));
}

/// Bytes of guest memory a memory file holds for `config`: RAM, then the hotplug region.
fn file_size(config: &VmConfig) -> u64 {
    (config.mem_mib << 20) + config.hotplug.map_or(0, |h| h.total_mib << 20)
}

/// Opens a memory file and checks that it is the one the state file names, whole, and maps
/// its first `ram_size` bytes as guest RAM.
fn open_memory(
    path: &Path,
    mem_id: u64,
    mem_size: u64,
    ram_size: u64,
    track_dirty: bool,
) -> Result<Memory, Error> {
    let what = "mem_backend";
    let file = utils::files::open_input(path, utils::files::Kind::Regular, false)
        .map_err(|e| path_err(what, path, e))?;
    let len = file.metadata().map_err(|e| path_err(what, path, e))?.len();
    let want = mem_size + TRAILER_BYTES;
    if len != want {
        return Err(path_err(
            what,
            path,
            format!(
                "it is {len} bytes; the snapshot's guest has {} bytes of memory, so its memory file is {want} bytes",
                mem_size
            ),
        ));
    }
    let mut page = vec![0u8; TRAILER_BYTES as usize];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut page, mem_size)
        .map_err(|e| path_err(what, path, e))?;
    let trailer = MemTrailer::decode(&page).map_err(|err| Error::Format {
        what,
        path: path.to_owned(),
        err,
    })?;
    if trailer.kind == MemKind::Diff {
        return Err(path_err(
            what,
            path,
            "it holds only a diff snapshot's pages: merge it into its base memory file first (vireo snapshot rebase --base-file BASE --diff-file DIFF) and load the base",
        ));
    }
    if trailer.id != mem_id || trailer.mem_size != mem_size {
        return Err(Error::Mismatch(format!(
            "memory file {} belongs to another snapshot (id {:016x}) than the state file (id {:016x}): they were not created together",
            path.display(),
            trailer.id,
            mem_id
        )));
    }
    Memory::from_file(file, ram_size, track_dirty).map_err(|e| crate::Error::from(e).into())
}

/// Builds the machine: KVM VM, memory, devices from the configuration, then the saved state
/// of the VM, every vCPU and every device.
fn build(
    config: VmConfig,
    memory: Memory,
    vm_state: &VmState,
    vcpu_states: &[VcpuState],
    devices_state: &DevicesState,
    p: &LoadParams,
) -> Result<Machine, Error> {
    crate::builder::validate_machine(config.vcpus, config.mem_mib)?;
    let t = Instant::now();
    let mut config = config;
    config.serial = p.serial.clone();
    let (vm, mut devices) = crate::builder::platform(&config, &memory)?;
    tracing::debug!(
        "restore: VM and devices created in {} µs",
        t.elapsed().as_micros()
    );
    vm.restore_state(vm_state, p.clock_realtime)?;
    let mut vcpus = Vec::with_capacity(vcpu_states.len());
    for (index, s) in vcpu_states.iter().enumerate() {
        if s.index != index as u32 {
            return Err(Error::Mismatch(format!(
                "vCPU state {index} is for vCPU {}",
                s.index
            )));
        }
        let vcpu = Vcpu::new(&vm, index as u32).map_err(crate::Error::from)?;
        vcpu.restore_state(&vm, s, vcpu_states.len() as u32)?;
        vcpus.push(vcpu);
    }
    tracing::debug!("restore: vCPUs restored at {} µs", t.elapsed().as_micros());
    // Devices last: they raise interrupts that were pending, into restored controllers.
    devices.restore(devices_state, &memory.guest)?;
    Ok(Machine::assemble(vm, memory, vcpus, devices, None, config))
}

/// Merges the diff memory file `diff` into the full memory file `base`, which then belongs
/// to the diff's snapshot. Clones running from `base` must be stopped first: pages they have
/// not written are read from the file.
pub fn rebase(base: &Path, diff: &Path) -> Result<u64, Error> {
    let read_trailer = |what: &'static str, path: &Path, f: &File| -> Result<MemTrailer, Error> {
        let len = f.metadata().map_err(|e| path_err(what, path, e))?.len();
        if len < TRAILER_BYTES {
            return Err(path_err(what, path, "it is too short to be a memory file"));
        }
        let mut page = vec![0u8; TRAILER_BYTES as usize];
        std::os::unix::fs::FileExt::read_exact_at(f, &mut page, len - TRAILER_BYTES)
            .map_err(|e| path_err(what, path, e))?;
        let t = MemTrailer::decode(&page).map_err(|err| Error::Format {
            what,
            path: path.to_owned(),
            err,
        })?;
        if t.mem_size + TRAILER_BYTES != len {
            return Err(path_err(what, path, "its size does not match its trailer"));
        }
        Ok(t)
    };
    let b = utils::files::open_input(base, utils::files::Kind::Regular, true)
        .map_err(|e| path_err("base file", base, e))?;
    let d = utils::files::open_input(diff, utils::files::Kind::Regular, false)
        .map_err(|e| path_err("diff file", diff, e))?;
    let bt = read_trailer("base file", base, &b)?;
    let dt = read_trailer("diff file", diff, &d)?;
    if bt.kind != MemKind::Full {
        return Err(path_err(
            "base file",
            base,
            "it is a diff; the base must be a full memory file",
        ));
    }
    if dt.kind != MemKind::Diff {
        return Err(path_err(
            "diff file",
            diff,
            "it is a full memory file, not a diff",
        ));
    }
    if bt.mem_size != dt.mem_size {
        return Err(Error::Mismatch(format!(
            "base file {} holds {} bytes of guest memory, diff file {} {}",
            base.display(),
            bt.mem_size,
            diff.display(),
            dt.mem_size
        )));
    }
    let pages = memory::merge(&b, &d, dt.mem_size).map_err(|e| path_err("base file", base, e))?;
    let merged = MemTrailer {
        kind: MemKind::Full,
        id: dt.id,
        mem_size: dt.mem_size,
    };
    std::os::unix::fs::FileExt::write_all_at(&b, &merged.encode(), dt.mem_size)
        .map_err(|e| path_err("base file", base, e))?;
    b.sync_all().map_err(|e| path_err("base file", base, e))?;
    Ok(pages)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every input kept in the repository for the fuzz target runs without a panic.
    #[test]
    fn fuzz_corpus_replays() {
        for (name, data) in utils::fuzz_corpus("snapshot_state") {
            let r = std::panic::catch_unwind(|| fuzz_state(&data));
            assert!(r.is_ok(), "panic on corpus input {name}");
        }
    }

    /// Whatever the bytes, checking a state file answers with an error and never panics: raw
    /// noise, and well-formed containers whose sections hold noise or the wrong JSON.
    #[test]
    fn state_checks_never_panic() {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let names = ["meta", "config", "vm", "vcpus", "devices"];
        for i in 0..2000 {
            let len = (next() % 300) as usize;
            let noise: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            assert!(check_state(&noise).is_err());
            let sections: Vec<(&str, Vec<u8>)> = names
                .iter()
                .map(|n| {
                    let payload = match next() % 4 {
                        0 => b"{}".to_vec(),
                        1 => b"[]".to_vec(),
                        2 => format!("{{\"index\":{i}}}").into_bytes(),
                        _ => noise.clone(),
                    };
                    (*n, payload)
                })
                .collect();
            let err = check_state(&format::encode(&sections)).unwrap_err();
            assert!(err.to_string().contains("malformed"), "{err}");
        }
    }
}
