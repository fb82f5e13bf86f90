//! The interactive console on a real (pseudo-)terminal: raw mode while the guest runs, Ctrl-C
//! delivered to the guest, Ctrl-A x to quit, and the terminal restored exactly on every exit.
//! The pty work is done by tests/terminal.py (python3's pty and termios modules).

mod common;
use common::*;
use std::process::Command;

fn on_pty(mode: &str) -> Vec<String> {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/terminal.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(vireo_bin())
        .arg(guest("pvh"))
        .arg(mode)
        .output()
        .expect("python3 runs the pty driver");
    assert!(
        out.status.success(),
        "pty driver failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // exit code, raw, restored, then the echoed line (which has spaces) as the rest.
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let mut parts: Vec<String> = text.splitn(4, ' ').map(str::to_owned).collect();
    parts.resize(4, String::new());
    parts
}

#[test]
fn ctrl_a_x_quits_and_restores_the_terminal() {
    let r = on_pty("quit");
    assert_eq!(r[0], "130", "exit code: {r:?}");
    assert_eq!(r[1], "1", "raw mode while attached: {r:?}");
    assert_eq!(r[2], "1", "terminal restored: {r:?}");
    // The guest got every key, Ctrl-C (0x03) included.
    let irqs = r[3]
        .strip_prefix(r"b'@input line=hi\x03there irqs=")
        .and_then(|rest| rest.strip_suffix(r"\r'"))
        .unwrap_or_else(|| panic!("guest echo: {r:?}"));
    assert!(
        irqs.parse::<u32>().unwrap() >= 1,
        "input came by interrupt: {r:?}"
    );
}

#[test]
fn sigterm_restores_the_terminal() {
    let r = on_pty("sigterm");
    assert_eq!(r[0], "143", "exit code: {r:?}");
    assert_eq!(r[1], "1", "raw mode while attached: {r:?}");
    assert_eq!(r[2], "1", "terminal restored: {r:?}");
}
