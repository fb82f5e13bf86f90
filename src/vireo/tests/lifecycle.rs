//! How a VM ends (exit codes), signals, the console's input and output destinations.

mod common;
use common::*;
use std::io::Write;

fn end_with(kind: &str, how: &str) -> Run {
    let kernel = guest(kind);
    run(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--cmdline",
        &format!("vireo.end={how}"),
    ])
}

#[test]
fn guest_reset_exits_zero() {
    for kind in KINDS {
        let r = end_with(kind, "reset");
        assert_eq!(r.report("end").as_deref(), Some("reset"));
        assert_eq!(r.code(), 0, "{kind}: {}", r.stderr);
    }
}

#[test]
fn guest_poweroff_exits_zero() {
    let r = end_with("pvh", "poweroff");
    assert_eq!(r.report("end").as_deref(), Some("poweroff"));
    assert_eq!(r.code(), 0, "{}", r.stderr);
}

#[test]
fn acpi_poweroff_and_reset_exit_zero() {
    // What Linux does for `poweroff` (enter S5 through the FADT's sleep control register) and
    // for an ACPI reboot (the FADT's reset register).
    for kind in KINDS {
        for how in ["acpi-off", "acpi-reset"] {
            let r = end_with(kind, how);
            assert_eq!(r.report("end").as_deref(), Some(how));
            assert!(r.report("error").is_none(), "{kind} {how}: {}", r.stdout);
            assert_eq!(r.code(), 0, "{kind} {how}: {}", r.stderr);
        }
    }
}

#[test]
fn triple_fault_exits_3_with_registers() {
    let r = end_with("elf", "triplefault");
    assert_eq!(r.code(), 3, "{}", r.stderr);
    assert!(r.stderr.contains("triple fault"), "{}", r.stderr);
    assert!(
        r.stderr.contains("rip=0x"),
        "registers are reported: {}",
        r.stderr
    );
}

#[test]
fn kvm_internal_error_exits_4_with_registers() {
    // Executing from the MMIO hole leaves KVM nothing to fetch: an emulation failure.
    let r = end_with("elf", "badfetch");
    assert_eq!(r.code(), 4, "{}", r.stderr);
    assert!(r.stderr.contains("KVM internal error"), "{}", r.stderr);
    assert!(r.stderr.contains("rip=0x00000000d0000000"), "{}", r.stderr);
}

fn signal_stops_a_running_guest(sig: i32, code: i32) {
    let kernel = guest("elf");
    let (mut child, rx) = spawn_interactive(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--cpus",
        "2",
        "--cmdline",
        "vireo.end=hang",
    ]);
    let mut seen = Vec::new();
    wait_line(&rx, "@end hang", &mut seen);
    // SAFETY: kill(2) on the pid of a child this test started and has not reaped.
    let rc = unsafe { libc::kill(child.id() as i32, sig) };
    assert_eq!(rc, 0);
    let status = wait_exit(&mut child);
    assert_eq!(status.code(), Some(code));
}

#[test]
fn sigterm_tears_down_with_143() {
    signal_stops_a_running_guest(libc::SIGTERM, 143);
}

#[test]
fn sigint_tears_down_with_130() {
    signal_stops_a_running_guest(libc::SIGINT, 130);
}

#[test]
fn stdin_reaches_the_guest_through_the_uart_interrupt() {
    let kernel = guest("pvh");
    let (mut child, rx) = spawn_interactive(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--cmdline",
        "vireo.input",
    ]);
    let mut seen = Vec::new();
    wait_line(&rx, "@input ready", &mut seen);
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"ping from the host\n").unwrap();
    wait_line(&rx, "@end poweroff", &mut seen);
    assert_eq!(wait_exit(&mut child).code(), Some(0));
    let line = seen
        .iter()
        .find(|l| l.starts_with("@input line="))
        .unwrap_or_else(|| panic!("no echo: {seen:#?}"));
    assert_eq!(field(line, "line"), Some("ping"), "{line}");
    assert!(
        line.starts_with("@input line=ping from the host irqs="),
        "{line}"
    );
    let irqs: u32 = field(line, "irqs").unwrap().parse().unwrap();
    assert!(irqs >= 1, "input arrived by interrupt: {line}");
}

#[test]
fn serial_to_file() {
    let dir = scratch("serial-file");
    let log = dir.join("console.log");
    let kernel = guest("bzimage");
    let dest = format!("file:{}", log.display());
    let r = run(&["--kernel", kernel.to_str().unwrap(), "--serial", &dest]);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    assert!(!r.stdout.contains("@boot"), "nothing on stdout");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("@boot image=bzimage protocol=linux64\r\n"),
        "{text}"
    );
    assert!(text.contains("Hello from vireo!"), "{text}");
    assert!(text.contains("@end poweroff"), "{text}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn serial_none_discards_output() {
    let kernel = guest("elf");
    let r = run(&["--kernel", kernel.to_str().unwrap(), "--serial", "none"]);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    assert_eq!(r.stdout, "");
}

#[test]
fn default_is_the_friendly_demo() {
    let kernel = guest("pvh");
    let r = run(&["--kernel", kernel.to_str().unwrap(), "--cpus", "2"]);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    assert!(r.stdout.contains("Hello from vireo!"));
    assert!(r.stdout.contains("cpus     2 of 2 running"), "{}", r.stdout);
    assert!(
        r.stdout
            .contains("cmdline  console=ttyS0 reboot=k panic=1 pci=off"),
        "{}",
        r.stdout
    );
}
