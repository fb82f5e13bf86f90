//! What backs guest RAM: 2 MiB huge pages from the host's pool (and a clear refusal when the
//! pool is too small), transparent huge pages, and KSM-mergeable memory.

mod common;
use common::*;
use std::io::BufRead;
use std::process::Child;
use std::time::{Duration, Instant};

/// Each mapping of `pid`: (size in KiB, kernel page size in KiB, VmFlags).
fn mappings(pid: u32) -> Vec<(u64, u64, String)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mut out = Vec::new();
    let mut cur: Option<(u64, u64, String)> = None;
    for l in smaps.lines() {
        let kib = |v: &str| v.split_whitespace().next().unwrap().parse::<u64>().unwrap();
        if let Some(v) = l.strip_prefix("Size:") {
            if let Some(c) = cur.take() {
                out.push(c);
            }
            cur = Some((kib(v), 4, String::new()));
        } else if let Some(v) = l.strip_prefix("KernelPageSize:") {
            if let Some(c) = cur.as_mut() {
                c.1 = kib(v);
            }
        } else if let Some(v) = l.strip_prefix("VmFlags:") {
            if let Some(c) = cur.as_mut() {
                c.2 = v.trim().to_owned();
            }
        }
    }
    out.extend(cur);
    out
}

/// Starts a ticking guest with `--memory spec` and waits until it runs.
fn ticking(spec: &str) -> Child {
    let kernel = guest("pvh");
    let mut child = vireo()
        .args(["run", "--kernel"])
        .arg(&kernel)
        .args(["--memory", spec, "--cmdline", "console=ttyS0 vireo.count=0"])
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let mut lines = std::io::BufReader::new(out).lines();
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(Instant::now() < end, "the guest never ticked");
        match lines.next() {
            Some(Ok(l)) if l.starts_with("@tick ") => break,
            Some(Ok(_)) => {}
            _ => panic!("vireo ended before the guest ticked"),
        }
    }
    // Keep draining, so the guest's output never fills the pipe.
    std::thread::spawn(move || for _ in lines {});
    child
}

fn meminfo(name: &str) -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// Restores the host's huge page pool however the test ends.
struct Pool(String);

impl Drop for Pool {
    fn drop(&mut self) {
        let _ = std::fs::write("/proc/sys/vm/nr_hugepages", &self.0);
    }
}

#[test]
fn two_mib_pages_back_the_guest_or_it_is_refused_clearly() {
    let kernel = guest("pvh");
    let k = kernel.to_str().unwrap();
    // More than the pool has free: refused before anything runs, saying how to fix it.
    let free = meminfo("HugePages_Free:");
    let mib = ((free + 8) * 2).to_string();
    let r = run(&["--kernel", k, "--memory", &format!("{mib},huge_pages=2M")]);
    assert_eq!(r.code(), 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("huge_pages 2M") && r.stderr.contains("/proc/sys/vm/nr_hugepages"),
        "{}",
        r.stderr
    );
    let r = run(&["--kernel", k, "--memory", "33,huge_pages=2M"]);
    assert_eq!(r.code(), 1, "{}", r.stderr);
    assert!(r.stderr.contains("multiple of 2 MiB"), "{}", r.stderr);

    // With 80 more pages in the pool, a 32 MiB guest runs on them.
    let before = std::fs::read_to_string("/proc/sys/vm/nr_hugepages").unwrap();
    let _pool = Pool(before.trim().to_owned());
    let want = before.trim().parse::<u64>().unwrap() + 80;
    std::fs::write("/proc/sys/vm/nr_hugepages", want.to_string()).unwrap();
    assert!(
        meminfo("HugePages_Free:") >= 80,
        "the host could not grow its huge page pool"
    );
    let mut vm = ticking("32,huge_pages=2M");
    let maps = mappings(vm.id());
    let _ = vm.kill();
    let _ = vm.wait();
    assert!(
        maps.iter()
            .any(|(size, page, _)| *page == 2048 && *size >= 32 << 10),
        "no 2 MiB-page mapping of the guest's RAM: {maps:?}"
    );

    // The balloon on huge pages: the guest touches 16 MiB (8 huge pages) and gives 8 MiB of
    // them back in 4 KiB pages; the host releases the 4 whole huge pages they cover, which go
    // back to the pool.
    let in_use = |balloon: &str, line: &str| {
        let free = meminfo("HugePages_Free:");
        let (mut child, rx) = spawn_interactive(&[
            "--kernel",
            k,
            "--memory",
            "128,huge_pages=2M",
            "--balloon",
            balloon,
            "--cmdline",
            "console=ttyS0 vireo.balloontest=16",
        ]);
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            let l = rx
                .recv_timeout(end.saturating_duration_since(Instant::now()))
                .unwrap_or_else(|_| panic!("no {line} line"));
            if l.starts_with(line) {
                assert!(!l.contains("ok=0"), "{l}");
                break;
            }
        }
        let used = free - meminfo("HugePages_Free:");
        let _ = child.kill();
        let _ = child.wait();
        used
    };
    let whole = in_use("size_mib=0", "@balloon ready");
    let ballooned = in_use("size_mib=8", "@balloon inflated");
    assert_eq!(
        whole - ballooned,
        4,
        "huge pages in use: {whole} without the balloon, {ballooned} with 8 MiB in it"
    );
}

#[test]
fn transparent_huge_pages_and_merging_are_asked_for() {
    let mut vm = ticking("64,huge_pages=Transparent,merge=on");
    let maps = mappings(vm.id());
    let _ = vm.kill();
    let _ = vm.wait();
    let (_, _, flags) = maps
        .iter()
        .find(|(size, _, _)| *size >= 60 << 10)
        .unwrap_or_else(|| panic!("no guest RAM mapping in {maps:?}"));
    let flags: Vec<&str> = flags.split_whitespace().collect();
    assert!(flags.contains(&"hg"), "MADV_HUGEPAGE: {flags:?}");
    assert!(flags.contains(&"mg"), "MADV_MERGEABLE: {flags:?}");
    // Without them, neither.
    let mut vm = ticking("64");
    let maps = mappings(vm.id());
    let _ = vm.kill();
    let _ = vm.wait();
    let (_, _, flags) = maps.iter().find(|(size, _, _)| *size >= 60 << 10).unwrap();
    assert!(!flags.contains("hg") && !flags.contains("mg"), "{flags}");
}

#[test]
fn bad_memory_options_and_api_values_are_refused() {
    let kernel = guest("pvh");
    for bad in ["64,huge_pages=1G", "64,swap=on", "lots"] {
        let r = run(&["--kernel", kernel.to_str().unwrap(), "--memory", bad]);
        assert_eq!(r.code(), 2, "{bad}: {}", r.stderr);
    }
    let v = Vireo::start("mem-api");
    let (code, body) = v.req(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count":1,"mem_size_mib":64,"huge_pages":"1G"}"#,
    );
    assert_eq!(code, 400);
    assert!(body.contains("expected None, Transparent or 2M"), "{body}");
    let (code, body) = v.req(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count":1,"mem_size_mib":33,"huge_pages":"2M"}"#,
    );
    assert_eq!(code, 400);
    assert!(body.contains("not a multiple of 2"), "{body}");
    assert_eq!(
        v.req(
            "PUT",
            "/machine-config",
            r#"{"vcpu_count":1,"mem_size_mib":64,"huge_pages":"Transparent"}"#
        )
        .0,
        204
    );
    v.stop(libc::SIGTERM);
}
