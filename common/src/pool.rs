//! The test-cluster pool's operations on Postgres, shared by the master (API) and the agent (jobs
//! that need a cluster). Each operation is one statement or one short transaction.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::types::Json;
use sqlx::PgPool;
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
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

const COLUMNS: &str = "name, region, purpose, osimage, labels, lease_token, lease_holder, lease_job, lease_build, \
    lease_run, leased_at, lease_expires_at, hold_by, hold_reason, hold_until, disabled_reason, disabled_at, \
    infra_failures, last_job, last_build, last_trigger";

#[derive(sqlx::FromRow)]
struct ClusterRow {
    name: String,
    region: String,
    purpose: String,
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
    /// `vacant` or `leased`.
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
            status: if lease.is_some() { "leased" } else { "vacant" },
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

/// A new cluster in the inventory.
pub struct NewCluster {
    pub name: String,
    pub region: String,
    pub purpose: String,
    pub osimage: Option<String>,
    pub labels: BTreeMap<String, String>,
}

pub async fn add(pool: &PgPool, cluster: NewCluster, actor: &str) -> Result<ClusterView, PoolError> {
    let row: Option<ClusterRow> = sqlx::query_as(&format!(
        "WITH added AS (
             INSERT INTO clusters (name, region, purpose, osimage, labels) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (name) DO NOTHING RETURNING {COLUMNS}
         ), event AS (
             INSERT INTO cluster_events (cluster, kind, actor, detail) SELECT name, 'added', $6, region FROM added
         )
         SELECT * FROM added"
    ))
    .bind(&cluster.name)
    .bind(&cluster.region)
    .bind(&cluster.purpose)
    .bind(&cluster.osimage)
    .bind(Json(&cluster.labels))
    .bind(actor)
    .fetch_optional(pool)
    .await?;
    row.map(ClusterView::from).ok_or(PoolError::Exists(cluster.name))
}

/// Creates or updates a cluster's inventory fields (not its lease, hold or health). Returns the
/// cluster and whether it was `created`, `updated` or `unchanged`.
pub async fn apply(pool: &PgPool, cluster: NewCluster, actor: &str) -> Result<(ClusterView, &'static str), PoolError> {
    let row: Option<(bool,)> = sqlx::query_as(
        "WITH applied AS (
             INSERT INTO clusters (name, region, purpose, osimage, labels) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (name) DO UPDATE
                 SET region = EXCLUDED.region, purpose = EXCLUDED.purpose, osimage = EXCLUDED.osimage,
                     labels = EXCLUDED.labels, updated_at = now()
                 WHERE (clusters.region, clusters.purpose, clusters.osimage, clusters.labels)
                       IS DISTINCT FROM (EXCLUDED.region, EXCLUDED.purpose, EXCLUDED.osimage, EXCLUDED.labels)
             RETURNING name, (xmax = 0) AS inserted
         ), event AS (
             INSERT INTO cluster_events (cluster, kind, actor)
             SELECT name, CASE WHEN inserted THEN 'added' ELSE 'updated' END, $6 FROM applied
         )
         SELECT inserted FROM applied",
    )
    .bind(&cluster.name)
    .bind(&cluster.region)
    .bind(&cluster.purpose)
    .bind(&cluster.osimage)
    .bind(Json(&cluster.labels))
    .bind(actor)
    .fetch_optional(pool)
    .await?;
    let change = match row {
        Some((true,)) => "created",
        Some((false,)) => "updated",
        None => "unchanged",
    };
    Ok((get(pool, &cluster.name).await?, change))
}

pub async fn get(pool: &PgPool, name: &str) -> Result<ClusterView, PoolError> {
    let row: Option<ClusterRow> = sqlx::query_as(&format!("SELECT {COLUMNS} FROM clusters WHERE name = $1"))
        .bind(name)
        .fetch_optional(pool)
        .await?;
    row.map(ClusterView::from).ok_or_else(|| PoolError::NotFound(name.to_owned()))
}

