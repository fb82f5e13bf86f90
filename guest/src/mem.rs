//! A virtio-mem driver and the test the host suite asks for with `vireo.memtest`: it follows the
//! host's requested size, plugging blocks from the start of the region (then writing one byte in
//! every page it plugged and reading back every plugged page, earlier ones too) and unplugging
//! from the top, and ends
//! (`@mem done`) when the request returns to 0 after a plug.

use crate::io::{peek, poke, puts};
use crate::virtio::{Device, MmioDevice};
use crate::{apic, field};

const UNPLUGGED_INACCESSIBLE: u64 = 1 << 1;
const REQ: u64 = 0x334_0000;
const RESP: u64 = REQ + 0x100;
const PLUG: u16 = 0;
const UNPLUG: u16 = 1;
const STATE: u16 = 3;
const PAGE: u64 = 4096;

/// Sends one request; returns (response type, state).
fn request(d: &mut Device, kind: u16, addr: u64, blocks: u16) -> (u16, u16) {
    for i in 0..32 {
        poke::<u8>(REQ + i, 0);
    }
    poke::<u16>(REQ, kind);
    poke::<u64>(REQ + 8, addr);
    poke::<u16>(REQ + 16, blocks);
    poke::<u16>(RESP, 0xffff);
    match d.run(&[(REQ, 24, false), (RESP, 10, true)]) {
        Some(10) => (peek::<u16>(RESP), peek::<u16>(RESP + 8)),
        _ => (0xffff, 0xffff),
    }
}

fn pattern(page: u64) -> u8 {
    (page as u8) ^ 0xa5
}

pub fn test(slot: usize, mmio: MmioDevice, bsp: u8) {
    let mut d = match Device::init(slot, mmio, UNPLUGGED_INACCESSIBLE, apic::VIRTIO_VECTOR, bsp) {
        Ok(d) => d,
        Err(e) => {
            puts(b"@mem error=");
            puts(e);
            puts(b"\n");
            return;
        }
    };
    let block = d.config_u64(0);
    let addr = d.config_u64(16);
    puts(b"@mem ready");
    field(b"block", block, false);
    field(b"addr", addr, true);
    field(b"region", d.config_u64(24), false);
    field(
        b"inaccessible",
        u64::from(d.features & UNPLUGGED_INACCESSIBLE != 0),
        false,
    );
    puts(b"\n");
    let mut plugged = 0u64;
    let mut did = false;
    let mut quiet = 0;
    loop {
        let requested = d.config_u64(48);
        if requested > plugged && block != 0 {
            let blocks = ((requested - plugged) / block) as u16;
            let (resp, _) = request(&mut d, PLUG, addr + plugged, blocks);
            let ok = resp == 0;
            let mut verified = false;
            if ok {
                let (first, end) = ((addr + plugged) / PAGE, (addr + requested) / PAGE);
                for p in first..end {
                    poke::<u8>(p * PAGE, pattern(p));
                }
                // Every plugged page, those plugged before too (across a snapshot, say).
                verified = (addr / PAGE..end).all(|p| peek::<u8>(p * PAGE) == pattern(p));
                plugged = requested;
                did = true;
            }
            let (_, state) = request(&mut d, STATE, addr, (plugged / block.max(1)) as u16);
            puts(b"@mem plugged");
            field(b"mib", plugged >> 20, false);
            field(b"resp", u64::from(resp), false);
            field(b"verified", u64::from(verified), false);
            field(b"state", u64::from(state), false);
            puts(b"\n");
            quiet = 0;
        } else if requested < plugged && block != 0 {
            let blocks = ((plugged - requested) / block) as u16;
            let (resp, _) = request(&mut d, UNPLUG, addr + requested, blocks);
            if resp == 0 {
                plugged = requested;
            }
            puts(b"@mem unplugged");
            field(b"mib", plugged >> 20, false);
            field(b"resp", u64::from(resp), false);
            puts(b"\n");
            if did && plugged == 0 {
                puts(b"@mem done\n");
                return;
            }
            quiet = 0;
        } else if !d.wait_config_change(1000) {
            quiet += 1;
            if quiet > 120 {
                puts(b"@mem timeout\n");
                return;
            }
        }
    }
}
