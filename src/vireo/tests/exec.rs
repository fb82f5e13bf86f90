//! `vireo exec` and `vireo cp` against the real agent, run on the host with its vsock
//! replaced by a Unix socket (`vireo-agent --listen unix:PATH`), and through a vsock device's
//! `CONNECT` handshake.

mod common;

use common::{agent_bin, finish, scratch, vireo, Run};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// An agent on the host, stopped when dropped.
struct Agent {
    child: Child,
    sock: PathBuf,
}

impl Agent {
    fn start(name: &str) -> Self {
        let sock = scratch(name).join("agent.sock");
        let child = Command::new(agent_bin(None))
            .arg("--listen")
            .arg(format!("unix:{}", sock.display()))
            .stderr(Stdio::null())
            .spawn()
            .expect("start vireo-agent");
        common::wait_for_socket(&sock);
        Self { child, sock }
    }

    fn exec(&self, args: &[&str]) -> Command {
        let mut c = vireo();
        c.arg("exec")
            .arg("--agent-socket")
            .arg(&self.sock)
            .args(args)
            .stdin(Stdio::null());
        c
    }

    fn run(&self, args: &[&str]) -> Run {
        finish(self.exec(args).spawn().unwrap())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn output_streams_and_exit_codes_come_back() {
    let a = Agent::start("exec-out");
    let r = a.run(&["--", "sh", "-c", "echo to-out; echo to-err >&2; exit 7"]);
    assert_eq!(r.code(), 7, "{r:?}");
    assert_eq!(r.stdout, "to-out\n");
    assert_eq!(r.stderr, "to-err\n");
    let r = a.run(&[
        "-e",
        "GREETING=hi there",
        "-w",
        "/tmp",
        "--",
        "sh",
        "-c",
        "echo \"$GREETING\" $PWD; echo $PATH",
    ]);
    assert_eq!(r.code(), 0, "{r:?}");
    assert_eq!(
        r.stdout,
        "hi there /tmp\n/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
    );
    // The user and group asked for (the agent runs as root here).
    let r = a.run(&[
        "-u",
        "65534:65533",
        "--",
        "sh",
        "-c",
        "echo $(id -u) $(id -g)",
    ]);
    assert_eq!((r.code(), r.stdout.as_str()), (0, "65534 65533\n"), "{r:?}");
    // A command killed by a signal exits as a shell reports it: 128 + the signal.
    let r = a.run(&["--", "sh", "-c", "kill -KILL $$"]);
    assert_eq!(r.code(), 128 + 9, "{r:?}");
}

#[test]
fn standard_input_is_streamed_to_the_command() {
    let a = Agent::start("exec-in");
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let mut c = a.exec(&["--", "sha256sum"]);
    c.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let d = data.clone();
    std::thread::spawn(move || stdin.write_all(&d).unwrap());
    let r = finish(child);
    let mut expected = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    expected.stdin.take().unwrap().write_all(&data).unwrap();
    let expected = expected.wait_with_output().unwrap();
    assert_eq!(r.code(), 0, "{r:?}");
    assert_eq!(r.stdout.as_bytes(), expected.stdout);
}

#[test]
fn a_command_that_does_not_exist_is_named() {
    let a = Agent::start("exec-missing");
    let r = a.run(&["--", "/no/such/program", "arg"]);
    assert_eq!(r.code(), 127, "{r:?}");
    assert!(
        r.stderr.contains("cannot run /no/such/program"),
        "{}",
        r.stderr
    );
    let r = a.run(&["-u", "root", "--", "true"]);
    assert_eq!(r.code(), 2, "{r:?}");
    assert!(r.stderr.contains("not a numeric user"), "{}", r.stderr);
}

/// Starts `script` through vireo exec and waits for its first output line.
fn started(a: &Agent, script: &str) -> (Child, BufReader<std::process::ChildStdout>, String) {
    let mut child = a
        .exec(&["--", "sh", "-c", script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    (child, out, line)
}

#[test]
fn signals_to_vireo_exec_reach_the_command() {
    let a = Agent::start("exec-signal");
    let (mut child, mut out, line) = started(
        &a,
        "trap 'echo got TERM; exit 42' TERM; echo ready; while :; do sleep 0.05; done",
    );
    assert_eq!(line, "ready\n");
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    let status = common::wait_exit(&mut child);
    assert_eq!(rest, "got TERM\n");
    assert_eq!(status.code(), Some(42));
}

fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s.contains(") Z "),
    }
}

#[test]
fn a_client_that_disconnects_takes_its_command_with_it() {
    let a = Agent::start("exec-disconnect");
    let (mut child, _out, line) = started(&a, "echo $$; exec sleep 1000");
    let pid: u32 = line.trim().parse().unwrap();
    assert!(!gone(pid));
    child.kill().unwrap();
    child.wait().unwrap();
    let end = Instant::now() + Duration::from_secs(5);
    while !gone(pid) {
        assert!(Instant::now() < end, "the command outlived its client");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The agent still serves.
    assert_eq!(a.run(&["--", "true"]).code(), 0);
}

#[test]
fn oversized_malformed_and_foreign_frames_are_refused_and_the_agent_serves_on() {
    let a = Agent::start("exec-frames");
    let closed = |bytes: &[u8]| {
        let mut s = UnixStream::connect(&a.sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(bytes).unwrap();
        let mut got = Vec::new();
        // The agent ends the session (possibly after its Hello); it never waits for more. A
        // close with bytes unread arrives as a reset.
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                Err(e) => panic!("the agent did not close the session: {e}"),
            }
        }
        got
    };
    // A frame claiming 2 GiB: refused before anything is read or allocated.
    assert!(closed(&0x7fff_ffffu32.to_le_bytes()).is_empty());
    // A Hello whose payload is not JSON.
    let mut bad = 6u32.to_le_bytes().to_vec();
    bad.extend_from_slice(&[1, 1, b'{', b'x', b'y', b'z']);
    assert!(closed(&bad).is_empty());
    // Another protocol version: the agent says which it speaks, then ends the session.
    let hello = br#"{"version":9,"software":"someone else"}"#;
    let mut v9 = ((hello.len() + 2) as u32).to_le_bytes().to_vec();
    v9.extend_from_slice(&[9, 1]);
    v9.extend_from_slice(hello);
    assert!(closed(&v9).is_empty());
    let mut v1 = ((hello.len() + 2) as u32).to_le_bytes().to_vec();
    v1.extend_from_slice(&[1, 1]);
    v1.extend_from_slice(hello);
    let answer = closed(&v1);
    assert!(
        String::from_utf8_lossy(&answer).contains("\"version\":1"),
        "{answer:?}"
    );
    let r = a.run(&["--", "echo", "still here"]);
    assert_eq!((r.code(), r.stdout.as_str()), (0, "still here\n"));
}

#[test]
fn a_terminal_is_given_when_asked_for() {
    let a = Agent::start("exec-tty");
    let r = a.run(&["-t", "--", "sh", "-c", "tty; stty size; echo $TERM"]);
    assert_eq!(r.code(), 0, "{r:?}");
    let lines: Vec<&str> = r.stdout.split("\r\n").collect();
    assert!(lines[0].starts_with("/dev/pts/"), "{:?}", r.stdout);
    // Standard input is not a terminal here, so the default size is asked for.
    assert_eq!(lines[1], "24 80");
    let r = a.run(&["-t", "--", "sh", "-c", "exit 5"]);
    assert_eq!(r.code(), 5, "{r:?}");
}

#[test]
fn files_are_copied_in_and_out_with_their_mode() {
    let a = Agent::start("cp");
    let dir = scratch("cp-files");
    let src = dir.join("payload.bin");
    let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 256) as u8).collect();
    std::fs::write(&src, &data).unwrap();
    std::fs::set_permissions(&src, std::os::unix::fs::PermissionsExt::from_mode(0o751)).unwrap();
    let cp = |from: &str, to: &str| {
        finish(
            vireo()
                .arg("cp")
                .arg("--agent-socket")
                .arg(&a.sock)
                .args([from, to])
                .spawn()
                .unwrap(),
        )
    };
    let guest_dir = dir.join("guest");
    std::fs::create_dir(&guest_dir).unwrap();
    let into = format!("vm:{}/", guest_dir.display());
    let r = cp(src.to_str().unwrap(), &into);
    assert_eq!(r.code(), 0, "{r:?}");
    let copied = guest_dir.join("payload.bin");
    assert_eq!(std::fs::read(&copied).unwrap(), data);
    let mode = std::fs::metadata(&copied).unwrap().permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o7777,
        0o751
    );
    let back = dir.join("back.bin");
    let r = cp(&format!("vm:{}", copied.display()), back.to_str().unwrap());
    assert_eq!(r.code(), 0, "{r:?}");
    assert_eq!(std::fs::read(&back).unwrap(), data);
    // Errors name the file, and leave nothing behind.
    let r = cp("vm:/no/such/file", dir.join("x").to_str().unwrap());
    assert_ne!(r.code(), 0);
    assert!(r.stderr.contains("/no/such/file"), "{}", r.stderr);
    assert!(!dir.join("x").exists() && !dir.join("x.vireo-cp").exists());
    let r = cp(src.to_str().unwrap(), back.to_str().unwrap());
    assert!(r.stderr.contains("exactly one of the two"), "{}", r.stderr);
    let r = cp(dir.to_str().unwrap(), "vm:/tmp/x");
    assert!(r.stderr.contains("not a regular file"), "{}", r.stderr);
}