pub async fn list(pool: &PgPool, purpose: Option<&str>) -> Result<Vec<ClusterView>, PoolError> {
    let rows: Vec<ClusterRow> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM clusters WHERE ($1::text IS NULL OR purpose = $1) ORDER BY name"
    ))
    .bind(purpose)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(ClusterView::from).collect())
}

pub async fn delete(pool: &PgPool, name: &str, actor: &str) -> Result<(), PoolError> {
    let mut tx = pool.begin().await?;
    let leased: Option<Option<String>> =
        sqlx::query_scalar("SELECT lease_holder FROM clusters WHERE name = $1 FOR UPDATE")
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?;
    match leased {
        None => return Err(PoolError::NotFound(name.to_owned())),
        Some(Some(holder)) => {
            return Err(PoolError::Conflict(format!(
                "cluster `{name}` is leased by {holder}; finish or let the lease expire first"
            )))
        }
        Some(None) => {}
    }
    sqlx::query("DELETE FROM clusters WHERE name = $1").bind(name).execute(&mut *tx).await?;
    event(&mut tx, name, "deleted", actor, None, None).await?;
    tx.commit().await?;
    Ok(())
}

pub async fn set_disabled(
    pool: &PgPool,
    name: &str,
    reason: Option<&str>,
    actor: &str,
) -> Result<ClusterView, PoolError> {
    let mut tx = pool.begin().await?;
    let row: Option<ClusterRow> = sqlx::query_as(&format!(
        "UPDATE clusters SET disabled_reason = $2, disabled_at = CASE WHEN $2::text IS NULL THEN NULL ELSE now() END,
                infra_failures = CASE WHEN $2::text IS NULL THEN 0 ELSE infra_failures END, updated_at = now()
         WHERE name = $1 RETURNING {COLUMNS}"
    ))
    .bind(name)
    .bind(reason)
    .fetch_optional(&mut *tx)
    .await?;
    let row = row.ok_or_else(|| PoolError::NotFound(name.to_owned()))?;
    event(&mut tx, name, if reason.is_some() { "disabled" } else { "enabled" }, actor, None, reason).await?;
    notify_freed(&mut tx, &row.purpose).await?;
    tx.commit().await?;
    Ok(row.into())
}

async fn event(
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
async fn notify_freed(tx: &mut sqlx::PgConnection, purpose: &str) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_notify('cimaster_cluster_freed', $1)").bind(purpose).execute(&mut *tx).await?;
    Ok(())
}

/// What a lease is for.
#[derive(Debug, Clone)]
pub struct AcquireRequest {
    pub purpose: String,
    pub osimage: Option<String>,
    pub job: String,
    pub build: String,
    pub holder: String,
    pub run: Option<Uuid>,
    pub ttl: Duration,
    /// How long the caller has waited so far (recorded on the lease, for wait-time reports).
    pub waited: Duration,
    /// Higher is served first among waiters.
    pub priority: i32,
    /// This request's place in the waiting queue, once it has one ([`enqueue`]).
    pub waiter: Option<i64>,
}

/// Purposes whose clusters must match the requested OS image (as `tnet-ci` in the original CIMaster).
pub const OSIMAGE_PURPOSES: &[&str] = &["tnet-ci"];

