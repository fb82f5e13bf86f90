//! Rate limiters on drives: a throttled guest still gets every request right, the waits show in
//! the metrics, and limits change on a running VM. Throughput against the configured rate is
//! measured by scripts/bench-blk.py, not asserted here.

mod common;
use common::*;

/// The block test's report lines for drive 0 (without the `blk dev=0` prefix), in order.
fn blk_results(r: &Run) -> Vec<String> {
    r.all("blk")
        .into_iter()
        .filter(|l| l.starts_with("dev=0 "))
        .map(|l| {
            // How many interrupts the guest took depends on timing; the rest must not.
            l.split(' ')
                .filter(|f| !f.starts_with("irqs="))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

/// Boots the block test on one drive given by `drive_opts` through a config file, with
/// metrics, and returns the run and the drive's counters.
fn blktest(tag: &str, rate_limiter: serde_json::Value) -> (Run, serde_json::Value) {
    let dir = scratch(tag);
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let cfg = dir.join("vm.json");
    let metrics = dir.join("metrics");
    let mut drive = serde_json::json!({
        "drive_id": "data",
        "path_on_host": disk,
        "is_root_device": false,
        "is_read_only": false,
        "io_engine": io_engine(),
    });
    if !rate_limiter.is_null() {
        drive["rate_limiter"] = rate_limiter;
    }
    let json = serde_json::json!({
        "boot-source": {
            "kernel_image_path": guest("elf"),
            "boot_args": "console=ttyS0 vireo.blktest"
        },
        "machine-config": { "vcpu_count": 1, "mem_size_mib": 64 },
        "drives": [drive],
        "metrics": { "metrics_path": metrics },
    });
    write_file(&cfg, json.to_string().as_bytes());
    let r = run_raw(&["--config-file", cfg.to_str().unwrap(), "--no-api"]);
    let text = std::fs::read_to_string(&metrics).unwrap_or_default();
    let m: serde_json::Value = text
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_default();
    let _ = std::fs::remove_dir_all(dir);
    (r, m["devices"]["block_data"].clone())
}

#[test]
fn a_throttled_drive_serves_every_request_right() {
    let (free, free_m) = blktest("rl-free", serde_json::Value::Null);
    assert_eq!(free.code(), 0, "{}", free.stderr);
    assert_eq!(free_m["rate_limiter_throttled"], 0, "{free_m}");
    // 16 KiB and 3 requests per second (plus a burst of 1): the block test's 16 KiB transfers
    // and its eight requests have to wait for the timer, some more than once (about 3 s).
    let (slow, slow_m) = blktest(
        "rl-slow",
        serde_json::json!({
            "bandwidth": { "size": 16384, "refill_time": 1000 },
            "ops": { "size": 3, "one_time_burst": 1, "refill_time": 1000 }
        }),
    );
    assert_eq!(slow.code(), 0, "{}", slow.stderr);
    assert_eq!(slow.report("end").as_deref(), Some("poweroff"));
    let (a, b) = (blk_results(&free), blk_results(&slow));
    assert!(a.len() >= 6, "{a:#?}");
    assert_eq!(a, b, "the throttled run answered differently");
    assert!(
        slow_m["rate_limiter_throttled"].as_u64().unwrap_or(0) > 0,
        "{slow_m}"
    );
    assert_eq!(slow_m["requests"], free_m["requests"], "{slow_m} {free_m}");
}

#[test]
fn limits_on_the_command_line_and_bad_ones() {
    let dir = scratch("rl-cli");
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let kernel = guest("elf");
    let r = run(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--drive",
        &format!(
            "path={},bw=8192/10,ops=4/10+2{}",
            disk.display(),
            engine_opt()
        ),
        "--cmdline",
        "console=ttyS0 vireo.blktest",
    ]);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    assert!(
        r.stdout.contains("@blk dev=0 read status=0"),
        "{}",
        r.stdout
    );
    for bad in ["bw=8192", "bw=x/10", "ops=4/10+y", "bw=/"] {
        let r = run(&[
            "--kernel",
            kernel.to_str().unwrap(),
            "--drive",
            &format!("path={},{bad}", disk.display()),
        ]);
        assert_eq!(r.code(), 2, "{bad}: {}", r.stderr);
        assert!(r.stderr.contains("SIZE/MS"), "{bad}: {}", r.stderr);
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn limits_change_on_a_running_vm() {
    let v = Vireo::start("rl-patch");
    let disk = v.dir.join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let boot = format!(
        r#"{{"kernel_image_path":"{}","boot_args":"console=ttyS0 vireo.count=0"}}"#,
        guest("elf").display()
    );
    assert_eq!(v.req("PUT", "/boot-source", &boot).0, 204);
    let drive = format!(
        r#"{{"drive_id":"data","path_on_host":"{}","is_root_device":false,"rate_limiter":{{"ops":{{"size":100,"refill_time":1000}}}}{}}}"#,
        disk.display(),
        engine_field()
    );
    assert_eq!(v.req("PUT", "/drives/data", &drive).0, 204);
    // A malformed limiter is refused before boot, naming the field.
    let (code, body) = v.req(
        "PUT",
        "/drives/data",
        &drive.replace(r#""size":100"#, r#""size":100,"colour":1"#),
    );
    assert_eq!(code, 400);
    assert!(body.contains("colour"), "{body}");
    v.start_instance();
    v.wait_line("@ticker start");
    let patch = r#"{"drive_id":"data","rate_limiter":{"bandwidth":{"size":1048576,"one_time_burst":0,"refill_time":100}}}"#;
    assert_eq!(v.req("PATCH", "/drives/data", patch).0, 204);
    let (code, cfg) = v.req("GET", "/vm/config", "");
    assert_eq!(code, 200);
    let cfg: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    assert_eq!(
        cfg["drives"][0]["rate_limiter"]["bandwidth"]["size"], 1048576,
        "{cfg}"
    );
    let (code, body) = v.req(
        "PATCH",
        "/drives/nope",
        r#"{"drive_id":"nope","rate_limiter":{"ops":{"size":1,"refill_time":1}}}"#,
    );
    assert_eq!(code, 400);
    assert!(body.contains("'nope' does not exist"), "{body}");
    v.stop(libc::SIGTERM);
}

#[test]
fn console_output_beyond_its_limit_is_dropped() {
    let kernel = guest("pvh");
    let free = run(&["--kernel", kernel.to_str().unwrap()]);
    assert_eq!(free.code(), 0, "{}", free.stderr);
    assert!(free.stdout.len() > 200, "{}", free.stdout);
    // 64 bytes per 1000 s: the guest's first 64 bytes, then nothing until it powers off (a
    // refill of one byte takes 15 s, far beyond the run even on a slow machine; at 64 bytes
    // per 10 s a run longer than 156 ms let one more byte through).
    let r = run(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--serial-limit",
        "bw=64/1000000",
    ]);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    assert_eq!(r.stdout.as_bytes(), &free.stdout.as_bytes()[..64]);
    assert!(r.stderr.contains("rate limit dropped"), "{}", r.stderr);
}

#[test]
fn entropy_under_a_limit_and_bad_limits() {
    let kernel = guest("elf");
    let k = kernel.to_str().unwrap();
    let r = run(&[
        "--kernel",
        k,
        "--rng-limit",
        "bw=16/1000,ops=1/1000",
        "--cmdline",
        "console=ttyS0 vireo.rngtest",
    ]);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    let rng = r.report("rng").unwrap_or_default();
    assert!(rng.contains("used=32"), "{}", r.stdout);
    for (flag, bad) in [
        ("--rng-limit", "bw=16"),
        ("--rng-limit", "cpu=1/1"),
        ("--serial-limit", "ops=x/1"),
    ] {
        let r = run(&["--kernel", k, flag, bad]);
        assert_eq!(r.code(), 2, "{flag} {bad}: {}", r.stderr);
        assert!(r.stderr.contains("SIZE/MS"), "{flag} {bad}: {}", r.stderr);
    }
}
