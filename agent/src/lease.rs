//! Keeping an attempt's leases — the run's, and a test cluster's — and letting go of the attempt on
//! our own when they cannot be kept.
//!
//! The master's reaper hands a run to another agent once its lease has expired in Postgres, and
//! the pool hands a cluster to another holder once its lease has expired. Both expire `lease` after
//! the last renewal Postgres applied. An agent cut off from Postgres cannot learn that its lease is
//! running out, so it fences itself: when no renewal it sent has succeeded for `fence_after`, it
//! stops the attempt's containers (SIGTERM, then SIGKILL after the stop grace) and writes no final
//! status (the run may already be someone else's).
//!
//! Measured from the moment the last successful renewal was *sent* — never later than the moment
//! Postgres applied it, so never later than the start of the lease it set:
//!
//! ```text
//! fence_after + stop_grace + margin = lease,    margin ≥ MIN_MARGIN,  fence_after ≥ MIN_FENCE_WINDOW
//! ```
//!
//! The fenced container is gone (killed at the latest `fence_after + stop_grace` after that send)
//! `margin` before the lease can expire; the reaper acts only after expiry, so the next attempt
//! cannot start while the old one still executes. The margin absorbs the rate drift between the
//! agent's clock and Postgres's and the time the engine needs to kill. [`LeaseTiming::new`] refuses
//! settings that break the inequality; the agent refuses to start with them.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Smallest margin between "the fenced container is gone" and "its lease may expire".
pub const MIN_MARGIN: Duration = Duration::from_millis(250);
/// Shortest time without a renewal before fencing (the window for renewals to get through).
pub const MIN_FENCE_WINDOW: Duration = Duration::from_secs(1);
/// Renewals tried within one fence window.
const RENEWALS_PER_WINDOW: u32 = 5;

/// The lease settings, checked against each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseTiming {
    lease: Duration,
    stop_grace: Duration,
    margin: Duration,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TimingError {
    #[error("the lease margin (CIMASTER_LEASE_MARGIN, {margin:?}) must be at least {MIN_MARGIN:?}")]
    MarginTooSmall { margin: Duration },
    #[error(
        "the lease (CIMASTER_LEASE_TTL, {lease:?}) must exceed the stop grace (CIMASTER_STOP_GRACE, {stop_grace:?}) \
         plus the lease margin (CIMASTER_LEASE_MARGIN, {margin:?}) by at least {MIN_FENCE_WINDOW:?}, so that a \
         run cut off from Postgres is stopped before its lease can expire"
    )]
    LeaseTooShort { lease: Duration, stop_grace: Duration, margin: Duration },
}

impl LeaseTiming {
    pub fn new(lease: Duration, stop_grace: Duration, margin: Duration) -> Result<Self, TimingError> {
        if margin < MIN_MARGIN {
            return Err(TimingError::MarginTooSmall { margin });
        }
        if lease < stop_grace + margin + MIN_FENCE_WINDOW {
            return Err(TimingError::LeaseTooShort { lease, stop_grace, margin });
        }
        Ok(Self { lease, stop_grace, margin })
    }

    /// How long a lease is granted for, each time it is taken or renewed.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// Between SIGTERM and SIGKILL when the attempt is stopped.
    pub fn stop_grace(&self) -> Duration {
        self.stop_grace
    }

    /// How long the agent goes on without a successful renewal before it stops the attempt.
    pub fn fence_after(&self) -> Duration {
        self.lease - self.stop_grace - self.margin
    }

    /// How often a lease is renewed; each try may take as long.
    pub fn renew_every(&self) -> Duration {
        self.fence_after() / RENEWALS_PER_WINDOW
    }
}

/// What one renewal learned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    Held,
    /// The lease is someone else's now (taken over, released, or the attempt ended elsewhere).
    Lost,
}

/// Why an attempt lost a lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseEnd {
    /// Postgres said the lease is no longer ours.
    TakenOver { lease: &'static str },
    /// No renewal got through for the fence window: the agent let go on its own.
    CutOff { lease: &'static str, silent: Duration },
}

impl LeaseEnd {
    /// Whether the run itself may be someone else's now (its own lease was lost), rather than only
    /// its test cluster.
    pub fn run_is_lost(&self) -> bool {
        match self {
            LeaseEnd::TakenOver { lease } | LeaseEnd::CutOff { lease, .. } => *lease == "run",
        }
    }
}

impl std::fmt::Display for LeaseEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LeaseEnd::TakenOver { lease } => write!(f, "this agent lost the {lease} lease"),
            LeaseEnd::CutOff { lease, silent } => {
                write!(
                    f,
                    "this agent could not renew the {lease} lease for {:.1}s and stopped the attempt",
                    silent.as_secs_f64()
                )
            }
        }
    }
}

