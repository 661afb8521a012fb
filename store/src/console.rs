//! The `run_console` table: the live copy of a running attempt's console, in numbered chunks, which
//! the master serves until the agent has stored the whole log in S3.

use cimaster_common::RunId;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

/// Appends one chunk of an attempt's live console; a chunk sent again with the same `seq` is kept
/// once.
pub async fn append(pool: &PgPool, run: RunId, attempt: u32, seq: i64, data: &[u8]) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO run_console (run_id, attempt, seq, data) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING")
        .bind(run.0)
        .bind(attempt as i32)
        .bind(seq)
        .bind(data)
        .execute(pool)
        .await?;
    Ok(())
}

/// Up to `limit` chunks of an attempt's live console from `from_seq` on: (seq, bytes).
pub async fn chunks(
    pool: &PgPool,
    run: Uuid,
    attempt: i32,
    from_seq: i64,
    limit: i64,
) -> Result<Vec<(i64, Vec<u8>)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT seq, data FROM run_console WHERE run_id = $1 AND attempt = $2 AND seq >= $3 ORDER BY seq LIMIT $4",
    )
    .bind(run)
    .bind(attempt)
    .bind(from_seq)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// Drops an attempt's live copy once its log is in S3.
pub(crate) async fn drop_live(conn: &mut PgConnection, run: RunId, attempt: u32) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM run_console WHERE run_id = $1 AND attempt = $2")
        .bind(run.0)
        .bind(attempt as i32)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Points an ended attempt at its console log stored after it ended, and drops the live copy the
/// master served meanwhile. Only this agent's attempt, and only while it is the run's current one.
pub async fn record_late_console(
    pool: &PgPool,
    run: RunId,
    attempt: u32,
    agent: &str,
    key: &str,
    bytes: i64,
) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    let updated = sqlx::query(
        "UPDATE runs SET console_key = $4, console_bytes = $5, updated_at = now()
         WHERE id = $1 AND attempt = $2 AND agent = $3 AND console_key IS NULL AND finished_at IS NOT NULL",
    )
    .bind(run.0)
    .bind(attempt as i32)
    .bind(agent)
    .bind(key)
    .bind(bytes)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if updated > 0 {
        drop_live(&mut tx, run, attempt).await?;
    }
    tx.commit().await
}
