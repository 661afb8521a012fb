//! A job's schedule: a five-field cron expression read in a time zone, with the branch and
//! parameters its runs get and what to do when the previous scheduled run still runs.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

use crate::ids::{BranchName, EnvName};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Schedule {
    /// Five fields — minute, hour, day of month, month, day of week — e.g. `0 3 * * *` (03:00
    /// every day) or `*/15 8-18 * * MON-FRI`.
    #[cfg_attr(feature = "openapi", schema(value_type = String, example = "0 3 * * *"))]
    pub cron: CronExpr,
    /// The IANA time zone the expression is read in, e.g. `Europe/Berlin`; `UTC` when absent.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = String, example = "Europe/Berlin"))]
    pub timezone: TimeZone,
    /// Git jobs: the branch scheduled runs build; the job's `defaultBranch` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>))]
    pub branch: Option<BranchName>,
    /// Values for the job's declared parameters.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[cfg_attr(feature = "openapi", schema(value_type = BTreeMap<String, String>))]
    pub parameters: BTreeMap<EnvName, String>,
    /// `skip`: a slot whose previous scheduled run still runs starts nothing; `allow`: it starts
    /// another.
    #[serde(default)]
    pub overlap: Overlap,
}

impl Schedule {
    /// The first slot strictly after `after`.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let local = after.with_timezone(&self.timezone.0);
        self.cron.parsed.find_next_occurrence(&local, false).ok().map(|next| next.with_timezone(&Utc))
    }

    /// The next `count` slots after `after`.
    pub fn upcoming(&self, after: DateTime<Utc>, count: usize) -> Vec<DateTime<Utc>> {
        let mut slots = Vec::with_capacity(count);
        let mut from = after;
        while slots.len() < count {
            let Some(next) = self.next_after(from) else { break };
            slots.push(next);
            from = next;
        }
        slots
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Overlap {
    #[default]
    Skip,
    Allow,
}

/// A validated five-field cron expression.
#[derive(Clone)]
pub struct CronExpr {
    text: String,
    parsed: croner::Cron,
}

impl CronExpr {
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl FromStr for CronExpr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let fields = text.split_whitespace().count();
        if fields != 5 {
            return Err(format!(
                "cron `{text}` has {fields} fields; it needs five: minute, hour, day of month, month, day of week"
            ));
        }
        let parsed = croner::Cron::from_str(text).map_err(|err| format!("cron `{text}`: {err}"))?;
        // An expression that never matches (`0 0 31 2 *`) would never fire.
        let probe = Utc::now();
        if parsed.find_next_occurrence(&probe, false).is_err() {
            return Err(format!("cron `{text}` never matches a date"));
        }
        Ok(CronExpr { text: text.split_whitespace().collect::<Vec<_>>().join(" "), parsed })
    }
}

impl PartialEq for CronExpr {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl fmt::Debug for CronExpr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.text)
    }
}

impl Serialize for CronExpr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for CronExpr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(de::Error::custom)
    }
}

/// An IANA time zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeZone(pub chrono_tz::Tz);

impl Default for TimeZone {
    fn default() -> Self {
        TimeZone(chrono_tz::UTC)
    }
}

impl Serialize for TimeZone {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.0.name())
    }
}

impl<'de> Deserialize<'de> for TimeZone {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        name.parse::<chrono_tz::Tz>().map(TimeZone).map_err(|_| {
            de::Error::custom(format!("unknown time zone `{name}`; use an IANA name such as `Europe/Berlin` or `UTC`"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(json: serde_json::Value) -> Result<Schedule, String> {
        serde_json::from_value(json).map_err(|err| err.to_string())
    }

    #[test]
    fn slots_follow_the_time_zone_across_daylight_saving() {
        let berlin = schedule(serde_json::json!({"cron": "0 3 * * *", "timezone": "Europe/Berlin"})).unwrap();
        // 03:00 in Berlin is 02:00 UTC in winter and 01:00 UTC in summer.
        let winter = "2026-12-02T12:00:00Z".parse().unwrap();
        assert_eq!(berlin.next_after(winter).unwrap().to_rfc3339(), "2026-12-03T02:00:00+00:00");
        let summer = "2026-07-01T12:00:00Z".parse().unwrap();
        assert_eq!(berlin.next_after(summer).unwrap().to_rfc3339(), "2026-07-02T01:00:00+00:00");
        let slots = berlin.upcoming(winter, 3);
        assert_eq!(slots.len(), 3);
        assert_eq!((slots[1] - slots[0]).num_hours(), 24);
        assert_eq!(berlin.overlap, Overlap::Skip);
    }

    #[test]
    fn bad_expressions_and_zones_say_what_is_wrong() {
        let four = schedule(serde_json::json!({"cron": "0 3 * *"})).unwrap_err();
        assert!(four.contains("has 4 fields; it needs five"), "{four}");
        let six = schedule(serde_json::json!({"cron": "0 0 3 * * *"})).unwrap_err();
        assert!(six.contains("has 6 fields"), "{six}");
        let hour = schedule(serde_json::json!({"cron": "0 25 * * *"})).unwrap_err();
        assert!(hour.contains("cron `0 25 * * *`"), "{hour}");
        let zone = schedule(serde_json::json!({"cron": "0 3 * * *", "timezone": "Mars/Olympus"})).unwrap_err();
        assert!(zone.contains("unknown time zone `Mars/Olympus`"), "{zone}");
        let never = schedule(serde_json::json!({"cron": "0 0 31 2 *"})).unwrap_err();
        assert!(never.contains("never matches"), "{never}");
        let overlap = schedule(serde_json::json!({"cron": "0 3 * * *", "overlap": "queue"})).unwrap_err();
        assert!(overlap.contains("unknown variant `queue`"), "{overlap}");
    }
}
