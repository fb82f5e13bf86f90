//! Loading a kernel, its initrd and command line, and writing the boot data its protocol
//! expects. The protocol is chosen from the image:
//!
//! * ELF with a `XEN_ELFNOTE_PHYS32_ENTRY` note → PVH (32-bit protected mode, hvm_start_info);
//! * other ELF (vmlinux) → Linux 64-bit boot protocol at the ELF entry;
//! * bzImage (`HdrS` at 0x202) → Linux 64-bit boot protocol at the protected-mode kernel + 0x200.

mod linux;
mod pvh;

use crate::memory::GuestMemoryMmap;
use arch::layout::{self, MemoryRegion};
use arch::regs::EntryMode;
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{BzImage, Elf, KernelLoader, PvhBootCapability};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, ReadVolatile};

/// The kinds of kernel image vireo boots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// ELF vmlinux entered at its 64-bit entry point.
    Elf,
    /// ELF with a PVH entry note.
    Pvh,
    /// bzImage.
    BzImage,
}

impl std::fmt::Display for KernelFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KernelFormat::Elf => "ELF (64-bit boot protocol)",
            KernelFormat::Pvh => "ELF (PVH boot protocol)",
            KernelFormat::BzImage => "bzImage (64-bit boot protocol)",
        })
    }
}

/// Errors loading the kernel and its boot data.
#[derive(Debug, Error)]
pub enum Error {
    /// Reading an input file failed.
    #[error("cannot read {what} {path}: {err}")]
    Io {
        /// "kernel image" or "initrd".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Cause.
        err: std::io::Error,
    },
    /// Neither ELF nor bzImage.
    #[error("kernel image {0} is not a kernel vireo can boot: no ELF header and no bzImage 'HdrS' signature at offset 0x202")]
    UnknownFormat(PathBuf),
    /// linux-loader rejected the image.
    #[error("kernel image {path} is not a loadable {format}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What it looked like.
        format: &'static str,
        /// What was wrong.
        reason: String,
    },
    /// A bzImage without a 64-bit entry point.
    #[error("bzImage {path} (boot protocol {major}.{minor:02}) has no 64-bit entry point: vireo needs boot protocol 2.12 or later with XLF_KERNEL_64")]
    BzImageNot64Bit {
        /// The file.
        path: PathBuf,
        /// Protocol major.
        major: u16,
        /// Protocol minor.
        minor: u16,
    },
    /// The kernel does not fit in guest memory.
    #[error("kernel image {path} needs memory up to {end:#x} but the guest's low memory ends at {ram_end:#x}: give the guest more memory (--memory, mem_size_mib)")]
    KernelTooBig {
        /// The file.
        path: PathBuf,
        /// End of the kernel's footprint.
        end: u64,
        /// End of low RAM.
        ram_end: u64,
    },
    /// The command line is longer than the protocol allows.
    #[error("kernel command line is {len} bytes ({added} of them the device entries vireo appends, such as virtio_mmio.device= and root=) but this kernel accepts at most {max}")]
    CmdlineTooLong {
        /// Length given.
        len: usize,
        /// Bytes vireo appended to the user's command line.
        added: usize,
        /// Longest accepted, without the terminating NUL.
        max: usize,
    },
    /// The command line contains a NUL byte.
    #[error("kernel command line contains a NUL byte at offset {0}")]
    CmdlineNul(usize),
    /// The initrd does not fit between the kernel and the end of reachable memory.
    #[error("initrd {path} is {size} bytes but only {room} bytes fit between the kernel's end ({kernel_end:#x}) and {limit:#x}: give the guest more memory (--memory, mem_size_mib) or use a smaller initrd")]
    InitrdTooBig {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// Space available.
        room: u64,
        /// End of the kernel.
        kernel_end: u64,
        /// Highest address the initrd may reach.
        limit: u64,
    },
    /// Writing boot data into guest memory failed.
    #[error("cannot write {0} into guest memory")]
    GuestMemory(&'static str),
}

/// What the bootstrap vCPU needs to start the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootSetup {
    /// The image kind that was found.
    pub format: KernelFormat,
    /// How the vCPU enters the kernel.
    pub mode: EntryMode,
    /// Entry point (guest physical).
    pub entry: u64,
}

