//! End-to-end boots of the test guest through every protocol, checking what it reports.

mod common;
use common::*;

const RESERVED_LOW: u64 = 0x10_0000 - 0x9_fc00;

fn expected_protocol(kind: &str) -> &'static str {
    if kind == "pvh" {
        "pvh"
    } else {
        "linux64"
    }
}

/// Boots `kind` and checks everything the guest reports against what vireo was given.
fn boot_and_check(kind: &str, cpus: u32, mem_mib: u64, initrd: Option<&[u8]>) {
    let dir = scratch(&format!(
        "boot-{kind}-{cpus}-{mem_mib}-{}",
        initrd.is_some()
    ));
    let kernel = guest(kind);
    let cmdline = format!("console=ttyS0 vireo.test={kind}  two-spaces punct=a,b:c/d \"q\"");
    let cpus_s = cpus.to_string();
    let mem_s = mem_mib.to_string();
    let initrd_path = dir.join("initrd.img");
    let mut args = vec![
        "--kernel",
        kernel.to_str().unwrap(),
        "--cpus",
        &cpus_s,
        "--memory",
        &mem_s,
        "--cmdline",
        &cmdline,
    ];
    if let Some(data) = initrd {
        write_file(&initrd_path, data);
        args.extend(["--initrd", initrd_path.to_str().unwrap()]);
    }
    let r = run(&args);
    assert_eq!(
        r.code(),
        0,
        "exit code; stderr: {}\nstdout: {}",
        r.stderr,
        r.stdout
    );

    let boot = r.report("boot").expect("boot line");
    assert_eq!(field(&boot, "image"), Some(kind));
    assert_eq!(field(&boot, "protocol"), Some(expected_protocol(kind)));
    assert!(r.report("error").is_none(), "guest found a problem: {r:?}");

    // Memory map: everything below the MMIO gap, minus the EBDA/BIOS hole, plus RAM above 4 GiB.
    let mem = mem_mib << 20;
    let total = r.report("memtotal").unwrap();
    assert_eq!(
        field(&total, "ram").unwrap().parse::<u64>().unwrap(),
        mem - RESERVED_LOW
    );
    let ranges = r.all("mem");
    let ends: Vec<u64> = ranges
        .iter()
        .filter(|l| field(l, "type") == Some("1"))
        .map(|l| {
            let a = u64::from_str_radix(&field(l, "addr").unwrap()[2..], 16).unwrap();
            let s = u64::from_str_radix(&field(l, "size").unwrap()[2..], 16).unwrap();
            a + s
        })
        .collect();
    let gap = 3u64 << 30;
    if mem <= gap {
        assert_eq!(*ends.last().unwrap(), mem, "{ranges:?}");
    } else {
        assert_eq!(
            ends,
            vec![0x9_fc00, gap, (4 << 30) + mem - gap],
            "{ranges:?}"
        );
    }

    assert_eq!(r.report("cmdline").as_deref(), Some(cmdline.as_str()));

    match initrd {
        Some(data) => {
            let line = r.report("initrd").unwrap();
            assert_eq!(field(&line, "size").unwrap(), data.len().to_string());
            assert_eq!(
                field(&line, "fnv1a").unwrap(),
                format!("{:#x}", fnv1a(data)),
                "initrd bytes changed on the way in"
            );
            let addr = u64::from_str_radix(&field(&line, "addr").unwrap()[2..], 16).unwrap();
            assert_eq!(addr % 4096, 0, "initrd is page aligned");
            assert!(addr + data.len() as u64 <= mem.min(gap));
        }
        None => assert_eq!(r.report("initrd").as_deref(), Some("none")),
    }

    // ACPI: the RSDP comes through the boot protocol; the MADT lists the same CPUs.
    let acpi = r.report("acpi").expect("acpi line");
    assert_eq!(field(&acpi, "rsdp"), Some("0xe0000"), "{acpi}");
    assert_eq!(field(&acpi, "from_boot_data"), Some("1"), "{acpi}");
    assert_eq!(
        field(&acpi, "tables"),
        Some("3"),
        "FADT, MADT, DSDT: {acpi}"
    );
    assert_eq!(field(&acpi, "cpus"), Some(cpus_s.as_str()), "{acpi}");
    assert_eq!(field(&acpi, "ioapics"), Some("1"), "{acpi}");
    assert_eq!(field(&acpi, "hw_reduced"), Some("1"), "{acpi}");
    assert_eq!(field(&acpi, "s5"), Some("5"), "{acpi}");

    let listed = r.report("cpus").unwrap();
    assert_eq!(field(&listed, "listed"), Some(cpus_s.as_str()));
    let cpu_lines = r.all("cpu");
    for id in 0..cpus {
        let want = if id == 0 {
            "apic=0 cpuid_apic=0 bsp".to_owned()
        } else {
            format!("apic={id} cpuid_apic={id} started")
        };
        assert!(
            cpu_lines.iter().any(|l| l.starts_with(&format!("{want} "))),
            "cpu {id} missing: {cpu_lines:?}"
        );
    }
    assert_eq!(
        r.all("cpus").last().map(String::as_str),
        Some(format!("online={cpus}").as_str())
    );
    assert_eq!(r.report("end").as_deref(), Some("poweroff"));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn elf_one_cpu_no_initrd() {
    boot_and_check("elf", 1, 128, None);
}

#[test]
fn elf_two_cpus_with_initrd() {
    boot_and_check("elf", 2, 256, Some(&pattern(8192, 1)));
}

#[test]
fn elf_one_cpu_with_initrd() {
    boot_and_check("elf", 1, 64, Some(&pattern(5000, 2)));
}

#[test]
fn elf_two_cpus_no_initrd() {
    boot_and_check("elf", 2, 128, None);
}

#[test]
fn pvh_one_cpu_no_initrd() {
    boot_and_check("pvh", 1, 128, None);
}

#[test]
fn pvh_two_cpus_with_initrd() {
    boot_and_check("pvh", 2, 512, Some(&pattern(4096, 3)));
}

#[test]
fn pvh_one_cpu_with_initrd() {
    boot_and_check("pvh", 1, 96, Some(&pattern(777, 4)));
}

#[test]
fn pvh_two_cpus_no_initrd() {
    boot_and_check("pvh", 2, 128, None);
}

#[test]
fn bzimage_one_cpu_no_initrd() {
    boot_and_check("bzimage", 1, 128, None);
}

#[test]
fn bzimage_two_cpus_with_initrd() {
    boot_and_check("bzimage", 2, 128, Some(&pattern(12288, 5)));
}

#[test]
fn bzimage_one_cpu_with_initrd() {
    boot_and_check("bzimage", 1, 200, Some(&pattern(100, 6)));
}

#[test]
fn bzimage_two_cpus_no_initrd() {
    boot_and_check("bzimage", 2, 128, None);
}

#[test]
fn four_cpus_all_report() {
    boot_and_check("pvh", 4, 128, None);
}

#[test]
fn memory_above_the_mmio_gap() {
    // 4 GiB: 3 GiB below the gap, 1 GiB above 4 GiB. Pages are only touched where used.
    boot_and_check("elf", 1, 4096, Some(&pattern(4096, 7)));
    boot_and_check("pvh", 1, 4096, None);
}

#[test]
fn the_pit_is_there_only_when_asked_for_and_the_guest_boots_either_way() {
    for (flags, want_pit) in [
        (&[][..], false),
        (&["--no-pit"][..], false),
        (&["--pit"][..], true),
    ] {
        let kernel = guest("pvh");
        let mut args = vec![
            "--kernel",
            kernel.to_str().unwrap(),
            "--cmdline",
            "vireo.end=hang",
        ];
        args.extend_from_slice(flags);
        let (mut child, rx) = spawn_interactive(&args);
        let (boot, _) = until_prefix(&rx, "@boot");
        assert_eq!(field(&boot, "protocol"), Some("pvh"), "{boot}");
        assert_eq!(has_pit_thread(child.id()), want_pit, "flags {flags:?}");
        let _ = child.kill();
        let _ = child.wait();
    }
    // With the PIT, the guest's own end (power off) still works; both flags contradict.
    let kernel = guest("elf");
    let r = run(&["--pit", "--kernel", kernel.to_str().unwrap()]);
    assert_eq!(r.code(), 0, "{r:?}");
    assert!(r.report("boot").is_some(), "{r:?}");
    let r = run(&["--pit", "--no-pit", "--kernel", kernel.to_str().unwrap()]);
    assert_eq!(r.code(), 2, "{r:?}");
    assert!(r.stderr.contains("cannot be used with"), "{r:?}");
}
