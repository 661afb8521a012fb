//! Admission: a run is taken only when its declared CPUs and memory fit in what this agent has left
//! of its quota, and the host's CPU use is under the configured ceiling.
//!
//! Host CPU use is sampled every second and averaged over the last few seconds (an exponentially
//! weighted moving average), so a host that stays busy holds runs back while a second's spike does
//! not: removing one run's containers or starting another keeps both cores busy for a moment, and
//! read raw, that moment would hold the agent's next run back by a second.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

#[derive(Debug)]
struct Free {
    cpus: f64,
    memory: u64,
}

struct Inner {
    total_cpus: f64,
    total_memory: u64,
    max_cpu: f64,
    free: Mutex<Free>,
    /// Host CPU use, 0.0–1.0, as f32 bits.
    host_cpu: AtomicU32,
    released: Notify,
}

#[derive(Clone)]
pub struct Admission {
    inner: Arc<Inner>,
}

/// Resources held by one run; given back when dropped.
pub struct Reservation {
    inner: Arc<Inner>,
    cpus: f64,
    memory: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut free = self.inner.free.lock().unwrap_or_else(|p| p.into_inner());
        free.cpus += self.cpus;
        free.memory += self.memory;
        drop(free);
        self.inner.released.notify_waiters();
    }
}

/// Why a run cannot be admitted right now.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    /// It will never fit this agent.
    TooLarge(String),
    Busy,
}

impl Admission {
    pub fn new(total_cpus: f64, total_memory: u64, max_cpu: f64) -> Self {
        Self {
            inner: Arc::new(Inner {
                total_cpus,
                total_memory,
                max_cpu,
                free: Mutex::new(Free { cpus: total_cpus, memory: total_memory }),
                host_cpu: AtomicU32::new(0f32.to_bits()),
                released: Notify::new(),
            }),
        }
    }

    /// The CPUs this agent hands out.
    pub fn cpus(&self) -> f64 {
        self.inner.total_cpus
    }

    /// The memory this agent hands out, in bytes.
    pub fn memory(&self) -> u64 {
        self.inner.total_memory
    }

    /// Samples host CPU use once a second until `cancel`, keeping its moving average.
    pub fn spawn_cpu_sampler(&self, cancel: CancellationToken) -> tokio::task::JoinHandle<()> {
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let mut system = sysinfo::System::new();
            let mut average = None;
            loop {
                system.refresh_cpu_usage();
                let sample = system.global_cpu_usage() / 100.0;
                let smoothed = average.map_or(sample, |average| smooth(average, sample));
                average = Some(smoothed);
                inner.host_cpu.store(smoothed.to_bits(), Ordering::Relaxed);
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        })
    }

    /// CPUs and memory bytes reserved by runs now.
    pub fn in_use(&self) -> (f64, u64) {
        let free = self.inner.free.lock().unwrap_or_else(|p| p.into_inner());
        ((self.inner.total_cpus - free.cpus).max(0.0), self.inner.total_memory.saturating_sub(free.memory))
    }

    pub fn host_cpu(&self) -> f64 {
        f64::from(f32::from_bits(self.inner.host_cpu.load(Ordering::Relaxed)))
    }

    pub fn try_reserve(&self, cpus: f64, memory: u64) -> Result<Reservation, Refusal> {
        if cpus > self.inner.total_cpus + 1e-9 || memory > self.inner.total_memory {
            return Err(Refusal::TooLarge(format!(
                "needs {cpus} CPUs and {} MiB; this agent has {} CPUs and {} MiB in all",
                memory >> 20,
                self.inner.total_cpus,
                self.inner.total_memory >> 20
            )));
        }
        if self.host_cpu() > self.inner.max_cpu {
            return Err(Refusal::Busy);
        }
        let mut free = self.inner.free.lock().unwrap_or_else(|p| p.into_inner());
        if cpus > free.cpus + 1e-9 || memory > free.memory {
            return Err(Refusal::Busy);
        }
        free.cpus -= cpus;
        free.memory -= memory;
        Ok(Reservation { inner: self.inner.clone(), cpus, memory })
    }

    /// Waits until the run fits (woken by released reservations, and every 500 ms for CPU use).
    /// `None` when cancelled; `Err` when it can never fit.
    pub async fn reserve(
        &self,
        cpus: f64,
        memory: u64,
        cancel: &CancellationToken,
    ) -> Result<Option<Reservation>, String> {
        let started = std::time::Instant::now();
        loop {
            let released = self.inner.released.notified();
            match self.try_reserve(cpus, memory) {
                Ok(reservation) => {
                    metrics::histogram!(crate::telemetry::ADMISSION_WAIT).record(started.elapsed().as_secs_f64());
                    return Ok(Some(reservation));
                }
                Err(Refusal::TooLarge(reason)) => return Err(reason),
                Err(Refusal::Busy) => {}
            }
            tokio::select! {
                _ = cancel.cancelled() => return Ok(None),
                _ = released => {}
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }
}

/// Over how many seconds of samples host CPU use is averaged.
const CPU_WINDOW_SECONDS: f32 = 5.0;

/// The moving average after one more sample (a second after the last).
fn smooth(average: f32, sample: f32) -> f32 {
    let weight = 1.0 - (-1.0 / CPU_WINDOW_SECONDS).exp();
    average + (sample - average) * weight
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_moment_of_full_cpu_does_not_cross_the_ceiling_but_seconds_of_it_do() {
        let ceiling = 0.85;
        let spike = smooth(0.2, 1.0);
        assert!(spike < 0.4, "{spike}");
        assert!(smooth(spike, 0.2) < spike);
        let mut average = 0.2;
        let seconds = (1..=30).find(|_| {
            average = smooth(average, 1.0);
            average > ceiling
        });
        assert!(matches!(seconds, Some(5..=15)), "crossed after {seconds:?} s");
    }

    #[test]
    fn reservations_are_bounded_by_the_quota_and_given_back() {
        let admission = Admission::new(2.0, 1 << 30, 1.0);
        let a = admission.try_reserve(1.5, 512 << 20).unwrap();
        assert_eq!(admission.try_reserve(1.0, 1 << 20).err(), Some(Refusal::Busy));
        let b = admission.try_reserve(0.5, 512 << 20).unwrap();
        assert_eq!(admission.try_reserve(0.1, 1 << 20).err(), Some(Refusal::Busy));
        drop(a);
        assert!(admission.try_reserve(1.5, 1 << 20).is_ok());
        drop(b);
        assert!(matches!(admission.try_reserve(3.0, 1), Err(Refusal::TooLarge(_))));
    }

    #[tokio::test]
    async fn a_waiting_run_is_admitted_when_another_finishes() {
        let admission = Admission::new(1.0, 1 << 30, 1.0);
        let first = admission.try_reserve(1.0, 1 << 20).unwrap();
        let waiter = {
            let admission = admission.clone();
            tokio::spawn(async move { admission.reserve(1.0, 1 << 20, &CancellationToken::new()).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        drop(first);
        let second = tokio::time::timeout(Duration::from_secs(1), waiter).await.unwrap().unwrap();
        assert!(second.unwrap().is_some());
    }
}
