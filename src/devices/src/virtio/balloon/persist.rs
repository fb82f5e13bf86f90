//! The balloon's snapshot state: target and actual size, the statistics interval (the API may
//! have changed it) and the guest's last statistics. A statistics buffer the device held is
//! saved as not taken, so the restored device takes it from the ring again.

use super::{Balloon, PAGES_PER_MIB};
use serde::{Deserialize, Serialize};
use std::sync::atomic::Ordering;

/// The balloon as a snapshot holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonState {
    /// Target in 4 KiB pages.
    pub target_pages: u32,
    /// Pages the guest had given up.
    pub actual_pages: u32,
    /// Seconds between statistics updates.
    pub stats_polling_interval_s: u16,
    /// The guest's counters by tag.
    pub guest_stats: Vec<Option<u64>>,
    /// Free page hinting: the host's and the guest's last commands, the last run's ID, and
    /// whether the guest's STOP ends the run at once.
    #[serde(default)]
    pub hinting: Option<(u32, u32, u32, bool)>,
}

impl Balloon {
    pub(super) fn state(&self) -> BalloonState {
        BalloonState {
            target_pages: self.shared.target_pages.load(Ordering::SeqCst),
            actual_pages: self.shared.actual_pages.load(Ordering::SeqCst),
            stats_polling_interval_s: self.handle().stats_interval_s(),
            guest_stats: crate::bus::lock(&self.shared.guest_stats).to_vec(),
            hinting: Some((
                self.shared.hint_cmd.load(Ordering::SeqCst),
                self.shared.guest_hint_cmd.load(Ordering::SeqCst),
                self.shared.last_run.load(Ordering::SeqCst),
                self.shared.ack_on_stop.load(Ordering::SeqCst),
            )),
        }
    }

    pub(super) fn set_state(&mut self, state: &BalloonState) -> Result<(), String> {
        if (state.stats_polling_interval_s == 0) != (self.config.stats_polling_interval_s == 0) {
            return Err(format!(
                "balloon: statistics are {} in the snapshot but {} in its configuration",
                on_off(state.stats_polling_interval_s),
                on_off(self.config.stats_polling_interval_s)
            ));
        }
        if state.guest_stats.len() > 16 {
            return Err(format!(
                "balloon: {} statistics in the snapshot, at most 16 exist",
                state.guest_stats.len()
            ));
        }
        let most = u32::MAX / PAGES_PER_MIB * PAGES_PER_MIB;
        if state.target_pages > most {
            return Err(format!(
                "balloon: a target of {} pages in the snapshot is impossible",
                state.target_pages
            ));
        }
        self.shared
            .target_pages
            .store(state.target_pages, Ordering::SeqCst);
        self.shared
            .actual_pages
            .store(state.actual_pages, Ordering::SeqCst);
        self.shared
            .stats_interval_s
            .store(u32::from(state.stats_polling_interval_s), Ordering::SeqCst);
        if let Some((host, guest, run, ack)) = state.hinting {
            self.shared.hint_cmd.store(host, Ordering::SeqCst);
            self.shared.guest_hint_cmd.store(guest, Ordering::SeqCst);
            self.shared.last_run.store(run, Ordering::SeqCst);
            self.shared.ack_on_stop.store(ack, Ordering::SeqCst);
        }
        let mut stats = crate::bus::lock(&self.shared.guest_stats);
        *stats = [None; 16];
        for (slot, v) in stats.iter_mut().zip(&state.guest_stats) {
            *slot = *v;
        }
        Ok(())
    }
}

fn on_off(interval: u16) -> &'static str {
    if interval == 0 {
        "off"
    } else {
        "on"
    }
}
