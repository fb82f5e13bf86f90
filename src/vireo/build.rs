//! Marks whether this host can boot a real Linux guest (hardware virtualisation visible in
//! /proc/cpuinfo), so the Linux-guest tests are reported as ignored, with the reason, elsewhere.
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
}
