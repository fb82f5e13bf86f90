//! virtio-balloon end to end: the test guest's balloon driver gives touched memory back and
//! takes it again, and the host's memory use (the guest RAM mapping's resident size, read from
//! /proc) follows; statistics reach the API; free page reporting releases what is reported.

mod common;
use common::*;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

/// Resident bytes of the guest RAM mapping of `pid` (the one anonymous mapping of `size`).
fn guest_rss(pid: u32, size: u64) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mut in_guest = false;
    let mut found = None;
    for l in smaps.lines() {
        let kib = |v: &str| v.split_whitespace().next().unwrap().parse::<u64>().unwrap() * 1024;
        if let Some(v) = l.strip_prefix("Size:") {
            in_guest = kib(v) == size;
        } else if let Some(v) = l.strip_prefix("Rss:") {
            if in_guest {
                assert!(found.is_none(), "two mappings of {size} bytes");
                found = Some(kib(v));
            }
        }
    }
    found.unwrap_or_else(|| panic!("no mapping of {size} bytes in\n{smaps}"))
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

fn configure(v: &Vireo, cmdline: &str, balloon: &str) {
    let kernel = guest("pvh").display().to_string();
    for (path, body) in [
        (
            "/machine-config",
            r#"{"vcpu_count":1,"mem_size_mib":128}"#.to_string(),
        ),
        (
            "/boot-source",
            format!(r#"{{"kernel_image_path":"{kernel}","boot_args":"console=ttyS0 {cmdline}"}}"#),
        ),
        ("/balloon", balloon.to_string()),
    ] {
        let (code, body) = v.req("PUT", path, &body);
        assert_eq!(code, 204, "PUT {path}: {body}");
    }
}

fn start(v: &Vireo) {
    let (code, body) = v.req("PUT", "/actions", r#"{"action_type":"InstanceStart"}"#);
    assert_eq!(code, 204, "{body}");
}

#[test]
fn inflating_releases_guest_memory_on_the_host_and_deflating_gives_it_back() {
    let v = Vireo::start("balloon-inflate");
    configure(
        &v,
        "vireo.balloontest=32",
        r#"{"amount_mib":0,"deflate_on_oom":true,"stats_polling_interval_s":1}"#,
    );
    start(&v);
    let ready = v.wait_prefix("@balloon ready");
    assert_eq!(field(&ready, "stats"), Some("1"), "{ready}");
    let pid = v.child.id();
    let before = guest_rss(pid, 128 * MIB);
    assert!(before >= 32 * MIB, "the guest touched 32 MiB: {before}");

    // The host asks for 24 MiB; the guest gives those pages and the host releases them.
    let (code, body) = v.req("PATCH", "/balloon", r#"{"amount_mib":24}"#);
    assert_eq!(code, 204, "{body}");
    let inflated = v.wait_prefix("@balloon inflated");
    assert_eq!(field(&inflated, "actual"), Some("6144"), "{inflated}");
    assert_eq!(field(&inflated, "ok"), Some("1"), "{inflated}");
    assert_eq!(field(&inflated, "kept_intact"), Some("1"), "{inflated}");
    let after = guest_rss(pid, 128 * MIB);
    assert!(
        before - after >= 23 * MIB && before - after <= 25 * MIB,
        "RSS of guest RAM fell by {} KiB, not about 24 MiB ({before} -> {after})",
        (before - after) >> 10
    );

    // Statistics: the sizes and the guest's counters, refreshed at the interval.
    let stats = |v: &Vireo| {
        let (code, body) = v.req("GET", "/balloon/statistics", "");
        assert_eq!(code, 200, "{body}");
        json(&body)
    };
    let s = stats(&v);
    assert_eq!(s["target_mib"], 24, "{s}");
    assert_eq!(s["actual_mib"], 24, "{s}");
    assert_eq!(s["target_pages"], 6144, "{s}");
    assert_eq!(s["actual_pages"], 6144, "{s}");
    assert_eq!(s["total_memory"], 128 * MIB, "{s}");
    assert_eq!(s["free_memory"], 96 * MIB, "{s}");
    assert!(
        s.get("swap_in").is_none(),
        "only what the guest reports: {s}"
    );
    let first = s["minor_faults"].as_u64().unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    while stats(&v)["minor_faults"].as_u64().unwrap() < first + 2 {
        assert!(
            Instant::now() < end,
            "statistics were not refreshed every second"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Firecracker's refusals.
    for (method, path, body, want) in [
        (
            "PATCH",
            "/balloon/statistics",
            r#"{"stats_polling_interval_s":0}"#,
            "Cannot enable/disable the statistics after boot.",
        ),
        (
            "PATCH",
            "/balloon",
            r#"{"amount_mib":129}"#,
            "a target of 129 MiB is larger than the guest's memory (128 MiB)",
        ),
        (
            "PUT",
            "/balloon",
            r#"{"amount_mib":1,"deflate_on_oom":false}"#,
            "not supported after starting",
        ),
    ] {
        let (code, answer) = v.req(method, path, body);
        assert_eq!(code, 400, "{method} {path}: {answer}");
        assert!(answer.contains(want), "{method} {path}: {answer}");
    }
    let (code, body) = v.req(
        "PATCH",
        "/balloon/statistics",
        r#"{"stats_polling_interval_s":2}"#,
    );
    assert_eq!(code, 204, "{body}");
    let (_, body) = v.req("GET", "/balloon", "");
    let b = json(&body);
    assert_eq!(b["amount_mib"], 24, "{b}");
    assert_eq!(b["deflate_on_oom"], true, "{b}");
    assert_eq!(b["stats_polling_interval_s"], 2, "{b}");

    // Deflate: the guest takes its pages back, writes them and reads back what it wrote.
    let (code, body) = v.req("PATCH", "/balloon", r#"{"amount_mib":0}"#);
    assert_eq!(code, 204, "{body}");
    let deflated = v.wait_prefix("@balloon deflated");
    assert_eq!(field(&deflated, "actual"), Some("0"), "{deflated}");
    assert_eq!(field(&deflated, "ok"), Some("1"), "{deflated}");
    assert_eq!(field(&deflated, "rewritten"), Some("1"), "{deflated}");
    v.wait_prefix("@balloon done");
    let again = guest_rss(pid, 128 * MIB);
    assert!(
        again >= after + 23 * MIB,
        "the pages written again are resident: {after} -> {again}"
    );
    let mut child = v;
    assert_eq!(wait_exit(&mut child.child).code(), Some(0));
}

/// `vireo run` of the balloon test guest in 128 MiB with `--balloon balloon`, `args` added to
/// its command line.
fn run_balloon(
    balloon: &str,
    args: &str,
) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    spawn_interactive(&[
        "--kernel",
        guest("pvh").to_str().unwrap(),
        "--memory",
        "128",
        "--balloon",
        balloon,
        "--cmdline",
        &format!("console=ttyS0 {args}"),
    ])
}

#[test]
fn free_page_reporting_releases_what_the_guest_reports() {
    let (mut child, rx) = run_balloon(
        "size_mib=0,reporting=on",
        "vireo.balloontest=32 vireo.balloonreport",
    );
    let (reported, seen) = until_prefix(&rx, "@balloon reported");
    assert_eq!(field(&reported, "mib"), Some("16"), "{reported}");
    assert_eq!(field(&reported, "ok"), Some("1"), "{reported}");
    let ready = seen.iter().find(|l| l.contains("@balloon ready")).unwrap();
    assert_eq!(field(ready, "reporting"), Some("1"), "{ready}");
    let rss = guest_rss(child.id(), 128 * MIB);
    // 32 MiB touched, 16 MiB of them reported free; what else the guest uses is small.
    assert!(
        (16 * MIB..24 * MIB).contains(&rss),
        "guest RAM resident after reporting: {} KiB",
        rss >> 10
    );
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn a_balloon_given_on_the_command_line_is_inflated_at_boot() {
    let (mut child, rx) = run_balloon("size_mib=8,deflate_on_oom=on", "vireo.balloontest=16");
    let (l, seen) = until_prefix(&rx, "@balloon inflated");
    assert_eq!(field(&l, "actual"), Some("2048"), "{l}");
    assert_eq!(field(&l, "ok"), Some("1"), "{l}");
    let ready = seen.iter().find(|l| l.contains("@balloon ready")).unwrap();
    assert_eq!(
        field(ready, "stats"),
        Some("0"),
        "statistics are off: {ready}"
    );
    let rss = guest_rss(child.id(), 128 * MIB);
    assert!(
        rss < 10 * MIB,
        "16 MiB touched, 8 given back: {} KiB",
        rss >> 10
    );
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn bad_balloon_settings_are_refused_by_name() {
    let kernel = guest("pvh");
    let k = kernel.to_str().unwrap();
    for (spec, code, want) in [
        (
            "size_mib=200",
            1,
            "balloon: a target of 200 MiB is larger than the guest's memory (128 MiB)",
        ),
        ("deflate_on_oom=on", 2, "the balloon needs size_mib=N"),
        ("size_mib=1,foo=1", 2, "'foo=1' is not a balloon option"),
        ("size_mib=x", 2, "size_mib=x: expected a number of MiB"),
        ("size_mib=1,stats_period_s=70000", 2, "stats_period_s=70000"),
    ] {
        let r = run_raw(&["run", "--kernel", k, "--memory", "128", "--balloon", spec]);
        assert_eq!(r.code(), code, "--balloon {spec}: {}", r.stderr);
        assert!(r.stderr.contains(want), "--balloon {spec}: {}", r.stderr);
    }
    let v = Vireo::start("balloon-bad");
    for (method, path, body, want) in [
        (
            "PATCH",
            "/balloon",
            r#"{"amount_mib":1}"#,
            "No balloon device found.",
        ),
        ("GET", "/balloon", "", "No balloon device found."),
        ("GET", "/balloon/statistics", "", "No balloon device found."),
        (
            "PUT",
            "/balloon",
            r#"{"amount_mib":1}"#,
            "missing field `deflate_on_oom`",
        ),
        (
            "PUT",
            "/balloon",
            r#"{"amount_mib":1,"deflate_on_oom":false,"x":1}"#,
            "unknown field `x`",
        ),
        (
            "PUT",
            "/balloon",
            r#"{"amount_mib":4097,"deflate_on_oom":false}"#,
            "larger than the guest's memory",
        ),
    ] {
        let (code, answer) = v.req(method, path, body);
        assert_eq!(code, 400, "{method} {path}: {answer}");
        assert!(answer.contains(want), "{method} {path}: {answer}");
    }
    // Statistics asked for when they were off at start.
    configure(
        &v,
        "vireo.balloontest=1",
        r#"{"amount_mib":0,"deflate_on_oom":false}"#,
    );
    start(&v);
    v.wait_prefix("@balloon ready");
    let (code, answer) = v.req("GET", "/balloon/statistics", "");
    assert_eq!(code, 400, "{answer}");
    assert!(
        answer.contains("Statistics for the balloon device are not enabled"),
        "{answer}"
    );
    let (code, answer) = v.req(
        "PATCH",
        "/balloon/statistics",
        r#"{"stats_polling_interval_s":1}"#,
    );
    assert_eq!(code, 400, "{answer}");
    assert!(answer.contains("Cannot enable/disable"), "{answer}");
}

#[test]
fn a_free_page_hinting_run_releases_what_the_guest_hints() {
    let v = Vireo::start("balloon-hint");
    configure(
        &v,
        "vireo.balloontest=32",
        r#"{"amount_mib":0,"deflate_on_oom":false,"free_page_hinting":true}"#,
    );
    let (code, answer) = v.req("PATCH", "/balloon/hinting/start", "");
    assert_eq!(code, 400, "{answer}");
    assert!(answer.contains("not supported before starting"), "{answer}");
    start(&v);
    let ready = v.wait_prefix("@balloon ready");
    assert_eq!(field(&ready, "hinting"), Some("1"), "{ready}");
    let pid = v.child.id();
    let before = guest_rss(pid, 128 * MIB);
    let status = |v: &Vireo| {
        let (code, body) = v.req("GET", "/balloon/hinting/status", "");
        assert_eq!(code, 200, "{body}");
        json(&body)
    };
    assert_eq!(status(&v)["host_cmd"], 1, "no run yet");

    // A run the host ends itself: the guest hints 16 MiB and says STOP; until the host says
    // DONE those pages are the host's, released.
    let (code, body) = v.req(
        "PATCH",
        "/balloon/hinting/start",
        r#"{"acknowledge_on_stop":false}"#,
    );
    assert_eq!(code, 204, "{body}");
    let end = Instant::now() + Duration::from_secs(30);
    while status(&v).get("guest_cmd") != Some(&serde_json::json!(0)) {
        assert!(
            Instant::now() < end,
            "the guest never said STOP: {}",
            status(&v)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let s = status(&v);
    assert_eq!(s["host_cmd"], 2, "{s}");
    let during = guest_rss(pid, 128 * MIB);
    assert!(
        before - during >= 15 * MIB,
        "RSS of guest RAM fell by {} KiB, not about 16 MiB",
        (before - during) >> 10
    );
    let (code, body) = v.req("PATCH", "/balloon/hinting/stop", "");
    assert_eq!(code, 204, "{body}");
    let hinted = v.wait_prefix("@balloon hinted");
    assert!(
        hinted.contains("run=2 mib=16 ok=1 done=1 rewritten=1"),
        "{hinted}"
    );

    // A run acknowledged at the guest's STOP (the default).
    let (code, body) = v.req("PATCH", "/balloon/hinting/start", "");
    assert_eq!(code, 204, "{body}");
    let hinted = v.wait_prefix("@balloon hinted");
    assert!(
        hinted.contains("run=3 mib=16 ok=1 done=1 rewritten=1"),
        "{hinted}"
    );
    let s = status(&v);
    assert_eq!(
        (s["host_cmd"].clone(), s["guest_cmd"].clone()),
        (1.into(), 0.into()),
        "{s}"
    );
}
