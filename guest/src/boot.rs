//! What the VMM handed over at entry: Linux boot_params or a PVH hvm_start_info.

use crate::io::peek;

/// Most memory map entries the guest records.
pub const MAX_MEMMAP: usize = 32;

/// Boot information common to both protocols.
pub struct BootInfo {
    /// "linux64" or "pvh".
    pub protocol: &'static [u8],
    /// (address, size, type) triples.
    pub memmap: [(u64, u64, u32); MAX_MEMMAP],
    /// Valid entries in `memmap`.
    pub memmap_len: usize,
    /// Command line address and length (without NUL).
    pub cmdline: (u64, usize),
    /// Initrd address and size.
    pub initrd: Option<(u64, u64)>,
    /// A protocol-level check failed; the text says which.
    pub problem: Option<&'static [u8]>,
    /// ACPI RSDP address the protocol passed (0: none given).
    pub rsdp: u64,
}

fn cstr_len(addr: u64) -> usize {
    if addr == 0 {
        return 0;
    }
    let mut n = 0;
    while n < 65536 && peek::<u8>(addr + n as u64) != 0 {
        n += 1;
    }
    n
}

impl BootInfo {
    fn empty(protocol: &'static [u8]) -> Self {
        Self {
            protocol,
            memmap: [(0, 0, 0); MAX_MEMMAP],
            memmap_len: 0,
            cmdline: (0, 0),
            initrd: None,
            problem: None,
            rsdp: 0,
        }
    }

    /// Reads Linux boot_params (the zero page) at `bp`.
    pub fn from_linux(bp: u64) -> Self {
        let mut info = Self::empty(b"linux64");
        if peek::<u16>(bp + 0x1fe) != 0xaa55 {
            info.problem = Some(b"boot_params.hdr.boot_flag is not 0xaa55");
        } else if peek::<u32>(bp + 0x202) != 0x5372_6448 {
            info.problem = Some(b"boot_params.hdr.header is not HdrS");
        } else if peek::<u8>(bp + 0x210) == 0 {
            info.problem = Some(b"boot_params.hdr.type_of_loader is 0");
        }
        info.rsdp = peek(bp + 0x70);
        let entries = (peek::<u8>(bp + 0x1e8) as usize).min(MAX_MEMMAP);
        for i in 0..entries {
            let e = bp + 0x2d0 + 20 * i as u64;
            info.memmap[i] = (peek(e), peek(e + 8), peek(e + 16));
        }
        info.memmap_len = entries;
        let cmdline = u64::from(peek::<u32>(bp + 0x228)) | u64::from(peek::<u32>(bp + 0xc8)) << 32;
        info.cmdline = (cmdline, cstr_len(cmdline));
        let addr = u64::from(peek::<u32>(bp + 0x218)) | u64::from(peek::<u32>(bp + 0xc0)) << 32;
        let size = u64::from(peek::<u32>(bp + 0x21c)) | u64::from(peek::<u32>(bp + 0xc4)) << 32;
        if size != 0 {
            info.initrd = Some((addr, size));
        }
        info
    }

    /// Reads a PVH hvm_start_info at `si`.
    pub fn from_pvh(si: u64) -> Self {
        let mut info = Self::empty(b"pvh");
        if peek::<u32>(si) != 0x336e_c578 {
            info.problem = Some(b"hvm_start_info.magic is wrong");
            return info;
        }
        info.rsdp = peek(si + 32);
        let entries = (peek::<u32>(si + 48) as usize).min(MAX_MEMMAP);
        let memmap: u64 = peek(si + 40);
        for i in 0..entries {
            let e = memmap + 24 * i as u64;
            info.memmap[i] = (peek(e), peek(e + 8), peek(e + 16));
        }
        info.memmap_len = entries;
        let cmdline: u64 = peek(si + 24);
        info.cmdline = (cmdline, cstr_len(cmdline));
        if peek::<u32>(si + 12) > 0 {
            let m: u64 = peek(si + 16);
            info.initrd = Some((peek(m), peek(m + 8)));
        }
        info
    }

    /// Whether the command line contains `word` as a whole space-separated token.
    pub fn has_option(&self, word: &[u8]) -> bool {
        self.option_value(word).is_some()
    }

    /// The value of `key=value` (or an empty value for a bare `key`) on the command line.
    pub fn option_value(&self, key: &[u8]) -> Option<&'static [u8]> {
        let (addr, len) = self.cmdline;
        if addr == 0 {
            return None;
        }
        // SAFETY: the VMM wrote `len` bytes of command line at `addr`; it stays untouched.
        let line: &'static [u8] = unsafe { core::slice::from_raw_parts(addr as *const u8, len) };
        for tok in line.split(|&c| c == b' ') {
            if tok == key {
                return Some(&[]);
            }
            if tok.len() > key.len() && tok.starts_with(key) && tok[key.len()] == b'=' {
                return Some(&tok[key.len() + 1..]);
            }
        }
        None
    }
}
