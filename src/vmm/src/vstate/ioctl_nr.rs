//! KVM ioctl request numbers, for the seccomp allow-lists (kvm-ioctls keeps its own private).
//! Encoded as Linux's `_IO`/`_IOR`/`_IOW`/`_IOWR` do, with the argument struct's size.

use kvm_bindings::*;
use std::mem::size_of;

const KVMIO: u64 = 0xae;

const fn io(nr: u64) -> u64 {
    (KVMIO << 8) | nr
}
const fn ior(nr: u64, size: usize) -> u64 {
    (2 << 30) | ((size as u64) << 16) | (KVMIO << 8) | nr
}
const fn iow(nr: u64, size: usize) -> u64 {
    (1 << 30) | ((size as u64) << 16) | (KVMIO << 8) | nr
}
const fn iowr(nr: u64, size: usize) -> u64 {
    (3 << 30) | ((size as u64) << 16) | (KVMIO << 8) | nr
}

pub const KVM_CHECK_EXTENSION: u64 = io(0x03);
pub const KVM_GET_DIRTY_LOG: u64 = iow(0x42, size_of::<kvm_dirty_log>());
pub const KVM_GET_IRQCHIP: u64 = iowr(0x62, size_of::<kvm_irqchip>());
pub const KVM_GET_CLOCK: u64 = ior(0x7c, size_of::<kvm_clock_data>());
pub const KVM_GET_PIT2: u64 = ior(0x9f, size_of::<kvm_pit_state2>());
pub const KVM_RUN: u64 = io(0x80);
pub const KVM_SET_USER_MEMORY_REGION: u64 = iow(0x46, size_of::<kvm_userspace_memory_region>());
pub const KVM_GET_REGS: u64 = ior(0x81, size_of::<kvm_regs>());
pub const KVM_GET_SREGS: u64 = ior(0x83, size_of::<kvm_sregs>());
pub const KVM_GET_MSRS: u64 = iowr(0x88, size_of::<kvm_msrs>());
pub const KVM_GET_LAPIC: u64 = ior(0x8e, size_of::<kvm_lapic_state>());
pub const KVM_GET_CPUID2: u64 = iowr(0x91, size_of::<kvm_cpuid2>());
pub const KVM_GET_MP_STATE: u64 = ior(0x98, size_of::<kvm_mp_state>());
pub const KVM_GET_VCPU_EVENTS: u64 = ior(0x9f, size_of::<kvm_vcpu_events>());
pub const KVM_GET_DEBUGREGS: u64 = ior(0xa1, size_of::<kvm_debugregs>());
pub const KVM_GET_TSC_KHZ: u64 = io(0xa3);
pub const KVM_GET_XSAVE: u64 = ior(0xa4, size_of::<kvm_xsave>());
pub const KVM_GET_XCRS: u64 = ior(0xa6, size_of::<kvm_xcrs>());
pub const KVM_KVMCLOCK_CTRL: u64 = io(0xad);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_match_the_kernel_headers() {
        assert_eq!(KVM_RUN, 0xae80);
        assert_eq!(KVM_KVMCLOCK_CTRL, 0xaead);
        assert_eq!(KVM_GET_REGS, 0x8090_ae81);
        assert_eq!(KVM_GET_SREGS, 0x8138_ae83);
        assert_eq!(KVM_GET_MSRS, 0xc008_ae88);
        assert_eq!(KVM_GET_XSAVE, 0x9000_aea4);
        assert_eq!(KVM_GET_DIRTY_LOG, 0x4010_ae42);
        assert_eq!(KVM_GET_IRQCHIP, 0xc208_ae62);
    }
}
