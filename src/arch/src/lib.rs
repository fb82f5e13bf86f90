//! The x86_64 platform vireo presents to its guests.
//!
//! Everything here is pure data: where things live in guest memory, the tables a guest reads
//! at boot (MP table, GDT, page tables, e820), CPUID normalisation and the register state a
//! boot protocol asks for. Nothing in this crate issues a KVM ioctl, so it is unit-testable.

pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod paging;
pub mod regs;

pub use layout::{MemoryRegion, MemoryType};
