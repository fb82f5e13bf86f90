//! The Linux kit: `vireo rootfs build`, and `vireo run --rootfs … -- CMD`, which builds (or
//! finds cached) an image, boots it with the agent as init, runs CMD through the agent and
//! exits with its status.

use crate::guest::{self, EXIT_AGENT_FAILED};
use clap::{Args, Subcommand};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use vmm::VmConfig;

#[derive(Subcommand, Debug)]
pub enum RootfsCommand {
    /// Make an ext4 root file system image from a directory or an OCI image (layout
    /// directory, OCI tarball or `docker save` tarball), with vireo-agent installed.
    Build(BuildArgs),
}

#[derive(Args, Debug)]
pub struct BuildArgs {
    /// A directory (the root as it is), an OCI image layout directory, or an image tarball.
    #[arg(value_name = "SRC")]
    src: PathBuf,
    /// The image to write. Without it the image goes to the cache `vireo run --rootfs` uses
    /// (keyed by content; built only if missing) and its path is printed.
    #[arg(short = 'o', long, value_name = "PATH")]
    output: Option<PathBuf>,
    /// Its size in MiB (default: the smallest that fits, plus headroom).
    #[arg(long, value_name = "MIB")]
    size: Option<u64>,
    /// The vireo-agent to install (a static build; see `vireo rootfs build --help`).
    #[arg(long, value_name = "PATH")]
    agent: Option<PathBuf>,
}

/// Where vireo keeps what it builds and finds: `$XDG_DATA_HOME/vireo` (kernel, agent) and
/// `$XDG_CACHE_HOME/vireo` (images).
fn home_dir(xdg: &str, fallback: &str) -> PathBuf {
    std::env::var_os(xdg)
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(fallback)))
        .unwrap_or_else(|| PathBuf::from("/tmp"))
        .join("vireo")
}

/// Where built images are kept, keyed by content.
fn cache_dir() -> PathBuf {
    home_dir("XDG_CACHE_HOME", ".cache").join("rootfs")
}

