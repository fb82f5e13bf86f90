//! The snapshot state file: a magic number and format version, then named sections, each
//! with its own CRC-32, so that a truncated file, a flipped bit anywhere or a file from an
//! incompatible vireo is refused with a message that says which.
//!
//! ```text
//! header:  "VIREOSNP" | format version (u32 LE) | section count (u32 LE) | CRC-32 of the above
//! section: name length (u8) | name | payload length (u64 LE) | payload | CRC-32 of all before it
//! ```
//! Payloads are JSON. The memory file ends with a one-page trailer (see [`MemTrailer`]) that
//! ties it to its state file.

use thiserror::Error;

/// First bytes of a state file.
pub const MAGIC: &[u8; 8] = b"VIREOSNP";
/// First bytes of a memory file's trailer.
pub const MEM_MAGIC: &[u8; 8] = b"VIREOMEM";
/// The state file layout this vireo writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Largest state file read (a few vCPUs' registers and device state are far smaller).
pub const MAX_STATE_BYTES: u64 = 64 << 20;
/// Size of the memory file's trailer, after the guest's RAM.
pub const TRAILER_BYTES: u64 = 4096;

/// What is wrong with a snapshot file.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum FormatError {
    /// Not a vireo snapshot.
    #[error("it is not a vireo snapshot state file (no VIREOSNP magic)")]
    Magic,
    /// Written by a vireo with another format.
    #[error("it has snapshot format version {found}; this vireo reads version {FORMAT_VERSION}")]
    Version {
        /// Version in the file.
        found: u32,
    },
    /// Ends early.
    #[error("it is truncated: {0}")]
    Truncated(String),
    /// A checksum does not match.
    #[error("it is corrupt: the checksum of {0} does not match")]
    Checksum(String),
    /// A section is missing or malformed.
    #[error("it is malformed: {0}")]
    Malformed(String),
}

const fn crc_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
}

static CRC_TABLE: [u32; 256] = crc_table();

/// CRC-32 (IEEE 802.3, as zlib computes it).
pub fn crc32(data: &[u8]) -> u32 {
    !data.iter().fold(!0u32, |c, &b| {
        CRC_TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8)
    })
}

/// Lays out `sections` as a state file.
pub fn encode(sections: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(sections.len() as u32).to_le_bytes());
    let crc = crc32(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    for (name, payload) in sections {
        let start = out.len();
        out.push(name.len() as u8);
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        out.extend_from_slice(payload);
        let crc = crc32(&out[start..]);
        out.extend_from_slice(&crc.to_le_bytes());
    }
    out
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], FormatError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| {
                FormatError::Truncated(format!(
                    "{what} needs {n} bytes at offset {}, the file has {}",
                    self.pos,
                    self.data.len()
                ))
            })?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u32(&mut self, what: &str) -> Result<u32, FormatError> {
        Ok(u32::from_le_bytes(
            self.take(4, what)?.try_into().unwrap_or_default(),
        ))
    }
}

/// Splits a state file into its named sections, checking every checksum.
pub fn decode(data: &[u8]) -> Result<Vec<(String, &[u8])>, FormatError> {
    let mut r = Reader { data, pos: 0 };
    if data.len() < MAGIC.len() || &data[..MAGIC.len()] != MAGIC {
        return Err(FormatError::Magic);
    }
    r.take(MAGIC.len(), "the magic number")?;
    let version = r.u32("the format version")?;
    let count = r.u32("the section count")?;
    let crc = r.u32("the header checksum")?;
    if crc32(&data[..16]) != crc {
        return Err(FormatError::Checksum("the header".into()));
    }
    if version != FORMAT_VERSION {
        return Err(FormatError::Version { found: version });
    }
    let mut sections = Vec::new();
    for n in 0..count {
        let start = r.pos;
        let what = format!("section {n}");
        let len = r.take(1, &what)?[0] as usize;
        let name = r.take(len, &what)?;
        let size = u64::from_le_bytes(r.take(8, &what)?.try_into().unwrap_or_default());
        let size = usize::try_from(size)
            .map_err(|_| FormatError::Truncated(format!("{what} claims {size} bytes")))?;
        let payload = r.take(size, &what)?;
        let end = r.pos;
        let crc = r.u32(&what)?;
        let name = String::from_utf8_lossy(name).into_owned();
        if crc32(&data[start..end]) != crc {
            return Err(FormatError::Checksum(format!("section {n} ({name})")));
        }
        sections.push((name, payload));
    }
    if r.pos != data.len() {
        return Err(FormatError::Malformed(format!(
            "{} bytes follow the last section",
            data.len() - r.pos
        )));
    }
    Ok(sections)
}

