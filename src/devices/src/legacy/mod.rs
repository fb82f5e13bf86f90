//! The legacy PC devices every vireo guest gets.

pub mod i8042;
pub mod power;
pub mod serial;

pub use i8042::I8042;
pub use power::{AcpiPmDevice, PowerDevice};
pub use serial::Serial;
