//! Custom CPU templates in Firecracker's `PUT /cpu-config` format: CPUID and MSR modifiers
//! that make every vCPU show the same CPU whatever host it runs on, so that a fleet can move
//! snapshots between hosts.
//!
//! A bitmap is `0b` followed by up to 32 (CPUID) or 64 (MSR) characters, most significant bit
//! first: `0` and `1` force a bit, `x` keeps what KVM and vireo would give; missing leading
//! characters count as `x`.

use serde::{Deserialize, Serialize};

/// One register of a CPUID leaf.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CpuidRegisterModifier {
    /// eax, ebx, ecx or edx.
    pub register: String,
    /// The bits to force.
    pub bitmap: String,
}

/// The modifiers of one CPUID leaf and subleaf.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CpuidLeafModifier {
    /// Leaf (hex with 0x, or decimal).
    pub leaf: String,
    /// Subleaf.
    pub subleaf: String,
    /// KVM's entry flags (1: the subleaf is significant).
    #[serde(default)]
    pub flags: u32,
    /// Registers to change.
    pub modifiers: Vec<CpuidRegisterModifier>,
}

/// One MSR's bits to force.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MsrModifier {
    /// MSR address.
    pub addr: String,
    /// The bits to force.
    pub bitmap: String,
}

/// `PUT /cpu-config` (and `"cpu-config"` in a config file).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CpuConfig {
    /// KVM capabilities to require or drop (not offered by vireo: must be empty).
    #[serde(default)]
    pub kvm_capabilities: Vec<String>,
    /// CPUID changes.
    #[serde(default)]
    pub cpuid_modifiers: Vec<CpuidLeafModifier>,
    /// MSR changes.
    #[serde(default)]
    pub msr_modifiers: Vec<MsrModifier>,
    /// aarch64 only: must be empty.
    #[serde(default)]
    pub vcpu_features: Vec<serde_json::Value>,
    /// aarch64 only: must be empty.
    #[serde(default)]
    pub reg_modifiers: Vec<serde_json::Value>,
}

/// Bits to force in a register: where `mask` is set, the value's bit replaces the original.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct Bits {
    /// The bits the template decides.
    pub mask: u64,
    /// Their values.
    pub value: u64,
}

impl Bits {
    /// `original` with the template's bits.
    pub fn apply(&self, original: u64) -> u64 {
        (original & !self.mask) | (self.value & self.mask)
    }
}

/// One CPUID register to change.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct CpuidChange {
    /// Leaf.
    pub leaf: u32,
    /// Subleaf.
    pub subleaf: u32,
    /// KVM entry flags.
    pub flags: u32,
    /// 0 eax, 1 ebx, 2 ecx, 3 edx.
    pub register: u8,
    /// What to force.
    pub bits: Bits,
}

/// A checked template, as the vCPUs apply it.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct CpuTemplate {
    /// CPUID registers to change.
    pub cpuid: Vec<CpuidChange>,
    /// MSRs to change: address and bits.
    pub msrs: Vec<(u32, Bits)>,
}

fn number(what: &str, s: &str) -> Result<u32, String> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    };
    r.map_err(|_| format!("cpu-config: {what} '{s}' is not a number (decimal, or hex with 0x)"))
}

fn bitmap(what: &str, s: &str, width: usize) -> Result<Bits, String> {
    let bad = |why: &str| format!("cpu-config: {what} bitmap '{s}': {why}");
    let body = s
        .strip_prefix("0b")
        .ok_or_else(|| bad("must start with 0b"))?;
    if body.is_empty() || body.len() > width {
        return Err(bad(&format!("needs 1 to {width} characters after 0b")));
    }
    let mut bits = Bits::default();
    for (i, c) in body.chars().rev().enumerate() {
        match c {
            '0' => bits.mask |= 1 << i,
            '1' => {
                bits.mask |= 1 << i;
                bits.value |= 1 << i;
            }
            'x' | 'X' => {}
            other => return Err(bad(&format!("'{other}' is not 0, 1 or x"))),
        }
    }
    Ok(bits)
}

impl CpuConfig {
    /// Checks the template and turns it into the changes the vCPUs apply.
    pub fn compile(&self) -> Result<CpuTemplate, String> {
        if !self.kvm_capabilities.is_empty() {
            return Err("cpu-config: kvm_capabilities are not supported by vireo".into());
        }
        if !self.vcpu_features.is_empty() || !self.reg_modifiers.is_empty() {
            return Err(
                "cpu-config: vcpu_features and reg_modifiers are for aarch64 hosts; this is x86_64"
                    .into(),
            );
        }
        let mut t = CpuTemplate::default();
        for leaf in &self.cpuid_modifiers {
            let l = number("leaf", &leaf.leaf)?;
            let sub = number("subleaf", &leaf.subleaf)?;
            for m in &leaf.modifiers {
                let register = match m.register.as_str() {
                    "eax" => 0,
                    "ebx" => 1,
                    "ecx" => 2,
                    "edx" => 3,
                    r => {
                        return Err(format!(
                            "cpu-config: leaf {}: register '{r}' is not eax, ebx, ecx or edx",
                            leaf.leaf
                        ))
                    }
                };
                t.cpuid.push(CpuidChange {
                    leaf: l,
                    subleaf: sub,
                    flags: leaf.flags,
                    register,
                    bits: bitmap(&format!("leaf {} {}", leaf.leaf, m.register), &m.bitmap, 32)?,
                });
            }
        }
        for m in &self.msr_modifiers {
            let addr = number("MSR address", &m.addr)?;
            t.msrs
                .push((addr, bitmap(&format!("MSR {}", m.addr), &m.bitmap, 64)?));
        }
        Ok(t)
    }
}

