//! How values read on a page: statuses as an icon and a word, durations, times relative to now,
//! short ids and commits.

use chrono::{DateTime, Utc};
use cimaster_common::RunStatus;

/// A run status as the pages show it: never by colour alone.
#[derive(Debug, Clone, Copy)]
pub struct Status {
    pub word: &'static str,
    pub icon: &'static str,
    /// CSS class: `ok`, `bad`, `live`, `wait` or `off`.
    pub class: &'static str,
    pub active: bool,
}

pub fn status(status: RunStatus) -> Status {
    let (word, icon, class) = match status {
        RunStatus::Queued => ("queued", "◷", "wait"),
        RunStatus::Running => ("running", "▶", "live"),
        RunStatus::Succeeded => ("succeeded", "✔", "ok"),
        RunStatus::Failed => ("failed", "✘", "bad"),
        RunStatus::Aborted => ("aborted", "⊘", "off"),
        RunStatus::TimedOut => ("timed out", "⧗", "bad"),
        RunStatus::Error => ("error", "⚠", "bad"),
    };
    Status { word, icon, class, active: !status.is_terminal() }
}

/// `850ms`, `42s`, `3m 05s`, `2h 01m`.
pub fn duration(seconds: f64) -> String {
    if seconds < 1.0 {
        return format!("{}ms", (seconds * 1000.0).round() as i64);
    }
    let whole = seconds.round() as i64;
    match whole {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m {:02}s", s / 60, s % 60),
        s => format!("{}h {:02}m", s / 3600, (s % 3600) / 60),
    }
}

pub fn between(from: DateTime<Utc>, to: DateTime<Utc>) -> String {
    duration((to - from).num_milliseconds().max(0) as f64 / 1000.0)
}

/// `just now`, `5 min ago`, `3 h ago`, `2 days ago`, or in the future `in 4 min`.
pub fn relative(at: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let seconds = (now - at).num_seconds();
    let (ago, seconds) = (seconds >= 0, seconds.abs());
    let amount = match seconds {
        s if s < 45 => return "just now".into(),
        s if s < 3600 => format!("{} min", (s + 30) / 60),
        s if s < 86_400 => format!("{} h", (s + 1800) / 3600),
        s => {
            let days = (s + 43_200) / 86_400;
            format!("{days} day{}", if days == 1 { "" } else { "s" })
        }
    };
    if ago {
        format!("{amount} ago")
    } else {
        format!("in {amount}")
    }
}

/// A time as `<time>` wants it, and as a reader does.
pub fn iso(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

pub fn readable(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

/// The last eight hex digits of a run id: its random part (the first ones are its time, alike for
/// runs made together).
pub fn short_id(id: &uuid::Uuid) -> String {
    id.simple().to_string()[24..].to_owned()
}

pub fn short_sha(sha: &str) -> String {
    sha.chars().take(10).collect()
}

/// `1.5 GiB`, `512 MiB`, `12 KiB`, `80 B`.
pub fn bytes(count: i64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if count < 1024 {
        return format!("{count} B");
    }
    let mut value = count as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if value < 10.0 {
        format!("{value:.1} {}", UNITS[unit])
    } else {
        format!("{value:.0} {}", UNITS[unit])
    }
}

pub(crate) use crate::http::runs::urlencode;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_times_read_naturally() {
        assert_eq!(duration(0.25), "250ms");
        assert_eq!(duration(42.4), "42s");
        assert_eq!(duration(185.0), "3m 05s");
        assert_eq!(duration(7260.0), "2h 01m");
        let now = Utc::now();
        assert_eq!(relative(now - chrono::Duration::seconds(10), now), "just now");
        assert_eq!(relative(now - chrono::Duration::minutes(5), now), "5 min ago");
        assert_eq!(relative(now - chrono::Duration::days(1), now), "1 day ago");
        assert_eq!(relative(now + chrono::Duration::minutes(4), now), "in 4 min");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3 << 20), "3.0 MiB");
        assert_eq!(urlencode("/ui/runs?job=a b&x"), "/ui/runs%3Fjob%3Da%20b%26x");
    }

    #[test]
    fn every_status_has_a_word_and_an_icon() {
        for one in RunStatus::ALL {
            let shown = status(one);
            assert!(!shown.word.is_empty() && !shown.icon.is_empty());
            assert_eq!(shown.active, matches!(one, RunStatus::Queued | RunStatus::Running));
        }
    }
}
