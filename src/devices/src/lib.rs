//! Device models for vireo guests.
//!
//! Devices know nothing about KVM: a device is reached through a [`bus::Bus`] by address and
//! raises interrupts or asks for VM exits through event file descriptors, which the VMM wires
//! to KVM (irqfd) or to its own event loop.

pub mod acpi;
pub mod bus;
pub mod legacy;
pub mod metrics;
pub mod rate_limiter;
pub mod virtio;

use vmm_sys_util::eventfd::EventFd;

/// An [`EventFd`] usable wherever vm-superio wants a [`vm_superio::Trigger`].
#[derive(Debug)]
pub struct EventFdTrigger(pub EventFd);

impl vm_superio::Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

impl EventFdTrigger {
    /// A fresh non-blocking eventfd.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self(EventFd::new(libc::EFD_NONBLOCK)?))
    }

    /// Another handle on the same eventfd.
    pub fn try_clone(&self) -> std::io::Result<Self> {
        Ok(Self(self.0.try_clone()?))
    }
}
