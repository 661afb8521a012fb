//! Where a benchmark's CPU time went: the whole host's busy time from `/proc/stat` and chosen
//! processes' own time from `/proc/<pid>/stat`, so a benchmark can print what each run cost the
//! machine next to what the baseline's run did. Linux only, in clock ticks of 10 ms (USER_HZ 100,
//! the kernel's fixed value for this interface on every common architecture).

use std::time::Duration;

const TICK: Duration = Duration::from_millis(10);

/// CPU time spent so far: the host's (all cores, outside idle and I/O wait) and some processes'.
#[derive(Debug, Clone, Default)]
pub struct Reading {
    pub host: Duration,
    /// In the order of the pids asked for; a process that has exited reads as zero.
    pub processes: Vec<Duration>,
}

impl Reading {
    pub fn now(pids: &[u32]) -> Self {
        Self { host: host_busy(), processes: pids.iter().map(|pid| process_time(*pid)).collect() }
    }

    /// CPU time spent between `earlier` and this reading.
    pub fn since(&self, earlier: &Reading) -> Reading {
        Reading {
            host: self.host.saturating_sub(earlier.host),
            processes: self
                .processes
                .iter()
                .zip(&earlier.processes)
                .map(|(now, then)| now.saturating_sub(*then))
                .collect(),
        }
    }
}

/// Busy time of all cores: user, nice, system, irq, softirq and steal.
fn host_busy() -> Duration {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|line| line.starts_with("cpu ")) else { return Duration::ZERO };
    let ticks: Vec<u64> = line.split_whitespace().skip(1).filter_map(|field| field.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let busy: u64 =
        ticks.iter().take(8).enumerate().filter(|(index, _)| *index != 3 && *index != 4).map(|(_, t)| t).sum();
    TICK * u32::try_from(busy).unwrap_or(u32::MAX)
}

/// User and system time of a process and of its children it has waited for.
fn process_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name may hold spaces; the fields after it start past its closing parenthesis.
    let Some((_, fields)) = stat.rsplit_once(')') else { return Duration::ZERO };
    let fields: Vec<u64> = fields.split_whitespace().skip(11).take(4).filter_map(|f| f.parse().ok()).collect();
    TICK * u32::try_from(fields.iter().sum::<u64>()).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_loop_shows_in_its_own_time_and_the_hosts() {
        // Spins until the reading shows 200 ms of this process's CPU time: on a busy machine that
        // takes longer than 200 ms of wall time, but never ten seconds.
        let pid = std::process::id();
        let before = Reading::now(&[pid]);
        let give_up = std::time::Instant::now() + Duration::from_secs(10);
        let mut x = 0u64;
        let spent = loop {
            let slice = std::time::Instant::now();
            while slice.elapsed() < Duration::from_millis(20) {
                x = std::hint::black_box(x.wrapping_add(1));
            }
            let spent = Reading::now(&[pid]).since(&before);
            if spent.processes[0] >= Duration::from_millis(200) || std::time::Instant::now() > give_up {
                break spent;
            }
        };
        assert!(spent.processes[0] >= Duration::from_millis(200), "{spent:?}");
        assert!(spent.host >= spent.processes[0] / 2, "{spent:?}");
        assert_eq!(Reading::now(&[u32::MAX]).processes, vec![Duration::ZERO]);
    }
}