/// An initrd as placed in guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitrdPlacement {
    /// Guest physical address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
}

/// XLF_KERNEL_64: the bzImage has a 64-bit entry at its load address + 0x200.
const XLF_KERNEL_64: u16 = 1;
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
const HDRS_MAGIC: &[u8; 4] = b"HdrS";
const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
/// Highest initrd end for bzImages older than protocol 2.03, which do not say.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
/// Linux's default initrd_addr_max for kernels that do not say (vmlinux, PVH).
const VMLINUX_INITRD_ADDR_MAX: u64 = 0x7fff_ffff;

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |err| Error::Io {
        what,
        path: path.to_owned(),
        err,
    }
}

fn page_align_up(v: u64) -> u64 {
    (v + 0xfff) & !0xfff
}

/// The result of loading the kernel image alone.
struct LoadedKernel {
    setup: BootSetup,
    /// First byte above everything the kernel occupies (or will, while it decompresses).
    end: u64,
    header: Option<setup_header>,
}

fn detect(path: &Path, file: &mut File) -> Result<(KernelFormat, Option<setup_header>), Error> {
    let mut head = vec![0u8; 0x1f1 + std::mem::size_of::<setup_header>()];
    file.seek(SeekFrom::Start(0))
        .map_err(io_err("kernel image", path))?;
    let mut got = 0;
    while got < head.len() {
        match file.read(&mut head[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err("kernel image", path)(e)),
        }
    }
    if got >= 4 && &head[..4] == ELF_MAGIC {
        return Ok((KernelFormat::Elf, None));
    }
    if got == head.len() && &head[0x202..0x206] == HDRS_MAGIC {
        let hdr: setup_header = vm_memory::ByteValued::from_slice(&head[0x1f1..])
            .copied()
            .expect("slice has the header's size");
        return Ok((KernelFormat::BzImage, Some(hdr)));
    }
    Err(Error::UnknownFormat(path.to_owned()))
}

fn load_kernel(
    mem: &GuestMemoryMmap,
    path: &Path,
    file: &mut File,
    mem_size: u64,
) -> Result<LoadedKernel, Error> {
    let ram_end = layout::low_ram_end(mem_size);
    let invalid = |format: &'static str, reason: String| Error::Invalid {
        path: path.to_owned(),
        format,
        reason,
    };
    match detect(path, file)? {
        (KernelFormat::BzImage, Some(hdr)) => {
            let version = hdr.version;
            if version < 0x020c || hdr.xloadflags & XLF_KERNEL_64 == 0 {
                return Err(Error::BzImageNot64Bit {
                    path: path.to_owned(),
                    major: version >> 8,
                    minor: version & 0xff,
                });
            }
            // A relocatable kernel states where it prefers to run; others run where they
            // were linked (code32_start).
            let load = if hdr.relocatable_kernel != 0 && hdr.pref_address >= layout::HIMEM_START {
                hdr.pref_address
            } else {
                u64::from(hdr.code32_start)
            };
            let file_len = file
                .seek(SeekFrom::End(0))
                .map_err(io_err("kernel image", path))?;
            let setup_sects = if hdr.setup_sects == 0 {
                4
            } else {
                hdr.setup_sects
            };
            let payload = file_len.saturating_sub((u64::from(setup_sects) + 1) * 512);
            let end = load + payload.max(u64::from(hdr.init_size));
            if load < layout::HIMEM_START || end > ram_end {
                return Err(Error::KernelTooBig {
                    path: path.to_owned(),
                    end,
                    ram_end,
                });
            }
            let result = BzImage::load(
                mem,
                Some(GuestAddress(load)),
                file,
                Some(GuestAddress(layout::HIMEM_START)),
            )
            .map_err(|e| invalid("bzImage", e.to_string()))?;
            Ok(LoadedKernel {
                setup: BootSetup {
                    format: KernelFormat::BzImage,
                    mode: EntryMode::Linux64,
                    entry: load + BZIMAGE_64BIT_ENTRY_OFFSET,
                },
                end,
                header: result.setup_header.or(Some(hdr)),
            })
        }
        _ => {
            let loaded = Elf::load(mem, None, file, Some(GuestAddress(layout::HIMEM_START)));
            // The segments' footprint (bss included) tells a kernel too big for guest memory
            // apart from one whose file is cut short.
            let footprint = elf_memory_end(file).unwrap_or(0);
            let result = loaded.map_err(|e| match e {
                linux_loader::loader::Error::Elf(
                    linux_loader::loader::elf::Error::ReadKernelImage,
                ) if footprint > ram_end => Error::KernelTooBig {
                    path: path.to_owned(),
                    end: footprint,
                    ram_end,
                },
                e => invalid("x86_64 ELF kernel", e.to_string()),
            })?;
            let setup = match result.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(entry) => BootSetup {
                    format: KernelFormat::Pvh,
                    mode: EntryMode::Pvh,
                    entry: entry.0,
                },
                _ => BootSetup {
                    format: KernelFormat::Elf,
                    mode: EntryMode::Linux64,
                    entry: result.kernel_load.0,
                },
            };
            Ok(LoadedKernel {
                setup,
                end: result.kernel_end.max(footprint),
                header: None,
            })
        }
    }
}