/// Trips once, for the first lease an attempt loses; everything the attempt runs watches it.
#[derive(Debug, Clone, Default)]
pub struct Fence {
    tripped: CancellationToken,
    why: Arc<OnceLock<LeaseEnd>>,
    /// Set while the final status is written: a renewal may then find the run ended by ourselves.
    ending: Arc<AtomicBool>,
    /// When the last renewal that succeeded was sent (the grant at first), while the lease bounds
    /// the attempt.
    renewed: Arc<Mutex<Option<Instant>>>,
}

impl Fence {
    /// The attempt is writing its final status.
    pub fn ending(&self) {
        self.ending.store(true, Ordering::SeqCst);
    }

    pub fn trip(&self, why: LeaseEnd) {
        let _ = self.why.set(why);
        self.tripped.cancel();
    }

    /// Resolves when a lease is lost, with the first reason.
    pub async fn tripped(&self) -> LeaseEnd {
        self.tripped.cancelled().await;
        self.why().unwrap_or(LeaseEnd::TakenOver { lease: "run" })
    }

    pub fn why(&self) -> Option<LeaseEnd> {
        self.why.get().copied()
    }

    /// The lease was held as of a renewal sent at `at`.
    pub fn renewed_at(&self, at: Instant) {
        *self.renewed.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(at);
    }

    /// When the attempt's containers must be gone if the agent is heard from no more: the moment
    /// its own fencing would have killed them (`renewed + fence_after + stop_grace`, a margin
    /// before the lease can expire). `None` before the lease is held.
    pub fn gone_by(&self, timing: &LeaseTiming) -> Option<Instant> {
        let renewed = (*self.renewed.lock().unwrap_or_else(|poisoned| poisoned.into_inner()))?;
        Some(renewed + timing.fence_after() + timing.stop_grace())
    }
}

