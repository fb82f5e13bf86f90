//! virtio-mem's request handling against a recording backend.

use super::*;

const MIB: u64 = 1 << 20;

fn layout() -> MemLayout {
    MemLayout {
        addr: 4 << 30,
        region_size: 256 * MIB,
        block_size: 2 * MIB,
        slot_size: 128 * MIB,
    }
}

#[derive(Default)]
struct Record(Vec<(bool, u64, u64)>);

impl Backend for Record {
    fn plug(&mut self, offset: u64, len: u64) -> Result<(), String> {
        self.0.push((true, offset, len));
        Ok(())
    }
    fn unplug(&mut self, offset: u64, len: u64) -> Result<(), String> {
        self.0.push((false, offset, len));
        Ok(())
    }
}

fn req(kind: u16, block: u64, nb: u16) -> Request {
    Request {
        kind,
        addr: layout().addr + block * 2 * MIB,
        nb_blocks: nb,
    }
}

#[test]
fn plugging_follows_the_requested_size_and_the_block_map() {
    let mut s = BlockState::new(layout());
    let mut b = Record::default();
    // Nothing requested: plugging is refused for now.
    assert_eq!(
        s.handle(&req(request::PLUG, 0, 1), &mut b),
        (response::NACK, 0)
    );
    s.set_requested_size(8 * MIB).unwrap();
    assert_eq!(
        s.handle(&req(request::PLUG, 0, 2), &mut b),
        (response::ACK, 0)
    );
    assert_eq!(
        s.handle(&req(request::PLUG, 2, 2), &mut b),
        (response::ACK, 0)
    );
    assert_eq!(s.plugged_size(), 8 * MIB);
    // Beyond the requested size, and twice the same block.
    assert_eq!(
        s.handle(&req(request::PLUG, 4, 1), &mut b),
        (response::NACK, 0)
    );
    s.set_requested_size(16 * MIB).unwrap();
    assert_eq!(
        s.handle(&req(request::PLUG, 1, 1), &mut b),
        (response::ERROR, 0)
    );
    // State of ranges.
    assert_eq!(
        s.handle(&req(request::STATE, 0, 4), &mut b),
        (response::ACK, state::PLUGGED)
    );
    assert_eq!(
        s.handle(&req(request::STATE, 3, 2), &mut b),
        (response::ACK, state::MIXED)
    );
    assert_eq!(
        s.handle(&req(request::STATE, 9, 3), &mut b),
        (response::ACK, state::UNPLUGGED)
    );
    // Unplugging needs every block plugged.
    assert_eq!(
        s.handle(&req(request::UNPLUG, 3, 2), &mut b),
        (response::ERROR, 0)
    );
    assert_eq!(
        s.handle(&req(request::UNPLUG, 1, 2), &mut b),
        (response::ACK, 0)
    );
    assert_eq!(s.plugged_size(), 4 * MIB);
    assert_eq!(
        s.handle(&req(request::PLUG, 100, 1), &mut b),
        (response::ACK, 0)
    );
    assert_eq!(
        s.handle(&req(request::UNPLUG_ALL, 0, 0), &mut b),
        (response::ACK, 0)
    );
    assert_eq!(s.plugged_size(), 0);
    assert_eq!(
        b.0,
        vec![
            (true, 0, 4 * MIB),
            (true, 4 * MIB, 4 * MIB),
            (false, 2 * MIB, 4 * MIB),
            (true, 200 * MIB, 2 * MIB),
            (false, 0, 2 * MIB),
            (false, 6 * MIB, 2 * MIB),
            (false, 200 * MIB, 2 * MIB),
        ]
    );
}

#[test]
fn malformed_requests_are_errors() {
    let mut s = BlockState::new(layout());
    s.set_requested_size(256 * MIB).unwrap();
    let mut b = Record::default();
    let l = layout();
    for r in [
        Request {
            kind: request::PLUG,
            addr: l.addr + MIB,
            nb_blocks: 1,
        },
        Request {
            kind: request::PLUG,
            addr: l.addr,
            nb_blocks: 0,
        },
        Request {
            kind: request::PLUG,
            addr: l.addr - 2 * MIB,
            nb_blocks: 1,
        },
        Request {
            kind: request::PLUG,
            addr: l.addr + 254 * MIB,
            nb_blocks: 2,
        },
        Request {
            kind: request::STATE,
            addr: u64::MAX - MIB,
            nb_blocks: u16::MAX,
        },
        Request {
            kind: 9,
            addr: l.addr,
            nb_blocks: 1,
        },
    ] {
        assert_eq!(s.handle(&r, &mut b), (response::ERROR, 0), "{r:?}");
    }
    assert!(b.0.is_empty());
    assert!(s.set_requested_size(3 * MIB).is_err());
    assert!(s.set_requested_size(258 * MIB).is_err());
}

