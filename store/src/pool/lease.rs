//! Leases with fencing tokens: acquiring (or waiting in line for) a cluster, heartbeats and release.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use super::{
    check_osimage, event, notify_freed, Actor, ClusterRow, ClusterView, Lease, PoolError, COLUMNS, OSIMAGE_PURPOSES,
};

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
    /// Only this cluster (e.g. to carry over a lease from another inventory); never waits.
    pub cluster: Option<String>,
}

/// Leases a vacant, enabled, un-held cluster of the purpose, in one statement. The same (job, build)
/// asked again by the same holder gets the same lease back; asked by anyone else, it is a
/// `Conflict` that names no token. `None`: nothing vacant now.
pub async fn acquire(pool: &PgPool, request: &AcquireRequest) -> Result<Option<Lease>, PoolError> {
    check_osimage(&request.purpose, request.osimage.as_deref())?;
    let osimage = matched_osimage(request);
    for _ in 0..3 {
        let result: Result<Option<ClusterRow>, sqlx::Error> = sqlx::query_as(&format!(
            "WITH pick AS (
                 SELECT name FROM clusters
                 WHERE lease_token IS NULL AND disabled_reason IS NULL
                   AND (hold_until IS NULL OR hold_until <= now())
                   AND purpose = $1 AND ($2::text IS NULL OR osimage = $2)
                   AND ($11::text IS NULL OR name = $11)
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
        .bind(request.cluster.as_deref())
        .fetch_optional(pool)
        .await;
        match result {
            Ok(Some(row)) => return Ok(ClusterView::from(row).lease),
            // Nothing vacant, unless this (job, build) already holds a lease: a retried request.
            Ok(None) => return existing(pool, request).await,
            // This (job, build) already holds a lease (a retry, or a concurrent twin that won).
            Err(sqlx::Error::Database(db)) if db.constraint() == Some("clusters_lease_identity") => {
                if let Some(existing) = existing(pool, request).await? {
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
    let _ = sqlx::query("SELECT pg_notify($1, '')").bind(crate::channels::CLUSTER_FREED).execute(pool).await;
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

/// The lease the request's (job, build) holds already, if its holder asks again; a `Conflict` when
/// the identity is someone else's, whose lease (and fencing token) is theirs alone.
async fn existing(pool: &PgPool, request: &AcquireRequest) -> Result<Option<Lease>, PoolError> {
    match lease_of(pool, &request.job, &request.build).await? {
        Some(lease) if lease.holder != request.holder => Err(PoolError::Conflict(format!(
            "job `{}` build `{}` is leased by another holder; name a build of your own",
            request.job, request.build
        ))),
        lease => Ok(lease),
    }
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
pub async fn heartbeat(pool: &PgPool, token: i64, ttl: Duration, actor: Actor<'_>) -> Result<Lease, PoolError> {
    let mut tx = pool.begin().await?;
    let (_, holder) = current_lease(&mut tx, Some(token), None).await?;
    actor.acting_on(&format!("lease {token}"), &holder)?;
    let row: Option<ClusterRow> = sqlx::query_as(&format!(
        "UPDATE clusters SET lease_expires_at = now() + make_interval(secs => $2), updated_at = now()
         WHERE lease_token = $1 RETURNING {COLUMNS}"
    ))
    .bind(token)
    .bind(ttl.as_secs_f64())
    .fetch_optional(&mut *tx)
    .await?;
    tx.commit().await?;
    row.and_then(|row| ClusterView::from(row).lease)
        .ok_or_else(|| PoolError::Conflict(format!("lease {token} is not current (it was released or expired)")))
}

/// The cluster and holder of the current lease named by token or by cluster, locked until the
/// transaction ends; `Conflict` when there is none.
async fn current_lease(
    tx: &mut sqlx::PgConnection,
    token: Option<i64>,
    cluster: Option<&str>,
) -> Result<(String, String), PoolError> {
    let found: Option<(String, Option<String>)> = sqlx::query_as(
        "SELECT name, lease_holder FROM clusters
         WHERE ($1::bigint IS NULL OR lease_token = $1) AND ($2::text IS NULL OR name = $2) FOR UPDATE",
    )
    .bind(token)
    .bind(cluster)
    .fetch_optional(&mut *tx)
    .await?;
    match (found, token, cluster) {
        (Some((name, Some(holder))), _, _) => Ok((name, holder)),
        (_, Some(token), _) => {
            Err(PoolError::Conflict(format!("lease {token} is not current (it was released or expired)")))
        }
        (Some(_), None, Some(name)) => Err(PoolError::Conflict(format!("cluster `{name}` is not leased"))),
        (None, None, Some(name)) => Err(PoolError::NotFound(name.to_owned())),
        (_, None, None) => Err(PoolError::Invalid("nothing to release".into())),
    }
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
    actor: Actor<'_>,
    auto_disable_after: i32,
) -> Result<ClusterView, PoolError> {
    let (token, cluster) = match which {
        Release::Token(token) => (Some(token), None),
        Release::Cluster(name) => (None, Some(name)),
    };
    let mut tx = pool.begin().await?;
    let (name, holder) = current_lease(&mut tx, token, cluster).await?;
    let recorded = actor.acting_on(&format!("the lease of cluster `{name}`"), &holder)?;
    let row: ClusterRow = sqlx::query_as(&format!(
        "UPDATE clusters SET lease_token = NULL, lease_holder = NULL, lease_job = NULL, lease_build = NULL,
                lease_run = NULL, leased_at = NULL, lease_expires_at = NULL, vacant_since = now(), updated_at = now(),
                infra_failures = CASE WHEN $2 THEN infra_failures + 1 ELSE 0 END,
                disabled_reason = CASE WHEN $2 AND infra_failures + 1 >= $3 AND disabled_reason IS NULL
                    THEN 'disabled automatically after ' || (infra_failures + 1) || ' infrastructure failures in a row'
                    ELSE disabled_reason END,
                disabled_at = CASE WHEN $2 AND infra_failures + 1 >= $3 AND disabled_reason IS NULL
                    THEN now() ELSE disabled_at END
         WHERE name = $1
         RETURNING {COLUMNS}"
    ))
    .bind(&name)
    .bind(outcome == ReleaseOutcome::InfraFailure)
    .bind(auto_disable_after)
    .fetch_one(&mut *tx)
    .await?;
    let actor = recorded.as_str();
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