/// Leases a vacant, enabled, un-held cluster of the purpose, in one statement. The same (job, build)
/// gets the same lease back. `None`: nothing vacant now.
pub async fn acquire(pool: &PgPool, request: &AcquireRequest) -> Result<Option<Lease>, PoolError> {
    let needs_image = OSIMAGE_PURPOSES.contains(&request.purpose.as_str());
    if needs_image && request.osimage.is_none() {
        return Err(PoolError::Invalid(format!("purpose `{}` needs `osimage`", request.purpose)));
    }
    let osimage = matched_osimage(request);
    for _ in 0..3 {
        let result: Result<Option<ClusterRow>, sqlx::Error> = sqlx::query_as(&format!(
            "WITH pick AS (
                 SELECT name FROM clusters
                 WHERE lease_token IS NULL AND disabled_reason IS NULL
                   AND (hold_until IS NULL OR hold_until <= now())
                   AND purpose = $1 AND ($2::text IS NULL OR osimage = $2)
                   -- Nobody is waiting ahead of this request.
                   AND NOT EXISTS (
                       SELECT 1 FROM cluster_waiters w
                       WHERE w.purpose = $1 AND w.osimage IS NOT DISTINCT FROM $2 AND w.expires_at > now()
                         AND w.id IS DISTINCT FROM $10
                         AND (w.priority > $9 OR (w.priority = $9 AND w.id < coalesce($10, 9223372036854775807))))
                 ORDER BY vacant_since, name
                 LIMIT 1
                 FOR UPDATE SKIP LOCKED
             ), leased AS (
                 UPDATE clusters c SET lease_token = nextval('cluster_lease_tokens'), lease_holder = $3,
                        lease_job = $4, lease_build = $5, lease_run = $6, leased_at = now(),
                        lease_expires_at = now() + make_interval(secs => $7),
                        last_job = $4, last_build = $5, last_trigger = $3, updated_at = now()
                 FROM pick WHERE c.name = pick.name
                 RETURNING {}
             ), event AS (
                 INSERT INTO cluster_events (cluster, kind, actor, token, job, build, wait_ms)
                 SELECT name, 'leased', $3, lease_token, $4, $5, $8 FROM leased
             )
             SELECT * FROM leased",
            COLUMNS.split(", ").map(|c| format!("c.{c}")).collect::<Vec<_>>().join(", ")
        ))
        .bind(&request.purpose)
        .bind(osimage)
        .bind(&request.holder)
        .bind(&request.job)
        .bind(&request.build)
        .bind(request.run)
        .bind(request.ttl.as_secs_f64())
        .bind(i64::try_from(request.waited.as_millis()).unwrap_or(i64::MAX))
        .bind(request.priority)
        .bind(request.waiter)
        .fetch_optional(pool)
        .await;
        match result {
            Ok(Some(row)) => return Ok(ClusterView::from(row).lease),
            // Nothing vacant, unless this (job, build) already holds a lease: a retried request.
            Ok(None) => return Ok(lease_of(pool, &request.job, &request.build).await?),
            // This (job, build) already holds a lease (a retry, or a concurrent twin that won).
            Err(sqlx::Error::Database(db)) if db.constraint() == Some("clusters_lease_identity") => {
                if let Some(existing) = lease_of(pool, &request.job, &request.build).await? {
                    return Ok(Some(existing));
                }
            }
            Err(err) => return Err(err.into()),
        }
    }
    Err(PoolError::Conflict("the lease kept changing; retry".into()))
}

/// The OS image a request is matched on: only for purposes that match on it.
fn matched_osimage(request: &AcquireRequest) -> Option<&str> {
    if OSIMAGE_PURPOSES.contains(&request.purpose.as_str()) {
        request.osimage.as_deref()
    } else {
        None
    }
}

/// Takes a place in the waiting queue, kept until `expires_in` unless renewed with [`touch`].
pub async fn enqueue(pool: &PgPool, request: &AcquireRequest, expires_in: Duration) -> Result<i64, PoolError> {
    Ok(sqlx::query_scalar(
        "INSERT INTO cluster_waiters (purpose, osimage, priority, holder, job, build, expires_at)
         VALUES ($1, $2, $3, $4, $5, $6, now() + make_interval(secs => $7)) RETURNING id",
    )
    .bind(&request.purpose)
    .bind(matched_osimage(request))
    .bind(request.priority)
    .bind(&request.holder)
    .bind(&request.job)
    .bind(&request.build)
    .bind(expires_in.as_secs_f64())
    .fetch_one(pool)
    .await?)
}

pub async fn touch(pool: &PgPool, waiter: i64, expires_in: Duration) -> Result<(), PoolError> {
    sqlx::query("UPDATE cluster_waiters SET expires_at = now() + make_interval(secs => $2) WHERE id = $1")
        .bind(waiter)
        .bind(expires_in.as_secs_f64())
        .execute(pool)
        .await?;
    Ok(())
}

