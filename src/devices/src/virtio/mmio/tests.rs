use super::super::features;
use super::super::rng::Rng;
use super::super::status;
use super::super::test_utils::*;
use crate::bus::BusDevice;
use vm_memory::{Bytes, GuestAddress};

fn driver() -> Driver {
    Driver::new(Box::new(Rng::new()))
}

#[test]
fn identification_registers() {
    let mut d = driver();
    assert_eq!(d.read(0x000), 0x7472_6976);
    assert_eq!(d.read(0x004), 2, "modern transport only");
    assert_eq!(d.read(0x008), 4, "entropy device");
    assert_eq!(d.read(0x034), 256, "QueueNumMax of queue 0");
    d.write(0x030, 1);
    assert_eq!(d.read(0x034), 0, "no queue 1");
    assert_eq!(d.read(0x0b0), u32::MAX, "no shared memory regions");
    let f = d.device_features();
    assert_ne!(f & features::VERSION_1, 0);
    d.write(0x14, 7);
    assert_eq!(d.read(0x10), 0, "features beyond page 1 are zero");
}

#[test]
fn wrong_width_and_undefined_offsets_are_harmless() {
    let mut d = driver();
    let mut b2 = [0u8; 2];
    d.transport.read(0x000, &mut b2);
    assert_eq!(b2, [0xff, 0xff], "16-bit register read");
    let mut b4 = [0u8; 4];
    d.transport.read(0x002, &mut b4);
    assert_eq!(b4, [0xff; 4], "unaligned register read");
    d.transport.write(0x070, &[1]);
    assert_eq!(d.read(0x070), 0, "8-bit status write ignored");
    d.transport.write(0x071, &1u32.to_le_bytes());
    assert_eq!(d.read(0x070), 0, "unaligned write ignored");
    assert_eq!(d.read(0x0f0), 0, "undefined offset reads zero");
    d.write(0x0f0, 0xdead);
    d.write(0x004, 9); // read-only register
    assert_eq!(d.read(0x004), 2);
    let mut cfg = [0u8; 8];
    d.transport.read(0x100, &mut cfg);
    assert_eq!(cfg, [0; 8], "entropy device has no config");
}

#[test]
fn features_ok_needs_version_1_and_offered_bits_only() {
    let mut d = driver();
    let offered = d.device_features();
    let s = d.negotiate(offered & !features::VERSION_1);
    assert_eq!(s & status::FEATURES_OK, 0, "legacy driver refused");
    let s = d.negotiate(offered | 1 << 40);
    assert_eq!(s & status::FEATURES_OK, 0, "unoffered feature refused");
    let s = d.negotiate(features::VERSION_1);
    assert_ne!(s & status::FEATURES_OK, 0);
    // Features are frozen after FEATURES_OK.
    d.write(0x24, 0);
    d.write(0x20, 0xffff_ffff);
    let s = d.driver_ok();
    assert_eq!(
        s & status::DEVICE_NEEDS_RESET,
        status::DEVICE_NEEDS_RESET,
        "queue never set up"
    );
}

#[test]
fn driver_ok_without_features_ok_is_ignored() {
    let mut d = driver();
    d.write(0x70, status::ACKNOWLEDGE | status::DRIVER);
    d.write(
        0x70,
        status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK,
    );
    assert_eq!(d.read(0x70), status::ACKNOWLEDGE | status::DRIVER);
    // Status bits cannot be dropped except by writing 0.
    d.write(0x70, status::ACKNOWLEDGE);
    assert_eq!(d.read(0x70), status::ACKNOWLEDGE | status::DRIVER);
    d.write(0x70, 0);
    assert_eq!(d.read(0x70), 0);
}

#[test]
fn queue_size_not_a_power_of_two_needs_reset() {
    let mut d = driver();
    let f = d.device_features();
    d.negotiate(f);
    d.setup_queue(12, DESC, AVAIL, USED);
    let s = d.driver_ok();
    assert_ne!(s & status::DEVICE_NEEDS_RESET, 0);
    assert_ne!(
        d.read(0x60) & 2,
        0,
        "config-change interrupt tells the driver"
    );
    // A reset clears it and a correct setup works.
    d.activate();
}

#[test]
fn queue_too_big_or_outside_memory_needs_reset() {
    for (size, desc) in [
        (512u16, DESC),
        (16, (MEM_SIZE as u64) - 8),
        (16, u64::MAX - 15),
    ] {
        let mut d = driver();
        let f = d.device_features();
        d.negotiate(f);
        d.setup_queue(size, desc, AVAIL, USED);
        assert_ne!(
            d.driver_ok() & status::DEVICE_NEEDS_RESET,
            0,
            "size {size} desc {desc:#x}"
        );
    }
    // Misaligned rings too.
    let mut d = driver();
    let f = d.device_features();
    d.negotiate(f);
    d.setup_queue(16, DESC + 4, AVAIL, USED);
    assert_ne!(d.driver_ok() & status::DEVICE_NEEDS_RESET, 0);
}

#[test]
fn queue_registers_are_frozen_once_live() {
    let mut d = driver();
    d.activate();
    d.write(0x38, 3); // QueueNum after DRIVER_OK
    d.write(0x80, 0x1234);
    d.write(0x44, 0);
    assert_eq!(d.read(0x44), 1, "queue stays ready");
    // The device still works with the original layout.
    d.submit(&[(DATA, 16, F_WRITE)]);
    assert_eq!(d.wait_used(), Some((0, 16)));
}

#[test]
fn notification_before_driver_ok_is_harmless() {
    let mut d = driver();
    let f = d.device_features();
    d.negotiate(f);
    d.setup_queue(16, DESC, AVAIL, USED);
    // A chain published and notified before DRIVER_OK is served once the device is live.
    d.submit(&[(DATA, 32, F_WRITE)]);
    d.write(0x50, 0);
    d.write(0x50, 9); // a queue that does not exist
    d.driver_ok();
    d.write(0x50, 0);
    assert_eq!(d.wait_used(), Some((0, 32)));
}

#[test]
fn interrupt_status_and_ack() {
    let mut d = driver();
    d.activate();
    d.submit(&[(DATA, 8, F_WRITE)]);
    assert!(d.wait_used().is_some());
    // Give the worker a moment to raise the line after publishing the used entry.
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert_eq!(d.read(0x60) & 1, 1);
    assert!(d.irq.read().unwrap() >= 1, "irqfd raised");
    d.write(0x64, 1);
    assert_eq!(d.read(0x60) & 1, 0);
}

#[test]
fn reset_stops_the_device_and_it_can_restart() {
    let mut d = driver();
    d.activate();
    d.submit(&[(DATA, 8, F_WRITE)]);
    assert!(d.wait_used().is_some());
    d.write(0x70, 0);
    assert_eq!(d.read(0x70), 0);
    assert_eq!(d.read(0x44), 0, "queue not ready after reset");
    // Fresh rings after reset.
    d.mem
        .write_slice(&[0u8; 0x30000], GuestAddress(DESC))
        .unwrap();
    let mut d2 = d;
    d2.reset_counters();
    d2.activate();
    d2.submit(&[(DATA, 8, F_WRITE)]);
    assert_eq!(d2.wait_used(), Some((0, 8)));
}

#[test]
fn avail_index_jump_breaks_only_the_device() {
    let mut d = driver();
    d.activate();
    // The driver claims 1000 new buffers in a 16-entry ring.
    d.mem.write_obj(1000u16, GuestAddress(AVAIL + 2)).unwrap();
    d.write(0x50, 0);
    assert!(d.wait_needs_reset());
}
