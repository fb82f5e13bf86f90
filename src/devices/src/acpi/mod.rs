//! Devices that exist only through ACPI: the guest finds them in the DSDT, not on a bus.

pub mod vmgenid;
