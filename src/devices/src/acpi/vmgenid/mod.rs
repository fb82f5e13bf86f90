//! The VM generation ID (Microsoft's "Virtual Machine Generation ID" specification, which
//! Linux's CONFIG_VMGENID driver follows): 16 random bytes in guest memory, replaced each time
//! the VM is restored from a snapshot, so that clones of one snapshot do not share the state
//! of their random number generators. The DSDT names the bytes' address (`ADDR`), and an ACPI
//! Generic Event Device notifies the guest of a change through an interrupt line.
//!
//! The bytes live in guest memory, so snapshots carry them; the device itself has no other
//! state to save.

use crate::virtio::GuestMemoryMmap;
use crate::EventFdTrigger;
use vm_memory::{Bytes, GuestAddress};

/// Size of the generation ID.
pub const ID_BYTES: usize = 16;

/// The generation ID device.
pub struct VmGenId {
    addr: GuestAddress,
    irq: EventFdTrigger,
    id: [u8; ID_BYTES],
}

fn fresh_id() -> std::io::Result<[u8; ID_BYTES]> {
    let mut id = [0u8; ID_BYTES];
    getrandom::fill(&mut id).map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(id)
}

impl VmGenId {
    /// A device whose ID lives at `addr` (reserved in the guest's memory map) and whose
    /// changes raise `irq`. Writes a first random ID.
    pub fn new(mem: &GuestMemoryMmap, addr: u64, irq: EventFdTrigger) -> std::io::Result<Self> {
        let id = fresh_id()?;
        let addr = GuestAddress(addr);
        mem.write_slice(&id, addr).map_err(|e| {
            std::io::Error::other(format!("cannot write the VM generation ID: {e}"))
        })?;
        Ok(Self { addr, irq, id })
    }

    /// Where the ID lives in guest memory.
    pub fn addr(&self) -> u64 {
        self.addr.0
    }

    /// The current ID.
    pub fn id(&self) -> [u8; ID_BYTES] {
        self.id
    }

    /// Gives the VM a new ID (after a restore) and tells the guest.
    pub fn regenerate(&mut self, mem: &GuestMemoryMmap) -> std::io::Result<()> {
        let id = fresh_id()?;
        mem.write_slice(&id, self.addr).map_err(|e| {
            std::io::Error::other(format!("cannot write the VM generation ID: {e}"))
        })?;
        self.id = id;
        use vm_superio::Trigger;
        self.irq
            .trigger()
            .map_err(|e| std::io::Error::other(format!("cannot notify the guest: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regenerating_writes_a_new_id_and_raises_the_line() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let irq = EventFdTrigger::new().unwrap();
        let seen = irq.try_clone().unwrap();
        let mut g = VmGenId::new(&mem, 0xf_f000, irq).unwrap();
        let mut first = [0u8; ID_BYTES];
        mem.read_slice(&mut first, GuestAddress(0xf_f000)).unwrap();
        assert_eq!(first, g.id());
        assert_ne!(first, [0u8; ID_BYTES]);
        g.regenerate(&mem).unwrap();
        let mut second = [0u8; ID_BYTES];
        mem.read_slice(&mut second, GuestAddress(0xf_f000)).unwrap();
        assert_ne!(first, second);
        assert_eq!(second, g.id());
        assert_eq!(seen.0.read().unwrap(), 1);
    }
}