impl CpuTemplate {
    /// Applies the CPUID changes to a vCPU's CPUID (adding leaves the template names that the
    /// list lacks).
    pub fn apply_cpuid(&self, cpuid: &mut kvm_bindings::CpuId) -> Result<(), String> {
        for c in &self.cpuid {
            let present = cpuid
                .as_slice()
                .iter()
                .any(|e| e.function == c.leaf && e.index == c.subleaf);
            if !present {
                cpuid
                    .push(kvm_bindings::kvm_cpuid_entry2 {
                        function: c.leaf,
                        index: c.subleaf,
                        flags: c.flags,
                        ..Default::default()
                    })
                    .map_err(|e| format!("cpu-config: cannot add leaf {:#x}: {e:?}", c.leaf))?;
            }
            for e in cpuid.as_mut_slice().iter_mut() {
                if e.function == c.leaf && e.index == c.subleaf {
                    let r = match c.register {
                        0 => &mut e.eax,
                        1 => &mut e.ebx,
                        2 => &mut e.ecx,
                        _ => &mut e.edx,
                    };
                    *r = c.bits.apply(u64::from(*r)) as u32;
                }
            }
        }
        Ok(())
    }
}

impl CpuTemplate {
    /// Checks that a vCPU's CPUID, as KVM reports it back, carries the template's bits.
    pub fn check_cpuid(&self, cpuid: &kvm_bindings::CpuId) -> Result<(), String> {
        const REGS: [&str; 4] = ["eax", "ebx", "ecx", "edx"];
        for c in &self.cpuid {
            let Some(e) = cpuid
                .as_slice()
                .iter()
                .find(|e| e.function == c.leaf && e.index == c.subleaf)
            else {
                return Err(format!(
                    "cpu-config: this host's KVM dropped CPUID leaf {:#x}.{}",
                    c.leaf, c.subleaf
                ));
            };
            let v = u64::from([e.eax, e.ebx, e.ecx, e.edx][usize::from(c.register)]);
            if v & c.bits.mask != c.bits.value & c.bits.mask {
                return Err(format!(
                    "cpu-config: this host's KVM does not apply CPUID changes (leaf {:#x}.{} {} reads {v:#x}, the template sets bits {:#x} to {:#x}); CPU templates cannot be used on this host",
                    c.leaf,
                    c.subleaf,
                    REGS[usize::from(c.register)],
                    c.bits.mask,
                    c.bits.value & c.bits.mask
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> CpuConfig {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn firecracker_templates_compile() {
        let t = config(
            r#"{"cpuid_modifiers":[{"leaf":"0x1","subleaf":"0x0","flags":0,"modifiers":[
                {"register":"ecx","bitmap":"0bx0xxxxxxxxxxxxxxxxxxxxxxxxxxxxx1"}]}],
               "msr_modifiers":[{"addr":"0x10a","bitmap":"0b0000000000000000000000000000000000000000000000000000000000000000"}]}"#,
        )
        .compile()
        .unwrap();
        assert_eq!(t.cpuid.len(), 1);
        let c = t.cpuid[0];
        assert_eq!((c.leaf, c.subleaf, c.register), (1, 0, 2));
        assert_eq!(c.bits.mask, (1 << 30) | 1);
        assert_eq!(c.bits.value, 1);
        assert_eq!(c.bits.apply(0xffff_fffe), 0xbfff_ffff);
        assert_eq!(
            t.msrs,
            vec![(
                0x10a,
                Bits {
                    mask: u64::MAX,
                    value: 0
                }
            )]
        );
    }

    #[test]
    fn bad_templates_are_named() {
        for (json, needle) in [
            (
                r#"{"cpuid_modifiers":[{"leaf":"0x1","subleaf":"0","modifiers":[{"register":"esi","bitmap":"0b1"}]}]}"#,
                "register 'esi'",
            ),
            (
                r#"{"cpuid_modifiers":[{"leaf":"zz","subleaf":"0","modifiers":[]}]}"#,
                "leaf 'zz'",
            ),
            (
                r#"{"cpuid_modifiers":[{"leaf":"1","subleaf":"0","modifiers":[{"register":"eax","bitmap":"101"}]}]}"#,
                "must start with 0b",
            ),
            (
                r#"{"cpuid_modifiers":[{"leaf":"1","subleaf":"0","modifiers":[{"register":"eax","bitmap":"0b102"}]}]}"#,
                "'2' is not 0, 1 or x",
            ),
            (
                r#"{"cpuid_modifiers":[{"leaf":"1","subleaf":"0","modifiers":[{"register":"eax","bitmap":"0b111111111111111111111111111111111"}]}]}"#,
                "1 to 32 characters",
            ),
            (r#"{"kvm_capabilities":["!56"]}"#, "kvm_capabilities"),
            (
                r#"{"vcpu_features":[{"index":0,"bitmap":"0b1"}]}"#,
                "aarch64",
            ),
        ] {
            let e = config(json).compile().unwrap_err();
            assert!(e.contains(needle), "{json}: {e}");
        }
    }
}
