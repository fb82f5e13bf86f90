//! CPUID as the guest sees it: KVM's supported set, adjusted per vCPU so the guest finds a
//! hypervisor, KVM's signature and a consistent topology (one thread per core, all cores in
//! one package, APIC ID = vCPU index).

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_KVM_SIGNATURE: u32 = 0x4000_0000;
const LEAF_EXT_ADDRESS_SIZES: u32 = 0x8000_0008;

const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
const KVM_SIGNATURE: &[u8; 12] = b"KVMKVMKVM\0\0\0";
/// CPUID.0x4000_0001 holds KVM's paravirtual features; KVM reports it when it supports any.
const LEAF_KVM_FEATURES: u32 = 0x4000_0001;

/// Topology level types for leaves 0xB/0x1F.
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// Number of bits needed to hold `count` distinct IDs.
fn id_bits(count: u32) -> u32 {
    if count <= 1 {
        0
    } else {
        32 - (count - 1).leading_zeros()
    }
}

fn is_amd(entries: &[kvm_cpuid_entry2]) -> bool {
    entries
        .iter()
        .find(|e| e.function == 0)
        .map(|e| (e.ebx, e.edx, e.ecx) == (0x6874_7541, 0x6974_6e65, 0x444d_4163))
        .unwrap_or(false)
}

/// Adjusts `cpuid` (as returned by KVM_GET_SUPPORTED_CPUID) for vCPU `cpu_index` of
/// `cpu_count`.
pub fn normalize(cpuid: &mut CpuId, cpu_index: u32, cpu_count: u32) {
    let apic_id = cpu_index;
    let amd = is_amd(cpuid.as_slice());
    let core_bits = id_bits(cpu_count);
    let mut has_signature = false;
    for e in cpuid.as_mut_slice().iter_mut() {
        match e.function {
            LEAF_FEATURES => {
                e.ebx = (e.ebx & 0x0000_ffff)
                    | ((apic_id & 0xff) << 24)
                    | ((cpu_count.min(255)) << 16)
                    | (8 << 8); // CLFLUSH line size in quadwords
                e.ecx |= ECX_HYPERVISOR;
                if cpu_count > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS if !amd => {
                let cache_level = (e.eax >> 5) & 0x7;
                // Cores per package - 1, and threads sharing this cache - 1: private L1/L2,
                // shared last level.
                let sharing = if cache_level >= 3 { cpu_count - 1 } else { 0 };
                e.eax =
                    (e.eax & 0x3ff) | ((cpu_count - 1).min(63) << 26) | ((sharing & 0xfff) << 14);
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
                e.edx = apic_id;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = (LEVEL_SMT << 8) | e.index;
                    }
                    1 => {
                        e.eax = core_bits;
                        e.ebx = cpu_count;
                        e.ecx = (LEVEL_CORE << 8) | e.index;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            LEAF_EXT_ADDRESS_SIZES if amd => {
                // Number of cores - 1 and the APIC ID width, as AMD's topology leaf reports them.
                e.ecx = (e.ecx & !0xf0ff) | (core_bits << 12) | ((cpu_count - 1) & 0xff);
            }
            LEAF_KVM_SIGNATURE => {
                has_signature = true;
                e.ebx = u32::from_le_bytes(KVM_SIGNATURE[0..4].try_into().unwrap());
                e.ecx = u32::from_le_bytes(KVM_SIGNATURE[4..8].try_into().unwrap());
                e.edx = u32::from_le_bytes(KVM_SIGNATURE[8..12].try_into().unwrap());
                e.eax = e.eax.max(LEAF_KVM_FEATURES);
            }
            _ => {}
        }
    }
    if !has_signature {
        let _ = cpuid.push(kvm_cpuid_entry2 {
            function: LEAF_KVM_SIGNATURE,
            eax: LEAF_KVM_SIGNATURE,
            ebx: u32::from_le_bytes(KVM_SIGNATURE[0..4].try_into().unwrap()),
            ecx: u32::from_le_bytes(KVM_SIGNATURE[4..8].try_into().unwrap()),
            edx: u32::from_le_bytes(KVM_SIGNATURE[8..12].try_into().unwrap()),
            ..Default::default()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX;

    fn sample() -> CpuId {
        let entries = [
            kvm_cpuid_entry2 {
                function: 0,
                eax: 0x1f,
                ebx: 0x756e_6547,
                edx: 0x4965_6e69,
                ecx: 0x6c65_746e,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 1,
                eax: 0x906ea,
                ebx: 0x0010_0800,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 0,
                flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 1,
                flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 4,
                index: 3,
                eax: 0x163,
                flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                ..Default::default()
            },
        ];
        CpuId::from_entries(&entries).unwrap()
    }

    fn leaf(c: &CpuId, f: u32, i: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == f && e.index == i)
            .unwrap()
    }

    #[test]
    fn per_vcpu_apic_ids_and_hypervisor_bit() {
        let mut c = sample();
        normalize(&mut c, 3, 4);
        let l1 = leaf(&c, 1, 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(l1.edx & EDX_HTT, 0);
        let core = leaf(&c, 0xb, 1);
        assert_eq!((core.eax, core.ebx, core.edx, core.ecx >> 8), (2, 4, 3, 2));
        assert_eq!(leaf(&c, 4, 3).eax >> 26, 3);
        assert_eq!(leaf(&c, 4, 3).eax & 0x3ff, 0x163);
    }

    #[test]
    fn adds_kvm_signature() {
        let mut c = sample();
        normalize(&mut c, 0, 1);
        let sig = leaf(&c, LEAF_KVM_SIGNATURE, 0);
        let mut bytes = Vec::new();
        for r in [sig.ebx, sig.ecx, sig.edx] {
            bytes.extend_from_slice(&r.to_le_bytes());
        }
        assert_eq!(&bytes[..], KVM_SIGNATURE);
        assert_eq!(leaf(&c, 1, 0).edx & EDX_HTT, 0);
    }

    #[test]
    fn id_bits_rounds_up() {
        assert_eq!([1, 2, 3, 4, 5, 254].map(id_bits), [0, 1, 2, 2, 3, 8]);
    }
}
