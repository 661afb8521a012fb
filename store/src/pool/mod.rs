//! The test-cluster pool's tables (`clusters`, `cluster_events`, `cluster_waiters`), shared by the
//! master (API, expiry) and the agent (jobs that need a cluster). Each operation is one statement or
//! one short transaction.

mod expiry;
mod history;
mod inventory;
mod lease;

pub use expiry::{census, expire, Expired};
pub use history::{events, report, Event, HoldUsage, PurposeUsage, UsageReport};
pub use inventory::{add, apply, delete, get, hold, list, set_disabled, unhold, NewCluster};
pub use lease::{
    acquire, dequeue, enqueue, heartbeat, release, touch, waiters, AcquireRequest, Release, ReleaseOutcome, Waiter,
};

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::types::Json;
use std::collections::BTreeMap;
use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("cluster `{0}` does not exist")]
    NotFound(String),
    #[error("cluster `{0}` already exists")]
    Exists(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    /// The lease or hold is someone else's.
    #[error("{0}")]
    NotYours(String),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// Who acts on a lease or a hold: its holder may; anyone else only with `may_override` (an admin),
/// and the history records that it was an override.
#[derive(Debug, Clone, Copy)]
pub struct Actor<'a> {
    pub name: &'a str,
    pub may_override: bool,
}

impl<'a> Actor<'a> {
    /// The holder acting on their own (the agent, for the runs it leased for).
    pub fn holder(name: &'a str) -> Self {
        Self { name, may_override: false }
    }

    /// How the history names this actor acting on `owner`'s lease or hold; `NotYours` unless it
    /// is theirs or an override is allowed.
    pub(crate) fn acting_on(&self, what: &str, owner: &str) -> Result<String, PoolError> {
        if owner == self.name {
            Ok(self.name.to_owned())
        } else if self.may_override {
            Ok(format!("{} (admin, overriding {owner})", self.name))
        } else {
            Err(PoolError::NotYours(format!(
                "{what} belongs to `{owner}`; only they (or an admin) may change it, not `{}`",
                self.name
            )))
        }
    }
}

/// The purpose of a cluster or a lease that names none (as in the original CIMaster).
pub const DEFAULT_PURPOSE: &str = "tess-ci";

/// Leases whose `job` starts with this are a run's own: `run:<run id>`, its build the attempt
/// number. Only the agent running the attempt takes one (through [`acquire`], not over HTTP), so
/// nobody can take a queued run's identity ahead of it.
pub const RUN_JOB_PREFIX: &str = "run:";

/// The lease `job` of a run's clusters.
pub fn run_job(run: impl std::fmt::Display) -> String {
    format!("{RUN_JOB_PREFIX}{run}")
}

/// Purposes whose clusters must match the requested OS image (as `tnet-ci` in the original CIMaster).
pub const OSIMAGE_PURPOSES: &[&str] = &["tnet-ci"];

/// A cluster or lease of a purpose in [`OSIMAGE_PURPOSES`] must name its OS image.
pub fn check_osimage(purpose: &str, osimage: Option<&str>) -> Result<(), PoolError> {
    if OSIMAGE_PURPOSES.contains(&purpose) && osimage.is_none() {
        return Err(PoolError::Invalid(format!("purpose `{purpose}` needs `osimage`")));
    }
    Ok(())
}

pub(crate) const COLUMNS: &str =
    "name, region, purpose, osimage, labels, lease_token, lease_holder, lease_job, lease_build, \
    lease_run, leased_at, lease_expires_at, hold_by, hold_reason, hold_until, disabled_reason, disabled_at, \
    infra_failures, last_job, last_build, last_trigger";

