//! The beat of the master's background loops (dispatcher, reaper, pool expiry): a pass every
//! `period`, a late pass delayed rather than bunched up, and an end when the replica shuts down.

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::{Interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

pub struct Ticker {
    interval: Interval,
    cancel: CancellationToken,
    /// Also a pass as soon as this changes (a notification), not only on the beat.
    wake: Option<watch::Receiver<u64>>,
}

impl Ticker {
    pub fn new(period: Duration, cancel: CancellationToken) -> Self {
        let mut interval = tokio::time::interval(period);
        interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Ticker { interval, cancel, wake: None }
    }

    /// A pass also whenever `wake` changes; the beat stays, for wake-ups that were missed.
    pub fn woken_by(mut self, wake: watch::Receiver<u64>) -> Self {
        self.wake = Some(wake);
        self
    }

    /// Waits for the next pass; `false` once the replica is shutting down.
    pub async fn tick(&mut self) -> bool {
        let woken = async {
            match self.wake.as_mut() {
                Some(wake) => {
                    if wake.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = self.cancel.cancelled() => false,
            _ = self.interval.tick() => true,
            () = woken => true,
        }
    }
}