#[test]
fn the_config_space_and_requests_have_the_spec_layout() {
    let mut s = BlockState::new(layout());
    s.set_requested_size(6 * MIB).unwrap();
    let c = s.config_image();
    let at = |o: usize| u64::from_le_bytes(c[o..o + 8].try_into().unwrap());
    assert_eq!(
        (at(0), at(16), at(24), at(32)),
        (2 * MIB, 4 << 30, 256 * MIB, 256 * MIB)
    );
    assert_eq!((at(40), at(48)), (0, 6 * MIB));
    let mut raw = [0u8; REQUEST_SIZE];
    raw[0] = 3;
    raw[8..16].copy_from_slice(&(5u64 << 30).to_le_bytes());
    raw[16] = 7;
    assert_eq!(
        Request::parse(&raw),
        Request {
            kind: 3,
            addr: 5 << 30,
            nb_blocks: 7
        }
    );
    let r = response_bytes((response::ACK, state::MIXED));
    assert_eq!(r, [0, 0, 0, 0, 0, 0, 0, 0, 2, 0]);
}

#[test]
fn layouts_are_checked() {
    assert!(layout().check().is_ok());
    for (bad, why) in [
        (
            MemLayout {
                block_size: MIB,
                ..layout()
            },
            "power of two of at least 2 MiB",
        ),
        (
            MemLayout {
                slot_size: 3 * MIB,
                ..layout()
            },
            "multiple of the block size",
        ),
        (
            MemLayout {
                region_size: 200 * MIB,
                ..layout()
            },
            "multiple of the slot size",
        ),
        (
            MemLayout {
                addr: (4 << 30) + 2 * MIB,
                ..layout()
            },
            "not aligned",
        ),
    ] {
        let e = bad.check().unwrap_err();
        assert!(e.contains(why), "{e}");
    }
}

#[test]
fn state_round_trips_and_mismatches_are_refused() {
    let mut s = BlockState::new(layout());
    s.set_requested_size(10 * MIB).unwrap();
    let mut b = Record::default();
    s.handle(&req(request::PLUG, 3, 4), &mut b);
    let saved = persist::MemState::from(&s);
    let mut t = BlockState::new(layout());
    saved.apply(&mut t).unwrap();
    assert_eq!(t, s);
    let mut other = BlockState::new(MemLayout {
        region_size: 128 * MIB,
        ..layout()
    });
    assert!(saved.apply(&mut other).unwrap_err().contains("differs"));
    let mut bad = saved.clone();
    bad.plugged.push(1);
    assert!(bad.apply(&mut t).unwrap_err().contains("does not fit"));
}

#[test]
fn a_driver_plugs_through_the_queue() {
    use crate::virtio::test_utils::*;
    use vm_memory::{Bytes, GuestAddress};
    let device = VirtioMem::new(layout(), Box::new(Record::default()));
    let state = device.state();
    let metrics = device.metrics.clone();
    crate::bus::lock(&state)
        .set_requested_size(4 * MIB)
        .unwrap();
    let mut d = Driver::new(Box::new(device));
    assert_ne!(d.device_features() & feature::UNPLUGGED_INACCESSIBLE, 0);
    d.activate();
    // requested_size in the config space.
    assert_eq!(d.read(0x100 + 48), (4 * MIB) as u32);
    let mut raw = [0u8; REQUEST_SIZE];
    raw[8..16].copy_from_slice(&layout().addr.to_le_bytes());
    raw[16] = 2;
    d.mem.write_slice(&raw, GuestAddress(DATA)).unwrap();
    d.submit(&[
        (DATA, REQUEST_SIZE as u32, 0),
        (DATA + 64, RESPONSE_SIZE as u32, F_WRITE),
    ]);
    assert_eq!(d.wait_used(), Some((0, RESPONSE_SIZE as u32)));
    let mut resp = [0u8; RESPONSE_SIZE];
    d.mem
        .read_slice(&mut resp, GuestAddress(DATA + 64))
        .unwrap();
    assert_eq!(resp, response_bytes((response::ACK, 0)));
    assert_eq!(crate::bus::lock(&state).plugged_size(), 4 * MIB);
    assert_eq!(d.read(0x100 + 40), (4 * MIB) as u32, "plugged_size");
    // A request with nowhere to answer is returned empty.
    d.submit(&[(DATA, REQUEST_SIZE as u32, 0)]);
    assert_eq!(d.wait_used(), Some((2, 0)));
    use std::sync::atomic::Ordering::Relaxed;
    assert_eq!(metrics.requests.load(Relaxed), 2);
    assert_eq!(metrics.plugged_blocks.load(Relaxed), 2);
    assert_eq!(metrics.errors.load(Relaxed), 1);
}
