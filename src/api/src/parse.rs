//! From an HTTP method, path and body to a [`VmmAction`]: every check that needs no VM state.
//! Pure, so it is unit-tested and fuzzed without a socket.

use vmm::controller::VmmAction;
use vmm::resources::{
    BalloonConfig, BalloonStartCmd, BalloonStatsUpdate, BalloonUpdate, BootSource, Drive,
    EntropyDevice, InstanceActionInfo, LoggerConfig, MachineConfig, MachineConfigUpdate,
    MemoryHotplugConfig, MemoryHotplugSizeUpdate, MetricsConfig, MmdsConfig, NetworkInterface,
    PartialDrive, PartialNetworkInterface, SerialDevice, SnapshotCreateParams, SnapshotLoadParams,
    VmStateUpdate, VsockDevice,
};

/// Every (method, path) the server answers; `{..}` marks a path parameter. docs/api.yaml must
/// list exactly these (a test checks).
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/"),
    ("GET", "/version"),
    ("PUT", "/actions"),
    ("PUT", "/boot-source"),
    ("GET", "/machine-config"),
    ("PUT", "/machine-config"),
    ("PATCH", "/machine-config"),
    ("PUT", "/drives/{drive_id}"),
    ("PATCH", "/drives/{drive_id}"),
    ("PUT", "/network-interfaces/{iface_id}"),
    ("PATCH", "/network-interfaces/{iface_id}"),
    ("PUT", "/vsock"),
    ("GET", "/balloon"),
    ("PUT", "/balloon"),
    ("PATCH", "/balloon"),
    ("GET", "/balloon/statistics"),
    ("PATCH", "/balloon/statistics"),
    ("PUT", "/entropy"),
    ("PUT", "/serial"),
    ("PUT", "/logger"),
    ("PUT", "/metrics"),
    ("PATCH", "/vm"),
    ("GET", "/vm/config"),
    ("PUT", "/snapshot/create"),
    ("PUT", "/snapshot/load"),
    ("PATCH", "/balloon/hinting/start"),
    ("GET", "/balloon/hinting/status"),
    ("PATCH", "/balloon/hinting/stop"),
    ("PUT", "/cpu-config"),
    ("PUT", "/pmem/{id}"),
    ("PATCH", "/pmem/{id}"),
    ("GET", "/mmds"),
    ("PUT", "/mmds"),
    ("PATCH", "/mmds"),
    ("PUT", "/mmds/config"),
    ("GET", "/hotplug/memory"),
    ("PUT", "/hotplug/memory"),
    ("PATCH", "/hotplug/memory"),
];

fn body<T: serde::de::DeserializeOwned>(what: &str, body: &[u8]) -> Result<T, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(format!("{what}: the request needs a JSON body"));
    }
    serde_json::from_slice(body).map_err(|e| format!("{what}: invalid JSON body: {e}"))
}

fn not_yet(what: &str) -> Result<VmmAction, String> {
    Err(format!("{what} is not supported by vireo yet"))
}

/// The fuzz target's entry point: the first byte picks a method, the bytes up to a NUL are the
/// path, the rest the body.
#[doc(hidden)]
pub fn fuzz_request(data: &[u8]) {
    const METHODS: [&str; 5] = ["GET", "PUT", "PATCH", "POST", "DELETE"];
    let Some((&m, rest)) = data.split_first() else {
        return;
    };
    let split = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    let path = String::from_utf8_lossy(&rest[..split]);
    let body = rest.get(split + 1..).unwrap_or(&[]);
    let _ = parse_request(METHODS[m as usize % METHODS.len()], &path, body);
}