pub async fn dequeue(pool: &PgPool, waiter: i64) -> Result<(), PoolError> {
    sqlx::query("DELETE FROM cluster_waiters WHERE id = $1").bind(waiter).execute(pool).await?;
    // The next waiter may be able to go now.
    let _ = sqlx::query("SELECT pg_notify('cimaster_cluster_freed', '')").execute(pool).await;
    Ok(())
}

/// One waiting acquire and its place in its queue (1 = next).
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct Waiter {
    pub id: i64,
    pub purpose: String,
    pub osimage: Option<String>,
    pub priority: i32,
    pub holder: String,
    pub job: String,
    pub build: String,
    pub since: DateTime<Utc>,
    pub position: i64,
}

pub async fn waiters(pool: &PgPool, purpose: Option<&str>) -> Result<Vec<Waiter>, PoolError> {
    Ok(sqlx::query_as(
        "SELECT id, purpose, osimage, priority, holder, job, build, since,
                row_number() OVER (PARTITION BY purpose, osimage ORDER BY priority DESC, id) AS position
         FROM cluster_waiters
         WHERE expires_at > now() AND ($1::text IS NULL OR purpose = $1)
         ORDER BY purpose, osimage, position",
    )
    .bind(purpose)
    .fetch_all(pool)
    .await?)
}

async fn lease_of(pool: &PgPool, job: &str, build: &str) -> Result<Option<Lease>, sqlx::Error> {
    let row: Option<ClusterRow> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM clusters WHERE lease_token IS NOT NULL AND lease_job = $1 AND lease_build = $2"
    ))
    .bind(job)
    .bind(build)
    .fetch_optional(pool)
    .await?;
    Ok(row.and_then(|row| ClusterView::from(row).lease))
}

/// Extends a lease; refused for a token that is not the current one.
pub async fn heartbeat(pool: &PgPool, token: i64, ttl: Duration) -> Result<Lease, PoolError> {
    let row: Option<ClusterRow> = sqlx::query_as(&format!(
        "UPDATE clusters SET lease_expires_at = now() + make_interval(secs => $2), updated_at = now()
         WHERE lease_token = $1 RETURNING {COLUMNS}"
    ))
    .bind(token)
    .bind(ttl.as_secs_f64())
    .fetch_optional(pool)
    .await?;
    row.and_then(|row| ClusterView::from(row).lease)
        .ok_or_else(|| PoolError::Conflict(format!("lease {token} is not current (it was released or expired)")))
}

/// How the lease's work went, for the cluster's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReleaseOutcome {
    Ok,
    InfraFailure,
}

/// Which lease to release.
pub enum Release<'a> {
    /// The REST API: the fencing token.
    Token(i64),
    /// The original `/finishtest?cluster=`: whatever lease the cluster has.
    Cluster(&'a str),
}