/// What a memory file holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemKind {
    /// All of the guest's memory (holes read as zero).
    Full = 1,
    /// Only the pages written since the previous snapshot; must be merged into its base.
    Diff = 2,
}

/// The last page of a memory file: which snapshot it belongs to and how big the guest is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemTrailer {
    /// Full or diff.
    pub kind: MemKind,
    /// The id the state file names.
    pub id: u64,
    /// Guest RAM in bytes (the file is this plus [`TRAILER_BYTES`]).
    pub mem_size: u64,
}

impl MemTrailer {
    /// The trailer page.
    pub fn encode(&self) -> Vec<u8> {
        let mut page = vec![0u8; TRAILER_BYTES as usize];
        page[..8].copy_from_slice(MEM_MAGIC);
        page[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        page[12..16].copy_from_slice(&(self.kind as u32).to_le_bytes());
        page[16..24].copy_from_slice(&self.id.to_le_bytes());
        page[24..32].copy_from_slice(&self.mem_size.to_le_bytes());
        let crc = crc32(&page[..32]);
        page[32..36].copy_from_slice(&crc.to_le_bytes());
        page
    }

    /// Reads a trailer page.
    pub fn decode(page: &[u8]) -> Result<Self, FormatError> {
        if page.len() < 36 || &page[..8] != MEM_MAGIC {
            return Err(FormatError::Malformed(
                "it has no vireo memory trailer (VIREOMEM) in its last page".into(),
            ));
        }
        let u32_at = |o: usize| u32::from_le_bytes(page[o..o + 4].try_into().unwrap_or_default());
        let u64_at = |o: usize| u64::from_le_bytes(page[o..o + 8].try_into().unwrap_or_default());
        if crc32(&page[..32]) != u32_at(32) {
            return Err(FormatError::Checksum("the memory trailer".into()));
        }
        let version = u32_at(8);
        if version != FORMAT_VERSION {
            return Err(FormatError::Version { found: version });
        }
        let kind = match u32_at(12) {
            1 => MemKind::Full,
            2 => MemKind::Diff,
            k => return Err(FormatError::Malformed(format!("unknown memory kind {k}"))),
        };
        Ok(Self {
            kind,
            id: u64_at(16),
            mem_size: u64_at(24),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_matches_zlib() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn sections_round_trip() {
        let file = encode(&[("meta", b"{}".to_vec()), ("vcpus", vec![1, 2, 3])]);
        let s = decode(&file).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!((s[0].0.as_str(), s[0].1), ("meta", &b"{}"[..]));
        assert_eq!((s[1].0.as_str(), s[1].1), ("vcpus", &[1u8, 2, 3][..]));
    }

    #[test]
    fn every_flipped_bit_and_every_truncation_is_refused() {
        let file = encode(&[("meta", b"{\"a\":1}".to_vec()), ("vm", vec![7; 40])]);
        for i in 0..file.len() * 8 {
            let mut bad = file.clone();
            bad[i / 8] ^= 1 << (i % 8);
            assert!(decode(&bad).is_err(), "bit {i} flipped was accepted");
        }
        for len in 0..file.len() {
            assert!(
                decode(&file[..len]).is_err(),
                "truncated to {len} was accepted"
            );
        }
        let mut longer = file.clone();
        longer.push(0);
        assert!(decode(&longer).is_err());
    }

    #[test]
    fn another_format_version_is_named() {
        let mut file = encode(&[]);
        file[8..12].copy_from_slice(&7u32.to_le_bytes());
        let crc = crc32(&file[..16]);
        file[16..20].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(decode(&file), Err(FormatError::Version { found: 7 }));
        assert!(FormatError::Version { found: 7 }
            .to_string()
            .contains("version 7; this vireo reads version 1"));
    }

    #[test]
    fn trailer_round_trips_and_detects_damage() {
        let t = MemTrailer {
            kind: MemKind::Diff,
            id: 0x1234_5678_9abc_def0,
            mem_size: 128 << 20,
        };
        let page = t.encode();
        assert_eq!(MemTrailer::decode(&page), Ok(t));
        let mut bad = page.clone();
        bad[17] ^= 4;
        assert!(MemTrailer::decode(&bad).is_err());
        assert!(MemTrailer::decode(&[0u8; 4096]).is_err());
    }
}