/// The kernel `vireo run --rootfs` boots without --kernel: where scripts/build-kernel.sh puts
/// it.
pub fn default_kernel() -> PathBuf {
    std::env::var_os("VIREO_KERNEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| home_dir("XDG_DATA_HOME", ".local/share"))
        .join("vmlinux")
}

/// The agent to install: --agent, $VIREO_AGENT, beside the vireo binary, or in vireo's data
/// directory; it must be statically linked, since the image may have no C library.
fn find_agent(given: Option<&Path>) -> Result<PathBuf, String> {
    let candidates: Vec<PathBuf> = match given {
        Some(p) => vec![p.to_path_buf()],
        None => std::env::var_os("VIREO_AGENT")
            .map(PathBuf::from)
            .into_iter()
            .chain(
                std::env::current_exe()
                    .ok()
                    .and_then(|e| e.parent().map(|d| d.join("vireo-agent"))),
            )
            .chain(std::iter::once(
                home_dir("XDG_DATA_HOME", ".local/share").join("vireo-agent"),
            ))
            .collect(),
    };
    let Some(agent) = candidates.iter().find(|p| p.is_file()) else {
        return Err(format!(
            "no vireo-agent found (looked at {}); build it with `cargo build --release -p agent --target x86_64-unknown-linux-musl` and pass --agent or set VIREO_AGENT",
            candidates
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    };
    if !rootfs::is_static(agent).map_err(|e| e.to_string())? {
        return Err(format!(
            "{} is dynamically linked and would not run in an image without its C library; use the static build (--target x86_64-unknown-linux-musl)",
            agent.display()
        ));
    }
    Ok(agent.clone())
}

fn warn(built: Option<&rootfs::Built>) {
    for w in built.iter().flat_map(|b| &b.warnings) {
        eprintln!("vireo: warning: {w}");
    }
}

/// `vireo rootfs build`.
pub fn rootfs(cmd: &RootfsCommand) -> u8 {
    let RootfsCommand::Build(args) = cmd;
    let r = find_agent(args.agent.as_deref()).and_then(|agent| {
        let options = rootfs::Options {
            size_mib: args.size,
            agent,
        };
        let Some(output) = &args.output else {
            let (image, built) =
                rootfs::cached(&args.src, &cache_dir(), &options).map_err(|e| e.to_string())?;
            warn(built.as_ref());
            let how = if built.is_some() { "built" } else { "cached" };
            println!("{} ({how})", image.display());
            return Ok(());
        };
        let built = rootfs::build(&args.src, output, &options).map_err(|e| e.to_string())?;
        warn(Some(&built));
        println!(
            "{}: {} MiB ext4 from {} ({:?}), agent at {}",
            output.display(),
            built.size_mib,
            args.src.display(),
            built.kind,
            rootfs::AGENT_PATH
        );
        Ok(())
    });
    match r {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("vireo: error: {e}");
            1
        }
    }
}

/// What `vireo run --rootfs` adds to a plain run.
pub struct RootfsRun {
    pub src: PathBuf,
    pub agent: Option<PathBuf>,
    pub argv: Vec<String>,
    pub tty: bool,
    /// How long the agent may take to answer after boot.
    pub boot_timeout: Duration,
}

/// `vireo run --rootfs SRC -- CMD`: returns CMD's exit status.
pub fn run(mut config: VmConfig, kernel_given: bool, r: &RootfsRun) -> u8 {
    match prepare(&mut config, kernel_given, r) {
        Ok(scratch) => {
            let code = boot_and_run(config, r);
            drop(scratch);
            code
        }
        Err(e) => {
            eprintln!("vireo: error: {e}");
            vmm::EXIT_CODE_ERROR as u8
        }
    }
}

/// Files of one run, removed when it ends.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn prepare(config: &mut VmConfig, kernel_given: bool, r: &RootfsRun) -> Result<Scratch, String> {
    if !kernel_given {
        config.kernel = default_kernel();
        if !config.kernel.is_file() {
            return Err(format!(
                "no kernel given and none at {}: build one with scripts/build-kernel.sh (or pass --kernel)",
                config.kernel.display()
            ));
        }
    }
    let agent = find_agent(r.agent.as_deref())?;
    let options = rootfs::Options {
        size_mib: None,
        agent,
    };
    let (image, built) =
        rootfs::cached(&r.src, &cache_dir(), &options).map_err(|e| e.to_string())?;
    warn(built.as_ref());
    tracing::info!(
        "root file system {} ({})",
        image.display(),
        if built.is_some() { "built" } else { "cached" }
    );
    let scratch = std::env::temp_dir().join(format!("vireo-run-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).map_err(|e| format!("{}: {e}", scratch.display()))?;
    let scratch = Scratch(scratch);
    // The guest writes to its own copy; the cached image stays as built.
    let disk = scratch.0.join("rootfs.ext4");
    std::fs::copy(&image, &disk)
        .map_err(|e| format!("{} -> {}: {e}", image.display(), disk.display()))?;
    config.drives.insert(
        0,
        vmm::DriveConfig {
            path: disk,
            id: Some("rootfs".into()),
            read_only: false,
            root: true,
            rate_limiter: Default::default(),
            io_engine: Default::default(),
        },
    );
    config.cmdline = format!("{} rw init={}", config.cmdline, rootfs::AGENT_PATH);
    if config.vsock.is_none() {
        config.vsock = Some(vmm::config::VsockConfig {
            cid: 3,
            uds: scratch.0.join("vsock.sock"),
        });
    }
    // The command's output is the run's output: the console goes nowhere unless asked.
    if matches!(config.serial, vmm::SerialConfig::Stdio) {
        config.serial = vmm::SerialConfig::None;
    }
    Ok(scratch)
}

fn boot_and_run(config: VmConfig, r: &RootfsRun) -> u8 {
    let uds = config
        .vsock
        .as_ref()
        .map(|v| v.uds.clone())
        .unwrap_or_default();
    let vm = std::thread::Builder::new()
        .name("vmm".into())
        .spawn(move || vmm::run(&config));
    let vm = match vm {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("vireo: error: cannot start the VMM thread: {e}");
            return vmm::EXIT_CODE_ERROR as u8;
        }
    };
    // The agent listens once the kernel has started it.
    let start = Instant::now();
    let stream = loop {
        if vm.is_finished() {
            match vm.join() {
                Ok(Ok(reason)) => {
                    crate::report(&reason);
                    eprintln!("vireo: error: the VM ended before its agent answered ({reason:?})");
                    return EXIT_AGENT_FAILED;
                }
                Ok(Err(e)) => eprintln!("vireo: error: {e}"),
                Err(_) => eprintln!("vireo: error: the VMM thread failed"),
            }
            return vmm::EXIT_CODE_ERROR as u8;
        }
        match guest::vsock_connect(&uds, agent::proto::PORT) {
            Ok(s) => break s,
            Err(e) if start.elapsed() > r.boot_timeout => {
                eprintln!(
                    "vireo: error: the guest's agent did not answer within {:?}: {e}",
                    r.boot_timeout
                );
                return EXIT_AGENT_FAILED;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    tracing::info!("agent answered {:?} after start", start.elapsed());
    let tty = r.tty.then(guest::tty_size);
    let request = guest::exec_request(r.argv.clone(), &[], tty);
    let code = guest::run_command(stream, &request);
    // Power off cleanly (file systems synced), then wait for the VM to end.
    if let Err(e) = guest::vsock_connect(&uds, agent::proto::PORT)
        .and_then(|s| agent::exec::power_off(s).map_err(|e| e.to_string()))
    {
        eprintln!("vireo: warning: could not power the guest off: {e}");
    }
    let end = Instant::now() + Duration::from_secs(10);
    while !vm.is_finished() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(5));
    }
    if !vm.is_finished() {
        eprintln!("vireo: warning: the guest did not power off within 10 s; stopping it");
    }
    code
}
