//! Ends expired leases and holds. Runs in every replica: each expiry is one conditional UPDATE, so a
//! lease or hold is ended exactly once whichever replica gets there first.

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

pub async fn run_expiry(pool: PgPool, interval: Duration, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        match expire(&pool).await {
            Ok((leases, holds)) if leases + holds > 0 => {
                metrics::counter!("cimaster_pool_lease_expiries_total").increment(leases);
                metrics::counter!("cimaster_pool_hold_expiries_total").increment(holds);
                tracing::info!(leases, holds, "expired pool leases and holds");
            }
            Ok(_) => {}
            Err(err) => tracing::warn!(error = %err, "pool expiry pass failed"),
        }
        if let Ok(census) = cimaster_common::pool::census(&pool).await {
            for state in ["vacant", "leased", "held", "disabled"] {
                let purposes: std::collections::BTreeSet<&str> = census.iter().map(|(p, _, _)| p.as_str()).collect();
                for purpose in purposes {
                    let count = census.iter().find(|(p, s, _)| p == purpose && s == state).map_or(0, |(_, _, n)| *n);
                    metrics::gauge!("cimaster_pool_clusters", "purpose" => purpose.to_owned(), "state" => state)
                        .set(count as f64);
                }
            }
        }
    }
}

/// Ends every expired lease and hold; returns how many of each.
pub async fn expire(pool: &PgPool) -> Result<(u64, u64), sqlx::Error> {
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
        let _ = sqlx::query("SELECT pg_notify('cimaster_cluster_freed', $1)").bind(purpose).execute(pool).await;
    }
    Ok((leases.len() as u64, holds.len() as u64))
}
