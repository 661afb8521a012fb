//! The beat of the master's background loops (dispatcher, reaper, pool expiry): a pass every
//! `period`, a late pass delayed rather than bunched up, and an end when the replica shuts down.

use std::time::Duration;

use tokio::time::{Interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

pub struct Ticker {
    interval: Interval,
    cancel: CancellationToken,
}

impl Ticker {
    pub fn new(period: Duration, cancel: CancellationToken) -> Self {
        let mut interval = tokio::time::interval(period);
        interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Ticker { interval, cancel }
    }

    /// Waits for the next pass; `false` once the replica is shutting down.
    pub async fn tick(&mut self) -> bool {
        tokio::select! {
            _ = self.cancel.cancelled() => false,
            _ = self.interval.tick() => true,
        }
    }
}