/// Parses one request; the error is the fault_message of a 400 answer.
pub fn parse_request(method: &str, path: &str, raw: &[u8]) -> Result<VmmAction, String> {
    let trimmed = path.trim_end_matches('/');
    let segments: Vec<&str> = trimmed.split('/').skip(1).collect();
    let what = format!("{method} {path}");
    let empty_body = |a: VmmAction| -> Result<VmmAction, String> {
        if raw.iter().all(u8::is_ascii_whitespace) {
            Ok(a)
        } else {
            Err(format!("{what}: this request takes no body"))
        }
    };
    match (method, segments.as_slice()) {
        ("GET", []) => empty_body(VmmAction::GetInstanceInfo),
        ("GET", ["version"]) => empty_body(VmmAction::GetVersion),
        ("GET", ["machine-config"]) => empty_body(VmmAction::GetMachineConfig),
        ("GET", ["vm", "config"]) => empty_body(VmmAction::GetVmConfig),
        ("PUT", ["actions"]) => {
            body::<InstanceActionInfo>(&what, raw).map(|a| VmmAction::Action(a.action_type))
        }
        ("PUT", ["boot-source"]) => body::<BootSource>(&what, raw).map(VmmAction::PutBootSource),
        ("PUT", ["machine-config"]) => {
            body::<MachineConfig>(&what, raw).map(VmmAction::PutMachineConfig)
        }
        ("PATCH", ["machine-config"]) => {
            body::<MachineConfigUpdate>(&what, raw).map(VmmAction::PatchMachineConfig)
        }
        ("PUT", ["drives", id]) => {
            let d: Drive = body(&what, raw)?;
            if d.drive_id != *id {
                return Err(format!(
                    "{what}: the drive_id in the body ('{}') does not match the path ('{id}')",
                    d.drive_id
                ));
            }
            Ok(VmmAction::PutDrive(d))
        }
        ("PATCH", ["drives", id]) => {
            let d: PartialDrive = body(&what, raw)?;
            if d.drive_id != *id {
                return Err(format!(
                    "{what}: the drive_id in the body ('{}') does not match the path ('{id}')",
                    d.drive_id
                ));
            }
            Ok(VmmAction::PatchDrive(d))
        }
        ("PUT", ["entropy"]) => body::<EntropyDevice>(&what, raw).map(VmmAction::PutEntropy),
        ("PUT", ["serial"]) => body::<SerialDevice>(&what, raw).map(VmmAction::PutSerial),
        ("PUT", ["logger"]) => body::<LoggerConfig>(&what, raw).map(VmmAction::PutLogger),
        ("PUT", ["metrics"]) => body::<MetricsConfig>(&what, raw).map(VmmAction::PutMetrics),
        ("PATCH", ["vm"]) => {
            body::<VmStateUpdate>(&what, raw).map(|v| VmmAction::SetVmState(v.state))
        }
        ("PUT", ["network-interfaces", id]) => {
            let n: NetworkInterface = body(&what, raw)?;
            if n.iface_id != *id {
                return Err(format!(
                    "{what}: the iface_id in the body ('{}') does not match the path ('{id}')",
                    n.iface_id
                ));
            }
            Ok(VmmAction::PutNetworkInterface(n))
        }
        ("PATCH", ["network-interfaces", id]) => {
            let n: PartialNetworkInterface = body(&what, raw)?;
            if n.iface_id != *id {
                return Err(format!(
                    "{what}: the iface_id in the body ('{}') does not match the path ('{id}')",
                    n.iface_id
                ));
            }
            Ok(VmmAction::PatchNetworkInterface(n))
        }
        ("PUT", ["vsock"]) => body::<VsockDevice>(&what, raw).map(VmmAction::PutVsock),
        ("PUT", ["balloon"]) => body::<BalloonConfig>(&what, raw).map(VmmAction::PutBalloon),
        ("PATCH", ["balloon"]) => body::<BalloonUpdate>(&what, raw).map(VmmAction::PatchBalloon),
        ("GET", ["balloon"]) => empty_body(VmmAction::GetBalloon),
        ("GET", ["balloon", "statistics"]) => empty_body(VmmAction::GetBalloonStats),
        ("PATCH", ["balloon", "statistics"]) => {
            body::<BalloonStatsUpdate>(&what, raw).map(VmmAction::PatchBalloonStats)
        }
        ("PUT", ["snapshot", "create"]) => body::<SnapshotCreateParams>(&what, raw)?
            .into_params()
            .map(VmmAction::CreateSnapshot)
            .map_err(|e| e.0),
        ("PUT", ["snapshot", "load"]) => {
            body::<SnapshotLoadParams>(&what, raw).map(VmmAction::LoadSnapshot)
        }
        ("PATCH", ["balloon", "hinting", "start"]) => {
            if raw.iter().all(u8::is_ascii_whitespace) {
                Ok(VmmAction::StartBalloonHinting(BalloonStartCmd::default()))
            } else {
                body::<BalloonStartCmd>(&what, raw).map(VmmAction::StartBalloonHinting)
            }
        }
        ("GET", ["balloon", "hinting", "status"]) => empty_body(VmmAction::GetBalloonHinting),
        ("PATCH", ["balloon", "hinting", "stop"]) => empty_body(VmmAction::StopBalloonHinting),
        ("PUT", ["cpu-config"]) => {
            body::<vmm::cpu_config::CpuConfig>(&what, raw).map(VmmAction::PutCpuConfig)
        }
        ("PUT" | "PATCH", ["pmem", _]) => not_yet("the virtio-pmem device (pmem)"),
        ("GET", ["mmds"]) => empty_body(VmmAction::GetMmds),
        ("PUT", ["mmds"]) => body::<serde_json::Value>(&what, raw).map(VmmAction::PutMmds),
        ("PATCH", ["mmds"]) => body::<serde_json::Value>(&what, raw).map(VmmAction::PatchMmds),
        ("PUT", ["mmds", "config"]) => body::<MmdsConfig>(&what, raw).map(VmmAction::PutMmdsConfig),
        ("PUT", ["hotplug", "memory"]) => {
            body::<MemoryHotplugConfig>(&what, raw).map(VmmAction::PutHotplug)
        }
        ("PATCH", ["hotplug", "memory"]) => {
            body::<MemoryHotplugSizeUpdate>(&what, raw).map(VmmAction::PatchHotplug)
        }
        ("GET", ["hotplug", "memory"]) => empty_body(VmmAction::GetHotplug),
        _ if ROUTES.iter().any(|(_, p)| route_matches(p, trimmed)) => Err(format!(
            "{what}: method {method} is not allowed on this path"
        )),
        _ => Err(format!("{what}: no such path")),
    }
}

