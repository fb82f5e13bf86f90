//! The guest kernel recipe's configuration (resources/linux) holds what vireo's devices and
//! boot paths need, without building a kernel.

mod common;

use std::collections::HashMap;

/// What vireo needs of a guest kernel, and why.
const NEEDED: &[(&str, &str)] = &[
    ("CONFIG_PVH", "vireo's default boot protocol"),
    ("CONFIG_KVM_GUEST", "kvmclock and paravirtual features"),
    ("CONFIG_SMP", "more than one vCPU"),
    (
        "CONFIG_ACPI",
        "vCPU and device discovery through vireo's ACPI tables",
    ),
    ("CONFIG_VIRTIO_MMIO", "vireo's virtio transport"),
    (
        "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES",
        "devices named on the kernel command line",
    ),
    ("CONFIG_VIRTIO_BLK", "drives"),
    ("CONFIG_VIRTIO_NET", "network interfaces"),
    ("CONFIG_VIRTIO_VSOCKETS", "vsock, the agent's channel"),
    ("CONFIG_HW_RANDOM_VIRTIO", "the entropy device"),
    ("CONFIG_VIRTIO_BALLOON", "the balloon"),
    ("CONFIG_PAGE_REPORTING", "free page reporting"),
    ("CONFIG_VIRTIO_MEM", "memory hotplug"),
    ("CONFIG_SERIAL_8250_CONSOLE", "the serial console"),
    ("CONFIG_SERIO_I8042", "Ctrl-Alt-Del (SendCtrlAltDel)"),
    (
        "CONFIG_EXT4_FS",
        "root file systems from vireo rootfs build",
    ),
    ("CONFIG_OVERLAY_FS", "overlays on a read-only root"),
    ("CONFIG_SQUASHFS", "squashfs images"),
    ("CONFIG_DEVTMPFS", "/dev for the agent"),
    ("CONFIG_UNIX98_PTYS", "terminals for vireo exec -t"),
    ("CONFIG_BLK_DEV_INITRD", "initrds"),
    ("CONFIG_IP_PNP", "ip= on the command line"),
];

fn read(name: &str) -> String {
    let p = common::workspace_root().join("resources/linux").join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// `CONFIG_X=value` lines and `# CONFIG_X is not set` ones (as "n").
fn options(text: &str) -> HashMap<String, String> {
    let mut m = HashMap::new();
    for line in text.lines() {
        if let Some(opt) = line
            .strip_prefix("# ")
            .and_then(|l| l.strip_suffix(" is not set"))
        {
            m.insert(opt.to_string(), "n".to_string());
        } else if let Some((k, v)) = line.split_once('=') {
            if !line.starts_with('#') {
                m.insert(k.to_string(), v.to_string());
            }
        }
    }
    m
}

#[test]
fn the_recipe_builds_in_what_vireo_needs_and_no_modules() {
    let fragment = options(&read("microvm.fragment"));
    for version in ["6.1"] {
        let config = options(&read(&format!("microvm-x86_64-{version}.config")));
        for (opt, why) in NEEDED {
            assert_eq!(
                config.get(*opt).map(String::as_str),
                Some("y"),
                "{opt} ({why}) must be =y in the {version} configuration"
            );
            assert_eq!(
                fragment.get(*opt).map(String::as_str),
                Some("y"),
                "{opt} ({why}) must be in microvm.fragment"
            );
        }
        // Every choice the fragment makes survived Kconfig's dependencies.
        for (opt, want) in &fragment {
            let got = config.get(opt).map(String::as_str).unwrap_or("n");
            assert_eq!(got, want, "{opt} in the {version} configuration");
        }
        assert_eq!(config.get("CONFIG_MODULES").map(String::as_str), Some("n"));
        assert_eq!(config.get("CONFIG_PCI").map(String::as_str), Some("n"));
    }
}
