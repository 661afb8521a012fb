//! The `github_deliveries` table: every webhook delivery by its id, the ones still to handle, and
//! what came of each.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::types::Json;
use sqlx::PgPool;
use uuid::Uuid;

/// A delivery as received.
pub struct Received<'a> {
    pub id: &'a str,
    pub event: &'a str,
    pub action: Option<&'a str>,
    pub repository: Option<&'a str>,
    pub sender: Option<&'a str>,
}

/// Records a delivery to handle later (`payload`) or one already settled (`outcome`); `false` when
/// this id was received before (a redelivery), which changes nothing.
pub async fn record(
    pool: &PgPool,
    delivery: &Received<'_>,
    payload: Option<&serde_json::Value>,
    outcome: Option<&str>,
) -> Result<bool, sqlx::Error> {
    let inserted = sqlx::query(
        "INSERT INTO github_deliveries (id, event, action, repository, sender, payload, state, outcome, done_at)
         VALUES ($1, $2, $3, $4, $5, $6, CASE WHEN $7::text IS NULL THEN 'pending' ELSE 'done' END, $7,
                 CASE WHEN $7::text IS NULL THEN NULL ELSE now() END)
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(delivery.id)
    .bind(delivery.event)
    .bind(delivery.action)
    .bind(delivery.repository)
    .bind(delivery.sender)
    .bind(payload.map(Json))
    .bind(outcome)
    .execute(pool)
    .await?;
    let fresh = inserted.rows_affected() == 1;
    if fresh && payload.is_some() {
        crate::channels::notify(pool, crate::channels::GITHUB_WORK).await?;
    }
    Ok(fresh)
}

/// A delivery this replica claimed to handle.
#[derive(Debug, sqlx::FromRow)]
pub struct Pending {
    pub id: String,
    pub event: String,
    pub payload: Json<serde_json::Value>,
}

/// Claims the oldest pending delivery no other replica holds, for `hold`.
pub async fn claim(pool: &PgPool, hold: std::time::Duration) -> Result<Option<Pending>, sqlx::Error> {
    sqlx::query_as(
        "WITH next AS (
             SELECT id FROM github_deliveries
             WHERE state = 'pending' AND (claimed_until IS NULL OR claimed_until < now())
             ORDER BY received_at LIMIT 1
             FOR UPDATE SKIP LOCKED
         )
         UPDATE github_deliveries d SET claimed_until = now() + make_interval(secs => $1)
         FROM next WHERE d.id = next.id
         RETURNING d.id, d.event, d.payload",
    )
    .bind(hold.as_secs_f64())
    .fetch_optional(pool)
    .await
}

/// Settles a handled delivery: what came of it and the runs it created. Its payload is let go.
pub async fn settle(pool: &PgPool, id: &str, outcome: &str, runs: &[Uuid]) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE github_deliveries SET state = 'done', outcome = $2, runs = $3, payload = NULL, done_at = now(),
                claimed_until = NULL
         WHERE id = $1",
    )
    .bind(id)
    .bind(outcome)
    .bind(runs)
    .execute(pool)
    .await?;
    Ok(())
}

/// A delivery as `GET /hooks/github/deliveries` lists it.
#[derive(Debug, Serialize, sqlx::FromRow)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct DeliveryView {
    pub id: String,
    pub event: String,
    pub action: Option<String>,
    pub repository: Option<String>,
    pub sender: Option<String>,
    /// `pending` (to be handled) or `done`.
    pub state: String,
    /// What came of it: the runs started, or why nothing was.
    pub outcome: Option<String>,
    pub runs: Vec<Uuid>,
    pub received_at: DateTime<Utc>,
    pub done_at: Option<DateTime<Utc>>,
}

/// The newest deliveries first, optionally of one repository.
pub async fn list(pool: &PgPool, repository: Option<&str>, limit: i64) -> Result<Vec<DeliveryView>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, event, action, repository, sender, state, outcome, runs, received_at, done_at
         FROM github_deliveries
         WHERE ($1::text IS NULL OR lower(repository) = lower($1))
         ORDER BY received_at DESC, id DESC LIMIT $2",
    )
    .bind(repository)
    .bind(limit)
    .fetch_all(pool)
    .await
}
