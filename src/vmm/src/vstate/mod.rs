//! The KVM boundary: every KVM ioctl vireo issues lives in this module, so the rest of the VMM
//! speaks of a VM and its vCPUs.

pub(crate) mod ioctl_nr;
pub mod persist;
pub mod vcpu;
pub mod vm;
