//! The runs as an outbox: `published_at` records RabbitMQ's confirm of a run's current attempt, and
//! the dispatcher publishes queued runs nobody has confirmed yet. Rows being published are locked
//! with `SKIP LOCKED`, so replicas never publish the same run at the same time.

use std::time::Duration;

use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

/// A queued run waiting to be published.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Pending {
    pub id: Uuid,
    pub job: String,
    pub attempt: i32,
    pub queue: String,
}

/// Locks up to `limit` queued, unconfirmed runs older than `grace` in the caller's transaction,
/// oldest first, skipping rows another replica is publishing.
pub async fn lock_pending(conn: &mut PgConnection, grace: Duration, limit: i64) -> Result<Vec<Pending>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, job, attempt, queue FROM runs
         WHERE status = 'queued' AND published_at IS NULL AND queued_at < now() - make_interval(secs => $1)
         ORDER BY queued_at
         LIMIT $2
         FOR UPDATE SKIP LOCKED",
    )
    .bind(grace.as_secs_f64())
    .bind(limit)
    .fetch_all(&mut *conn)
    .await
}

/// Records the broker's confirms for these runs (those not recorded yet).
pub async fn mark_published(conn: &mut PgConnection, runs: &[Uuid]) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE runs SET published_at = now() WHERE id = ANY($1) AND published_at IS NULL")
        .bind(runs)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Queued runs the broker has not confirmed.
pub async fn backlog(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM runs WHERE status = 'queued' AND published_at IS NULL")
        .fetch_one(pool)
        .await
}
