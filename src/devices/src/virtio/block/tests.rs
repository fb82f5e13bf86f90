use super::super::status;
use super::super::test_utils::*;
use super::*;
use crate::bus::BusDevice;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
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

fn fixture(name: &str, read_only: bool, engine: IoEngine) -> Fixture {
    let path = image(&format!("{name}-{engine:?}"), 1 << 20);
    let dev = Block::new(BlockConfig {
        path: path.clone(),
        id: "disk-under-test".into(),
        read_only,
        rate_limiter: Default::default(),
        io_engine: engine,
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

fn config_space_and_features(engine: IoEngine) {
    let mut f = fixture("config", false, engine);
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

fn write_flush_read_round_trip_across_many_descriptors(engine: IoEngine) {
    let mut f = fixture("rw", false, engine);
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

fn indirect_descriptors(engine: IoEngine) {
    let mut f = fixture("indirect", false, engine);
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

fn get_id(engine: IoEngine) {
    let mut f = fixture("id", false, engine);
    assert_eq!(
        f.request(VIRTIO_BLK_T_GET_ID, 0, &[(BUF, 20, F_WRITE)]),
        (OK, 21)
    );
    let mut id = [0u8; 20];
    f.d.mem.read_slice(&mut id, GuestAddress(BUF)).unwrap();
    assert_eq!(&id[..15], b"disk-under-test");
    assert_eq!(&id[15..], &[0; 5]);
}

fn read_only_rejects_writes(engine: IoEngine) {
    let mut f = fixture("ro", true, engine);
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

fn discard_punches_a_hole_and_write_zeroes_zeroes(engine: IoEngine) {
    let mut f = fixture("discard", false, engine);
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

fn out_of_range_and_oversized_requests_fail(engine: IoEngine) {
    let mut f = fixture("bounds", false, engine);
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

fn malformed_chains_fail_without_harm(engine: IoEngine) {
    let mut f = fixture("malformed", false, engine);
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

fn host_io_error_is_reported_to_the_guest(engine: IoEngine) {
    let mut f = fixture("eio", false, engine);
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
        io_engine: IoEngine::Sync,
    })
    .err()
    .unwrap();
    assert!(err.to_string().contains("longer than 20 bytes"), "{err}");
    let err = Block::new(BlockConfig {
        path: "/nonexistent/disk.img".into(),
        id: "d".into(),
        read_only: false,
        rate_limiter: Default::default(),
        io_engine: IoEngine::Sync,
    })
    .err()
    .unwrap();
    assert!(err.to_string().contains("/nonexistent/disk.img"), "{err}");
    let _ = std::fs::remove_file(path);
}

/// `n` requests of `kind` with `len` bytes each, request `i` at `sector(i)`: header at
/// DATA + 16i, data at BUF + i*len, status at STATUS + i. Three descriptors each, so at most
/// 21 fit the test driver's 64-entry table.
fn batch(
    f: &Fixture,
    kind: u32,
    n: u64,
    len: u32,
    sector: impl Fn(u64) -> u64,
) -> Vec<Vec<(u64, u32, u16)>> {
    let data_flags = if kind == VIRTIO_BLK_T_IN { F_WRITE } else { 0 };
    (0..n)
        .map(|i| {
            let header = DATA + 0x10 * i;
            f.d.mem.write_obj(kind, GuestAddress(header)).unwrap();
            f.d.mem
                .write_obj(sector(i), GuestAddress(header + 8))
                .unwrap();
            vec![
                (header, 16, 0),
                (BUF + i * u64::from(len), len, data_flags),
                (STATUS + i, 1, F_WRITE),
            ]
        })
        .collect()
}

/// 20 writes made available at once, then 20 reads: each lands where it should whatever order
/// the engine finishes them in.
fn a_batch_of_requests_completes(engine: IoEngine) {
    let mut f = fixture("batch", false, engine);
    // Three descriptors each, in the test driver's 64-entry table.
    const N: u64 = 20;
    const LEN: u32 = 16 << 10;
    let at = |i: u64| BUF + i * u64::from(LEN);
    for i in 0..N {
        f.d.mem
            .write_slice(&pattern(LEN as usize, i as u8), GuestAddress(at(i)))
            .unwrap();
    }
    let chains = batch(&f, VIRTIO_BLK_T_OUT, N, LEN, |i| i * 32);
    f.d.submit_batch(&chains);
    for _ in 0..N {
        assert_eq!(f.d.wait_used().map(|u| u.1), Some(1));
    }
    let mut all = Vec::new();
    f.file().read_to_end(&mut all).unwrap();
    for i in 0..N {
        let o = (i * 32 * 512) as usize;
        assert_eq!(
            &all[o..o + LEN as usize],
            pattern(LEN as usize, i as u8),
            "write {i}"
        );
        assert_eq!(
            f.d.mem.read_obj::<u8>(GuestAddress(STATUS + i)).unwrap(),
            OK
        );
    }

    f.d.mem
        .write_slice(&vec![0u8; (N * u64::from(LEN)) as usize], GuestAddress(BUF))
        .unwrap();
    // Read each block into the slot of its mirror image, so order mix-ups show.
    let chains = batch(&f, VIRTIO_BLK_T_IN, N, LEN, |i| (N - 1 - i) * 32);
    f.d.submit_batch(&chains);
    for _ in 0..N {
        assert_eq!(f.d.wait_used().map(|u| u.1), Some(LEN + 1));
    }
    for i in 0..N {
        let mut got = vec![0u8; LEN as usize];
        f.d.mem.read_slice(&mut got, GuestAddress(at(i))).unwrap();
        assert_eq!(got, pattern(LEN as usize, (N - 1 - i) as u8), "read {i}");
    }
}

/// A pause (before a snapshot) leaves no request half served: every chain the device took
/// from the ring is on the used ring, so a restored device neither loses nor repeats one.
fn pause_leaves_nothing_in_flight(engine: IoEngine) {
    let mut f = fixture("pause", false, engine);
    // Three descriptors each, in the test driver's 64-entry table.
    const N: u64 = 20;
    const LEN: u32 = 64 << 10;
    let chains = batch(&f, VIRTIO_BLK_T_IN, N, LEN, |_| 0);
    for round in 0..20 {
        f.d.submit_batch(&chains);
        // Let the device thread start on them, then stop it mid-batch if it can be.
        std::thread::sleep(std::time::Duration::from_micros(50 * round));
        f.d.transport.pause().unwrap();
        let state = f.d.transport.save().unwrap();
        let q = &state.queues[0];
        assert_eq!(
            q.next_used, q.next_avail,
            "round {round}: chains taken but not used at the pause"
        );
        f.d.transport.resume();
        for _ in 0..N {
            assert_eq!(f.d.wait_used().map(|u| u.1), Some(LEN + 1), "round {round}");
        }
    }
}

/// A drive's image replaced while requests are in flight: each of them ends (whole, on one image
/// or the other) and everything after the swap goes to the new image.
fn replacing_the_image_moves_requests_to_the_new_one(engine: IoEngine) {
    let mut f = fixture("swap-a", false, engine);
    let b = image(&format!("swap-b-{engine:?}"), 1 << 20);
    std::fs::write(&b, vec![0x5b; 1 << 20]).unwrap();
    const N: u64 = 20;
    const LEN: u32 = 4096;
    let chains = batch(&f, VIRTIO_BLK_T_IN, N, LEN, |i| i * 8);
    f.d.mem
        .write_slice(
            &vec![0xee; (N * u64::from(LEN)) as usize],
            GuestAddress(BUF),
        )
        .unwrap();
    f.d.submit_batch(&chains);
    f.d.transport.replace_backing(&b).unwrap();
    for _ in 0..N {
        assert_eq!(f.d.wait_used().map(|u| u.1), Some(LEN + 1));
    }
    for i in 0..N {
        assert_eq!(
            f.d.mem.read_obj::<u8>(GuestAddress(STATUS + i)).unwrap(),
            OK
        );
        let mut got = vec![0u8; LEN as usize];
        f.d.mem
            .read_slice(&mut got, GuestAddress(BUF + i * u64::from(LEN)))
            .unwrap();
        assert!(
            got.iter().all(|&x| x == 0) || got.iter().all(|&x| x == 0x5b),
            "read {i} is not wholly from one image"
        );
    }
    // After the swap: a write lands in the new image only, and reads come from it.
    f.d.mem
        .write_slice(&pattern(512, 7), GuestAddress(BUF))
        .unwrap();
    assert_eq!(f.request(VIRTIO_BLK_T_OUT, 100, &[(BUF, 512, 0)]), (OK, 1));
    assert_eq!(
        f.request(VIRTIO_BLK_T_IN, 0, &[(BUF, 512, F_WRITE)]),
        (OK, 513)
    );
    let mut got = vec![0u8; 512];
    f.d.mem.read_slice(&mut got, GuestAddress(BUF)).unwrap();
    assert_eq!(got, vec![0x5b; 512], "read from the new image");
    let new = std::fs::read(&b).unwrap();
    assert_eq!(
        &new[100 * 512..101 * 512],
        pattern(512, 7),
        "write reached the new image"
    );
    let old = std::fs::read(&f.path).unwrap();
    assert!(old.iter().all(|&x| x == 0), "the old image was not written");
    let _ = std::fs::remove_file(b);
}

macro_rules! under_each_engine {
    ($($name:ident),* $(,)?) => {
        mod sync_engine {
            $(#[test] fn $name() { super::$name(super::IoEngine::Sync) })*
        }
        mod async_engine {
            $(#[test] fn $name() { super::$name(super::IoEngine::Async) })*
        }
    };
}

under_each_engine!(
    config_space_and_features,
    write_flush_read_round_trip_across_many_descriptors,
    indirect_descriptors,
    get_id,
    read_only_rejects_writes,
    discard_punches_a_hole_and_write_zeroes_zeroes,
    out_of_range_and_oversized_requests_fail,
    malformed_chains_fail_without_harm,
    host_io_error_is_reported_to_the_guest,
    a_batch_of_requests_completes,
    pause_leaves_nothing_in_flight,
    replacing_the_image_moves_requests_to_the_new_one,
);

/// The Async engine's ring runs only vectored I/O and fsync on the image: anything else a
/// compromised device thread might submit is refused by the kernel.
#[test]
fn async_ring_refuses_other_operations() {
    use io_uring::{opcode, types};
    let path = image("restricted", 4096);
    let file = std::fs::File::open(&path).unwrap();
    let completions = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let mut ring = Ring::new(&file, 4, &completions).unwrap();
    let other = std::fs::File::open("/etc/hostname").unwrap();
    let mut buf = [0u8; 64];
    let entries = [
        // A plain read (not vectored) of the image.
        opcode::Read::new(types::Fixed(0), buf.as_mut_ptr(), 64).build(),
        // A vectored read of another file, by descriptor instead of the fixed file.
        opcode::Readv::new(types::Fd(other.as_raw_fd()), std::ptr::null(), 0).build(),
        // Opening a file.
        opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), c"/etc/passwd".as_ptr()).build(),
    ];
    // One at a time: the kernel stops a batch at its first refused entry.
    let mut results = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        let entry = entry.clone().user_data(i as u64);
        // SAFETY: the buffers outlive the wait below.
        unsafe { ring.raw().submission().push(&entry).unwrap() };
        ring.raw().submit_and_wait(1).unwrap();
        results.extend(ring.raw().completion().map(|c| (c.user_data(), c.result())));
    }
    assert_eq!(
        results,
        vec![(0, -libc::EACCES), (1, -libc::EACCES), (2, -libc::EACCES)]
    );
    let _ = std::fs::remove_file(path);
}

/// Where io_uring cannot be used (here: a seccomp filter makes `io_uring_setup` fail as on a
/// kernel without it), asking for the Async engine fails, naming the drive and the way out;
/// nothing falls back to Sync silently.
#[test]
fn async_is_refused_where_io_uring_is_missing() {
    let path = image("nouring", 4096);
    let p = path.clone();
    let err = std::thread::spawn(move || {
        use seccompiler::{SeccompAction, SeccompFilter, SeccompRule};
        let rules = [(libc::SYS_io_uring_setup, Vec::<SeccompRule>::new())]
            .into_iter()
            .collect();
        let filter = SeccompFilter::new(
            rules,
            SeccompAction::Allow,
            SeccompAction::Errno(libc::ENOSYS as u32),
            seccompiler::TargetArch::x86_64,
        )
        .unwrap();
        let program: seccompiler::BpfProgram = filter.try_into().unwrap();
        // Only this thread is filtered.
        seccompiler::apply_filter(&program).unwrap();
        assert!(uring::probe().is_err());
        Block::new(BlockConfig {
            path: p,
            id: "d".into(),
            read_only: false,
            rate_limiter: Default::default(),
            io_engine: IoEngine::Async,
        })
        .err()
        .map(|e| e.to_string())
    })
    .join()
    .unwrap()
    .expect("Async refused");
    assert!(err.contains("nouring"), "{err}");
    assert!(err.contains("io_engine Async"), "{err}");
    assert!(err.contains("no io_uring"), "{err}");
    assert!(err.contains("use io_engine Sync"), "{err}");
    let _ = std::fs::remove_file(path);
}
