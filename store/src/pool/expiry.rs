//! Ending expired leases, holds and waiters, and counting clusters by state for the metrics.

use sqlx::PgPool;

use super::PoolError;

/// How many leases and holds one expiry pass ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Expired {
    pub leases: u64,
    pub holds: u64,
}

/// Ends every expired lease and hold; returns how many of each.
pub async fn expire(pool: &PgPool) -> Result<Expired, sqlx::Error> {
    let leases: Vec<(String, String)> = sqlx::query_as(
        "WITH expired AS (
             UPDATE clusters c SET lease_token = NULL, lease_holder = NULL, lease_job = NULL, lease_build = NULL,
                    lease_run = NULL, leased_at = NULL, lease_expires_at = NULL, vacant_since = now(), updated_at = now()
             FROM (SELECT name, lease_token, lease_holder FROM clusters
                   WHERE lease_token IS NOT NULL AND lease_expires_at < now() FOR UPDATE SKIP LOCKED) old
             WHERE c.name = old.name
             RETURNING c.name, c.purpose, old.lease_token, old.lease_holder
         ), event AS (
             INSERT INTO cluster_events (cluster, kind, actor, token, detail)
             SELECT name, 'lease_expired', 'cimaster', lease_token, 'lease of ' || lease_holder || ' expired' FROM expired
         )
         SELECT name, purpose FROM expired",
    )
    .fetch_all(pool)
    .await?;
    let holds: Vec<(String, String)> = sqlx::query_as(
        "WITH expired AS (
             UPDATE clusters c SET hold_by = NULL, hold_reason = NULL, hold_until = NULL, updated_at = now()
             FROM (SELECT name, hold_by FROM clusters WHERE hold_until IS NOT NULL AND hold_until < now()
                   FOR UPDATE SKIP LOCKED) old
             WHERE c.name = old.name
             RETURNING c.name, c.purpose, old.hold_by
         ), event AS (
             INSERT INTO cluster_events (cluster, kind, actor, detail)
             SELECT name, 'hold_expired', 'cimaster', 'hold of ' || hold_by || ' expired' FROM expired
         )
         SELECT name, purpose FROM expired",
    )
    .fetch_all(pool)
    .await?;
    sqlx::query("DELETE FROM cluster_waiters WHERE expires_at < now() - interval '1 minute'").execute(pool).await?;
    for (_, purpose) in leases.iter().chain(&holds) {
        let _ = sqlx::query("SELECT pg_notify($1, $2)")
            .bind(crate::channels::CLUSTER_FREED)
            .bind(purpose)
            .execute(pool)
            .await;
    }
    Ok(Expired { leases: leases.len() as u64, holds: holds.len() as u64 })
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