/// Ends a lease. After `auto_disable_after` infrastructure failures in a row the cluster is disabled.
pub async fn release(
    pool: &PgPool,
    which: Release<'_>,
    outcome: ReleaseOutcome,
    actor: &str,
    auto_disable_after: i32,
) -> Result<ClusterView, PoolError> {
    let (token, cluster) = match which {
        Release::Token(token) => (Some(token), None),
        Release::Cluster(name) => (None, Some(name)),
    };
    let mut tx = pool.begin().await?;
    let row: Option<ClusterRow> = sqlx::query_as(&format!(
        "UPDATE clusters SET lease_token = NULL, lease_holder = NULL, lease_job = NULL, lease_build = NULL,
                lease_run = NULL, leased_at = NULL, lease_expires_at = NULL, vacant_since = now(), updated_at = now(),
                infra_failures = CASE WHEN $3 THEN infra_failures + 1 ELSE 0 END,
                disabled_reason = CASE WHEN $3 AND infra_failures + 1 >= $4 AND disabled_reason IS NULL
                    THEN 'disabled automatically after ' || (infra_failures + 1) || ' infrastructure failures in a row'
                    ELSE disabled_reason END,
                disabled_at = CASE WHEN $3 AND infra_failures + 1 >= $4 AND disabled_reason IS NULL
                    THEN now() ELSE disabled_at END
         WHERE lease_token IS NOT NULL AND ($1::bigint IS NULL OR lease_token = $1) AND ($2::text IS NULL OR name = $2)
         RETURNING {COLUMNS}"
    ))
    .bind(token)
    .bind(cluster)
    .bind(outcome == ReleaseOutcome::InfraFailure)
    .bind(auto_disable_after)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = row else {
        tx.rollback().await?;
        return Err(match (token, cluster) {
            (Some(token), _) => {
                PoolError::Conflict(format!("lease {token} is not current (it was released or expired)"))
            }
            (None, Some(name)) => match get(pool, name).await {
                Ok(_) => PoolError::Conflict(format!("cluster `{name}` is not leased")),
                Err(err) => err,
            },
            (None, None) => PoolError::Invalid("nothing to release".into()),
        });
    };
    let detail = (outcome == ReleaseOutcome::InfraFailure).then_some("infrastructure failure");
    event(&mut tx, &row.name, "released", actor, token, detail).await?;
    if let Some(reason) = row.disabled_reason.as_deref().filter(|r| r.starts_with("disabled automatically")) {
        if row.infra_failures == auto_disable_after {
            event(&mut tx, &row.name, "auto_disabled", "cimaster", None, Some(reason)).await?;
        }
    }
    notify_freed(&mut tx, &row.purpose).await?;
    tx.commit().await?;
    Ok(row.into())
}

/// Holds a cluster for debugging until `until`; a leased cluster is held when its lease ends.
pub async fn hold(
    pool: &PgPool,
    name: &str,
    by: &str,
    reason: &str,
    duration: Duration,
) -> Result<ClusterView, PoolError> {
    let mut tx = pool.begin().await?;
    let row: Option<ClusterRow> = sqlx::query_as(&format!(
        "UPDATE clusters SET hold_by = $2, hold_reason = $3, hold_until = now() + make_interval(secs => $4),
                updated_at = now()
         WHERE name = $1 RETURNING {COLUMNS}"
    ))
    .bind(name)
    .bind(by)
    .bind(reason)
    .bind(duration.as_secs_f64())
    .fetch_optional(&mut *tx)
    .await?;
    let row = row.ok_or_else(|| PoolError::NotFound(name.to_owned()))?;
    event(&mut tx, name, "held", by, None, Some(reason)).await?;
    tx.commit().await?;
    Ok(row.into())
}

pub async fn unhold(pool: &PgPool, name: &str, by: &str) -> Result<ClusterView, PoolError> {
    let mut tx = pool.begin().await?;
    let row: Option<ClusterRow> = sqlx::query_as(&format!(
        "UPDATE clusters SET hold_by = NULL, hold_reason = NULL, hold_until = NULL, updated_at = now()
         WHERE name = $1 RETURNING {COLUMNS}"
    ))
    .bind(name)
    .fetch_optional(&mut *tx)
    .await?;
    let row = row.ok_or_else(|| PoolError::NotFound(name.to_owned()))?;
    event(&mut tx, name, "unheld", by, None, None).await?;
    notify_freed(&mut tx, &row.purpose).await?;
    tx.commit().await?;
    Ok(row.into())
}

/// One event of the history.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct Event {
    pub id: i64,
    pub cluster: String,
    pub kind: String,
    pub actor: String,
    pub token: Option<i64>,
    pub job: Option<String>,
    pub build: Option<String>,
    pub detail: Option<String>,
    pub at: DateTime<Utc>,
}

