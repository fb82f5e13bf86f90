//! Snapshots through Firecracker's API and vireo's command line: the test guest counts timer
//! ticks (and with a drive, writes and reads it every tick), is snapshotted mid-count and
//! restored, and must go on from where it stood. Damaged and mismatched snapshot files must
//! be refused with a message that names what is wrong.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use vmm::persist::format::crc32;

/// Boots the counting guest through the API: `extra` is added to its command line.
fn boot_counter(
    name: &str,
    extra: &str,
    mem_mib: u64,
    track_dirty: bool,
    drive: Option<&Path>,
) -> Vireo {
    boot_counter_pit(name, extra, mem_mib, track_dirty, drive, false)
}

/// [`boot_counter`], with KVM's PIT when `pit` (whose state snapshots carry).
fn boot_counter_pit(
    name: &str,
    extra: &str,
    mem_mib: u64,
    track_dirty: bool,
    drive: Option<&Path>,
    pit: bool,
) -> Vireo {
    let v = Vireo::start(name);
    let elf = guest("elf");
    let (code, body) = v.req(
        "PUT",
        "/boot-source",
        &format!(
            r#"{{"kernel_image_path":"{}","boot_args":"console=ttyS0 vireo.count=0 vireo.tickms=10 {extra}"}}"#,
            elf.display()
        ),
    );
    assert_eq!(code, 204, "{body}");
    let (code, body) = v.req(
        "PUT",
        "/machine-config",
        &format!(
            r#"{{"vcpu_count":1,"mem_size_mib":{mem_mib},"track_dirty_pages":{track_dirty},"pit":{pit}}}"#
        ),
    );
    assert_eq!(code, 204, "{body}");
    if let Some(d) = drive {
        let (code, body) = v.req(
            "PUT",
            "/drives/d0",
            &format!(
                r#"{{"drive_id":"d0","path_on_host":"{}","is_root_device":false,"is_read_only":false{}}}"#,
                d.display(),
                engine_field()
            ),
        );
        assert_eq!(code, 204, "{body}");
    }
    let (code, body) = v.req("PUT", "/actions", r#"{"action_type":"InstanceStart"}"#);
    assert_eq!(code, 204, "{body}");
    v
}

/// The tick number of a complete `@tick n=K ...` line.
fn tick(line: &str) -> Option<u64> {
    line.strip_prefix("@tick ")
        .and_then(|l| field(l, "n"))
        .and_then(|n| n.parse().ok())
}

/// Lines that arrive within `quiet` of each other, until none does.
fn drain(v: &Vireo, quiet: Duration) -> Vec<String> {
    let mut out = Vec::new();
    while let Ok(l) = v.lines.recv_timeout(quiet) {
        out.push(l);
    }
    out
}

/// Waits for tick `n` (or a later one); returns the lines seen.
fn wait_tick(v: &Vireo, n: u64) -> Vec<String> {
    let end = Instant::now() + DEADLINE;
    let mut seen = Vec::new();
    loop {
        let left = end.saturating_duration_since(Instant::now());
        let l = v
            .lines
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no tick {n} in time; saw {seen:?}"));
        let done = tick(&l).is_some_and(|k| k >= n);
        seen.push(l);
        if done {
            return seen;
        }
    }
}

fn ok(v: &Vireo, method: &str, path: &str, body: &str) {
    let (code, answer) = v.req(method, path, body);
    assert_eq!(code, 204, "{method} {path} {body}: {answer}");
}

fn create(v: &Vireo, kind: &str, state: &Path, mem: &Path) {
    ok(
        v,
        "PUT",
        "/snapshot/create",
        &format!(
            r#"{{"snapshot_type":"{kind}","snapshot_path":"{}","mem_file_path":"{}"}}"#,
            state.display(),
            mem.display()
        ),
    );
}

fn load_body(state: &Path, mem: &Path, resume: bool) -> String {
    format!(
        r#"{{"snapshot_path":"{}","mem_backend":{{"backend_type":"File","backend_path":"{}"}},"resume_vm":{resume}}}"#,
        state.display(),
        mem.display()
    )
}

/// Pauses and returns the last complete tick the guest printed, given the lines read so far.
fn pause(v: &Vireo, before: &[String]) -> u64 {
    ok(v, "PATCH", "/vm", r#"{"state":"Paused"}"#);
    let tail = drain(v, Duration::from_millis(300));
    assert!(
        drain(v, Duration::from_millis(300)).is_empty(),
        "output stops while paused"
    );
    before
        .iter()
        .chain(&tail)
        .filter_map(|l| tick(l))
        .max()
        .unwrap_or(0)
}

/// Ends a vireo with SIGKILL, as a crash would.
fn kill9(mut v: Vireo) {
    // SAFETY: kill(2) on the pid of a child this test started and has not reaped.
    unsafe { libc::kill(v.child.id() as i32, libc::SIGKILL) };
    wait_exit(&mut v.child);
    let _ = std::fs::remove_dir_all(&v.dir);
}

#[test]
fn two_clones_continue_the_count_with_the_timer_ticking() {
    // With the PIT, so that its state goes through the snapshot and back as well.
    let v = boot_counter_pit("snap-clones", "", 128, false, None, true);
    let seen = wait_tick(&v, 5);
    let genid = |lines: &[String]| -> Vec<String> {
        lines
            .iter()
            .filter(|l| tick(l).is_some())
            .filter_map(|l| field(l, "genid").map(str::to_owned))
            .collect()
    };
    let original = genid(&seen);
    assert!(
        !original.is_empty(),
        "the guest finds the VM generation ID: {seen:?}"
    );
    let last = pause(&v, &seen);
    assert!(last >= 5);
    let dir = scratch("snap-clones-files");
    let (state, mem) = (dir.join("state"), dir.join("mem"));
    create(&v, "Full", &state, &mem);
    // The paused original still runs on when resumed.
    ok(&v, "PATCH", "/vm", r#"{"state":"Resumed"}"#);
    wait_tick(&v, last + 3);
    assert_eq!(v.stop(libc::SIGTERM), Some(143));

    // Two restores from the same files at once.
    let clones: Vec<Vireo> = (0..2)
        .map(|i| Vireo::start(&format!("snap-clone{i}")))
        .collect();
    // Metrics may be set up before a load (as in Firecracker) and count it.
    let metrics = dir.join("clone0.metrics");
    ok(
        &clones[0],
        "PUT",
        "/metrics",
        &format!(r#"{{"metrics_path":"{}"}}"#, metrics.display()),
    );
    let threads: Vec<_> = clones
        .iter()
        .map(|c| {
            let (sock, body) = (c.sock.clone(), load_body(&state, &mem, true));
            std::thread::spawn(move || http(&sock, "PUT", "/snapshot/load", &body))
        })
        .collect();
    for t in threads {
        let (code, body) = t.join().unwrap();
        assert_eq!(code, 204, "{body}");
    }
    ok(
        &clones[0],
        "PUT",
        "/actions",
        r#"{"action_type":"FlushMetrics"}"#,
    );
    let text = std::fs::read_to_string(&metrics).unwrap();
    let m: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(m["snapshot"]["loads"], 1, "{m}");
    assert!(m["snapshot"]["last_load_us"].as_u64().unwrap() > 0, "{m}");
    let mut ids = vec![original[0].clone()];
    for c in clones {
        let seen = wait_tick(&c, last + 10);
        assert!(has_pit_thread(c.child.id()), "the restore has the PIT");
        // Each restore gives the VM a new generation ID, so clones reseed their RNGs.
        let after: Vec<String> = genid(&seen);
        let id = after.last().unwrap().clone();
        assert!(after[1..].iter().all(|g| *g == id), "{after:?}");
        assert!(
            !ids.contains(&id),
            "generation ID {id} seen before: {ids:?}"
        );
        ids.push(id);
        let ticks: Vec<u64> = seen.iter().filter_map(|l| tick(l)).collect();
        // The guest was paused after tick `last` (or in the middle of printing the next).
        assert!(
            ticks[0] == last + 1 || ticks[0] == last + 2,
            "restored count starts at {} after {last}: {seen:?}",
            ticks[0]
        );
        assert!(
            ticks.windows(2).all(|w| w[1] == w[0] + 1),
            "count goes on by one: {ticks:?}"
        );
        let (code, info) = c.req("GET", "/", "");
        assert_eq!(code, 200);
        assert!(info.contains("\"Running\""), "{info}");
        assert_eq!(c.stop(libc::SIGTERM), Some(143));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn sector(image: &Path, n: u64) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 512];
    std::fs::File::open(image)
        .unwrap()
        .read_exact_at(&mut buf, n * 512)
        .unwrap();
    buf
}

#[test]
fn block_requests_complete_exactly_once_across_snapshots_and_data_survives() {
    let dir = scratch("snap-blk-img");
    let img = empty_image(&dir);
    let v = boot_counter("snap-blk", "vireo.blktick", 64, false, Some(&img));
    let wrote = v.wait_prefix("@ticker wrote");
    assert!(wrote.contains("ok=1"), "{wrote}");
    // Snapshots while requests flow: each pause lands wherever the guest is.
    let (state, mem) = (dir.join("state"), dir.join("mem"));
    let mut all = Vec::new();
    for round in 0..5 {
        all.extend(wait_tick(&v, 3 + round * 4));
        let last = pause(&v, &all);
        create(&v, "Full", &state, &mem);
        ok(&v, "PATCH", "/vm", r#"{"state":"Resumed"}"#);
        all.extend(wait_tick(&v, last + 1));
    }
    let last = pause(&v, &all);
    create(&v, "Full", &state, &mem);
    kill9(v);
    let bad: Vec<&String> = all.iter().filter(|l| l.contains("blk=bad")).collect();
    assert!(bad.is_empty(), "requests failed around pauses: {bad:?}");
    assert!(all.iter().filter(|l| l.contains("blk=ok")).count() >= 15);

    // The restored guest reads back what it wrote before the snapshot and keeps writing.
    let c = Vireo::start("snap-blk-restored");
    let (code, body) = c.req("PUT", "/snapshot/load", &load_body(&state, &mem, true));
    assert_eq!(code, 204, "{body}");
    let seen = wait_tick(&c, last + 12);
    let ticks: Vec<&String> = seen.iter().filter(|l| tick(l).is_some()).collect();
    assert!(ticks.len() >= 10, "{seen:?}");
    assert!(
        ticks.iter().all(|l| l.contains("blk=ok")),
        "block I/O after restore: {ticks:?}"
    );
    assert_eq!(c.stop(libc::SIGTERM), Some(143));
    let n = last + 12;
    let on_disk = u64::from_le_bytes(sector(&img, 64 + n % 8)[..8].try_into().unwrap());
    assert!(
        on_disk >= n && on_disk < n + 8,
        "sector {} holds {on_disk}",
        64 + n % 8
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A 1 MiB empty drive image in `dir`.
fn empty_image(dir: &Path) -> PathBuf {
    let img = dir.join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    img
}

/// The temporary files snapshot creates left in `dir`.
fn temp_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("vireo-tmp"))
        .collect()
}

fn file_bytes(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

#[test]
fn a_snapshot_of_a_restored_vm_is_whole_after_the_parent_memory_is_gone() {
    let v = boot_counter("snap-chain", "", 64, false, None);
    let seen = wait_tick(&v, 5);
    pause(&v, &seen);
    let dir = scratch("snap-chain-files");
    let (s1, m1) = (dir.join("s1"), dir.join("m1"));
    create(&v, "Full", &s1, &m1);
    kill9(v);
    // Guest memory without the trailer and without the VM generation ID (0xff000, 16 bytes),
    // which every restore replaces.
    const GENID: std::ops::Range<usize> = 0xff000..0xff010;
    let guest_mem = |m: &Path| {
        let mut b = file_bytes(m);
        b.truncate(b.len() - 4096);
        let id = b[GENID].to_vec();
        b[GENID].fill(0);
        (fnv1a(&b), id)
    };
    let (parent_hash, parent_id) = guest_mem(&m1);

    // Restored and left paused, the clone's memory is the parent's, read from its file.
    let c = Vireo::start("snap-chain-c1");
    let (code, body) = c.req("PUT", "/snapshot/load", &load_body(&s1, &m1, false));
    assert_eq!(code, 204, "{body}");
    let (code, info) = c.req("GET", "/", "");
    assert_eq!(code, 200);
    assert!(info.contains("\"Paused\""), "{info}");
    let (s2, m2) = (dir.join("s2"), dir.join("m2"));
    create(&c, "Full", &s2, &m2);
    kill9(c);
    std::fs::remove_file(&m1).unwrap();
    let (clone_hash, clone_id) = guest_mem(&m2);
    assert_eq!(
        clone_hash, parent_hash,
        "the clone's snapshot holds all memory"
    );
    assert_ne!(
        clone_id, parent_id,
        "the restore gave the VM a new generation ID"
    );

    let c = Vireo::start("snap-chain-c2");
    let (code, body) = c.req("PUT", "/snapshot/load", &load_body(&s2, &m2, true));
    assert_eq!(code, 204, "{body}");
    wait_tick(&c, 10);
    assert_eq!(c.stop(libc::SIGTERM), Some(143));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_diff_merged_over_its_full_snapshot_restores_the_later_state() {
    let dir = scratch("snap-diff-img");
    let img = empty_image(&dir);
    let v = boot_counter("snap-diff", "vireo.blktick", 64, true, Some(&img));
    let seen = wait_tick(&v, 3);
    pause(&v, &seen);
    let (full_s, full_m) = (dir.join("full.state"), dir.join("full.mem"));
    create(&v, "Full", &full_s, &full_m);
    ok(&v, "PATCH", "/vm", r#"{"state":"Resumed"}"#);
    let seen = wait_tick(&v, 20);
    let later = pause(&v, &seen);
    let (diff_s, diff_m) = (dir.join("diff.state"), dir.join("diff.mem"));
    create(&v, "Diff", &diff_s, &diff_m);
    kill9(v);
    let full_blocks = std::fs::metadata(&full_m).unwrap();
    let diff_blocks = std::fs::metadata(&diff_m).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert!(
        diff_blocks.blocks() < 64 * 1024 * 2,
        "the diff holds only written pages ({} blocks; full {})",
        diff_blocks.blocks(),
        full_blocks.blocks()
    );

    // Unmerged, the diff's memory is refused; the full file does not belong to the diff state.
    let c = Vireo::start("snap-diff-refused");
    let (code, body) = c.req("PUT", "/snapshot/load", &load_body(&diff_s, &diff_m, true));
    assert_eq!(code, 400);
    assert!(body.contains("merge it into its base"), "{body}");
    let (code, body) = c.req("PUT", "/snapshot/load", &load_body(&diff_s, &full_m, true));
    assert_eq!(code, 400);
    assert!(body.contains("belongs to another snapshot"), "{body}");
    drop(c);

    let merged = run_raw(&[
        "rebase-snap",
        "--base-file",
        full_m.to_str().unwrap(),
        "--diff-file",
        diff_m.to_str().unwrap(),
    ]);
    assert_eq!(merged.code(), 0, "{}", merged.stderr);
    let c = Vireo::start("snap-diff-merged");
    let (code, body) = c.req("PUT", "/snapshot/load", &load_body(&diff_s, &full_m, true));
    assert_eq!(code, 204, "{body}");
    let seen = wait_tick(&c, later + 5);
    let ticks: Vec<u64> = seen.iter().filter_map(|l| tick(l)).collect();
    assert!(
        ticks[0] == later + 1 || ticks[0] == later + 2,
        "the merged snapshot resumes at the diff's count {later}, not the full one's: {seen:?}"
    );
    assert!(
        seen.iter()
            .filter(|l| tick(l).is_some())
            .all(|l| l.contains("blk=ok")),
        "the rings vireo wrote are in the diff: {seen:?}"
    );
    assert_eq!(c.stop(libc::SIGTERM), Some(143));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_idle_1gib_guest_snapshots_to_what_it_touched() {
    let v = boot_counter("snap-1g", "", 1024, false, None);
    let seen = wait_tick(&v, 3);
    pause(&v, &seen);
    let (state, mem) = (v.dir.join("state"), v.dir.join("mem"));
    create(&v, "Full", &state, &mem);
    let meta = std::fs::metadata(&mem).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(meta.len(), (1024 << 20) + 4096, "memory plus the trailer");
    assert!(
        meta.blocks() * 512 < 8 << 20,
        "sparse: {} bytes allocated for an idle guest",
        meta.blocks() * 512
    );
    assert_eq!(v.stop(libc::SIGTERM), Some(143));
}

/// A state file's sections, decoded by vireo's own reader.
fn sections(data: &[u8]) -> Vec<(String, Vec<u8>)> {
    vmm::persist::format::decode(data)
        .expect("a valid state file")
        .into_iter()
        .map(|(n, d)| (n, d.to_vec()))
        .collect()
}

/// Rewrites the vcpus section of `data` with `f` and recomputes its checksum.
fn with_vcpus(data: &[u8], f: impl Fn(&mut serde_json::Value)) -> Vec<u8> {
    let mut secs = sections(data);
    for (name, payload) in secs.iter_mut() {
        if name == "vcpus" {
            let mut v: serde_json::Value = serde_json::from_slice(payload).unwrap();
            f(&mut v);
            *payload = serde_json::to_vec(&v).unwrap();
        }
    }
    // Checksums recomputed, as a careful attacker (or a corrupting tool) would.
    let named: Vec<(&str, Vec<u8>)> = secs.iter().map(|(n, d)| (n.as_str(), d.clone())).collect();
    vmm::persist::format::encode(&named)
}

#[test]
fn damaged_mismatched_and_misplaced_snapshots_are_refused_by_name() {
    let v = boot_counter("snap-bad", "", 64, false, None);
    wait_tick(&v, 2);
    let files = scratch("snap-bad-files");
    let (state, mem) = (files.join("state"), files.join("mem"));
    // Not paused.
    let (code, body) = v.req(
        "PUT",
        "/snapshot/create",
        &format!(
            r#"{{"snapshot_path":"{}","mem_file_path":"{}"}}"#,
            state.display(),
            mem.display()
        ),
    );
    assert_eq!(code, 400);
    assert!(body.contains("must be paused"), "{body}");
    pause(&v, &[]);
    // Diff without dirty tracking; directories and missing directories as paths.
    for (body, needle) in [
        (
            format!(
                r#"{{"snapshot_type":"Diff","snapshot_path":"{}","mem_file_path":"{}"}}"#,
                state.display(),
                mem.display()
            ),
            "needs dirty page tracking",
        ),
        (
            format!(
                r#"{{"snapshot_path":"{}","mem_file_path":"{}"}}"#,
                files.display(),
                mem.display()
            ),
            "is a directory",
        ),
        (
            format!(
                r#"{{"snapshot_path":"/nonexistent/dir/s","mem_file_path":"{}"}}"#,
                mem.display()
            ),
            "does not exist",
        ),
        (
            format!(
                r#"{{"snapshot_path":"{}","mem_file_path":"{}"}}"#,
                state.display(),
                state.display()
            ),
            "need a file each",
        ),
        (
            r#"{"snapshot_path":"a","mem_file_path":"b","bogus":1}"#.into(),
            "unknown field",
        ),
    ] {
        let (code, answer) = v.req("PUT", "/snapshot/create", &body);
        assert_eq!(code, 400, "{body}: {answer}");
        assert!(answer.contains(needle), "{body}: {answer}");
    }
    assert!(
        !mem.exists() && !state.exists(),
        "failed creates leave nothing behind"
    );
    create(&v, "Full", &state, &mem);
    let (s2, m2) = (files.join("state2"), files.join("mem2"));
    create(&v, "Full", &s2, &m2);
    let leftovers = temp_files(&files);
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // A running VMM refuses to load.
    let (code, body) = v.req("PUT", "/snapshot/load", &load_body(&state, &mem, true));
    assert_eq!(code, 400);
    assert!(body.contains("already running"), "{body}");
    kill9(v);

    let good = file_bytes(&state);
    let bad = |name: &str, data: &[u8]| -> PathBuf {
        let p = files.join(name);
        std::fs::write(&p, data).unwrap();
        p
    };
    let mut flipped = good.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x10;
    let mut wrong_version = good.clone();
    wrong_version[8..12].copy_from_slice(&9u32.to_le_bytes());
    let crc = crc32(&wrong_version[..16]);
    wrong_version[16..20].copy_from_slice(&crc.to_le_bytes());
    let alien_cpuid = with_vcpus(&good, |v| {
        for e in v[0]["cpuid"].as_array_mut().unwrap() {
            let b = e.as_array_mut().unwrap();
            if b[0] == 7 && b[4] == 0 {
                for byte in &mut b[16..20] {
                    *byte = 255.into();
                }
            }
        }
    });
    let short_mem = files.join("short.mem");
    std::fs::write(&short_mem, &file_bytes(&mem)[..4096 * 16]).unwrap();
    let cases: Vec<(PathBuf, PathBuf, &str)> = vec![
        (
            bad("truncated", &good[..good.len() - 100]),
            mem.clone(),
            "truncated",
        ),
        (bad("flipped", &flipped), mem.clone(), "checksum"),
        (
            bad("version", &wrong_version),
            mem.clone(),
            "format version 9; this vireo reads version 1",
        ),
        (
            bad("garbage", b"hello"),
            mem.clone(),
            "not a vireo snapshot",
        ),
        (
            bad("cpuid", &alien_cpuid),
            mem.clone(),
            "CPUID leaf 0x7.0 ebx has features",
        ),
        (state.clone(), m2.clone(), "belongs to another snapshot"),
        (state.clone(), short_mem.clone(), "its memory file is"),
        (state.clone(), files.clone(), "mem_backend"),
        (files.clone(), mem.clone(), "snapshot_path"),
        (files.join("absent"), mem.clone(), "No such file"),
    ];
    for (s, m, needle) in cases {
        let c = Vireo::start("snap-bad-load");
        let (code, body) = c.req("PUT", "/snapshot/load", &load_body(&s, &m, true));
        assert_eq!(code, 400, "{} + {}: {body}", s.display(), m.display());
        assert!(
            body.contains(needle),
            "{} + {}: {body}",
            s.display(),
            m.display()
        );
        // Nothing half started: the process still takes a good snapshot.
        let (code, info) = c.req("GET", "/", "");
        assert_eq!(code, 200);
        assert!(info.contains("Not started"), "{info}");
        let (code, body) = c.req("PUT", "/snapshot/load", &load_body(&state, &mem, true));
        assert_eq!(code, 204, "{body}");
        assert_eq!(c.stop(libc::SIGTERM), Some(143));
    }
    // Only a fresh process loads.
    let c = Vireo::start("snap-bad-configured");
    ok(
        &c,
        "PUT",
        "/machine-config",
        r#"{"vcpu_count":1,"mem_size_mib":64}"#,
    );
    let (code, body) = c.req("PUT", "/snapshot/load", &load_body(&state, &mem, true));
    assert_eq!(code, 400);
    assert!(body.contains("boot-specific resources"), "{body}");
    assert_eq!(c.stop(libc::SIGTERM), Some(143));
    let c = Vireo::start("snap-bad-bodies");
    for (body, needle) in [
        (r#"{"snapshot_path":"a"}"#.to_string(), "mem_backend"),
        (r#"{"snapshot_path":"a","mem_file_path":"b","mem_backend":{"backend_type":"File","backend_path":"b"}}"#.into(), "not both"),
        (r#"{"snapshot_path":"a","mem_backend":{"backend_type":"Floppy","backend_path":"b"}}"#.into(), "unknown variant"),
        (r#"{"snapshot_path":"a","mem_file_path":"b","huge_pages":"2M"}"#.into(), "huge_pages 2M"),
    ] {
        let (code, answer) = c.req("PUT", "/snapshot/load", &body);
        assert_eq!(code, 400, "{body}: {answer}");
        assert!(answer.contains(needle), "{body}: {answer}");
    }
    assert_eq!(c.stop(libc::SIGTERM), Some(143));
    let _ = std::fs::remove_dir_all(&files);
}

#[test]
fn kill_during_create_keeps_the_previous_snapshot_loadable() {
    // A large initrd fills guest memory with data, so that a full snapshot takes long
    // enough to be killed in the middle.
    let files = scratch("snap-kill-files");
    let initrd = files.join("initrd");
    write_file(&initrd, &pattern(96 << 20, 7));
    let v = Vireo::start("snap-kill");
    ok(
        &v,
        "PUT",
        "/boot-source",
        &format!(
            r#"{{"kernel_image_path":"{}","initrd_path":"{}","boot_args":"console=ttyS0 vireo.nohash vireo.count=0 vireo.tickms=10"}}"#,
            guest("elf").display(),
            initrd.display()
        ),
    );
    ok(
        &v,
        "PUT",
        "/machine-config",
        r#"{"vcpu_count":1,"mem_size_mib":256}"#,
    );
    ok(&v, "PUT", "/actions", r#"{"action_type":"InstanceStart"}"#);
    let seen = wait_tick(&v, 2);
    pause(&v, &seen);
    let (state, mem) = (files.join("state"), files.join("mem"));
    create(&v, "Full", &state, &mem);
    let before = (file_bytes(&state), fnv1a(&file_bytes(&mem)));
    // The second create is killed part way.
    let sock = v.sock.clone();
    let body = format!(
        r#"{{"snapshot_path":"{}","mem_file_path":"{}"}}"#,
        state.display(),
        mem.display()
    );
    let t = std::thread::spawn(move || {
        let _ = std::panic::catch_unwind(|| http(&sock, "PUT", "/snapshot/create", &body));
    });
    std::thread::sleep(Duration::from_millis(30));
    kill9(v);
    let _ = t.join();
    let partial = temp_files(&files);
    assert!(
        !partial.is_empty(),
        "the kill landed in the middle of the create"
    );
    assert_eq!(
        (file_bytes(&state), fnv1a(&file_bytes(&mem))),
        before,
        "the previous snapshot is untouched"
    );
    let c = Vireo::start("snap-kill-restore");
    let (code, body) = c.req("PUT", "/snapshot/load", &load_body(&state, &mem, true));
    assert_eq!(code, 204, "{body}");
    let seen = wait_tick(&c, 5);
    // The next create in that directory removes what the killed one left.
    pause(&c, &seen);
    create(&c, "Full", &state, &mem);
    let partial = temp_files(&files);
    assert!(partial.is_empty(), "{partial:?}");
    assert_eq!(c.stop(libc::SIGTERM), Some(143));
    let _ = std::fs::remove_dir_all(&files);
}

#[test]
fn the_command_line_snapshots_and_restores() {
    let v = boot_counter("snap-cli", "", 64, false, None);
    wait_tick(&v, 3);
    let files = scratch("snap-cli-files");
    let out = files.join("snapdir");
    let r = run_raw(&[
        "snapshot",
        "--api-sock",
        v.sock.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    assert!(out.join("state").is_file() && out.join("memory").is_file());
    // It resumed the VM.
    let (code, info) = v.req("GET", "/", "");
    assert_eq!(code, 200);
    assert!(info.contains("\"Running\""), "{info}");
    let n = wait_tick(&v, 0)
        .iter()
        .filter_map(|l| tick(l))
        .max()
        .unwrap();
    wait_tick(&v, n + 2);
    // A diff without dirty tracking is refused with the API's reason.
    let r = run_raw(&[
        "snapshot",
        "--api-sock",
        v.sock.to_str().unwrap(),
        "--out",
        v.dir.join("d2").to_str().unwrap(),
        "--diff",
    ]);
    assert_eq!(r.code(), 1);
    assert!(
        r.stderr.contains("needs dirty page tracking"),
        "{}",
        r.stderr
    );
    assert_eq!(v.stop(libc::SIGTERM), Some(143));

    let mut child = vireo()
        .args([
            "restore",
            "--clock-realtime",
            "--snapshot",
            out.to_str().unwrap(),
        ])
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for l in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let end = Instant::now() + DEADLINE;
    while !seen
        .iter()
        .any(|l: &String| tick(l).is_some_and(|k| k >= 10))
    {
        let left = end.saturating_duration_since(Instant::now());
        seen.push(rx.recv_timeout(left).expect("restored guest counts"));
    }
    // SAFETY: kill(2) on a child this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(wait_exit(&mut child).code(), Some(143));
    let r = run_raw(&["restore", "--snapshot", "/nonexistent"]);
    assert_eq!(r.code(), 1);
    assert!(r.stderr.contains("/nonexistent/state"), "{}", r.stderr);
    let _ = std::fs::remove_dir_all(&files);
}

/// A page-fault handler as Firecracker's Uffd backend expects one: it listens on a Unix
/// socket, receives the userfaultfd (SCM_RIGHTS) with the JSON list of regions, and fills each
/// missing page from the memory file with UFFDIO_COPY, or with zeros (UFFDIO_ZEROPAGE) once
/// a balloon removed it (UFFD_EVENT_REMOVE). Returns the number of pages it filled and the
/// bytes removed once the VMM closes the userfaultfd (or `stop` is set).
mod uffd_handler {
    use std::fs::File;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixListener;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;

    const PAGE: u64 = 4096;
    const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
    const UFFD_EVENT_REMOVE: u8 = 0x15;

    #[repr(C)]
    struct UffdioZeropage {
        start: u64,
        len: u64,
        mode: u64,
        zeropage: i64,
    }
    vmm_sys_util::ioctl_iowr_nr!(UFFDIO_ZEROPAGE, 0xaa, 0x04, UffdioZeropage);

    #[repr(C)]
    struct UffdioCopy {
        dst: u64,
        src: u64,
        len: u64,
        mode: u64,
        copy: i64,
    }
    vmm_sys_util::ioctl_iowr_nr!(UFFDIO_COPY, 0xaa, 0x03, UffdioCopy);

    pub fn serve(listener: UnixListener, mem: File, stop: Arc<AtomicBool>) -> (u64, u64) {
        let (stream, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; 4096];
        let (n, fd) = stream.recv_with_fd(&mut buf[..]).unwrap();
        let uffd = fd.expect("the VMM sends the userfaultfd");
        let regions: Vec<serde_json::Value> = serde_json::from_slice(&buf[..n]).unwrap();
        for r in &regions {
            assert_eq!(r["page_size"], 4096, "{r}");
            assert_eq!(
                r["page_size_kib"], 4096,
                "the older field, in bytes as Firecracker sends it"
            );
        }
        let len = mem.metadata().unwrap().len() as usize;
        // SAFETY: maps the memory file read-only and private; nothing else maps it here.
        let src = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                mem.as_raw_fd(),
                0,
            )
        };
        assert_ne!(src, libc::MAP_FAILED);
        let mut filled = 0;
        let mut removed: Vec<(u64, u64)> = Vec::new();
        // Faults not served yet: a copy fails with EAGAIN while a remove event is pending
        // (the balloon's madvise), and is tried again once the event is read.
        let mut pending: Vec<u64> = Vec::new();
        let mut msg = [0u8; 32];
        // Fills one faulting page: zeros where the balloon removed it, else the file's page.
        // Returns false when it must be tried again.
        let serve_one = |addr: u64, removed: &[(u64, u64)]| -> bool {
            let rc = if removed.iter().any(|&(a, b)| addr >= a && addr < b) {
                let mut zero = UffdioZeropage {
                    start: addr,
                    len: PAGE,
                    mode: 0,
                    zeropage: 0,
                };
                // SAFETY: maps the zero page at one page of the registered range the VMM
                // named; the ioctl reads and writes one `UffdioZeropage`.
                unsafe {
                    vmm_sys_util::ioctl::ioctl_with_mut_ref(&uffd, UFFDIO_ZEROPAGE(), &mut zero)
                }
            } else {
                let r = regions
                    .iter()
                    .find(|r| {
                        let base = r["base_host_virt_addr"].as_u64().unwrap();
                        addr >= base && addr < base + r["size"].as_u64().unwrap()
                    })
                    .expect("a fault inside a region");
                let offset = r["offset"].as_u64().unwrap() + addr
                    - r["base_host_virt_addr"].as_u64().unwrap();
                let mut copy = UffdioCopy {
                    dst: addr,
                    src: src as u64 + offset,
                    len: PAGE,
                    mode: 0,
                    copy: 0,
                };
                // SAFETY: copies one page from the mapped file into the registered range the
                // VMM named; the ioctl reads and writes one `UffdioCopy`.
                unsafe { vmm_sys_util::ioctl::ioctl_with_mut_ref(&uffd, UFFDIO_COPY(), &mut copy) }
            };
            rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EAGAIN)
        };
        while !stop.load(Ordering::SeqCst) {
            let mut pfd = libc::pollfd {
                fd: uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let wait = if pending.is_empty() { 50 } else { 1 };
            // SAFETY: one pollfd, valid for the call.
            let ready = unsafe { libc::poll(&mut pfd, 1, wait) } > 0;
            if ready && pfd.revents & (libc::POLLHUP | libc::POLLERR) != 0 {
                break;
            }
            if ready {
                let mut f = &uffd;
                use std::io::Read;
                match f.read(&mut msg) {
                    Ok(32) => {
                        let word =
                            |at: usize| u64::from_le_bytes(msg[at..at + 8].try_into().unwrap());
                        if msg[0] == UFFD_EVENT_REMOVE {
                            removed.push((word(8), word(16)));
                        } else if msg[0] == UFFD_EVENT_PAGEFAULT {
                            pending.push(word(16) & !(PAGE - 1));
                        }
                    }
                    Ok(0) => break,
                    Ok(_) | Err(_) => {}
                }
            }
            let before = pending.len();
            pending.retain(|&addr| !serve_one(addr, &removed));
            filled += (before - pending.len()) as u64;
        }
        // SAFETY: unmaps what was mapped above.
        unsafe { libc::munmap(src, len) };
        drop(uffd);
        (filled, removed.iter().map(|(a, b)| b - a).sum())
    }

    pub fn start(
        sock: &std::path::Path,
        mem: &std::path::Path,
    ) -> (Arc<AtomicBool>, std::thread::JoinHandle<(u64, u64)>) {
        let listener = UnixListener::bind(sock).unwrap();
        let file = File::open(mem).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        (stop, std::thread::spawn(move || serve(listener, file, s)))
    }
}

#[test]
fn a_uffd_page_fault_handler_serves_a_restored_vm() {
    let v = boot_counter("snap-uffd", "", 64, false, None);
    let seen = wait_tick(&v, 3);
    let last = pause(&v, &seen);
    let files = scratch("snap-uffd-files");
    let (state, mem) = (files.join("state"), files.join("mem"));
    create(&v, "Full", &state, &mem);
    kill9(v);
    let sock = files.join("uffd.sock");
    let (stop, handler) = uffd_handler::start(&sock, &mem);
    let c = Vireo::start("snap-uffd-restored");
    let (code, body) = c.req(
        "PUT",
        "/snapshot/load",
        &format!(
            r#"{{"snapshot_path":"{}","mem_backend":{{"backend_type":"Uffd","backend_path":"{}"}},"resume_vm":true}}"#,
            state.display(),
            sock.display()
        ),
    );
    assert_eq!(code, 204, "{body}");
    let seen = wait_tick(&c, last + 5);
    let ticks: Vec<u64> = seen.iter().filter_map(|l| tick(l)).collect();
    assert!(ticks[0] <= last + 2, "{seen:?}");
    // A snapshot of it reads every page through the handler, and holds the same memory.
    let _ = pause(&c, &[]);
    let (s2, m2) = (files.join("state2"), files.join("mem2"));
    create(&c, "Full", &s2, &m2);
    assert_eq!(c.stop(libc::SIGTERM), Some(143));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (filled, removed) = handler.join().unwrap();
    assert!(filled > 1000, "the handler filled {filled} pages");
    assert_eq!(removed, 0, "without a balloon nothing is removed");
    let c = Vireo::start("snap-uffd-again");
    let (code, body) = c.req("PUT", "/snapshot/load", &load_body(&s2, &m2, true));
    assert_eq!(code, 204, "{body}");
    wait_tick(&c, last + 8);
    assert_eq!(c.stop(libc::SIGTERM), Some(143));
    // Nobody listening: a clear error.
    let c = Vireo::start("snap-uffd-nobody");
    let (code, body) = c.req(
        "PUT",
        "/snapshot/load",
        &format!(
            r#"{{"snapshot_path":"{}","mem_backend":{{"backend_type":"Uffd","backend_path":"{}"}}}}"#,
            state.display(),
            files.join("absent.sock").display()
        ),
    );
    assert_eq!(code, 400);
    assert!(
        body.contains("cannot connect to the page-fault handler"),
        "{body}"
    );
    assert_eq!(c.stop(libc::SIGTERM), Some(143));
    let _ = std::fs::remove_dir_all(&files);
}

#[test]
fn a_restored_vsock_device_resets_the_guest_connections_and_listens_at_the_override() {
    let files = scratch("snap-vsock-files");
    let v = Vireo::start("snap-vsock");
    ok(
        &v,
        "PUT",
        "/boot-source",
        &format!(
            r#"{{"kernel_image_path":"{}","boot_args":"console=ttyS0 vireo.vsocktest vireo.vsockevents"}}"#,
            guest("elf").display()
        ),
    );
    let uds = files.join("v.sock");
    ok(
        &v,
        "PUT",
        "/vsock",
        &format!(r#"{{"guest_cid":3,"uds_path":"{}"}}"#, uds.display()),
    );
    ok(&v, "PUT", "/actions", r#"{"action_type":"InstanceStart"}"#);
    v.wait_prefix("@vsock events posted");
    pause(&v, &[]);
    let (state, mem) = (files.join("state"), files.join("mem"));
    create(&v, "Full", &state, &mem);
    assert_eq!(v.stop(libc::SIGTERM), Some(143));

    let c = Vireo::start("snap-vsock-restored");
    let moved = files.join("moved.sock");
    let (code, body) = c.req(
        "PUT",
        "/snapshot/load",
        &format!(
            r#"{{"snapshot_path":"{}","mem_backend":{{"backend_type":"File","backend_path":"{}"}},"resume_vm":true,"vsock_override":{{"uds_path":"{}"}}}}"#,
            state.display(),
            mem.display(),
            moved.display()
        ),
    );
    assert_eq!(code, 204, "{body}");
    let event = c.wait_prefix("@vsock event");
    assert_eq!(field(&event, "id"), Some("0"), "TRANSPORT_RESET: {event}");
    assert_eq!(field(&event, "len"), Some("4"), "{event}");
    // The host side now listens at the override.
    let mut s =
        std::os::unix::net::UnixStream::connect(&moved).expect("vsock socket at the override");
    use std::io::Write;
    s.write_all(b"CONNECT 5000\n").unwrap();
    drop(s);
    assert!(
        !uds.exists(),
        "the clone does not serve the snapshot's old socket path"
    );
    assert_eq!(c.stop(libc::SIGTERM), Some(143));
    // An override for a device the snapshot lacks, or an interface it lacks, is refused.
    let c = Vireo::start("snap-vsock-bad-override");
    let (code, body) = c.req(
        "PUT",
        "/snapshot/load",
        &format!(
            r#"{{"snapshot_path":"{}","mem_file_path":"{}","network_overrides":[{{"iface_id":"eth9","host_dev_name":"tap9"}}]}}"#,
            state.display(),
            mem.display()
        ),
    );
    assert_eq!(code, 400);
    assert!(body.contains("no network interface 'eth9'"), "{body}");
    assert_eq!(c.stop(libc::SIGTERM), Some(143));
    let _ = std::fs::remove_dir_all(&files);
}

/// Whether the host may hand `dev` packets with a partial checksum (ETHTOOL_GTXCSUM): what a
/// TAP does once vireo applies the guest's checksum offload to it (TUNSETOFFLOAD).
fn tap_tx_csum(dev: &str) -> bool {
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    #[repr(C)]
    struct Ifreq {
        name: [u8; 16],
        data: *mut EthtoolValue,
        _pad: [u8; 16],
    }
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_GTXCSUM: u32 = 0x16;
    let mut value = EthtoolValue {
        cmd: ETHTOOL_GTXCSUM,
        data: 0,
    };
    let mut req = Ifreq {
        name: [0; 16],
        data: &mut value,
        _pad: [0; 16],
    };
    req.name[..dev.len()].copy_from_slice(dev.as_bytes());
    // SAFETY: a datagram socket for the ioctl, closed below; the ioctl reads `req` and writes
    // `value`, both alive for the call.
    unsafe {
        let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        assert!(s >= 0);
        let r = libc::ioctl(s, SIOCETHTOOL, &mut req);
        libc::close(s);
        assert_eq!(r, 0, "SIOCETHTOOL on {dev}");
    }
    value.data != 0
}

#[test]
fn a_restored_interface_on_a_new_tap_passes_traffic_with_its_offloads() {
    let ns = NetNs::enter("snapnet");
    ns.tap("tap0", Some("10.0.0.1/24"));
    let hello = std::net::UdpSocket::bind("10.0.0.1:6000").unwrap();
    hello.set_read_timeout(Some(DEADLINE)).unwrap();
    let files = scratch("snap-net-files");
    let v = Vireo::start("snap-net");
    ok(
        &v,
        "PUT",
        "/boot-source",
        &format!(
            r#"{{"kernel_image_path":"{}","boot_args":"console=ttyS0 vireo.nettest vireo.netcsum"}}"#,
            guest("elf").display()
        ),
    );
    ok(
        &v,
        "PUT",
        "/network-interfaces/eth0",
        r#"{"iface_id":"eth0","host_dev_name":"tap0","guest_mac":"02:00:00:00:00:02"}"#,
    );
    ok(&v, "PUT", "/actions", r#"{"action_type":"InstanceStart"}"#);
    v.wait_prefix("@net ready");
    let mut buf = [0u8; 256];
    let (n, _) = hello.recv_from(&mut buf).expect("the guest's hello");
    assert_eq!(&buf[..n], b"hello from vireo");
    assert!(tap_tx_csum("tap0"), "the guest's offloads on its TAP");
    pause(&v, &[]);
    let (state, mem) = (files.join("state"), files.join("mem"));
    create(&v, "Full", &state, &mem);
    assert_eq!(v.stop(libc::SIGTERM), Some(143));

    // The clone gets a new TAP with the host's address; it starts without offloads.
    ns.sh("ip link del tap0");
    ns.tap("tap1", Some("10.0.0.1/24"));
    assert!(!tap_tx_csum("tap1"));
    let c = Vireo::start("snap-net-restored");
    let (code, body) = c.req(
        "PUT",
        "/snapshot/load",
        &format!(
            r#"{{"snapshot_path":"{}","mem_backend":{{"backend_type":"File","backend_path":"{}"}},"resume_vm":true,"network_overrides":[{{"iface_id":"eth0","host_dev_name":"tap1"}}]}}"#,
            state.display(),
            mem.display()
        ),
    );
    assert_eq!(code, 204, "{body}");
    assert!(
        tap_tx_csum("tap1"),
        "the negotiated offloads are applied to the new TAP"
    );
    let host = std::net::UdpSocket::bind("10.0.0.1:0").unwrap();
    host.send_to(b"hello after restore", "10.0.0.2:5000")
        .unwrap();
    let got = c.wait_prefix("@net udp-rx");
    let hex: String = b"hello after restore"
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(field(&got, "data"), Some(hex.as_str()), "{got}");
    assert_eq!(c.stop(libc::SIGTERM), Some(143));
    let _ = std::fs::remove_dir_all(&files);
}

/// Leaf 1 ECX and leaf 7 EBX from the guest's `@cpu ... bsp` line.
fn cpu_regs(v: &Vireo) -> (u64, u64) {
    let line = v.wait_prefix("@cpu apic=0");
    let reg = |name: &str| {
        let hex = field(&line, name).unwrap_or_else(|| panic!("{name} in {line}"));
        u64::from_str_radix(hex.trim_start_matches("0x"), 16).unwrap()
    };
    (reg("leaf1_ecx"), reg("leaf7_ebx"))
}

const CPU_TEMPLATE: &str = r#"{"cpuid_modifiers":[
    {"leaf":"0x1","subleaf":"0x0","flags":0,"modifiers":[{"register":"ecx","bitmap":"0b0"}]},
    {"leaf":"0x7","subleaf":"0x0","flags":1,"modifiers":[{"register":"ebx","bitmap":"0bxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx0"}]}],
  "msr_modifiers":[{"addr":"0xc0000103","bitmap":"0b101"}]}"#;

/// Boots the counting guest with the template above.
fn boot_with_template(name: &str) -> Vireo {
    let v = Vireo::start(name);
    ok(&v, "PUT", "/cpu-config", CPU_TEMPLATE);
    ok(
        &v,
        "PUT",
        "/boot-source",
        &format!(
            r#"{{"kernel_image_path":"{}","boot_args":"console=ttyS0 vireo.count=0 vireo.tickms=10"}}"#,
            guest("elf").display()
        ),
    );
    ok(&v, "PUT", "/actions", r#"{"action_type":"InstanceStart"}"#);
    v
}

/// The CPUID register of a saved vCPU: `reg` 0-3 for EAX-EDX.
fn saved_cpuid(state: &Path, leaf: u32, sub: u32, reg: usize) -> u32 {
    let vcpus = sections(&file_bytes(state))
        .into_iter()
        .find(|(n, _)| n == "vcpus")
        .unwrap()
        .1;
    let vcpus: serde_json::Value = serde_json::from_slice(&vcpus).unwrap();
    let entry: Vec<u8> = vcpus[0]["cpuid"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            e.as_array()
                .unwrap()
                .iter()
                .map(|b| b.as_u64().unwrap() as u8)
                .collect::<Vec<u8>>()
        })
        .find(|b| b[0..4] == leaf.to_le_bytes() && b[4..8] == sub.to_le_bytes())
        .expect("the leaf in the saved CPUID");
    u32::from_le_bytes(entry[12 + 4 * reg..16 + 4 * reg].try_into().unwrap())
}

#[test]
#[cfg_attr(
    not(vireo_hw_virt),
    ignore = "skipped: this host's KVM (PVM) does not apply CPUID changes"
)]
fn a_custom_cpu_template_sets_the_vcpus_cpuid_and_travels_with_snapshots() {
    // Without a template, then with: KVM's CPUID for the vCPU differs in the template's bits.
    let files = scratch("cpu-template-files");
    let mut saved = Vec::new();
    for (name, v) in [
        ("plain", boot_counter("cpu-plain", "", 64, false, None)),
        ("templated", boot_with_template("cpu-template")),
    ] {
        let seen = wait_tick(&v, 2);
        pause(&v, &seen);
        let (state, mem) = (
            files.join(format!("{name}.state")),
            files.join(format!("{name}.mem")),
        );
        create(&v, "Full", &state, &mem);
        assert_eq!(v.stop(libc::SIGTERM), Some(143));
        saved.push((
            saved_cpuid(&state, 1, 0, 2),
            saved_cpuid(&state, 7, 0, 1),
            state,
            mem,
        ));
    }
    let (plain, templated) = (&saved[0], &saved[1]);
    assert_eq!(plain.0 & 1, 1, "this host offers SSE3 (leaf 1 ECX bit 0)");
    assert_eq!(
        plain.1 & 1,
        1,
        "this host offers FSGSBASE (leaf 7 EBX bit 0)"
    );
    assert_eq!(
        (templated.0, templated.1),
        (plain.0 & !1, plain.1 & !1),
        "only the template's bits changed"
    );
    // The restored VM runs with the template's CPUID.
    let c = Vireo::start("cpu-template-restored");
    let (code, body) = c.req(
        "PUT",
        "/snapshot/load",
        &load_body(&templated.2, &templated.3, true),
    );
    assert_eq!(code, 204, "{body}");
    wait_tick(&c, 6);
    assert_eq!(c.stop(libc::SIGTERM), Some(143));
    let _ = std::fs::remove_dir_all(&files);
}

/// On hosts where KVM virtualises CPUID (VMX or SVM), the guest sees the template.
#[test]
#[cfg_attr(
    not(vireo_hw_virt),
    ignore = "skipped: this host's KVM (PVM) does not apply CPUID changes"
)]
fn the_guest_sees_the_cpu_template() {
    let plain = boot_counter("cpu-guest-plain", "", 64, false, None);
    let (ecx, ebx) = cpu_regs(&plain);
    assert_eq!(plain.stop(libc::SIGTERM), Some(143));
    let v = boot_with_template("cpu-guest-template");
    assert_eq!(cpu_regs(&v), (ecx & !1, ebx & !1));
    assert_eq!(v.stop(libc::SIGTERM), Some(143));
}

/// Templates are checked when given; and a host whose KVM keeps its own CPUID (PVM) refuses to
/// start with one, naming the leaf, rather than run a VM that does not match the template.
#[test]
fn bad_templates_and_hosts_that_ignore_them_are_refused() {
    let v = Vireo::start("cpu-template-bad");
    for (body, needle) in [
        (
            r#"{"cpuid_modifiers":[{"leaf":"0x1","subleaf":"0x0","modifiers":[{"register":"ecx","bitmap":"0b2"}]}]}"#,
            "'2' is not 0, 1 or x",
        ),
        (r#"{"kvm_capabilities":["!56"]}"#, "kvm_capabilities"),
        (r#"{"cpuid_modifiers":[],"bogus":1}"#, "unknown field"),
    ] {
        let (code, answer) = v.req("PUT", "/cpu-config", body);
        assert_eq!(code, 400, "{body}: {answer}");
        assert!(answer.contains(needle), "{body}: {answer}");
    }
    drop(v);
    let v = Vireo::start("cpu-template-host");
    ok(&v, "PUT", "/cpu-config", CPU_TEMPLATE);
    let (code, cfg) = v.req("GET", "/vm/config", "");
    assert_eq!(code, 200);
    assert!(cfg.contains("0xc0000103"), "{cfg}");
    ok(
        &v,
        "PUT",
        "/boot-source",
        &format!(
            r#"{{"kernel_image_path":"{}","boot_args":"console=ttyS0 vireo.count=1"}}"#,
            guest("elf").display()
        ),
    );
    let (code, body) = v.req("PUT", "/actions", r#"{"action_type":"InstanceStart"}"#);
    if cfg!(vireo_hw_virt) {
        assert_eq!(code, 204, "{body}");
    } else {
        assert_eq!(code, 400, "{body}");
        assert!(
            body.contains("does not apply CPUID changes (leaf 0x1.0 ecx"),
            "{body}"
        );
    }
}

/// A create that runs out of disk space fails with the reason and leaves nothing behind; the
/// VM runs on. vireo runs in its own mount namespace with a 1 MiB tmpfs as the snapshot
/// directory, so the host's file systems are never filled.
#[test]
fn a_full_disk_fails_the_create_cleanly() {
    let files = scratch("snap-full-files");
    let initrd = files.join("initrd");
    write_file(&initrd, &pattern(4 << 20, 3));
    let small = files.join("small");
    std::fs::create_dir_all(&small).unwrap();
    let sock = files.join("api.sock");
    let mut child = std::process::Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c"])
        .arg(format!(
            "mount -t tmpfs -o size=1m tmpfs {} && exec {} --api-sock {}",
            small.display(),
            vireo_bin().display(),
            sock.display()
        ))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("unshare (util-linux)");
    wait_for_socket(&sock);
    let req = |m: &str, p: &str, b: &str| http(&sock, m, p, b);
    let put = |p: &str, b: &str| {
        let (code, body) = req("PUT", p, b);
        assert_eq!(code, 204, "{p}: {body}");
    };
    put(
        "/boot-source",
        &format!(
            r#"{{"kernel_image_path":"{}","initrd_path":"{}","boot_args":"console=ttyS0 vireo.nohash vireo.count=0"}}"#,
            guest("elf").display(),
            initrd.display()
        ),
    );
    put("/actions", r#"{"action_type":"InstanceStart"}"#);
    let (code, body) = req("PATCH", "/vm", r#"{"state":"Paused"}"#);
    assert_eq!(code, 204, "{body}");
    let (code, body) = req(
        "PUT",
        "/snapshot/create",
        &format!(
            r#"{{"snapshot_path":"{0}/state","mem_file_path":"{0}/mem"}}"#,
            small.display()
        ),
    );
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("No space left on device"), "{body}");
    assert!(body.contains("mem_file_path"), "{body}");
    // Nothing left in the tmpfs, seen through vireo's own mount namespace.
    let inside = PathBuf::from(format!("/proc/{}/root{}", child.id(), small.display()));
    let left: Vec<_> = std::fs::read_dir(&inside)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}");
    let c = std::ffi::CString::new(inside.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: statfs(2) fills the zeroed struct for a NUL-terminated path.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statfs(c.as_ptr(), &mut fs) }, 0);
    assert_eq!(
        fs.f_type, 0x0102_1994,
        "the directory checked is vireo's tmpfs"
    );
    let (code, body) = req("PATCH", "/vm", r#"{"state":"Resumed"}"#);
    assert_eq!(code, 204, "{body}");
    let (code, info) = req("GET", "/", "");
    assert_eq!(code, 200);
    assert!(info.contains("\"Running\""), "{info}");
    // SAFETY: kill(2) on a child this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(wait_exit(&mut child).code(), Some(143));
    let _ = std::fs::remove_dir_all(&files);
}

#[test]
fn a_two_vcpu_vm_restores_with_both_cpus() {
    let v = Vireo::start("snap-smp");
    ok(
        &v,
        "PUT",
        "/boot-source",
        &format!(
            r#"{{"kernel_image_path":"{}","boot_args":"console=ttyS0 vireo.count=0 vireo.tickms=10"}}"#,
            guest("elf").display()
        ),
    );
    ok(
        &v,
        "PUT",
        "/machine-config",
        r#"{"vcpu_count":2,"mem_size_mib":64}"#,
    );
    ok(&v, "PUT", "/actions", r#"{"action_type":"InstanceStart"}"#);
    let ap = v.wait_prefix("@cpu apic=1");
    assert!(ap.contains("started"), "{ap}");
    let seen = wait_tick(&v, 3);
    let last = pause(&v, &seen);
    let files = scratch("snap-smp-files");
    let (state, mem) = (files.join("state"), files.join("mem"));
    create(&v, "Full", &state, &mem);
    kill9(v);
    let vcpus = sections(&file_bytes(&state))
        .into_iter()
        .find(|(n, _)| n == "vcpus")
        .unwrap()
        .1;
    let vcpus: serde_json::Value = serde_json::from_slice(&vcpus).unwrap();
    assert_eq!(vcpus.as_array().unwrap().len(), 2);
    let c = Vireo::start("snap-smp-restored");
    let (code, body) = c.req("PUT", "/snapshot/load", &load_body(&state, &mem, true));
    assert_eq!(code, 204, "{body}");
    wait_tick(&c, last + 5);
    let (code, cfg) = c.req("GET", "/machine-config", "");
    assert_eq!(code, 200);
    assert!(cfg.contains("\"vcpu_count\":2"), "{cfg}");
    assert_eq!(c.stop(libc::SIGTERM), Some(143));
    let _ = std::fs::remove_dir_all(&files);
}

/// Boots the balloon test guest (16 MiB touched) with statistics every second, inflates it to
/// 4 MiB and snapshots it paused.
fn ballooned_snapshot(name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let v = Vireo::start(name);
    let pvh = guest("pvh");
    ok(
        &v,
        "PUT",
        "/machine-config",
        r#"{"vcpu_count":1,"mem_size_mib":128}"#,
    );
    ok(
        &v,
        "PUT",
        "/boot-source",
        &format!(
            r#"{{"kernel_image_path":"{}","boot_args":"console=ttyS0 vireo.balloontest=16"}}"#,
            pvh.display()
        ),
    );
    ok(
        &v,
        "PUT",
        "/balloon",
        r#"{"amount_mib":0,"deflate_on_oom":false,"stats_polling_interval_s":1}"#,
    );
    ok(&v, "PUT", "/actions", r#"{"action_type":"InstanceStart"}"#);
    v.wait_prefix("@balloon ready");
    ok(&v, "PATCH", "/balloon", r#"{"amount_mib":4}"#);
    let l = v.wait_prefix("@balloon inflated");
    assert!(l.contains("actual=1024 ok=1 kept_intact=1"), "{l}");
    // Statistics have arrived before the snapshot.
    let end = Instant::now() + DEADLINE;
    while !v
        .req("GET", "/balloon/statistics", "")
        .1
        .contains("total_memory")
    {
        assert!(Instant::now() < end, "no statistics from the guest");
        std::thread::sleep(Duration::from_millis(50));
    }
    ok(&v, "PATCH", "/vm", r#"{"state":"Paused"}"#);
    let files = scratch(&format!("{name}-files"));
    let (state, mem) = (files.join("state"), files.join("mem"));
    create(&v, "Full", &state, &mem);
    kill9(v);
    (files, state, mem)
}

/// Sends `c`'s metrics to a file in `dir`; returns its path.
fn metrics_to(c: &Vireo, dir: &Path) -> PathBuf {
    let metrics = dir.join("metrics");
    ok(
        c,
        "PUT",
        "/metrics",
        &format!(r#"{{"metrics_path":"{}"}}"#, metrics.display()),
    );
    metrics
}

/// On a restored VM the balloon keeps its size and statistics, gives more pages to the host
/// and takes them all back; returns the bytes the balloon released there (from the metrics).
fn balloon_after_restore(c: &Vireo, metrics: &Path) -> u64 {
    let (_, body) = c.req("GET", "/balloon", "");
    assert!(
        body.contains(r#""amount_mib":4"#),
        "{body} {:?}",
        c.req("GET", "/balloon/statistics", "")
    );
    let (code, body) = c.req("GET", "/balloon/statistics", "");
    assert_eq!(code, 200, "{body}");
    let s: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(s["actual_mib"], 4, "{s}");
    assert_eq!(s["total_memory"], 128u64 << 20, "restored statistics: {s}");
    ok(c, "PATCH", "/balloon", r#"{"amount_mib":8}"#);
    let l = c.wait_prefix("@balloon inflated");
    assert!(l.contains("actual=2048 ok=1 kept_intact=1"), "{l}");
    ok(c, "PUT", "/actions", r#"{"action_type":"FlushMetrics"}"#);
    let text = std::fs::read_to_string(metrics).unwrap();
    let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    let released = last["devices"]["balloon"]["released_bytes"]
        .as_u64()
        .unwrap_or_else(|| panic!("no balloon metrics: {last}"));
    ok(c, "PATCH", "/balloon", r#"{"amount_mib":0}"#);
    let l = c.wait_prefix("@balloon deflated");
    assert!(l.contains("actual=0 ok=1 rewritten=1"), "{l}");
    c.wait_prefix("@balloon done");
    released
}

#[test]
fn a_balloon_keeps_its_state_and_releases_file_backed_memory_after_a_restore() {
    let (files, state, mem) = ballooned_snapshot("snap-balloon");
    let c = Vireo::start("snap-balloon-restored");
    let metrics = metrics_to(&c, &files);
    ok(&c, "PUT", "/snapshot/load", &load_body(&state, &mem, true));
    let released = balloon_after_restore(&c, &metrics);
    assert_eq!(released, 4 << 20, "the 4 MiB given after the restore");
    let mut c = c;
    assert_eq!(wait_exit(&mut c.child).code(), Some(0));
    let _ = std::fs::remove_dir_all(&files);
}

#[test]
fn a_balloon_on_a_uffd_restored_vm_tells_the_page_fault_handler_what_it_releases() {
    let (files, state, mem) = ballooned_snapshot("snap-balloon-uffd");
    let sock = files.join("uffd.sock");
    let (stop, handler) = uffd_handler::start(&sock, &mem);
    let c = Vireo::start("snap-balloon-uffd-restored");
    let metrics = metrics_to(&c, &files);
    ok(
        &c,
        "PUT",
        "/snapshot/load",
        &format!(
            r#"{{"snapshot_path":"{}","mem_backend":{{"backend_type":"Uffd","backend_path":"{}"}},"resume_vm":true}}"#,
            state.display(),
            sock.display()
        ),
    );
    let released = balloon_after_restore(&c, &metrics);
    assert_eq!(released, 4 << 20);
    let mut c = c;
    assert_eq!(wait_exit(&mut c.child).code(), Some(0));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (_, removed) = handler.join().unwrap();
    assert!(
        removed >= 4 << 20,
        "the handler heard of {removed} bytes removed, not the 4 MiB released"
    );
    let _ = std::fs::remove_dir_all(&files);
}

/// Restores a snapshot of a guest that plugged 64 MiB of hotplug memory through `load`, and
/// checks that the plugged memory kept its bytes and can be plugged further and unplugged.
fn hotplug_after_restore(c: &Vireo, load: &str) {
    ok(c, "PUT", "/snapshot/load", load);
    let (code, body) = c.req("GET", "/hotplug/memory", "");
    assert_eq!(code, 200, "{body}");
    let s: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(s["plugged_size_mib"], 64, "{s}");
    ok(
        c,
        "PATCH",
        "/hotplug/memory",
        r#"{"requested_size_mib":96}"#,
    );
    let l = c.wait_prefix("@mem plugged");
    assert!(l.contains("mib=96 resp=0 verified=1 state=0"), "{l}");
    ok(c, "PATCH", "/hotplug/memory", r#"{"requested_size_mib":0}"#);
    let l = c.wait_prefix("@mem unplugged");
    assert!(l.contains("mib=0 resp=0"), "{l}");
    c.wait_prefix("@mem done");
}

#[test]
fn plugged_hotplug_memory_survives_snapshots_with_either_backend() {
    let v = Vireo::start("snap-hotplug");
    ok(
        &v,
        "PUT",
        "/machine-config",
        r#"{"vcpu_count":1,"mem_size_mib":128,"track_dirty_pages":true}"#,
    );
    ok(
        &v,
        "PUT",
        "/boot-source",
        &format!(
            r#"{{"kernel_image_path":"{}","boot_args":"console=ttyS0 vireo.memtest"}}"#,
            guest("pvh").display()
        ),
    );
    ok(&v, "PUT", "/hotplug/memory", r#"{"total_size_mib":256}"#);
    ok(&v, "PUT", "/actions", r#"{"action_type":"InstanceStart"}"#);
    v.wait_prefix("@mem ready");
    // A full snapshot with 32 MiB plugged, then a diff with 64 MiB, merged over it.
    let plug = |v: &Vireo, mib: u64| {
        ok(
            v,
            "PATCH",
            "/hotplug/memory",
            &format!(r#"{{"requested_size_mib":{mib}}}"#),
        );
        let l = v.wait_prefix("@mem plugged");
        assert!(l.contains(&format!("mib={mib} resp=0 verified=1")), "{l}");
    };
    plug(&v, 32);
    ok(&v, "PATCH", "/vm", r#"{"state":"Paused"}"#);
    let files = scratch("snap-hotplug-files");
    let (full, mem) = (files.join("full"), files.join("mem"));
    create(&v, "Full", &full, &mem);
    ok(&v, "PATCH", "/vm", r#"{"state":"Resumed"}"#);
    plug(&v, 64);
    ok(&v, "PATCH", "/vm", r#"{"state":"Paused"}"#);
    let (state, diff) = (files.join("state"), files.join("diff"));
    create(&v, "Diff", &state, &diff);
    kill9(v);
    let merged = run_raw(&[
        "rebase-snap",
        "--base-file",
        mem.to_str().unwrap(),
        "--diff-file",
        diff.to_str().unwrap(),
    ]);
    assert_eq!(merged.code(), 0, "{}", merged.stderr);
    // RAM, then the region, then the trailer page.
    assert_eq!(std::fs::metadata(&mem).unwrap().len(), (384 << 20) + 4096);
    let c = Vireo::start("snap-hotplug-file");
    hotplug_after_restore(&c, &load_body(&state, &mem, true));
    let mut c = c;
    assert_eq!(wait_exit(&mut c.child).code(), Some(0));
    let sock = files.join("uffd.sock");
    let (stop, handler) = uffd_handler::start(&sock, &mem);
    let c = Vireo::start("snap-hotplug-uffd");
    hotplug_after_restore(
        &c,
        &format!(
            r#"{{"snapshot_path":"{}","mem_backend":{{"backend_type":"Uffd","backend_path":"{}"}},"resume_vm":true}}"#,
            state.display(),
            sock.display()
        ),
    );
    let mut c = c;
    assert_eq!(wait_exit(&mut c.child).code(), Some(0));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (filled, _) = handler.join().unwrap();
    assert!(filled >= 64 * 256, "the handler filled {filled} pages");
    let _ = std::fs::remove_dir_all(&files);
}