fn route_matches(pattern: &str, path: &str) -> bool {
    let p: Vec<&str> = pattern.trim_end_matches('/').split('/').collect();
    let q: Vec<&str> = path.split('/').collect();
    p.len() == q.len()
        && p.iter()
            .zip(&q)
            .all(|(a, b)| a == b || (a.starts_with('{') && !b.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_parse() {
        assert_eq!(
            parse_request("GET", "/", b""),
            Ok(VmmAction::GetInstanceInfo)
        );
        assert!(matches!(
            parse_request("PUT", "/machine-config", br#"{"vcpu_count":2,"mem_size_mib":256}"#),
            Ok(VmmAction::PutMachineConfig(m)) if m.vcpu_count == 2 && m.mem_size_mib == 256
        ));
        assert!(matches!(
            parse_request("PUT", "/actions", br#"{"action_type":"InstanceStart"}"#),
            Ok(VmmAction::Action(_))
        ));
    }

    #[test]
    fn bad_requests_name_the_problem() {
        let e = parse_request(
            "PUT",
            "/machine-config",
            br#"{"vcpu_count":2,"mem_size_mib":256,"foo":1}"#,
        )
        .unwrap_err();
        assert!(e.contains("unknown field `foo`"), "{e}");
        let e = parse_request(
            "PUT",
            "/machine-config",
            br#"{"vcpu_count":"two","mem_size_mib":256}"#,
        )
        .unwrap_err();
        assert!(e.contains("invalid type"), "{e}");
        let e = parse_request("PUT", "/boot-source", br#"{"boot_args":"x"}"#).unwrap_err();
        assert!(e.contains("missing field `kernel_image_path`"), "{e}");
        let e = parse_request("PUT", "/boot-source", b"{not json").unwrap_err();
        assert!(e.contains("invalid JSON"), "{e}");
        let e = parse_request("PUT", "/boot-source", b"").unwrap_err();
        assert!(e.contains("needs a JSON body"), "{e}");
        let e = parse_request(
            "PUT",
            "/drives/a",
            br#"{"drive_id":"b","path_on_host":"/x","is_root_device":false}"#,
        )
        .unwrap_err();
        assert!(e.contains("does not match"), "{e}");
        let e = parse_request("DELETE", "/machine-config", b"").unwrap_err();
        assert!(e.contains("not allowed"), "{e}");
        let e = parse_request("GET", "/nope", b"").unwrap_err();
        assert!(e.contains("no such path"), "{e}");
        let e = parse_request("PUT", "/vsock", b"{}").unwrap_err();
        assert!(e.contains("missing field `guest_cid`"), "{e}");
        let e = parse_request("PUT", "/balloon", b"{}").unwrap_err();
        assert!(e.contains("missing field `amount_mib`"), "{e}");
        let e = parse_request(
            "PATCH",
            "/balloon/statistics",
            br#"{"stats_polling_interval_s":-1}"#,
        )
        .unwrap_err();
        assert!(e.contains("invalid value"), "{e}");
        let e = parse_request("PATCH", "/balloon/hinting/start", br#"{"x":1}"#).unwrap_err();
        assert!(e.contains("unknown field `x`"), "{e}");
        assert!(parse_request("PATCH", "/balloon/hinting/start", b"").is_ok());
        let e = parse_request("PUT", "/snapshot/create", b"{}").unwrap_err();
        assert!(e.contains("missing field `mem_file_path`"), "{e}");
        let e = parse_request(
            "PUT",
            "/snapshot/create",
            br#"{"mem_file_path":"","snapshot_path":"s"}"#,
        )
        .unwrap_err();
        assert!(e.contains("mem_file_path is empty"), "{e}");
        let e = parse_request("GET", "/version", b"{}").unwrap_err();
        assert!(e.contains("takes no body"), "{e}");
    }

    /// Every input kept in the repository for the fuzz target runs without a panic.
    #[test]
    fn fuzz_corpus_replays() {
        for (name, data) in utils::fuzz_corpus("api_request") {
            let r = std::panic::catch_unwind(|| super::fuzz_request(&data));
            assert!(r.is_ok(), "panic on corpus input {name}");
        }
    }

    /// The same inputs as the fuzz target, deterministically: no panic on any bytes.
    #[test]
    fn random_requests_never_panic() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let methods = ["GET", "PUT", "PATCH", "POST", "DELETE", ""];
        let paths: Vec<&str> = ROUTES
            .iter()
            .map(|r| r.1)
            .chain(["", "//", "/drives/", "/a/b/c"])
            .collect();
        for _ in 0..5000 {
            let m = methods[(next() % methods.len() as u64) as usize];
            let p = paths[(next() % paths.len() as u64) as usize].replace("{drive_id}", "d");
            let len = (next() % 64) as usize;
            let body: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let _ = parse_request(m, &p, &body);
            let json = format!(
                r#"{{"vcpu_count":{},"mem_size_mib":{}}}"#,
                next() as i64,
                next() as i64
            );
            let _ = parse_request(m, &p, json.as_bytes());
        }
    }
}