/// Most program headers read when sizing an ELF kernel; a kernel has a handful.
const MAX_ELF_PHDRS: u16 = 64;

/// One past the highest byte any PT_LOAD segment occupies in memory, counting zero-filled
/// memory (bss): linux-loader's `kernel_end` skips segments with no file contents, and an
/// initrd placed over a kernel's bss would be wiped when the kernel clears it.
fn elf_memory_end(file: &mut File) -> Option<u64> {
    use linux_loader::elf::{Elf64_Ehdr, Elf64_Phdr, PT_LOAD};
    use vm_memory::ByteValued;
    let mut ehdr = Elf64_Ehdr::default();
    file.seek(SeekFrom::Start(0)).ok()?;
    file.read_exact(ehdr.as_mut_slice()).ok()?;
    file.seek(SeekFrom::Start(ehdr.e_phoff)).ok()?;
    let mut end = 0u64;
    for _ in 0..ehdr.e_phnum.min(MAX_ELF_PHDRS) {
        let mut phdr = Elf64_Phdr::default();
        file.read_exact(phdr.as_mut_slice()).ok()?;
        if phdr.p_type == PT_LOAD {
            end = end.max(phdr.p_paddr.checked_add(phdr.p_memsz)?);
        }
    }
    Some(end)
}

fn write_cmdline(
    mem: &GuestMemoryMmap,
    cmdline: &str,
    added: usize,
    header: Option<&setup_header>,
) -> Result<(), Error> {
    let protocol_max = match header {
        // cmdline_size (2.06+) excludes the NUL; older kernels take 255 characters.
        Some(h) if h.version >= 0x0206 => h.cmdline_size as usize,
        Some(_) => 255,
        None => layout::CMDLINE_MAX_SIZE - 1,
    };
    let max = protocol_max.min((layout::EBDA_START - layout::CMDLINE_START) as usize - 1);
    if let Some(pos) = cmdline.bytes().position(|b| b == 0) {
        return Err(Error::CmdlineNul(pos));
    }
    if cmdline.len() > max {
        return Err(Error::CmdlineTooLong {
            len: cmdline.len(),
            added,
            max,
        });
    }
    let mut bytes = Vec::with_capacity(cmdline.len() + 1);
    bytes.extend_from_slice(cmdline.as_bytes());
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(layout::CMDLINE_START))
        .map_err(|_| Error::GuestMemory("the command line"))
}

fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    file: &mut File,
    kernel: &LoadedKernel,
    mem_size: u64,
) -> Result<InitrdPlacement, Error> {
    let size = file
        .seek(SeekFrom::End(0))
        .map_err(io_err("initrd", path))?;
    file.seek(SeekFrom::Start(0))
        .map_err(io_err("initrd", path))?;
    let addr_max = match (&kernel.header, kernel.setup.mode) {
        (Some(h), _) if h.version >= 0x0203 => u64::from(h.initrd_addr_max),
        (Some(_), _) => DEFAULT_INITRD_ADDR_MAX,
        (None, EntryMode::Linux64) => VMLINUX_INITRD_ADDR_MAX,
        (None, EntryMode::Pvh) => layout::MMIO_GAP_START - 1,
    };
    let limit = layout::low_ram_end(mem_size).min(addr_max.saturating_add(1));
    let kernel_end = page_align_up(kernel.end);
    let room = limit.saturating_sub(kernel_end);
    if size > room {
        return Err(Error::InitrdTooBig {
            path: path.to_owned(),
            size,
            room,
            kernel_end,
            limit,
        });
    }
    let addr = (limit - size) & !0xfff;
    if addr < kernel_end {
        return Err(Error::InitrdTooBig {
            path: path.to_owned(),
            size,
            room: room & !0xfff,
            kernel_end,
            limit,
        });
    }
    mem.read_exact_volatile_from(
        GuestAddress(addr),
        &mut ReadVolatileFile(file),
        size as usize,
    )
    .map_err(|e| Error::Io {
        what: "initrd",
        path: path.to_owned(),
        err: std::io::Error::other(e.to_string()),
    })?;
    Ok(InitrdPlacement { addr, size })
}

/// Adapter so a `&mut File` can feed guest memory directly.
struct ReadVolatileFile<'a>(&'a mut File);

impl ReadVolatile for ReadVolatileFile<'_> {
    fn read_volatile<B: vm_memory::bitmap::BitmapSlice>(
        &mut self,
        buf: &mut vm_memory::VolatileSlice<B>,
    ) -> Result<usize, vm_memory::VolatileMemoryError> {
        self.0.read_volatile(buf)
    }
}

/// Inputs to [`load`].
pub struct BootInputs<'a> {
    /// Kernel image path, for messages.
    pub kernel_path: &'a Path,
    /// Open kernel image.
    pub kernel: &'a mut File,
    /// Initrd path and open file.
    pub initrd: Option<(&'a Path, &'a mut File)>,
    /// Kernel command line.
    pub cmdline: &'a str,
    /// How many bytes at the end of `cmdline` vireo added (device entries), for messages.
    pub cmdline_added: usize,
    /// Guest memory size in bytes.
    pub mem_size: u64,
}

/// Loads the kernel, command line and initrd into `mem` and writes the boot data
/// (zero page or hvm_start_info, GDT, page tables) for the protocol the image calls for.
pub fn load(mem: &GuestMemoryMmap, inputs: BootInputs<'_>) -> Result<BootSetup, Error> {
    let kernel = load_kernel(mem, inputs.kernel_path, inputs.kernel, inputs.mem_size)?;
    write_cmdline(
        mem,
        inputs.cmdline,
        inputs.cmdline_added,
        kernel.header.as_ref(),
    )?;
    let initrd = match inputs.initrd {
        Some((path, file)) => Some(load_initrd(mem, path, file, &kernel, inputs.mem_size)?),
        None => None,
    };
    let memory_map: Vec<MemoryRegion> =
        layout::memory_map(inputs.mem_size).map_err(|_| Error::GuestMemory("the memory map"))?;
    match kernel.setup.mode {
        EntryMode::Linux64 => linux::write_zero_page(
            mem,
            kernel.header,
            inputs.cmdline.len(),
            initrd,
            &memory_map,
        )?,
        EntryMode::Pvh => pvh::write_start_info(mem, initrd, &memory_map)?,
    }
    write_cpu_tables(mem, kernel.setup.mode)?;
    Ok(kernel.setup)
}

fn write_cpu_tables(mem: &GuestMemoryMmap, mode: EntryMode) -> Result<(), Error> {
    for (i, entry) in mode.gdt().iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(layout::BOOT_GDT_START + i as u64 * 8))
            .map_err(|_| Error::GuestMemory("the boot GDT"))?;
    }
    mem.write_obj(0u64, GuestAddress(layout::BOOT_IDT_START))
        .map_err(|_| Error::GuestMemory("the boot IDT"))?;
    if mode == EntryMode::Linux64 {
        for (addr, table) in arch::paging::identity_map_tables() {
            let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_le_bytes()).collect();
            mem.write_slice(&bytes, GuestAddress(addr))
                .map_err(|_| Error::GuestMemory("the boot page tables"))?;
        }
    }
    Ok(())
}
