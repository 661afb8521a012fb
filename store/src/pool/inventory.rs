//! The inventory: adding, updating, listing, disabling, holding and deleting clusters.

use std::collections::BTreeMap;

use sqlx::types::Json;
use sqlx::PgPool;
use std::time::Duration;

use super::{check_osimage, event, notify_freed, Actor, ClusterRow, ClusterView, PoolError, COLUMNS};

/// A new cluster in the inventory.
pub struct NewCluster {
    pub name: String,
    pub region: String,
    pub purpose: String,
    pub osimage: Option<String>,
    pub labels: BTreeMap<String, String>,
}

pub async fn add(pool: &PgPool, cluster: NewCluster, actor: &str) -> Result<ClusterView, PoolError> {
    check_osimage(&cluster.purpose, cluster.osimage.as_deref())?;
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
    check_osimage(&cluster.purpose, cluster.osimage.as_deref())?;
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

/// Holds a cluster for debugging until `until`; a leased cluster is held when its lease ends. A
/// hold someone else has in force is theirs to change (or an admin's).
pub async fn hold(
    pool: &PgPool,
    name: &str,
    actor: Actor<'_>,
    reason: &str,
    duration: Duration,
) -> Result<ClusterView, PoolError> {
    let mut tx = pool.begin().await?;
    let recorded = match current_hold(&mut tx, name).await? {
        Some(holder) => actor.acting_on(&format!("the hold on cluster `{name}`"), &holder)?,
        None => actor.name.to_owned(),
    };
    let row: ClusterRow = sqlx::query_as(&format!(
        "UPDATE clusters SET hold_by = $2, hold_reason = $3, hold_until = now() + make_interval(secs => $4),
                updated_at = now()
         WHERE name = $1 RETURNING {COLUMNS}"
    ))
    .bind(name)
    .bind(actor.name)
    .bind(reason)
    .bind(duration.as_secs_f64())
    .fetch_one(&mut *tx)
    .await?;
    event(&mut tx, name, "held", &recorded, None, Some(reason)).await?;
    tx.commit().await?;
    Ok(row.into())
}

/// Who holds the cluster now (a hold in force), locking its row; `NotFound` without the cluster.
async fn current_hold(tx: &mut sqlx::PgConnection, name: &str) -> Result<Option<String>, PoolError> {
    let found: Option<(Option<String>,)> =
        sqlx::query_as("SELECT CASE WHEN hold_until > now() THEN hold_by END FROM clusters WHERE name = $1 FOR UPDATE")
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?;
    found.map(|(holder,)| holder).ok_or_else(|| PoolError::NotFound(name.to_owned()))
}

/// Ends a hold: the holder's, or an admin's override. A cluster not held stays as it is.
pub async fn unhold(pool: &PgPool, name: &str, actor: Actor<'_>) -> Result<ClusterView, PoolError> {
    let mut tx = pool.begin().await?;
    let recorded = match current_hold(&mut tx, name).await? {
        Some(holder) => actor.acting_on(&format!("the hold on cluster `{name}`"), &holder)?,
        None => actor.name.to_owned(),
    };
    let row: ClusterRow = sqlx::query_as(&format!(
        "UPDATE clusters SET hold_by = NULL, hold_reason = NULL, hold_until = NULL, updated_at = now()
         WHERE name = $1 RETURNING {COLUMNS}"
    ))
    .bind(name)
    .fetch_one(&mut *tx)
    .await?;
    let by = recorded.as_str();
    event(&mut tx, name, "unheld", by, None, None).await?;
    notify_freed(&mut tx, &row.purpose).await?;
    tx.commit().await?;
    Ok(row.into())
}
