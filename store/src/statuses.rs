//! The `commit_statuses` table: what each (repository, commit, context) should show on the code
//! host, and what was posted. A row follows a run, whose state is read from the run whenever the
//! reporter looks (so the status is written with the run's state change, by whoever changes it),
//! or holds a fixed state. The newest row of a target wins; the reporter claims one row per target
//! at a time, so one (commit, context) never gets an older state after a newer one.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

/// Where a status goes.
pub struct Target<'a> {
    pub repository: &'a str,
    pub sha: &'a str,
    pub context: &'a str,
}

/// Starts following `run` on its target; a second call for the same run changes nothing.
pub async fn follow_run(pool: &PgPool, target: &Target<'_>, run: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO commit_statuses (repository, sha, context, run_id) VALUES ($1, $2, $3, $4)
         ON CONFLICT (run_id) DO NOTHING",
    )
    .bind(target.repository)
    .bind(target.sha)
    .bind(target.context)
    .bind(run)
    .execute(pool)
    .await?;
    crate::channels::notify(pool, crate::channels::GITHUB_WORK).await
}

/// Shows a fixed state on the target, unless its newest row already shows exactly that.
pub async fn show(pool: &PgPool, target: &Target<'_>, state: &str, description: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO commit_statuses (repository, sha, context, state, description)
         SELECT $1, $2, $3, $4, $5
         WHERE NOT EXISTS (
             SELECT 1 FROM (SELECT state, description FROM commit_statuses
                            WHERE repository = $1 AND sha = $2 AND context = $3 ORDER BY id DESC LIMIT 1) newest
             WHERE newest.state = $4 AND newest.description = $5)",
    )
    .bind(target.repository)
    .bind(target.sha)
    .bind(target.context)
    .bind(state)
    .bind(description)
    .execute(pool)
    .await?;
    crate::channels::notify(pool, crate::channels::GITHUB_WORK).await
}

/// Whether anything was ever shown on the target.
pub async fn any(pool: &PgPool, target: &Target<'_>) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM commit_statuses WHERE repository = $1 AND sha = $2 AND context = $3)",
    )
    .bind(target.repository)
    .bind(target.sha)
    .bind(target.context)
    .fetch_one(pool)
    .await
}

/// A row whose target should show something other than what was last posted.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Due {
    pub id: i64,
    pub repository: String,
    pub sha: String,
    pub context: String,
    pub run_id: Option<Uuid>,
    /// Rows that follow a run: the run's state now (`status:agent`), the key posting it records.
    pub key: String,
    /// Fixed rows: what to show.
    pub state: Option<String>,
    pub description: Option<String>,
    pub attempts: i32,
}

/// Settles rows a newer row of their target replaced, then claims up to `limit` rows whose
/// target should change, one per target and none whose target another replica is posting to.
pub async fn claim_due(pool: &PgPool, hold: Duration, limit: i64) -> Result<Vec<Due>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    // One claimer at a time: the check that no row of a target is being posted is then exact.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('cimaster commit statuses'))").execute(&mut *tx).await?;
    sqlx::query(
        "UPDATE commit_statuses s SET settled = true, outcome = 'replaced by a newer status', claimed_until = NULL
         WHERE NOT s.settled AND (s.claimed_until IS NULL OR s.claimed_until < now()) AND EXISTS (
             SELECT 1 FROM commit_statuses n
             WHERE n.repository = s.repository AND n.sha = s.sha AND n.context = s.context AND n.id > s.id)",
    )
    .execute(&mut *tx)
    .await?;
    let due: Vec<Due> = sqlx::query_as(
        "WITH keyed AS (
             SELECT s.id, s.next_attempt_at, s.posted,
                    CASE WHEN s.run_id IS NULL THEN s.state || ':' || s.description
                         ELSE r.status || ':' || coalesce(r.agent, '') END AS key
             FROM commit_statuses s LEFT JOIN runs r ON r.id = s.run_id
             WHERE NOT s.settled AND s.next_attempt_at <= now()
               AND (s.claimed_until IS NULL OR s.claimed_until < now())
               AND NOT EXISTS (
                   SELECT 1 FROM commit_statuses o
                   WHERE o.repository = s.repository AND o.sha = s.sha AND o.context = s.context
                     AND o.id <> s.id AND o.claimed_until >= now())
         ), wanted AS (
             SELECT id, key FROM keyed WHERE posted IS DISTINCT FROM key ORDER BY next_attempt_at LIMIT $2
         )
         UPDATE commit_statuses s SET claimed_until = now() + make_interval(secs => $1)
         FROM wanted WHERE s.id = wanted.id
         RETURNING s.id, s.repository, s.sha, s.context, s.run_id, wanted.key, s.state, s.description, s.attempts",
    )
    .bind(hold.as_secs_f64())
    .bind(limit)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(due)
}

/// Records that the row's state `key` was posted; `settled` when it was the last it will show.
pub async fn posted(pool: &PgPool, id: i64, key: &str, settled: bool) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE commit_statuses SET posted = $2, settled = $3, outcome = CASE WHEN $3 THEN 'posted' END,
                attempts = 0, last_error = NULL, claimed_until = NULL
         WHERE id = $1",
    )
    .bind(id)
    .bind(key)
    .bind(settled)
    .execute(pool)
    .await?;
    Ok(())
}

/// Tries the row again after `wait`, remembering why it failed.
pub async fn retry_after(pool: &PgPool, id: i64, wait: Duration, error: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE commit_statuses SET attempts = attempts + 1, last_error = $3, claimed_until = NULL,
                next_attempt_at = now() + make_interval(secs => $2)
         WHERE id = $1",
    )
    .bind(id)
    .bind(wait.as_secs_f64())
    .bind(error)
    .execute(pool)
    .await?;
    Ok(())
}

/// Gives the row up: the code host will not take it (and retrying would not change that).
pub async fn drop(pool: &PgPool, id: i64, why: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE commit_statuses SET settled = true, outcome = 'dropped: ' || $2, last_error = $2, claimed_until = NULL
         WHERE id = $1",
    )
    .bind(id)
    .bind(why)
    .execute(pool)
    .await?;
    Ok(())
}

/// Lets a claimed row go without a change (nothing new to post yet).
pub async fn release(pool: &PgPool, id: i64) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE commit_statuses SET claimed_until = NULL WHERE id = $1").bind(id).execute(pool).await?;
    Ok(())
}

/// A status as `GET /hooks/github/statuses` lists it.
#[derive(Debug, Serialize, sqlx::FromRow)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct StatusView {
    pub repository: String,
    pub sha: String,
    pub context: String,
    pub run_id: Option<Uuid>,
    /// The state last posted (`status:agent` of the run, or `state:description`).
    pub posted: Option<String>,
    pub settled: bool,
    /// `posted`, `replaced by a newer status`, or `dropped: …`.
    pub outcome: Option<String>,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub next_attempt_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
}

/// The newest statuses first, optionally of one commit.
pub async fn list(pool: &PgPool, sha: Option<&str>, limit: i64) -> Result<Vec<StatusView>, sqlx::Error> {
    sqlx::query_as(
        "SELECT repository, sha, context, run_id, posted, settled, outcome, attempts, last_error, next_attempt_at,
                created_at
         FROM commit_statuses WHERE ($1::text IS NULL OR sha = $1) ORDER BY id DESC LIMIT $2",
    )
    .bind(sha)
    .bind(limit)
    .fetch_all(pool)
    .await
}
