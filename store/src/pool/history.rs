//! The pool's history: its event log and the usage report.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

use super::PoolError;

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
