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
        let (l, _) = until_prefix(&rx, line);
        assert!(!l.contains("ok=0"), "{l}");
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

/// Resident anonymous KiB of `pid` (the hotplug region may share a mapping with RAM).
fn rss_anon_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

#[test]
fn hotplugged_memory_becomes_guest_ram_and_unplugged_memory_goes_back() {
    let v = Vireo::start("mem-hotplug");
    let kernel = guest("pvh").display().to_string();
    let ok = |method: &str, path: &str, body: &str| {
        let (code, answer) = v.req(method, path, body);
        assert_eq!(code, 204, "{method} {path}: {answer}");
    };
    ok(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count":1,"mem_size_mib":128}"#,
    );
    ok(
        "PUT",
        "/boot-source",
        &format!(r#"{{"kernel_image_path":"{kernel}","boot_args":"console=ttyS0 vireo.memtest"}}"#),
    );
    for (body, want) in [
        (
            r#"{"total_size_mib":256,"slot_size_mib":64}"#,
            "at least 128 MiB",
        ),
        (r#"{"total_size_mib":200}"#, "multiple of the slot size"),
        (
            r#"{"total_size_mib":256,"block_size_mib":3}"#,
            "power of two",
        ),
        (r#"{"total_size_mib":256,"x":1}"#, "unknown field `x`"),
    ] {
        let (code, answer) = v.req("PUT", "/hotplug/memory", body);
        assert_eq!(code, 400, "{body}: {answer}");
        assert!(answer.contains(want), "{body}: {answer}");
    }
    let (code, answer) = v.req("GET", "/hotplug/memory", "");
    assert_eq!(code, 400, "{answer}");
    ok("PUT", "/hotplug/memory", r#"{"total_size_mib":256}"#);
    let (code, answer) = v.req("PATCH", "/hotplug/memory", r#"{"requested_size_mib":64}"#);
    assert_eq!(code, 400, "{answer}");
    assert!(answer.contains("not supported before starting"), "{answer}");
    ok("PUT", "/actions", r#"{"action_type":"InstanceStart"}"#);
    let ready = v.wait_prefix("@mem ready");
    // After 128 MiB of RAM, aligned to the 128 MiB slot.
    assert!(
        ready.contains("block=2097152 addr=0x8000000 region=268435456 inaccessible=1"),
        "{ready}"
    );
    let pid = v.child.id();
    let before = rss_anon_kib(pid);

    // Plug 64 MiB: the guest writes every page of it and reads it back.
    ok("PATCH", "/hotplug/memory", r#"{"requested_size_mib":64}"#);
    let plugged = v.wait_prefix("@mem plugged");
    assert!(
        plugged.contains("mib=64 resp=0 verified=1 state=0"),
        "{plugged}"
    );
    let resident = rss_anon_kib(pid);
    assert!(
        resident >= before + (64 << 10),
        "{before} -> {resident} KiB resident"
    );
    let (code, status) = v.req("GET", "/hotplug/memory", "");
    assert_eq!(code, 200, "{status}");
    let s: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(
        (
            s["total_size_mib"].as_u64(),
            s["slot_size_mib"].as_u64(),
            s["block_size_mib"].as_u64()
        ),
        (Some(256), Some(128), Some(2)),
        "{s}"
    );
    assert_eq!(
        (
            s["plugged_size_mib"].as_u64(),
            s["requested_size_mib"].as_u64()
        ),
        (Some(64), Some(64))
    );
    for (body, want) in [
        (r#"{"requested_size_mib":512}"#, "cannot be requested"),
        (r#"{"requested_size_mib":3}"#, "cannot be requested"),
    ] {
        let (code, answer) = v.req("PATCH", "/hotplug/memory", body);
        assert_eq!(code, 400, "{body}: {answer}");
        assert!(answer.contains(want), "{answer}");
    }
    // Unplug all: the host releases it and the guest ends.
    ok("PATCH", "/hotplug/memory", r#"{"requested_size_mib":0}"#);
    let unplugged = v.wait_prefix("@mem unplugged");
    assert!(unplugged.contains("mib=0 resp=0"), "{unplugged}");
    let after = rss_anon_kib(pid);
    assert!(
        after + (63 << 10) <= resident,
        "released: {resident} -> {after} KiB"
    );
    v.wait_prefix("@mem done");
    let mut v = v;
    assert_eq!(wait_exit(&mut v.child).code(), Some(0));
}

#[test]
fn memory_hotplug_on_the_command_line_is_plugged_from_boot() {
    let kernel = guest("pvh");
    let k = kernel.to_str().unwrap();
    let (mut child, rx) = spawn_interactive(&[
        "--kernel",
        k,
        "--memory",
        "128",
        "--memory-hotplug",
        "total_mib=256,requested_mib=32",
        "--cmdline",
        "console=ttyS0 vireo.memtest",
    ]);
    let (plugged, _) = until_prefix(&rx, "@mem plugged");
    assert!(
        plugged.contains("mib=32 resp=0 verified=1 state=0"),
        "{plugged}"
    );
    let _ = child.kill();
    let _ = child.wait();
    for (spec, code, want) in [
        ("total_mib=x", 2, "total_mib=x: expected a number of MiB"),
        ("slot_mib=128", 2, "needs total_mib=N"),
        (
            "total_mib=256,foo=1",
            2,
            "'foo=1' is not a memory hotplug option",
        ),
        ("total_mib=100", 1, "multiple of the slot size"),
        ("total_mib=256,requested_mib=3", 1, "cannot be requested"),
    ] {
        let r = run(&["--kernel", k, "--memory", "128", "--memory-hotplug", spec]);
        assert_eq!(r.code(), code, "{spec}: {}", r.stderr);
        assert!(r.stderr.contains(want), "{spec}: {}", r.stderr);
    }
}