pub async fn events(pool: &PgPool, cluster: Option<&str>, after: i64, limit: i64) -> Result<Vec<Event>, PoolError> {
    Ok(sqlx::query_as(
        "SELECT id, cluster, kind, actor, token, job, build, detail, at FROM cluster_events
         WHERE ($1::text IS NULL OR cluster = $1) AND id > $2 ORDER BY id LIMIT $3",
    )
    .bind(cluster)
    .bind(after)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// Usage of one purpose over the report's window.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct PurposeUsage {
    pub purpose: String,
    pub clusters: i64,
    pub leases: i64,
    /// Leased time over available cluster time, 0–1.
    pub utilisation: f64,
    pub wait_p50_ms: Option<f64>,
    pub wait_p99_ms: Option<f64>,
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct HoldUsage {
    pub person: String,
    pub holds: i64,
    pub hours: f64,
}

#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct UsageReport {
    pub since: DateTime<Utc>,
    pub until: DateTime<Utc>,
    pub purposes: Vec<PurposeUsage>,
    pub holds: Vec<HoldUsage>,
}

/// Utilisation and wait times per purpose, and hold hours per person, from the event history.
pub async fn report(pool: &PgPool, since: DateTime<Utc>) -> Result<UsageReport, PoolError> {
    let until = Utc::now();
    let purposes: Vec<PurposeUsage> = sqlx::query_as(
        "WITH lease_events AS (
             SELECT e.cluster, e.kind, e.at, e.wait_ms,
                    lead(e.at) OVER (PARTITION BY e.cluster ORDER BY e.id) AS ended_at
             FROM cluster_events e
             WHERE e.kind IN ('leased', 'released', 'lease_expired') AND e.at >= $1
         ), leases AS (
             SELECT cluster, wait_ms,
                    extract(epoch FROM coalesce(ended_at, $2) - at) AS seconds
             FROM lease_events WHERE kind = 'leased'
         )
         SELECT c.purpose,
                count(DISTINCT c.name) AS clusters,
                count(l.cluster) AS leases,
                coalesce(sum(l.seconds), 0)::float8
                    / greatest(count(DISTINCT c.name) * extract(epoch FROM $2 - $1), 1)::float8 AS utilisation,
                percentile_cont(0.5) WITHIN GROUP (ORDER BY l.wait_ms)::float8 AS wait_p50_ms,
                percentile_cont(0.99) WITHIN GROUP (ORDER BY l.wait_ms)::float8 AS wait_p99_ms
         FROM clusters c LEFT JOIN leases l ON l.cluster = c.name
         GROUP BY c.purpose ORDER BY c.purpose",
    )
    .bind(since)
    .bind(until)
    .fetch_all(pool)
    .await?;
    let holds: Vec<HoldUsage> = sqlx::query_as(
        "WITH hold_events AS (
             SELECT cluster, kind, actor, at,
                    lead(at) OVER (PARTITION BY cluster ORDER BY id) AS ended_at
             FROM cluster_events
             WHERE kind IN ('held', 'unheld', 'hold_expired') AND at >= $1
         )
         SELECT actor AS person, count(*) AS holds,
                (sum(extract(epoch FROM coalesce(ended_at, $2) - at)) / 3600)::float8 AS hours
         FROM hold_events WHERE kind = 'held'
         GROUP BY actor ORDER BY hours DESC",
    )
    .bind(since)
    .bind(until)
    .fetch_all(pool)
    .await?;
    Ok(UsageReport { since, until, purposes, holds })
}

/// Clusters by purpose and state (`vacant`, `leased`, `held`, `disabled`), for metrics.
pub async fn census(pool: &PgPool) -> Result<Vec<(String, String, i64)>, PoolError> {
    Ok(sqlx::query_as(
        "SELECT purpose,
                CASE WHEN disabled_reason IS NOT NULL THEN 'disabled'
                     WHEN lease_token IS NOT NULL THEN 'leased'
                     WHEN hold_until > now() THEN 'held'
                     ELSE 'vacant' END AS state,
                count(*)
         FROM clusters GROUP BY 1, 2",
    )
    .fetch_all(pool)
    .await?)
}
