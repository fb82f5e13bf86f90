//! The balloon's snapshot state: target and actual size, the statistics interval (the API may
//! have changed it), the guest's last statistics and where free page hinting stood. A statistics buffer the device held is
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
    /// Where free page hinting stood.
    #[serde(default)]
    pub hinting: Option<HintingState>,
}

/// Free page hinting in a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HintingState {
    /// The host's last command (`free_page_hint_cmd_id`).
    pub host_cmd: u32,
    /// The guest's last command (`u32::MAX`: none).
    pub guest_cmd: u32,
    /// The last run's ID.
    pub last_run: u32,
    /// Whether the guest's STOP ends the run at once.
    pub ack_on_stop: bool,
}

impl Balloon {
    pub(super) fn state(&self) -> BalloonState {
        BalloonState {
            target_pages: self.shared.target_pages.load(Ordering::SeqCst),
            actual_pages: self.shared.actual_pages.load(Ordering::SeqCst),
            stats_polling_interval_s: self.handle().stats_interval_s(),
            guest_stats: crate::bus::lock(&self.shared.guest_stats).to_vec(),
            hinting: Some(HintingState {
                host_cmd: self.shared.hint_cmd.load(Ordering::SeqCst),
                guest_cmd: self.shared.guest_hint_cmd.load(Ordering::SeqCst),
                last_run: self.shared.last_run.load(Ordering::SeqCst),
                ack_on_stop: self.shared.ack_on_stop.load(Ordering::SeqCst),
            }),
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
        if let Some(h) = &state.hinting {
            self.shared.hint_cmd.store(h.host_cmd, Ordering::SeqCst);
            self.shared
                .guest_hint_cmd
                .store(h.guest_cmd, Ordering::SeqCst);
            self.shared.last_run.store(h.last_run, Ordering::SeqCst);
            self.shared
                .ack_on_stop
                .store(h.ack_on_stop, Ordering::SeqCst);
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