#[derive(sqlx::FromRow)]
pub(crate) struct ClusterRow {
    pub(crate) name: String,
    region: String,
    pub(crate) purpose: String,
    osimage: Option<String>,
    labels: Json<BTreeMap<String, String>>,
    lease_token: Option<i64>,
    lease_holder: Option<String>,
    lease_job: Option<String>,
    lease_build: Option<String>,
    lease_run: Option<Uuid>,
    leased_at: Option<DateTime<Utc>>,
    lease_expires_at: Option<DateTime<Utc>>,
    hold_by: Option<String>,
    hold_reason: Option<String>,
    hold_until: Option<DateTime<Utc>>,
    disabled_reason: Option<String>,
    disabled_at: Option<DateTime<Utc>>,
    infra_failures: i32,
    last_job: Option<String>,
    last_build: Option<String>,
    last_trigger: Option<String>,
}

/// A cluster as the API shows it.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct ClusterView {
    pub name: String,
    pub region: String,
    pub purpose: String,
    pub osimage: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// `vacant`, `leased`, `held` (kept out of the pool for debugging) or `disabled`; a leased
    /// cluster that is also held becomes `held` when its lease ends.
    pub status: &'static str,
    pub lease: Option<Lease>,
    pub hold: Option<Hold>,
    pub disabled: Option<Disabled>,
    pub infra_failures: i32,
    pub last_job: Option<String>,
    pub last_build: Option<String>,
    pub last_trigger_name: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct Lease {
    pub cluster: String,
    /// Fencing token: heartbeat and release need it, so a holder whose lease expired cannot touch the next one.
    pub token: i64,
    pub holder: String,
    pub job: Option<String>,
    pub build: Option<String>,
    pub run: Option<Uuid>,
    pub since: DateTime<Utc>,
    pub expires: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct Hold {
    pub by: String,
    pub reason: String,
    pub until: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct Disabled {
    pub reason: String,
    pub since: DateTime<Utc>,
}

impl From<ClusterRow> for ClusterView {
    fn from(row: ClusterRow) -> Self {
        let lease = match (row.lease_token, row.leased_at, row.lease_expires_at) {
            (Some(token), Some(since), Some(expires)) => Some(Lease {
                cluster: row.name.clone(),
                token,
                holder: row.lease_holder.clone().unwrap_or_default(),
                job: row.lease_job.clone(),
                build: row.lease_build.clone(),
                run: row.lease_run,
                since,
                expires,
            }),
            _ => None,
        };
        let hold = match (row.hold_by, row.hold_until) {
            (Some(by), Some(until)) if until > Utc::now() => {
                Some(Hold { by, reason: row.hold_reason.unwrap_or_default(), until })
            }
            _ => None,
        };
        ClusterView {
            status: match (&row.disabled_reason, &lease, &hold) {
                (Some(_), _, _) => "disabled",
                (None, Some(_), _) => "leased",
                (None, None, Some(_)) => "held",
                (None, None, None) => "vacant",
            },
            name: row.name,
            region: row.region,
            purpose: row.purpose,
            osimage: row.osimage,
            labels: row.labels.0,
            lease,
            hold,
            disabled: row
                .disabled_reason
                .map(|reason| Disabled { reason, since: row.disabled_at.unwrap_or_else(Utc::now) }),
            infra_failures: row.infra_failures,
            last_job: row.last_job,
            last_build: row.last_build,
            last_trigger_name: row.last_trigger,
        }
    }
}

pub(crate) async fn event(
    tx: &mut sqlx::PgConnection,
    cluster: &str,
    kind: &str,
    actor: &str,
    token: Option<i64>,
    detail: Option<&str>,
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO cluster_events (cluster, kind, actor, token, detail) VALUES ($1, $2, $3, $4, $5)")
        .bind(cluster)
        .bind(kind)
        .bind(actor)
        .bind(token)
        .bind(detail)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// Wakes waiters when the transaction commits.
pub(crate) async fn notify_freed(tx: &mut sqlx::PgConnection, purpose: &str) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(crate::channels::CLUSTER_FREED)
        .bind(purpose)
        .execute(&mut *tx)
        .await?;
    Ok(())
}
