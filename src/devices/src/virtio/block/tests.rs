use super::super::status;
use super::super::test_utils::*;
use super::*;
use crate::bus::BusDevice;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use vm_memory::{Bytes, GuestAddress};

const HDR: u64 = DATA;
const BUF: u64 = DATA + 0x1000;
const STATUS: u64 = DATA + 0x800;

struct Fixture {
    d: Driver,
    path: std::path::PathBuf,
}

fn image(name: &str, len: u64) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("vireo-blk-{}-{name}.img", std::process::id()));
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(len).unwrap();
    path
}

fn fixture(name: &str, read_only: bool) -> Fixture {
    let path = image(name, 1 << 20);
    let dev = Block::new(BlockConfig {
        path: path.clone(),
        id: "disk-under-test".into(),
        read_only,
        rate_limiter: Default::default(),
    })
    .unwrap();
    let mut d = Driver::new(Box::new(dev));
    d.activate();
    Fixture { d, path }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Fixture {
    fn header(&self, kind: u32, sector: u64) {
        self.d.mem.write_obj(kind, GuestAddress(HDR)).unwrap();
        self.d.mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
        self.d.mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
        self.d.mem.write_obj(0xaau8, GuestAddress(STATUS)).unwrap();
    }

    fn status(&self) -> u8 {
        self.d.mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    /// Runs a request with the given data descriptors; returns (status, used len).
    fn request(&mut self, kind: u32, sector: u64, data: &[(u64, u32, u16)]) -> (u8, u32) {
        self.header(kind, sector);
        let mut descs = vec![(HDR, 16, 0)];
        descs.extend_from_slice(data);
        descs.push((STATUS, 1, F_WRITE));
        self.d.submit(&descs);
        let (_, len) = self.d.wait_used().expect("request completed");
        (self.status(), len)
    }

    fn file(&self) -> std::fs::File {
        std::fs::File::open(&self.path).unwrap()
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

#[test]
fn config_space_and_features() {
    let mut f = fixture("config", false);
    let mut cap = [0u8; 8];
    f.d.transport.read(0x100, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 2048, "1 MiB in sectors");
    let mut b = [0u8; 4];
    f.d.transport.read(0x100 + 12, &mut b);
    assert_eq!(u32::from_le_bytes(b), SEG_MAX);
    f.d.transport.read(0x100 + 20, &mut b);
    assert_eq!(u32::from_le_bytes(b), 512);
    let feats = f.d.device_features();
    assert_ne!(feats & (1 << VIRTIO_BLK_F_FLUSH), 0);
    assert_ne!(feats & (1 << VIRTIO_BLK_F_DISCARD), 0);
    assert_eq!(feats & (1 << VIRTIO_BLK_F_RO), 0);
}

#[test]
fn write_flush_read_round_trip_across_many_descriptors() {
    let mut f = fixture("rw", false);
    let data = pattern(8192, 3);
    f.d.mem.write_slice(&data, GuestAddress(BUF)).unwrap();
    // Eight 1 KiB descriptors, scattered.
    let segs: Vec<(u64, u32, u16)> = (0..8).map(|i| (BUF + i * 1024, 1024, 0)).collect();
    assert_eq!(f.request(VIRTIO_BLK_T_OUT, 16, &segs), (OK, 1));
    assert_eq!(f.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (OK, 1));
    let mut on_disk = vec![0u8; 8192];
    let mut file = f.file();
    file.seek(SeekFrom::Start(16 * 512)).unwrap();
    file.read_exact(&mut on_disk).unwrap();
    assert_eq!(on_disk, data, "data reached the host file");

    let back = BUF + 0x10000;
    f.d.mem
        .write_slice(&[0u8; 8192], GuestAddress(back))
        .unwrap();
    let segs: Vec<(u64, u32, u16)> = (0..16).map(|i| (back + i * 512, 512, F_WRITE)).collect();
    assert_eq!(f.request(VIRTIO_BLK_T_IN, 16, &segs), (OK, 8192 + 1));
    let mut read = vec![0u8; 8192];
    f.d.mem.read_slice(&mut read, GuestAddress(back)).unwrap();
    assert_eq!(read, data);
}

#[test]
fn indirect_descriptors() {
    let mut f = fixture("indirect", false);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(&f.path)
        .unwrap();
    let data = pattern(2048, 9);
    file.seek(SeekFrom::Start(4 * 512)).unwrap();
    file.write_all(&data).unwrap();
    f.header(VIRTIO_BLK_T_IN, 4);
    // An indirect table: header, four 512-byte buffers, status.
    let table = DATA + 0x8000;
    let out = BUF + 0x20000;
    f.d.write_desc(table, 0, HDR, 16, F_NEXT, 1);
    for i in 0..4u16 {
        f.d.write_desc(
            table,
            1 + i,
            out + u64::from(i) * 512,
            512,
            F_NEXT | F_WRITE,
            2 + i,
        );
    }
    f.d.write_desc(table, 5, STATUS, 1, F_WRITE, 0);
    f.d.submit(&[(table, 6 * 16, F_INDIRECT)]);
    assert_eq!(f.d.wait_used().map(|u| u.1), Some(2049));
    assert_eq!(f.status(), OK);
    let mut read = vec![0u8; 2048];
    f.d.mem.read_slice(&mut read, GuestAddress(out)).unwrap();
    assert_eq!(read, data);
}

#[test]
fn get_id() {
    let mut f = fixture("id", false);
    assert_eq!(
        f.request(VIRTIO_BLK_T_GET_ID, 0, &[(BUF, 20, F_WRITE)]),
        (OK, 21)
    );
    let mut id = [0u8; 20];
    f.d.mem.read_slice(&mut id, GuestAddress(BUF)).unwrap();
    assert_eq!(&id[..15], b"disk-under-test");
    assert_eq!(&id[15..], &[0; 5]);
}

#[test]
fn read_only_rejects_writes() {
    let mut f = fixture("ro", true);
    assert_ne!(f.d.device_features() & (1 << VIRTIO_BLK_F_RO), 0);
    f.d.mem
        .write_slice(&pattern(512, 1), GuestAddress(BUF))
        .unwrap();
    assert_eq!(f.request(VIRTIO_BLK_T_OUT, 0, &[(BUF, 512, 0)]), (IOERR, 1));
    let mut range = [0u8; 16];
    range[8..12].copy_from_slice(&8u32.to_le_bytes());
    f.d.mem.write_slice(&range, GuestAddress(BUF)).unwrap();
    assert_eq!(
        f.request(VIRTIO_BLK_T_DISCARD, 0, &[(BUF, 16, 0)]),
        (IOERR, 1)
    );
    let mut all = Vec::new();
    f.file().read_to_end(&mut all).unwrap();
    assert!(all.iter().all(|&b| b == 0), "image untouched");
    // Reads still work.
    assert_eq!(f.request(VIRTIO_BLK_T_IN, 0, &[(BUF, 512, F_WRITE)]).0, OK);
}

fn range(sector: u64, sectors: u32, flags: u32) -> [u8; 16] {
    let mut r = [0u8; 16];
    r[0..8].copy_from_slice(&sector.to_le_bytes());
    r[8..12].copy_from_slice(&sectors.to_le_bytes());
    r[12..16].copy_from_slice(&flags.to_le_bytes());
    r
}

#[test]
fn discard_punches_a_hole_and_write_zeroes_zeroes() {
    let mut f = fixture("discard", false);
    {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .open(&f.path)
            .unwrap();
        file.write_all(&vec![0x5a; 1 << 20]).unwrap();
        file.sync_all().unwrap();
    }
    let before = f.file().metadata().unwrap().blocks();
    f.d.mem
        .write_slice(&range(0, 1024, 0), GuestAddress(BUF))
        .unwrap();
    assert_eq!(f.request(VIRTIO_BLK_T_DISCARD, 0, &[(BUF, 16, 0)]), (OK, 1));
    let after = f.file().metadata().unwrap().blocks();
    assert!(after < before, "allocated blocks {before} -> {after}");
    f.d.mem
        .write_slice(&range(1024, 8, 0), GuestAddress(BUF))
        .unwrap();
    assert_eq!(
        f.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[(BUF, 16, 0)]),
        (OK, 1)
    );
    let mut all = Vec::new();
    f.file().read_to_end(&mut all).unwrap();
    assert!(all[..(1024 + 8) * 512].iter().all(|&b| b == 0));
    assert_eq!(all[(1024 + 8) * 512], 0x5a, "beyond the ranges untouched");
    // Discard with the UNMAP flag is not defined: UNSUPP.
    f.d.mem
        .write_slice(&range(0, 8, 1), GuestAddress(BUF))
        .unwrap();
    assert_eq!(
        f.request(VIRTIO_BLK_T_DISCARD, 0, &[(BUF, 16, 0)]).0,
        UNSUPP
    );
    // A range past the end fails.
    f.d.mem
        .write_slice(&range(2040, 16, 0), GuestAddress(BUF))
        .unwrap();
    assert_eq!(f.request(VIRTIO_BLK_T_DISCARD, 0, &[(BUF, 16, 0)]).0, IOERR);
}

#[test]
fn out_of_range_and_oversized_requests_fail() {
    let mut f = fixture("bounds", false);
    assert_eq!(
        f.request(VIRTIO_BLK_T_IN, 2048, &[(BUF, 512, F_WRITE)]),
        (IOERR, 1)
    );
    assert_eq!(
        f.request(VIRTIO_BLK_T_IN, 2047, &[(BUF, 1024, F_WRITE)]),
        (IOERR, 1)
    );
    assert_eq!(
        f.request(VIRTIO_BLK_T_IN, u64::MAX, &[(BUF, 512, F_WRITE)]),
        (IOERR, 1)
    );
    assert_eq!(
        f.request(VIRTIO_BLK_T_IN, 0, &[(BUF, 100, F_WRITE)]).0,
        IOERR,
        "not whole sectors"
    );
    assert_eq!(
        f.request(VIRTIO_BLK_T_IN, 0, &[(BUF, SIZE_MAX + 512, F_WRITE)])
            .0,
        IOERR,
        "segment above size_max"
    );
    assert_eq!(f.request(99, 0, &[]), (UNSUPP, 1));
}

#[test]
fn malformed_chains_fail_without_harm() {
    let mut f = fixture("malformed", false);
    // Header too short.
    f.header(VIRTIO_BLK_T_IN, 0);
    f.d.submit(&[(HDR, 8, 0), (STATUS, 1, F_WRITE)]);
    assert_eq!(f.d.wait_used(), Some((0, 1)));
    assert_eq!(f.status(), IOERR);
    // No writable status byte at all.
    f.header(VIRTIO_BLK_T_IN, 0);
    f.d.submit(&[(HDR, 16, 0), (BUF, 512, 0)]);
    assert_eq!(f.d.wait_used().map(|u| u.1), Some(0));
    // Readable data after writable data.
    f.header(VIRTIO_BLK_T_OUT, 0);
    f.d.submit(&[
        (HDR, 16, 0),
        (BUF, 512, F_WRITE),
        (BUF, 512, 0),
        (STATUS, 1, F_WRITE),
    ]);
    assert_eq!(f.d.wait_used().map(|u| u.1), Some(1));
    assert_eq!(f.status(), IOERR);
    // A buffer beyond guest memory.
    f.header(VIRTIO_BLK_T_IN, 0);
    f.d.submit(&[
        (HDR, 16, 0),
        ((MEM_SIZE as u64) - 256, 512, F_WRITE),
        (STATUS, 1, F_WRITE),
    ]);
    assert!(f.d.wait_used().is_some());
    // A chain that loops on itself: the walk stops after the queue size.
    f.header(VIRTIO_BLK_T_IN, 0);
    f.d.write_desc(DESC, 10, HDR, 16, F_NEXT, 11);
    f.d.write_desc(DESC, 11, BUF, 512, F_NEXT | F_WRITE, 11);
    f.d.publish(10);
    assert!(f.d.wait_used().is_some());
    // The device still serves good requests.
    assert_eq!(f.d.read(0x70) & status::DEVICE_NEEDS_RESET, 0);
    f.d.reset_counters_keep_ring();
    assert_eq!(
        f.request(VIRTIO_BLK_T_GET_ID, 0, &[(BUF, 20, F_WRITE)]),
        (OK, 21)
    );
}

#[test]
fn host_io_error_is_reported_to_the_guest() {
    let mut f = fixture("eio", false);
    // The image shrinks under the device: reads past the new end cannot be satisfied.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&f.path)
        .unwrap()
        .set_len(4096)
        .unwrap();
    assert_eq!(
        f.request(VIRTIO_BLK_T_IN, 100, &[(BUF, 512, F_WRITE)]),
        (IOERR, 1)
    );
    assert_eq!(f.request(VIRTIO_BLK_T_IN, 0, &[(BUF, 512, F_WRITE)]).0, OK);
}

#[test]
fn bad_config_is_refused() {
    let path = image("badid", 4096);
    let err = Block::new(BlockConfig {
        path: path.clone(),
        id: "x".repeat(21),
        read_only: false,
        rate_limiter: Default::default(),
    })
    .err()
    .unwrap();
    assert!(err.to_string().contains("longer than 20 bytes"), "{err}");
    let err = Block::new(BlockConfig {
        path: "/nonexistent/disk.img".into(),
        id: "d".into(),
        read_only: false,
        rate_limiter: Default::default(),
    })
    .err()
    .unwrap();
    assert!(err.to_string().contains("/nonexistent/disk.img"), "{err}");
    let _ = std::fs::remove_file(path);
}
