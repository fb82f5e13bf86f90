//! Marks whether this host can boot a real Linux guest (hardware virtualisation visible in
//! /proc/cpuinfo), so the Linux-guest tests are reported as ignored, with the reason, elsewhere;
//! which cgroup memory controllers the jailer's tests can use; and whether Firecracker's API
//! description is at hand for the spec-coverage test.
fn main() {
    println!("cargo:rustc-check-cfg=cfg(vireo_hw_virt)");
    println!("cargo:rerun-if-changed=/proc/cpuinfo");
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hw_virt = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if hw_virt {
        println!("cargo:rustc-cfg=vireo_hw_virt");
    }

    // cgroup memory controllers: v1's own hierarchy, and v2's unified one when it has memory.
    println!("cargo:rustc-check-cfg=cfg(vireo_cgroup1_memory)");
    println!("cargo:rustc-check-cfg=cfg(vireo_cgroup2_memory)");
    if std::path::Path::new("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists() {
        println!("cargo:rustc-cfg=vireo_cgroup1_memory");
    }
    let v2 = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .iter()
        .any(|m| {
            std::fs::read_to_string(format!("{m}/cgroup.controllers"))
                .is_ok_and(|c| c.split_whitespace().any(|c| c == "memory"))
        });
    if v2 {
        println!("cargo:rustc-cfg=vireo_cgroup2_memory");
    }

    // Firecracker's API description, which the spec-coverage test compares vireo's routes
    // with: from VIREO_FIRECRACKER_API_SPEC, or the workplace's shared reference folder.
    println!("cargo:rustc-check-cfg=cfg(vireo_fc_spec)");
    println!("cargo:rerun-if-env-changed=VIREO_FIRECRACKER_API_SPEC");
    let spec = std::env::var("VIREO_FIRECRACKER_API_SPEC").unwrap_or_else(|_| {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../../shared/reference/firecracker-api.yaml"
        )
        .into()
    });
    println!("cargo:rerun-if-changed={spec}");
    if std::path::Path::new(&spec).is_file() {
        println!("cargo:rustc-cfg=vireo_fc_spec");
        println!("cargo:rustc-env=VIREO_FC_SPEC={spec}");
    }
}