/// A stand-in for a vsock device's host socket: answers `CONNECT 1024` and relays to the
/// agent, as vireo's muxer does for a guest listener; refuses other ports by closing.
fn fake_vsock(dir: &Path, agent: PathBuf) -> PathBuf {
    let uds = dir.join("vsock.sock");
    let l = UnixListener::bind(&uds).unwrap();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let mut host = conn.unwrap();
            let mut line = Vec::new();
            let mut b = [0u8; 1];
            while host.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
                line.push(b[0]);
            }
            if line != b"CONNECT 1024" {
                continue;
            }
            host.write_all(b"OK 1073741824\n").unwrap();
            let guest = UnixStream::connect(&agent).unwrap();
            let (mut h2, mut g2) = (host.try_clone().unwrap(), guest.try_clone().unwrap());
            std::thread::spawn(move || std::io::copy(&mut h2, &mut g2));
            std::thread::spawn(move || {
                let (mut g, mut h) = (guest, host);
                let _ = std::io::copy(&mut g, &mut h);
                let _ = h.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    uds
}

#[test]
fn exec_reaches_the_agent_through_a_vsock_socket() {
    let a = Agent::start("exec-vsock");
    let dir = scratch("exec-vsock-uds");
    let uds = fake_vsock(&dir, a.sock.clone());
    let r = finish(
        vireo()
            .arg("exec")
            .arg("--vsock")
            .arg(&uds)
            .args(["--", "echo", "over vsock"])
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    assert_eq!((r.code(), r.stdout.as_str()), (0, "over vsock\n"), "{r:?}");
    // Nothing listens on another port: said plainly, with vireo's own exit status.
    let r = finish(
        vireo()
            .arg("exec")
            .arg("--vsock")
            .arg(&uds)
            .args(["--port", "7", "--", "true"])
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    assert_eq!(r.code(), 125, "{r:?}");
    assert!(
        r.stderr.contains("nothing listens on vsock port 7"),
        "{}",
        r.stderr
    );
    // An API socket whose VM has no vsock device.
    let r = finish(
        vireo()
            .args(["exec", "--api-sock", "/nonexistent/api.sock", "--", "true"])
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    assert_eq!(r.code(), 125, "{r:?}");
    assert!(r.stderr.contains("/nonexistent/api.sock"), "{}", r.stderr);
}

/// Through a real vsock device, found from the API socket: the test guest refuses port 1024
/// (no agent) and echoes port 5000, so vireo exec's frames come back unchanged, and its
/// greeting passes, until the echoed Exec request, which no agent would send.
#[test]
fn exec_finds_the_vsock_device_through_the_api_socket() {
    let v = common::Vireo::start("exec-api");
    let uds = v.dir.join("vsock.sock");
    for (path, body) in [
        (
            "/boot-source",
            format!(
                r#"{{"kernel_image_path":"{}","boot_args":"vireo.vsocktest vireo.vsockecho=5"}}"#,
                common::guest("elf").display()
            ),
        ),
        (
            "/vsock",
            format!(r#"{{"guest_cid":3,"uds_path":"{}"}}"#, uds.display()),
        ),
        ("/actions", r#"{"action_type":"InstanceStart"}"#.to_string()),
    ] {
        let (status, text) = v.req("PUT", path, &body);
        assert!(status < 300, "PUT {path}: {status} {text}");
    }
    v.wait_line("@vsock ready");
    let exec = |port: &str| {
        finish(
            vireo()
                .args(["exec", "--api-sock"])
                .arg(&v.sock)
                .args(["--port", port, "--", "true"])
                .stdin(Stdio::null())
                .spawn()
                .unwrap(),
        )
    };
    let r = exec("1024");
    assert_eq!(r.code(), 125, "{r:?}");
    assert!(
        r.stderr.contains("nothing listens on vsock port 1024"),
        "{}",
        r.stderr
    );
    let r = exec("5000");
    assert_eq!(r.code(), 125, "{r:?}");
    assert!(
        r.stderr.contains("unexpected Exec frame from the agent"),
        "{}",
        r.stderr
    );
    v.stop(libc::SIGTERM);
}