/// Renews a lease (named `lease` in logs and messages) every `renew_every`, each try bounded by
/// the same, until it is lost or no renewal succeeded for `fence_after` after `granted` (when the
/// lease was last sent for). Then trips `fence` and returns.
pub async fn keep<F, Fut, E>(lease: &'static str, timing: LeaseTiming, granted: Instant, mut renew: F, fence: Fence)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Renewal, E>>,
    E: std::fmt::Display,
{
    let mut renewed = granted;
    fence.renewed_at(granted);
    let mut next = granted + timing.renew_every();
    loop {
        let give_up = renewed + timing.fence_after();
        if next >= give_up {
            return cut_off(lease, &fence, renewed);
        }
        tokio::time::sleep_until(next).await;
        let sent = Instant::now();
        next = sent + timing.renew_every();
        let budget = timing.renew_every().min(give_up.saturating_duration_since(sent));
        match tokio::time::timeout(budget, renew()).await {
            Ok(Ok(Renewal::Held)) => {
                renewed = sent;
                fence.renewed_at(sent);
            }
            Ok(Ok(Renewal::Lost)) => {
                if fence.ending.load(Ordering::SeqCst) {
                    tracing::debug!(lease, "the lease ended with the attempt's final status");
                } else {
                    tracing::warn!(lease, "the lease is no longer ours");
                }
                return fence.trip(LeaseEnd::TakenOver { lease });
            }
            Ok(Err(err)) => tracing::warn!(lease, error = %err, "cannot renew the lease"),
            Err(_) => tracing::warn!(lease, waited = ?budget, "renewing the lease did not answer in time"),
        }
        if Instant::now() >= give_up {
            return cut_off(lease, &fence, renewed);
        }
    }
}

fn cut_off(lease: &'static str, fence: &Fence, renewed: Instant) {
    let silent = renewed.elapsed();
    tracing::error!(lease, silent = ?silent, "no lease renewal got through; stopping the attempt before the lease can expire");
    fence.trip(LeaseEnd::CutOff { lease, silent });
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU32;

    use super::*;

    fn timing() -> LeaseTiming {
        LeaseTiming::new(Duration::from_secs(30), Duration::from_secs(10), Duration::from_secs(5)).unwrap()
    }

    #[test]
    fn the_fenced_container_is_gone_a_margin_before_the_lease_expires() {
        let timing = timing();
        assert_eq!(timing.fence_after(), Duration::from_secs(15));
        assert!(timing.fence_after() + timing.stop_grace() + MIN_MARGIN <= timing.lease());
        assert_eq!(timing.renew_every(), Duration::from_secs(3));
    }

    #[test]
    fn settings_that_leave_no_room_to_fence_are_refused() {
        let too_short = LeaseTiming::new(Duration::from_secs(10), Duration::from_secs(10), Duration::from_secs(1));
        assert!(matches!(too_short, Err(TimingError::LeaseTooShort { .. })), "{too_short:?}");
        let no_margin = LeaseTiming::new(Duration::from_secs(30), Duration::from_secs(1), Duration::ZERO);
        assert_eq!(no_margin, Err(TimingError::MarginTooSmall { margin: Duration::ZERO }));
        assert!(LeaseTiming::new(Duration::from_secs(3), Duration::from_secs(1), Duration::from_millis(500)).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_that_cannot_be_renewed_trips_the_fence_after_the_window() {
        let fence = Fence::default();
        let start = Instant::now();
        keep("run", timing(), start, || async { Err::<Renewal, _>("connection refused") }, fence.clone()).await;
        assert!(matches!(fence.why(), Some(LeaseEnd::CutOff { lease: "run", .. })));
        assert!(start.elapsed() <= timing().fence_after(), "fenced after {:?}", start.elapsed());
        assert!(start.elapsed() >= timing().fence_after() - timing().renew_every());
    }

    #[tokio::test(start_paused = true)]
    async fn a_renewal_that_hangs_counts_as_failed() {
        let fence = Fence::default();
        let start = Instant::now();
        keep("cluster", timing(), start, std::future::pending::<Result<Renewal, String>>, fence.clone()).await;
        assert!(matches!(fence.why(), Some(LeaseEnd::CutOff { lease: "cluster", .. })));
        assert!(start.elapsed() <= timing().fence_after(), "fenced after {:?}", start.elapsed());
    }

    #[tokio::test(start_paused = true)]
    async fn renewals_that_get_through_keep_the_attempt_and_a_short_outage_is_ridden_out() {
        let fence = Fence::default();
        let tries = Arc::new(AtomicU32::new(0));
        let keeper = {
            let (fence, tries) = (fence.clone(), tries.clone());
            tokio::spawn(async move {
                keep(
                    "run",
                    timing(),
                    Instant::now(),
                    move || {
                        // Tries 3 to 5 fail (an outage of 9 s, within the 15 s window), then it is back.
                        let n = tries.fetch_add(1, Ordering::SeqCst);
                        async move {
                            if (3..6).contains(&n) {
                                Err("down")
                            } else {
                                Ok(Renewal::Held)
                            }
                        }
                    },
                    fence,
                )
                .await
            })
        };
        tokio::time::sleep(Duration::from_secs(300)).await;
        assert_eq!(fence.why(), None);
        assert!(tries.load(Ordering::SeqCst) > 60);
        keeper.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn the_warden_s_deadline_follows_the_last_renewal_and_stays_a_margin_before_expiry() {
        let (fence, timing) = (Fence::default(), timing());
        assert_eq!(fence.gone_by(&timing), None, "no deadline before the lease is held");
        let start = Instant::now();
        let keeper =
            tokio::spawn(keep("run", timing, start, || async { Ok::<_, String>(Renewal::Held) }, fence.clone()));
        tokio::time::sleep(Duration::from_secs(10)).await;
        let gone_by = fence.gone_by(&timing).unwrap();
        // Renewed every 3 s: the last one was sent at 9 s.
        assert_eq!(gone_by, start + Duration::from_secs(9) + timing.fence_after() + timing.stop_grace());
        assert!(gone_by + MIN_MARGIN <= start + Duration::from_secs(9) + timing.lease(), "a margin before expiry");
        keeper.abort();
        // Renewals that fail move it no more.
        let (fence, start) = (Fence::default(), Instant::now());
        keep("run", timing, start, || async { Err::<Renewal, _>("down") }, fence.clone()).await;
        assert_eq!(fence.gone_by(&timing), Some(start + timing.lease() - timing.margin));
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_taken_over_trips_at_once() {
        let fence = Fence::default();
        let start = Instant::now();
        keep("run", timing(), start, || async { Ok::<_, String>(Renewal::Lost) }, fence.clone()).await;
        assert_eq!(fence.why(), Some(LeaseEnd::TakenOver { lease: "run" }));
        assert_eq!(start.elapsed(), timing().renew_every());
    }
}
